"""benchmarks/foreign_world.py: a held-out line drawn by a renderer that shares no code with the simulator."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from vialinspect.datasets.imagefolder import read_imagefolder
from vialinspect.datasets.imageio import read_gray

from .benchmark_module import BENCHMARKS, benchmark


@pytest.fixture(scope="module")
def fw():
    with benchmark("foreign_world") as m:
        yield m


@pytest.fixture(scope="module")
def built(fw, tmp_path_factory):
    root = tmp_path_factory.mktemp("fx") / "fx68"
    return root, fw.build_world("fx68", root, n_train=24, n_test=8, seed=5)


def _truth(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "truth.jsonl").read_text().splitlines()]


def test_the_renderer_imports_nothing_of_the_project():
    src = (BENCHMARKS / "foreign_world.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+vialinspect", src, re.M)


def test_layout_counts_and_truth_are_those_of_the_simulated_worlds(fw, built):
    root, summary = built
    assert summary["counts"]["train"] == {"good": 12, "particle": 4, "crack": 4, "fill_level": 4}
    assert sum(summary["counts"]["test"].values()) == 8
    rows = _truth(root)
    assert len(rows) == 32 == summary["images"]
    folder = read_imagefolder(root)
    assert sorted(r.id for r in folder.records) == sorted(r["path"] for r in rows)
    by_id = {r.id: r for r in folder.records}
    for row in rows:
        assert (root / row["path"]).is_file()
        assert by_id[row["path"]].classes == ([] if row["class"] == "good" else [row["class"]])
        w, h = row["image_size"]
        assert 300 <= w <= 380 and 700 <= h <= 860  # the sizes the issue's own foreign set had
        for d in row["defects"]:
            if d["class"] == "particle":
                assert 3 <= d["size_um"] / row["pixel_um"] <= 13
            elif d["class"] == "crack":
                assert 20 <= d["length_mm"] * 1000 / row["pixel_um"] <= 100
            else:
                assert abs(d["deviation_mm"]) > 0
    assert fw.WORLDS["fx68"].held_out
    assert {r["encoding"] for r in rows} <= set(fw.ENCODINGS)


def test_the_same_seed_draws_the_same_files(fw, built, tmp_path):
    root, _ = built
    again = tmp_path / "again"
    fw.build_world("fx68", again, n_train=24, n_test=8, seed=5)
    for row in _truth(root):
        assert (again / row["path"]).read_bytes() == (root / row["path"]).read_bytes()
    other = tmp_path / "other"
    fw.build_world("fx68", other, n_train=4, n_test=0, seed=6)
    seen = {p.read_bytes() for p in root.rglob("fx68_*")}
    assert not any(p.read_bytes() in seen for p in other.rglob("fx68_*"))


def test_further_good_test_units_leave_the_other_units_as_they_were(fw, built, tmp_path):
    root, _ = built
    more = tmp_path / "more"
    s = fw.build_world("fx68", more, n_train=24, n_test=8, seed=5, n_test_good=2)
    for row in _truth(root):
        assert (more / row["path"]).read_bytes() == (root / row["path"]).read_bytes()
    extra = [r for r in _truth(more) if "testgood" in r["path"]]
    assert [Path(r["path"]).stem for r in extra] == ["fx68_testgood_000000", "fx68_testgood_000001"]
    assert all(r["split"] == "test" and r["class"] == "good" and not r["defects"] for r in extra)
    assert s["counts"]["test"]["good"] == 4 + 2 and json.loads((more / "world.json").read_text())["test_good"] == 2
    only = tmp_path / "only"
    fw.build_world("fx68", only, n_train=0, n_test=0, seed=5, n_test_good=1)  # a test split of good units alone
    assert (only / extra[0]["path"]).read_bytes() == (more / extra[0]["path"]).read_bytes()


def test_a_particle_is_darker_than_the_liquid_around_it(built):
    root, _ = built
    seen = 0
    for row in _truth(root):
        for d in row["defects"]:
            if d["class"] != "particle":
                continue
            img = read_gray(root / row["path"])
            x0, y0, x1, y1 = d["bbox"]
            inner = img[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1]
            ring = img[max(y0 - 12, 0):y1 + 13, max(x0 - 12, 0):x1 + 13]
            assert inner.min() < np.median(ring) - 0.05 * np.median(ring), row["path"]
            seen += 1
    assert seen >= 4


def test_a_fill_level_defect_is_far_from_the_nominal_fill(built):
    root, _ = built
    rows = _truth(root)
    checked = 0
    for r in rows:
        if r["class"] == "fill_level":
            same = [g["fill_height_mm"] for g in rows if g["class"] == "good" and g["format"] == r["format"]]
            if len(same) >= 3:
                assert abs(r["fill_height_mm"] - np.median(same)) > 3 * (np.std(same) + 0.05)
                checked += 1
    assert checked >= 2


def test_every_foreign_world_renders_each_class_and_is_held_out(fw, tmp_path):
    for name, w in fw.WORLDS.items():
        assert w.held_out
        fw.build_world(name, tmp_path / name, n_train=8, n_test=0, seed=1)
        assert {r["class"] for r in _truth(tmp_path / name)} == set(fw.CLASSES)


def test_bad_counts_and_a_non_empty_folder_are_refused(fw, built):
    root, _ = built
    with pytest.raises(ValueError, match="not an empty directory"):
        fw.build_world("fx68", root, 4, 0)
    with pytest.raises(ValueError, match="whole number"):
        fw.build_world("fx68", root.parent / "new", -1, 0)


def _sequence(fw, cls: str, i: int, frames: int = 4):
    rng = np.random.default_rng(np.random.SeedSequence([3, i]))
    motion = np.random.default_rng(np.random.SeedSequence([3, i, 7]))
    return fw.render_frames(fw.WORLDS["fx68"], rng, cls, frames, motion)


def test_a_sequences_first_frame_is_the_still_of_the_same_seed(fw):
    """The motion has a generator of its own: a sequence is the still plus what happens after it, so the still
    worlds' figures and the sequence worlds' describe the same line."""
    for cls in fw.CLASSES:
        still, ts = fw.render(fw.WORLDS["fx61"], np.random.default_rng(11), cls)
        imgs, tq = fw.render_frames(fw.WORLDS["fx61"], np.random.default_rng(11), cls, 3, np.random.default_rng(5))
        assert np.array_equal(still, imgs[0])
        assert [{k: v for k, v in d.items() if k != "track"} for d in tq["defects"]] == ts["defects"]
        assert not np.array_equal(imgs[1], imgs[0])  # later frames: their own noise at least


def _blocks(im: np.ndarray, n: int = 8) -> np.ndarray:
    """Means of n x n blocks: each frame's own noise averages away, what was drawn does not."""
    h, w = im.shape[0] // n * n, im.shape[1] // n * n
    return im[:h, :w].reshape(h // n, n, w // n, n).mean((1, 3))


def test_a_crack_stays_where_it_is_in_every_frame(fw):
    imgs, truth = _sequence(fw, "crack", 1)
    x0, y0, x1, y1 = truth["defects"][0]["bbox"]
    box = (slice(max(y0, 0), y1), slice(max(x0, 0), x1))
    assert all(np.abs(_blocks(im[box], 4) - _blocks(imgs[0][box], 4)).max() < 0.03 for im in imgs[1:])


def test_in_a_sequence_the_particle_moves_and_the_glass_stays(fw):
    def dark(im, x, y):  # how much darker the 3 x 3 px at (x, y) are than their 17 x 17 px surroundings
        x, y = int(round(x)), int(round(y))
        return float(np.median(im[y - 8:y + 9, x - 8:x + 9]) - im[y - 1:y + 2, x - 1:x + 2].mean())

    left = 0
    for i in range(12):
        imgs, truth = _sequence(fw, "particle", i)
        assert len(imgs) == 4 and all(im.shape == imgs[0].shape for im in imgs)
        d = truth["defects"][0]
        track = d["track"]
        x0, y0, x1, y1 = d["bbox"]
        assert abs(track[0][0] - (x0 + x1) / 2) <= 1 and abs(track[0][1] - (y0 + y1) / 2) <= 1  # frame 0's box
        assert all(dark(im, *xy) > 0.1 for im, xy in zip(imgs, track, strict=True))  # drawn where the track says
        left += dark(imgs[3], *track[0]) < 0.05  # and gone from where it was
        assert np.abs(_blocks(imgs[3][:40]) - _blocks(imgs[0][:40])).max() < 0.02  # the cap: only noise differs
    assert left >= 8


def test_a_sequence_is_drawn_again_from_the_same_seeds(fw):
    a, ta = _sequence(fw, "good", 2)
    b, tb = _sequence(fw, "good", 2)
    assert ta == tb and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="motion"):
        fw.render_frames(fw.WORLDS["fx68"], np.random.default_rng(0), "good", 4)


