"""The classical inspection baseline on a handful of rendered scenes: each test compares a container with and
without one thing (a particle, a crack, a bubble) or against the simulator's exact fill height."""

from dataclasses import replace

import numpy as np
import pytest

from vialinspect.datasets.generate import generate
from vialinspect.datasets.reader import open_dataset
from vialinspect.datasets.sim.config import SimConfig
from vialinspect.datasets.sim.motion import Track, settling_velocity_mm_s
from vialinspect.datasets.sim.render import render
from vialinspect.datasets.sim.scene import FreeObject, GlassMark, Scene, sample_scene
from vialinspect.training.evaluate import classical_inspector, classical_scores
from vialinspect.vision.classical import BaselineParams, ClassicalInspector
from vialinspect.vision.scores import class_scores

PIXEL_UM = 40.0


def _clean_scene(fmt: str, frames: int = 4, index: int = 0, seed: int = 3) -> Scene:
    """A good unit: no defect, no nuisance."""
    cfg = SimConfig(formats=(fmt,), frames=frames, defect_rate=0.0, nuisance_rates=())
    return sample_scene(cfg, index, seed)


def _frames(scene: Scene) -> list[np.ndarray]:
    cfg = SimConfig(formats=(scene.format.name,), frames=scene.frames)
    return render(scene, cfg.camera).frames


def _free(kind: str, size_um: float, z0_mm: float, rho_mm: float = 3.0, phi0: float = 0.4) -> FreeObject:
    track = Track(rho_mm=rho_mm, phi0=phi0, z0_mm=z0_mm, vz_mm_s=settling_velocity_mm_s(kind, size_um), drift=0.95)
    tag = "bubbles" if kind == "bubble" else "particle"
    return FreeObject(kind=kind, size_um=size_um, track=track, shape_seed=7, tumble_rad_s=1.0, tag=tag)


def _crack(length_mm: float, x_mm: float, z_mm: float, seed: int = 2) -> GlassMark:
    """A jagged line on the glass, drawn the way the simulator draws cracks (random walk of short steps)."""
    rng = np.random.default_rng(seed)
    pts = [(x_mm, z_mm)]
    angle, travelled = 0.3, 0.0
    while travelled < length_mm:
        step = min(0.2, length_mm - travelled)
        angle += float(rng.normal(0, 0.5))
        x_mm, z_mm = x_mm + step * np.cos(angle), z_mm + step * np.sin(angle)
        pts.append((float(x_mm), float(z_mm)))
        travelled += step
    return GlassMark(kind="crack", points_mm=tuple(pts), size_mm=length_mm, contrast=0.6, seed=seed, location="body")


@pytest.fixture(scope="module")
def inspector() -> ClassicalInspector:
    return classical_inspector()


def test_track_assignment_is_a_minimum_cost_one_to_one_matching():
    import itertools

    from vialinspect.vision.classical import _assign

    rng = np.random.default_rng(0)
    for n in range(1, 7):
        for _ in range(5):
            cost = rng.random((n, n)) * 3.0
            cost[rng.random((n, n)) < 0.3] = 1e6  # links too far or too unlike to make
            col = _assign(cost)
            assert sorted(col.tolist()) == list(range(n))
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert cost[np.arange(n), col].sum() == pytest.approx(best)


@pytest.mark.parametrize("frames", [4, 1])
def test_large_metal_particle_scores_higher_than_the_same_container_without(inspector, frames):
    clean = _clean_scene("vial-2R", frames=frames)
    dirty = replace(clean, objects=(_free("metal", 600.0, z0_mm=11.0),))
    p_clean = inspector.score(_frames(clean), PIXEL_UM, "vial-2R").probs["particle"]
    p_dirty = inspector.score(_frames(dirty), PIXEL_UM, "vial-2R").probs["particle"]
    assert p_clean < 0.2
    assert p_dirty > 0.5
    assert p_dirty > p_clean + 0.4


def test_particle_map_points_at_the_particle(inspector):
    scene = replace(_clean_scene("vial-2R"), objects=(_free("rubber", 500.0, z0_mm=9.0),))
    out = render(scene, SimConfig(formats=("vial-2R",)).camera)
    s = inspector.score(out.frames, PIXEL_UM, "vial-2R")
    assert s.maps is not None and s.maps[0].max() > 0.5
    r, c = np.unravel_index(int(np.argmax(s.maps[0])), s.maps[0].shape)
    x, y = (c + 0.5) * s.map_stride, (r + 0.5) * s.map_stride
    boxes = [b for b in out.defects[0].frame_bboxes if b is not None]
    assert any(b[0] - 8 <= x <= b[2] + 8 and b[1] - 8 <= y <= b[3] + 8 for b in boxes)
    x0, y0, x1, y1 = s.extra["particle_bbox"]
    assert any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes)


def test_small_particle_found_by_frame_differencing(inspector):
    clean = _clean_scene("vial-10R", index=1)
    dirty = replace(clean, objects=(_free("rubber", 200.0, z0_mm=15.0, rho_mm=5.0),))
    s = inspector.score(_frames(dirty), PIXEL_UM, "vial-10R")
    assert s.probs["particle"] > inspector.score(_frames(clean), PIXEL_UM, "vial-10R").probs["particle"] + 0.3


