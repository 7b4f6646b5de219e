"""What the model says about one container, and the one rule that turns it into rejected classes.

``Scores`` crosses every border (model runtime -> evaluation, station, review), so it is plain data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CLASSES: tuple[str, ...] = ("particle", "crack", "fill_level")
LOCALIZED: tuple[str, ...] = ("particle", "crack")  # classes whose probability is their map's peak
FILL_SCALE_MM = 0.05  # steepness of the fill-level score around the spec edge


@dataclass
class Scores:
    """Model output for one container."""

    probs: dict[str, float]  # per class, in [0, 1]; fill_level here is the image classifier's opinion
    fill_height_mm: float | None = None  # measured liquid height above the container's lowest point
    maps: np.ndarray | None = None  # (3, h, w) float32 in [0, 1], coarse localisation per class
    map_stride: int = 8  # image pixels per map cell
    extra: dict = field(default_factory=dict)


def fill_probability(height_mm: float, target_mm: float, tolerance_mm: float) -> float:
    """0.5 exactly at the spec edge |height - target| = tolerance, towards 1 outside, towards 0 inside."""
    z = (abs(height_mm - target_mm) - tolerance_mm) / FILL_SCALE_MM
    return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


def class_scores(scores: Scores, fill_spec: tuple[float, float] | None = None) -> dict[str, float]:
    """Per-class scores used for decisions.

    Where the fill height was measured and the product's spec (target, tolerance) is known, the fill-level
    score comes from the measurement against the spec, so the spec (not a learned threshold) decides;
    otherwise it is the classifier's probability.
    """
    out = {c: float(scores.probs.get(c, 0.0)) for c in CLASSES}
    if fill_spec is not None and scores.fill_height_mm is not None and math.isfinite(scores.fill_height_mm):
        out["fill_level"] = fill_probability(scores.fill_height_mm, fill_spec[0], fill_spec[1])
    return out


def rejected_classes(scores: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """Classes whose score reaches its threshold (positive release: a missing threshold rejects)."""
    return [c for c in CLASSES if scores.get(c, 1.0) >= thresholds.get(c, 0.0)]


def evidence_at(scores: Scores, cls: str, bbox: tuple[float, float, float, float] | list[float],
                margin_cells: int = 1) -> float | None:
    """The class map's highest value over the map cells that cover ``bbox`` (x0, y0, x1, y1 in image pixels),
    widened by ``margin_cells``; None without a map. For particle and crack the class probability is the map's
    peak, so ``evidence_at(...) >= threshold`` says the unit is rejected for that class *at that place*."""
    if scores.maps is None or cls not in CLASSES or np.ndim(scores.maps) != 3:
        return None
    m = np.asarray(scores.maps[CLASSES.index(cls)])
    st = max(int(scores.map_stride), 1)
    x0, y0, x1, y1 = (float(v) for v in bbox)
    r0, r1 = max(int(y0 // st) - margin_cells, 0), min(int(y1 // st) + margin_cells, m.shape[0] - 1)
    c0, c1 = max(int(x0 // st) - margin_cells, 0), min(int(x1 // st) + margin_cells, m.shape[1] - 1)
    if r0 > r1 or c0 > c1:
        return None
    return float(m[r0:r1 + 1, c0:c1 + 1].max())


def score_at(scores: Scores, cls: str, score: float, bbox, localized: bool = True) -> float:
    """``score`` (the unit's class score) as it counts for one defect at ``bbox``: with ``localized``, for a
    class whose probability is its map's peak, no more than the map's evidence at the defect; as it is for
    other classes, without a box or without a map. ``score_at(...) >= threshold``: detected at the defect."""
    if not localized or cls not in LOCALIZED or not bbox:
        return score
    e = evidence_at(scores, cls, bbox)
    return score if e is None else min(score, e)
