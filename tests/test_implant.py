"""Synthetic defects drawn into a line's own images (datasets/implant.py) and their use in training."""

from __future__ import annotations

import numpy as np
import pytest

from vialinspect.datasets.implant import IMPLANT_LOOKS, ImplantConfig, bubbles, implant, scratch
from vialinspect.datasets.records import DEFECT_CLASSES
from vialinspect.datasets.torch_dataset import Sample
from vialinspect.training.data import TrainTransform
from vialinspect.vision.preprocess import InputSpec


def _backlit(h: int = 240, w: int = 120) -> np.ndarray:
    """A bright field with a dark band at the top (a shoulder) and a dark border (outside the light)."""
    img = np.full((h, w), 0.8, np.float32)
    img[:40] = 0.05
    img[:, :10] = 0.0
    return img


@pytest.mark.parametrize("cls", ["particle", "crack"])
def test_implant_darkens_only_where_its_mask_is_and_leaves_the_input_alone(cls):
    img = _backlit()
    before = img.copy()
    frames, mask = implant([img], cls, np.random.default_rng(3))
    assert np.array_equal(img, before)  # the caller's frame is not changed
    assert mask.dtype == np.uint8 and mask.shape == img.shape and mask.sum() > 0
    diff = before - frames[0]
    ys, xs = np.nonzero(mask)
    assert diff[mask > 0].max() > 0.05  # visibly darker on the defect
    # Nothing changes far from the defect (beyond its blur), and it lies where the light is.
    far = np.ones_like(mask, bool)
    far[max(ys.min() - 6, 0):ys.max() + 7, max(xs.min() - 6, 0):xs.max() + 7] = False
    assert np.abs(diff[far]).max() == 0.0
    assert before[mask > 0].mean() > 0.5


def test_implant_needs_light_to_show_a_defect():
    assert implant([np.zeros((200, 100), np.float32)], "particle", np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="cannot implant"):
        implant([_backlit()], "fill_level", np.random.default_rng(0))


def test_implanted_particle_sinks_between_frames_and_crack_stays():
    img = _backlit()
    frames, mask = implant([img, img, img], "particle", np.random.default_rng(5))
    rows = [np.nonzero(img - f)[0].mean() for f in frames]
    assert rows[0] < rows[1] < rows[2]  # it moves down
    frames, _ = implant([img, img], "crack", np.random.default_rng(5))
    assert np.array_equal(frames[0], frames[1])


def test_a_glass_flake_is_seen_by_a_bright_and_a_dark_edge_and_lets_light_through():
    cfg = ImplantConfig(fibre_share=0.0, kinds=(("flake", 1.0),), particle_px=(10.0, 12.0), blur_px=(0.5, 0.5),
                        contrast=(1.0, 1.0))
    img = _backlit()
    for seed in range(4):
        frames, mask = implant([img], "particle", np.random.default_rng(seed), cfg=cfg)
        d = frames[0] - img
        assert d.max() > 0.03 and d.min() < -0.1  # one edge bends light toward the camera, the other away
        assert np.median(frames[0][mask > 0]) > 0.5 * 0.8  # the glass lets most of the light through


def test_the_varied_look_draws_thicker_and_shorter_fibres_than_the_simulator():
    def fibres(look: str) -> tuple[float, float]:
        cfg = ImplantConfig(**{**IMPLANT_LOOKS[look], "fibre_share": 1.0}, particle_px=(8.0, 8.01), blur_px=(0.5, 0.5),
                            contrast=(1.0, 1.0))
        darkest, length = [], []
        for s in range(12):
            img = _backlit(400, 200)
            f, m = implant([img], "particle", np.random.default_rng(s), cfg=cfg)
            darkest.append(float((img - f[0]).max()))
            ys, xs = np.nonzero(m)
            length.append(float(max(np.ptp(ys), np.ptp(xs))))
        return float(np.mean(darkest)), float(np.mean(length))
    sim, varied = fibres("simulator"), fibres("varied")
    assert varied[0] > sim[0] + 0.05  # thicker: blocks more light at its core
    assert varied[1] < sim[1]  # 1-2.5x the size instead of 2.5x


