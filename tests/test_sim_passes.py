"""Repeated acquisitions (``generate --passes N``): the same physical unit swirled and imaged again."""

import hashlib
import json
from pathlib import Path

import pytest

from vialinspect.cli import main
from vialinspect.datasets.generate import generate
from vialinspect.datasets.reader import open_dataset, summarize
from vialinspect.datasets.records import ContainerRecord, split_for, unit_id
from vialinspect.datasets.sim.config import SimConfig
from vialinspect.datasets.sim.reacquire import reacquire
from vialinspect.datasets.sim.scene import sample_scene

# Every nuisance on, so that surface bubbles, silicone oil and lot codes are all re-acquired somewhere.
RICH = SimConfig(frames=2, defect_rate=1.0).with_nuisance_rates(
    {"bubbles": 1.0, "meniscus_bubbles": 1.0, "stopper_bubble": 1.0, "silicone_oil": 0.5, "lot_code": 1.0,
     "scratch": 1.0, "dust": 1.0})
TINY = SimConfig(formats=("syringe-1mL",), frames=1, defect_rate=1.0, class_weights=(1.0, 0.0, 0.0))


def _unit(obj):
    return obj.kind, obj.size_um, obj.shape_seed, obj.tag, obj.track.vz_mm_s, obj.track.drift


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def test_acquisition_0_is_the_scene_itself():
    scene = sample_scene(RICH, 3, 5)
    assert reacquire(scene, RICH, 5, 0) is scene
    with pytest.raises(ValueError, match="acquisition"):
        reacquire(scene, RICH, 5, -1)


def test_an_acquisition_keeps_the_unit_and_redraws_how_it_meets_the_camera():
    for index in range(6):
        scene = sample_scene(RICH, index, 5)
        again = reacquire(scene, RICH, 5, 2)
        assert again == reacquire(scene, RICH, 5, 2)  # reproducible
        assert again != reacquire(scene, RICH, 5, 3)
        # The physical unit stays.
        for name in ("index", "format", "frames", "product", "fill_volume_ml", "fill_height_mm", "fill_defect",
                     "meniscus_rise_mm", "stopper_gap_mm", "marks"):
            assert getattr(again, name) == getattr(scene, name), name
        assert again.classes == scene.classes and again.nuisance_tags == scene.nuisance_tags
        assert [_unit(o) for o in again.objects] == [_unit(o) for o in scene.objects]
        # The acquisition changes.
        assert again.swirl != scene.swirl and again.pose != scene.pose and again.lighting != scene.lighting
        assert again.noise_seed != scene.noise_seed
        for old, new in zip(scene.objects, again.objects, strict=True):
            assert new.track.phi0 != old.track.phi0 and new.track.rho_mm != old.track.rho_mm
            if old.tag in ("meniscus_bubbles", "stopper_bubble"):
                assert new.track.z0_mm == old.track.z0_mm  # still at the surface
            else:
                assert new.track.z0_mm != old.track.z0_mm
            lo, hi = scene.liquid_z_range()
            assert lo - 1.0 < new.track.z0_mm <= hi and new.track.rho_mm < scene.format.inner_radius_mm
    tags = {o.tag for i in range(6) for o in sample_scene(RICH, i, 5).objects}
    assert {"particle", "bubbles", "meniscus_bubbles"} <= tags


