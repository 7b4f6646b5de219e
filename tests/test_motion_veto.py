"""The motion veto: objects followed through the frames, the veto's cells, its fit from false rejects, its record
in a package and the runtime applying it."""

from __future__ import annotations

import numpy as np
import pytest

from vialinspect.training.motion_veto_fit import MotionVetoError, VetoUnit, cleared, fit_motion_veto, floor_heights
from vialinspect.vision.motion_veto import MotionVeto, apply_veto
from vialinspect.vision.tracks import follow, level, trace

H, W, K = 320, 160, 4


def _frames(objects, seed=0, static=()):
    """K frames of a lit background with dark dots: ``objects`` are (row, col, v_rows, d_cols) at frame 0,
    moving v_rows down and d_cols sideways a frame; ``static`` dots stay put (marks on the glass)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = []
    for k in range(K):
        f = np.full((H, W), 0.8, np.float32)
        for r, c, v, dc in objects:
            f -= 0.35 * np.exp(-((yy - r - v * k) ** 2 + (xx - c - dc * k) ** 2) / (2 * 1.1 ** 2))
        for r, c in static:
            f -= 0.35 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 1.1 ** 2))
        out.append(np.clip(f + rng.normal(0, 0.01, f.shape).astype(np.float32), 0, 1))
    return np.stack(out)


def _droplets(rng, n=6):
    return [(float(rng.uniform(30, 240)), float(rng.uniform(40, 120)), float(rng.uniform(-0.4, 0.1)),
             float(rng.choice([-1, 1]) * rng.uniform(6, 14))) for _ in range(n)]


def test_follow_measures_vertical_velocity_and_ignores_what_does_not_move():
    frames = _frames([(60, 40, -0.2, 11.0), (120, 120, 6.0, -9.0)], static=[(200, 80)])
    tracks = follow(frames)
    assert len(tracks) == 2
    v = sorted(t.v_rows for t in tracks)
    assert v[0] == pytest.approx(-0.2, abs=0.1) and v[1] == pytest.approx(6.0, abs=0.2)
    assert all(len(t.rows) == K and t.rms < 0.3 for t in tracks)


def test_a_tilted_container_s_swirl_is_levelled_off():
    # 0.6 degrees of tilt: every object moving sideways also moves 0.0105 rows a column; droplets rise 0.1
    rng = np.random.default_rng(3)
    objs = [(float(r), float(rng.uniform(40, 120)), -0.1 + 0.0105 * dc, dc)
            for r, dc in zip(np.linspace(20, 300, 12), rng.choice([-1, 1], 12) * rng.uniform(6, 16, 12),
                             strict=True)]
    tracks = follow(_frames(objs, seed=4))
    assert len(tracks) >= 10
    assert all(abs(t.v_rows + 0.1) < 0.08 for t in tracks)
    assert level(tracks[:3])[1] == 0.0  # too few tracks to tell a tilt


def test_trace_keeps_the_blobs_no_track_took():
    frames = _frames([(60, 40, -0.2, 11.0)])
    frames[2] -= 0.35 * np.exp(-((np.mgrid[0:H, 0:W][0] - 200.0) ** 2 + (np.mgrid[0:H, 0:W][1] - 100.0) ** 2) / 2.4)
    traced = trace(frames)
    assert len(traced.tracks) == 1 and len(traced.unlinked) == 1
    assert traced.unlinked[0][:2] == pytest.approx((200, 100), abs=0.5)


def test_follow_refuses_too_few_frames():
    with pytest.raises(ValueError, match="K >= 3"):
        follow(_frames([(60, 40, 0, 10)])[:2])


def _veto(**kw):
    return MotionVeto(v_low=-2.0, v_high=0.3, pixel_um=40.0, floor_mm={"syringe": 5.0}, **kw)


def test_veto_takes_the_nuisance_off_and_keeps_what_sinks_and_the_floor(monkeypatch):
    # a droplet rising slowly at row 60, a particle sinking at row 150 (beyond the droplet's band), and a
    # droplet-like object on the floor (row 289): only the first one's cells go
    frames = _frames([(60, 40, -0.2, 11.0), (150, 120, 5.0, -9.0), (289, 60, 0.0, 10.0)])
    monkeypatch.setattr(MotionVeto, "floor_row", lambda self, f, px: 290.0)
    pmap = np.zeros((H // 8, W // 8), np.float32)
    pmap[60 // 8, 56 // 8] = 0.9  # the droplet's evidence
    pmap[160 // 8, 110 // 8] = 0.8  # the particle's
    pmap[289 // 8, 70 // 8] = 0.7  # at rest on the floor
    out, info = apply_veto(_veto(), frames, pmap, 8, 40.0)
    assert info["applied"] and info["nuisance_tracks"] >= 1 and info["sinking_tracks"] == 1
    assert out[60 // 8, 56 // 8] == 0.0
    assert out[160 // 8, 110 // 8] == pytest.approx(0.8) and out[289 // 8, 70 // 8] == pytest.approx(0.7)
    assert pmap[60 // 8, 56 // 8] == pytest.approx(0.9)  # the input is not changed


def test_no_container_found_means_no_veto(monkeypatch):
    frames = _frames([(60, 40, -0.2, 11.0)])
    monkeypatch.setattr(MotionVeto, "floor_row", lambda self, f, px: None)
    pmap = np.full((H // 8, W // 8), 0.9, np.float32)
    out, info = apply_veto(_veto(), frames, pmap, 8, 40.0)
    assert not info["applied"] and np.array_equal(out, pmap)


def test_velocities_scale_with_the_pixel_size():
    assert _veto().scaled(20.0) == pytest.approx((-4.0, 0.6))


def test_json_round_trip_and_damaged_records_refused():
    v = _veto(fit={"tracks": 3})
    assert MotionVeto.from_json(v.to_json()) == v
    for bad, match in [({"kind": "other"}, "not a motion_veto"), ({"version": 9}, "version 9"),
                       ({"v_low": 1.0}, "below v_high"), ({"pixel_um": -1.0}, "positive"),
                       ({"floor_mm": {}}, "floor_mm"), ({"band_rows": -1}, "band_rows"),
                       ({"v_high": float("nan")}, "finite")]:
        with pytest.raises(ValueError, match=match):
            MotionVeto.from_json({**v.to_json(), **bad})
    d = v.to_json()
    del d["v_high"]
    with pytest.raises(ValueError, match="lacks v_high"):
        MotionVeto.from_json(d)


def _false_rejects(n, v_range=(-0.4, 0.1), seed=0):
    """Good units whose flagged cells are all droplets (every droplet's cell flagged)."""
    rng = np.random.default_rng(seed)
    units = []
    for i in range(n):
        objs = [(r, c, float(rng.uniform(*v_range)), dc) for r, c, _, dc in _droplets(rng)]
        pmap = np.zeros((H // 8, W // 8), np.float32)
        for r, c, _, _ in objs:
            pmap[int(r) // 8, int(c) // 8] = 0.9
        units.append(VetoUnit(_frames(objs, seed=i), pmap, 8))
    return units


def test_fit_learns_the_nuisance_velocity_and_clears_held_out_false_rejects(monkeypatch):
    monkeypatch.setattr(MotionVeto, "floor_row", lambda self, f, px: 400.0)  # the floor is below the picture
    veto = fit_motion_veto(_false_rejects(24), 0.5, 40.0, {"syringe": 5.0})
    assert -0.7 < veto.v_low < -0.3 and 0.0 < veto.v_high < 0.3
    f = veto.fit
    assert f["false_rejects"] == 24 and f["flagged_for_particle"] == 24 and f["tracks"] >= 100
    assert f["held_out_units"] == 12 and f["held_out_cleared"] >= 9
    # a particle sinking 4 px a frame among the droplets keeps its unit rejected
    unit = _false_rejects(1, seed=5)[0]
    objs = [(100, 80, 4.0, 8.0)]
    frames = _frames(objs, seed=77)
    pmap = np.zeros_like(unit.particle_map)
    pmap[104 // 8, 88 // 8] = 0.9
    assert not cleared(veto, VetoUnit(frames, pmap, 8), 0.5, 40.0)


def test_fit_refuses_too_few_units_and_a_nuisance_that_sinks(monkeypatch):
    monkeypatch.setattr(MotionVeto, "floor_row", lambda self, f, px: 400.0)
    with pytest.raises(MotionVetoError, match="at least 20"):
        fit_motion_veto(_false_rejects(5), 0.5, 40.0, {"syringe": 5.0})
    with pytest.raises(MotionVetoError, match="move like particles"):
        fit_motion_veto(_false_rejects(24, v_range=(2.0, 4.0)), 0.5, 40.0, {"syringe": 5.0})
    with pytest.raises(MotionVetoError, match="no container format"):
        fit_motion_veto(_false_rejects(24), 0.5, 40.0, {})


def test_floor_heights_per_container_kind():
    assert floor_heights(["syringe-1mL", "vial-2R", "unknown"]) == {"syringe": 5.0, "vial": 0.7}
    assert floor_heights([]) == {}


@pytest.mark.parametrize("index", [1, 8, 0])  # the simulator's units 1 (vial-10R), 8 (vial-2R), 0 (syringe-1mL)
def test_floor_row_is_the_liquids_floor(index):
    """On the simulator's own containers the veto's floor is where the liquid meets the glass (the inside of a
    vial's bottom, the top of a syringe's cone), not the lowest point the geometry finds, and never below it:
    a floor placed low would let the veto clear a particle resting on it."""
    from vialinspect.datasets.sim.config import SimConfig
    from vialinspect.datasets.sim.render import framing_for, render
    from vialinspect.datasets.sim.scene import sample_scene

    cfg = SimConfig()
    scene = sample_scene(cfg, index, 0)
    frames = np.stack([f.astype(np.float32) / np.iinfo(f.dtype).max for f in render(scene, cfg.camera).frames])
    fmt, fr = scene.format, framing_for(scene.format, cfg.camera.pixel_um)
    floor = fr.to_px(0.0, fmt.bottom_mm)[1] - scene.pose.dz_mm / fr.mm_per_px  # the pose moves it up by dz
    veto = MotionVeto(v_low=-1.0, v_high=1.0, pixel_um=cfg.camera.pixel_um,
                      floor_mm=floor_heights([fmt.name]))
    got = veto.floor_row(frames, cfg.camera.pixel_um)
    assert got is not None
    # A vial's floor is found to a pixel; a syringe's lies a few pixels above the barrel's start (the geometry
    # measures the shield's top edge), on the safe side.
    assert floor - (6.0 if fmt.kind == "syringe" else 1.5) <= got <= floor + 1.5, (fmt.name, got, floor)


# ---------------------------------------------------------------- retraining fits one; the runtime applies it


@pytest.fixture(scope="module")
def oil_registry(tmp_path_factory):
    """A registry whose current syringe model is the shipped default, 24 good syringes with silicone oil (what QA
    signs as false rejects on an oil line) and 6 qualification syringes."""
    from pathlib import Path

    from vialinspect.datasets.generate import generate
    from vialinspect.datasets.sim.config import SimConfig
    from vialinspect.export.registry import Registry
    from vialinspect.inspection_station.qa import users
    from vialinspect.inspection_station.qa.audit import ReviewDB
    from vialinspect.inspection_station.qa.promotion import promote
    from vialinspect.inspection_station.store import RecordStore

    d = tmp_path_factory.mktemp("veto")
    cfg = SimConfig(formats=("syringe-1mL",), defect_rate=0.0).with_nuisance_rates({"silicone_oil": 1.0})
    generate(d / "reviewed", 24, cfg, seed=11, workers=1)
    generate(d / "qual", 6, SimConfig(formats=("syringe-1mL",), defect_rate=0.5).with_nuisance_rates(
        {"silicone_oil": 0.5}), seed=12, workers=1)
    reg = Registry(d / "reg", create=True)
    version = reg.add(Path(__file__).resolve().parents[1] / "models" / "default", "os:test", "the default")
    RecordStore(d / "store").close()
    users.add_user(ReviewDB(d / "store"), "root", "Rita Admin", "admin", "admin-password-333", actor="os:test")
    promote(d / "store", reg, version, "syringe-1mL", "root", "admin-password-333", "initial model")
    return d, version


def test_retrain_fits_a_motion_veto_that_the_runtime_applies(oil_registry):
    from vialinspect.datasets.imageio import read_gray
    from vialinspect.datasets.reader import open_dataset
    from vialinspect.export.package import load_package, open_runner
    from vialinspect.export.registry import Registry
    from vialinspect.training.retrain import RetrainConfig, retrain

    d, champion = oil_registry
    res = retrain(d / "reviewed", None, d / "reg", d / "qual", d / "work", RetrainConfig(recipe="syringe-1mL"), "test")
    reg = Registry(d / "reg")
    card = reg.card(res.challenger)
    assert card["parent_version"] == champion and card["retraining"]["method"] == "motion-veto"
    fit = card["retraining"]["motion_veto_fit"]
    assert fit["false_rejects"] == 24 and fit["flagged_for_particle"] >= 20 and fit["tracks"] >= 50
    assert (res.reports / "gate.md").is_file()
    chal, champ = load_package(reg.package_dir(res.challenger)), load_package(reg.package_dir(champion))
    veto = chal.motion_veto
    assert veto is not None and veto.v_low < 0 < veto.v_high <= 0.25
    assert chal.onnx_path.read_bytes() == champ.onnx_path.read_bytes() and chal.thresholds == champ.thresholds
    # the same unit through both runners: the veto only takes particle evidence off, and says so
    ds = open_dataset(d / "reviewed")
    frames = [[read_gray(ds.root / f) for f in r.frames] for r in ds.records[:3]]
    plain, vetoed = open_runner(champ, "cpu").predict(frames), open_runner(chal, "cpu").predict(frames)
    for a, b in zip(plain, vetoed, strict=True):
        assert b.probs["particle"] <= a.probs["particle"] and b.probs["crack"] == a.probs["crack"]
        assert (b.maps[0] <= a.maps[0]).all()
    applied = [b.extra["motion_veto"] for b in vetoed if "motion_veto" in b.extra]
    assert applied and all(i["applied"] for i in applied) and sum(i["vetoed_cells"] for i in applied) > 0


def test_retrain_with_a_motion_veto_refuses_too_few_false_rejects(oil_registry, tmp_path):
    from vialinspect.datasets.generate import generate
    from vialinspect.datasets.sim.config import SimConfig
    from vialinspect.training.retrain import RetrainConfig, RetrainError, retrain

    d, _ = oil_registry
    cfg = SimConfig(formats=("syringe-1mL",), defect_rate=0.0).with_nuisance_rates({"silicone_oil": 1.0})
    generate(tmp_path / "few", 4, cfg, seed=13, workers=1)
    with pytest.raises(RetrainError, match="needs at least 20"):
        retrain(tmp_path / "few", None, d / "reg", d / "qual", tmp_path / "work", RetrainConfig(recipe="syringe-1mL"),
                "test")
    with pytest.raises(RetrainError, match="needs the base training data"):
        retrain(tmp_path / "few", None, d / "reg", d / "qual", tmp_path / "work2",
                RetrainConfig(recipe="syringe-1mL", method="fine-tune"), "test")


def test_cli_fine_tune_without_base_data_is_refused_in_one_line(tmp_path, capsys):
    from vialinspect.cli import main

    rc = main(["retrain", "--method", "fine-tune", "--store", str(tmp_path / "store"), "--registry",
               str(tmp_path / "reg"), "--qualification", str(tmp_path / "q"), "--recipe", "syringe-1mL"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--method fine-tune needs --base-data" in err and "Traceback" not in err


def test_a_champion_s_own_veto_is_widened_not_replaced(oil_registry, tmp_path):
    from pathlib import Path

    from vialinspect.export.package import load_package, with_motion_veto
    from vialinspect.export.registry import Registry
    from vialinspect.inspection_station.qa import users
    from vialinspect.inspection_station.qa.audit import ReviewDB
    from vialinspect.inspection_station.qa.promotion import promote
    from vialinspect.inspection_station.store import RecordStore
    from vialinspect.training.retrain import RetrainConfig, retrain

    d, _ = oil_registry
    default = load_package(Path(__file__).resolve().parents[1] / "models" / "default")
    old = MotionVeto(v_low=-9.0, v_high=-8.0, pixel_um=40.0, floor_mm={"syringe": 5.0})  # fast-rising only
    pkg = with_motion_veto(default, old.to_json(), tmp_path / "with_veto", "an earlier nuisance")
    reg = Registry(tmp_path / "reg", create=True)
    version = reg.add(pkg.path, "os:test", "default with an earlier veto")
    RecordStore(tmp_path / "store").close()
    users.add_user(ReviewDB(tmp_path / "store"), "root", "Rita Admin", "admin", "admin-password-333", actor="os:test")
    promote(tmp_path / "store", reg, version, "syringe-1mL", "root", "admin-password-333", "initial model")
    lines: list[str] = []
    res = retrain(d / "reviewed", None, reg, d / "qual", tmp_path / "work", RetrainConfig(recipe="syringe-1mL"),
                  "test", log=lines.append)
    veto = load_package(reg.package_dir(res.challenger)).motion_veto
    assert veto.v_low == -9.0 and veto.v_high > 0 and veto.fit["widened_from"] == [-9.0, -8.0]
    assert any("widened" in ln for ln in lines)
