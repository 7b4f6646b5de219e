"""ONNX Runtime session for the exported model, with GPU-to-CPU fallback exposed as a status.

Execution providers are tried in the order TensorRT, CUDA, CPU among those installed (the GPU ones come
with the ``onnxruntime-gpu`` package). If a GPU provider fails to start, or fails at run time, the session
falls back to the CPU, logs a warning and says so in ``status`` so the station can report it: the line
keeps running, slower, instead of stopping.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from .anomaly import AnomalyModel
from .motion_veto import MotionVeto, veto_scores
from .postprocess import to_scores, unit_features
from .preprocess import InputSpec, Prepared, preprocess
from .scores import Scores

log = logging.getLogger("vialinspect.runtime")

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU = "CPUExecutionProvider"
INPUT_NAME = "frames"
OUTPUT_NAMES = ("probs", "maps", "fill_height_mm")
FEATURES_NAME = "features"  # the 1/8 context for the good-only anomaly model (graphs exported since 2026-12-04)


@dataclass
class RuntimeStatus:
    provider: str  # the provider that runs the model now
    requested: str  # auto | cpu | cuda | tensorrt
    fallback: bool = False  # a GPU was wanted (or was in use) and the CPU runs instead
    reason: str | None = None
    available: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"provider": self.provider, "requested": self.requested, "fallback": self.fallback,
                "reason": self.reason, "available": self.available}


def provider_plan(requested: str, available: list[str]) -> list[str]:
    """Providers to ask for, best first; the CPU is always last so a session can always start."""
    if requested == "cpu":
        return [CPU]
    if requested == "tensorrt":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    elif requested == "cuda":
        wanted = ["CUDAExecutionProvider"]
    elif requested == "auto":
        wanted = list(GPU_PROVIDERS)
    else:
        raise ValueError(f"unknown device {requested!r} (auto, cpu, cuda, tensorrt)")
    return [p for p in wanted if p in available] + [CPU]


class OnnxModel:
    """Runs ``model.onnx``: preprocessing (the shared function), batching, outputs to ``Scores``."""

    def __init__(self, onnx_path: str, spec: InputSpec, has_fill: bool = True, device: str = "auto",
                 threads: int | None = None, spin: bool = True, anomaly: AnomalyModel | None = None,
                 motion_veto: MotionVeto | None = None, veto_from: float | None = None, _ort=None):
        """``anomaly``: the line's good-only anomaly model; each unit's ``Scores.extra`` then carries its score
        (``anomaly``) and map (``anomaly_map``). ``ValueError`` when the graph has no ``features`` output.
        ``motion_veto``: the nuisance's motion signature, applied to units whose particle map reaches
        ``veto_from`` (``vision.motion_veto.veto_scores``)."""
        import onnxruntime as ort

        self._ort = _ort or ort
        self.path, self.spec, self.has_fill, self.threads, self.spin = onnx_path, spec, has_fill, threads, spin
        self._local = threading.local()  # each calling thread's batch input buffer (see _batch_input)
        available = list(self._ort.get_available_providers())
        plan = provider_plan(device, available)
        self.status = RuntimeStatus(provider=CPU, requested=device, available=available)
        wanted_gpu = device in ("cuda", "tensorrt") or (device == "auto" and plan[0] != CPU)
        if device in ("cuda", "tensorrt") and plan == [CPU]:
            self._fall_back(f"{device} was requested but onnxruntime offers no GPU provider "
                            f"(available: {', '.join(available)}); install onnxruntime-gpu for GPUs")
        try:
            self.session = self._session(plan)
        except Exception as e:  # noqa: BLE001 - any provider failure must fall back, not stop the line
            if plan == [CPU]:
                raise
            self._fall_back(f"GPU provider failed to start ({type(e).__name__}: {e})")
            self.session = self._session([CPU])
        self.anomaly = anomaly
        self.motion_veto, self.veto_from = motion_veto, veto_from
        self._outputs = list(OUTPUT_NAMES)
        if anomaly is not None:
            outputs = {o.name: o for o in self.session.get_outputs()}
            if FEATURES_NAME not in outputs:
                raise ValueError(f"{onnx_path} has no {FEATURES_NAME!r} output (exported before 2026-12-04?), which "
                                 f"its anomaly model reads: export the model again with `vialinspect export`")
            # The channel count is symbolic in the exported graph: one run of the smallest input tells it, so a
            # model fitted on another network is refused here, not unit by unit on the line.
            x = np.zeros((1, spec.frames, 4 * spec.pad_multiple, 2 * spec.pad_multiple), np.float32)
            channels = int(self.session.run([FEATURES_NAME], {INPUT_NAME: x})[0].shape[1])
            if channels != anomaly.channels:
                raise ValueError(f"its anomaly model reads {anomaly.channels} feature channels, the graph gives "
                                 f"{channels}: the model was fitted on another network; fit it again on this one")
            self._outputs.append(FEATURES_NAME)
        active = self.session.get_providers()[0]
        self.status.provider = active
        if wanted_gpu and active == CPU and not self.status.fallback:
            self._fall_back(f"requested {plan[0]} did not start; running on the CPU")

    def _session(self, providers: list[str]):
        so = self._ort.SessionOptions()
        # Default: every core. The station passes fewer to leave room for its acquisition and recording threads.
        so.intra_op_num_threads = self.threads or max(1, (os.cpu_count() or 2))
        so.inter_op_num_threads = 1
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self.spin:
            # Idle intra-op threads spin for a while before sleeping: the fastest choice for a lone model run,
            # but on a small machine they compete with the station's acquisition and recording threads.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The CPU memory arena stays on: without it a batch of 8 full frames took 320 ms instead of 225 ms on 2
        # cores, for ~390 MB less memory; the station needs the speed more (measured with benchmarks/station.py).
        return self._ort.InferenceSession(self.path, so, providers=providers)

    def _fall_back(self, reason: str) -> None:
        self.status.fallback = True
        self.status.reason = reason
        self.status.provider = CPU
        log.warning("inference falls back to the CPU: %s", reason)

    def warm_up(self, height: int, width: int, batch: int = 1) -> None:
        """First runs allocate and tune kernels; do them before the line starts, not on the first unit."""
        x = np.zeros((batch, self.spec.frames, height, width), np.float32)
        for _ in range(2):
            self._run(x)

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        try:
            return self.session.run(self._outputs, {INPUT_NAME: x})
        except Exception as e:  # noqa: BLE001
            if self.status.provider == CPU:
                raise
            self._fall_back(f"GPU inference failed ({type(e).__name__}: {e})")
            self.session = self._session([CPU])
            return self.session.run(self._outputs, {INPUT_NAME: x})

    def predict_prepared(self, batch: list[Prepared]) -> list[Scores]:
        shapes = {p.x.shape for p in batch}
        if len(shapes) != 1:
            raise ValueError(f"a batch needs inputs of one size, got {sorted(shapes)}")
        probs, maps, heights, *rest = self._run(self._batch_input(batch))
        scores = to_scores(probs, maps, heights, batch, self.has_fill)
        if self.anomaly is not None:
            for s, f in zip(scores, unit_features(rest[0], batch), strict=True):
                s.extra["anomaly"], s.extra["anomaly_map"] = self.anomaly.score(f)
        if self.motion_veto is not None:
            veto_scores(self.motion_veto, scores, batch, self.spec, self.veto_from)
        return scores

    def _batch_input(self, batch: list[Prepared]) -> np.ndarray:
        """The batch as one array, in a buffer kept for the next batch. A vial batch of 8 is 57 MB: a fresh
        array of that size is mapped anew by the allocator every time, and touching its pages for the first
        time cost 30 ms a batch on 2 cores, as much as preprocessing all eight units."""
        if len(batch) == 1:
            return batch[0].x[None]
        shape = (len(batch), *batch[0].x.shape)
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = self._local.buf = np.empty(shape, np.float32)
        out = buf[: shape[0]]
        np.stack([p.x for p in batch], out=out)
        return out

    def predict(self, containers: list[list[np.ndarray]]) -> list[Scores]:
        return self.predict_prepared([preprocess(f, self.spec) for f in containers])
