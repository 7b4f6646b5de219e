"""Model registry, the challenger gate, signed promotion and rollback, hot swap under load, leak check."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

from vialinspect.cli import main
from vialinspect.datasets.records import ContainerRecord, Defect
from vialinspect.export.registry import Registry, RegistryError, Signature
from vialinspect.inspection_station.pipeline import LoadedModel, ModelSlot, Pipeline
from vialinspect.inspection_station.qa import audit, users
from vialinspect.inspection_station.qa.audit import ReviewDB
from vialinspect.inspection_station.qa.promotion import PromotionError, promote, rollback
from vialinspect.inspection_station.stats import StationStats
from vialinspect.inspection_station.store import RecordStore
from vialinspect.training.gate import GateConfig, binomial_tail, compare, render_markdown
from vialinspect.vision.scores import Scores

from .test_station import FakeRunner, ListSource, RecordingLine, _recipe, _unit

SIG = Signature("root", "Rita Admin", "test approval", "2026-11-30T00:00:00Z")
TH = {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}


@pytest.fixture(scope="module")
def packages(tiny_run, coarse_data, tmp_path_factory):
    """Two package versions of the tiny model (same ONNX, other thresholds)."""
    from vialinspect.export.package import load_package, with_thresholds

    d = tmp_path_factory.mktemp("reg_pkgs")
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(d / "a"),
                 "--parity-data", str(coarse_data), "--parity-count", "2"]) == 0
    a = load_package(d / "a")
    with_thresholds(a, {"particle": 0.9}, d / "b", reason="test")
    with_thresholds(a, {"particle": 0.8}, d / "c", reason="test")
    return d


def _reg(tmp_path, packages):
    reg = Registry(tmp_path / "reg", create=True)
    va = reg.add(packages / "a", "os:test", "first model")
    vb = reg.add(packages / "b", "os:test", "challenger")
    return reg, va, vb


def test_first_promotion_needs_no_gate_but_a_replacement_needs_a_passed_one(tmp_path, packages):
    reg, va, vb = _reg(tmp_path, packages)
    assert reg.status(va) == "registered" and reg.current("vial-2R") is None
    reg.promote(va, "vial-2R", SIG, "initial qualified model")
    assert reg.current("vial-2R") == va and reg.status(va) == "current"
    with pytest.raises(RegistryError, match="not been through the gate"):
        reg.promote(vb, "vial-2R", SIG, "try")
    reg.record_gate(vb, va, False, {"failed": ["particle detection"]}, "os:test")
    assert reg.status(vb) == "rejected"
    with pytest.raises(RegistryError, match="failed the gate"):
        reg.promote(vb, "vial-2R", SIG, "try")
    reg.record_gate(vb, "someone-else", True, {}, "os:test")
    with pytest.raises(RegistryError, match="gated against"):
        reg.promote(vb, "vial-2R", SIG, "try")
    reg.record_gate(vb, va, True, {}, "os:test")
    assert reg.status(vb) == "candidate"
    with pytest.raises(RegistryError, match="needs a reason"):
        reg.promote(vb, "vial-2R", SIG, "  ")
    reg.promote(vb, "vial-2R", SIG, "fewer false rejects")
    assert reg.current("vial-2R") == vb and reg.status(va) == "retired"
    card = reg.card(vb)
    assert card["promotions"][0]["signed_by"] == "Rita Admin" and card["gate"]["passed"]
    assert reg.verify() == []


def test_rollback_restores_the_previous_version_and_walks_back(tmp_path, packages):
    reg, va, vb = _reg(tmp_path, packages)
    vc = reg.add(packages / "c", "os:test", "third")
    reg.promote(va, "r", SIG, "first")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback("r", SIG, "no")
    for v, champ in ((vb, va), (vc, vb)):
        reg.record_gate(v, champ, True, {}, "os:test")
        reg.promote(v, "r", SIG, "better")
    reg.rollback("r", SIG, "field complaint")
    assert reg.current("r") == vb
    reg.rollback("r", SIG, "still wrong")
    assert reg.current("r") == va  # walks back, does not toggle between the last two
    assert [e.action for e in reg.history(recipe="r")] == ["promote"] * 3 + ["rollback"] * 2
    assert reg.verify() == []


def test_tampered_history_or_package_is_found(tmp_path, packages):
    reg, va, _ = _reg(tmp_path, packages)
    reg.promote(va, "r", SIG, "first")
    hist = reg.root / "history.jsonl"
    lines = hist.read_text().splitlines()
    ev = json.loads(lines[0])
    ev["actor"] = "mallory"
    hist.write_text("\n".join([json.dumps(ev)] + lines[1:]) + "\n")
    assert any("hash chain" in p for p in reg.verify())
    onnx = reg.package_dir(va) / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    assert any("checksum" in p for p in reg.verify())
    with pytest.raises(RegistryError, match="checksum"):
        reg.package(va)


def test_registry_cli_add_list_show_and_errors(tmp_path, packages, capsys):
    r = str(tmp_path / "reg")
    assert main(["registry", "add", str(packages / "a"), "--registry", r, "--reason", "first"]) == 0
    assert main(["registry", "add", str(packages / "a"), "--registry", r, "--reason", "again"]) == 2
    assert "already in the registry" in capsys.readouterr().err
    assert main(["registry", "list", "--registry", r, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["status"] == "registered"
    assert main(["registry", "show", rows[0]["version"][:8], "--registry", r]) == 0
    assert "registered" in capsys.readouterr().out
    assert main(["registry", "show", "zz", "--registry", r]) == 2
    assert main(["registry", "list", "--registry", str(tmp_path / "nope")]) == 2
    assert "not a model registry" in capsys.readouterr().err
    assert main(["registry", "verify", "--registry", r]) == 0


# ---------------------------------------------------------------- signed promotion through the review users

@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    RecordStore(root).close()
    db = ReviewDB(root)
    users.add_user(db, "alice", "Alice Smith", "reviewer", "alice-password-1", actor="os:test")
    users.add_user(db, "root", "Rita Admin", "admin", "admin-password-333", actor="os:test")
    return root


def test_promotion_needs_an_admin_signature_and_is_audited(tmp_path, packages, store):
    reg, va, vb = _reg(tmp_path, packages)
    with pytest.raises(PromotionError, match="signature refused"):
        promote(store, reg, va, "r", "root", "wrong", "first")
    with pytest.raises(PromotionError, match="only an admin"):
        promote(store, reg, va, "r", "alice", "alice-password-1", "first")
    assert reg.current("r") is None
    ch = promote(store, reg, va, "r", "root", "admin-password-333", "initial qualified model")
    assert reg.current("r") == va and ch.event.signature["audit_seq"] == ch.audit_seq
    with pytest.raises(PromotionError, match="gate"):  # refused before anyone signs: no audit entry for it
        promote(store, reg, vb, "r", "root", "admin-password-333", "x")
    reg.record_gate(vb, va, True, {}, "os:test")
    promote(store, reg, vb, "r", "root", "admin-password-333", "fewer false rejects")
    rollback(store, reg, "r", "root", "admin-password-333", "complaint")
    assert reg.current("r") == va
    db = ReviewDB(store)
    actions = [e.action for e in audit.entries(db)]
    assert actions.count("signature_failed") == 2
    assert actions.count("model_promoted") == 2 and actions.count("model_rolled_back") == 1
    assert audit.verify(db).ok


def test_promote_cli_with_password_on_stdin(tmp_path, packages, store, monkeypatch, capsys):
    import io

    r = str(tmp_path / "reg")
    assert main(["registry", "add", str(packages / "a"), "--registry", r, "--reason", "first"]) == 0
    v = Registry(r).versions()[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("admin-password-333\n"))
    assert main(["registry", "promote", v, "--registry", r, "--recipe", "r", "--store", str(store), "--user", "root",
                 "--reason", "initial", "--password-stdin"]) == 0
    assert "now runs" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("admin-password-333\n"))
    assert main(["registry", "rollback", "--registry", r, "--recipe", "r", "--store", str(store), "--user", "root",
                 "--reason", "x", "--password-stdin"]) == 2
    assert "nothing to roll back" in capsys.readouterr().err


# ---------------------------------------------------------------- the gate

def _rec(i, classes=(), size=None):
    defects = [Defect(cls="particle", size_um=size)] if size else []
    return ContainerRecord(id=f"c{i}", frames=[], classes=list(classes), defects=defects)


def _scores(values):
    return [Scores(probs={"particle": v, "crack": 0.0, "fill_level": 0.0}) for v in values]


def test_binomial_tail_matches_hand_values():
    assert binomial_tail(0, 5) == 1.0
    assert binomial_tail(3, 3) == pytest.approx(1 / 8)
    assert binomial_tail(2, 3) == pytest.approx(4 / 8)


def test_binomial_tail_is_the_exact_sum_and_works_for_many_discordant_units():
    import math

    for n in (1, 2, 7, 30, 200):
        for k in range(n + 2):
            exact = sum(math.comb(n, i) for i in range(k, n + 1)) / 2.0 ** n if k > 0 else 1.0
            assert abs(binomial_tail(k, n) - exact) < 1e-9, (k, n)
    # 2 ** n overflows a float from n = 1024 on, as the sum over math.comb did; the exact test does not.
    assert binomial_tail(2000, 4000) == pytest.approx(0.5, abs=0.01)
    assert binomial_tail(2300, 4000) < 1e-15


def test_gate_refuses_a_worse_model_and_passes_an_equal_or_better_one():
    recs = [_rec(i, ["particle"], 200.0) for i in range(40)] + [_rec(100 + i) for i in range(100)]
    champ = _scores([0.9] * 40 + [0.1] * 100)
    same = compare(recs, champ, champ, TH, TH)
    assert same.passed and all(c.worse == 0 for c in same.checks)
    # misses 8 particles the champion found: significantly worse, and PoD drops by 20 points
    worse = compare(recs, champ, _scores([0.1] * 8 + [0.9] * 32 + [0.1] * 100), TH, TH)
    assert not worse.passed
    failed = {c.name for c in worse.failures()}
    assert "particle detection" in failed and "particle PoD 200-300 µm" in failed
    # rejects 4 more good units: the false-reject rate may not rise
    frr = compare(recs, champ, _scores([0.9] * 40 + [0.9] * 4 + [0.1] * 96), TH, TH)
    assert [c.name for c in frr.failures()] == ["false-reject rate (good units)"]
    # one unit either way is noise, within tolerance
    noise = compare(recs, champ, _scores([0.1] + [0.9] * 39 + [0.1] * 100), TH, TH, GateConfig())
    assert noise.passed
    better = compare(recs, champ, _scores([0.9] * 40 + [0.1] * 100), TH, TH)
    assert better.passed


def _mapped(particle_prob: float, at: tuple[int, int] | None) -> Scores:
    """Scores whose particle map (8 px cells, 10 x 10) peaks at cell ``at`` with the unit's probability."""
    maps = np.zeros((3, 10, 10), np.float32)
    if at is not None:
        maps[0][at] = particle_prob
    return Scores(probs={"particle": particle_prob, "crack": 0.0, "fill_level": 0.0}, maps=maps, map_stride=8)


