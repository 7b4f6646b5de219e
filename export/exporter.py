"""`vialinspect export`: checkpoint weights -> verified ONNX -> model package, or nothing at all."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vialinspect.vision.pair import Network
from vialinspect.vision.preprocess import InputSpec, Prepared

from .onnx_export import DEFAULT_OPSET, ExportError, export_onnx, parity
from .package import ModelPackage, write_package

logger = logging.getLogger(__name__)


def package_metadata(spec: InputSpec, ck: dict[str, Any], precision: str, opset: int,
                     parity_json: dict[str, Any], git_commit: str) -> dict[str, Any]:
    cal = ck.get("calibration", {})
    gauge = {"fill_gauge": ck["fill_gauge"]} if ck.get("fill_gauge") else {}
    return {**gauge,
        "classes": list(ck.get("classes", ["particle", "crack", "fill_level"])),
        "input": {
            "name": "frames", "layout": "batch, frames, height, width", "dtype": "float32", "frames": spec.frames,
            "pixel_um": spec.pixel_um, "normalisation": {"mean": spec.mean, "std": spec.std},
            "pad_multiple": spec.pad_multiple, "max_side": spec.max_side,
            "region_of_interest": "full frame (the container as framed by the camera)",
            "spec": spec.to_json(),
        },
        "outputs": {"probs": "batch x 3 class probabilities", "maps": "batch x 3 x H/8 x W/8 localisation",
                    "fill_height_mm": "batch: liquid height above the container's lowest point",
                    "features": "batch x C x H/8 x W/8 context of the class maps, 3 x 3 averaged (anomaly model)"},
        "thresholds": {k: float(v) for k, v in ck["thresholds"].items()},
        "fill_spec_fields": ["target_mm", "tolerance_mm"],
        "heads": ck.get("heads", {}),
        "architecture": ck.get("model", {}),
        "training": {
            "data_hash": ck.get("dataset", {}).get("hash"),
            "dataset_kind": ck.get("dataset", {}).get("kind"),
            "n_train": ck.get("dataset", {}).get("n_train"),
            "n_val": ck.get("dataset", {}).get("n_val"),
            "git_commit": ck.get("git_commit"),
            "epochs_run": len(ck.get("history", [])),
            "config": ck.get("config", {}),
        },
        "evaluation": {"validation": {"false_reject_rate": cal.get("val_false_reject_rate"),
                                      "expected_false_reject_rate": cal.get("expected_false_reject_rate"),
                                      "frr_budget": cal.get("frr_budget"), "shares": cal.get("shares"),
                                      "n_good": cal.get("n_good"),
                                      "fill_level_by_spec": cal.get("fill_level_by_spec")},
                       "history_last": (ck.get("history") or [{}])[-1]},
        "export": {"opset": opset, "precision": precision, "parity": parity_json},
        "git_commit": git_commit,
    }


def export_package(net: Network, spec: InputSpec, ck: dict[str, Any], out: Path, held_out: list[Prepared],
                   fill_specs: list, opset: int = DEFAULT_OPSET, fp16: bool = False, git_commit: str = "unknown",
                   overwrite: bool = False, step: Callable[[str], None] | None = None,
                   extra_metadata: dict[str, Any] | None = None) -> ModelPackage:
    """Export ``net`` to ONNX, check it, compare it with PyTorch on ``held_out`` and write the package to ``out``;
    on any failure nothing is written. ``step`` reports each of the four steps (default: this module's log)."""
    step = logger.info if step is None else step
    if not ck.get("thresholds"):
        raise ExportError("the checkpoint has no calibrated thresholds; export the run's best.pt")
    net = net.eval()
    precision = "fp16" if fp16 else "fp32"
    props = {"vialinspect.classes": json.dumps(ck.get("classes")),
             "vialinspect.input_spec": json.dumps(spec.to_json()),
             "vialinspect.thresholds_at_export": json.dumps(ck["thresholds"]),
             "vialinspect.training_data_hash": str(ck.get("dataset", {}).get("hash")),
             "vialinspect.training_git_commit": str(ck.get("git_commit")),
             "vialinspect.precision": precision}
    step(f"1/4 exporting ONNX (opset {opset}, {precision}, dynamic batch/height/width)")
    onnx_bytes = export_onnx(net.float(), spec, props, opset=opset, fp16=fp16)
    step("2/4 onnx.checker passed")
    step(f"3/4 parity with PyTorch on {len(held_out)} held-out container(s)")
    res = parity(net.float(), spec, onnx_bytes, held_out, ck["thresholds"], fill_specs, fp16=fp16)
    if not res.ok:
        raise ExportError(f"parity failed: max |Δp| {res.max_abs_prob:.2e} (tolerance {res.tolerance:.0e}), "
                          f"decisions identical: {res.decisions_identical}; nothing written")
    meta = {**package_metadata(spec, ck, precision, opset, res.to_json(), git_commit), **(extra_metadata or {})}
    buf = io.BytesIO()
    torch.save({"model": ck.get("model"), "state_dict": net.float().state_dict()}, buf)
    pkg = write_package(out, onnx_bytes, meta, overwrite=overwrite, weights=buf.getvalue())
    step(f"4/4 wrote {out} (version {pkg.version_id}); parity max |Δp| {res.max_abs_prob:.1e}, "
         f"max |Δfill| {res.max_abs_fill_mm:.1e} mm, decisions identical")
    return pkg
