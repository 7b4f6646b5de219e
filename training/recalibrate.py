"""Thresholds re-chosen on a calibration lot: a new package version whose ``model.onnx`` is unchanged.

Training calibrates on its validation split, which is often small: a 1% budget over two classes leaves every
good unit below the thresholds until there are 399 of them, so each threshold is the score of one unit and
the false-reject rate it gives new units varies several-fold between splits. A lot of good units imaged on the
line (or simulated) sets them with the same rule (``vialinspect.training.calibrate``) on many more units.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vialinspect.datasets.reader import open_dataset
from vialinspect.export.package import ModelPackage, load_package, with_thresholds

from .by_format import gauge_format_names
from .calibrate import calibrate
from .checkpoint import dataset_hash
from .evaluate import EvaluationError, evaluate_model, package_model


def recalibrate_package(model_dir: str | Path, data_dir: str | Path, out: str | Path, reason: str,
                        frr: float = 0.01, split: str | None = "all", device: str = "cpu",
                        progress: Callable | None = None, overwrite: bool = False) -> tuple[ModelPackage, dict]:
    """Score ``data_dir``'s containers with the package, choose thresholds for the ``frr`` budget on its good
    units and write the new version to ``out`` (atomically, so ``out`` may be the package itself with
    ``overwrite``). Returns it and the calibration record it carries."""
    if not 0 < frr < 1:
        raise ValueError(f"the false-reject budget must be within (0, 1), got {frr}")
    pkg = load_package(model_dir)
    # The package verified once, and the very one scored is the one re-versioned.
    _, recs, scores = evaluate_model(package_model(pkg, device=device), data_dir, None, split=split,
                                     progress=progress)
    cal = calibrate(recs, scores, frr, format_names=gauge_format_names(pkg.fill_gauge))
    if not cal["n_good"]:
        raise EvaluationError(f"{data_dir}: no good units in split {split or 'default'} to calibrate on")
    ds = open_dataset(data_dir)
    record = {
        "data": {"path": str(Path(data_dir).resolve()), "hash": dataset_hash(ds, recs), "split": split,
                 "n_containers": len(recs)},
        **{k: cal[k] for k in ("frr_budget", "shares", "n_good", "expected_false_reject_rate",
                               "fill_level_by_spec")},
        "false_reject_rate_on_lot": cal["val_false_reject_rate"],
        "previous_thresholds": dict(pkg.thresholds),
    }
    if "fill_gauge_beyond_fence" in cal:  # good units of the lot the gauge mis-measured, rejected (gauge_edge)
        record["fill_gauge_beyond_fence"] = cal["fill_gauge_beyond_fence"]
    if "by_format" in cal:  # several container formats in the lot: each one's false rejects (training.by_format)
        record["by_format"] = [{"format": r["format"], "good": r["good"], **{k: r["at_thresholds"][k] for k in
                                ("false_rejects", "false_reject_rate")}} for r in cal["by_format"]["formats"]]
    if "warning" in cal:
        record["warning"] = cal["warning"]
    new = with_thresholds(pkg, cal["thresholds"], Path(out), reason, overwrite=overwrite, calibration=record)
    return new, record
