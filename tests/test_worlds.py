"""benchmarks/worlds.py: simulated 'new production lines' written as plain ImageFolder sets."""

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from vialinspect.datasets.imagefolder import read_imagefolder
from vialinspect.datasets.imageio import read_gray
from vialinspect.datasets.reader import decode_check, open_dataset
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.datasets.sim.formats import FORMATS
from vialinspect.datasets.sim.render import framing_for

from .benchmark_module import benchmark

N_TRAIN, N_VAL, N_TEST = 8, 4, 4


@pytest.fixture(scope="module")
def mod():
    with benchmark("worlds") as m:
        yield m


@pytest.fixture(scope="module")
def built(mod, tmp_path_factory):
    """Each world built once, tiny, in one process: {name: (root, summary)}."""
    base = tmp_path_factory.mktemp("worlds")
    out = {}
    for name in ("w65", "w72", "w58"):
        root = base / name
        out[name] = (root, mod.build_world(name, root, N_TRAIN, N_TEST, seed=3, workers=1,
                                           n_val=N_VAL if name == "w58" else 0))
    return out


def _truth(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "truth.jsonl").read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_worlds_differ_from_the_default_and_each_other_and_only_w58_is_held_out(mod):
    assert {"w65", "w72", "w58"} <= set(mod.WORLDS)
    default = SimConfig()
    seen = set()
    for w in mod.WORLDS.values():
        assert w.held_out == (w.name == "w58")
        cam = w.camera_config()
        assert cam.pixel_um != default.camera.pixel_um
        assert (cam.backlight_dn, cam.blur_sigma_px) != (default.camera.backlight_dn, default.camera.blur_sigma_px)
        assert w.encoding != "png8" and w.encoding in mod.ENCODINGS
        # particles ~3-13 px across, cracks ~20-100 px long at the world's pixel scale
        lo, hi = (s / w.pixel_um for s in w.particle_size_um)
        assert 2.5 <= lo <= 3.5 and 12 <= hi <= 14, (w.name, lo, hi)
        lo, hi = (mm * 1000 / w.pixel_um for mm in w.crack_length_mm)
        assert 18 <= lo <= 22 and 95 <= hi <= 105, (w.name, lo, hi)
        cfg = w.sim_config("particle", w.formats[0])
        cfg.validate()
        assert cfg.frames == 1 and cfg.camera.pixel_um == w.pixel_um
        seen.add((w.pixel_um, w.encoding, w.formats))
    assert len(seen) == len(mod.WORLDS)
    w65, w72, w58 = (mod.WORLDS[n] for n in ("w65", "w72", "w58"))
    assert w65.encoding == "png16" and set(w65.formats) == {"vial-2R", "vial-10R"}
    assert w72.encoding == "jpeg_tint" and set(w72.formats) == {"syringe-1mL", "vial-10R"}
    assert w58.encoding == "mixed" and set(w58.formats) == set(FORMATS)
    # silicone oil only on syringes in w72
    assert dict(w72.sim_config("good", "syringe-1mL").nuisance_rates).get("silicone_oil", 0) > 0
    assert dict(w72.sim_config("good", "vial-10R").nuisance_rates).get("silicone_oil", 0) == 0


