"""Physical sanity of the simulator: sizes in pixels, fill heights, and how things move between frames."""

from dataclasses import replace

import numpy as np
import pytest

from vialinspect.datasets.sim import sprites
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.datasets.sim.formats import FORMATS, get_format
from vialinspect.datasets.sim.motion import settling_velocity_mm_s
from vialinspect.datasets.sim.render import object_position_mm, render, scene_time
from vialinspect.datasets.sim.scene import GlassMark, sample_scene


def _width_px(alpha: np.ndarray, level: float = 0.5) -> int:
    cols = np.nonzero((alpha >= level * alpha.max()).any(axis=0))[0]
    return int(cols.max() - cols.min() + 1)


def test_100um_particle_at_25um_per_px_covers_about_4px():
    size_px = 100 / 25
    widths = []
    for seed in range(20):
        s = sprites.particle("metal", 50.3, 40.7, size_px, angle=0.0, seed=seed, blur=0.55)
        widths.append(max(_width_px(s.alpha), _width_px(s.alpha.T)))
    assert 3 <= np.median(widths) <= 5


def test_particle_annotation_size_scales_with_pixel_scale():
    # The same 300 µm particle is about twice as wide at 20 µm/px as at 40 µm/px.
    cfg = SimConfig(formats=("vial-2R",), frames=1, defect_rate=1.0, class_weights=(1, 0, 0),
                    nuisance_rates=(), particle_size_um=(300, 300.001))
    widths = {}
    for px in (20.0, 40.0):
        c = replace(cfg, camera=CameraConfig(pixel_um=px))
        w = []
        for i in range(6):
            r = render(sample_scene(c, i, 5), c.camera)
            for d in r.defects:
                if d.kind != "fibre" and d.frame_bboxes[0]:
                    b = d.frame_bboxes[0]
                    w.append(max(b[2] - b[0], b[3] - b[1]))
        widths[px] = np.median(w)
    assert 1.5 < widths[20.0] / widths[40.0] < 2.6


@pytest.mark.parametrize("name", list(FORMATS))
def test_fill_height_grows_with_volume_and_inverts(name):
    fmt = get_format(name)
    vols = np.linspace(0.2, 0.9, 8) * fmt.volume_ml(fmt.height_mm - fmt.flange_mm)
    heights = [fmt.fill_height_mm(v) for v in vols]
    assert all(b > a for a, b in zip(heights, heights[1:], strict=False))
    for v, h in zip(vols, heights, strict=True):
        assert fmt.volume_ml(h) == pytest.approx(v, rel=1e-3)


def test_2R_nominal_fill_is_physically_right():
    # 2 mL in a 14 mm bore: 2000 / (pi * 7^2) = 13.0 mm of liquid above a 0.7 mm glass bottom.
    assert get_format("vial-2R").fill_height_mm(2.0) == pytest.approx(13.0 + 0.7, abs=0.1)


