"""The fill gauge referenced to a line's good units (vision/fill_gauge.py): fit, read, store, and where it decides."""

import json

import numpy as np
import pytest

from vialinspect.datasets.generate import make_container
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.vision.classical import measure_geometry
from vialinspect.vision.fill_gauge import (
    MIN_GROUP,
    FillGauge,
    FillGaugeError,
    apply_reading,
    fit_fill_gauge,
    measure_all,
)
from vialinspect.vision.scores import Scores

CAMERA = CameraConfig(pixel_um=70.0)  # not the simulator's 40 µm/px: the gauge knows no pixel scale


def _unit(fmt: str, index: int, fill: bool = False) -> list[np.ndarray]:
    cfg = SimConfig(formats=(fmt,), frames=1, defect_rate=1.0 if fill else 0.0, camera=CAMERA,
                    class_weights=(0.0, 0.0, 1.0) if fill else (1.0, 1.0, 1.0)).with_nuisance_rates({})
    rec, frames, _ = make_container(cfg, index, seed=11)
    assert rec.classes == (["fill_level"] if fill else [])
    return frames


@pytest.fixture(scope="module")
def line():
    """Good units of two formats under one camera, and a few fill-level defects of each."""
    good = {f: [_unit(f, i) for i in range(MIN_GROUP + 4)] for f in ("vial-2R", "syringe-1mL")}
    bad = {f: [_unit(f, 100 + i, fill=True) for i in range(3)] for f in ("vial-2R", "syringe-1mL")}
    return good, bad


def test_each_format_gets_its_own_reference_and_fill_defects_stand_out(line):
    good, bad = line
    gauge = fit_fill_gauge(measure_all(u for us in good.values() for u in us))
    assert len(gauge.groups) == 2 and {g.kind for g in gauge.groups} == {"vial", "syringe"}
    good_p = [gauge.read(u).probability for us in good.values() for u in us]
    bad_p = [gauge.read(u).probability for us in bad.values() for u in us]
    assert max(good_p) < min(bad_p), (sorted(good_p)[-3:], sorted(bad_p)[:3])
    r = gauge.read(bad["vial-2R"][0])
    assert r.problem is None and r.deviation > 6 and r.group is not None
    assert gauge.groups[r.group].kind == "vial"


def test_positive_release_when_the_unit_cannot_be_measured_or_matches_no_reference(line, monkeypatch):
    good, _ = line
    gauge = fit_fill_gauge(measure_all(good["vial-2R"]))
    blank = gauge.read([np.full((400, 200), 220, np.uint8)])
    assert blank.probability == 1.0 and blank.problem
    other = gauge.read(good["syringe-1mL"][0])  # a format the line's good units did not show
    assert other.probability == 1.0 and "unlike" in other.problem
    # Any other failure of the measurement (here an OpenCV error) is a rejected reading, not an exception that
    # would leave the station's batch undecided.
    import cv2

    import vialinspect.vision.fill_gauge as fg

    def broken(frames):
        raise cv2.error("simulated OpenCV failure")

    monkeypatch.setattr(fg, "measure_geometry", broken)
    odd = gauge.read(good["vial-2R"][0])
    assert odd.probability == 1.0 and "error" in odd.problem


def test_a_container_lying_on_its_side_is_not_measured_nor_read(line, tmp_path):
    """A syringe on rollers or a rotated photograph: the rows of a container lying down are not its height, and a
    syringe's finger flange can even pass for its barrel; the geometry refuses it, the gauge makes no reference
    of such units and reads one as unmeasurable (positive release), and the classical inspector rejects it."""
    import cv2

    from vialinspect.vision.classical import ClassicalInspector

    good, _ = line
    lying = {f: [[cv2.rotate(fr, cv2.ROTATE_90_CLOCKWISE) for fr in u] for u in us] for f, us in good.items()}
    for f, units in lying.items():
        with pytest.raises(ValueError, match="no upright container found"):
            measure_geometry(units[0])
        measure_geometry(good[f][0])  # the same unit standing is measured
        assert measure_all(units) == [None] * len(units)
        with pytest.raises(FillGaugeError, match="no container geometry shared"):
            fit_fill_gauge(measure_all(units))
    gauge = fit_fill_gauge(measure_all(good["syringe-1mL"]))
    r = gauge.read(lying["syringe-1mL"][0])
    assert r.probability == 1.0 and "no upright container" in r.problem
    s = ClassicalInspector().score(lying["vial-2R"][0])
    assert set(s.probs.values()) == {1.0} and "no upright container" in s.extra["error"]
    # training says why the gauge is not used, so that the user learns what about the images keeps it out
    from vialinspect.datasets.records import ContainerRecord
    from vialinspect.training.fill_fit import fit_line_gauge

    recs = []
    for i, u in enumerate(lying["vial-2R"]):
        cv2.imwrite(str(tmp_path / f"{i}.png"), u[0])
        recs.append(ContainerRecord(id=f"good/{i}.png", frames=[f"{i}.png"]))
    lines = []
    assert fit_line_gauge(tmp_path, recs, lines.append) is None
    assert "fill gauge: not used" in lines[0] and "e.g. good/0.png: no upright container found" in lines[0]


