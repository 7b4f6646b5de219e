"""Good-only anomaly detection: a memory bank of the line's good units' features scores a place unlike them high;
`package fit-anomaly` writes it into a package; evaluate reports it and the station rejects with reason anomaly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vialinspect.datasets.generate import generate
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.export.package import PackageError, load_package, write_package
from vialinspect.vision.anomaly import AnomalyModel, fit_anomaly, greedy_coreset

from .test_registry import packages  # noqa: F401 - the module's package fixture (the tiny exported model)

C, H, W = 8, 10, 12


def _good(rng, n):
    """Good units: every cell one of a few normal appearances (glass, liquid, edge) plus noise."""
    modes = np.random.default_rng(0).normal(0, 3, (4, C))
    return [(modes[rng.integers(0, 4, H * W)] + rng.normal(0, 0.3, (H * W, C))).T.reshape(C, H, W).astype(np.float32)
            for _ in range(n)]


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(1)
    return fit_anomaly(_good(rng, 40), _good(rng, 40), dims=6, bank_size=64, frr_budget=0.05)


def test_a_place_unlike_every_good_unit_scores_above_the_threshold_and_is_found_on_the_map(fitted):
    model, summary = fitted
    rng = np.random.default_rng(2)
    goods = _good(rng, 60)
    scores = np.array([model.score(f)[0] for f in goods])
    assert 0.0 < model.threshold < 1.0 and (scores >= model.threshold).mean() <= 0.15
    odd = _good(rng, 1)[0]
    odd[:, 4, 7] += 12.0  # one cell far from every normal appearance
    s, m = model.score(odd)
    assert s >= model.threshold and s > scores.max()
    assert m.shape == (H, W) and np.unravel_index(m.argmax(), m.shape) == (4, 7)
    assert summary["held_units"] == 40 and summary["bank_size"] == 64 and summary["dims"] == 6


def test_coreset_keeps_the_rare_appearance_that_a_random_sample_misses():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 0.1, (5000, 2)), [[10.0, 10.0]]]).astype(np.float32)
    assert 5000 in set(greedy_coreset(x, 8).tolist())


def test_anomaly_model_round_trips_and_damaged_ones_are_refused(fitted, tmp_path):
    model, _ = fitted
    back = AnomalyModel.from_json(json.loads(json.dumps(model.to_json())))
    f = _good(np.random.default_rng(4), 1)[0]
    assert back.score(f)[0] == pytest.approx(model.score(f)[0], abs=1e-6)
    for key, value in (("bank", "bm9uc2Vuc2U="), ("threshold", 1.5), ("features", "other-v9"), ("mean", None)):
        bad = {**model.to_json(), key: value}
        with pytest.raises(ValueError, match="anomaly|features"):
            AnomalyModel.from_json(bad)
    with pytest.raises(ValueError, match="expected"):
        model.score(np.zeros((C + 1, H, W), np.float32))
    with pytest.raises(ValueError, match="at least 5"):
        fit_anomaly(_good(np.random.default_rng(5), 3), _good(np.random.default_rng(6), 10))


def test_fit_anomaly_command_writes_a_package_that_evaluate_reports_and_refuses_bad_input(packages, tmp_path,  # noqa: F811
                                                                                          capsys):
    from vialinspect.cli import main

    cfg = SimConfig(frames=2, formats=("vial-2R",), camera=CameraConfig(pixel_um=120.0))
    lot = tmp_path / "lot"
    generate(lot, 48, SimConfig(**{**cfg.__dict__, "defect_rate": 0.25}), seed=37, workers=1)
    out = tmp_path / "anomaly"
    assert main(["package", "fit-anomaly", str(packages / "a"), "--data", str(lot), "--out", str(out), "--dims", "8",
                 "--bank", "256", "--reason", "test lot"]) == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "reason anomaly" in printed
    assert "cannot set a 0.50% budget" in printed  # ~20 held-apart units: said, not hidden
    a, pkg = load_package(packages / "a"), load_package(out)
    assert pkg.anomaly is not None and pkg.metadata["parent_version"] == a.version_id
    assert pkg.onnx_path.read_bytes() == a.onnx_path.read_bytes() and pkg.thresholds == a.thresholds
    fit = pkg.metadata["anomaly"]["fit"]
    assert fit["bank_units"] + fit["held_units"] == fit["lots"][0]["n_good"] >= 20  # good units only
    assert main(["evaluate", "--model", str(out), "--data", str(lot), "--split", "all", "--out",
                 str(tmp_path / "rep")]) == 0
    assert "anomaly (threshold" in capsys.readouterr().out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())["anomaly"]
    assert rep["threshold"] == pkg.anomaly.threshold and rep["n_good"] == fit["lots"][0]["n_good"]
    assert rep["good_rejected_either"] >= rep["good_rejected_by_classes"]
    # A model fitted on another network (other channels) is refused when the package is opened, not per unit.
    from vialinspect.export.package import open_runner, with_anomaly

    narrow = AnomalyModel.from_json(pkg.metadata["anomaly"])
    narrow.mean, narrow.scale, narrow.basis = narrow.mean[:4], narrow.scale[:4], narrow.basis[:4]
    with pytest.raises(PackageError, match="another network"):
        open_runner(with_anomaly(a, narrow.to_json(), tmp_path / "narrow", reason="test"))
    # A damaged model makes the package unusable, never silently without it.
    meta = json.loads((out / "model.json").read_text())
    meta["anomaly"]["bank"] = "bm9uc2Vuc2U="
    with pytest.raises(PackageError, match="anomaly"):
        write_package(tmp_path / "bad", pkg.onnx_path.read_bytes(), meta)
    # Too few good units, and data that does not exist: one line each, no traceback.
    few = tmp_path / "few"
    generate(few, 6, cfg, seed=38, workers=1)
    assert main(["package", "fit-anomaly", str(packages / "a"), "--data", str(few), "--out", str(tmp_path / "x"),
                 "--reason", "r"]) == 2
    assert "needs at least 20" in capsys.readouterr().err
    assert main(["package", "fit-anomaly", str(packages / "a"), "--data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "y"), "--reason", "r"]) == 2


class _AnomalyRunner:
    """The station's runner stand-in with an anomaly model: the units score ``order`` in turn."""

    def __init__(self):
        from .test_station import FakeRunner

        self.inner = FakeRunner()
        self.spec = self.inner.spec
        self.anomaly = AnomalyModel(mean=np.zeros(1, np.float32), scale=np.ones(1, np.float32),
                                    basis=np.ones((1, 1), np.float32), bank=np.zeros((1, 1), np.float32),
                                    reference=1.0, threshold=0.6)
        self.order: list[float | None] = []

    def predict_prepared(self, batch):
        out = self.inner.predict_prepared(batch)
        for s in out:
            v = self.order.pop(0)
            if v is not None:
                s.extra["anomaly"] = v
        return out


