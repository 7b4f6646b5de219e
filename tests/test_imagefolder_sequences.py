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


def test_system_files_are_passed_over_not_read_as_frames_or_problems(tmp_path):
    for u in range(2):
        for k in range(4):
            _img(tmp_path / "particle" / f"u{u}" / f"f{k}.png")
        # What a Mac and Windows leave: a resource fork with an image suffix inside a unit, a folder's metadata
        (tmp_path / "particle" / f"u{u}" / "._f0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
        (tmp_path / "particle" / f"u{u}" / ".DS_Store").write_bytes(b"Bud1")
    for k in range(4):
        _img(tmp_path / "good" / "g0" / f"f{k}.png")
    (tmp_path / "good" / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "good" / ".ipynb_checkpoints").mkdir()  # a hidden folder does not make good/ a lot
    _img(tmp_path / "good" / ".ipynb_checkpoints" / "f0-checkpoint.png")
    (tmp_path / ".git").mkdir()
    ds = read_imagefolder(tmp_path)
    assert sorted(r.id for r in ds.records) == ["good/g0", "particle/u0", "particle/u1"]
    assert all(len(r.frames) == 4 and not any("/." in f for f in r.frames) for r in ds.records)
    assert ds.problems == [] and ds.header["system_files_skipped"] == 7
    # An ordinary file that is not an image is still reported
    (tmp_path / "good" / "notes.txt").write_text("x")
    assert [p.id for p in read_imagefolder(tmp_path).problems] == ["good/notes.txt"]
    # In a lot folder of stills, counted once
    stills = tmp_path / "stills"
    for k in range(20):
        _img(stills / "crack" / "lot1" / f"c{k:02d}.png")
    (stills / "crack" / "lot1" / ".DS_Store").write_bytes(b"Bud1")
    ds = read_imagefolder(stills)
    assert ds.header["system_files_skipped"] == 1 and len(ds.records) == 20 and not ds.problems
