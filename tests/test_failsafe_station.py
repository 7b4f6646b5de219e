"""Fail-safe findings: a duplicate id is rejected and recorded under its own key (line and store agree), and the
station runs only a model that the registry's own signed history approves for the recipe."""

from __future__ import annotations

import json
import os

import pytest

from vialinspect.datasets.generate import generate
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.export.registry import PROMOTE, ROLLBACK, Registry, RegistryError
from vialinspect.inspection_station.pipeline import LoadedModel, ModelSlot
from vialinspect.inspection_station.recipe import Recipe
from vialinspect.inspection_station.station import RegistryWatcher, StationOptions, run_station
from vialinspect.inspection_station.store import RecordStore

from .test_registry import SIG, packages  # noqa: F401 - the module's package fixture
from .test_station import FakeRunner, _run, _unit, station_recipe  # noqa: F401 - fixture

DUP = "not_inspected:duplicate_id"


def _agree(sent, rows):
    """Every decision the line heard is the record the store holds under its key, and nothing else is."""
    assert len({d.key for d in sent}) == len(sent) == len(rows)
    for d in sent:
        r = rows[d.key]
        assert (r["accept"], sorted(r["reasons"]), r["unit_id"]) == (d.accept, sorted(d.reasons), d.container_id)


def test_a_duplicate_container_id_is_rejected_and_recorded_under_its_own_key(tmp_path):
    pipe, sent, rows = _run(_unit("a") + _unit("b") + _unit("a"), tmp_path)
    assert [(d.container_id, d.accept) for d in sent] == [("a", True), ("b", True), ("a", False)]
    dup = sent[2]
    assert dup.reasons == [DUP] and dup.record_key == "a~dup1"
    assert rows["a"]["accept"] is True and rows["a~dup1"]["reasons"] == [DUP]
    _agree(sent, rows)


def _station(recipe, store, source, n):
    return run_station(StationOptions(recipe=recipe, source=source, store=store, max_containers=n, line="log",
                                      quiet=True), print_fn=lambda *a, **k: None)


def _line_log(store):
    return [json.loads(x) for x in (store / "line.jsonl").read_text().splitlines()
            if json.loads(x)["type"] == "decision"]


def _store_rows(store):
    with RecordStore(store, readonly=True) as st:
        return {r["container_id"]: r for r in st.iter_decisions()}


def _agree_log(store):
    sent, rows = _line_log(store), _store_rows(store)
    assert len(sent) == len(rows)
    for d in sent:
        r = rows[d["record_key"] or d["container_id"]]
        assert (r["accept"], sorted(r["reasons"])) == (d["accept"], sorted(d["reasons"]))
    return sent, rows


