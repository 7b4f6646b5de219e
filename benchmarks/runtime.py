"""Runtime benchmark: PyTorch eager against ONNX Runtime on the default model, batch 1 and batch 8.

    .venv/bin/python benchmarks/runtime.py [--model models/default] [--format vial-2R] [--seconds 6] [--rounds 3]
                                           [--batches 1,8] [--json bench_out/runtime.json]

Input: K frames of the container format's native size (vial-2R: 4 x 925 x 450 px, padded to 928 x 480),
preprocessing excluded (it is the same for both). The engines take turns (``--rounds``), so that a shared
machine's slow spells do not fall on one of them; the ratio is also given per round. Reports images/s
(containers/s) and latency p50/p99 per batch, the ratio ONNX Runtime / eager, and what each achieves in
GFLOP/s against the machine's ceiling (the best of a large float32 matrix product on the same cores).
Target: ONNX Runtime >= 2x eager at batch 1 on 2 CPU cores.
Where a GPU provider is installed (onnxruntime-gpu) and starts, the CUDA provider is measured in the same run,
fp32 and fp16, each three ways: ``session.run`` with host arrays (what the station does), through ONNX Runtime's
IO binding (input copied to the device per call, outputs bound on the device and copied back: the same work with
ONNX Runtime's own buffers), and device-resident (input placed on the device once, outputs left there: the
device's compute alone, what the transfers cost is the difference). Every case runs at each of ``--batches``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()  # before any library that could phone home is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vialinspect.datasets.sim.formats import get_format  # noqa: E402
from vialinspect.datasets.sim.render import framing_for  # noqa: E402
from vialinspect.export.package import load_package  # noqa: E402
from vialinspect.vision.cost import model_gflop, padded  # noqa: E402
from vialinspect.vision.model import InferenceModel  # noqa: E402
from vialinspect.vision.pair import network_from_arch  # noqa: E402
from vialinspect.vision.preprocess import InputSpec  # noqa: E402
from vialinspect.vision.runtime import OnnxModel  # noqa: E402


def latencies(fn, x, seconds: float) -> list[float]:
    """Seconds per call of ``fn(x)`` over about ``seconds`` (at least 5 calls), after 3 warm-up calls."""
    for _ in range(3):
        fn(x)
    lat = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(lat) < 5:
        t = time.perf_counter()
        fn(x)
        lat.append(time.perf_counter() - t)
    return lat


def summarize(lat: list[float], batch: int) -> dict:
    lat_ms = np.array(lat) * 1000
    return {"batch": batch, "images_per_s": round(float(batch * len(lat) / (lat_ms.sum() / 1000)), 1),
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 2), "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
            "runs": len(lat)}


class BoundRunner:
    """One call of an ONNX Runtime ``session`` through IO binding on ``device`` ("cuda" or "cpu"), the benchmark's
    ``fn(x)``. ``resident``: ``x`` is placed on the device once (the copy is not timed: the same array object is
    passed on every call) and the outputs stay there, so a call is the device's compute alone; otherwise each call
    copies ``x`` in and the outputs back to host arrays, as a station would use it."""

    def __init__(self, session, device: str, resident: bool = False):
        import onnxruntime as ort

        self._ort, self.session, self.device, self.resident = ort, session, device, resident
        self.input = session.get_inputs()[0].name
        self.outputs = [o.name for o in session.get_outputs()]
        self._placed: tuple[int, object] | None = None  # (id of the host array, its device copy)

    def _on_device(self, x: np.ndarray):
        if self.resident and self._placed is not None and self._placed[0] == id(x):
            return self._placed[1]
        v = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), self.device, 0)
        if self.resident:
            self._placed = (id(x), v)
        return v

    def __call__(self, x: np.ndarray):
        io = self.session.io_binding()
        io.bind_ortvalue_input(self.input, self._on_device(x))
        for name in self.outputs:
            io.bind_output(name, self.device)
        self.session.run_with_iobinding(io)
        return io.get_outputs() if self.resident else io.copy_outputs_to_cpu()


def provider_cases(onnx_path: str, fp16_path: str | None, spec: InputSpec, device: str) -> list[tuple]:
    """The benchmark's cases on ``device`` (``(engine, provider, fn)``): for the fp32 graph and, where given, the
    fp16 graph, ``session.run`` with host arrays, IO binding, and device-resident IO binding. The sessions are the
    runtime's own (``vision.runtime.OnnxModel``), so their options are the station's."""
    bind_device = "cpu" if device == "cpu" else "cuda"
    cases = []
    for precision, path in (("fp32", onnx_path), ("fp16", fp16_path)):
        if path is None:
            continue
        m = OnnxModel(str(path), spec, device=device)
        provider = m.status.provider
        cases += [(f"onnxruntime-{precision}", provider, m._run),
                  (f"onnxruntime-{precision}-iobinding", provider, BoundRunner(m.session, bind_device)),
                  (f"onnxruntime-{precision}-resident", provider, BoundRunner(m.session, bind_device, resident=True))]
    return cases


def parse_batches(text: str) -> list[int]:
    """``--batches``: comma-separated batch sizes, each 1..256, in the order given, without repeats."""
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batches: {text!r} is not a comma-separated list of whole numbers") from None
    if not out or any(not 1 <= b <= 256 for b in out) or len(set(out)) != len(out):
        raise ValueError(f"--batches: {text!r}: give distinct batch sizes from 1 to 256, e.g. 1,8")
    return out


def sgemm_ceiling(seconds: float = 2.0) -> float:
    """The best GFLOP/s of a large float32 matrix product on this machine's cores: what dense compute can
    reach here at all, the ceiling for any convolution engine."""
    a, b = torch.randn(3072, 3072), torch.randn(3072, 3072)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 3072**3 / (time.perf_counter() - t) / 1e9)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/default", help="model package (default models/default)")
    p.add_argument("--format", default="vial-2R", help="container format whose image size is used")
    p.add_argument("--seconds", type=float, default=6.0, help="measuring time per case (default 6)")
    p.add_argument("--rounds", type=int, default=3,
                   help="the cases take turns in this many rounds of seconds/rounds each, so that a shared "
                        "machine's slow spells fall on every engine alike (default 3)")
    p.add_argument("--batches", default="1,8",
                   help="batch sizes measured, comma-separated (default 1,8; a GPU is worth measuring at larger "
                        "ones too, e.g. 1,8,32)")
    p.add_argument("--json", default="bench_out/runtime.json", help="where to write the JSON result")
    a = p.parse_args()
    if a.seconds <= 0 or a.rounds < 1:
        p.error("--seconds must be > 0 and --rounds >= 1")
    try:
        batches = parse_batches(a.batches)
    except ValueError as e:
        p.error(str(e))
    pkg = load_package(a.model)
    spec = InputSpec.from_json(pkg.metadata["input"]["spec"])
    fr = framing_for(get_format(a.format), spec.pixel_um or 40.0)
    h, w = padded(fr.height, spec.pad_multiple), padded(fr.width, spec.pad_multiple)
    weights = torch.load(pkg.weights_path, map_location="cpu", weights_only=True)
    net = network_from_arch(weights["model"])
    net.load_state_dict(weights["state_dict"])
    eager = InferenceModel(net.eval(), (spec.pixel_um or 40.0) / 1000).eval()
    torch.set_num_threads(os.cpu_count() or 1)

    def run_eager(x):
        with torch.no_grad():
            return eager(torch.from_numpy(x))

    rows = []
    ort_cpu = OnnxModel(str(pkg.onnx_path), spec, device="cpu")
    cases = [("pytorch-eager", "cpu", run_eager), ("onnxruntime", ort_cpu.status.provider, ort_cpu._run)]
    # Whether the CUDA provider starts; the probe's session is dropped here, provider_cases opens the measured ones.
    gpu = OnnxModel(str(pkg.onnx_path), spec, device="cuda").status
    if not gpu.fallback:
        import tempfile

        from vialinspect.export.onnx_export import export_onnx

        f16 = Path(tempfile.mkdtemp()) / "model_fp16.onnx"
        f16.write_bytes(export_onnx(net, spec, {}, fp16=True))
        cases += provider_cases(str(pkg.onnx_path), str(f16), spec, "cuda")
    round_ratios: dict[str, list[float]] = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, spec.frames, h, w)).astype(np.float32)
        lat: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _ in range(a.rounds):
            speed = {}
            for name, _, fn in cases:
                got = latencies(fn, x, a.seconds / a.rounds)
                lat[name] += got
                speed[name] = len(got) / sum(got)
            round_ratios.setdefault(f"batch{batch}", []).append(
                round(speed["onnxruntime"] / speed["pytorch-eager"], 2))
        rows += [{"engine": name, "provider": provider, **summarize(lat[name], batch)}
                 for name, provider, _ in cases]
    gflop = model_gflop(net, spec.frames, h, w)
    ceiling = sgemm_ceiling()
    for r in rows:
        r["gflop_per_s"] = round(gflop * r["images_per_s"], 1)
    by = {(r["engine"], r["batch"]): r for r in rows}
    ratios = {f"batch{b}": round(by[("onnxruntime", b)]["images_per_s"] / by[("pytorch-eager", b)]["images_per_s"], 2)
              for b in batches}
    result = {"model": pkg.version_id, "format": a.format, "input": [spec.frames, h, w], "cores": os.cpu_count(),
              "rows": rows, "ort_over_eager": ratios, "ort_over_eager_by_round": round_ratios,
              "target_batch1_ratio": 2.0,
              "model_gflop_per_container": round(gflop, 3), "sgemm_ceiling_gflop_per_s": round(ceiling, 1),
              "meets_target": bool(ratios["batch1"] >= 2.0) if "batch1" in ratios else None,
              "gpu": None if gpu.fallback else gpu.provider,
              "gpu_note": gpu.reason if gpu.fallback else None}
    print(f"{'engine':27s} {'provider':22s} {'batch':>5s} {'img/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'GFLOP/s':>8s}")
    for r in rows:
        print(f"{r['engine']:27s} {r['provider']:22s} {r['batch']:5d} {r['images_per_s']:8.1f} {r['p50_ms']:8.2f} "
              f"{r['p99_ms']:8.2f} {r['gflop_per_s']:8.1f}")
    eager1 = by.get(("pytorch-eager", 1))
    need = f" (2x eager at batch 1 would need {2 * eager1['gflop_per_s']:.0f})" if eager1 else ""
    print(f"model: {gflop:.2f} GFLOP per container; this machine's float32 matrix-product ceiling: "
          f"{ceiling:.0f} GFLOP/s{need}")
    print(f"ONNX Runtime / eager: {ratios} (target >= 2.0 at batch 1); by round: {round_ratios}")
    if gpu.fallback:
        print(f"GPU: not measured ({gpu.reason})")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
