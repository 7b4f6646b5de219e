"""The ``lot_code`` nuisance: an inkjet lot code on the vial body, off by default, switched on from outside."""

from dataclasses import replace

import numpy as np
import pytest

from vialinspect.datasets.sim.config import SimConfig, parse_nuisance_rates
from vialinspect.datasets.sim.render import render
from vialinspect.datasets.sim.scene import sample_scene
from vialinspect.inspection_station.sources import SourceError, open_source

VIALS = SimConfig(formats=("vial-2R", "vial-10R"), frames=3, defect_rate=0.0)


def _lot_codes(scene):
    return [m for m in scene.marks if m.kind == "lot_code"]


def test_lot_code_on_vials_is_a_static_dark_nuisance():
    cfg = VIALS.with_nuisance_rates({"lot_code": 1.0})
    for i in range(3):
        scene = sample_scene(cfg, i, 7)
        (code,) = _lot_codes(scene)
        assert "lot_code" in scene.nuisance_tags and scene.classes == []
        assert 6 <= len(code.points_mm) <= 24 and 0.15 <= code.size_mm <= 0.4
        ro = scene.format.outer_radius_mm
        assert all(abs(x) <= 0.6 * ro + 0.1 for x, _ in code.points_mm)
        out = render(scene, cfg.camera)
        assert not out.mask.any() and not out.defects
        (ann,) = [a for a in out.nuisances if a.cls == "lot_code"]
        assert ann.mask_value == 0 and ann.frame_bboxes[0] is not None
        assert len(set(ann.frame_bboxes)) == 1, "the lot code moved between frames"
        x0, y0, x1, y1 = ann.frame_bboxes[0]
        frames = [f[y0:y1, x0:x1].astype(np.float32) for f in out.frames]
        assert np.abs(frames[0] - frames[-1]).mean() < 4.0  # only noise and flicker between frames
        # The same scene without the code: the dots darken the glass clearly, like dust or a bit more.
        bare = render(replace(scene, marks=tuple(m for m in scene.marks if m.kind != "lot_code")), cfg.camera)
        darker = bare.frames[0][y0:y1, x0:x1].astype(np.float32) - frames[0]
        assert darker.max() > 60 and darker.mean() > 8
        outside = np.abs(bare.frames[0].astype(np.float32) - out.frames[0])
        outside[max(y0 - 6, 0):y1 + 6, max(x0 - 6, 0):x1 + 6] = 0
        assert outside.max() == 0


def test_lot_code_changes_nothing_else_of_the_scene():
    on = VIALS.with_nuisance_rates({"lot_code": 1.0})
    a, b = sample_scene(VIALS, 4, 2), sample_scene(on, 4, 2)
    assert replace(b, marks=tuple(m for m in b.marks if m.kind != "lot_code")) == a


def test_no_lot_code_on_syringes_or_at_rate_zero():
    syringes = SimConfig(formats=("syringe-1mL",), frames=1).with_nuisance_rates({"lot_code": 1.0})
    zero = VIALS.with_nuisance_rates({"lot_code": 0.0})
    for i in range(5):
        assert not _lot_codes(sample_scene(syringes, i, 1))
        assert not _lot_codes(sample_scene(zero, i, 1))
        assert not _lot_codes(sample_scene(VIALS, i, 1))


def test_default_config_is_unchanged_by_an_explicit_zero_rate():
    cfg = SimConfig(frames=2)
    assert "lot_code" not in dict(cfg.nuisance_rates)
    zero = cfg.with_nuisance_rates({"lot_code": 0.0})
    for i in range(4):
        a, b = sample_scene(cfg, i, 9), sample_scene(zero, i, 9)
        assert a == b
    ra, rb = render(a, cfg.camera), render(b, zero.camera)
    assert all(np.array_equal(x, y) for x, y in zip(ra.frames, rb.frames, strict=True))


def test_parse_nuisance_rates():
    assert parse_nuisance_rates(["lot_code=0.5", "dust=1"]) == {"lot_code": 0.5, "dust": 1.0}
    assert parse_nuisance_rates(["lot_code:0"], sep=":") == {"lot_code": 0.0}
    for bad, msg in (["lot_code", "expected TAG=RATE"], ["ink=0.5", "unknown nuisance 'ink'"],
                     ["lot_code=lots", "must be a number"], ["lot_code=1.5", "within 0..1"],
                     ["lot_code=nan", "within 0..1"]):
        with pytest.raises(ValueError, match=msg):
            parse_nuisance_rates([bad])
    with pytest.raises(ValueError, match="within 0..1"):
        SimConfig(nuisance_rates=(("dust", -0.1),)).validate()


def test_sim_source_nuisance_option():
    uri = "sim://?rate=0&seed=3&formats=vial-2R&pixel_um=120&count=2&nuisance=lot_code:1,dust:0"
    with open_source(uri, 1) as src:
        assert dict(src.config.nuisance_rates)["lot_code"] == 1.0
        while not src.exhausted:
            src.read(5.0)
        assert "lot_code" in src.truth("c000001")["nuisances"]
    for bad, msg in (("lot_code:2", "within 0..1"), ("ink:0.1", "unknown nuisance"), ("lot_code=1", "TAG:RATE")):
        with pytest.raises(SourceError, match=f"bad value for option 'nuisance'.*{msg}"):
            open_source(f"sim://?rate=0&nuisance={bad}", 1)
