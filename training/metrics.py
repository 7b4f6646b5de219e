"""Evaluation metrics and the evaluation report of a model on a labelled set of containers.

Everything here is numpy, with scipy's ranks for the AUROC. Decisions come from ``vialinspect.vision.scores``
(``class_scores`` then ``rejected_classes``), the same rule the station uses, so an evaluation measures what the
line would do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from vialinspect.datasets.records import ContainerRecord
from vialinspect.vision.scores import CLASSES, Scores, class_scores, rejected_classes

GOOD = "good"
CONFUSION_LABELS: tuple[str, ...] = (GOOD, *CLASSES)
MAX_WORST = 12
DEFAULT_POD_BINS_UM: tuple[float, ...] = (50, 100, 150, 200, 300, 500, 1000, 100000)
DEFAULT_CRACK_BINS_MM: tuple[float, ...] = (0, 1, 2, 4, 100)


# ---------------------------------------------------------------------------------------------------------
# Generic metrics


def _as_arrays(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if np.isnan(s).any():
        # A NaN has no rank; silently dropping it would hide a broken model output.
        raise ValueError("scores contain NaN")
    return y, s


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic with average ranks for ties.

    Equals P(score of a random positive > score of a random negative) + 0.5 P(tie). None when only one
    class is present, because the area is then undefined (not 0.5).
    """
    y, s = _as_arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata  # here, not with the module: scipy.stats takes a second or more to import

    ranks = rankdata(s)  # 1-based, tied scores sharing the mean of the ranks they span
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for the rule ``score >= threshold``, one per distinct score, highest threshold first.

    The first point is (0, 0) at threshold +inf, the last (1, 1) at the lowest score. Tied scores form one
    point, so the trapezoid area under (fpr, tpr) equals ``auroc``. A rate whose class is absent is NaN.
    """
    y, s = _as_arrays(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    # Last index of each run of equal scores: the point where all units at that threshold are included.
    last = np.flatnonzero(np.concatenate((ss[1:] != ss[:-1], [True]))) if s.size else np.zeros(0, int)
    tp = np.cumsum(ys)[last].astype(np.float64)
    fp = np.cumsum(~ys)[last].astype(np.float64)
    n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate(([0.0], tp / n_pos)) if n_pos else np.full(last.size + 1, np.nan)
        fpr = np.concatenate(([0.0], fp / n_neg)) if n_neg else np.full(last.size + 1, np.nan)
    thresholds = np.concatenate(([np.inf], ss[last]))
    return fpr, tpr, thresholds


def recall(labels: np.ndarray, predicted: np.ndarray) -> float | None:
    """TP / (TP + FN); None when there is no positive."""
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(predicted).astype(bool).ravel()
    n = int(y.sum())
    return None if n == 0 else float((y & p).sum() / n)


def precision(labels: np.ndarray, predicted: np.ndarray) -> float | None:
    """TP / (TP + FP); None when nothing was predicted positive."""
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(predicted).astype(bool).ravel()
    n = int(p.sum())
    return None if n == 0 else float((y & p).sum() / n)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n.

    Used for PoD because it stays inside [0, 1] and is sensible at k = n (the usual case for large
    particles), where the normal approximation collapses to a zero-width interval.
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, n={n}]")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------------------------
# The evaluation report


def _round(x: float | None, nd: int = 4) -> float | None:
    if x is None:
        return None
    return round(float(x), nd)


def _margin(cls: str, cscores: dict[str, float], thresholds: dict[str, float]) -> float:
    # Same default as rejected_classes: a missing threshold is 0, which always rejects.
    thr = float(thresholds.get(cls, 0.0))
    return cscores[cls] / thr if thr > 0 else math.inf


def true_primary(classes: Sequence[str]) -> str:
    """The record's first class in CLASSES order, or good."""
    return next((c for c in CLASSES if c in classes), GOOD)


def worst_item_class(item: dict[str, Any]) -> str | None:
    """The class a ``report["worst"]`` entry is about: the top rejected class of a false reject, the first
    missed true class (CLASSES order) of a miss. Shared with the report so both pick the same map."""
    if item["kind"] == "false_reject":
        return item["predicted"][0] if item["predicted"] else None
    missed = [c for c in CLASSES if c in item["classes"] and c not in item["predicted"]]
    return missed[0] if missed else None