def test_rising_bubble_is_not_taken_for_a_particle(inspector):
    # The same size as the particle above, but gas: it rises, and a particle never does.
    clean = _clean_scene("vial-2R")
    bubbly = replace(clean, objects=(_free("bubble", 300.0, z0_mm=4.0),))
    particle = replace(clean, objects=(_free("glass", 300.0, z0_mm=11.0),))
    p_bubble = inspector.score(_frames(bubbly), PIXEL_UM, "vial-2R").probs["particle"]
    p_particle = inspector.score(_frames(particle), PIXEL_UM, "vial-2R").probs["particle"]
    assert p_bubble < 0.2 < 0.5 < p_particle


@pytest.mark.parametrize("fmt", ["vial-2R", "vial-10R", "syringe-1mL"])
def test_fill_height_within_half_a_mm_of_the_truth(inspector, fmt):
    for index in range(2):
        scene = _clean_scene(fmt, index=index)
        s = inspector.score(_frames(scene), PIXEL_UM, fmt)
        assert s.fill_height_mm is not None
        assert abs(s.fill_height_mm - scene.fill_height_mm) < 0.5
        spec = (scene.fill_target_mm, scene.fill_tolerance_mm)
        assert class_scores(s, spec)["fill_level"] < 0.5  # a good unit passes its spec


def test_under_fill_is_rejected_through_the_spec(inspector):
    scene = _clean_scene("syringe-1mL", index=4)
    low = replace(scene, fill_height_mm=scene.fill_target_mm - 2.5 * scene.fill_tolerance_mm, fill_defect="under")
    s = inspector.score(_frames(low), PIXEL_UM, "syringe-1mL")
    assert abs(s.fill_height_mm - low.fill_height_mm) < 0.5
    assert class_scores(s, (low.fill_target_mm, low.fill_tolerance_mm))["fill_level"] > 0.5
    assert s.probs["fill_level"] > 0.5  # the format's own target gives the same verdict


def test_single_frame_works(inspector):
    scene = _clean_scene("vial-10R", frames=1, index=2)
    frames = _frames(scene)
    assert len(frames) == 1
    s = inspector.score(frames, PIXEL_UM, "vial-10R")
    assert set(s.probs) == {"particle", "crack", "fill_level"}
    assert all(0.0 <= v <= 1.0 for v in s.probs.values())
    assert abs(s.fill_height_mm - scene.fill_height_mm) < 0.5
    H, W = frames[0].shape
    assert s.maps is not None and s.maps.shape == (3, -(-H // 8), -(-W // 8)) and s.map_stride == 8


def test_4mm_crack_scores_higher_than_no_crack(inspector):
    clean = _clean_scene("vial-2R", index=5)
    cracked = replace(clean, marks=(_crack(4.0, x_mm=3.0, z_mm=6.0),))
    s_clean = inspector.score(_frames(clean), PIXEL_UM, "vial-2R")
    s_crack = inspector.score(_frames(cracked), PIXEL_UM, "vial-2R")
    assert s_clean.probs["crack"] < 0.2
    assert s_crack.probs["crack"] > 0.5
    assert s_crack.extra["crack_length_mm"] > 1.5
    # The coarse crack map lights up too, and stays dark on the good unit.
    assert s_crack.maps[1].max() > 0.5 and s_clean.maps[1].max() < 0.2


def test_uint16_frames_score_like_uint8(inspector):
    scene = replace(_clean_scene("vial-2R"), objects=(_free("metal", 600.0, z0_mm=11.0),))
    frames = _frames(scene)
    s8 = inspector.score(frames, PIXEL_UM, "vial-2R")
    s16 = inspector.score([f.astype(np.uint16) * 257 for f in frames], PIXEL_UM, "vial-2R")
    assert s16.probs["particle"] == pytest.approx(s8.probs["particle"], abs=0.02)
    assert s16.fill_height_mm == pytest.approx(s8.fill_height_mm, abs=0.01)


def test_without_format_or_pixel_size(inspector):
    # Kind told from the image (the needle shield), 40 µm/px assumed: the defaults of the simulator.
    scene = _clean_scene("syringe-1mL", index=1)
    s = inspector.score(_frames(scene))
    assert s.extra["kind"] == "syringe"
    assert abs(s.fill_height_mm - scene.fill_height_mm) < 0.5


def test_blank_image_is_rejected_not_passed(inspector):
    s = inspector.score([np.full((300, 200), 200, np.uint8)] * 2, PIXEL_UM, "vial-2R")
    assert all(v == 1.0 for v in s.probs.values())
    assert "error" in s.extra


def test_params_are_used():
    scene = replace(_clean_scene("vial-2R"), objects=(_free("metal", 600.0, z0_mm=11.0),))
    frames = _frames(scene)
    default = classical_inspector().score(frames, PIXEL_UM, "vial-2R").probs["particle"]
    harsh = classical_inspector(BaselineParams(particle_scale=1e6)).score(frames, PIXEL_UM, "vial-2R")
    assert harsh.probs["particle"] < 0.01 < default


def test_score_dataset_reads_a_generated_dataset(tmp_path):
    out = tmp_path / "data"
    generate(out, 3, SimConfig(frames=2, defect_rate=0.5), seed=4, workers=1)
    ds = open_dataset(out)
    seen = []
    scores = classical_scores(ds.records, ds.root, progress=lambda it: (seen.append(1) or x for x in it))
    assert len(scores) == len(ds.records) == 3 and len(seen) == 3
    for rec, s in zip(ds.records, scores, strict=True):
        assert s.fill_height_mm is not None
        assert abs(s.fill_height_mm - rec.fill_height_mm) < 0.5