def test_the_no_glass_look_never_draws_the_bubble_like_glass_particle(monkeypatch):
    from vialinspect.datasets.sim import sprites

    drawn: list[str] = []
    real = sprites.particle
    monkeypatch.setattr(sprites, "particle", lambda kind, *a, **k: drawn.append(kind) or real(kind, *a, **k))
    for look in ("simulator", "no_glass"):
        drawn.clear()
        cfg = ImplantConfig(**IMPLANT_LOOKS[look])
        for s in range(40):
            implant([_backlit(400, 200)], "particle", np.random.default_rng(s), cfg=cfg)
        assert ("glass" in drawn) == (look == "simulator")
        assert {"metal", "rubber", "fibre"} <= set(drawn)


def test_implant_sizes_follow_the_pixel_scale():
    cfg = ImplantConfig(fibre_share=0.0, particle_um=(400.0, 400.01))
    areas = {}
    for um in (40.0, 80.0):
        areas[um] = np.mean([implant([_backlit(400, 200)], "particle", np.random.default_rng(s), um, cfg)[1].sum()
                             for s in range(6)])
    assert areas[40.0] > 2.5 * areas[80.0]  # twice the pixels across: about four times the area


def _sample(labels, has_mask=False, implantable=None) -> Sample:
    """A camera's image (implantable when good) unless ``has_mask`` (the simulator's)."""
    img = (_backlit(256, 128) * 255).astype(np.uint8)
    if implantable is None:
        implantable = not has_mask and not any(labels)
    return Sample(frames=[img], masks=np.zeros((3, 256, 128), np.uint8), labels=np.array(labels, np.float32),
                  has_mask=has_mask, fill_height_mm=float("nan"), rows=np.array([np.nan, np.nan], np.float32),
                  index=0, implantable=implantable)


def test_train_transform_implants_into_good_units_only_with_their_masks():
    spec = InputSpec(frames=1, pixel_um=None)
    t = TrainTransform(spec, None, implant=1.0, implant_cfg=ImplantConfig(per_unit=(1, 1)))
    seen = set()
    for seed in range(12):
        item = t(_sample([0, 0, 0]), seed=seed)
        assert item["has_mask"] == 1.0
        c = int(np.argmax(item["labels"]))
        assert item["labels"].sum() == 1 and DEFECT_CLASSES[c] in ("particle", "crack")
        assert item["map_target"][c].sum() > 0 and item["map_target"].sum() == item["map_target"][c].sum()
        seen.add(DEFECT_CLASSES[c])
    assert seen == {"particle", "crack"}
    # Several defects in one unit: every class drawn is labelled, and labels are what the masks hold.
    many = TrainTransform(spec, None, implant=1.0, implant_cfg=ImplantConfig(per_unit=(3, 3), crack_share=0.5))
    both = 0
    for seed in range(12):
        item = many(_sample([0, 0, 0]), seed=seed)
        held = item["map_target"].reshape(3, -1).max(1)
        assert list(item["labels"]) == list(held) and held[2] == 0
        both += int(held[0] > 0 and held[1] > 0)
    assert both > 0
    # The same seed draws the same defect (training is reproducible whichever process loads the item).
    assert np.array_equal(t(_sample([0, 0, 0]), seed=4)["x"], t(_sample([0, 0, 0]), seed=4)["x"])
    # A labelled defect image keeps its image-level label and no mask; data with masks is never touched.
    real = t(_sample([1, 0, 0]), seed=1)
    assert real["has_mask"] == 0.0 and real["map_target"].sum() == 0 and list(real["labels"]) == [1, 0, 0]
    sim = t(_sample([0, 0, 0], has_mask=True), seed=1)
    assert sim["labels"].sum() == 0 and sim["map_target"].sum() == 0
    # Without implanting, a good unit of image-level data is what it was: no mask.
    assert TrainTransform(spec, None, implant=0.0)(_sample([0, 0, 0]), seed=1)["has_mask"] == 0.0
    # A reviewed false reject (known clean, from the camera) is drawn into; once drawn, never again.
    rev = t.implanted(_sample([0, 0, 0], has_mask=True, implantable=True), seed=3)
    assert rev.masks.any() and not rev.implantable and t.implanted(rev, seed=5) is rev


def test_image_level_defects_weigh_what_the_setting_says_and_others_count_fully():
    spec = InputSpec(frames=1, pixel_um=None)
    t = TrainTransform(spec, None, implant=0.0, image_label_weight=0.25)
    assert list(t(_sample([1, 0, 0]), seed=1)["label_weight"]) == [0.25, 1.0, 1.0]
    assert list(t(_sample([0, 1, 1]), seed=1)["label_weight"]) == [1.0, 0.25, 1.0]  # fill level is global
    assert list(t(_sample([0, 0, 0]), seed=1)["label_weight"]) == [1.0, 1.0, 1.0]  # a good unit: all count
    # A unit with masks is located where its defects are: its labels count fully.
    assert list(t(_sample([1, 0, 0], has_mask=True), seed=1)["label_weight"]) == [1.0, 1.0, 1.0]


