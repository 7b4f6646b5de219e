"""What the model says about one container, and the one rule that turns it into rejected classes.

``Scores`` crosses every border (model runtime -> evaluation, station, review), so it is plain data.
"""

from __future__ import annotations

import math
import numbers
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
    """Classes whose score reaches its threshold.

    Positive release: a class is rejected as well where its score is missing, not a number, not finite (NaN,
    inf) or outside [0, 1], and where its threshold is missing, not a number or not finite; a comparison with
    NaN is False, and would otherwise accept. (A finite threshold above 1 never rejects: evaluation uses one
    to mean "detect none"; packages and recipes refuse it, see ``threshold_problem``.)
    """
    out = []
    for c in CLASSES:
        s, t = _finite(scores.get(c)), _finite(thresholds.get(c))
        if s is None or t is None or not 0.0 <= s <= 1.0 or s >= t:
            out.append(c)
    return out


def _finite(v: object) -> float | None:
    """``v`` as a finite float; None for a missing value, a non-number (text, bool, None), NaN or inf."""
    if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def threshold_problem(value: object) -> str | None:
    """Why ``value`` cannot be a class's decision threshold; None when it can.

    A threshold must be a finite number within the open interval (0, 1): at 0 or below every unit is rejected
    for the class, and at 1 or above a probability below 1 never reaches it, so (nearly) every unit would be
    accepted; NaN compares False and would accept every unit.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return f"must be a number within (0, 1), got {value!r}"
    f = _finite(value)
    if f is None or not 0.0 < f < 1.0:
        return f"must be a finite number within (0, 1), got {value!r}"
    return None


def thresholds_problem(thresholds: object) -> tuple[str | None, str] | None:
    """(class, problem) for the first reason ``thresholds`` cannot decide units, None when it can: it must be a
    table with a valid threshold (``threshold_problem``) for every class of ``CLASSES`` and no other key.
    The class is None for a problem with the table itself."""
    if not isinstance(thresholds, dict):
        return None, f"must be a table of class: threshold, got {type(thresholds).__name__}"
    for c in CLASSES:
        if c not in thresholds:
            return c, "missing: every class needs a threshold"
        problem = threshold_problem(thresholds[c])
        if problem:
            return c, problem
    unknown = [k for k in thresholds if k not in CLASSES]
    if unknown:
        return str(unknown[0]), f"unknown class; known: {', '.join(CLASSES)}"
    return None


def output_problem(scores: object) -> str | None:
    """Why a model's output for one unit cannot be decided on; None when it can.

    Every class probability must be a finite number in [0, 1] and the fill height, where the model reports
    one, a finite number. The station rejects such a unit as ``not_inspected:invalid_output``.
    """
    probs = getattr(scores, "probs", None)
    if not isinstance(probs, dict):
        return f"class probabilities are not a table ({type(probs).__name__})"
    for c in CLASSES:
        v = _finite(probs.get(c))
        if v is None or not 0.0 <= v <= 1.0:
            return f"{c} probability {probs.get(c)!r} is not a finite number in [0, 1]"
    fill = getattr(scores, "fill_height_mm", None)
    if fill is not None and _finite(fill) is None:
        return f"fill height {fill!r} is not a finite number"
    return None


def finite_or_none(v: object) -> float | None:
    """``v`` as a float where it is a finite number; None otherwise (missing, text, bool, NaN, inf)."""
    return _finite(v)


def finite_scores(scores: dict) -> dict[str, float]:
    """The entries of ``scores`` that are finite numbers, e.g. to record what is usable of an invalid output."""
    return {str(k): f for k, v in scores.items() if (f := _finite(v)) is not None} if isinstance(scores, dict) else {}


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
