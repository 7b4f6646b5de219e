"""Fitting a model package's out-of-domain guard on a lot of units the model is meant for.

``vialinspect package fit-domain PACKAGE --data LOT --out NEW`` describes every unit of the lot (see
``vialinspect.vision.domain``), fits the domain model and writes a new package version that carries it; the
ONNX model and the thresholds stay byte for byte. The lot should be what the line shows: good and defective
units, every format the recipe runs and every nuisance the line has (a droplet-rich lot, silicone oil), or the
guard will turn such units away as ``out_of_domain``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.content_hash import ids_digest
from vialinspect.datasets.imageio import read_gray
from vialinspect.datasets.reader import open_dataset
from vialinspect.export.package import ModelPackage, load_package, with_domain
from vialinspect.vision.domain import describe, fit_domain

from .evaluate import select_records


def fit_package_domain(package: str | Path, data: list[str | Path], out: str | Path, reason: str,
                       split: str = "all", margin: float = 1.5, overwrite: bool = False,
                       progress: Callable | None = None) -> tuple[ModelPackage, dict[str, Any]]:
    """Fit the guard on the units of ``data`` (one or more datasets) and write it into a new package version.
    ``progress(total=N)`` makes a bar with ``update``/``close`` (as evaluate_model takes it).

    Returns the new package and a summary (units, groups, threshold). ``ValueError`` for too few units."""
    pkg = load_package(package)
    rows, sizes, lots = [], [], []
    for d in data:
        ds = open_dataset(d)
        recs = select_records(ds, split)
        lots.append({"path": str(Path(d).resolve()), "n_containers": len(recs),
                     "hash": ids_digest(recs)})
        bar = progress(total=len(recs)) if progress else None
        for r in recs:
            frames = [read_gray(ds.root / f) for f in r.frames]
            rows.append(describe(frames))
            sizes.append(frames[0].shape[:2])
            if bar:
                bar.update(1)
        if bar:
            bar.close()
    if not rows:
        raise ValueError("no units to fit the domain on")
    model = fit_domain(np.array(rows), sizes, margin=margin)
    summary = {"n": model.n, "groups": len(model.means), "threshold": model.threshold, "margin": margin,
               "sizes": [list(s) for s in model.sizes], "lots": lots, "split": split}
    new = with_domain(pkg, model.to_json(), Path(out), reason, overwrite=overwrite, fit=summary)
    return new, summary