def test_blob_boxes_give_one_box_per_defect():
    from vialinspect.training.data import _blob_boxes

    m = np.zeros((100, 60), np.uint8)
    m[10:14, 5:9] = 1
    m[70:80, 40:42] = 1
    assert sorted(_blob_boxes(m)) == [(5, 10, 9, 14), (40, 70, 42, 80)]
    assert _blob_boxes(np.zeros((8, 8), np.uint8)) == []


def test_scratches_are_drawn_as_known_clean_and_leave_the_defects_drawn_as_they_were():
    img = _backlit()
    frames = scratch([img, img], np.random.default_rng(2), 60.0)
    assert np.array_equal(frames[0], frames[1])  # on the glass: the same place in every frame
    changed = np.abs(frames[0] - img) > 0.01
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 10 and max(np.ptp(ys), np.ptp(xs)) > 25  # a long thin line (2-9 mm at 60 µm/px)
    assert scratch([np.zeros((200, 100), np.float32)], np.random.default_rng(0)) is None
    _assert_known_clean_nuisance(ImplantConfig(scratch_share=1.0))


def _assert_known_clean_nuisance(cfg: ImplantConfig) -> None:
    """A nuisance drawn by ``cfg`` into good units changes every drawn unit's image, adds no mask and no label,
    leaves the synthetic defects drawn as they were, and is never drawn into a labelled defect unit."""
    spec = InputSpec(frames=1, pixel_um=None)
    plain = TrainTransform(spec, None, implant=0.5)
    drawn = TrainTransform(spec, None, implant=0.5, implant_cfg=cfg)
    differ = 0
    for seed in range(8):
        a, b = plain(_sample([0, 0, 0]), seed=seed), drawn(_sample([0, 0, 0]), seed=seed)
        assert np.array_equal(a["map_target"], b["map_target"]) and np.array_equal(a["labels"], b["labels"])
        assert b["has_mask"] == 1.0
        differ += int(not np.array_equal(a["x"], b["x"]))
    assert differ == 8
    assert np.array_equal(drawn(_sample([1, 0, 0]), seed=0)["x"], plain(_sample([1, 0, 0]), seed=0)["x"])


def test_bubbles_are_drawn_as_known_clean_rings_that_rise_between_frames():
    img = _backlit()
    frames = bubbles([img, img, img], np.random.default_rng(4), 60.0, ImplantConfig(bubble_um=(900.0, 1200.0)))
    changed = [np.abs(f - img) > 0.01 for f in frames]
    assert all(c.sum() > 4 for c in changed)
    tops = [np.nonzero(c)[0].min() for c in changed]
    assert tops[0] > tops[1] > tops[2]  # rising: higher in each frame
    assert (frames[0] > img + 0.01).any() and (frames[0] < img - 0.01).any()  # a bright centre in a dark ring
    assert bubbles([np.zeros((200, 100), np.float32)], np.random.default_rng(0)) is None
    _assert_known_clean_nuisance(ImplantConfig(bubble_share=1.0))


def _vial_frames(k: int = 4):
    """A simulated 2R vial's K frames (float, [0, 1]) and its record: a container whose floor the geometry finds."""
    from vialinspect.datasets.generate import make_container
    from vialinspect.datasets.sim.config import SimConfig

    rec, imgs, _ = make_container(SimConfig(formats=("vial-2R",), frames=k, defect_rate=0.0), 0, 17)
    return [np.asarray(f, np.float32) / (65535.0 if f.dtype == np.uint16 else 255.0) for f in imgs], rec


def test_liquid_floor_is_the_top_of_the_vials_base_not_its_lowest_point():
    from vialinspect.training.data import liquid_floor
    from vialinspect.vision.classical import measure_geometry

    frames, _ = _vial_frames()
    floor = liquid_floor(frames)
    g = measure_geometry([(f * 255 + 0.5).astype(np.uint8) for f in frames])
    assert floor is not None and g.meniscus_row < floor.row < g.zero_row
    r, c = int(floor.row), int(round(floor.col))
    med = np.median(np.stack(frames), axis=0)
    liquid = med[r - 12:r - 4, c - 2:c + 3].mean()
    base = med[r + 2:int(g.zero_row) - 1, c - 2:c + 3].mean()
    assert liquid > base + 0.1  # light above the floor, the dark base below it
    assert liquid_floor([np.zeros((200, 100), np.float32)] * 2) is None  # no container: no floor