def test_too_few_good_units_make_no_reference(line):
    good, _ = line
    with pytest.raises(FillGaugeError, match="no container geometry shared"):
        fit_fill_gauge(measure_all(good["vial-2R"][:MIN_GROUP - 1]) + [None])


def test_round_trip_and_malformed_gauges_are_refused(line):
    good, bad = line
    gauge = fit_fill_gauge(measure_all(good["vial-2R"]))
    again = FillGauge.from_json(json.loads(json.dumps(gauge.to_json())))
    assert again == gauge
    assert again.read(bad["vial-2R"][1]) == gauge.read(bad["vial-2R"][1])
    for broken, msg in (([], "must be a table"), ({"method": "x"}, "unknown"),
                        ({"method": "geometry-v1", "groups": []}, "non-empty"),
                        ({"method": "geometry-v1", "groups": [{"kind": "vial"}]}, "groups\\[0\\]"),
                        ({"method": "geometry-v1", "groups": ["vial"]}, "groups\\[0\\]"),
                        ({"method": "geometry-v1", "groups": [{**gauge.to_json()["groups"][0], "scale_px": 0}]},
                         "positive")):
        with pytest.raises(FillGaugeError, match=msg):
            FillGauge.from_json(broken)


def test_the_reading_replaces_the_network_fill_level_and_keeps_it_for_the_record(line):
    good, bad = line
    gauge = fit_fill_gauge(measure_all(good["vial-2R"]))
    s = Scores(probs={"particle": 0.1, "crack": 0.2, "fill_level": 0.05})
    out = apply_reading(s, gauge.read(bad["vial-2R"][0]))
    assert out.probs["fill_level"] > 0.5 and out.extra["network_fill_level"] == 0.05
    assert out.probs["particle"] == 0.1 and s.probs["fill_level"] == 0.05  # the input is not changed
    assert out.extra["fill_gauge"]["deviation"] > 6


def test_geometry_needs_no_pixel_scale_or_format(line):
    good, _ = line
    g = measure_geometry(good["vial-2R"][0])
    assert g.kind == "vial" and g.fill_px and g.fill_px > 20 and g.outer_width_px > 100


def test_the_station_decides_the_fill_level_by_the_package_gauge(line, tmp_path):
    from vialinspect.inspection_station.pipeline import LoadedModel, ModelSlot, Pipeline
    from vialinspect.inspection_station.stats import StationStats
    from vialinspect.inspection_station.store import RecordStore

    from .test_station import FakeRunner, K, ListSource, RecordingLine, _recipe

    good, bad = line
    gauge = fit_fill_gauge(measure_all(good["vial-2R"]))
    units = [good["vial-2R"][0], bad["vial-2R"][0], [np.full_like(good["vial-2R"][0][0], 230)]]
    h, w = units[0][0].shape
    script = [(0.0, f"u{j}", i, u[0], None) for j, u in enumerate(units) for i in range(K)]
    store = RecordStore(tmp_path / "store", min_free_mb=0.0)
    line_out = RecordingLine()
    model = LoadedModel(FakeRunner(), "v1", {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}, fill_gauge=gauge)
    pipe = Pipeline(ListSource(script), _recipe(frame_size=[w, h]), ModelSlot(model), store, line_out,
                    StationStats(), window_s=0.3, read_timeout_s=0.05)
    pipe.start()
    assert pipe.join(timeout=30)
    store.close()
    sent = line_out.sent
    # The fake network says fill level 0.0 and 13.7 mm for every unit; the gauge decides: the good unit passes,
    # the fill-level defect and the blank frame (nothing measured: positive release) are rejected for it.
    assert [d.reasons for d in sent] == [[], ["fill_level"], ["fill_level"]]
    assert sent[0].fill_height_mm is None and 0 < sent[0].scores["fill_level"] < 0.5


