"""The whole loop at tiny size: generate → train → export → registry → station → review → retrain → gate →
promote → the running station takes the new model up between containers. Plus the leak refusal."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from vialinspect.cli import main
from vialinspect.datasets.generate import generate
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.export.registry import Registry
from vialinspect.inspection_station.qa import audit, users
from vialinspect.inspection_station.qa.audit import ReviewDB
from vialinspect.inspection_station.qa.promotion import promote
from vialinspect.inspection_station.qa.review import ReviewService
from vialinspect.inspection_station.station import StationOptions, run_station
from vialinspect.inspection_station.store import RecordStore

ADMIN_PW = "admin-password-333"
REVIEWER_PW = "alice-password-1"
RECIPE = "test-2R"
SIM = "sim://?seed=7&pixel_um=120&defect_rate=0.5"


@pytest.fixture(scope="module")
def line(tiny_run, coarse_data, tmp_path_factory):
    """A registry whose current model is the tiny one, a recipe, a store with users, a qualification set."""
    d = tmp_path_factory.mktemp("loop")
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(d / "model"),
                 "--parity-data", str(coarse_data), "--parity-count", "2"]) == 0
    (d / "recipe.toml").write_text(
        f'name = "{RECIPE}"\nformat = "vial-2R"\nmodel = "model"\nframes = 2\ndeadline_ms = 5000\n'
        "frame_size = [150, 308]\nbatch_max = 4\nsample_accepted = 0.0\nmin_free_mb = 0\n")
    assert main(["registry", "add", str(d / "model"), "--registry", str(d / "reg"), "--reason", "first model"]) == 0
    store = d / "store"
    RecordStore(store).close()
    db = ReviewDB(store)
    users.add_user(db, "root", "Rita Admin", "admin", ADMIN_PW, actor="os:test")
    users.add_user(db, "alice", "Alice Smith", "reviewer", REVIEWER_PW, actor="os:test")
    reg = Registry(d / "reg")
    promote(store, reg, reg.versions()[0], RECIPE, "root", ADMIN_PW, "initial qualified model")
    generate(d / "qual", 16, SimConfig(frames=2, defect_rate=0.5, camera=CameraConfig(pixel_um=120.0)), seed=99,
             workers=1)
    (d / "train.json").write_text(json.dumps({"batch_size": 4, "workers": 0, "threads": 1, "crop": 64,
                                              "crop_batch": 4, "lr": 1e-3}))
    return d


def _station(d, n, rate=0, **kw):
    opts = StationOptions(recipe=d / "recipe.toml", source=f"{SIM}&rate={rate}", store=d / "store",
                          max_containers=n, line="none", quiet=True, registry=d / "reg", threads=1, **kw)
    return run_station(opts, print_fn=lambda *a, **k: None)


def test_station_review_retrain_gate(line, coarse_data):
    d = line
    reg = Registry(d / "reg")
    champion = reg.current(RECIPE)
    s = _station(d, 24)
    assert s["containers"] == 24 and s["model_version"] == champion
    with ReviewService(d / "store") as svc:
        queue = svc.queue()
        assert queue, "the tiny model rejected nothing: nothing to review"
        for i, item in enumerate(queue):
            if i == 0:
                svc.sign_review("alice", REVIEWER_PW, item.container_id, "confirmed_defect", "particle")
            else:
                svc.sign_review("alice", REVIEWER_PW, item.container_id, "false_reject", comment="nuisance")
    # Fine-tuning: the tiny model's false rejects are too few for a motion veto (tests/test_motion_veto.py has one)
    rc = main(["retrain", "--method", "fine-tune", "--store", str(d / "store"), "--base-data", str(coarse_data),
               "--registry", str(d / "reg"),
               "--qualification", str(d / "qual"), "--recipe", str(d / "recipe.toml"), "--work", str(d / "work"),
               "--epochs", "1", "--base-sample", "20", "--config", str(d / "train.json")])
    assert rc in (0, 1)  # 0: candidate, 1: refused by the gate; either way everything below was written
    challengers = [v for v in reg.versions() if v != champion]
    assert len(challengers) == 1
    card = reg.card(challengers[0])
    assert card["status"] == ("candidate" if rc == 0 else "rejected")
    assert card["parent_version"] == champion and card["gate"]["champion"] == champion
    rt = card["retraining"]
    assert rt["reviewed_containers"] == len(queue) and rt["reviewed_confirmed"] == 1
    assert rt["base_containers"] == 20 and len(rt["qualification_hash"]) == 64
    reports = reg.reports_dir(challengers[0])
    for f in ("gate.md", "gate.json", "comparison.md", "challenger/report.json", "champion/report.json"):
        assert (reports / f).is_file(), f
    gate = json.loads((reports / "gate.json").read_text())
    assert gate["passed"] == (rc == 0) and any(c["name"].startswith("false-reject") for c in gate["checks"])
    db = ReviewDB(d / "store")
    retrained = audit.entries(db, action=audit.MODEL_RETRAINED)
    assert len(retrained) == 1 and challengers[0] in (retrained[0].new_value or "")
    assert audit.verify(db).ok
    assert reg.verify() == []


def test_qualification_data_in_the_training_set_is_refused(line, coarse_data, capsys):
    d = line
    before = Registry(d / "reg").versions()
    rc = main(["retrain", "--method", "fine-tune", "--store", str(d / "store"), "--base-data", str(coarse_data),
               "--registry", str(d / "reg"),
               "--qualification", str(coarse_data), "--recipe", RECIPE, "--work", str(d / "work_leak"),
               "--epochs", "1", "--base-sample", "0", "--config", str(d / "train.json")])
    assert rc == 2
    assert "also in the training set" in capsys.readouterr().err
    assert Registry(d / "reg").versions() == before


def test_running_station_takes_up_a_promotion_between_containers(line, monkeypatch):
    d = line
    reg = Registry(d / "reg")
    old = reg.current(RECIPE)
    from vialinspect.export.package import load_package, with_thresholds

    newer = with_thresholds(load_package(reg.package_dir(old)), {"crack": 0.99}, d / "pkg_b", reason="test")
    vb = reg.add(newer.path, "os:test", "threshold change")
    reg.record_gate(vb, old, True, {"note": "gated by the test"}, "os:test")
    with RecordStore(d / "store", readonly=True) as st:
        done_before = st.count()
    result = {}

    def run():
        result["s"] = _station(d, 40, rate=900, registry_poll_s=0.1)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with RecordStore(d / "store", readonly=True) as st:
                if st.count() >= done_before + 10:
                    break
        except Exception:  # noqa: BLE001 - the station may not have created its tables yet
            pass
        time.sleep(0.05)
    promote(d / "store", reg, vb, RECIPE, "root", ADMIN_PW, "test promotion")
    t.join(timeout=120)
    s = result["s"]
    assert s["containers"] == 40 and s["models_used"] == [old, vb]
    with RecordStore(d / "store", readonly=True) as st:
        rows = sorted(st.iter_decisions(), key=lambda r: r["sequence"])
    ids = [r["container_id"] for r in rows]
    assert len(ids) == len(set(ids)) == done_before + 40
    versions = [r["model_version"] for r in rows[done_before:]]
    switch = versions.index(vb)
    assert 0 < switch and set(versions[:switch]) == {old} and set(versions[switch:]) == {vb}
    monkeypatch.setattr("sys.stdin", io.StringIO(ADMIN_PW + "\n"))
    assert main(["registry", "rollback", "--registry", str(d / "reg"), "--recipe", RECIPE, "--store",
                 str(d / "store"), "--user", "root", "--reason", "test rollback", "--password-stdin"]) == 0
    assert reg.current(RECIPE) == old


def test_a_registry_model_that_does_not_fit_the_recipe_is_refused(line, tmp_path):
    from vialinspect.inspection_station.recipe import RecipeError

    text = (line / "recipe.toml").read_text().replace("frames = 2", "frames = 3").replace('model = "model"',
                                                                                        f'model = "{line}/model"')
    (tmp_path / "r3.toml").write_text(text)
    opts = StationOptions(recipe=tmp_path / "r3.toml", source=f"{SIM}&rate=0", store=tmp_path / "store",
                          max_containers=1, line="none", quiet=True, registry=line / "reg")
    with pytest.raises(RecipeError, match="takes 2 frame"):
        run_station(opts, print_fn=lambda *a, **k: None)


def test_a_share_of_reviewed_defects_is_held_out_of_training_for_holding_detection(coarse_data, tmp_path):
    from vialinspect.datasets.reader import open_dataset
    from vialinspect.training.retrain import RetrainConfig, RetrainError, build_training_set

    base = open_dataset(coarse_data)
    reviewed = open_dataset(coarse_data)  # stands in for a review export: defects and good units
    confirmed = [r for r in reviewed.records if r.classes]
    cfg = RetrainConfig(recipe=RECIPE, base_sample=10, holdout_reviewed=0.5)
    rows, info = build_training_set(base, reviewed, tmp_path / "set", cfg, frames=2)
    held = [r for r in rows if r.extra.get("held_out")]
    assert info["reviewed_held_out"] == len(held) and 0 < len(held) < len(confirmed)
    assert all(r.split == "test" and r.classes for r in held)  # never trained on, never in the FRR budget
    assert all(r.split == "train" for r in rows if r.extra.get("source") == "review" and not r.extra.get("held_out"))
    written = open_dataset(tmp_path / "set")
    assert {r.id for r in written.split("test")} == {r.id for r in held}
    again, _ = build_training_set(base, reviewed, tmp_path / "set2", cfg, frames=2)
    assert [r.id for r in again if r.extra.get("held_out")] == [r.id for r in held]  # deterministic by id
    none, info0 = build_training_set(base, reviewed, tmp_path / "set3",
                                     RetrainConfig(recipe=RECIPE, base_sample=10, holdout_reviewed=0.0), frames=2)
    assert info0["reviewed_held_out"] == 0
    with pytest.raises(RetrainError, match="holdout_reviewed"):
        build_training_set(base, reviewed, tmp_path / "set4", RetrainConfig(recipe=RECIPE, holdout_reviewed=1.0),
                           frames=2)


def test_the_base_sample_can_be_drawn_from_the_reviewed_units_formats_first(coarse_data, tmp_path):
    import dataclasses

    from vialinspect.datasets.reader import open_dataset
    from vialinspect.training.retrain import RetrainConfig, build_training_set

    base = open_dataset(coarse_data)
    fmt = "syringe-1mL"
    pool = [r for r in base.records if r.split in ("train", "val")]
    of_line = sum(r.format == fmt for r in pool)
    assert 0 < of_line < len(pool) - 4
    reviewed = dataclasses.replace(base, records=[r for r in base.records if r.format == fmt][:6])
    first = RetrainConfig(recipe=RECIPE, base_sample=of_line + 4, line_formats_first=True)
    rows, info = build_training_set(base, reviewed, tmp_path / "first", first, frames=2)
    picked = [r for r in rows if r.extra.get("source") != "review"]
    assert len(picked) == of_line + 4 and info["base_of_line_formats"] == of_line  # all of the line's, then others
    plain = dataclasses.replace(first, line_formats_first=False)
    _, info_plain = build_training_set(base, reviewed, tmp_path / "plain", plain, frames=2)
    assert info_plain["base_of_line_formats"] == 0  # not asked for: not counted, and the draw ignores formats