def test_meniscus_moves_up_in_the_image_with_more_liquid():
    cfg = SimConfig(formats=("vial-2R",), frames=1, defect_rate=0.0, nuisance_rates=())
    scene = sample_scene(cfg, 0, 1)
    rows = []
    for fill in (10.0, 12.0, 14.0):
        s = replace(scene, fill_height_mm=fill, pose=replace(scene.pose, dx_mm=0, dz_mm=0, tilt_deg=0))
        img = render(s, cfg.camera).frames[0].astype(np.float32)
        centre = img[:, img.shape[1] // 2 - 5: img.shape[1] // 2 + 5].mean(axis=1)
        # The meniscus is the darkest spot of the centre column inside the liquid zone of the body.
        lo, hi = 450, 800  # below the shoulder (z < 18 mm), above the heel
        rows.append(lo + int(np.argmin(centre[lo:hi])))
    assert rows[0] > rows[1] > rows[2]
    # 2 mm of fill is 50 px at 40 µm/px.
    assert rows[0] - rows[1] == pytest.approx(50, abs=4)


def test_settling_velocities_have_the_right_sign():
    assert settling_velocity_mm_s("metal", 200) < settling_velocity_mm_s("glass", 200) < 0
    assert settling_velocity_mm_s("bubble", 200) > 0


def _centre_y(box):
    return (box[1] + box[3]) / 2


def test_between_frames_bubbles_rise_particles_sink_and_glass_marks_stay():
    cfg = SimConfig(formats=("vial-10R",), frames=4, defect_rate=1.0, class_weights=(1, 0, 0),
                    nuisance_rates=(("bubbles", 1.0), ("dust", 1.0), ("scratch", 1.0)))
    rose = sank = still = 0
    for i in range(8):
        scene = sample_scene(cfg, i, 2)
        out = render(scene, cfg.camera)
        for ann in out.nuisances:
            boxes = ann.frame_bboxes
            if ann.cls == "bubbles" and all(boxes):
                # Rows grow downwards: rising means the row decreases (unless it is already at the surface).
                if _centre_y(boxes[-1]) < _centre_y(boxes[0]) - 0.5:
                    rose += 1
            if ann.cls in ("dust", "scratch"):
                assert len(set(boxes)) == 1, f"{ann.cls} moved between frames"
                still += 1
        for obj, ann in zip([o for o in scene.objects if o.tag == "particle"],
                            [d for d in out.defects if d.cls == "particle"], strict=True):
            z = [object_position_mm(scene, obj, scene_time(cfg.camera, k))[1] for k in range(4)]
            if obj.kind == "metal":
                assert z[-1] <= z[0]
                if z[0] > scene.format.bottom_mm + 1.0:
                    assert all(b[1] >= a[1] for a, b in zip(ann.frame_bboxes, ann.frame_bboxes[1:], strict=False)
                               if a and b)
                    sank += 1
    assert rose >= 3 and still >= 8
    # Glass-mark pixels stay put too: the static part differs between frames only by noise.
    frames = [f.astype(np.float32) for f in out.frames]
    for ann in out.nuisances:
        if ann.cls == "scratch":
            x0, y0, x1, y1 = ann.frame_bboxes[0]
            diff = np.abs(frames[0][y0:y1, x0:x1] - frames[3][y0:y1, x0:x1]).mean()
            assert diff < 4.0


def test_stokes_sinking_particle_moves_down_in_the_image():
    cfg = SimConfig(formats=("vial-2R",), frames=4, defect_rate=1.0, class_weights=(1, 0, 0), nuisance_rates=())
    moved = 0
    for i in range(30):
        scene = sample_scene(cfg, i, 9)
        metal = [o for o in scene.objects if o.kind == "metal" and o.size_um > 150]
        if not metal or metal[0].track.z0_mm < 4:
            continue
        out = render(scene, cfg.camera)
        ann = next(d for d in out.defects if d.cls == "particle" and d.kind == "metal")
        ys = [_centre_y(b) for b in ann.frame_bboxes if b]
        assert ys[-1] > ys[0]
        moved += 1
    assert moved >= 2


def _straight_crack(x_mm: float, z_mm: float, length_mm: float = 1.5) -> GlassMark:
    pts = tuple((x_mm + d, z_mm + 0.3 * d) for d in np.linspace(0, length_mm, 9))
    return GlassMark(kind="crack", points_mm=pts, size_mm=length_mm, contrast=0.7, seed=3, location="neck")


def _crack_change_dn(scene, mark: GlassMark) -> float:
    """The largest change a crack makes to the first frame (same noise, pose and light with and without it)."""
    cam = CameraConfig()
    with_crack = render(replace(scene, marks=(mark,)), cam).frames[0].astype(np.float32)
    without = render(replace(scene, marks=()), cam).frames[0].astype(np.float32)
    return float(np.abs(with_crack - without).max())


def test_a_crack_behind_the_crimp_cap_or_the_stopper_plug_shows_no_glint():
    # Back light that a cap or a rubber plug stops never reaches the glass in front of it, so a crack there has
    # nothing to redirect; the same crack on the neck's clear glass beside the plug is plainly seen.
    cfg = SimConfig(formats=("vial-2R",), frames=1, defect_rate=0.0, nuisance_rates=())
    scene = replace(sample_scene(cfg, 0, 11), objects=())
    fmt = scene.format
    neck_top = fmt.height_mm - fmt.flange_mm
    on_cap = _crack_change_dn(scene, _straight_crack(-1.0, neck_top + 1.2))
    on_plug = _crack_change_dn(scene, _straight_crack(-1.0, neck_top - 2.5))
    beside_plug = _crack_change_dn(scene, _straight_crack(-(fmt.neck_inner_diameter_mm / 2 + 0.5), neck_top - 2.5,
                                                          length_mm=0.6))
    assert on_cap < 8 and on_plug < 12
    assert beside_plug > 40


def test_cracks_start_on_glass_the_back_light_reaches():
    cfg = SimConfig(formats=("vial-2R", "syringe-1mL"), frames=1, defect_rate=1.0, class_weights=(0, 1, 0),
                    nuisance_rates=())
    seen = set()
    for i in range(160):
        scene = sample_scene(cfg, i, 21)
        crack = next(m for m in scene.marks if m.kind == "crack")
        x, z = crack.points_mm[0]
        fmt = scene.format
        ro, ri = (float(v[0]) for v in fmt.radii(np.array([z])))
        if fmt.kind == "vial" and crack.location == "neck":
            assert ri + 0.15 - 1e-9 <= abs(x) <= 0.9 * ro + 1e-9  # beside the stopper plug, not in front of it
        elif fmt.kind == "syringe" and crack.location == "body":
            # never in front of the plunger stopper (which starts within ~3.3 mm above the liquid)
            assert not scene.fill_height_mm <= z <= scene.fill_height_mm + 3.3 + fmt.stopper_mm
        else:
            assert abs(x) <= 0.9 * ro + 1e-9
        seen.add((fmt.kind, crack.location))
    assert {("vial", "neck"), ("syringe", "body")} <= seen
