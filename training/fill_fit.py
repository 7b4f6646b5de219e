"""Fitting a line's fill gauge (``vision.fill_gauge``) at the end of training on data without fill heights, and
choosing between it and the network's own fill-level output on the validation split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.imageio import read_gray
from vialinspect.datasets.records import ContainerRecord
from vialinspect.vision.classical import measure_geometry
from vialinspect.vision.fill_gauge import FillGauge, FillGaugeError, apply_reading, fit_fill_gauge, measure_all
from vialinspect.vision.scores import Scores

from .metrics import auroc

MIN_FOUND = 0.9  # the gauge is not used where its geometry is found in fewer of the line's good units
# "auto" keeps the network's fill-level output only where it separates the validation split's fill-level units
# from its good units clearly better than the gauge: the gauge measures what the class is, the network guesses
# it from a few hundred image-level labels, and ~20 validation units give an AUROC a spread of ~0.05.
AUTO_MARGIN = 0.05


def _frames(root: Path, recs: list[ContainerRecord]):
    for r in recs:
        yield [read_gray(root / f) for f in r.frames]


@dataclass(frozen=True)
class LineGauge:
    """A line's fitted gauge and its fill-level scores on the good units it was fitted on (those measured)."""

    gauge: FillGauge
    # The gauge's scores of the good units it measured: the fill threshold is set on these (hundreds to
    # thousands), not on a validation split's ~100 (``training.calibrate``). Units it cannot measure are rejected
    # at any threshold and are left out.
    good_scores: np.ndarray


def fit_line_gauge(root: Path, good: list[ContainerRecord], log: Callable[[str], None]) -> LineGauge | None:
    """The gauge fitted on the line's good training units, or None (logged) where they do not make one."""
    if not good:
        log("fill gauge: no good units to fit it on; the network decides the fill level")
        return None
    geos = measure_all(_frames(root, good))
    try:
        gauge = fit_fill_gauge(geos)
    except FillGaugeError as e:
        log(f"fill gauge: not used ({e}{_why_unmeasured(root, good, geos)}); the network decides the fill level")
        return None
    found = gauge.n_measured / len(geos)
    if found < MIN_FOUND:
        log(f"fill gauge: not used (the liquid column was found in {found:.0%} of {len(geos)} good units, "
            f"fewer than {MIN_FOUND:.0%}{_why_unmeasured(root, good, geos)}); the network decides the fill level")
        return None
    log(f"fill gauge: {len(gauge.groups)} container geometr{'y' if len(gauge.groups) == 1 else 'ies'} from "
        f"{gauge.n_measured} of {len(geos)} good units"
        + ("; the images' scale varies (a format's heights spread), so units are grouped by shape and each "
           "column is read against its unit's own height" if gauge.per_image_scale else ""))
    scores = [gauge.read_geometry(g) for g in geos if g is not None]
    return LineGauge(gauge, np.array([r.probability for r in scores if r.problem is None], np.float64))


def _why_unmeasured(root: Path, good: list[ContainerRecord], geos: list) -> str:
    """Why the first good unit the geometry did not measure was not measured (``; e.g. ID: reason``), so that a
    user learns what about the line's images keeps the gauge out (a container lying on its side, the bottom
    out of view, no meniscus); empty where every unit was measured."""
    for r, g in zip(good, geos, strict=True):
        if g is None:
            try:
                measure_geometry(next(_frames(root, [r])))
            except ValueError as e:
                return f"; e.g. {r.id}: {e}"
            return ""
    return ""


def choose_fill_gauge(line: LineGauge, root: Path, val_recs: list[ContainerRecord], scores: list[Scores],
                      setting: str, log: Callable[[str], None]) -> tuple[list[Scores], dict[str, Any]]:
    """The validation scores with the gauge's fill level where it is chosen, and the record of the choice."""
    gauge = line.gauge
    gauged = [apply_reading(s, gauge.read(f)) for s, f in zip(scores, _frames(root, val_recs), strict=True)]
    pairs = [(i, r) for i, r in enumerate(val_recs) if not r.classes or "fill_level" in r.classes]
    y = np.array(["fill_level" in r.classes for _, r in pairs])
    net = auroc(y, np.array([scores[i].probs.get("fill_level", 0.0) for i, _ in pairs])) if len(pairs) else None
    gau = auroc(y, np.array([gauged[i].probs["fill_level"] for i, _ in pairs])) if len(pairs) else None
    if setting == "on" or net is None or gau is None:
        use = True
    else:
        use = gau >= net - AUTO_MARGIN
    record = {"used": use, "setting": setting, "val_auroc_gauge": gau, "val_auroc_network": net,
              "n_fill_level_val": int(y.sum())}

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    log(f"fill level decided by the {'fill gauge' if use else 'network'} (validation AUROC gauge {fmt(gau)}, "
        f"network {fmt(net)}, {int(y.sum())} fill-level units)")
    return (gauged if use else scores), record