def test_evidence_at_reads_the_map_cells_under_the_box():
    from vialinspect.vision.scores import evidence_at

    sc = _mapped(0.9, (5, 2))  # cell row 5, column 2: pixels x 16-23, y 40-47
    assert evidence_at(sc, "particle", (17, 41, 20, 44)) == pytest.approx(0.9)
    assert evidence_at(sc, "particle", (30, 41, 33, 44)) == pytest.approx(0.9)  # one cell away: within the margin
    assert evidence_at(sc, "particle", (40, 41, 45, 44)) == 0.0  # three cells away
    assert evidence_at(sc, "particle", (40, 41, 45, 44), margin_cells=3) == pytest.approx(0.9)
    assert evidence_at(Scores(probs={"particle": 0.9}), "particle", (0, 0, 1, 1)) is None


def test_localized_gate_credits_only_detections_at_the_defect():
    """A champion that rejects particle units only through a false alarm elsewhere (an oil droplet) is not
    credited with those particles; per unit it would be, and a challenger that finds them at their place
    but ignores the droplet would look worse."""
    box = [17.0, 41.0, 20.0, 44.0]  # map cell (5, 2)
    recs = [ContainerRecord(id=f"p{i}", frames=[], classes=["particle"],
                            defects=[Defect(cls="particle", size_um=200.0, bbox=box)]) for i in range(20)]
    recs += [_rec(100 + i) for i in range(40)]
    # champion: 10 particle units rejected at the particle, 10 rejected for a false alarm at cell (0, 9)
    champ = [_mapped(0.9, (5, 2)) for _ in range(10)] + [_mapped(0.9, (0, 9)) for _ in range(10)]
    champ += [_mapped(0.1, None) for _ in range(40)]
    # challenger: finds 13 at the particle, ignores the false alarm, misses the other 7
    chal = [_mapped(0.9, (5, 2)) for _ in range(13)] + [_mapped(0.1, None) for _ in range(7)]
    chal += [_mapped(0.1, None) for _ in range(40)]
    per_unit = compare(recs, champ, chal, TH, TH, GateConfig(localized=False))
    assert "particle PoD 200-300 µm" in {c.name for c in per_unit.failures()}
    localized = compare(recs, champ, chal, TH, TH)
    assert localized.passed
    pod = next(c for c in localized.checks if c.name == "particle PoD 200-300 µm")
    assert (pod.champion, pod.challenger, pod.worse, pod.better) == (0.5, 0.65, 0, 3)
    # and a challenger that finds fewer at their place is still refused
    fewer = [_mapped(0.9, (5, 2)) for _ in range(6)] + [_mapped(0.1, None) for _ in range(54)]
    assert not compare(recs, champ, fewer, TH, TH).passed