def test_imagefolder_reads_back_with_the_right_counts_and_no_problems(mod, built):
    for name, (root, summary) in built.items():
        assert (root / "truth.jsonl").is_file() and (root / "world.json").is_file()  # root files, ignored below
        ds = read_imagefolder(root)
        assert ds.problems == [], (name, ds.problems)
        opened = open_dataset(root)  # what `vialinspect train --data` opens: truth.jsonl is not a manifest
        assert opened.kind == "imagefolder" and len(opened.records) == len(ds.records)
        assert decode_check(opened) == []
        n = {"train": N_TRAIN, "val": N_VAL if name == "w58" else 0, "test": N_TEST}
        assert {r.split for r in ds.records} == {s for s, k in n.items() if k}
        assert (root / "val").exists() == (name == "w58")
        for split, k in n.items():
            if not k:
                continue
            got = {c: 0 for c in mod.CLASSES}
            for r in ds.records:
                if r.split == split:
                    assert len(r.classes) <= 1
                    got[r.classes[0] if r.classes else "good"] += 1
            assert got == mod.class_quota(k) == summary["counts"][split], (name, split, got)
        meta = json.loads((root / "world.json").read_text())
        assert meta["world"]["name"] == name and meta["seed"] == 3 and meta["counts"] == summary["counts"]
        assert meta["world"]["held_out"] == (name == "w58")
    q = mod.class_quota(200)
    assert q["good"] == 100 and sorted(q[c] for c in ("particle", "crack", "fill_level")) == [33, 33, 34]


def test_truth_rows_match_the_files_and_hold_one_defect_class(mod, built):
    for name, (root, _) in built.items():
        world = mod.WORLDS[name]
        rows = _truth(root)
        images = {p for p in _files(root) if "/" in p}
        order = [("train", "val", "test").index(r["split"]) for r in rows]
        assert order == sorted(order)  # split by split, each in index order
        assert {r["path"] for r in rows} == images and len(rows) == len(images)
        for r in rows:
            split, cls, _file = r["path"].split("/")
            assert (r["split"], r["class"]) == (split, cls)
            assert r["format"] in world.formats and r["pixel_um"] == world.pixel_um
            assert r["path"].endswith(mod.SUFFIX[r["encoding"]])
            if cls == "good":
                assert r["defects"] == []
            else:
                assert r["defects"] and {d["class"] for d in r["defects"]} == {cls}
                assert all(d["bbox"] is not None for d in r["defects"])
                for d in r["defects"]:
                    if cls == "particle":
                        assert d["size_um"] > 0
                    if cls == "crack":
                        assert d["length_mm"] > 0
    # no image repeats, within or across the splits
    digests = [hashlib.sha256(b).hexdigest() for root, _ in built.values()
               for p, b in _files(root).items() if "/" in p]
    assert len(set(digests)) == len(digests)


def test_each_encoding_reads_back_as_2d_grey_at_the_worlds_pixel_scale(mod, built):
    dtypes = {"png8": np.uint8, "png16": np.uint16, "jpeg_tint": np.uint8, "bmp": np.uint8}
    encodings, vial2r_widths = set(), {}
    for name, (root, _) in built.items():
        world = mod.WORLDS[name]
        for r in _truth(root):
            img = read_gray(root / r["path"])
            assert img.ndim == 2 and img.dtype == dtypes[r["encoding"]], (r["path"], img.shape, img.dtype)
            fr = framing_for(FORMATS[r["format"]], world.pixel_um)
            assert img.shape == (fr.height, fr.width) and r["image_size"] == [fr.width, fr.height]
            if r["encoding"] == "png16":
                assert img.max() > 255 and len(np.unique(img & 0xFF)) > 100  # real 16-bit data, not byte-shifted
            if r["encoding"] == "jpeg_tint":
                raw = cv2.imread(str(root / r["path"]), cv2.IMREAD_UNCHANGED)
                assert raw.ndim == 3 and raw.shape[2] == 3
                b, g, red = (float(raw[:, :, k].mean()) for k in range(3))
                tint = world.tint
                assert (b < g < red) if tint[0] < tint[2] else (b > g > red)
            encodings.add(r["encoding"])
            if r["format"] == "vial-2R":
                vial2r_widths[name] = img.shape[1]
    assert encodings == set(mod.SINGLE_ENCODINGS)  # w58's mixed draw hit every one
    default_w = framing_for(FORMATS["vial-2R"], CameraConfig().pixel_um).width
    assert vial2r_widths["w65"] == framing_for(FORMATS["vial-2R"], 65.0).width < default_w
    assert vial2r_widths["w58"] < default_w and vial2r_widths["w65"] < vial2r_widths["w58"]