def test_the_station_rejects_a_unit_unlike_the_line_with_reason_anomaly_and_records_the_threshold(tmp_path):
    from vialinspect.inspection_station.pipeline import LoadedModel, ModelSlot, Pipeline
    from vialinspect.inspection_station.stats import StationStats
    from vialinspect.inspection_station.store import RecordStore

    from .test_station import ListSource, RecordingLine, _recipe, _unit

    runner = _AnomalyRunner()
    runner.order = [0.2, 0.9, float("nan"), None]  # normal, anomalous, not a number, missing
    store = RecordStore(tmp_path / "store", min_free_mb=0.0)
    line = RecordingLine()
    model = LoadedModel(runner, "v1", {"particle": 0.5, "crack": 0.5, "fill_level": 0.5})
    pipe = Pipeline(ListSource(_unit("a") + _unit("b") + _unit("c") + _unit("d")), _recipe(batch_max=1),
                    ModelSlot(model), store, line, StationStats(), window_s=0.3, read_timeout_s=0.05)
    pipe.start()
    assert pipe.join(timeout=30)
    store.close()
    sent = {d.container_id: d for d in line.sent}
    assert sent["a"].accept and sent["a"].scores["anomaly"] == 0.2 and sent["a"].thresholds["anomaly"] == 0.6
    assert sent["b"].reasons == ["anomaly"] and not sent["b"].accept
    assert sent["c"].reasons == ["anomaly"] and sent["d"].reasons == ["anomaly"]  # positive release


