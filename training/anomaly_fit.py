"""Fitting a model package's good-only anomaly model on a lot of the line's good units.

``vialinspect package fit-anomaly PACKAGE --data GOOD --out NEW`` runs the package's graph over the good units
of the data (its ``features`` output: the 1/8 context the class maps come from), builds the memory bank from one
half of them and sets the threshold on the other half (units the bank has not seen, as the line's will be; see
``vialinspect.vision.anomaly``), and writes a new package version that carries the model; ``model.onnx`` and
the thresholds stay byte for byte. Only good units are read: a defective unit in the bank would teach the model
that its defect is normal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.imageio import read_gray
from vialinspect.datasets.reader import open_dataset
from vialinspect.export.package import ModelPackage, PackageError, load_package, open_runner, with_anomaly
from vialinspect.vision.anomaly import draw_cells, fit_bank, set_threshold
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
                              "hash": hashlib.sha256("\n".join(sorted(r.id for r in recs)).encode()).hexdigest()})
            self.units += [(ds.root, list(r.frames)) for r in recs]

    def features(self, i: int) -> np.ndarray:
        root, frames = self.units[i]
        prep = preprocess([read_gray(root / f) for f in frames], self.runner.spec)
        out = self.runner.session.run([FEATURES_NAME], {INPUT_NAME: prep.x[None]})[0]
        return unit_features(out, [prep])[0]


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
    bank_idx, held_idx = list(range(0, n, 2)), list(range(1, n, 2))
    rng = np.random.default_rng(seed)
    bar = progress(total=n) if progress else None
    cells, sizes = [], []
    for i in bank_idx:
        f = good.features(i)
        sizes.append(f.shape[1] * f.shape[2])
        cells.append(draw_cells(f, max(SAMPLE_CELLS // len(bank_idx), 1), rng))
        if bar:
            bar.update(1)
    model = fit_bank(np.concatenate(cells), dims, bank_size, seed)
    model.n_units = n
    dmax = []
    for i in held_idx:
        f = good.features(i)
        sizes.append(f.shape[1] * f.shape[2])
        dmax.append(float(model.distances(f).max()))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    cell_count = int(np.median(sizes))
    summary = {"bank_units": len(bank_idx), "held_units": len(held_idx),
               "cells_sampled": int(sum(len(c) for c in cells)), "channels": model.channels,
               "dims": int(model.basis.shape[1]), "bank_size": int(model.bank.shape[0]),
               **set_threshold(model, np.array(dmax), frr, margin),
               "lots": good.lots, "split": split, "median_cells": cell_count,
               "search_mflop_per_unit": round(model.cost_mflop(cell_count), 1)}
    if len(held_idx) * frr < 1.0:
        summary["warning"] = (f"{len(held_idx)} held-apart good units cannot set a {frr:.2%} budget (that takes at "
                              f"least {int(np.ceil(1.0 / frr))}): the threshold sits at the highest of their scores")
    new = with_anomaly(pkg, model.to_json(), Path(out), reason, overwrite=overwrite, fit=summary)
    return new, summary