def test_same_seed_gives_byte_identical_files_whatever_the_worker_count(mod, tmp_path):
    a = mod.build_world("w58", tmp_path / "one", 6, 4, seed=9, workers=1, n_val=2)
    b = mod.build_world("w58", tmp_path / "two", 6, 4, seed=9, workers=2, n_val=2)
    assert a["counts"] == b["counts"] and b["workers"] == 2
    fa, fb = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert fa.keys() == fb.keys() and len(fa) == 6 + 4 + 2 + 2
    assert all(fa[k] == fb[k] for k in fa)
    c = mod.build_world("w58", tmp_path / "other", 6, 4, seed=10, workers=1, n_val=2)
    assert c["images"] == 12 and _files(tmp_path / "other")["truth.jsonl"] != fa["truth.jsonl"]


def test_further_good_test_units_leave_the_other_units_as_they_were(mod, tmp_path):
    a = mod.build_world("w65", tmp_path / "plain", 2, 4, seed=4, workers=1)
    b = mod.build_world("w65", tmp_path / "more", 2, 4, seed=4, workers=1, n_test_good=3)
    fa, fb = _files(tmp_path / "plain"), _files(tmp_path / "more")
    extra = sorted(set(fb) - set(fa) - {"truth.jsonl", "world.json"})
    assert [(Path(k).parent.as_posix(), Path(k).stem) for k in extra] == [
        ("test/good", f"w65_testgood_{i:06d}") for i in range(3)]
    assert all(fb[k] == fa[k] for k in fa if k not in ("truth.jsonl", "world.json"))
    assert b["counts"]["test"]["good"] == a["counts"]["test"]["good"] + 3 and b["images"] == a["images"] + 3
    assert json.loads(fb["world.json"])["test_good"] == 3
    rows = [r for r in _truth(tmp_path / "more") if "testgood" in r["path"]]
    assert len(rows) == 3 and all(r["split"] == "test" and r["class"] == "good" and not r["defects"] for r in rows)
    assert len({fb[k] for k in extra}) == 3 and not {fb[k] for k in extra} & set(fa.values())
    c = mod.build_world("w65", tmp_path / "fewer", 2, 4, seed=4, workers=1, n_test_good=1)  # the first N: the same
    assert _files(tmp_path / "fewer")[extra[0]] == fb[extra[0]]
    with pytest.raises(ValueError, match=">= 0"):
        mod.build_world("w65", tmp_path / "bad", 2, 4, workers=1, n_test_good=-1)
    assert c["images"] == a["images"] + 1


def test_refuses_a_non_empty_out_and_bad_arguments(mod, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        mod.build_world("w65", out, 2, 2, workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="unknown world"):
        mod.build_world("w99", tmp_path / "new", 2, 2, workers=1)
    with pytest.raises(ValueError, match=">= 0"):
        mod.build_world("w65", tmp_path / "new", -1, 2, workers=1)
    with pytest.raises(ValueError, match="encoding"):
        mod.World(name="x", description="", pixel_um=50.0, formats=("vial-2R",), encoding="gif",
                  particle_size_um=(150.0, 650.0), crack_length_mm=(1.0, 5.0))


def test_cli_lists_worlds_and_reports_a_user_mistake_in_one_line(mod, tmp_path, capsys):
    assert mod.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in mod.WORLDS)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("x")
    for argv in (["--world", "w65", "--out", str(out)], ["--world", "nope", "--out", str(tmp_path / "n")],
                 ["--world", "w65"], ["--world", "w65", "--out", str(tmp_path / "n"), "--train", "-3"]):
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    assert mod.main(["--world", "w72", "--out", str(tmp_path / "cli"), "--train", "2", "--test", "2",
                     "--workers", "1"]) == 0
    assert "4 images" in capsys.readouterr().out
    assert len(read_imagefolder(tmp_path / "cli").records) == 4
