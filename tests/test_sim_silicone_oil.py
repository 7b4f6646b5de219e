"""The ``silicone_oil`` nuisance: droplets shed from a siliconised barrel, carried by the liquid, off by default."""

from dataclasses import replace

import numpy as np

from vialinspect.datasets.sim import sprites
from vialinspect.datasets.sim.config import SimConfig, parse_nuisance_rates
from vialinspect.datasets.sim.render import render
from vialinspect.datasets.sim.scene import sample_scene
from vialinspect.inspection_station.sources import open_source

SYRINGES = SimConfig(formats=("syringe-1mL",), frames=3, defect_rate=0.0)


def _oil(scene):
    return [o for o in scene.objects if o.tag == "silicone_oil"]


def test_silicone_oil_is_a_moving_liquid_borne_nuisance():
    cfg = SYRINGES.with_nuisance_rates({"silicone_oil": 1.0})
    scene = sample_scene(cfg, 2, 7)
    oil = _oil(scene)
    assert 20 <= len(oil) <= 60 and all(o.kind == "oil" and 30 <= o.size_um <= 300 for o in oil)
    assert all(0 < o.track.vz_mm_s < 2.0 for o in oil), "oil is a little lighter than water: it rises slowly"
    assert "silicone_oil" in scene.nuisance_tags and scene.classes == []
    out = render(scene, cfg.camera)
    assert not out.mask.any() and not out.defects
    anns = [a for a in out.nuisances if a.cls == "silicone_oil"]
    assert len(anns) == len(oil) and all(a.mask_value == 0 and a.kind == "oil" for a in anns)
    boxes = [a.frame_bboxes for a in anns if all(a.frame_bboxes)]
    assert boxes and sum(b[0] != b[-1] for b in boxes) >= 0.8 * len(boxes), "the droplets did not move"
    # The droplets change the picture; without them the frames are the same (nothing else of the scene moves).
    bare = render(replace(scene, objects=tuple(o for o in scene.objects if o.tag != "silicone_oil")), cfg.camera)
    diff = [np.abs(a.astype(np.int16) - b) for a, b in zip(out.frames, bare.frames, strict=True)]
    assert all(d.max() > 20 for d in diff)


def test_oil_droplet_is_a_round_lens_fainter_in_the_middle():
    s = sprites.oil_droplet(20.0, 20.0, 12.0, seed=3, blur=0.55)
    cy, cx = 20 - s.y0, 20 - s.x0
    assert s.alpha[cy, cx] < 0.6 * s.alpha[cy, cx + 4] and s.glow[cy, cx] > 0.1
    assert abs(s.alpha[cy, cx + 4] - s.alpha[cy + 4, cx]) < 0.05  # round
    assert s.alpha.max() < 0.9  # never as opaque as a rubber or metal particle


def test_silicone_oil_changes_nothing_else_and_is_off_by_default():
    on = SYRINGES.with_nuisance_rates({"silicone_oil": 1.0})
    zero = SYRINGES.with_nuisance_rates({"silicone_oil": 0.0})
    assert "silicone_oil" not in dict(SimConfig().nuisance_rates)
    for i in range(4):
        a, b, z = sample_scene(SYRINGES, i, 3), sample_scene(on, i, 3), sample_scene(zero, i, 3)
        assert replace(b, objects=tuple(o for o in b.objects if o.tag != "silicone_oil")) == a
        assert a == z and not _oil(a)
    vials = SimConfig(formats=("vial-2R",), frames=1).with_nuisance_rates({"silicone_oil": 1.0})
    assert _oil(sample_scene(vials, 0, 3)), "siliconised vials shed oil too"


def test_silicone_oil_from_outside():
    assert parse_nuisance_rates(["silicone_oil=0.25"]) == {"silicone_oil": 0.25}
    uri = "sim://?rate=0&seed=3&formats=syringe-1mL&pixel_um=120&count=1&nuisance=silicone_oil:1"
    with open_source(uri, 1) as src:
        while not src.exhausted:
            src.read(5.0)
        assert "silicone_oil" in src.truth("c000000")["nuisances"]
