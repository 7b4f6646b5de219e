"""Dataset format: generation determinism, manifest round trip, validation of bad input, ImageFolder import."""

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from vialinspect.datasets.generate import generate
from vialinspect.datasets.imagefolder import read_imagefolder
from vialinspect.datasets.imageio import ImageError, png_bytes, read_gray
from vialinspect.datasets.manifest import MANIFEST_NAME, DatasetError, read_manifest, write_manifest
from vialinspect.datasets.reader import decode_check, open_dataset, summarize
from vialinspect.datasets.records import ContainerRecord, Defect, FillSpec, split_for
from vialinspect.datasets.sim.config import SimConfig


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def test_same_seed_gives_byte_identical_images_whatever_the_workers(tmp_path):
    cfg = SimConfig(frames=2)
    generate(tmp_path / "a", 6, cfg, seed=4, workers=1)
    generate(tmp_path / "b", 6, cfg, seed=4, workers=2)
    generate(tmp_path / "c", 6, cfg, seed=5, workers=2)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and len(a) >= 12
    assert a != c


def test_generated_dataset_validates_and_has_ground_truth(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    assert ds.kind == "manifest" and not ds.problems
    assert len(ds.records) == 24 and ds.frames_per_container == 3
    assert decode_check(ds) == []
    s = summarize(ds)
    assert s["frames"] == 72 and set(s["splits"]) <= {"train", "val", "test"}
    for r in ds.records:
        assert r.fill_height_mm and r.fill_spec and r.pixel_um == 40.0
        assert r.split == split_for(r.id)
        for d in r.defects:
            assert d.cls in r.classes and d.bbox is not None
            if d.cls == "particle":
                assert d.size_um and len(d.frame_bboxes) == 3
            if d.cls == "crack":
                assert d.length_mm and d.kind in ("neck", "shoulder", "body", "heel")
        if r.defects:
            mask = read_gray(tiny_dataset / r.mask)
            assert mask.shape == read_gray(tiny_dataset / r.frames[0]).shape
            values = set(np.unique(mask)) - {0}
            assert values == {d.mask_value for d in r.defects if (mask == d.mask_value).any()}
        else:
            assert r.mask is None


def test_manifest_round_trip(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a0.png", "a1.png", "b0.png", "b1.png"):
        cv2.imwrite(str(tmp_path / "img" / name), np.zeros((8, 4), np.uint8))
    recs = [
        ContainerRecord(id="a", frames=["img/a0.png", "img/a1.png"], classes=["particle", "crack"], split="val",
                        format="vial-2R", defects=[
                            Defect(cls="particle", bbox=(1, 2, 3, 4), frame_bboxes=[(1, 2, 3, 4), None],
                                   mask_value=1, kind="glass", size_um=120.5),
                            Defect(cls="crack", bbox=(0, 0, 2, 2), length_mm=2.5, kind="neck")],
                        nuisances=["bubbles"], fill_height_mm=13.7, fill_spec=FillSpec(13.69, 0.6), pixel_um=40.0,
                        image_size=(4, 8), extra={"axis_px": [2.0, 7.5]}),
        ContainerRecord(id="b", frames=["img/b0.png", "img/b1.png"]),
    ]
    write_manifest(tmp_path, {"frames_per_container": 2}, recs)
    ds = read_manifest(tmp_path)
    assert not ds.problems
    assert ds.records == recs
    assert ds.header["version"] == 1 and ds.header["frames_per_container"] == 2


def _manifest_with_rows(tmp_path: Path, rows: list) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / "img" / "ok.png"), np.full((10, 6), 128, np.uint8))
    lines = [json.dumps({"format": "vialinspect-dataset", "version": 1})]
    lines += [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (tmp_path / MANIFEST_NAME).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_bad_rows_are_named_with_line_id_and_reason(tmp_path):
    ok = {"id": "ok", "frames": ["img/ok.png"], "classes": []}
    root = _manifest_with_rows(tmp_path, [
        ok,
        {"id": "missing", "frames": ["img/nope.png"]},
        {"id": "badclass", "frames": ["img/ok.png"], "classes": ["scratch"]},
        {"id": "badnum", "frames": ["img/ok.png"], "fill_height_mm": "high"},
        {"id": "negsize", "frames": ["img/ok.png"], "classes": ["particle"],
         "defects": [{"class": "particle", "size_um": -3}]},
        {"id": "escape", "frames": ["../../etc/passwd"]},
        "{not json",
        ok,
        {"id": "badsplit", "frames": ["img/ok.png"], "split": "holdout"},
        {"id": "badbox", "frames": ["img/ok.png"], "classes": ["crack"],
         "defects": [{"class": "crack", "bbox": [5, 5, 1, 1]}]},
    ])
    ds = read_manifest(root)
    assert [r.id for r in ds.records] == ["ok"]
    msgs = [str(p) for p in ds.problems]
    assert "line 3, id missing: missing file img/nope.png" in msgs
    assert any("line 4, id badclass" in m and "unknown class 'scratch'" in m for m in msgs)
    assert any("line 5, id badnum" in m and "fill_height_mm must be a number" in m for m in msgs)
    assert any("id negsize" in m and "size_um must be positive" in m for m in msgs)
    assert any("id escape" in m and "relative path inside the dataset" in m for m in msgs)
    assert any(m.startswith("line 8:") and "not valid JSON" in m for m in msgs)
    assert any("line 9, id ok: duplicate id" == m for m in msgs)
    assert any("id badsplit" in m and "unknown split" in m for m in msgs)
    assert any("id badbox" in m and "not a box" in m for m in msgs)


def test_rows_of_wrong_types_are_problems_naming_the_field(tmp_path):
    ok = {"id": "ok", "frames": ["img/ok.png"]}
    particle = {"classes": ["particle"], "defects": [{"class": "particle"}]}
    root = _manifest_with_rows(tmp_path, [
        {**ok, "id": "quoted", "fill_height_mm": "13.7"},  # JSON says what is a number: "13.7" is text
        {**ok, "id": "flag", **particle, "defects": [{"class": "particle", "mask_value": True}]},
        {**ok, "id": "size", "image_size": [6, "10"]},
        {**ok, "id": "tags", "nuisances": "bubbles"},
        {**ok, "id": "fmt", "format": 3},
        {**ok, "id": "nan", "pixel_um": float("nan")},
        {**ok, "id": "spec", "fill_spec": {"target_mm": 13.7}},
        {**ok, "id": "obj", "nuisance_objects": [{"kind": "bubble"}]},
        {**ok, "id": 7},
        {**ok, "id": "frames", "frames": []},
        {**ok, "id": "kept", "image_size": [6.0, 10], "axis_px": [3.0, 9.5]},  # whole floats and unknown keys: as ever
    ])
    ds = read_manifest(root)
    assert [(r.id, r.image_size, r.extra) for r in ds.records] == [("kept", (6, 10), {"axis_px": [3.0, 9.5]})]
    msgs = [str(p) for p in ds.problems]
    assert msgs == [
        "line 2, id quoted: fill_height_mm must be a number, got '13.7'",
        "line 3, id flag: defects[0].mask_value must be a whole number, got True",
        "line 4, id size: image_size must be [width, height], two numbers, got [6, '10']",
        "line 5, id tags: nuisances must be a list, got 'bubbles'",
        "line 6, id fmt: format must be text, got 3",
        "line 7, id nan: pixel_um must be a finite number, got nan",
        "line 8, id spec: fill_spec.tolerance_mm is missing (required)",
        "line 9, id obj: nuisance_objects[0].tag is missing (required)",
        "line 10: id must be text, got 7",
        "line 11, id frames: frames must have at least 1 item(s), got []",
    ]


def test_published_row_schema_is_the_models():
    from vialinspect.datasets.manifest_row import ManifestRow, schema_text

    committed = Path(__file__).resolve().parents[1] / "docs" / "dataset_schema.json"
    assert committed.read_text(encoding="utf-8") == schema_text(), \
        "docs/dataset_schema.json is stale: vialinspect dataset schema --out docs/dataset_schema.json"
    schema = json.loads(schema_text())
    assert schema["required"] == ["id", "frames"] and schema["additionalProperties"] is True
    assert set(schema["properties"]) == {f.alias or n for n, f in ManifestRow.model_fields.items()}
    assert schema["$defs"]["DefectRow"]["properties"]["class"]["enum"] == ["particle", "crack", "fill_level"]


def test_foreign_or_unfinished_manifest_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"format": "something-else"}\n')
    with pytest.raises(DatasetError, match="not a vialinspect manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"format": "vialinspect-dataset", "version": 99}\n')
    with pytest.raises(DatasetError, match="version 99 is not supported"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    (tmp_path / (MANIFEST_NAME + ".partial")).write_text("")
    with pytest.raises(DatasetError, match="not finished"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no such directory"):
        open_dataset(tmp_path / "absent")


def test_truncated_and_empty_images_give_clear_errors(tmp_path):
    img = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(64, 48)
    cv2.imwrite(str(tmp_path / "full.png"), img)
    cv2.imwrite(str(tmp_path / "full.jpg"), img)
    for name in ("full.png", "full.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / ("cut_" + name)).write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all" * 10)
    assert read_gray(tmp_path / "full.png").shape == (64, 48)
    with pytest.raises(ImageError, match="truncated PNG"):
        read_gray(tmp_path / "cut_full.png")
    with pytest.raises(ImageError, match="truncated JPEG"):
        read_gray(tmp_path / "cut_full.jpg")
    with pytest.raises(ImageError, match="empty file"):
        read_gray(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="not a readable image"):
        read_gray(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="file not found"):
        read_gray(tmp_path / "nothing.png")


@pytest.mark.parametrize("compress", [True, False])
def test_png_bytes_is_lossless_for_every_kind_the_store_keeps(tmp_path, compress):
    rng = np.random.default_rng(3)
    smooth = (np.add.outer(np.arange(40), np.arange(30)) * 3).astype(np.uint8)  # what the 'up' filter packs
    cases = {
        "gray8": rng.integers(0, 256, (37, 23), dtype=np.uint8),
        "gray16": rng.integers(0, 65536, (9, 31), dtype=np.uint16),
        "bgr8": rng.integers(0, 256, (12, 7, 3), dtype=np.uint8),
        "bgra16": rng.integers(0, 65536, (5, 6, 4), dtype=np.uint16),
        "one_channel": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8),
        "one_pixel": np.array([[7]], np.uint8),
        "wide": rng.integers(0, 256, (2, 70_000), dtype=np.uint8),  # rows longer than a stored deflate block
        "smooth": smooth,
    }
    for name, img in cases.items():
        data = png_bytes(img, compress=compress)
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # OpenCV: BGR order kept
        assert back is not None and np.array_equal(back, img.reshape(back.shape)), name
        (tmp_path / f"{name}.png").write_bytes(data)
        if img.ndim == 2:
            assert np.array_equal(read_gray(tmp_path / f"{name}.png"), img), name
    stored, packed = png_bytes(smooth, compress=False), png_bytes(smooth, compress=True)
    assert len(stored) > smooth.size and len(packed) < len(stored) / 2
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError):
            png_bytes(bad, compress=compress)


def test_decode_check_finds_a_truncated_frame(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    victim = sorted((copy / "images").glob("*.png"))[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    problems = decode_check(open_dataset(copy))
    assert len(problems) == 1 and "truncated PNG" in str(problems[0]) and victim.name in str(problems[0])


def test_imagefolder_import_of_mixed_real_images(tmp_path):
    rng = np.random.default_rng(0)
    g8 = rng.integers(0, 255, (40, 30), dtype=np.uint8)
    g16 = (g8.astype(np.uint16) * 257)
    colour = np.dstack([g8, g8, g8])
    root = tmp_path / "real"
    for d in ("good", "particle", "crack", "fill_level", "notes"):
        (root / d).mkdir(parents=True)
    cv2.imwrite(str(root / "good" / "a.png"), g8)
    cv2.imwrite(str(root / "good" / "b16.png"), g16)
    cv2.imwrite(str(root / "particle" / "c.jpg"), colour)
    cv2.imwrite(str(root / "crack" / "d.bmp"), colour)
    cv2.imwrite(str(root / "fill_level" / "e.tif"), g16)
    (root / "good" / "readme.txt").write_text("not an image")
    ds = open_dataset(root)
    assert ds.kind == "imagefolder"
    classes = {r.id: r.classes for r in ds.records}
    assert classes == {"good/a.png": [], "good/b16.png": [], "particle/c.jpg": ["particle"],
                       "crack/d.bmp": ["crack"], "fill_level/e.tif": ["fill_level"]}
    assert any("notes" in str(p) for p in ds.problems)
    assert any("readme.txt" in str(p) for p in ds.problems)
    assert decode_check(ds) == []
    assert read_gray(root / "good" / "b16.png").dtype == np.uint16
    assert read_gray(root / "particle" / "c.jpg").ndim == 2


def test_imagefolder_with_split_folders_keeps_them(tmp_path):
    for split in ("train", "test"):
        for cls in ("good", "crack"):
            (tmp_path / split / cls).mkdir(parents=True)
            cv2.imwrite(str(tmp_path / split / cls / "x.png"), np.zeros((5, 5), np.uint8))
    ds = read_imagefolder(tmp_path)
    assert sorted((r.split, r.classes) for r in ds.records) == sorted(
        [("train", []), ("train", ["crack"]), ("test", []), ("test", ["crack"])])


def test_imagefolder_reads_class_folders_as_people_name_them(tmp_path):
    for d in ("Good", "Particles", "cracks", "Fill Level", "other"):
        (tmp_path / d).mkdir()
        cv2.imwrite(str(tmp_path / d / "x.png"), np.zeros((5, 5), np.uint8))
    ds = open_dataset(tmp_path)
    assert {r.id: r.classes for r in ds.records} == {"Good/x.png": [], "Particles/x.png": ["particle"],
                                                     "cracks/x.png": ["crack"], "Fill Level/x.png": ["fill_level"]}
    assert ds.header["folders_read_as"] == {"Fill Level": "fill_level", "Good": "good", "Particles": "particle",
                                            "cracks": "crack"}
    assert [p.message for p in ds.problems] == [
        "folder other is not a class (expected: good, particle, crack, fill_level); skipped"]


def test_class_folders_beside_split_folders_are_reported_not_lost_quietly(tmp_path):
    for d in ("Validation/OK", "train/good", "crack"):
        (tmp_path / d).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / d / "x.png"), np.zeros((5, 5), np.uint8))
    ds = read_imagefolder(tmp_path)
    assert sorted((r.split, r.id) for r in ds.records) == [("train", "train/good/x.png"),
                                                           ("val", "Validation/OK/x.png")]
    assert ds.header["folders_read_as"] == {"Validation": "val", "Validation/OK": "good"}
    assert len(ds.problems) == 1 and "class folder crack beside the split folders" in ds.problems[0].message


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpeg_is_read_upright_as_its_exif_orientation_says(tmp_path, orientation):
    from PIL import Image, ImageOps

    from vialinspect.training.data import image_size

    img = np.zeros((40, 20), np.uint8)
    img[2:8, 2:6] = 255  # a bright mark near the stored image's top-left corner
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    im.save(path, exif=exif, quality=100)
    got = read_gray(path)
    with Image.open(path) as shown:
        upright = np.asarray(ImageOps.exif_transpose(shown).convert("L"))
    assert got.shape == upright.shape == ((20, 40) if orientation >= 5 else (40, 20))
    assert np.abs(got.astype(int) - upright).max() <= 1
    rec = ContainerRecord(id="photo", frames=["photo.jpg"], classes=[], split="train")
    assert image_size(tmp_path, rec) == (got.shape[1], got.shape[0])  # the header's size agrees with the pixels
