"""A trained checkpoint to a verified model package: the one path used by `vialinspect export` and retraining."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vialinspect.datasets.imageio import read_gray
from vialinspect.datasets.reader import open_dataset
from vialinspect.datasets.records import fit_frames
from vialinspect.datasets.sim.formats import FORMATS
from vialinspect.datasets.sim.render import framing_for
from vialinspect.export.exporter import export_package
from vialinspect.export.package import ModelPackage, PackageError, package_weights
from vialinspect.vision.cost import model_gflop, padded
from vialinspect.vision.pair import Network
from vialinspect.vision.preprocess import InputSpec, Prepared, preprocess

from .checkpoint import CheckpointError, build_model, git_commit, load_checkpoint

logger = logging.getLogger(__name__)


def held_out(data_dir: Path, spec, count: int) -> tuple[list[Prepared], list]:
    """Held-out containers for export parity: the test split first, then validation."""
    ds = open_dataset(data_dir)
    recs, _ = fit_frames(ds.split("test") + ds.split("val") + ds.records, spec.frames)
    seen, chosen = set(), []
    for r in recs:
        if r.id not in seen:
            seen.add(r.id)
            chosen.append(r)
        if len(chosen) >= count:
            break
    prepared = [preprocess([read_gray(ds.root / f) for f in r.frames], spec) for r in chosen]
    specs = [r.fill_spec_mm for r in chosen]
    return prepared, specs


def cost_metadata(net: Network, spec: InputSpec) -> dict[str, Any]:
    """The package's ``cost`` section: GFLOP of one container of each simulator format, framed at the model's pixel
    scale (the default camera's 40 µm/px where it has none) and padded as the runtime pads it (vision/cost.py)."""
    pixel_um = spec.pixel_um or 40.0
    per = {}
    for name, fmt in FORMATS.items():
        fr = framing_for(fmt, pixel_um)
        per[name] = round(model_gflop(net, spec.frames, padded(fr.height, spec.pad_multiple),
                                      padded(fr.width, spec.pad_multiple)), 3)
    return {"gflop_per_container": per, "frames": spec.frames, "pixel_um": pixel_um,
            "counted": "2 FLOP per multiply-add of every convolution and linear layer (vision/cost.py)"}


def export_model(source: str | Path, out: str | Path, parity_data: str | Path | None = None, **kw: Any) -> ModelPackage:
    """`vialinspect export`: ``source`` is a checkpoint file, or a model package directory to re-export."""
    if Path(source).is_dir():
        return reexport_package(source, out, parity_data, **kw)
    return export_checkpoint(source, out, parity_data, **kw)


# What a re-export keeps from the package it starts from: everything that describes the weights and how they
# were made; the export section, the commit and the creation time are the new export's own.
_KEPT_SECTIONS = ("classes", "heads", "architecture", "training", "evaluation", "fill_spec_fields", "fill_gauge")


def reexport_package(package: str | Path, out: str | Path, parity_data: str | Path | None = None,
                     parity_count: int = 8, opset: int | None = None, fp16: bool = False, overwrite: bool = False,
                     step: Callable[[str], None] | None = None) -> ModelPackage:
    """A package's own PyTorch weights through this version's exporter (another opset, fp16, or a better graph
    of the same function), with the same parity gate; the thresholds and training record carry over and the
    new package names the old one as its parent. A package does not say where its data lives, so the parity
    containers come from ``parity_data``."""
    step = logger.info if step is None else step
    try:
        pkg, weights = package_weights(package)
    except PackageError as e:
        raise CheckpointError(f"{e} (--checkpoint takes a checkpoint file such as RUN/best.pt, or a model "
                              f"package directory)") from None
    if not parity_data or not Path(parity_data).is_dir():
        raise CheckpointError(f"re-exporting a package needs --parity-data DIR (held-out containers in the "
                              f"format the model reads); got {parity_data!r}")
    m = pkg.metadata
    ck = {"model": weights["model"], "state_dict": weights["state_dict"], "thresholds": pkg.thresholds,
          "classes": m["classes"], "input_spec": m["input"]["spec"],
          "dataset": {"hash": m.get("training", {}).get("data_hash")},
          "git_commit": m.get("training", {}).get("git_commit")}
    net, spec = build_model(ck)
    step(f"loading {parity_count} held-out container(s) from {parity_data} for the parity check")
    prepared, fill_specs = held_out(Path(parity_data), spec, parity_count)
    kept = {k: m[k] for k in _KEPT_SECTIONS if k in m}
    extra = {**kept, "cost": cost_metadata(net, spec), "parent_version": pkg.version_id,
             "change_reason": f"re-exported from {pkg.version_id} (same weights and thresholds)"}
    kw: dict[str, Any] = {} if opset is None else {"opset": opset}
    return export_package(net, spec, ck, Path(out), prepared, fill_specs, fp16=fp16, git_commit=git_commit(),
                          overwrite=overwrite, step=step, extra_metadata=extra, **kw)


def export_checkpoint(checkpoint: str | Path, out: str | Path, parity_data: str | Path | None = None,
                      parity_count: int = 8, opset: int | None = None, fp16: bool = False, overwrite: bool = False,
                      extra_metadata: dict[str, Any] | None = None,
                      step: Callable[[str], None] | None = None) -> ModelPackage:
    """Export ``checkpoint`` to a package at ``out`` after parity on held-out containers of ``parity_data``
    (default: the training data the checkpoint names). ``extra_metadata`` (e.g. parent version) is merged in.
    ``step`` reports the steps (default: this module's log; the CLI passes ``print``)."""
    step = logger.info if step is None else step
    ck = load_checkpoint(checkpoint)
    net, spec = build_model(ck)
    data = Path(parity_data) if parity_data else Path(ck.get("dataset", {}).get("root", ""))
    if not data.is_dir():
        raise CheckpointError(f"the training data {data} is not here for the parity check; pass --parity-data DIR")
    step(f"loading {parity_count} held-out container(s) from {data} for the parity check")
    prepared, fill_specs = held_out(data, spec, parity_count)
    kw: dict[str, Any] = {} if opset is None else {"opset": opset}
    extra = {"cost": cost_metadata(net, spec), **(extra_metadata or {})}
    return export_package(net, spec, ck, Path(out), prepared, fill_specs, fp16=fp16, git_commit=git_commit(),
                          overwrite=overwrite, step=step, extra_metadata=extra, **kw)
