"""The out-of-domain guard: fitted on a lot, it leaves units of that kind alone and flags units of another camera,
exposure or orientation; stations turn flagged units away as not_inspected:out_of_domain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vialinspect.datasets.generate import generate, make_container
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.export.package import PackageError, load_package
from vialinspect.vision.domain import N_FEATURES, DomainModel, describe, fit_domain

from .test_registry import packages  # noqa: F401 - the module's package fixture (the tiny exported model)

CFG = SimConfig(frames=2, formats=("vial-2R",), camera=CameraConfig(pixel_um=120.0))


def _units(cfg, n, seed):
    return [list(make_container(cfg, i, seed)[1]) for i in range(n)]


@pytest.fixture(scope="module")
def fitted():
    units = _units(CFG, 90, 31)
    return fit_domain(np.array([describe(u) for u in units]), [u[0].shape[:2] for u in units])


def test_descriptor_has_one_length_for_any_size_depth_and_colour():
    px = _units(CFG, 1, 1)[0]
    assert describe(px).shape == (N_FEATURES,)
    big = [np.repeat(np.repeat(f, 2, 0), 2, 1) for f in px]
    assert describe(big).shape == describe([(f.astype(np.uint16) * 257) for f in px]).shape == (N_FEATURES,)
    assert describe([np.dstack([f, f, f]) for f in px]).shape == (N_FEATURES,)


def test_units_of_the_fitted_kind_pass_and_foreign_ones_are_flagged(fitted):
    held_out = _units(CFG, 30, 32)
    assert not any(fitted.out_of_domain(u)[0] for u in held_out)
    other_camera = _units(SimConfig(frames=2, formats=("vial-2R",), camera=CameraConfig(pixel_um=100.0)), 5, 33)
    assert all(fitted.out_of_domain(u) == (True, float("inf")) for u in other_camera)  # another frame size
    assert all(fitted.out_of_domain([f[::-1].copy() for f in u])[0] for u in held_out[:10])  # upside down
    assert all(fitted.out_of_domain([(f * 0.4).astype(f.dtype) for f in u])[0] for u in held_out[:10])  # dark
    assert fitted.out_of_domain([np.zeros((0, 0), np.uint8)] * 2)[0]  # unreadable: flagged, never passed


def test_domain_model_round_trips_and_bad_ones_are_refused(fitted, tmp_path):
    again = DomainModel.from_json(json.loads(json.dumps(fitted.to_json())))
    u = _units(CFG, 1, 40)[0]
    (f1, d1), (f2, d2) = again.out_of_domain(u), fitted.out_of_domain(u)
    assert f1 == f2 and d1 == pytest.approx(d2, rel=1e-6)  # stored to 9 decimals
    with pytest.raises(ValueError, match="too few"):
        fit_domain(np.zeros((10, N_FEATURES)), [(1, 1)] * 10)
    bad = fitted.to_json()
    bad["threshold"] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        DomainModel.from_json(bad)


def test_fit_domain_command_writes_a_package_that_evaluate_and_the_station_use(packages, tmp_path,  # noqa: F811
                                                                                capsys):
    from vialinspect.cli import main

    from .test_station import _unit

    lot = tmp_path / "lot"
    generate(lot, 72, SimConfig(frames=2, defect_rate=0.5, formats=("vial-2R",), camera=CameraConfig(pixel_um=120.0)),
             seed=35, workers=1)
    out = tmp_path / "guarded"
    assert main(["package", "fit-domain", str(packages / "a"), "--data", str(lot), "--out", str(out),
                 "--reason", "test lot"]) == 0
    pkg = load_package(out)
    assert pkg.domain is not None and pkg.metadata["parent_version"] == load_package(packages / "a").version_id
    assert pkg.onnx_path.read_bytes() == load_package(packages / "a").onnx_path.read_bytes()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(lot), "--split", "all", "--out",
                 str(tmp_path / "rep")]) == 0
    assert "out of domain: 0 of 72 units" in capsys.readouterr().out
    other = tmp_path / "other_camera"  # another pixel scale: every unit is turned away
    generate(other, 4, SimConfig(frames=2, formats=("vial-2R",), camera=CameraConfig(pixel_um=100.0)), seed=36,
             workers=1)
    assert main(["evaluate", "--model", str(out), "--data", str(other), "--split", "all", "--out",
                 str(tmp_path / "rep2")]) == 0
    assert "out of domain: 4 of 4 units (100.0%)" in capsys.readouterr().out
    assert json.loads((tmp_path / "rep2" / "report.json").read_text())["out_of_domain"]["n"] == 4
    # A damaged guard makes the package unusable, never silently unguarded.
    meta = json.loads((out / "model.json").read_text())
    meta["domain"]["means"] = "nonsense"
    from vialinspect.export.package import write_package

    with pytest.raises(PackageError, match="domain"):
        write_package(tmp_path / "bad", pkg.onnx_path.read_bytes(), meta)
    # On the station: units unlike the lot (flat grey test frames) are not decided; without a guard they are.
    assert [d.accept for d in _station(_unit("a") + _unit("b"), tmp_path / "s1", None)] == [True, True]
    sent = _station(_unit("c") + _unit("d"), tmp_path / "s2", pkg.domain)
    assert [d.reasons for d in sent] == [["not_inspected:out_of_domain"]] * 2 and not any(d.accept for d in sent)


def _station(script, tmp_path, domain):
    from vialinspect.inspection_station.pipeline import LoadedModel, ModelSlot, Pipeline
    from vialinspect.inspection_station.stats import StationStats
    from vialinspect.inspection_station.store import RecordStore

    from .test_station import FakeRunner, ListSource, RecordingLine, _recipe

    store = RecordStore(tmp_path / "store", min_free_mb=0.0)
    line = RecordingLine()
    model = LoadedModel(FakeRunner(), "v1", {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}, domain=domain)
    pipe = Pipeline(ListSource(script), _recipe(), ModelSlot(model), store, line, StationStats(), window_s=0.3,
                    read_timeout_s=0.05)
    pipe.start()
    assert pipe.join(timeout=30)
    store.close()
    return line.sent