def test_generate_passes_writes_acquisitions_of_each_unit(tmp_path):
    stats = generate(tmp_path / "p1", 4, TINY, seed=2, workers=1, passes=3)
    assert stats.containers == 12 and stats.passes == 3
    generate(tmp_path / "p2", 4, TINY, seed=2, workers=2, passes=3)
    generate(tmp_path / "plain", 4, TINY, seed=2, workers=1)
    a, b, plain = _digest(tmp_path / "p1"), _digest(tmp_path / "p2"), _digest(tmp_path / "plain")
    assert a == b and len(a) >= 12
    # Pass 0 is the plain dataset's container, byte for byte; later passes are other images of it.
    for name, digest in plain.items():
        cid = Path(name).name[:7]  # c000012
        again = name.replace(cid, f"{cid}_a00")
        assert a[again] == digest, name
        assert a[name.replace(cid, f"{cid}_a01")] != digest
    header = json.loads((tmp_path / "p1" / "manifest.jsonl").read_text().splitlines()[0])
    assert header["passes"] == 3 and header["containers"] == 4
    assert "passes" not in json.loads((tmp_path / "plain" / "manifest.jsonl").read_text().splitlines()[0])

    ds = open_dataset(tmp_path / "p1")
    assert not ds.problems and len(ds.records) == 12
    assert [r.id for r in ds.records[:3]] == ["c000000_a00", "c000000_a01", "c000000_a02"]
    by_unit: dict[str, list[ContainerRecord]] = {}
    for r in ds.records:
        assert r.extra["unit"] == r.id.split("_")[0] == unit_id(r)
        assert r.frames == [f"images/{r.id}_f0.png"] and r.mask == f"masks/{r.id}.png"
        by_unit.setdefault(unit_id(r), []).append(r)
    for unit, recs in by_unit.items():
        assert [r.extra["acquisition"] for r in recs] == [0, 1, 2]
        assert {r.split for r in recs} == {split_for(unit)}
        assert len({(r.fill_height_mm, tuple(r.classes)) for r in recs}) == 1
        sizes = {tuple(sorted(d.size_um for d in r.defects)) for r in recs}
        assert len(sizes) == 1  # the same particles ...
        assert len({str(r.defects[0].frame_bboxes) for r in recs}) == 3  # ... seen where each swirl left them
    assert summarize(ds)["units"] == 4 and "units" not in summarize(open_dataset(tmp_path / "plain"))
    plain_rec = open_dataset(tmp_path / "plain").records[0]
    assert "unit" not in plain_rec.extra and unit_id(plain_rec) == plain_rec.id == "c000000"


def test_generate_refuses_a_bad_number_of_passes(tmp_path):
    for passes in (0, 101, True):
        with pytest.raises(ValueError, match="passes"):
            generate(tmp_path / "x", 1, TINY, workers=1, passes=passes)


def _write(root: Path, rows: list[dict]) -> None:
    (root / "f.png").write_bytes(b"")  # presence only: the check below does not decode
    lines = [{"format": "vialinspect-dataset", "version": 1}, *rows]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_check_rejects_the_same_acquisition_of_a_unit_twice(tmp_path, capsys):
    _write(tmp_path, [{"id": "a", "frames": ["f.png"], "unit": "U1", "acquisition": 0},
                      {"id": "b", "frames": ["f.png"], "unit": "U1", "acquisition": 1},
                      {"id": "c", "frames": ["f.png"], "unit": "U1", "acquisition": 1},
                      {"id": "d", "frames": ["f.png"], "unit": "U2", "acquisition": 1}])
    ds = open_dataset(tmp_path)
    assert [str(p) for p in ds.problems] == ["line 4, id c: duplicate acquisition 1 of unit U1"]
    assert [r.extra for r in ds.records[:1]] == [{"unit": "U1", "acquisition": 0}]
    assert main(["dataset", "check", str(tmp_path), "--quick"]) == 1
    out = capsys.readouterr().out
    assert "2 physical units" in out and "duplicate acquisition 1 of unit U1" in out


def test_unit_and_acquisition_are_typed(tmp_path):
    _write(tmp_path, [{"id": "a", "frames": ["f.png"], "unit": "", "acquisition": 0},
                      {"id": "b", "frames": ["f.png"], "unit": "U1", "acquisition": -1},
                      {"id": "c", "frames": ["f.png"], "unit": "U1", "acquisition": "2"}])
    problems = [str(p) for p in open_dataset(tmp_path).problems]
    assert len(problems) == 3
    assert "unit" in problems[0] and "acquisition" in problems[1] and "acquisition" in problems[2]


def test_cli_generate_passes(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "q"), "--containers", "2", "--frames", "1", "--formats",
                 "syringe-1mL", "--passes", "2", "--workers", "1"]) == 0
    assert "wrote 4 containers (2 units x 2 acquisitions)" in capsys.readouterr().out
    for bad in ("0", "101"):
        assert main(["generate", "--out", str(tmp_path / "r"), "--containers", "1", "--passes", bad]) == 2
        err = capsys.readouterr().err
        assert "--passes must be from 1 to 100" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_varied_optics_keep_the_units_camera_for_every_acquisition(tmp_path):
    cfg = SimConfig(formats=("vial-2R",), frames=1, optics="varied")
    generate(tmp_path / "v", 3, cfg, seed=4, workers=1, passes=2)
    scales: dict[str, set[float]] = {}
    for r in open_dataset(tmp_path / "v").records:
        scales.setdefault(unit_id(r), set()).add(r.pixel_um)
    assert all(len(s) == 1 for s in scales.values()) and len(set().union(*scales.values())) == 3
