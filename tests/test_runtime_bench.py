"""What benchmarks/runtime.py's GPU cases and benchmarks/station.py's CPU comparison are made of, run on the CPU:
CI has no GPU, so the IO-binding calls a GPU run would time are checked here against plain ``session.run``."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benchmark_module import benchmark


def _input(spec, batch=2, h=128, w=64):
    return np.random.default_rng(0).standard_normal((batch, spec.frames, h, w)).astype(np.float32)


def test_io_binding_cases_give_the_plain_runs_outputs(tiny_package):
    from vialinspect.export.package import load_package
    from vialinspect.vision.preprocess import InputSpec

    pkg = load_package(tiny_package)
    spec = InputSpec.from_json(pkg.metadata["input"]["spec"])
    x = _input(spec)
    with benchmark("runtime") as R:
        cases = R.provider_cases(str(pkg.onnx_path), None, spec, "cpu")
        assert [name for name, _, _ in cases] == ["onnxruntime-fp32", "onnxruntime-fp32-iobinding",
                                                  "onnxruntime-fp32-resident"]
        assert {provider for _, provider, _ in cases} == {"CPUExecutionProvider"}
        plain = cases[0][2](x)  # the runtime's own outputs: probs, maps, fill height
        for _, _, fn in cases[1:]:
            for _ in range(2):  # the resident case places the input once and reuses it on the second call
                got = fn(x)
                named = dict(zip(fn.outputs, got, strict=True))
                for name, want in zip(("probs", "maps", "fill_height_mm"), plain, strict=True):
                    value = named[name] if isinstance(named[name], np.ndarray) else named[name].numpy()
                    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
        resident = cases[2][2]
        y = _input(spec) + 1.0  # another array: placed anew, not the first one's device copy
        first = dict(zip(resident.outputs, resident(x), strict=True))["probs"].numpy()
        second = dict(zip(resident.outputs, resident(y), strict=True))["probs"].numpy()
        np.testing.assert_allclose(second, cases[0][2](y)[0], rtol=1e-5, atol=1e-6)
        assert not np.allclose(first, second)


@pytest.mark.parametrize("text, want", [("1,8", [1, 8]), ("32, 1", [32, 1]), ("4", [4])])
def test_batches_parse(text, want):
    with benchmark("runtime") as R:
        assert R.parse_batches(text) == want


@pytest.mark.parametrize("text", ["", "0", "1,1", "8,x", "300", "-2"])
def test_batches_refused_with_a_message(text):
    with benchmark("runtime") as R, pytest.raises(ValueError, match="--batches"):
        R.parse_batches(text)


def test_station_cpu_comparison_runs_the_line_on_the_cpu(tiny_package, tmp_path):
    from vialinspect.datasets.generate import make_container
    from vialinspect.datasets.sim.config import CameraConfig, SimConfig
    from vialinspect.inspection_station.recipe import Recipe

    cfg = SimConfig(formats=("vial-2R",), frames=2, camera=CameraConfig(pixel_um=120.0), defect_rate=0.5)
    units = [make_container(cfg, i, 5)[1] for i in range(4)]
    h, w = units[0][0].shape
    recipe = Recipe.from_dict({"name": "bench-test", "format": "vial-2R", "model": str(tiny_package), "frames": 2,
                               "frame_size": [w, h], "deadline_ms": 5000, "batch_max": 4, "sample_accepted": 0.0,
                               "min_free_mb": 0})
    with benchmark("station") as S:
        got = S.cpu_comparison(tiny_package, False, recipe, units, 600.0, 12, tmp_path / "store", raw_seconds=0.5)
    assert got["provider"] == "CPUExecutionProvider"
    assert got["raw_runtime_per_min"] > 0
    line = got["line_run"]
    assert set(line) == {"achieved_per_min", "latency_p50_ms", "latency_p99_ms", "not_inspected", "causes"}
    assert line["achieved_per_min"] > 0 and line["latency_p99_ms"] >= line["latency_p50_ms"] > 0
    assert line["not_inspected"] == sum(line["causes"].values())