def test_training_on_image_level_data_fits_the_gauge_and_evaluate_reports_it(tiny_run, tmp_path, monkeypatch,
                                                                             capsys):
    import cv2

    from vialinspect.cli import main
    from vialinspect.training.checkpoint import load_checkpoint
    from vialinspect.training.trainer import train

    from .conftest import small_config

    cam = CameraConfig(pixel_um=120.0)  # tiny images, as tiny_run was trained on
    root = tmp_path / "line"
    for cls, n, fill in (("good", 40, False), ("fill_level", 8, True)):
        cfg = SimConfig(formats=("vial-2R",), frames=1, defect_rate=1.0 if fill else 0.0, camera=cam,
                        class_weights=(0.0, 0.0, 1.0) if fill else (1.0, 1.0, 1.0)).with_nuisance_rates({})
        (root / cls).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / cls / f"{cls}{i:02d}.png"), make_container(cfg, i, seed=5)[1][0])
    import vialinspect.training.trainer as trainer

    seen = []

    def load(init):
        seen.append(init)
        raise trainer.TrainingError("stop before training")

    with monkeypatch.context() as mp:
        mp.setattr(trainer, "_load_init", load)
        with pytest.raises(trainer.TrainingError, match="stop before training"):
            train(root, tmp_path / "auto", small_config(epochs=1), init="auto", progress=False, log=lambda *a: None)
    assert seen == ["builtin:still"]  # the gauge measures the fill level: start from the still-image model
    logs: list[str] = []
    train(root, tmp_path / "run", small_config(epochs=1), init=str(tiny_run / "best.pt"), progress=False,
          log=logs.append)
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    assert FillGauge.from_json(ck["fill_gauge"]).groups[0].kind == "vial"
    assert ck["calibration"]["fill_gauge"]["used"] is True
    assert any(line.startswith("fill level decided by the fill gauge") for line in logs), logs
    # Off: the network decides, and the checkpoint carries no gauge.
    train(root, tmp_path / "off", small_config(epochs=1, fill_gauge="off"), init=str(tiny_run / "best.pt"),
          progress=False, log=lambda *a: None)
    assert "fill_gauge" not in load_checkpoint(tmp_path / "off" / "best.pt")
    assert main(["evaluate", "--model", str(tmp_path / "run" / "best.pt"), "--data", str(root), "--out",
                 str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["fill_gauge"]["decides_fill_level"] is True, rep["fill_gauge"]
    assert {p["fill_level_threshold"] for p in rep["operating_points"]} == {"gauge edge"}
    # At 120 µm/px a vial-2R is ~180 px tall: the meniscus is missed in a few units (rejected, positive release).
    assert rep["fill_gauge"]["n_unmeasured"] <= 4, rep["fill_gauge"]
    # The exported package carries the gauge, says so, and ONNX Runtime's scores get it as the checkpoint's did.
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "pkg"),
                 "--parity-data", str(root)]) == 0
    from vialinspect.export.package import load_package

    assert load_package(tmp_path / "pkg").fill_gauge == FillGauge.from_json(ck["fill_gauge"])
    capsys.readouterr()
    assert main(["package", "show", str(tmp_path / "pkg")]) == 0
    assert "fill level   fill gauge (1 container geometry" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tmp_path / "pkg"), "--data", str(root), "--out",
                 str(tmp_path / "rep2")]) == 0
    rep2 = json.loads((tmp_path / "rep2" / "report.json").read_text())
    assert rep2["fill_gauge"]["n_unmeasured"] == rep["fill_gauge"]["n_unmeasured"]
    assert rep2["classes"]["fill_level"]["auroc"] == rep["classes"]["fill_level"]["auroc"]
    assert rep["classes"]["fill_level"]["auroc"] >= 0.95, rep["classes"]["fill_level"]
    # Calibrated on the line's units, the gauge's threshold sits at the edge of the good units it measured and
    # takes only what that costs; the command says each class's share.
    capsys.readouterr()
    assert main(["package", "calibrate", str(tmp_path / "pkg"), "--data", str(root), "--split", "all", "--frr",
                 "0.1", "--out", str(tmp_path / "pkg2"), "--reason", "the line's units"]) == 0
    assert "of the budget" in capsys.readouterr().out
    new = load_package(tmp_path / "pkg2")
    shares, th = new.metadata["calibration"]["shares"], new.thresholds
    assert shares["fill_level"] < shares["particle"] == shares["crack"]
    assert sum(shares.values()) == pytest.approx(0.1)
    from vialinspect.training.evaluate import evaluate_model

    _, recs, scores = evaluate_model(str(tmp_path / "pkg"), root, None, split="all")
    good_fill = [s.probs["fill_level"] for r, s in zip(recs, scores, strict=True)
                 if r.is_good and not s.extra["fill_gauge"].get("problem")]
    assert len(good_fill) >= 30 and max(good_fill) < th["fill_level"] < max(good_fill) + 2e-4