def test_gate_shows_false_rejects_by_nuisance_without_gating_them():
    """Fewer false rejects on oil units and more on ordinary ones: the whole population decides the gate,
    the strata show where the change came from."""
    oil = [ContainerRecord(id=f"o{i}", frames=[], nuisances=["silicone_oil"]) for i in range(40)]
    plain = [ContainerRecord(id=f"n{i}", frames=[]) for i in range(40)]
    champ = _scores([0.9] * 20 + [0.1] * 20 + [0.1] * 40)  # 20 oil units rejected, no plain one
    chal = _scores([0.1] * 40 + [0.9] * 4 + [0.1] * 36)  # no oil unit rejected, 4 plain ones
    res = compare(oil + plain, champ, chal, TH, TH)
    assert res.passed
    by = {c.name.split(": ")[-1]: c for c in res.strata}
    assert set(by) == {"no nuisance", "with silicone_oil", "without silicone_oil"}
    assert (by["no nuisance"].champion, by["no nuisance"].challenger, by["no nuisance"].passed) == (0.0, 0.1, False)
    assert by["without silicone_oil"].n == 40 and not by["without silicone_oil"].passed
    assert by["with silicone_oil"].passed and by["with silicone_oil"].better == 20
    md = render_markdown(res, "a", "b")
    assert "shown, not gated" in md and "| false-reject rate, good units: no nuisance | 40 | 0.0% | 10.0%" in md
    assert "strata" in res.to_json()


