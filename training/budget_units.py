"""Which units decide a false-reject budget's figures (``evaluate``'s "Found at a false-reject budget").

At a budget the thresholds sit just above a few good units, and every defect scoring below them is missed. So a
line's engineer should look at two lists for each class: the good units that score highest (they set the
threshold) and the defective units that the budget's thresholds miss. On the lines measured
(docs/new_line.md), bubbles and scratches on good units set the thresholds. The misses were particles settled on
the base, faint glass shards and cracks at the container's ends. Each was found by looking at these units.
"""

from __future__ import annotations

from typing import Any

from vialinspect.datasets.records import ContainerRecord
from vialinspect.vision.scores import CLASSES, Scores, class_scores

N_UNITS = 5  # listed per class and kind
QUOTED_BUDGET = 0.02  # the budget whose figures the docs quote (the target: <= 2% false rejects)


def point_at(points: list[dict], budget: float = QUOTED_BUDGET) -> dict | None:
    """The operating point of ``points`` (``calibrate.operating_points``) at ``budget``, or None."""
    return next((p for p in points if abs(p["budget"] - budget) < 1e-9), None)


def budget_units(records: list[ContainerRecord], scores: list[Scores], points: list[dict],
                 budget: float = QUOTED_BUDGET, n: int = N_UNITS) -> dict[str, Any] | None:
    """For the operating point at ``budget`` (one of ``points``, from ``calibrate.operating_points``), per class:
    its threshold, the ``n`` good units scoring highest on it (id, score), and the defective units of the class
    that point misses (rejected for no class), counted, the ``n`` scoring highest listed. None when ``points``
    has no such budget (no good or no defective units)."""
    point = point_at(points, budget)
    if point is None:
        return None
    th = point["thresholds"]
    cs = [class_scores(s, r.fill_spec_mm) for r, s in zip(records, scores, strict=True)]
    # The same rule as the point's recall: a unit is found when any class's score reaches its threshold.
    found = [any(c[k] >= th[k] for k in CLASSES) for c in cs]

    def top(pairs: list[tuple[float, str]]) -> list[dict[str, Any]]:
        return [{"id": i, "score": round(float(s), 4)} for s, i in sorted(pairs, key=lambda p: (-p[0], p[1]))[:n]]

    out: dict[str, Any] = {"budget": budget, "classes": {}}
    for k in CLASSES:
        good = [(c[k], r.id) for r, c in zip(records, cs, strict=True) if r.is_good]
        missed = [(c[k], r.id) for r, c, f in zip(records, cs, found, strict=True) if k in r.classes and not f]
        out["classes"][k] = {"threshold": round(float(th[k]), 6), "good_highest": top(good),
                             "n_missed": len(missed), "missed": top(missed)}
    return out
