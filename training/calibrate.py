"""Per-class thresholds chosen on the validation split to meet a false-reject budget.

The budget (default 1% of good units rejected) is shared equally by the classes whose threshold is
learned. Fill level is decided by the measured height against the product's spec wherever both exist:
the spec, not a statistic, defines that defect, so its threshold stays at the spec edge (0.5).

Where the line's fill gauge decides the fill level (a measurement against the line's good units, no spec), its
threshold sits at the edge of the good units' readings, just above the highest, and takes only the share that
edge costs (1 / (n + 1) of n good units, more for those it cannot measure); the network's classes share the
rest. A gauge's good units end at a few robust deviations and a wrong fill lies beyond them, so a lower fill
threshold buys almost no fill recall, while every good unit the network's classes may reject buys particles and
cracks (docs/new_line.md, "The false-reject budget"). The edge is the good units' own: a good unit the gauge
scores far beyond the rest (``gauge_edge``) was mis-measured, not filled differently, and rejecting it costs one
false reject where a threshold above it would accept every fill-level defect below it.
"""

from __future__ import annotations

import math

import numpy as np

from vialinspect.datasets.records import ContainerRecord
from vialinspect.vision.scores import CLASSES, LOCALIZED, Scores, class_scores, rejected_classes, score_at

from .by_format import by_format, uneven_warning
from .metrics import DEFAULT_CRACK_BINS_MM, DEFAULT_POD_BINS_UM, binned

SPEC_EDGE = 0.5
PARITY_MARGIN = 1e-4  # equals the export's parity tolerance on probabilities
# The fill gauge's edge ignores good units beyond a fence (``gauge_edge``): the gauge's score at Z_HALF robust
# deviations (vision.fill_gauge: 6, where its score is 0.5), or Tukey's far fence of the good units' own fill scores
# (third quartile + 3 interquartile ranges) where that lies higher (a lot spread wider than the gauge's reference),
# given enough units to place the quartiles.
GAUGE_FENCE_SCORE = 0.5
GAUGE_FENCE_IQR = 3.0
GAUGE_FENCE_MIN_UNITS = 20


def fill_is_spec_decided(records: list[ContainerRecord], scores: list[Scores]) -> bool:
    return bool(records) and all(r.fill_spec is not None and s.fill_height_mm is not None
                                 for r, s in zip(records, scores, strict=True))


def rejects_allowed(n_good: int, budget: float) -> int:
    """How many of ``n_good`` validation good units a threshold may reject so that a *new* good unit is
    rejected with probability at most ``budget``; -1 where even rejecting none cannot promise that.

    With the k highest of n good scores rejected, a new good unit (exchangeable with them) scores above the
    threshold with probability (k + 1) / (n + 1), not k / n. The k / n rule meets the budget on the validation
    units and overshoots on the line by about 1 / n: with 221 good units and 0.5% per class it allows one
    reject, which is 0.9% per class on new units, and the test split showed it (2.35% against a 1% budget).
    """
    return int(math.floor(budget * (n_good + 1) + 1e-9)) - 1


def threshold_for_budget(good_scores: np.ndarray, budget: float) -> float:
    """Smallest threshold (scores >= t reject) at which a new good unit is rejected with probability at most
    ``budget``, as far as these good units tell (``rejects_allowed``); just above the highest good score
    where they are too few to promise the budget."""
    g = np.sort(np.asarray(good_scores, np.float64))[::-1]
    if len(g) == 0:
        return SPEC_EDGE
    k = max(rejects_allowed(len(g), budget), 0)
    t = g[k] if k < len(g) else g[-1]
    # Just above that unit's score by the export parity tolerance: a threshold one float step above a
    # validation score would let ONNX Runtime's last-digit differences flip that unit's decision.
    return float(min(t + PARITY_MARGIN, 0.9999))


