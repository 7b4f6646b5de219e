"""False rejects and recall split by container format.

A line that runs several formats (a syringe and a vial, two vial sizes) runs each under its own recipe, and each
recipe must hold the false-reject budget on its own units. Thresholds set over a mixed lot hold the budget on
the lot as a whole: where one format's good units score higher (silicone oil droplets in syringes, a busier
outline), that format rejects more than the budget and the others less. On the simulated line w58 (three
formats, docs/new_line.md) the thresholds of the 2% point over all ~1,200 good units rejected 4.3% of the 1 mL
syringes and under 1% of each vial format. So ``evaluate`` reports each format apart, and ``calibrate`` warns
where a format spends far more than the budget.

A unit's format is its record's (a manifest names it); an ImageFolder names none, and there the line's fill
gauge tells the formats apart by their geometry (its reference groups; ``vision.fill_gauge``).
"""

from __future__ import annotations

from typing import Any

from vialinspect.datasets.records import ContainerRecord
from vialinspect.vision.fill_gauge import FillGauge
from vialinspect.vision.scores import CLASSES, Scores, class_scores, rejected_classes

# A format spends "far more" than the budget above this multiple of it, with at least MIN_REJECTS of its good
# units rejected (one or two units over a small format's budget are its draw, not its scores).
UNEVEN_FACTOR = 1.5
MIN_REJECTS = 3


def gauge_format_names(gauge: FillGauge | None) -> dict[int, str]:
    """A readable name for each of the fill gauge's reference groups: its kind, body width and silhouette height
    (two groups of one height and kind differ by width: a narrower one is often containers cut by the image's
    edge, not a format)."""
    if gauge is None:
        return {}
    return {i: f"{g.kind}, {g.width_px:.0f} px wide, {g.height_px:.0f} px high (gauge group {i})"
            for i, g in enumerate(gauge.groups)}


def unit_formats(records: list[ContainerRecord], scores: list[Scores],
                 names: dict[int, str] | None = None) -> list[str | None]:
    """Each unit's format: its record's, else its fill gauge group's (named by ``names``), else None."""
    out: list[str | None] = []
    for r, s in zip(records, scores, strict=True):
        g = (s.extra.get("fill_gauge") or {}).get("group")
        out.append(r.format or (None if g is None else (names or {}).get(g, f"gauge group {g}")))
    return out


def _share(found: int, n: int) -> float | None:
    return round(found / n, 4) if n else None


def _at(records: list[ContainerRecord], cs: list[dict[str, float]], idx: list[int],
        thresholds: dict[str, float]) -> dict[str, Any]:
    """The good units of ``idx`` rejected, and each class's units found (rejected for any class), at
    ``thresholds``."""
    rej = {i: bool(rejected_classes(cs[i], thresholds)) for i in idx}
    good = [i for i in idx if records[i].is_good]
    k = sum(rej[i] for i in good)
    return {"false_rejects": k, "false_reject_rate": _share(k, len(good)),
            "recall": {c: _share(sum(rej[i] for i in idx if c in records[i].classes),
                                 sum(1 for i in idx if c in records[i].classes)) for c in CLASSES}}


def by_format(records: list[ContainerRecord], scores: list[Scores], thresholds: dict[str, dict[str, float]],
              names: dict[int, str] | None = None, own_budget: float | None = None) -> dict[str, Any] | None:
    """Per format: its good and defective units, and at each named set of ``thresholds`` (e.g. the model's and
    the 2% point's) its false-reject rate and each class's recall; with ``own_budget``, also ``own_point``: that
    budget's point set on the format's own units (``_own_point``). None where the units hold fewer than two
    formats."""
    fm = unit_formats(records, scores, names)
    present = sorted({f for f in fm if f is not None})
    if len(present) < 2:
        return None
    cs = [class_scores(s, r.fill_spec_mm) for r, s in zip(records, scores, strict=True)]
    rows = []
    for f in present:
        idx = [i for i, x in enumerate(fm) if x == f]
        row: dict[str, Any] = {"format": f, "good": sum(1 for i in idx if records[i].is_good),
                               "defects": {c: sum(1 for i in idx if c in records[i].classes) for c in CLASSES}}
        for name, th in thresholds.items():
            row[name] = _at(records, cs, idx, th)
        if own_budget is not None:
            row["own_point"] = _own_point([records[i] for i in idx], [scores[i] for i in idx], own_budget)
        rows.append(row)
    return {"formats": rows, "n_without_format": sum(1 for f in fm if f is None)}


def _own_point(records: list[ContainerRecord], scores: list[Scores], budget: float) -> dict[str, Any] | None:
    """``calibrate.operating_points`` at ``budget`` of one format's units, the thresholds set on its own good units
    (what a recipe that runs the format alone would see); None where its good units cannot hold the budget (fewer
    than 1 / ``budget``) or it has no defective unit."""
    from .calibrate import operating_points  # calibrate imports this module

    n_good = sum(1 for r in records if r.is_good)
    pts = operating_points(records, scores, (budget,)) if n_good * budget >= 1 else []
    if not pts:
        return None
    return {"false_reject_rate": pts[0]["false_reject_rate"], "recall": pts[0]["recall"],
            "thresholds": {c: round(float(t), 6) for c, t in pts[0]["thresholds"].items()}}


def uneven_formats(table: dict[str, Any] | None, key: str, budget: float) -> list[dict[str, Any]]:
    """The formats of ``table`` (``by_format``) that reject more than ``UNEVEN_FACTOR`` times ``budget`` of their
    good units at the thresholds named ``key``, with at least ``MIN_REJECTS`` of them rejected."""
    if not table:
        return []
    return [r for r in table["formats"]
            if r[key]["false_rejects"] >= MIN_REJECTS and (r[key]["false_reject_rate"] or 0) > UNEVEN_FACTOR * budget]


def uneven_warning(table: dict[str, Any] | None, key: str, budget: float) -> str | None:
    """A warning naming the formats that spend far more than ``budget`` (``uneven_formats``), with every format's
    rate beside, and what to do; None where none does."""
    over = uneven_formats(table, key, budget)
    if not over or table is None:
        return None
    rates = ", ".join(f"{r['format']} {r[key]['false_reject_rate']:.1%} of {r['good']}" for r in table["formats"]
                      if r["good"])
    names = ", ".join(r["format"] for r in over)
    good = sum(r["good"] for r in table["formats"])
    pooled = sum(r[key]["false_rejects"] for r in table["formats"]) / good if good else 0.0
    # Usually one format spends what the others save and the lot as a whole holds the budget; where the lot is far
    # over it too (thresholds not set on it, or every format over), saying they hold it together would be false.
    together = ("they hold the budget over these formats together, not each recipe's"
                if pooled <= UNEVEN_FACTOR * budget else
                f"nor do they hold it over these formats together ({pooled:.1%} of {good})")
    return (f"the thresholds reject far more than the {budget:.1%} budget of {names}'s good units (by format: "
            f"{rates}): {together}; calibrate each format's package on that format's good units (package calibrate "
            f"--data A_FOLDER_OF_THEM)")