_Bin = tuple[float | None, float | None, list[Any]]  # low edge (None: underflow), high edge (None: overflow), items


def binned(values: list[tuple[float, Any]], edges: Sequence[float]) -> list[_Bin]:
    """Group (value, item) pairs, such as (size, detected) or (size, score), into [edge_i, edge_i+1) bins, the
    last bin closed.

    Values outside the edges get an extra under- or overflow bin (only when there are any), so every
    defect is counted somewhere without being reported in a size range it does not belong to.
    """
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"bin edges must be at least two increasing numbers, got {edges}")
    bins: list[_Bin] = [(a, b, []) for a, b in zip(edges, edges[1:], strict=False)]
    under: list[bool] = []
    over: list[bool] = []
    for v, hit in values:
        if v < edges[0]:
            under.append(hit)
        elif v > edges[-1]:
            over.append(hit)
        else:
            i = min(int(np.searchsorted(edges, v, side="right")) - 1, len(bins) - 1)
            bins[i][2].append(hit)
    if under:
        bins.insert(0, (None, edges[0], under))
    if over:
        bins.append((edges[-1], None, over))
    return bins


def _num(x: float | None) -> float | int | None:
    """Bin edges as ints where they are whole numbers, for readable JSON."""
    if x is None:
        return None
    return int(x) if float(x).is_integer() else float(x)


def evaluate(records: list[ContainerRecord], scores: list[Scores], thresholds: dict[str, float], model_id: str,
             pod_bins_um: Sequence[float] = DEFAULT_POD_BINS_UM,
             crack_bins_mm: Sequence[float] = DEFAULT_CRACK_BINS_MM, kind_min_um: float = 150.0) -> dict[str, Any]:
    """Evaluate per-container model scores against their records.

    Returns a JSON-serialisable dict; a metric the labels cannot support (no positives, image-level labels
    without particle sizes, crack lengths or fill heights) is None or an empty list, never an error.
    ``worst[i]["predicted"]`` lists the rejected classes by decreasing margin score/threshold, so its first
    entry is the predicted primary class of the confusion matrix; ``score`` is the class score of the
    class ``worst_item_class`` names.
    """
    if len(records) != len(scores):
        raise ValueError(f"{len(records)} records but {len(scores)} scores")
    thresholds = {str(k): float(v) for k, v in thresholds.items()}
    all_scores, all_rejected = _decisions(records, scores, thresholds)
    frr = _false_reject_rate(records, all_rejected)
    classes_out = _per_class(records, all_scores, all_rejected)
    pod_bins = _pod_by_size(records, all_rejected, pod_bins_um)
    pod_kinds = _pod_by_kind(records, all_rejected, kind_min_um)
    crack_bins = _crack_recall_by_length(records, all_rejected, crack_bins_mm)
    fill_mae = _fill_height_mae(records, scores)
    nuisance = _nuisance_false_reject_rate(records, all_rejected)
    predicted_sorted, matrix = _confusion(records, all_scores, all_rejected, thresholds)
    worst = _worst(records, all_scores, predicted_sorted, thresholds)

    return {
        "n_containers": len(records),
        "false_reject_rate": _round(frr),
        "classes": classes_out,
        "pod_by_particle_size": pod_bins,
        "pod_by_particle_kind": pod_kinds,
        "crack_recall_by_length": crack_bins,
        "fill_height_mae_mm": fill_mae,
        "nuisance_false_reject_rate": nuisance,
        "thresholds": thresholds,
        "model": str(model_id),
        "confusion": {"labels": list(CONFUSION_LABELS), "matrix": matrix},
        "worst": worst,
    }


def _decisions(records: list[ContainerRecord], scores: list[Scores],
               thresholds: dict[str, float]) -> tuple[list[dict[str, float]], list[list[str]]]:
    """Each container's class scores and rejected classes, by the station's rule."""
    all_scores: list[dict[str, float]] = []
    all_rejected: list[list[str]] = []
    for rec, sc in zip(records, scores, strict=True):
        cs = class_scores(sc, rec.fill_spec_mm)
        all_scores.append(cs)
        all_rejected.append(rejected_classes(cs, thresholds))
    return all_scores, all_rejected


