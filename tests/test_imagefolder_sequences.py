"""ImageFolder units of several frames: a folder of images inside a class folder is one container's sequence."""

from __future__ import annotations

import numpy as np

from vialinspect.datasets.imagefolder import read_imagefolder
from vialinspect.datasets.imageio import write_png


def _img(path, v=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.full((8, 6), v, np.uint8))


def test_a_folder_of_images_is_one_container_and_odd_counts_are_reported(tmp_path):
    for cls, n_units in (("good", 3), ("particle", 2)):
        for u in range(n_units):
            for k in range(4):
                _img(tmp_path / "train" / cls / f"u{u}" / f"f{k}.png")
    for k in range(3):  # a unit with one frame missing
        _img(tmp_path / "train" / "good" / "short" / f"f{k}.png")
    ds = read_imagefolder(tmp_path)
    assert ds.header["frames_per_container"] == 4
    assert sorted(r.id for r in ds.records) == ["train/good/u0", "train/good/u1", "train/good/u2",
                                                "train/particle/u0", "train/particle/u1"]
    r = next(r for r in ds.records if r.id == "train/particle/u1")
    assert r.frames == [f"train/particle/u1/f{k}.png" for k in range(4)] and r.classes == ["particle"]
    assert any(p.id == "train/good/short" and "3 frames" in p.message for p in ds.problems)


def test_stills_in_lot_folders_stay_one_container_each(tmp_path):
    for k in range(20):  # a lot folder larger than any sequence
        _img(tmp_path / "good" / "lot1" / f"img{k:03d}.png")
    for k in range(3):  # a nested day folder of stills
        _img(tmp_path / "particle" / "2026-12" / "day3" / f"p{k}.png")
    _img(tmp_path / "particle" / "single.png")
    ds = read_imagefolder(tmp_path)
    singles = [r for r in ds.records if r.classes == ["particle"]]
    assert ds.header["frames_per_container"] == 1 and len(ds.records) == 21
    assert [r.id for r in singles] == ["particle/single.png"]
    assert any("3 frames" in p.message for p in ds.problems)  # the nested day folder reads as one 3-frame unit
