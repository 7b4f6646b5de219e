"""The record store: once-only records, lossless evidence, audit sample, free-space guard, crash safety."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vialinspect.datasets.imageio import read_gray
from vialinspect.inspection_station import store as store_mod
from vialinspect.inspection_station.store import DiskFullError, RecordStore, StoreError, audit_sampled
from vialinspect.inspection_station.types import Container, Decision, Frame

REPO = Path(__file__).resolve().parents[1]


def _unit(seq: int, accept: bool | None = None, cid: str | None = None) -> tuple[Container, Decision, np.ndarray]:
    """A deterministic unit: every third one rejected; odd sequences carry 16-bit frames."""
    rng = np.random.default_rng(seq)
    dtype = np.uint16 if seq % 2 else np.uint8
    frames = [
        Frame(rng.integers(0, np.iinfo(dtype).max, (12, 10), dtype=dtype, endpoint=True), float(k), k, "test")
        for k in range(2)
    ]
    accept = seq % 3 != 0 if accept is None else accept
    c = Container(cid or f"unit-{seq:05d}", frames, trigger_time=0.0, sequence=seq, format="vial-2R")
    d = Decision(
        c.id, seq, accept, [] if accept else ["particle"], recipe="test-recipe", model_version="v-test",
        scores={"particle": np.float32(0.1 if accept else 0.9), "crack": 0.0}, thresholds={"particle": 0.5},
        fill_height_mm=13.7, decided_at=1.7e9 + seq, timings_ms={"total": 12.5}, provider="CPUExecutionProvider",
    )
    maps = rng.random((3, 2, 2)).astype(np.float32)
    return c, d, maps


def _store_files(root: Path) -> set[str]:
    return {f"{sub}/{n}" for sub in ("frames", "maps") for n in os.listdir(root / sub)}


def test_recorded_exactly_once_and_read_back(tmp_path):
    with RecordStore(tmp_path / "S") as st:
        c, d, _ = _unit(1)
        assert st.record(d, c) is True
        assert st.record(d, c) is False  # re-delivery after a restart: the first record stands
        assert st.count() == 1
        rec = st.get(c.id)
        assert rec["sequence"] == 1 and rec["accept"] is True and rec["reasons"] == []
        assert rec["scores"]["particle"] == pytest.approx(0.1) and rec["thresholds"] == {"particle": 0.5}
        assert rec["decided_at"] == d.decided_at and rec["decided_at_utc"].startswith("2023-11-14T22:")
        assert rec["recipe"] == "test-recipe" and rec["model_version"] == "v-test"
        assert rec["provider"] == "CPUExecutionProvider" and rec["timings_ms"] == {"total": 12.5}
        assert rec["fill_height_mm"] == pytest.approx(13.7) and rec["format"] == "vial-2R"
        assert rec["kept"] is None and st.frame_paths(c.id) == []  # accepted, sample 0: no frames kept
        assert st.get("nope") is None
        other = Decision("other", 2, True, [], "r", None)
        with pytest.raises(ValueError):
            st.record(other, c)  # decision and container must be the same unit


def test_rejected_frames_kept_losslessly(tmp_path):
    with RecordStore(tmp_path / "S") as st:
        for seq in (3, 9):  # odd sequences carry 16-bit frames; 6 below carries 8-bit ones
            c, d, maps = _unit(seq)
            assert not d.accept
            c.frames.append(Frame(None, 2.0, 2, "test", error="missing_frame"))
            assert st.record(d, c, maps=maps, compress=seq == 3)  # uncompressed under load: as lossless
            paths = st.frame_paths(c.id)
            assert [p.name for p in paths] == ["f0.png", "f1.png"]  # the failed frame has no file
            for p, f in zip(paths, c.frames, strict=False):
                back = read_gray(p)
                assert back.dtype == np.uint16 and np.array_equal(back, f.pixels)
            assert np.array_equal(np.load(st.maps_path(c.id))["maps"], maps)
            assert st.get(c.id)["frames"] == ["f0.png", "f1.png", None] and st.get(c.id)["kept"] == "flagged"
        c, d, _ = _unit(6)
        assert st.record(d, c)
        back = read_gray(st.frame_paths(c.id)[0])
        assert back.dtype == np.uint8 and np.array_equal(back, c.frames[0].pixels)
        assert st.maps_path(c.id) is None


def test_odd_frames_and_unsafe_ids_are_kept(tmp_path):
    root = tmp_path / "S"
    with RecordStore(root) as st:
        c, d, _ = _unit(0, cid="lot 7/unit#3")
        c.frames[1] = Frame(np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3), 1.0, 1, "test")
        assert st.record(d, c)
        paths = st.frame_paths(c.id)
        assert paths[0].parent.name.startswith("_") and paths[0].parent.parent == root / "frames"
        assert paths[1].suffix == ".npy" and np.array_equal(np.load(paths[1]), c.frames[1].pixels)
    with RecordStore(root) as st:  # reopening must not take the hashed folder for debris
        assert st.cleaned_up == [] and all(p.exists() for p in st.frame_paths("lot 7/unit#3"))


def test_accepted_audit_sample_is_deterministic(tmp_path):
    ids = [f"u{i}" for i in range(2000)]
    picked = {i for i in ids if audit_sampled(i, 0.1, seed=0)}
    assert 120 < len(picked) < 280
    assert picked == {i for i in ids if audit_sampled(i, 0.1, seed=0)}
    assert picked != {i for i in ids if audit_sampled(i, 0.1, seed=1)}
    assert not any(audit_sampled(i, 0.0) for i in ids) and all(audit_sampled(i, 1.0) for i in ids)
    kept = []
    for name in ("a", "b"):  # two stores, units recorded in opposite orders: same units kept
        with RecordStore(tmp_path / name, sample_accepted=0.4, seed=7) as st:
            order = range(1, 25) if name == "a" else range(24, 0, -1)
            for seq in order:
                c, d, _ = _unit(seq, accept=True)
                st.record(d, c)
            kept.append({r["container_id"] for r in st.iter_decisions() if r["kept"] == "sample"})
            assert all(st.frame_paths(cid) for cid in kept[-1])
            assert kept[-1] == {f"unit-{s:05d}" for s in range(1, 25) if st.is_sampled(f"unit-{s:05d}")}
    assert kept[0] == kept[1] and 0 < len(kept[0]) < 24


def test_last_sequence_count_iter_and_stats(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "_PAGE", 2)  # exercise paging without recording hundreds of units
    with RecordStore(tmp_path / "S") as st:
        assert st.last_sequence() is None and st.count() == 0
        for seq in (5, 3, 9, 4, 6):
            c, d, _ = _unit(seq)
            if seq == 4:
                d.accept, d.reasons = False, ["not_inspected:late_frame"]
            st.record(d, c)
        assert st.last_sequence() == 9 and st.count() == 5
        assert [r["sequence"] for r in st.iter_decisions()] == [5, 3, 9, 4, 6]  # recording order
        assert [r["sequence"] for r in st.iter_decisions(flagged_only=True)] == [3, 9, 4, 6]
        assert [r["sequence"] for r in st.iter_decisions(limit=3)] == [5, 3, 9]
        assert [r["sequence"] for r in st.iter_decisions(since=1.7e9 + 4, until=1.7e9 + 9)] == [5, 4, 6]
        assert [r["sequence"] for r in st.iter_decisions(since="2023-11-14T22:13:25+00:00")] == [5, 9, 6]
        s = st.stats()
        assert s == {"total": 5, "accepted": 1, "rejected": 4, "not_inspected": 1,
                     "reasons": {"not_inspected:late_frame": 1, "particle": 3}}
        assert st.stats(since=1.7e9 + 6)["total"] == 2


def test_free_space_guard_writes_nothing(tmp_path):
    free = {"mb": 50.0}
    usage = lambda p: SimpleNamespace(free=int(free["mb"] * 2**20))  # noqa: E731
    root = tmp_path / "S"
    with RecordStore(root, min_free_mb=100, disk_usage=usage) as st:
        assert not st.free_space_ok()
        c, d, maps = _unit(0)
        with pytest.raises(DiskFullError):
            st.record(d, c, maps=maps)
        assert st.count() == 0 and _store_files(root) == set()
        free["mb"] = 500.0
        assert st.free_space_ok() and st.record(d, c, maps=maps)
        assert st.record(d, c) is False  # already recorded: no write, so no guard either

    def broken(p):
        raise OSError(errno.EIO, "I/O error")

    with RecordStore(root, disk_usage=broken) as st:
        assert not st.free_space_ok()  # cannot tell: treated as full


def test_disk_filling_up_mid_write_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "S"

    def full(img, compress=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    with RecordStore(root) as st:
        monkeypatch.setattr(store_mod, "png_bytes", full)
        c, d, maps = _unit(0)
        with pytest.raises(DiskFullError):
            st.record(d, c, maps=maps)
        assert st.count() == 0 and _store_files(root) == set()


def test_opening_a_store_deletes_only_its_own_debris_never_files_it_did_not_write(tmp_path, caplog):
    root = tmp_path / "S"
    with RecordStore(root) as st:
        c, d, maps = _unit(0)
        st.record(d, c, maps=maps)
    (root / "frames" / "holiday_photos").mkdir()
    (root / "frames" / "holiday_photos" / "a.txt").write_bytes(b"x")
    (root / "maps" / "ghost.npz").write_bytes(b"x")
    (root / "frames" / ".tmp-ghost2").mkdir()  # an interrupted record's folder: no row names it
    (root / "maps" / ".tmp-unit-00000.npz").write_bytes(b"x")  # the unit's maps are in place already
    with caplog.at_level("WARNING"), RecordStore(root) as st:
        assert sorted(st.cleaned_up) == ["removed frames/.tmp-ghost2", "removed maps/.tmp-unit-00000.npz"]
        assert _store_files(root) == {"frames/unit-00000", "maps/unit-00000.npz", "frames/holiday_photos",
                                      "maps/ghost.npz"}
        assert (root / "frames" / "holiday_photos" / "a.txt").read_bytes() == b"x"
        assert all(p.exists() for p in st.frame_paths("unit-00000"))
    assert sum("removed" in r.getMessage() for r in caplog.records) == 2  # every deletion is logged


def test_a_record_committed_before_its_files_were_moved_into_place_is_completed_on_open(tmp_path):
    root = tmp_path / "S"
    with RecordStore(root) as st:
        c, d, maps = _unit(0)
        st.record(d, c, maps=maps)
    # As if killed between the row's commit and the rename: the files are still in their temporary place.
    os.rename(root / "frames" / "unit-00000", root / "frames" / ".tmp-unit-00000")
    os.rename(root / "maps" / "unit-00000.npz", root / "maps" / ".tmp-unit-00000.npz")
    with RecordStore(root, readonly=True) as ro:  # readable meanwhile
        assert all(p.exists() for p in ro.frame_paths("unit-00000")) and ro.maps_path("unit-00000").exists()
    with RecordStore(root) as st:
        assert sorted(st.cleaned_up) == ["completed frames/unit-00000", "completed maps/unit-00000.npz"]
        assert _store_files(root) == {"frames/unit-00000", "maps/unit-00000.npz"}
        for p, f in zip(st.frame_paths("unit-00000"), c.frames, strict=True):
            assert np.array_equal(read_gray(p), f.pixels)


def test_a_frames_folder_of_the_same_name_that_the_store_did_not_write_is_not_overwritten(tmp_path):
    root = tmp_path / "S"
    (root / "frames" / "unit-00000").mkdir(parents=True)
    (root / "frames" / "unit-00000" / "mine.txt").write_bytes(b"keep")
    with RecordStore(root) as st:
        c, d, maps = _unit(0)
        assert st.record(d, c, maps=maps)
        assert st.get("unit-00000")["frames_dir"] == "unit-00000-1"
        assert all(p.exists() for p in st.frame_paths("unit-00000"))
    assert (root / "frames" / "unit-00000" / "mine.txt").read_bytes() == b"keep"


def test_one_writer_many_readers_and_threads(tmp_path):
    root = tmp_path / "S"
    st = RecordStore(root)
    with pytest.raises(StoreError, match="already open for recording"):
        RecordStore(root)
    ro = RecordStore(root, readonly=True)
    with pytest.raises(StoreError, match="read-only"):
        ro.record(*_unit(0)[:2][::-1])
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():  # the review app querying while the station records
        try:
            while not stop.is_set():
                st.count(), st.stats(), list(st.iter_decisions(flagged_only=True))
                time.sleep(0.001)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for seq in range(6):
        c, d, _ = _unit(seq)
        assert st.record(d, c)
    stop.set()
    t.join()
    assert errors == [] and ro.count() == 6
    st.close()
    ro.close()
    with pytest.raises(StoreError, match="closed"):
        st.count()
    with RecordStore(root) as again:  # the lock went with close()
        assert again.count() == 6


def test_records_are_append_only(tmp_path):
    root = tmp_path / "S"
    with RecordStore(root) as st:
        c, d, _ = _unit(0)
        st.record(d, c)
    con = sqlite3.connect(root / "records.sqlite")
    for sql in ("UPDATE decisions SET accept = 1", "DELETE FROM decisions"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(sql)
    con.close()


def test_a_schema_1_store_is_read_as_it_is_and_migrated_by_its_writer(tmp_path):
    root = tmp_path / "S"
    with RecordStore(root) as st:
        c, d, _ = _unit(0)
        st.record(d, c)
    con = sqlite3.connect(root / "records.sqlite")  # back to schema 1: no unit_id column
    con.executescript("DROP INDEX decisions_unit_id; ALTER TABLE decisions DROP COLUMN unit_id;"
                      "ALTER TABLE decisions DROP COLUMN prev_hash; ALTER TABLE decisions DROP COLUMN row_hash;")
    _to_legacy_version(con, 1)  # as schema 1 was written: its version in a table
    con.close()
    with RecordStore(root, readonly=True) as ro:
        assert ro.schema == 1 and ro.get("unit-00000")["unit_id"] == "unit-00000"
    with RecordStore(root) as st:
        assert st.schema == 2
        assert _user_version(root) == 2 and "schema_version" not in _tables(root)  # one version, in user_version
        c, d, _ = _unit(0)
        assert st.record(d, c) is False
        key = st.duplicate_key("unit-00000")
        assert key == "unit-00000~dup1"
        assert st.record(dataclasses.replace(d, record_key=key, accept=False), c) is True
        assert st.get(key)["unit_id"] == "unit-00000" and st.count() == 2
        assert st.duplicate_key("unit-00000") == "unit-00000~dup2"
        v = st.verify()
        assert v["ok"] and v["rows"] == 2 and v["not_covered"] == 1 and v["head"] == st.head


def test_records_carry_a_hash_chain_that_verify_recomputes(tmp_path):
    root = tmp_path / "S"
    with RecordStore(root) as st:
        for i in range(4):
            c, d, _ = _unit(i)
            st.record(d, c)
        v = st.verify()
        assert v == {"ok": True, "rows": 4, "not_covered": 0, "head": st.head, "problems": []}
    # Edited past the triggers (someone with the file drops them): the chain shows it.
    con = sqlite3.connect(root / "records.sqlite")
    con.executescript("DROP TRIGGER decisions_no_update; UPDATE decisions SET accept = 1 - accept WHERE sequence = 1;")
    con.close()
    with RecordStore(root, readonly=True) as ro:
        v = ro.verify()
        assert not v["ok"] and "hash chain broken" in v["problems"][0] and "unit-00001" in v["problems"][0]
    # Reopened by a writer, it goes on chaining from the last row.
    with RecordStore(root) as st:
        c, d, _ = _unit(9)
        st.record(d, c)
        assert st.get("unit-00009")["prev_hash"] == st.get("unit-00003")["row_hash"]


def _user_version(root: Path) -> int:
    con = sqlite3.connect(root / "records.sqlite")
    try:
        return con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()


def _tables(root: Path) -> set[str]:
    con = sqlite3.connect(root / "records.sqlite")
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


def _to_legacy_version(con: sqlite3.Connection, version: int) -> None:
    """Make a store look as vialinspect wrote it before PRAGMA user_version: the version in a table."""
    con.executescript(f"CREATE TABLE schema_version (version INTEGER NOT NULL);"
                      f"INSERT INTO schema_version (version) VALUES ({version}); PRAGMA user_version = 0;")


def test_a_new_store_keeps_its_schema_version_in_user_version(tmp_path):
    RecordStore(tmp_path / "S").close()
    assert _user_version(tmp_path / "S") == store_mod.SCHEMA_VERSION
    assert _tables(tmp_path / "S") == {"decisions"}  # no version table of its own


def test_a_store_from_before_user_version_opens_and_its_writer_takes_the_version_over(tmp_path):
    root = tmp_path / "S"
    with RecordStore(root) as st:
        for i in range(3):
            c, d, _ = _unit(i)
            st.record(d, c)
        head = st.head
    con = sqlite3.connect(root / "records.sqlite")
    _to_legacy_version(con, store_mod.SCHEMA_VERSION)
    con.close()
    with RecordStore(root, readonly=True) as ro:  # a reader reads the old marker and writes nothing
        assert ro.schema == store_mod.SCHEMA_VERSION and ro.count() == 3
    assert _user_version(root) == 0
    with RecordStore(root) as st:
        assert st.schema == store_mod.SCHEMA_VERSION and st.head == head
        c, d, _ = _unit(3)
        st.record(d, c)
        assert st.verify()["ok"]
    assert _user_version(root) == store_mod.SCHEMA_VERSION
    assert "schema_version" in _tables(root)  # left for an earlier vialinspect, which still reads this schema
    with RecordStore(root, readonly=True) as ro:
        assert ro.count() == 4 and ro.verify()["ok"]


def test_newer_or_foreign_stores_are_refused(tmp_path):
    root = tmp_path / "S"
    RecordStore(root).close()
    con = sqlite3.connect(root / "records.sqlite")
    con.execute(f"PRAGMA user_version = {store_mod.SCHEMA_VERSION + 1}")
    con.close()
    for kw in ({}, {"readonly": True}):
        with pytest.raises(StoreError, match="newer vialinspect") as e:
            RecordStore(root, **kw)
        assert "\n" not in str(e.value) and f"store schema {store_mod.SCHEMA_VERSION + 1}" in str(e.value)
    legacy = tmp_path / "L"  # the same from before user_version: a newer version in the old table
    RecordStore(legacy).close()
    con = sqlite3.connect(legacy / "records.sqlite")
    _to_legacy_version(con, store_mod.SCHEMA_VERSION + 1)
    con.close()
    for kw in ({}, {"readonly": True}):
        with pytest.raises(StoreError, match="newer vialinspect"):
            RecordStore(legacy, **kw)
    assert _user_version(legacy) == 0  # refused, not taken over
    foreign = tmp_path / "F"
    foreign.mkdir()
    con = sqlite3.connect(foreign / "records.sqlite")
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="not a vialinspect record store"):
        RecordStore(foreign)
    junk = tmp_path / "J"
    junk.mkdir()
    (junk / "records.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        RecordStore(junk)
    with pytest.raises(StoreError, match="no record store"):
        RecordStore(tmp_path / "missing", readonly=True)


# ---- kill -9 ---------------------------------------------------------------------------------------------

TOTAL = 36


def _child_record(root: str, start: int, die_before_row_of: int) -> None:
    """Run in a child process: record units start..TOTAL-1; SIGKILL itself when ``die_before_row_of`` has its
    files in place but not yet its row (the worst moment), if that is >= 0."""
    st = RecordStore(root, sample_accepted=0.25)
    insert = RecordStore._insert

    def insert_or_die(self, conn, d, *args):
        if d.sequence == die_before_row_of:
            os.kill(os.getpid(), signal.SIGKILL)
        insert(self, conn, d, *args)

    RecordStore._insert = insert_or_die
    for seq in range(start, TOTAL):
        c, d, maps = _unit(seq)
        st.record(d, c, maps=maps)


def _spawn(root: Path, start: int, die_before_row_of: int = -1) -> subprocess.Popen:
    code = "import sys; from tests.test_store import _child_record as f; f(sys.argv[1], *map(int, sys.argv[2:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, str(root), str(start), str(die_before_row_of)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _rows(root: Path) -> int:
    try:
        con = sqlite3.connect((root / "records.sqlite").as_uri() + "?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0  # not created yet


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_kill_9_loses_nothing_and_repeats_nothing(tmp_path):
    root = tmp_path / "S"
    # 1. Killed from outside at a random moment once some rows are visible.
    kill_after = random.randint(3, 10)
    proc = _spawn(root, 0)
    deadline = time.monotonic() + 60
    while _rows(root) < kill_after:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "child recorded nothing"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill (kill_after={kill_after})"

    # 2. Restarted; resumes after the last recorded unit and dies between a rejected unit's files and its row.
    with RecordStore(root, readonly=True) as ro:
        start = ro.last_sequence() + 1
    victim = next(s for s in range(start + 1, TOTAL) if s % 3 == 0)
    proc = _spawn(root, start, victim)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    name = f"unit-{victim:05d}"
    tmp_frames, tmp_maps = root / "frames" / f".tmp-{name}", root / "maps" / f".tmp-{name}.npz"
    assert tmp_frames.is_dir() and tmp_maps.is_file()  # files, no row

    # 3. Restarted in this process: debris removed, re-delivery ignored, the rest recorded once.
    with RecordStore(root, sample_accepted=0.25) as st:
        assert {f"removed frames/.tmp-{name}", f"removed maps/.tmp-{name}.npz"} <= set(st.cleaned_up)
        assert st.get(name) is None and st.last_sequence() == victim - 1
        c, d, maps = _unit(victim - 1)
        assert st.record(d, c, maps=maps) is False
        for seq in range(st.last_sequence() + 1, TOTAL):
            c, d, maps = _unit(seq)
            assert st.record(d, c, maps=maps) is True
        recs = list(st.iter_decisions())
        assert sorted(r["sequence"] for r in recs) == list(range(TOTAL)) and st.count() == TOTAL
        kept_dirs = set()
        for r in recs:
            c, d, maps = _unit(r["sequence"])
            assert r["accept"] == d.accept
            if not d.accept:
                paths = st.frame_paths(r["container_id"])
                assert len(paths) == 2
                for p, f in zip(paths, c.frames, strict=True):
                    assert np.array_equal(read_gray(p), f.pixels)
                assert np.array_equal(np.load(st.maps_path(r["container_id"]))["maps"], maps)
            if r["frames_dir"]:
                kept_dirs.add(r["frames_dir"])
        assert set(os.listdir(root / "frames")) == kept_dirs  # no debris, nothing without a row
        assert {n[: -len(".npz")] for n in os.listdir(root / "maps")} <= kept_dirs