def _false_reject_rate(records: list[ContainerRecord], all_rejected: list[list[str]]) -> float | None:
    """The share of good containers rejected for any class; None without good containers."""
    good = np.array([rec.is_good for rec in records], dtype=bool)
    any_reject = np.array([bool(r) for r in all_rejected], dtype=bool)
    n_good = int(good.sum())
    return float((good & any_reject).sum() / n_good) if n_good else None


def _per_class(records: list[ContainerRecord], all_scores: list[dict[str, float]],
               all_rejected: list[list[str]]) -> dict[str, dict[str, Any]]:
    """Recall, precision and AUROC of each class, with its number of positives."""
    classes_out: dict[str, dict[str, Any]] = {}
    for c in CLASSES:
        y = np.array([c in rec.classes for rec in records], dtype=bool)
        pred = np.array([c in r for r in all_rejected], dtype=bool)
        s = np.array([cs[c] for cs in all_scores], dtype=np.float64)
        classes_out[c] = {
            "recall": _round(recall(y, pred)),
            "precision": _round(precision(y, pred)),
            "auroc": _round(auroc(y, s)),
            "n_positive": int(y.sum()),
        }
    return classes_out


def _pod_by_size(records: list[ContainerRecord], all_rejected: list[list[str]],
                 pod_bins_um: Sequence[float]) -> list[dict[str, Any]]:
    """Probability of detection of particles by size bin, with its 95% Wilson interval."""
    # PoD counts every particle with a known size, detected when its container is rejected for particle.
    particles = [(float(d.size_um), "particle" in rej)
                 for rec, rej in zip(records, all_rejected, strict=True)
                 for d in rec.defects if d.cls == "particle" and d.size_um is not None]
    pod_bins: list[dict[str, Any]] = []
    if particles:
        for lo, hi, hits in binned(particles, pod_bins_um):
            k, m = sum(hits), len(hits)
            ci = wilson_interval(k, m) if m else None
            pod_bins.append({"min_um": _num(lo), "max_um": _num(hi), "n": m,
                             "pod": _round(k / m) if m else None,
                             "ci95": [_round(ci[0]), _round(ci[1])] if ci else None})
    return pod_bins


def _pod_by_kind(records: list[ContainerRecord], all_rejected: list[list[str]],
                 kind_min_um: float) -> list[dict[str, Any]]:
    """Probability of detection of particles by material, from ``kind_min_um`` up."""
    # The same by material: a size alone hides that a 150 µm fibre (under a pixel thick) and a 150 µm metal
    # sphere are different tasks. Particles of at least ``kind_min_um`` only, so kinds compare where all
    # are meant to be found.
    by_kind: dict[str, list[bool]] = {}
    for rec, rej in zip(records, all_rejected, strict=True):
        for d in rec.defects:
            if d.cls == "particle" and d.kind and d.size_um is not None and d.size_um >= kind_min_um:
                by_kind.setdefault(d.kind, []).append("particle" in rej)
    pod_kinds = []
    for kind, hits in sorted(by_kind.items()):
        ci = wilson_interval(sum(hits), len(hits))
        pod_kinds.append({"kind": kind, "min_um": _num(kind_min_um), "n": len(hits),
                          "pod": _round(sum(hits) / len(hits)), "ci95": [_round(ci[0]), _round(ci[1])]})
    return pod_kinds


def _crack_recall_by_length(records: list[ContainerRecord], all_rejected: list[list[str]],
                            crack_bins_mm: Sequence[float]) -> list[dict[str, Any]]:
    """Recall of cracks with a known length, by length bin."""
    cracks = [(float(d.length_mm), "crack" in rej)
              for rec, rej in zip(records, all_rejected, strict=True)
              for d in rec.defects if d.cls == "crack" and d.length_mm is not None]
    crack_bins: list[dict[str, Any]] = []
    if cracks:
        for lo, hi, hits in binned(cracks, crack_bins_mm):
            crack_bins.append({"min_mm": _num(lo), "max_mm": _num(hi), "n": len(hits),
                               "recall": _round(sum(hits) / len(hits)) if hits else None})
    return crack_bins