def test_a_resting_particle_lies_on_the_floor_and_slides_without_sinking():
    from vialinspect.datasets.implant import Floor
    from vialinspect.training.data import liquid_floor

    frames, _ = _vial_frames()
    floor = liquid_floor(frames)
    cfg = ImplantConfig(resting_share=1.0, fibre_share=0.0)
    for seed in range(4):
        out, mask = implant(frames, "particle", np.random.default_rng(seed), None, cfg, floor)
        ys, xs = np.nonzero(mask)
        assert floor.row - cfg.resting_band * floor.half_px - 1 <= ys.max() <= floor.row + 1  # on the floor band
        assert abs(xs.mean() - floor.col) <= floor.half_px
        rows = [np.nonzero(np.abs(f - g) > 1e-4)[0].mean() for f, g in zip(out, frames, strict=True)]
        assert np.ptp(rows) < 0.5  # it does not sink (a moving particle sinks 2-8 px a frame)
    # Without a floor, or in one frame, or with the share at 0, particles are drawn as before.
    plain = implant(frames, "particle", np.random.default_rng(9), None, ImplantConfig(fibre_share=0.0))
    off = implant(frames, "particle", np.random.default_rng(9), None, ImplantConfig(fibre_share=0.0), floor)
    assert np.array_equal(plain[1], off[1])
    nofloor = implant(frames, "particle", np.random.default_rng(9), None, cfg, None)
    assert np.array_equal(plain[1], nofloor[1])
    one = implant(frames[:1], "particle", np.random.default_rng(9), None, cfg, Floor(floor.row, floor.col, 40.0))
    assert np.array_equal(one[1], implant(frames[:1], "particle", np.random.default_rng(9), None,
                                          ImplantConfig(fibre_share=0.0))[1])


def test_train_transform_lays_resting_particles_on_the_floor_of_a_line_sequence():
    from vialinspect.training.config import SettingError, TrainConfig
    from vialinspect.training.data import liquid_floor

    assert TrainConfig().implant_resting == 0.0
    assert TrainConfig.from_dict({"implant_resting": 0.3}).implant_resting == 0.3
    with pytest.raises(SettingError, match="implant_resting"):
        TrainConfig.from_dict({"implant_resting": 1.5})
    frames, _ = _vial_frames()
    floor = liquid_floor(frames)
    u8 = [(f * 255 + 0.5).astype(np.uint8) for f in frames]
    h, w = u8[0].shape
    good = Sample(frames=u8, masks=np.zeros((3, h, w), np.uint8), labels=np.zeros(3, np.float32), has_mask=False,
                  fill_height_mm=float("nan"), rows=np.array([np.nan, np.nan], np.float32), index=0, implantable=True)
    cfg = ImplantConfig(per_unit=(1, 1), crack_share=0.0, fibre_share=0.0, resting_share=1.0)
    t = TrainTransform(InputSpec(frames=4, pixel_um=None), None, implant=1.0, implant_cfg=cfg)
    for seed in range(3):
        drawn = t.implanted(good, seed)
        ys, _ = np.nonzero(drawn.masks[0])
        assert list(drawn.labels) == [1.0, 0.0, 0.0]
        assert floor.row - 0.2 * floor.half_px - 1 <= ys.max() <= floor.row + 1


def _orientation(diff: np.ndarray) -> float:
    """The main axis (radians, 0..pi) of a darkening, from its second moments."""
    ys, xs = np.nonzero(diff > 1e-3)
    w = diff[ys, xs]
    x, y = xs - np.average(xs, weights=w), ys - np.average(ys, weights=w)
    cxx, cyy, cxy = np.average(x * x, weights=w), np.average(y * y, weights=w), np.average(x * y, weights=w)
    return float(0.5 * np.arctan2(2 * cxy, cxx - cyy)) % np.pi


def _turned(a: float, b: float) -> float:
    d = abs(a - b) % np.pi
    return min(d, np.pi - d)