def _syringes(fw, cls: str, n: int):
    w = fw.WORLDS["fx66s"]
    for i in range(n):
        img, truth = fw.render(w, np.random.default_rng(np.random.SeedSequence([9, i])), cls)
        yield w, img, truth


def test_a_syringe_is_measured_as_a_syringe_with_its_meniscus_under_the_stopper(fw):
    """The syringe line is drawn without the simulator too (flange, stopper on an air gap, needle shield): the
    project's geometry must read it as a syringe and find the liquid's surface, not the stopper's face."""
    from vialinspect.vision.classical import measure_geometry

    for w, img, truth in _syringes(fw, "good", 4):
        shape = next(s for s in w.shapes if s.name == truth["format"])
        # The frame's lower end is drawn within +-3 px of height - 14: the meniscus to within a few px.
        meniscus = shape.height - 14 - shape.shield_height - 2 - truth["fill_height_mm"] * 1000 / w.pixel_um
        g = measure_geometry([img])
        assert g.kind == "syringe"
        assert abs(g.meniscus_row - meniscus) < 8, (truth["format"], g.meniscus_row, meniscus)


def test_a_syringes_cracks_lie_on_its_own_glass_and_its_fill_defects_move_the_stopper(fw):
    places = {t["defects"][0]["kind"] for _, _, t in _syringes(fw, "crack", 24)}
    assert places <= {"barrel", "wall", "cone", "flange"} and len(places) >= 3
    good = [t["fill_height_mm"] for _, _, t in _syringes(fw, "good", 8) if t["format"] == "1mL"]
    wrong = [t for _, _, t in _syringes(fw, "fill_level", 8) if t["format"] == "1mL"]
    assert good and wrong
    for t in wrong:
        assert abs(t["fill_height_mm"] - np.median(good)) > 2.0  # mm: 10-25% of a ~33 mm column