def test_a_sim_line_replayed_from_the_start_rejects_every_replayed_unit_as_duplicate(station_recipe,  # noqa: F811
                                                                                    tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    src = "sim://?rate=0&seed=7&pixel_um=120&defect_rate=0.5&start=0"
    store = tmp_path / "store"
    _station(station_recipe, store, src, 6)
    _station(station_recipe, store, src, 6)
    sent, rows = _agree_log(store)
    # Each run's decisions in unit order: a unit turned away at admission reaches the line at once, ahead of a
    # unit still being inferred, so the order the line hears them in depends on the machine's load.
    first, second = (sorted(run, key=lambda d: d["sequence"]) for run in (sent[:6], sent[6:]))
    assert [d["container_id"] for d in second] == [d["container_id"] for d in first]
    assert all(not d["accept"] and DUP in d["reasons"] and d["record_key"].endswith("~dup1") for d in second)


def test_a_folder_replayed_twice_rejects_every_replayed_unit_as_duplicate(station_recipe, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    generate(data, 3, SimConfig(formats=("vial-2R",), frames=2, defect_rate=0.0, camera=CameraConfig(pixel_um=120.0)),
             seed=4, workers=1)
    store = tmp_path / "store"
    for _ in range(2):
        _station(station_recipe, store, f"folder://{data}", None)
    sent, rows = _agree_log(store)
    assert len(sent) == 6
    assert all(not d["accept"] and DUP in d["reasons"] and d["record_key"].endswith("~dup1") for d in sent[3:])
    assert {r["unit_id"] for r in rows.values()} == {d["container_id"] for d in sent[:3]}


# ---------------------------------------------------------------- the registry's approval


def _registry(tmp_path, packages):  # noqa: F811
    reg = Registry(tmp_path / "reg", create=True)
    va = reg.add(packages / "a", "os:test", "first model")
    vb = reg.add(packages / "b", "os:test", "challenger")
    return reg, va, vb


def _point(reg, recipe, version):
    (reg.root / "current").mkdir(exist_ok=True)
    (reg.root / "current" / f"{recipe}.json").write_text(json.dumps({"version": version, "seq": 99}))


def test_the_station_runs_only_a_model_the_registry_approves(tmp_path, packages):  # noqa: F811
    reg, va, vb = _registry(tmp_path, packages)
    with pytest.raises(RegistryError, match="no current model"):
        reg.approved("vial-2R")
    reg.promote(va, "vial-2R", SIG, "initial qualified model")
    assert reg.approved("vial-2R").version_id == va
    # A pointer edited by hand: outside the registry, or a registered version that was never promoted.
    for target, why in (("../../elsewhere", "not a package of this registry"), (vb, "last change")):
        _point(reg, "vial-2R", target)
        with pytest.raises(RegistryError, match=why):
            reg.approved("vial-2R")
        assert any(why in p for p in reg.verify())
    # A promotion appended by hand with a correct hash chain, but never gated against the model it replaces.
    ev = reg._append(PROMOTE, vb, SIG.user, "forged", recipe="vial-2R", details={"previous": va}, signature=SIG)
    reg._set_current("vial-2R", vb, ev)
    with pytest.raises(RegistryError, match="without a passed gate"):
        reg.approved("vial-2R")
    assert any("without a passed gate" in p for p in reg.verify())


def test_unsigned_or_inconsistent_history_is_not_approved(tmp_path, packages):  # noqa: F811
    reg, va, vb = _registry(tmp_path, packages)
    ev = reg._append(PROMOTE, va, "mallory", "no signature", recipe="vial-2R", details={"previous": None})
    reg._set_current("vial-2R", va, ev)
    with pytest.raises(RegistryError, match="not signed"):
        reg.approved("vial-2R")
    reg2, va2, vb2 = _registry(tmp_path / "two", packages)
    reg2.promote(va2, "vial-2R", SIG, "initial")
    ev = reg2._append(ROLLBACK, vb2, SIG.user, "to a version never promoted", recipe="vial-2R",
                      details={"previous": None, "rolled_back": va2}, signature=SIG)
    reg2._set_current("vial-2R", vb2, ev)
    with pytest.raises(RegistryError, match="never promoted"):
        reg2.approved("vial-2R")
    reg3, va3, _ = _registry(tmp_path / "three", packages)
    reg3.promote(va3, "vial-2R", SIG, "initial")
    hist = reg3.root / "history.jsonl"
    hist.write_text(hist.read_text().replace("initial", "edited"))
    with pytest.raises(RegistryError, match="not intact"):
        reg3.approved("vial-2R")


def test_a_station_refuses_to_start_on_an_unapproved_pointer(tmp_path, packages):  # noqa: F811
    reg, va, vb = _registry(tmp_path, packages)
    reg.promote(va, "vial-2R", SIG, "initial")
    _point(reg, "vial-2R", vb)
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "vial-2R"\nformat = "vial-2R"\nmodel = "builtin:default"\nframes = 2\n')
    opts = StationOptions(recipe=recipe, source="sim://?rate=0&pixel_um=120", store=tmp_path / "store",
                          max_containers=1, line="none", quiet=True, registry=reg.root)
    with pytest.raises(RegistryError, match="last change"):
        run_station(opts, print_fn=lambda *a, **k: None)
    assert not (tmp_path / "store").exists()  # refused before anything ran


def test_the_hot_swap_watcher_keeps_the_running_model_and_alarms_on_an_unapproved_pointer(tmp_path,
                                                                                         packages):  # noqa: F811
    reg, va, vb = _registry(tmp_path, packages)
    reg.promote(va, "vial-2R", SIG, "initial")
    slot = ModelSlot(LoadedModel(FakeRunner(), va, {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}))
    alarms = []
    recipe = Recipe.from_dict(dict(name="vial-2R", format="vial-2R", model="unused", frames=2))
    w = RegistryWatcher(reg, recipe, slot, "cpu", 1, 3600.0, va, print_fn=lambda *a, **k: None,
                        on_alarm=alarms.append)
    try:
        _point(reg, "vial-2R", vb)  # edited by hand: vb was never gated nor promoted
        w.check()
        assert slot.upcoming().version == va and w.loaded == va
        assert len(alarms) == 1 and "not approved" in alarms[0]
        w.check()  # the same bad pointer alarms once
        assert len(alarms) == 1
    finally:
        w.close()


def test_every_not_inspected_unit_keeps_the_frames_it_had_for_qa(tmp_path):
    from .test_station import _px

    script = (_unit("ok") + [(0.0, "short", 0, _px(), None)]  # its second frame never comes
              + _unit("timeout", {1: (None, "camera_timeout")}))
    pipe, sent, rows = _run(script, tmp_path)
    with RecordStore(tmp_path / "store", readonly=True) as st:
        for cid, n in (("short", 1), ("timeout", 1)):
            assert rows[cid]["reasons"][0].startswith("not_inspected:") and rows[cid]["kept"] == "flagged"
            assert len(st.frame_paths(cid)) == n and all(p.is_file() for p in st.frame_paths(cid))


def _user_store(root, admin_pw="admin-password-333"):
    from vialinspect.inspection_station.qa import users
    from vialinspect.inspection_station.qa.audit import ReviewDB

    RecordStore(root).close()
    users.add_user(ReviewDB(root), "root", "Rita Admin", "admin", admin_pw, actor="os:test")
    return root


def test_promotion_is_bound_to_the_registry_s_one_user_database(tmp_path, packages):  # noqa: F811
    from vialinspect.inspection_station.qa.promotion import PromotionError, promote

    reg, va, vb = _registry(tmp_path, packages)
    prod = _user_store(tmp_path / "prod")
    promote(prod, reg, va, "vial-2R", "root", "admin-password-333", "first model")
    reg.record_gate(vb, va, True, {"note": "test"}, "os:test")
    # Another store with a self-made admin cannot sign a change of this registry.
    rogue = _user_store(tmp_path / "rogue", "rogue-password-99")
    with pytest.raises(PromotionError, match="signed in user database"):
        promote(rogue, reg, vb, "vial-2R", "root", "rogue-password-99", "mine now")
    assert reg.current("vial-2R") == va
    promote(prod, reg, vb, "vial-2R", "root", "admin-password-333", "gated challenger")
    assert reg.approved("vial-2R").version_id == vb and reg.verify() == []


def test_a_hand_appended_promotion_reusing_an_audit_entry_fails_verify(tmp_path, packages):  # noqa: F811
    from dataclasses import replace

    from vialinspect.export.registry import Signature
    from vialinspect.inspection_station.qa.promotion import promote

    reg, va, vb = _registry(tmp_path, packages)
    prod = _user_store(tmp_path / "prod")
    first = promote(prod, reg, va, "vial-2R", "root", "admin-password-333", "first model")
    reg.record_gate(vb, va, True, {"note": "test"}, "os:test")  # even a passed gate does not make it legitimate
    copied = replace(Signature(**first.event.signature))
    ev = reg._append(PROMOTE, vb, copied.user, "forged", recipe="vial-2R", details={"previous": va}, signature=copied)
    reg._set_current("vial-2R", vb, ev)
    with pytest.raises(RegistryError, match="reuses audit entry"):
        reg.approved("vial-2R")
    assert any("reuses audit entry" in p for p in reg.verify())
    other = replace(copied, audit_seq=999, review_db="another-db")
    reg2, va2, vb2 = _registry(tmp_path / "two", packages)
    promote(prod, reg2, va2, "vial-2R", "root", "admin-password-333", "first model")
    reg2.record_gate(vb2, va2, True, {"note": "test"}, "os:test")
    ev = reg2._append(PROMOTE, vb2, other.user, "forged", recipe="vial-2R", details={"previous": va2},
                      signature=other)
    reg2._set_current("vial-2R", vb2, ev)
    with pytest.raises(RegistryError, match="signed in user database"):
        reg2.approved("vial-2R")


def test_a_signed_model_change_anchors_the_audit_trail_head_in_the_registry(tmp_path, packages):  # noqa: F811
    from vialinspect.inspection_station.qa import audit
    from vialinspect.inspection_station.qa.audit import ReviewDB
    from vialinspect.inspection_station.qa.promotion import promote

    reg, va, _ = _registry(tmp_path, packages)
    prod = _user_store(tmp_path / "prod")
    change = promote(prod, reg, va, "vial-2R", "root", "admin-password-333", "first model")
    sig = reg.history()[-1].signature
    assert sig["audit_seq"] == change.audit_seq
    assert sig["audit_hash"] == audit.entry_hash_of(ReviewDB(prod), change.audit_seq) == audit.verify(
        ReviewDB(prod)).head_hash
