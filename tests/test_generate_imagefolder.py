"""``generate --layout imagefolder``: the simulator's containers as a plant hands them over (class folders, image-level
labels, no masks, truth.jsonl), read back by the ImageFolder reader, pixel for pixel the manifest layout's frames."""

import json
from collections import Counter
from pathlib import Path

from vialinspect.cli import main
from vialinspect.datasets.imagefolder import read_imagefolder
from vialinspect.datasets.imagefolder_writer import PARTIAL_DIR, TRUTH_NAME, folder_class
from vialinspect.datasets.manifest import read_manifest
from vialinspect.datasets.reader import open_dataset
from vialinspect.datasets.sim.look import LOOK_NAME

# Coarse pixels (120 µm/px) keep the frames small; 12 ids hold train and test units.
TINY = ["--containers", "12", "--formats", "vial-2R", "--pixel-um", "120", "--defect-rate", "0.7", "--seed", "3"]


def _generate(out: Path, *args: str) -> None:
    assert main(["generate", "--out", str(out), *TINY, *args]) == 0


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _check_layout(tmp_path: Path, frames: int, capsys) -> None:
    manifest, folder = tmp_path / "manifest", tmp_path / "folder"
    _generate(manifest, "--frames", str(frames), "--workers", "1")
    capsys.readouterr()
    _generate(folder, "--frames", str(frames), "--workers", "2", "--layout", "imagefolder")
    printed = capsys.readouterr().out
    truth = [json.loads(line) for line in (folder / TRUTH_NAME).read_text().splitlines()]
    want = read_manifest(manifest).records
    ds = read_imagefolder(folder)
    assert ds.problems == []  # truth.jsonl at the root is not read as a unit
    assert not (folder / "masks").exists() and not (folder / "images").exists() and not (folder / PARTIAL_DIR).exists()
    # Each unit where a plant's reject bin puts it: its split, the first of particle, crack, fill_level it has.
    want_folders = Counter(folder_class(r.classes) for r in want)
    assert Counter(r.classes[0] if r.classes else "good" for r in ds.records) == want_folders
    several = sum(len(r.classes) > 1 for r in want)
    assert f"{several} with several defect classes" in printed and f"good {want_folders['good']}," in printed
    assert {len(r.frames) for r in ds.records} == {frames} and len(ds.records) == len(want)
    got = {r.id: r for r in ds.records}
    suffix = ".png" if frames == 1 else ""  # one frame: the image is the unit; several: its folder
    assert [t["path"] for t in truth] == [f"{r.split}/{folder_class(r.classes)}/{r.id}{suffix}" for r in want]
    assert set(got) == {t["path"] for t in truth}
    for rec, row in zip(want, truth, strict=True):
        unit = got[row["path"]]
        assert unit.split == rec.split and row["class"] == folder_class(rec.classes) and row["classes"] == rec.classes
        assert row["pixel_um"] == 120.0 and row["format"] == "vial-2R"
        assert [d["class"] for d in row["defects"]] == [d.cls for d in rec.defects]
        assert [d["size_um"] for d in row["defects"]] == [d.size_um for d in rec.defects]
        # the same frames, byte for byte (the same encoder), in order
        assert [(folder / f).read_bytes() for f in unit.frames] == [(manifest / f).read_bytes() for f in rec.frames]


def test_one_frame_per_container(tmp_path, capsys):
    _check_layout(tmp_path, 1, capsys)
    assert all(p.is_file() for p in (tmp_path / "folder").glob("*/*/*"))  # OUT/<split>/<class>/<id>.png


def test_sequences_one_folder_per_unit(tmp_path, capsys):
    _check_layout(tmp_path, 3, capsys)
    units = list((tmp_path / "folder").glob("*/*/*"))
    assert units and all(sorted(f.name for f in u.iterdir()) == ["f0.png", "f1.png", "f2.png"] for u in units)


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    _generate(tmp_path / "a", "--frames", "2", "--workers", "1", "--layout", "imagefolder")
    _generate(tmp_path / "b", "--frames", "2", "--workers", "2", "--layout", "imagefolder")
    a = _files(tmp_path / "a")
    assert a == _files(tmp_path / "b") and TRUTH_NAME in a


def test_like_and_overwrite(tmp_path, capsys):
    line = tmp_path / "line"
    assert main(["generate", "--out", str(line), "--layout", "imagefolder", "--containers", "8", "--frames", "2",
                 "--formats", "vial-2R", "--pixel-um", "80", "--defect-rate", "0", "--seed", "1"]) == 0
    sim = tmp_path / "sim"
    # --like reads the line's good/ folders (any split) and renders through its camera, as an ImageFolder too
    assert main(["generate", "--like", str(line), "--out", str(sim), "--layout", "imagefolder", "--containers", "4",
                 "--workers", "1"]) == 0
    assert "the line's look" in capsys.readouterr().out
    look = json.loads((sim / LOOK_NAME).read_text())
    ds = read_imagefolder(sim)
    assert ds.problems == [] and ds.header["frames_per_container"] == 2  # the line's frames per unit
    assert {json.loads(t)["pixel_um"] for t in (sim / TRUTH_NAME).read_text().splitlines()} == {look["pixel_um"]}
    # --overwrite replaces a generated ImageFolder, also with the other layout, and leaves nothing of the first
    assert main(["generate", "--out", str(sim), *TINY, "--frames", "1", "--overwrite", "--workers", "1"]) == 0
    assert open_dataset(sim).kind == "manifest"
    assert sorted(p.name for p in sim.iterdir()) == ["images", "manifest.jsonl", "masks"]
    assert main(["generate", "--out", str(sim), *TINY, "--frames", "1", "--overwrite", "--layout", "imagefolder"]) == 0
    assert sorted(p.name for p in sim.iterdir()) == sorted(["train", "test", TRUTH_NAME])
    assert open_dataset(sim).kind == "imagefolder"


def test_refused_combinations_are_one_line(tmp_path, capsys):
    out = tmp_path / "x"
    for args, msg in ((["--passes", "2"], "--passes"), (["--frames", "17"], "at most 16 frames")):
        assert main(["generate", "--out", str(out), "--layout", "imagefolder", *TINY, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vialinspect: error: ") and msg in err and err.count("\n") == 1, err
        assert "Traceback" not in err
    assert not out.exists()
    # a folder that holds no generated dataset is not overwritten
    (tmp_path / "mine" / "good").mkdir(parents=True)
    assert main(["generate", "--out", str(tmp_path / "mine"), "--layout", "imagefolder", *TINY, "--overwrite"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine" / "good").is_dir()
