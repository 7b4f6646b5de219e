"""Per-class thresholds chosen on the validation split to meet a false-reject budget.

The budget (default 1% of good units rejected) is shared equally by the classes whose threshold is
learned. Fill level is decided by the measured height against the product's spec wherever both exist:
the spec, not a statistic, defines that defect, so its threshold stays at the spec edge (0.5).
"""

from __future__ import annotations

import math

import numpy as np

from datasets.records import ContainerRecord
from vision.scores import CLASSES, Scores, class_scores, rejected_classes, score_at

SPEC_EDGE = 0.5
PARITY_MARGIN = 1e-4  # equals the export's parity tolerance on probabilities


def fill_is_spec_decided(records: list[ContainerRecord], scores: list[Scores]) -> bool:
    return bool(records) and all(r.fill_spec is not None and s.fill_height_mm is not None
                                 for r, s in zip(records, scores, strict=True))


def threshold_for_budget(good_scores: np.ndarray, budget: float) -> float:
    """Smallest threshold that rejects at most ``budget`` of these good units (scores >= t reject)."""
    g = np.sort(np.asarray(good_scores, np.float64))[::-1]
    if len(g) == 0:
        return SPEC_EDGE
    k = int(np.floor(budget * len(g)))  # good units we may reject
    t = g[k] if k < len(g) else g[-1]
    # Just above that unit's score by the export parity tolerance: a threshold one float step above a
    # validation score would let ONNX Runtime's last-digit differences flip that unit's decision.
    return float(min(t + PARITY_MARGIN, 0.9999))


def calibrate(records: list[ContainerRecord], scores: list[Scores], frr: float = 0.01) -> dict:
    """Thresholds per class plus what they achieve on these (validation) records."""
    spec_fill = fill_is_spec_decided(records, scores)
    cs = [class_scores(s, _spec(r)) for r, s in zip(records, scores, strict=True)]
    good = [c for c, r in zip(cs, records, strict=True) if r.is_good]
    learned = [c for c in CLASSES if not (c == "fill_level" and spec_fill)]
    thresholds = {"fill_level": SPEC_EDGE} if spec_fill else {}
    for c in learned:
        thresholds[c] = threshold_for_budget(np.array([g[c] for g in good]), frr / len(learned))
    rejected_good = sum(1 for g in good if rejected_classes(g, thresholds))
    return {
        "thresholds": thresholds,
        "frr_budget": frr,
        "n_good": len(good),
        "val_false_reject_rate": rejected_good / len(good) if good else None,
        "fill_level_by_spec": spec_fill,
    }


def _spec(r: ContainerRecord):
    return (r.fill_spec.target_mm, r.fill_spec.tolerance_mm) if r.fill_spec else None


def threshold_for_recall(positive_scores: np.ndarray, recall: float) -> float | None:
    """Highest threshold that still detects at least ``recall`` of these defective units (a parity margin
    below the deciding unit's score, so ONNX Runtime decides that unit the same way); None without units."""
    s = np.sort(np.asarray(positive_scores, np.float64))[::-1]
    if len(s) == 0:
        return None
    k = max(1, math.ceil(recall * len(s) - 1e-9))
    return float(max(s[k - 1] - PARITY_MARGIN, 1e-6))


def detection_score(s: Scores, r: ContainerRecord, c: str, localized: bool = True) -> float:
    """The score that decides whether ``r``'s defect of class ``c`` is detected: the class score, or with
    ``localized`` (particle, crack; where the record has defect boxes and the model maps) the class map's
    highest evidence at one of the class's defects, as the gate counts a detection (``training/gate.py``)."""
    score = class_scores(s, _spec(r))[c]
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
        if not pos:
            continue
        sa = np.array([detection_score(champion[i], records[i], c, localized) for i in pos])
        sb = np.array([detection_score(challenger[i], records[i], c, localized) for i in pos])
        target = float(np.mean(sa >= champion_thresholds.get(c, 0.0)))
        t = threshold_for_recall(sb, target) if target > 0 else None
        if t is not None and t < out[c]:
            out[c] = t
        info[c] = {"n": len(pos), "champion_recall": target, "budget_threshold": challenger_thresholds[c],
                   "threshold": out[c], "challenger_recall": float(np.mean(sb >= out[c]))}
    return out, info