def test_the_gauge_threshold_comes_from_the_line_good_units_not_the_small_validation_split():
    from vialinspect.datasets.records import ContainerRecord
    from vialinspect.training.calibrate import calibrate

    good_train = np.linspace(0.0, 0.5, 1001)  # the gauge's scores of 1,001 good training units
    recs = [ContainerRecord(id=f"g{i}", frames=["x.png"], classes=[], split="val") for i in range(50)]
    scores = [Scores(probs={"particle": 0.1, "crack": 0.1, "fill_level": 0.99 if i == 0 else 0.1}) for i in range(50)]
    cal = calibrate(recs, scores, 0.03, fill_good_scores=good_train)
    # Just above the highest good training unit, which costs 1/1,002 of the budget; the rest is the network's.
    assert 0.5 < cal["thresholds"]["fill_level"] < 0.5002
    assert cal["shares"]["fill_level"] == pytest.approx(1 / 1002)
    assert cal["shares"]["particle"] == cal["shares"]["crack"] == pytest.approx((0.03 - 1 / 1002) / 2)
    # the validation split alone would have put it above its one high good unit
    assert calibrate(recs, scores, 0.03)["thresholds"]["fill_level"] > 0.99


def test_a_unit_with_its_bottom_out_of_view_is_read_by_its_headspace(line):
    good, bad = line
    gauge = fit_fill_gauge(measure_all(good["vial-2R"]))
    assert gauge.groups[0].head_median_px is not None

    def cut(frames):  # the picture ends inside the bottom glass: the lowest point is out of view
        row = int(measure_geometry(frames).zero_row) - 3
        return [f[:row] for f in frames]

    g = measure_geometry(cut(good["vial-2R"][1]))
    assert g.fill_px is None and g.headspace_px is not None
    ok, off = gauge.read(cut(good["vial-2R"][1])), gauge.read(cut(bad["vial-2R"][2]))
    assert ok.problem is None and ok.deviation < 4
    assert off.problem is None and off.deviation > 6


def test_spin_stop_sequences_start_from_the_default_model(tmp_path, monkeypatch):
    """A line's units of several frames (one folder per unit) keep the motion branch: --init auto starts from the
    shipped default model even where the fill gauge fits (the still-image model has no motion branch)."""
    import cv2

    import vialinspect.training.trainer as trainer
    from vialinspect.training.trainer import train

    from .conftest import small_config

    cam = CameraConfig(pixel_um=120.0)
    cfg = SimConfig(formats=("vial-2R",), frames=3, defect_rate=0.0, camera=cam).with_nuisance_rates({})
    for i in range(30):
        unit = tmp_path / "line" / "good" / f"u{i:02d}"
        unit.mkdir(parents=True)
        for k, img in enumerate(make_container(cfg, i, seed=5)[1]):
            cv2.imwrite(str(unit / f"f{k}.png"), img)
    seen, logs = [], []

    def load(init):
        seen.append(init)
        raise trainer.TrainingError("stop before training")

    monkeypatch.setattr(trainer, "_load_init", load)
    with pytest.raises(trainer.TrainingError, match="stop before training"):
        train(tmp_path / "line", tmp_path / "auto", small_config(epochs=1), init="auto", progress=False,
              log=logs.append)
    assert seen == ["builtin:default"]
    assert any("K=3" in line for line in logs) and any(line.startswith("fill gauge:") for line in logs), logs