# ---------------------------------------------------------------- hot swap under load

class _GatedSource(ListSource):
    """Holds back the frames from row ``at`` on until ``gate`` is set: the units after it are read only once the
    test has requested the swap, so the swap lands mid-run however slowly a loaded machine runs the threads."""

    def __init__(self, script, at: int):
        super().__init__(script)
        self.at, self.rows_read, self.gate = at, 0, threading.Event()

    def _read(self, timeout):
        if self.rows_read == self.at:
            assert self.gate.wait(30), "the swap was never requested"
        self.rows_read += 1
        return super()._read(timeout)


def test_hot_swap_under_load_loses_and_duplicates_nothing(tmp_path):
    n = 60
    script = [row for i in range(n) for row in _unit(f"u{i:03d}")]
    source = _GatedSource(script, at=len(script) * 2 // 3)
    store = RecordStore(tmp_path / "store", min_free_mb=0.0)
    line = RecordingLine()
    sent = line.sent
    slot = ModelSlot(LoadedModel(FakeRunner(sleep=0.005), "v1", TH))
    # A deadline far beyond the run's length: on a loaded machine admission control would otherwise turn late
    # units away (without a model version), which is right for the line but not what this test is about.
    pipe = Pipeline(source, _recipe(deadline_ms=60_000), slot, store, line, StationStats(),
                    queue_size=64, window_s=0.3, read_timeout_s=0.05)

    def swapper():
        while len(sent) < n // 3:
            time.sleep(0.002)
        slot.request_swap(LoadedModel(FakeRunner(particle=0.2, sleep=0.005), "v2", TH))
        source.gate.set()

    t = threading.Thread(target=swapper)
    t.start()
    pipe.start()
    assert pipe.join(timeout=60)
    t.join()
    rows = list(store.iter_decisions())
    store.close()
    ids = [r["container_id"] for r in rows]
    assert sorted(ids) == sorted(f"u{i:03d}" for i in range(n)) and len(set(ids)) == n
    versions = [r["model_version"] for r in sorted(rows, key=lambda r: r["sequence"])]
    assert set(versions) == {"v1", "v2"}
    first_v2 = versions.index("v2")
    assert all(v == "v1" for v in versions[:first_v2]) and all(v == "v2" for v in versions[first_v2:])
    assert all(r["accept"] for r in rows) and slot.history == ["v1", "v2"]


# ---------------------------------------------------------------- leak check

def test_leak_check_catches_a_renamed_and_reencoded_copy(coarse_data, tmp_path):
    import cv2

    from vialinspect.datasets.reader import open_dataset
    from vialinspect.training.retrain import LeakError, check_no_leak

    ds = open_dataset(coarse_data)
    qual = ds.records[:3]
    train = ds.records[3:8]
    assert check_no_leak(ds.root, qual, ds.root, train) == sum(len(r.frames) for r in qual)
    copy_root = tmp_path / "t"
    shutil.copytree(ds.root, copy_root)
    # the same pixels as another file format, under another name
    src = cv2.imread(str(ds.root / qual[1].frames[0]), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(copy_root / "renamed.bmp"), src)
    leaked = ContainerRecord(id="x", frames=["renamed.bmp"] + train[0].frames[1:])
    with pytest.raises(LeakError, match="1 qualification frame"):
        check_no_leak(ds.root, qual, copy_root, train + [leaked])
    assert np.array_equal(cv2.imread(str(copy_root / "renamed.bmp"), cv2.IMREAD_UNCHANGED), src)


# ---------------------------------------------------------------- what registry add refuses (review finding 14)

def test_registry_add_runs_the_onnx_checker_and_refuses_a_broken_graph(tmp_path, capsys):
    from vialinspect.export.package import load_package

    from .test_failsafe_outputs import forge_package, tiny_onnx

    broken = forge_package(tmp_path / "broken", onnx_bytes=tiny_onnx(valid=False))
    load_package(broken)  # well-formed on the outside: the station's cheap check cannot tell
    reg = Registry(tmp_path / "reg", create=True)
    with pytest.raises(RegistryError, match="not a valid ONNX model") as e:
        reg.add(broken, "os:test", "x")
    assert "\n" not in str(e.value) and "ValidationError" in str(e.value)
    assert reg.versions() == [] and reg.history() == [] and not list((reg.root / "cards").iterdir())
    assert not [p for p in (reg.root / "packages").iterdir()]  # no temporary copy left behind
    assert main(["registry", "add", str(broken), "--registry", str(reg.root), "--reason", "x"]) == 2
    assert "not a valid ONNX model" in capsys.readouterr().err
    good = forge_package(tmp_path / "good")
    assert reg.add(good, "os:test", "tiny") == load_package(good).version_id and reg.verify() == []


@pytest.mark.parametrize("kind", ["not_onnx", "nan_threshold", "model_json_list", "input_empty", "sums_not_utf8"])
def test_registry_add_refuses_what_load_package_refuses_with_registry_error(tmp_path, kind, capsys):
    from .test_failsafe_outputs import TH, forge_package, good_meta

    kwargs = {"not_onnx": {"onnx_bytes": b"not onnx"},
              "nan_threshold": {"meta": good_meta(thresholds={**TH, "crack": float("nan")})},
              "model_json_list": {"raw_meta": b"[]"},
              "input_empty": {"meta": good_meta(input={})},
              "sums_not_utf8": {"sums": b"\xff\xfe\n"}}[kind]
    bad = forge_package(tmp_path / "bad", **kwargs)
    reg = Registry(tmp_path / "reg", create=True)
    with pytest.raises(RegistryError):
        reg.add(bad, "os:test", "x")
    assert reg.versions() == [] and reg.history() == []
    assert main(["registry", "add", str(bad), "--registry", str(reg.root), "--reason", "x"]) == 2
    assert "Traceback" not in capsys.readouterr().err