def test_a_tumbling_particle_turns_from_frame_to_frame_and_a_plain_one_keeps_its_pose():
    from vialinspect.training.config import SettingError, TrainConfig

    img = np.full((200, 120), 0.8, np.float32)
    frames = [img] * 4
    fibres = {"fibre_share": 1.0, "particle_px": (8.0, 8.01), "blur_px": (0.5, 0.5)}
    turns = []
    for seed in range(6):
        for tumble in (0.0, 1.0):
            out, _ = implant(frames, "particle", np.random.default_rng(seed), None,
                             ImplantConfig(**fibres, tumble=tumble))
            axes = [_orientation(img - f) for f in out]
            if tumble == 0.0:
                assert max(_turned(a, axes[0]) for a in axes) < 0.05  # moved, not turned
            else:
                turns.append(_turned(axes[3], axes[0]))
    assert max(turns) > 0.5  # three frames at up to 1 rad a frame
    assert ImplantConfig().tumble == 0.0 and TrainConfig().implant_tumble == 0.0  # off by default
    crack = implant(frames, "crack", np.random.default_rng(2), None, ImplantConfig(**fibres, tumble=1.0))
    assert np.array_equal(crack[1], implant(frames, "crack", np.random.default_rng(2), None,
                                            ImplantConfig(**fibres))[1])  # a crack on the glass does not turn
    assert TrainConfig.from_dict({"implant_tumble": 0.25}).implant_tumble == 0.25
    with pytest.raises(SettingError, match="implant_tumble"):
        TrainConfig.from_dict({"implant_tumble": -0.1})


def _toy_vial(h: int = 300, w: int = 160) -> np.ndarray:
    """A back-lit vial seen from the side: bright field, dark walls and base, a black cap at the top."""
    img = np.full((h, w), 0.85, np.float32)
    img[20:290, 30:34] = img[20:290, 126:130] = 0.2  # the walls
    img[286:290, 30:130] = 0.2  # the base
    img[20:50, 30:130] = 0.05  # the cap
    return img


def test_glass_ends_are_the_lit_glass_at_the_top_and_bottom_of_the_container():
    from vialinspect.datasets.implant import glass_ends

    img = _toy_vial()
    ends = glass_ends(img)
    rows = np.nonzero(ends.any(1))[0]
    cols = np.nonzero(ends.any(0))[0]
    assert not ends[20:48].any()  # not on the cap: a crack there would not be seen
    assert 30 < cols.min() and cols.max() < 130  # within the outline, not on the bright field beside it
    # The lit glass spans rows ~50-289: its top 35% and its bottom 12%, nothing of the middle.
    assert 48 <= rows.min() <= 52 and 128 <= rows[rows < 200].max() <= 136
    assert 255 <= rows[rows > 200].min() <= 263 and not ends[140:250].any()
    assert not glass_ends(np.full((200, 100), 0.8, np.float32)).any()  # no container seen: nothing


def test_cracks_drawn_at_the_ends_lie_there_and_the_setting_off_draws_as_before():
    from vialinspect.datasets.implant import glass_ends
    from vialinspect.training.config import SettingError, TrainConfig

    img = _toy_vial()
    ends = glass_ends(img)
    for seed in range(12):
        _, mask = implant([img], "crack", np.random.default_rng(seed), None, ImplantConfig(crack_ends=1.0))
        ys, xs = np.nonzero(mask)
        assert ends[int(np.median(ys)), int(np.median(xs))] or ends[ys, xs].mean() > 0.5
    # Off (the default), the draws are those made before the setting existed: the same cracks, some in the middle.
    middle = 0
    for seed in range(12):
        a = implant([img], "crack", np.random.default_rng(seed), None, ImplantConfig())
        b = implant([img], "crack", np.random.default_rng(seed), None, ImplantConfig(crack_ends=0.0))
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[0][0], b[0][0])
        middle += int(not ends[tuple(np.argwhere(a[1])[0])])
    assert middle > 0
    # Particles are not moved to the ends.
    p = implant([img], "particle", np.random.default_rng(4), None, ImplantConfig(crack_ends=1.0))
    assert np.array_equal(p[1], implant([img], "particle", np.random.default_rng(4), None, ImplantConfig())[1])
    assert TrainConfig().implant_crack_ends == 0.0
    assert TrainConfig.from_dict({"implant_crack_ends": 0.5}).implant_crack_ends == 0.5
    with pytest.raises(SettingError, match="implant_crack_ends"):
        TrainConfig.from_dict({"implant_crack_ends": 1.5})