def _fill_height_mae(records: list[ContainerRecord], scores: list[Scores]) -> float | None:
    """Mean absolute error of the measured fill height where both heights are known."""
    # A non-finite measured height is a failed measurement, not an error of some size: left out of the MAE.
    errors = [abs(sc.fill_height_mm - rec.fill_height_mm) for rec, sc in zip(records, scores, strict=True)
              if sc.fill_height_mm is not None and rec.fill_height_mm is not None
              and math.isfinite(sc.fill_height_mm) and math.isfinite(rec.fill_height_mm)]
    return _round(float(np.mean(errors))) if errors else None


def _nuisance_false_reject_rate(records: list[ContainerRecord],
                                all_rejected: list[list[str]]) -> dict[str, dict[str, Any]]:
    """The false-reject rate of good containers by each nuisance they carry."""
    tag_counts: dict[str, list[int]] = {}
    for rec, rej in zip(records, all_rejected, strict=True):
        if not rec.is_good:
            continue
        for tag in set(rec.nuisances) | {o.tag for o in rec.nuisance_objects}:
            cnt = tag_counts.setdefault(tag, [0, 0])
            cnt[0] += 1
            cnt[1] += bool(rej)
    return {tag: {"n": cnt[0], "frr": _round(cnt[1] / cnt[0])} for tag, cnt in sorted(tag_counts.items())}


def _confusion(records: list[ContainerRecord], all_scores: list[dict[str, float]], all_rejected: list[list[str]],
               thresholds: dict[str, float]) -> tuple[list[list[str]], list[list[int]]]:
    """Each container's rejected classes by decreasing margin, and the confusion matrix of true against
    predicted primary class (rows and columns in CONFUSION_LABELS order)."""
    matrix = [[0] * len(CONFUSION_LABELS) for _ in CONFUSION_LABELS]
    predicted_sorted: list[list[str]] = []
    for rec, cs, rej in zip(records, all_scores, all_rejected, strict=True):
        # Stable sort: equal margins keep CLASSES order, so the primary prediction is deterministic.
        ranked = sorted(rej, key=lambda c, cs=cs: -_margin(c, cs, thresholds))
        predicted_sorted.append(ranked)
        pred_primary = ranked[0] if ranked else GOOD
        matrix[CONFUSION_LABELS.index(true_primary(rec.classes))][CONFUSION_LABELS.index(pred_primary)] += 1
    return predicted_sorted, matrix


def _worst(records: list[ContainerRecord], all_scores: list[dict[str, float]], predicted: list[list[str]],
           thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """The most confident false rejects and the least confident misses, half the slots each by default."""
    false_rejects: list[tuple[float, str, dict[str, Any]]] = []
    misses: list[tuple[float, str, dict[str, Any]]] = []
    for rec, cs, pred in zip(records, all_scores, predicted, strict=True):
        classes = [c for c in CLASSES if c in rec.classes]
        if rec.is_good and pred:
            item = {"id": rec.id, "kind": "false_reject", "classes": classes, "predicted": list(pred)}
            key = -_margin(pred[0], cs, thresholds)
        elif not rec.is_good:
            item = {"id": rec.id, "kind": "miss", "classes": classes, "predicted": list(pred)}
            if worst_item_class(item) is None:
                continue
            key = _margin(worst_item_class(item), cs, thresholds)
        else:
            continue
        cls = worst_item_class(item)
        item["score"] = _round(cs[cls]) if cls else None
        (false_rejects if item["kind"] == "false_reject" else misses).append((key, rec.id, item))
    false_rejects.sort(key=lambda t: (t[0], t[1]))
    misses.sort(key=lambda t: (t[0], t[1]))
    # Share the slots; a kind with fewer cases leaves its slots to the other.
    n_fr = min(len(false_rejects), max(MAX_WORST // 2, MAX_WORST - len(misses)))
    n_miss = min(len(misses), MAX_WORST - n_fr)
    return [t[2] for t in false_rejects[:n_fr]] + [t[2] for t in misses[:n_miss]]
