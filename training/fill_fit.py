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
from vialinspect.vision.fill_gauge import FillGauge, FillGaugeError, apply_reading, fit_fill_gauge, measure_all
from vialinspect.vision.scores import Scores

from .calibrate import threshold_for_budget
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
    good_scores: np.ndarray

    def threshold(self, budget: float) -> float:
        """The fill-level threshold that rejects at most ``budget`` of new good units, as the line's good
        training units tell (hundreds to thousands: a validation split's ~100 cannot set a 0.3% share). Units
        the gauge cannot measure are rejected at any threshold; they do not move it."""
        return threshold_for_budget(self.good_scores, budget)


def fit_line_gauge(root: Path, good: list[ContainerRecord], log: Callable[[str], None]) -> LineGauge | None:
    """The gauge fitted on the line's good training units, or None (logged) where they do not make one."""
    if not good:
        log("fill gauge: no good units to fit it on; the network decides the fill level")
        return None
    geos = measure_all(_frames(root, good))
    try:
        gauge = fit_fill_gauge(geos)
    except FillGaugeError as e:
        log(f"fill gauge: not used ({e}); the network decides the fill level")
        return None
    found = gauge.n_measured / len(geos)
    if found < MIN_FOUND:
        log(f"fill gauge: not used (the liquid column was found in {found:.0%} of {len(geos)} good units, "
            f"fewer than {MIN_FOUND:.0%}); the network decides the fill level")
        return None
    log(f"fill gauge: {len(gauge.groups)} container geometr{'y' if len(gauge.groups) == 1 else 'ies'} from "
        f"{gauge.n_measured} of {len(geos)} good units")
    scores = [gauge.read_geometry(g) for g in geos if g is not None]
    return LineGauge(gauge, np.array([r.probability for r in scores if r.problem is None], np.float64))


def gauge_decides(gauge_auroc: float | None, network_auroc: float | None, setting: str) -> bool:
    """Whether the gauge, not the network, decides the fill level, from their validation AUROCs (fill-level
    units against good units) and the ``fill_gauge`` setting ("auto" or "on")."""
    if setting == "on" or gauge_auroc is None or network_auroc is None:
        return True
    return gauge_auroc >= network_auroc - AUTO_MARGIN


def decided_fill_auroc(gauge_auroc: float | None, network_auroc: float | None, setting: str) -> float | None:
    """The validation AUROC of the fill level as the run will decide it: the gauge's where it decides, else the
    network's. Training's choice of best.pt counts this, not the network's figure alone: where the gauge decides,
    the network's fill-level output over a few validation units is noise that would choose the epoch (a
    50-label line's 4 fill-level units swung it by 0.1-0.3 between validations)."""
    if gauge_decides(gauge_auroc, network_auroc, setting):
        return gauge_auroc if gauge_auroc is not None else network_auroc
    return network_auroc


def _fill_pairs(val_recs: list[ContainerRecord]) -> tuple[list[int], np.ndarray]:
    """The validation units a fill-level AUROC is taken over (good and fill-level), and which are fill-level."""
    idx = [i for i, r in enumerate(val_recs) if not r.classes or "fill_level" in r.classes]
    return idx, np.array(["fill_level" in val_recs[i].classes for i in idx], bool)


def gauge_validation_auroc(line: LineGauge, root: Path, val_recs: list[ContainerRecord]) -> float | None:
    """The gauge's fill-level AUROC on the validation split (None where it lacks good or fill-level units).
    The gauge does not change while the network trains, so training measures it once."""
    idx, y = _fill_pairs(val_recs)
    if not idx or y.all() or not y.any():
        return None
    recs = [val_recs[i] for i in idx]
    return auroc(y, np.array([line.gauge.read(f).probability for f in _frames(root, recs)]))


def choose_fill_gauge(line: LineGauge, root: Path, val_recs: list[ContainerRecord], scores: list[Scores],
                      setting: str, log: Callable[[str], None]) -> tuple[list[Scores], dict[str, Any]]:
    """The validation scores with the gauge's fill level where it is chosen, and the record of the choice."""
    gauge = line.gauge
    gauged = [apply_reading(s, gauge.read(f)) for s, f in zip(scores, _frames(root, val_recs), strict=True)]
    idx, y = _fill_pairs(val_recs)
    net = auroc(y, np.array([scores[i].probs.get("fill_level", 0.0) for i in idx])) if idx else None
    gau = auroc(y, np.array([gauged[i].probs["fill_level"] for i in idx])) if idx else None
    use = gauge_decides(gau, net, setting)
    record = {"used": use, "setting": setting, "val_auroc_gauge": gau, "val_auroc_network": net,
              "n_fill_level_val": int(y.sum())}

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    log(f"fill level decided by the {'fill gauge' if use else 'network'} (validation AUROC gauge {fmt(gau)}, "
        f"network {fmt(net)}, {int(y.sum())} fill-level units)")
    return (gauged if use else scores), record
