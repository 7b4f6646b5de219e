"""ONNX export, packages and the runtime: parity, tamper refusal, GPU->CPU fallback, re-versioning."""

import json
import shutil

import numpy as np
import onnx
import pytest

from vialinspect.cli import main
from vialinspect.export.package import PackageError, load_package, with_thresholds, write_package
from vialinspect.training.evaluate import evaluate_model, load_model
from vialinspect.vision.preprocess import InputSpec
from vialinspect.vision.runtime import CPU, OnnxModel, provider_plan


@pytest.fixture(scope="module")
def package(tiny_package):
    return tiny_package


def test_package_files_metadata_and_onnx_props(package, tiny_run, capsys):
    files = sorted(p.name for p in package.iterdir())
    assert files == ["SHA256SUMS", "model.json", "model.onnx", "weights.pt"]
    pkg = load_package(package)
    m = pkg.metadata
    assert m["classes"] == ["particle", "crack", "fill_level"]
    assert m["input"]["frames"] == 2 and m["input"]["pixel_um"] == 120.0 and m["input"]["dtype"] == "float32"
    assert set(m["thresholds"]) == {"particle", "crack", "fill_level"}
    assert len(m["training"]["data_hash"]) == 64 and m["export"]["parity"]["max_abs_prob"] <= 1e-4
    assert m["export"]["parity"]["decisions_identical"] is True
    proto = onnx.load(str(package / "model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["vialinspect.input_spec"]) == m["input"]["spec"]
    assert props["vialinspect.training_data_hash"] == m["training"]["data_hash"]
    assert [i.name for i in proto.graph.input] == ["frames"]
    assert [o.name for o in proto.graph.output] == ["probs", "maps", "fill_height_mm", "features"]
    assert set(m["outputs"]) == {"probs", "maps", "fill_height_mm", "features"}
    assert m["export"]["parity"]["max_abs_features"] <= 1e-3  # the anomaly model's input agrees with PyTorch
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param  # dynamic batch
    # what a container costs, per simulator format at the model's own pixel scale and frame count
    cost = m["cost"]
    assert cost["frames"] == 2 and cost["pixel_um"] == 120.0
    per = cost["gflop_per_container"]
    assert set(per) == {"vial-2R", "vial-10R", "syringe-1mL"} and all(v > 0 for v in per.values())
    assert per["vial-10R"] > per["vial-2R"]  # a larger field of view costs more
    assert main(["package", "show", str(package)]) == 0
    assert f"vial-2R {per['vial-2R']:.2f}" in capsys.readouterr().out


def test_package_scores_match_the_checkpoint(package, tiny_run, coarse_data):
    a, _, sa = evaluate_model(load_model(tiny_run / "best.pt"), coarse_data, None, split="all")
    b, _, sb = evaluate_model(load_model(package, device="cpu"), coarse_data, None, split="all")
    for x, y in zip(sa, sb, strict=True):
        for c in x.probs:
            assert abs(x.probs[c] - y.probs[c]) < 1e-4
        assert abs(x.fill_height_mm - y.fill_height_mm) < 1e-3
    for key in ("false_reject_rate", "confusion", "pod_by_particle_size", "thresholds"):
        assert a[key] == b[key]


@pytest.mark.parametrize("damage", ["onnx_byte", "onnx_truncated", "json_threshold", "no_sums", "foreign", "version"])
def test_tampered_or_foreign_packages_are_refused(package, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    if damage == "onnx_byte":
        data = bytearray((bad / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bad / "model.onnx").write_bytes(bytes(data))
    elif damage == "onnx_truncated":
        data = (bad / "model.onnx").read_bytes()
        (bad / "model.onnx").write_bytes(data[: len(data) // 2])
    elif damage == "json_threshold":
        m = json.loads((bad / "model.json").read_text())
        m["thresholds"]["particle"] = 0.99
        (bad / "model.json").write_text(json.dumps(m))
    elif damage == "no_sums":
        (bad / "SHA256SUMS").unlink()
    elif damage == "foreign":
        (bad / "model.onnx").write_bytes(b"not onnx")
        (bad / "SHA256SUMS").write_text("0" * 64 + "  model.onnx\n" + "1" * 64 + "  model.json\n")
    elif damage == "version":
        # Consistent checksums but a version id that does not belong to the contents.
        import hashlib

        m = json.loads((bad / "model.json").read_text())
        m["version_id"] = "0123456789abcdef"
        (bad / "model.json").write_text(json.dumps(m))
        sums = (f"{hashlib.sha256((bad / 'model.onnx').read_bytes()).hexdigest()}  model.onnx\n"
                f"{hashlib.sha256((bad / 'model.json').read_bytes()).hexdigest()}  model.json\n")
        (bad / "SHA256SUMS").write_text(sums)
    with pytest.raises(PackageError):
        load_package(bad)
    assert main(["package", "show", str(bad)]) == 2


def test_threshold_only_reversioning_keeps_the_onnx_bytes(package, tmp_path):
    pkg = load_package(package)
    new = with_thresholds(pkg, {"particle": 0.42}, tmp_path / "v2", reason="tighter particle limit")
    assert new.metadata["onnx_sha256"] == pkg.metadata["onnx_sha256"]
    assert (tmp_path / "v2" / "model.onnx").read_bytes() == (package / "model.onnx").read_bytes()
    assert new.version_id != pkg.version_id and new.metadata["parent_version"] == pkg.version_id
    assert load_package(tmp_path / "v2").thresholds["particle"] == 0.42
    with pytest.raises(PackageError, match="within"):
        with_thresholds(pkg, {"crack": 1.5}, tmp_path / "v3", reason="x")


def test_calibrating_a_package_on_a_lot_sets_the_training_rule_thresholds(package, coarse_data, tmp_path, capsys):
    from vialinspect.training.calibrate import calibrate

    out = tmp_path / "calibrated"
    assert main(["package", "calibrate", str(package), "--data", str(coarse_data), "--out", str(out), "--frr", "0.2",
                 "--reason", "calibration lot"]) == 0
    printed = capsys.readouterr().out
    assert "good units" in printed and "by container format" in printed
    pkg, new = load_package(package), load_package(out)
    _, recs, scores = evaluate_model(load_model(package, device="cpu"), coarse_data, None, split="all")
    want = calibrate(recs, scores, 0.2)
    assert new.thresholds == pytest.approx(want["thresholds"])
    assert (out / "model.onnx").read_bytes() == (package / "model.onnx").read_bytes()
    assert new.metadata["parent_version"] == pkg.version_id and new.metadata["change_reason"] == "calibration lot"
    rec = new.metadata["calibration"]
    assert rec["n_good"] == sum(r.is_good for r in recs) == want["n_good"] and rec["frr_budget"] == 0.2
    assert rec["data"]["n_containers"] == len(recs) and len(rec["data"]["hash"]) == 64
    assert rec["previous_thresholds"] == pkg.thresholds
    # The lot holds several formats: each one's false rejects at the new thresholds, as calibrate counts them.
    by = {r["format"]: r for r in want["by_format"]["formats"]}
    assert {r["format"]: r["false_rejects"] for r in rec["by_format"]} == {
        f: r["at_thresholds"]["false_rejects"] for f, r in by.items()}
    assert sum(r["good"] for r in rec["by_format"]) == rec["n_good"]
    # The package itself can be replaced (written aside, then renamed into place).
    copy = tmp_path / "copy"
    shutil.copytree(package, copy)
    assert main(["package", "calibrate", str(copy), "--data", str(coarse_data), "--out", str(copy), "--frr", "0.2",
                 "--reason", "x"]) == 2  # exists: needs --overwrite
    assert main(["package", "calibrate", str(copy), "--data", str(coarse_data), "--out", str(copy), "--frr", "0.2",
                 "--reason", "x", "--overwrite"]) == 0
    assert load_package(copy).thresholds == new.thresholds
    # Mistakes are told, not raised: no such data, a budget out of range, a lot without good units.
    assert main(["package", "calibrate", str(package), "--data", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "a"), "--reason", "x"]) == 2
    assert main(["package", "calibrate", str(package), "--data", str(coarse_data), "--out", str(tmp_path / "b"),
                 "--frr", "1.5", "--reason", "x"]) == 2
    bad = tmp_path / "defects_only"
    shutil.copytree(coarse_data, bad)
    rows = [json.loads(x) for x in (bad / "manifest.jsonl").read_text().splitlines() if x.strip()]
    keep = [r for r in rows if "id" not in r or r.get("classes")]
    (bad / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    capsys.readouterr()
    assert main(["package", "calibrate", str(package), "--data", str(bad), "--out", str(tmp_path / "c"),
                 "--reason", "x"]) == 2
    assert "no good units" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_package_re_exports_with_its_own_weights_thresholds_and_record(package, coarse_data, tmp_path, capsys):
    old = load_package(package)
    out = tmp_path / "re"
    assert main(["export", "--checkpoint", str(package), "--out", str(out)]) == 2  # no data to check parity on
    assert "--parity-data" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(package), "--out", str(out), "--parity-data", str(coarse_data),
                 "--parity-count", "2"]) == 0
    new = load_package(out)
    assert new.metadata["parent_version"] == old.version_id and new.thresholds == old.thresholds
    for key in ("training", "evaluation", "heads", "architecture", "classes", "cost"):
        assert new.metadata[key] == old.metadata[key]
    assert new.metadata["export"]["parity"]["decisions_identical"] is True
    x = [[np.random.default_rng(1).integers(0, 255, (96, 64), dtype=np.uint8) for _ in range(2)]]
    a = load_model(package, device="cpu").predictor.predict(x)[0]
    b = load_model(out, device="cpu").predictor.predict(x)[0]
    assert all(abs(a.probs[c] - b.probs[c]) < 1e-5 for c in a.probs)


def test_cuda_request_without_a_gpu_falls_back_to_cpu_with_status(package):
    pkg = load_package(package)
    spec = InputSpec.from_json(pkg.metadata["input"]["spec"])
    m = OnnxModel(str(pkg.onnx_path), spec, device="cuda")
    assert m.status.provider == CPU and m.status.fallback and "GPU" in m.status.reason
    out = m.predict([[np.full((64, 32), 200, np.uint8)] * 2])
    assert set(out[0].probs) == {"particle", "crack", "fill_level"}


class _FakeOrt:
    """onnxruntime stand-in where a CUDA provider is installed but fails to start or to run."""

    import onnxruntime as _real

    GraphOptimizationLevel = _real.GraphOptimizationLevel
    SessionOptions = _real.SessionOptions

    def __init__(self, fail_at: str):
        self.fail_at = fail_at

    def get_available_providers(self):
        return ["CUDAExecutionProvider", CPU]

    def InferenceSession(self, path, so, providers):  # noqa: N802 - mirrors onnxruntime
        if "CUDAExecutionProvider" in providers and self.fail_at == "start":
            raise RuntimeError("CUDA driver not found")
        real = self._real.InferenceSession(path, so, providers=[CPU])
        if "CUDAExecutionProvider" in providers and self.fail_at == "run":
            class Broken:
                def get_providers(self):
                    return ["CUDAExecutionProvider", CPU]

                def run(self, *a, **k):
                    raise RuntimeError("CUDA error: an illegal memory access")
            return Broken()
        return real


@pytest.mark.parametrize("fail_at", ["start", "run"])
def test_gpu_provider_failure_falls_back_to_cpu(package, fail_at):
    pkg = load_package(package)
    spec = InputSpec.from_json(pkg.metadata["input"]["spec"])
    m = OnnxModel(str(pkg.onnx_path), spec, device="auto", _ort=_FakeOrt(fail_at))
    if fail_at == "start":
        assert m.status.fallback and m.status.provider == CPU and "failed to start" in m.status.reason
    else:
        assert not m.status.fallback and m.status.provider == "CUDAExecutionProvider"
    scores = m.predict([[np.full((64, 32), 200, np.uint8)] * 2])
    assert len(scores) == 1 and m.status.provider == CPU and m.status.fallback


def test_station_sessions_let_idle_threads_sleep_and_score_the_same(package):
    from vialinspect.inspection_station.station import load_model

    pkg = load_package(package)
    spec = InputSpec.from_json(pkg.metadata["input"]["spec"])
    spinning = OnnxModel(str(pkg.onnx_path), spec, device="cpu")
    station = load_model(package, device="cpu").runner
    entry = "session.intra_op.allow_spinning"
    assert station.session.get_session_options().get_session_config_entry(entry) == "0"
    with pytest.raises(RuntimeError):  # not set: ONNX Runtime's default, spinning
        spinning.session.get_session_options().get_session_config_entry(entry)
    frames = [[np.random.default_rng(k).integers(0, 255, (64, 32), dtype=np.uint8) for k in range(2)]]
    a, b = spinning.predict(frames)[0], station.predict(frames)[0]
    assert a.probs == b.probs


def test_batches_through_the_reused_input_buffer_score_each_unit_as_alone(package):
    pkg = load_package(package)
    spec = InputSpec.from_json(pkg.metadata["input"]["spec"])
    m = OnnxModel(str(pkg.onnx_path), spec, device="cpu")
    units = [[np.random.default_rng(10 * u + k).integers(0, 255, (64, 32), dtype=np.uint8) for k in range(2)]
             for u in range(4)]
    alone = [m.predict([u])[0] for u in units]
    # A batch of 4, then a smaller one in the same buffer, then other units: no unit sees another's input.
    for idx in ([0, 1, 2, 3], [2, 3], [0, 1, 2]):
        for i, s in zip(idx, m.predict([units[i] for i in idx]), strict=True):
            assert s.probs == pytest.approx(alone[i].probs, abs=1e-5)
            assert s.fill_height_mm == pytest.approx(alone[i].fill_height_mm, abs=1e-4)
    assert m._local.buf.shape[0] == 4  # one buffer, reused


def test_provider_plan_orders_gpu_first_and_always_ends_on_cpu():
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    assert provider_plan("auto", avail) == avail
    assert provider_plan("cuda", avail) == ["CUDAExecutionProvider", CPU]
    assert provider_plan("cpu", avail) == [CPU]
    assert provider_plan("auto", [CPU]) == [CPU]


def test_fine_tune_from_a_package_with_another_frame_count(package, coarse_data, tmp_path):
    from vialinspect.training.trainer import train

    from .conftest import small_config

    # The package takes 2 frames; a single-frame model starts from it (first layer adapted).
    s = train(coarse_data, tmp_path / "ft", small_config(epochs=1, frames=1), init=str(package), progress=False,
              log=lambda *a: None)
    assert s["epochs_run"] == 1
    from vialinspect.training.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "ft" / "best.pt")
    assert ck["input_spec"]["frames"] == 1
    # the package's network, less what one frame cannot use (the motion branch), and the settings say so
    assert ck["model"]["widths"] == load_package(package).metadata["architecture"]["widths"]
    assert ck["model"]["motion"] is False and ck["config"]["motion_branch"] is False


# ---------------------------------------------------------------- malformed packages (review finding 14)

def _spec_without(*keys, **over):
    from .test_failsafe_outputs import good_meta

    spec = {k: v for k, v in good_meta()["input"]["spec"].items() if k not in keys}
    return {"frames": spec.get("frames", 2), "spec": {**spec, **over}}


def _malformed(name):
    """forge_package arguments for each way a package can be malformed, and words its refusal must hold."""
    from .test_failsafe_outputs import good_meta, tiny_onnx

    return {
        "model_json_list": ({"raw_meta": b"[1, 2]"}, "must be a JSON object, got a list"),
        "model_json_string": ({"raw_meta": b'"a package"'}, "must be a JSON object, got a text"),
        "model_json_number": ({"raw_meta": b"3"}, "must be a JSON object"),
        "model_json_not_utf8": ({"raw_meta": b'{"format": "\xff"}'}, "model.json is not UTF-8"),
        "model_json_deep": ({"raw_meta": b"[" * 100000 + b"]" * 100000}, "model.json"),
        "sums_not_utf8": ({"sums": b"\xff\xfe\x00 model.onnx\n"}, "SHA256SUMS is not UTF-8"),
        "input_empty": ({"meta": good_meta(input={})}, "input.spec: missing"),
        "input_not_a_table": ({"meta": good_meta(input="4 frames")}, "input: must be a table"),
        "input_spec_empty": ({"meta": good_meta(input={"spec": {}})}, "input.spec: lacks frames, pixel_um"),
        "input_spec_lacks_std": ({"meta": good_meta(input=_spec_without("std"))}, "input.spec: lacks std"),
        "input_frames_zero": ({"meta": good_meta(input=_spec_without(frames=0))}, "input.spec.frames"),
        "input_frames_text": ({"meta": good_meta(input=_spec_without(frames="2"))}, "input.spec.frames"),
        "input_frames_huge": ({"meta": good_meta(input=_spec_without(frames=10**6))}, "input.spec.frames"),
        "input_std_zero": ({"meta": good_meta(input=_spec_without(std=0.0))}, "input.spec.std"),
        "input_mean_nan": ({"meta": good_meta(input=_spec_without(mean=float("nan")))}, "input.spec.mean"),
        "input_frames_disagree": ({"meta": good_meta(input={**_spec_without(), "frames": 3})}, "input.frames"),
        "classes_unknown": ({"meta": good_meta(classes=["particle", "crack", "scratch"])}, "unknown class"),
        "classes_reordered": ({"meta": good_meta(classes=["crack", "particle", "fill_level"])}, "order"),
        "classes_not_a_list": ({"meta": good_meta(classes="particle")}, "list of class names"),
        "heads_not_a_table": ({"meta": good_meta(heads=["fill"])}, "heads: must be a table"),
        "onnx_not_onnx": ({"onnx_bytes": b"not onnx"}, "model.onnx is not an ONNX model"),
        "onnx_empty": ({"onnx_bytes": b""}, "model.onnx is not an ONNX model"),
        "onnx_json": ({"onnx_bytes": b'{"graph": {}}'}, "model.onnx is not an ONNX model"),
        "onnx_truncated": ({"onnx_bytes": tiny_onnx()[:-5]}, "model.onnx is truncated"),
    }[name]


MALFORMED = ["model_json_list", "model_json_string", "model_json_number", "model_json_not_utf8", "model_json_deep",
             "sums_not_utf8", "input_empty", "input_not_a_table", "input_spec_empty", "input_spec_lacks_std",
             "input_frames_zero", "input_frames_text", "input_frames_huge", "input_std_zero", "input_mean_nan",
             "input_frames_disagree", "classes_unknown", "classes_reordered", "classes_not_a_list",
             "heads_not_a_table", "onnx_not_onnx", "onnx_empty", "onnx_json", "onnx_truncated"]


@pytest.mark.parametrize("name", MALFORMED)
def test_load_package_refuses_malformed_metadata_sums_and_onnx_with_package_error(tmp_path, name, capsys):
    from .test_failsafe_outputs import forge_package

    kwargs, words = _malformed(name)
    bad = forge_package(tmp_path / "bad", **kwargs)
    with pytest.raises(PackageError) as e:
        load_package(bad)
    msg = str(e.value)
    assert words in msg and str(bad) in msg and "\n" not in msg and len(msg) < 400, msg
    assert main(["package", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and words in err


def test_write_package_refuses_what_load_package_would_refuse(tmp_path):
    from .test_failsafe_outputs import good_meta, tiny_onnx

    with pytest.raises(PackageError, match="model.onnx is not an ONNX model"):
        write_package(tmp_path / "a", b"not onnx", good_meta())
    with pytest.raises(PackageError, match="input.spec: missing"):
        write_package(tmp_path / "b", tiny_onnx(), good_meta(input={}))
    with pytest.raises(PackageError, match="must be a JSON object"):
        write_package(tmp_path / "c", tiny_onnx(), ["not", "a", "table"])  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary folder


def test_the_shipped_and_exported_packages_pass_the_metadata_and_onnx_checks(package):
    assert load_package("builtin:default").metadata["classes"] == ["particle", "crack", "fill_level"]
    still = load_package("builtin:still")  # the still-image transfer model (make still-model)
    assert still.metadata["input"]["spec"]["frames"] == 1 and still.weights_path is not None
    assert load_package(package).metadata["input"]["spec"]["frames"] == 2


def test_calibrating_on_a_lot_with_a_mis_measured_good_unit_says_so_and_keeps_the_fill_edge(
        package, coarse_data, tmp_path, capsys, monkeypatch):
    """A lot whose fill level a line's gauge decides, one good unit of it mis-measured far out (a leaning
    container): the fill threshold stays at the other good units' edge, and the command says which score and why."""
    from dataclasses import replace

    import vialinspect.training.recalibrate as recal

    real = recal.evaluate_model

    def gauged(*a, **k):
        report, recs, scores = real(*a, **k)
        far = next(i for i, r in enumerate(recs) if r.is_good)
        out = []
        for i, s in enumerate(scores):
            f = 0.83 if i == far else 0.05 + 0.25 * (i % 7) / 7
            out.append(replace(s, probs={**s.probs, "fill_level": f}, fill_height_mm=None,
                               extra={**s.extra, "fill_gauge": {"probability": f}}))
        return report, recs, out

    monkeypatch.setattr(recal, "evaluate_model", gauged)
    capsys.readouterr()
    out = tmp_path / "calibrated"
    assert main(["package", "calibrate", str(package), "--data", str(coarse_data), "--out", str(out), "--frr", "0.2",
                 "--reason", "lot"]) == 0
    printed = capsys.readouterr().out
    assert "far beyond the others (0.830" in printed and "look at them" in printed
    new = load_package(out)
    assert new.metadata["calibration"]["fill_gauge_beyond_fence"] == 1
    assert new.thresholds["fill_level"] < 0.31  # the others' edge, not above the mis-measured unit