def gauge_edge(good_fill: np.ndarray) -> tuple[float, np.ndarray]:
    """The fill gauge's threshold on these measured good units' fill scores: just above the highest that lies
    within the fence (``GAUGE_FENCE_SCORE``, or Tukey's far fence of these scores where higher), and the scores
    beyond it, highest first (those units are rejected at it).

    A good unit's liquid column lies within a few robust deviations of the line's good units (the highest of
    1,200 good units of a line 2.3-3.0), and the fill-level defects measured beyond them (from 4.2); a "good" unit
    6 or more deviations out was mis-measured (a container leaning in the image, cut by its edge, its meniscus
    hidden) or is not good. Were the threshold put above it, the one unit would put every fill-level defect below
    its score out of reach (issue 27: one leaning vial among 1,200 good units of a line, 28.6 robust deviations out,
    left 3% of the fill-level defects found). Rejecting it costs one false reject."""
    g = np.sort(np.asarray(good_fill, np.float64))[::-1]
    fence = GAUGE_FENCE_SCORE
    if len(g) >= GAUGE_FENCE_MIN_UNITS:
        q1, q3 = np.quantile(g, [0.25, 0.75])
        fence = max(fence, float(q3 + GAUGE_FENCE_IQR * (q3 - q1)))
    beyond = g[g >= fence]
    return threshold_for_budget(g[len(beyond):], 0.0), beyond


def fill_is_gauged(scores: list[Scores]) -> bool:
    """Whether these scores' fill level is the line's fill gauge's (``vision.fill_gauge.apply_reading``)."""
    return bool(scores) and all("fill_gauge" in s.extra for s in scores)


def measured_good_fill(records: list[ContainerRecord], scores: list[Scores]) -> np.ndarray:
    """The gauge's fill-level scores of the good units it measured. A unit it could not measure scores 1 and is
    rejected at any threshold (positive release), so it does not move the threshold."""
    return np.array([s.probs["fill_level"] for r, s in zip(records, scores, strict=True)
                     if r.is_good and not s.extra["fill_gauge"].get("problem")], np.float64)


def calibrate(records: list[ContainerRecord], scores: list[Scores], frr: float = 0.01,
              fill_good_scores: np.ndarray | None = None, format_names: dict[int, str] | None = None) -> dict:
    """Thresholds per class plus what they achieve on these (validation) records.

    ``expected_false_reject_rate`` is what the thresholds promise on new good units, the sum over the learned
    classes of (rejected + 1) / (n_good + 1); where the validation split has too few good units to promise
    the budget, ``warning`` says how many it needs; ``shares`` is each learned class's part of the budget.
    Where the fill gauge decides the fill level (its readings in these scores, or ``fill_good_scores``: its
    scores of more good units than these, the line's good training units), the fill threshold sits just above
    the highest measured good unit's within the fence (``gauge_edge``: 6 robust deviations or more is
    mis-measured) and takes what that costs, (u + b + 1) / (n + 1) of the budget with u of the n good units
    unmeasured and b beyond the fence (both rejected), at most an equal share; the other learned classes share the
    rest. Units beyond the fence are counted in ``fill_gauge_beyond_fence`` and named in ``warning``.

    Where the units hold several container formats (``training.by_format``; ``format_names`` names the fill
    gauge's groups), ``by_format`` gives each format's false rejects at the thresholds, and ``warning`` names a
    format that spends far more than the budget: the thresholds hold it over the formats together."""
    spec_fill = fill_is_spec_decided(records, scores)
    cs = [class_scores(s, r.fill_spec_mm) for r, s in zip(records, scores, strict=True)]
    good = [c for c, r in zip(cs, records, strict=True) if r.is_good]
    learned = [c for c in CLASSES if not (c == "fill_level" and spec_fill)]
    thresholds = {"fill_level": SPEC_EDGE} if spec_fill else {}
    shares = {c: frr / len(learned) for c in learned}
    gauged = "fill_level" in learned and (fill_good_scores is not None or fill_is_gauged(scores))
    if gauged:
        fill_good = (np.asarray(fill_good_scores, np.float64) if fill_good_scores is not None
                     else measured_good_fill(records, scores))
        unmeasured = 0 if fill_good_scores is not None else sum(1 for r in records if r.is_good) - len(fill_good)
        # Just above the highest measured good unit within the fence, whatever share that costs.
        thresholds["fill_level"], beyond = gauge_edge(fill_good)
        if len(learned) > 1:
            # What the edge costs: the good units it cannot measure or rejects beyond the fence, and one more for
            # the next unit.
            cost = (unmeasured + len(beyond) + 1) / (len(fill_good) + unmeasured + 1)
            shares["fill_level"] = min(shares["fill_level"], cost)
            rest = (frr - shares["fill_level"]) / (len(learned) - 1)
            shares.update({c: rest for c in learned if c != "fill_level"})
    expected = 0.0
    for c in learned:
        g = np.array([x[c] for x in good])
        if c not in thresholds:
            thresholds[c] = threshold_for_budget(g, shares[c])
        expected += (int((g >= thresholds[c]).sum()) + 1) / (len(good) + 1)
    rejected_good = sum(1 for g in good if rejected_classes(g, thresholds))
    out = {
        "thresholds": thresholds,
        "frr_budget": frr,
        "shares": shares,
        "n_good": len(good),
        "val_false_reject_rate": rejected_good / len(good) if good else None,
        "expected_false_reject_rate": expected if learned and good else None,
        "fill_level_by_spec": spec_fill,
    }
    warnings = []
    # The classes whose threshold these good units set (not a fill gauge set on other units), at their share.
    own = [shares[c] for c in learned if not (c == "fill_level" and fill_good_scores is not None)]
    if own and rejects_allowed(len(good), min(own)) < 0:
        need = math.ceil(1 / min(own) - 1 - 1e-9)  # the fewest for which rejects_allowed is 0
        warnings.append(f"{len(good)} good validation units cannot promise a {frr:.2%} false-reject budget "
                        f"over {len(learned)} learned class(es); that takes at least {need}: the thresholds "
                        f"sit above every good unit's score")
    if gauged:
        out["fill_gauge_beyond_fence"] = len(beyond)
        if len(beyond):
            warnings.append(f"the fill gauge scores {len(beyond)} of the {len(fill_good)} good units it measured far "
                            f"beyond the others ({', '.join(f'{b:.3f}' for b in beyond[:5])}; the others end below "
                            f"{thresholds['fill_level']:.4f}): containers mis-measured (leaning, cut by the image's "
                            f"edge, the meniscus hidden?); the fill threshold stays at the others' edge and rejects "
                            f"such units: look at them")
    table = by_format(records, scores, {"at_thresholds": thresholds}, format_names)
    if table is not None:
        out["by_format"] = table
        if (uneven := uneven_warning(table, "at_thresholds", frr)) is not None:
            warnings.append(uneven)
    if warnings:
        out["warning"] = "; ".join(warnings)
    return out