def test_every_implant_setting_reaches_the_draw():
    from vialinspect.training.config import TrainConfig
    from vialinspect.training.trainer import implant_config

    cfg = TrainConfig.from_dict({"implant_particle_um": [200.0, 800.0], "implant_scratches": 0.1,
                                 "implant_bubbles": 0.2, "implant_resting": 0.3, "implant_tumble": 0.4,
                                 "implant_crack_ends": 0.5, "implant_crack_light": 0.15, "implant_look": "varied",
                                 "implant_inside": True})
    ic = implant_config(cfg)
    assert (ic.particle_um, ic.scratch_share, ic.bubble_share, ic.resting_share, ic.tumble, ic.crack_ends,
            ic.crack_min_light, ic.inside) == ((200.0, 800.0), 0.1, 0.2, 0.3, 0.4, 0.5, 0.15, True)
    assert ic.kinds == IMPLANT_LOOKS["varied"]["kinds"]
    # Today's defaults (implant_look resolved, as train resolves "auto" before it draws) draw as ImplantConfig's.
    assert implant_config(TrainConfig(implant_look="simulator")) == ImplantConfig()


def test_cracks_land_on_grey_glass_only_when_asked():
    from vialinspect.datasets.implant import light_map, placements

    frame = np.full((200, 160), 0.9, np.float32)
    frame[80:140, 40:120] = 0.25  # a grey band (a flange, a heel): 28% of the bright level
    light = light_map(frame)
    def grey(spots):
        return int(((spots[:, 0] >= 96) & (spots[:, 0] < 124) & (spots[:, 1] >= 62) & (spots[:, 1] < 98)).sum())

    assert grey(placements(light, ImplantConfig(), 12)) == 0
    assert grey(placements(light, ImplantConfig(), 12, min_light=0.15)) > 0
    drawn = [implant([frame], "crack", np.random.default_rng(s), None, ImplantConfig(crack_min_light=0.15))
             for s in range(40)]
    on_grey = [m for _, m in filter(None, drawn) if m[96:124, 62:98].any()]
    assert on_grey  # some synthetic cracks now lie on the grey band
    # particles keep the particles' light
    parts = [implant([frame], "particle", np.random.default_rng(s), None, ImplantConfig(crack_min_light=0.15))
             for s in range(40)]
    assert not [m for _, m in filter(None, parts) if m[96:124, 62:98].any()]


def _walled(h: int = 240, w: int = 200) -> np.ndarray:
    """A back-lit frame with a container's two dark walls (columns 60-65 and 135-140) from row 40 down; the rows
    above show only the back light."""
    frame = np.full((h, w), 0.9, np.float32)
    frame[40:, 60:66] = 0.1
    frame[40:, 135:141] = 0.1
    return frame


def test_the_container_outline_lies_between_its_walls():
    from vialinspect.datasets.implant import container_outline

    inside = container_outline(_walled())
    assert inside[100, 100] and inside[200, 70] and inside[200, 130]
    assert not inside[100, 30] and not inside[100, 170]  # beside the container
    assert not inside[20, 100]  # above it: no wall in that row
    assert not container_outline(np.full((100, 80), 0.9, np.float32)).any()  # no container


def test_defects_land_within_the_outline_only_when_asked():
    frame = _walled()

    def outside(m: np.ndarray) -> bool:
        # Where the defect lies: its pixels' centre, with a few pixels' slack (the outline holds the walls, and a
        # long crack drawn from a point near the top may reach above it).
        ys, xs = np.nonzero(m)
        return not (57 <= xs.mean() <= 143 and ys.mean() >= 30)

    for cls in ("particle", "crack"):
        anywhere = [implant([frame] * 2, cls, np.random.default_rng(s), None, ImplantConfig()) for s in range(40)]
        within = [implant([frame] * 2, cls, np.random.default_rng(s), None, ImplantConfig(inside=True))
                  for s in range(40)]
        assert any(outside(m) for _, m in filter(None, anywhere))  # the back light around it is lit too
        masks = [m for _, m in filter(None, within)]
        assert len(masks) >= 35 and not any(outside(m) for m in masks)
    # No outline in the frame: drawn anywhere lit, as without the setting.
    flat = np.full((120, 120), 0.9, np.float32)
    assert implant([flat], "particle", np.random.default_rng(0), None, ImplantConfig(inside=True)) is not None
