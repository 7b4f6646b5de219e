"""Fitting a model package's good-only anomaly model on a lot of the line's good units.

``vialinspect package fit-anomaly PACKAGE --data GOOD --out NEW`` runs the package's graph over the good units
of the data (its ``features`` output: the 1/8 context the class maps come from), builds the memory bank from one
half of them and sets the threshold on the other half (units the bank has not seen, as the line's will be; see
``vialinspect.vision.anomaly``), and writes a new package version that carries the model; ``model.onnx`` and
the thresholds stay byte for byte. Only good units are read: a defective unit in the bank would teach the model
that its defect is normal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.content_hash import ids_digest
from vialinspect.datasets.imageio import read_gray
from vialinspect.datasets.reader import open_dataset
from vialinspect.export.package import ModelPackage, PackageError, load_package, open_runner, with_anomaly
from vialinspect.vision.anomaly import fit_anomaly
from vialinspect.vision.postprocess import unit_features
from vialinspect.vision.preprocess import preprocess
from vialinspect.vision.runtime import FEATURES_NAME, INPUT_NAME

from .evaluate import select_records

MIN_UNITS = 20  # fewer good units give a bank that flags the line's own variety and a threshold set on ~10 units
SAMPLE_CELLS = 200_000  # cells drawn from the bank's units in all (a vial unit at 40 µm/px has ~6,600)


class _GoodUnits:
    """The good units of one or more lots (at most ``limit`` per lot, spread over it), and the graph's features
    of any of them, computed when asked: a lot's features do not fit in memory (3 MB a vial unit)."""

    def __init__(self, pkg: ModelPackage, data: list[str | Path], split: str, limit: int | None):
        self.runner = open_runner(pkg, device="cpu")
        if FEATURES_NAME not in [o.name for o in self.runner.session.get_outputs()]:
            raise ValueError(f"{pkg.path}'s graph has no {FEATURES_NAME!r} output (exported before 2026-12-04): "
                             "export the model again with `vialinspect export` to fit an anomaly model on it")
        self.units: list[tuple[Path, list[str]]] = []
        self.lots: list[dict[str, Any]] = []
        for d in data:
            ds = open_dataset(d)
            recs = [r for r in select_records(ds, split) if not r.classes]
            if limit is not None and len(recs) > limit:
                recs = [recs[i] for i in np.linspace(0, len(recs) - 1, limit).round().astype(int)]
            self.lots.append({"path": str(Path(d).resolve()), "n_good": len(recs),
                              "hash": ids_digest(recs)})
            self.units += [(ds.root, list(r.frames)) for r in recs]

    def features(self, i: int) -> np.ndarray:
        root, frames = self.units[i]
        prep = preprocess([read_gray(root / f) for f in frames], self.runner.spec)
        out = self.runner.session.run([FEATURES_NAME], {INPUT_NAME: prep.x[None]})[0]
        return unit_features(out, [prep])[0]


class _Features:
    """The features of some of the lot's good units, computed one at a time as iterated (``vision.anomaly.Units``),
    each counted on the progress bar."""

    def __init__(self, good: _GoodUnits, idx: list[int], bar):
        self.good, self.idx, self.bar = good, idx, bar

    def __len__(self) -> int:
        return len(self.idx)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in self.idx:
            yield self.good.features(i)
            if self.bar:
                self.bar.update(1)


def fit_package_anomaly(package: str | Path, data: list[str | Path], out: str | Path, reason: str,
                        split: str = "all", frr: float = 0.005, margin: float = 1.0, dims: int = 32,
                        bank_size: int = 1024, limit: int | None = 2000, overwrite: bool = False,
                        progress: Callable | None = None, seed: int = 0) -> tuple[ModelPackage, dict[str, Any]]:
    """Fit the anomaly model on the good units of ``data`` and write it into a new package version: every other
    unit gives cells to the bank, the rest set the threshold (units alternate, so both halves span each lot's
    formats and time). ``progress(total=N)`` makes a bar with ``update``/``close``.

    Returns the new package and the fit's summary. ``ValueError`` for too few good units or a graph without
    features."""
    try:
        pkg = load_package(package)
    except PackageError as e:
        raise ValueError(str(e)) from None
    good = _GoodUnits(pkg, data, split, limit)
    n = len(good.units)
    if n < MIN_UNITS:
        raise ValueError(f"{n} good unit(s) in the data; an anomaly model needs at least {MIN_UNITS} "
                         "(hundreds to hold a threshold)")
    bar = progress(total=n) if progress else None
    model, summary = fit_anomaly(_Features(good, list(range(0, n, 2)), bar), _Features(good, list(range(1, n, 2)), bar),
                                 dims=dims, bank_size=bank_size, sample_cells=SAMPLE_CELLS, frr_budget=frr,
                                 margin=margin, seed=seed)
    if bar:
        bar.close()
    summary.update({"lots": good.lots, "split": split})
    if summary["held_units"] * frr < 1.0:
        summary["warning"] = (f"{summary['held_units']} held-apart good units cannot set a {frr:.2%} budget (that "
                              f"takes at least {int(np.ceil(1.0 / frr))}): the threshold sits at the highest of their "
                              "scores")
    new = with_anomaly(pkg, model.to_json(), Path(out), reason, overwrite=overwrite, fit=summary)
    return new, summary