OPERATING_BUDGETS = (0.01, 0.02, 0.05)  # the false-reject rates at which ``evaluate`` reports what is found


def recall_at_false_rejects(labels: np.ndarray, scores: np.ndarray, frr: float,
                            fixed: dict[int, float] | None = None) -> dict:
    """One point of the operating curve of these units: per class, the share of its units rejected (for any
    class) when the thresholds are set on these units' own good ones, each class's at the same quantile of the
    good units' scores, the lowest quantile whose union keeps false rejects <= ``frr``. What the scores separate,
    not what release thresholds promise (``calibrate`` sets those on other units).

    ``fixed``: columns whose threshold is given (a fill level decided by the spec, or by the line's gauge at
    its good units' edge); the other classes share what it leaves. ``labels`` (N, C) 0/1 and ``scores``
    (N, C), columns in ``CLASSES`` order. Returns ``frr`` (reached), ``thresholds`` and one recall per class
    (None for a class without units)."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    good = labels.sum(1) == 0
    g = scores[good]
    fixed = fixed or {}

    def at(q: float) -> tuple[np.ndarray, float]:
        th = np.quantile(g, q, axis=0, method="higher") + 1e-7 if len(g) else np.full(scores.shape[1], 0.5)
        for i, t in fixed.items():
            th[i] = t
        rej = (scores >= th).any(1)
        return th, float(rej[good].mean()) if good.any() else 0.0

    # False rejects fall as the quantile rises (at 1 nothing good is rejected but what ``fixed`` rejects): the
    # lowest quantile within the budget, by bisection from 1 - frr (each class alone could spend it all there).
    lo, hi = 1.0 - frr, 1.0
    best = at(lo)
    if best[1] > frr:
        best = at(hi)
        for _ in range(40):
            q = (lo + hi) / 2
            th, f = at(q)
            if f <= frr:
                hi, best = q, (th, f)
            else:
                lo = q
    th, f = best
    rej = (scores >= th).any(1)
    recall = {c: (round(float(rej[labels[:, i] > 0].mean()), 4) if (labels[:, i] > 0).any() else None)
              for i, c in enumerate(CLASSES[:scores.shape[1]])}
    return {"frr": round(f, 4), "thresholds": [float(t) for t in th], "recall": recall}


def operating_points(records: list[ContainerRecord], scores: list[Scores],
                     budgets: tuple[float, ...] = OPERATING_BUDGETS) -> list[dict]:
    """``recall_at_false_rejects`` of these units at each budget, with the fill level's threshold where it is
    not learnt: the spec edge, or the line's gauge just above the highest good unit it measured within the fence
    of ``gauge_edge`` (as ``calibrate`` sets them). Empty without good units or without defective units.
    ``reached`` is False where the good units rejected at any threshold of the learnt classes already exceed the
    budget (the recall is then the one at those highest thresholds)."""
    if not any(r.is_good for r in records) or all(r.is_good for r in records):
        return []
    cs = [class_scores(s, r.fill_spec_mm) for r, s in zip(records, scores, strict=True)]
    labels = np.array([[c in r.classes for c in CLASSES] for r in records], np.float64)
    x = np.array([[c[k] for k in CLASSES] for c in cs], np.float64)
    fill, fixed, rule = CLASSES.index("fill_level"), {}, "shared quantile"
    if fill_is_spec_decided(records, scores):
        fixed[fill], rule = SPEC_EDGE, "spec edge"
    elif fill_is_gauged(scores):
        fixed[fill], rule = gauge_edge(measured_good_fill(records, scores))[0], "gauge edge"
    out = []
    for b in budgets:
        p = recall_at_false_rejects(labels, x, b, fixed)
        # Not reached where the fixed fill threshold (or units scored 1, such as those the gauge could not
        # measure) rejects more good units than the budget at any threshold of the learnt classes.
        out.append({"budget": b, "false_reject_rate": p["frr"], "reached": p["frr"] <= b, "recall": p["recall"],
                    "thresholds": dict(zip(CLASSES, p["thresholds"], strict=True)), "fill_level_threshold": rule})
    return out


def threshold_for_recall(positive_scores: np.ndarray, recall: float) -> float | None:
    """Highest threshold that still detects at least ``recall`` of these defective units (a parity margin
    below the deciding unit's score, so ONNX Runtime decides that unit the same way); None without units."""
    s = np.sort(np.asarray(positive_scores, np.float64))[::-1]
    if len(s) == 0:
        return None
    k = max(1, math.ceil(recall * len(s) - 1e-9))
    return float(max(s[k - 1] - PARITY_MARGIN, 1e-6))


def thresholds_to_match(records: list[ContainerRecord], scores: list[Scores], reference: dict,
                        thresholds: dict[str, float],
                        binned_classes: tuple[str, ...] = ("particle", "crack")) -> dict[str, float]:
    """``thresholds`` with each learned class moved to the highest threshold at which these units are detected
    at least as ``reference`` (an ``evaluate`` report on the same records) says another model detects them:
    the class's recall, and, for the classes in ``binned_classes``, the PoD of every particle-size bin and
    the recall of every crack-length bin, counted per unit as the report counts them. A point of this model's
    ROC curve at the other's detection, to compare false rejects at equal or better PoD. A higher threshold
    detects less in every bin at once, so the lowest of the thresholds that meet each bin meets them all.
    Fill level stays at the spec edge where the spec decides it, a class without units keeps its threshold,
    and a class the reference detects none of gets one above every score."""
    cs = [class_scores(s, r.fill_spec_mm) for r, s in zip(records, scores, strict=True)]
    out = dict(thresholds)
    for c in CLASSES:
        if c == "fill_level" and thresholds.get(c) == SPEC_EDGE:
            continue  # decided by the spec, not by a learned threshold
        units = [x[c] for x, r in zip(cs, records, strict=True) if c in r.classes]
        if not units:
            continue
        groups = [(units, reference["classes"][c]["recall"])]
        binning = _BINNING.get(c) if c in binned_classes else None
        if binning:
            attr, key, unit, rate, edges = binning
            values = [(float(getattr(d, attr)), x[c]) for x, r in zip(cs, records, strict=True)
                      for d in r.defects if d.cls == c and getattr(d, attr) is not None]
            # Edges as the report writes them (100) and as binned gives them (100.0) are equal dict keys.
            want = {(b[f"min_{unit}"], b[f"max_{unit}"]): b[rate] for b in reference[key]}
            for lo, hi, bin_scores in binned(values, edges):
                groups.append((bin_scores, want.get((lo, hi))))
        found = [threshold_for_recall(np.array(v), t) for v, t in groups if v and t]
        out[c] = min(found) if found else 1.0 + PARITY_MARGIN
    return out


# What the report bins each class's detection by: the defect's attribute, the report's key, the unit of its
# bin edges, the rate each bin holds, and the edges.
_BINNING = {"particle": ("size_um", "pod_by_particle_size", "um", "pod", DEFAULT_POD_BINS_UM),
            "crack": ("length_mm", "crack_recall_by_length", "mm", "recall", DEFAULT_CRACK_BINS_MM)}


def detection_score(s: Scores, r: ContainerRecord, c: str, localized: bool = True) -> float:
    """The score that decides whether ``r``'s defect of class ``c`` is detected: the class score, or with
    ``localized`` (particle, crack; where the record has defect boxes and the model maps) the class map's
    highest evidence at one of the class's defects, as the gate counts a detection (``training/gate.py``)."""
    score = class_scores(s, r.fill_spec_mm)[c]
    return max((score_at(s, c, score, d.bbox, localized) for d in r.defects if d.cls == c), default=score)


def hold_detection(records: list[ContainerRecord], champion: list[Scores], champion_thresholds: dict[str, float],
                   challenger: list[Scores], challenger_thresholds: dict[str, float],
                   localized: bool = True) -> tuple[dict, dict]:
    """Challenger thresholds that detect, on these records, at least what the champion detects.

    Per learned class: the lower of the challenger's false-reject-budget threshold and the highest threshold
    at which it still finds as many of the class's defective units as the champion. Detection (PoD) is what
    qualification holds a model to; a model that separates defects better keeps its budget threshold (and
    detects more), one that separates them worse pays in false rejects, not in PoD. A detection is counted
    as the gate counts it (``localized``: with the map's evidence at the defect): counted per unit, a
    champion's false alarms elsewhere in defective units would be credited as detections, and the challenger
    would have to match them with a lower threshold, paid for in false rejects of good units.
    """
    out = dict(challenger_thresholds)
    info: dict = {}
    for c in CLASSES:
        if c == "fill_level" and challenger_thresholds.get(c) == SPEC_EDGE:
            continue  # decided by the spec, not by a learned threshold
        pos = [i for i, r in enumerate(records) if c in r.classes]
        unplaced = 0
        if localized and c in LOCALIZED:
            # A unit with no box for its defect (a reviewed reject: the reviewer names the class, not the
            # place) cannot tell detection from a false alarm elsewhere in it. The champion's reviewed rejects
            # are all "detected" by it by construction, nuisance or not: held to them, the challenger's
            # threshold falls to whatever its lowest-scoring one scores (measured: particle 0.52 -> 0.04 on
            # a syringe line with silicone oil, and the oil's false rejects came back).
            placed = [i for i in pos if any(d.cls == c and d.bbox for d in records[i].defects)]
            unplaced, pos = len(pos) - len(placed), placed
        if not pos:
            continue
        sa = np.array([detection_score(champion[i], records[i], c, localized) for i in pos])
        sb = np.array([detection_score(challenger[i], records[i], c, localized) for i in pos])
        target = float(np.mean(sa >= champion_thresholds.get(c, 0.0)))
        t = threshold_for_recall(sb, target) if target > 0 else None
        if t is not None and t < out[c]:
            out[c] = t
        info[c] = {"n": len(pos), "n_unplaced": unplaced, "champion_recall": target,
                   "budget_threshold": challenger_thresholds[c],
                   "threshold": out[c], "challenger_recall": float(np.mean(sb >= out[c]))}
    return out, info