def _drawn_vial(fill_row: int, base_level: float, rng: np.random.Generator) -> np.ndarray:
    """A back-lit vial drawn by hand, not by the simulator: dark walls, a dark crimp cap at the top, a base of
    ``base_level`` of the light, a liquid surface band at ``fill_row``; 700 x 300 px, 8-bit."""
    img = np.full((700, 300), 0.85)
    img[60:680, 40:260] *= 0.95  # glass
    img[60:680, 40:48] = img[60:680, 252:260] = 0.2  # walls seen edge-on
    img[15:90, 90:210] = 0.06  # crimp cap over the neck
    img[60:90, 40:260] = np.where(img[60:90, 40:260] == 0.06, 0.06, 0.2)  # shoulder walls
    img[fill_row:668, 48:252] *= 0.93  # liquid
    img[fill_row - 2:fill_row + 4, 48:252] *= 0.42  # the surface band
    img[668:680, 40:260] = 0.85 * base_level  # base seen edge-on
    img += rng.normal(0, 0.01, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("base_level", [0.1, 0.35])
def test_a_grey_base_is_still_the_bottom_not_the_cap_above(base_level):
    """A base lighter than the dark level (a diffuse back light) left the crimp cap as the lowest dark run: the
    'bottom' was then measured at the cap and the unit called a syringe. The bottom is where the silhouette ends,
    whatever grey the base is."""
    rng = np.random.default_rng(3)
    g = measure_geometry([_drawn_vial(400, base_level, rng)])
    assert g.kind == "vial"
    assert abs(g.zero_row - 680) <= 1.5
    assert abs(g.meniscus_row - 401) <= 2
    low = measure_geometry([_drawn_vial(440, base_level, rng)])
    assert abs((g.fill_px - low.fill_px) - 40) <= 1.5


def test_formats_of_one_height_and_another_width_get_their_own_reference():
    """A 1 mL long and a 2.25 mL syringe (or an 8R and a 10R vial) stand about as tall under one camera and hold
    different liquid columns: one shared reference would widen the spread until fill defects hide in it (seen on
    a syringe line drawn by benchmarks/foreign_world.py, fx66s: fill level 0.76 at 2% false rejects)."""
    from vialinspect.vision.classical import Geometry

    rng = np.random.default_rng(4)

    def unit(width: float, height: int, column: float) -> Geometry:
        top = 12 + int(rng.integers(-2, 3))
        zero = top + height - 250 + rng.normal(0, 1)
        return Geometry("syringe", width + rng.normal(0, 0.5), (top, top + height - 1), zero,
                        zero - column + rng.normal(0, 1.5))

    slim = [unit(123, 1094, 515) for _ in range(MIN_GROUP + 10)]
    wide = [unit(163, 1034, 450) for _ in range(MIN_GROUP + 10)]  # 5.5% shorter: within the height tolerance
    gauge = fit_fill_gauge(slim + wide)
    assert gauge.method == "geometry-v1"  # one camera: heights spread by a few pixels
    assert sorted(round(g.width_px) for g in gauge.groups) == [123, 163]
    for w, h, col in ((123, 1094, 515), (163, 1034, 450)):
        assert gauge.read_geometry(unit(w, h, col)).deviation < 4
        low = gauge.read_geometry(unit(w, h, col * 0.88))  # 12% short: a fill-level defect
        assert low.deviation > 6 and gauge.groups[low.group].width_px == pytest.approx(w, abs=2)


def test_a_scale_that_varies_by_image_is_read_against_each_unit_s_own_size(line):
    """Photographed at 60-75 µm/px, one format's silhouette spans 25% of heights, and a column in pixels says
    nothing (fx68's units each resized by U(0.8, 1.0): fill level 0.59 at 2% false rejects by the pixel gauge).
    The fit sees the spread in the good units, groups them by shape and reads columns at the group's scale."""
    import cv2

    good, bad = line
    rng = np.random.default_rng(5)

    def zoomed(frames):
        f = float(rng.uniform(0.8, 1.0))
        return [cv2.resize(x, None, fx=f, fy=f, interpolation=cv2.INTER_AREA) for x in frames]

    units = [zoomed(u) for us in good.values() for u in us for _ in range(2)]
    gauge = fit_fill_gauge(measure_all(units))
    assert gauge.method == "geometry-v2" and gauge.per_image_scale
    assert sorted(g.kind for g in gauge.groups) == ["syringe", "vial"]
    good_p = [gauge.read(zoomed(u)).probability for us in good.values() for u in us]
    bad_p = [gauge.read(zoomed(u)).probability for us in bad.values() for u in us]
    assert max(good_p) < min(bad_p), (sorted(good_p)[-3:], sorted(bad_p)[:3])
    again = FillGauge.from_json(json.loads(json.dumps(gauge.to_json())))
    assert again == gauge and again.per_image_scale
    # Under one camera the same units keep the pixel gauge.
    assert fit_fill_gauge(measure_all(u for us in good.values() for u in us)).method == "geometry-v1"


def test_by_shape_two_formats_keep_their_own_references_and_a_short_fill_stands_out(monkeypatch):
    import vialinspect.vision.fill_gauge as fg
    from vialinspect.vision.classical import Geometry

    rng = np.random.default_rng(6)

    def unit(width: float, height: int, column: float, s: float) -> Geometry:
        top = 12 + rng.normal(0, 2)
        zero = top + (height - 40) * s + rng.normal(0, 1)
        return Geometry("vial", width * s + rng.normal(0, 0.5), (top, top + height * s - 1), zero,
                        zero - column * s + rng.normal(0, 1.5))

    shapes = ((236, 692, 254), (300, 820, 343))  # a 2R-like and a 6R-like vial: aspect 0.341 and 0.366
    units = [unit(*sh, rng.uniform(0.8, 1.0)) for sh in shapes for _ in range(MIN_GROUP + 20)]
    gauge = fit_fill_gauge(units)
    assert gauge.per_image_scale and len(gauge.groups) == 2
    for sh in shapes:
        for s in (0.8, 0.9, 1.0):
            ok = gauge.read_geometry(unit(*sh, s))
            assert ok.deviation < 4, (sh, s, ok)
            low = gauge.read_geometry(unit(sh[0], sh[1], sh[2] * 0.9, s))  # 10% short: a fill-level defect
            assert low.deviation > 6 and gauge.groups[low.group].width_px / gauge.groups[low.group].height_px \
                == pytest.approx(sh[0] / sh[1], rel=0.03)
    # Fitted and read in pixels (as the gauge did before): the 25% spread of scale hides the defects among the
    # good units.
    monkeypatch.setattr(fg, "SCALE_VARIES", float("inf"))
    pixel = fit_fill_gauge(units)
    assert pixel.method == "geometry-v1"
    ok = [pixel.read_geometry(unit(*sh, rng.uniform(0.8, 1.0))).probability for sh in shapes for _ in range(20)]
    low = [pixel.read_geometry(unit(sh[0], sh[1], sh[2] * 0.9, rng.uniform(0.8, 1.0))).probability
           for sh in shapes for _ in range(20)]
    assert max(ok) > min(low)


def test_evaluate_names_the_good_units_the_gauge_measured_far_beyond_the_others(monkeypatch, capsys):
    """evaluate's fill gauge report lists the good units beyond the gauge's fence (rejected at every threshold it
    sets), and the command prints them, so that a leaning container in a test folder is looked at."""
    import vialinspect.training.evaluate as ev
    from vialinspect.cli import main
    from vialinspect.datasets.records import ContainerRecord
    from vialinspect.training.evaluate import fill_gauge_report
    from vialinspect.vision.fill_gauge import FillGauge, FillGroup

    gauge = FillGauge((FillGroup("vial", 300.0, 800.0, 350.0, 2.0, 100),), n_measured=100)
    recs, scores = [], []
    for i in range(60):
        f = 0.826 if i == 7 else 0.3 * i / 60
        problem = {"problem": "meniscus not found"} if i == 9 else {}
        recs.append(ContainerRecord(id=f"g{i}", frames=["x"], classes=[] if i < 50 else ["fill_level"]))
        scores.append(Scores(probs={"particle": 0.1, "crack": 0.1, "fill_level": 1.0 if problem else f},
                             extra={"fill_gauge": {"probability": f, **problem}}))
    rep = fill_gauge_report(recs, scores, gauge)
    assert rep["n_good_beyond_fence"] == 1 and rep["good_beyond_fence"] == [{"id": "g7", "fill_score": 0.826}]
    assert rep["n_unmeasured"] == 1  # the unit it could not measure is not counted again
    recs[7] = ContainerRecord(id="g7", frames=["x"], classes=["fill_level"])  # a real fill defect is not listed
    assert fill_gauge_report(recs, scores, gauge)["n_good_beyond_fence"] == 0

    def fake(*a, **k):
        return ({"n_containers": 60, "false_reject_rate": 0.02, "classes": {}, "fill_gauge": rep}, [], [])

    monkeypatch.setattr(ev, "evaluate_model", fake)
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: None)
    capsys.readouterr()
    assert main(["evaluate", "--model", "m", "--data", "d", "--out", "o"]) == 0
    assert "1 good unit(s) measured far beyond the others" in capsys.readouterr().out
