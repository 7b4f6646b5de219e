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
from vialinspect.vision.anomaly import fit_anomaly
from vialinspect.vision.postprocess import unit_features
from vialinspect.vision.preprocess import preprocess
from vialinspect.vision.runtime import FEATURES_NAME, INPUT_NAME

from .evaluate import select_records

MIN_UNITS = 20  # fewer good units give a bank that flags the line's own variety and a threshold set on ~10 units


def good_unit_features(pkg: ModelPackage, data: list[str | Path], split: str = "all", limit: int | None = None,
                       progress: Callable | None = None) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """The (C, H/8, W/8) features of every good unit of ``data`` (at most ``limit``, spread over each lot), and
    a description of each lot read (path, units, hash of their ids)."""
    runner = open_runner(pkg, device="cpu")
    names = [o.name for o in runner.session.get_outputs()]
    if FEATURES_NAME not in names:
        raise ValueError(f"{pkg.path}'s graph has no {FEATURES_NAME!r} output (exported before 2026-12-04): export "
                         "the model again with `vialinspect export` to fit an anomaly model on it")
    feats, lots = [], []
    for d in data:
        ds = open_dataset(d)
        recs = [r for r in select_records(ds, split) if not r.classes]
        if limit is not None and len(recs) > limit:
            recs = [recs[i] for i in np.linspace(0, len(recs) - 1, limit).round().astype(int)]
        lots.append({"path": str(Path(d).resolve()), "n_good": len(recs),
                     "hash": hashlib.sha256("\n".join(sorted(r.id for r in recs)).encode()).hexdigest()})
        bar = progress(total=len(recs)) if progress else None
        for r in recs:
            prep = preprocess([read_gray(ds.root / f) for f in r.frames], runner.spec)
            out = runner.session.run([FEATURES_NAME], {INPUT_NAME: prep.x[None]})[0]
            feats.append(unit_features(out, [prep])[0])
            if bar:
                bar.update(1)
        if bar:
            bar.close()
    return feats, lots


def fit_package_anomaly(package: str | Path, data: list[str | Path], out: str | Path, reason: str,
                        split: str = "all", frr: float = 0.005, margin: float = 1.0, dims: int = 32,
                        bank_size: int = 1024, limit: int | None = 2000, overwrite: bool = False,
                        progress: Callable | None = None) -> tuple[ModelPackage, dict[str, Any]]:
    """Fit the anomaly model on the good units of ``data`` and write it into a new package version.

    Returns the new package and the fit's summary. ``ValueError`` for too few good units or a graph without
    features."""
    try:
        pkg = load_package(package)
    except PackageError as e:
        raise ValueError(str(e)) from None
    feats, lots = good_unit_features(pkg, data, split, limit, progress)
    if len(feats) < MIN_UNITS:
        raise ValueError(f"{len(feats)} good unit(s) in the data; an anomaly model needs at least {MIN_UNITS} "
                         "(hundreds to hold a threshold)")
    # Alternate units between the bank and the threshold: both halves span the lot (formats, time of day).
    model, summary = fit_anomaly(feats[0::2], feats[1::2], dims=dims, bank_size=bank_size, frr_budget=frr,
                                 margin=margin)
    cells = int(np.median([f.shape[1] * f.shape[2] for f in feats]))
    summary.update({"lots": lots, "split": split, "median_cells": cells,
                    "search_mflop_per_unit": round(model.cost_mflop(cells), 1)})
    new = with_anomaly(pkg, model.to_json(), Path(out), reason, overwrite=overwrite, fit=summary)
    return new, summary
