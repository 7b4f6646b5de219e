"""The station's record store on PostgreSQL, behind a local spool (inspection_station.pg_store).

A throwaway server per session (tests/pg.py: initdb into a temporary folder, a unix socket, trust auth); a fresh
database per test. The station runs on a sim:// line with a stand-in model (test_drift's DrawingRunner).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from vialinspect.cli import main
from vialinspect.inspection_station import pg_store
from vialinspect.inspection_station import station as station_mod
from vialinspect.inspection_station.pg_store import Drainer, parse_url, preflight
from vialinspect.inspection_station.pipeline import LoadedModel
from vialinspect.inspection_station.station import StationOptions, run_station
from vialinspect.inspection_station.stats import status_line
from vialinspect.inspection_station.store import RecordStore, StoreError
from vialinspect.vision.scores import CLASSES

from .pg import pg_db, pg_server  # noqa: F401 - fixtures
from .test_store import _unit

REPO = Path(__file__).resolve().parents[1]
psycopg = pytest.importorskip("psycopg")


def _spool(path: Path, n: int, start: int = 0) -> RecordStore:
    """A spool holding units ``start .. start + n - 1`` (every third one rejected, with its frames)."""
    st = RecordStore(path, min_free_mb=0)
    for seq in range(start, start + n):
        c, d, maps = _unit(seq)
        assert st.record(d, c, maps=maps)
    return st


def _rows(url: str, station: str) -> list[tuple]:
    with psycopg.connect(parse_url(url).conninfo) as conn:
        return conn.execute("SELECT chain_pos, container_id, row_hash FROM decisions WHERE station_id = %s "
                            "ORDER BY chain_pos", (station,)).fetchall()


def _sql(url: str, sql: str, *args) -> list[tuple]:
    with psycopg.connect(parse_url(url).conninfo, autocommit=True) as conn:
        cur = conn.execute(sql, args or None)
        return cur.fetchall() if cur.description else []


# ---------------------------------------------------------------- the URL and the password


@pytest.mark.parametrize("url", ["postgresql://inspector:s3cret@db.plant/records?station=L1-ST1",
                                 "postgresql://db.plant/records?station=L1-ST1&password=s3cret",
                                 "postgres://db.plant/records?sslpassword=s3cret&station=L1-ST1"])
def test_a_password_in_the_url_is_refused_in_one_line(url, capsys):
    with pytest.raises(StoreError) as e:
        parse_url(url)
    text = str(e.value)
    assert "s3cret" not in text and "\n" not in text and "~/.pgpass" in text and "PGPASSWORD" in text
    assert main(["records", "verify", "--store", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s3cret" not in err and "pgpass" in err


def test_the_station_id_comes_from_the_url_or_the_environment(monkeypatch):
    monkeypatch.delenv(pg_store.STATION_ENV, raising=False)
    t = parse_url("postgresql://inspector@db.plant:5433/records?station=L1-ST1&line=L1&sslmode=require")
    assert (t.station_id, t.line_id) == ("L1-ST1", "L1")
    assert t.conninfo == "postgresql://inspector@db.plant:5433/records?sslmode=require"  # station is not libpq's
    assert t.display == "postgresql://db.plant:5433/records?station=L1-ST1"
    with pytest.raises(StoreError, match=r"a station id is needed .*\?station=.*VIALINSPECT_STATION"):
        parse_url("postgresql://db.plant/records").need_station()
    monkeypatch.setenv(pg_store.STATION_ENV, "L2-ST1")
    assert parse_url("postgresql://db.plant/records").station_id == "L2-ST1"
    with pytest.raises(StoreError, match="two station ids"):
        parse_url("postgresql://db.plant/records?station=L1-ST1")
    with pytest.raises(StoreError, match="station id"):
        parse_url("postgresql://db.plant/records?station=../x", station=None)


# ---------------------------------------------------------------- schema and migrations


def test_schema_is_created_versioned_and_migrations_are_idempotent(pg_server, pg_db, capsys):  # noqa: F811
    url = pg_server.url(pg_db)
    assert main(["db", "upgrade", "--db", url]) == 0
    v = pg_store.SCHEMA_VERSION  # 3: the review queue's index (tests/test_review_queue.py)
    assert f"schema at version {v} (migrated from 0)" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db", url]) == 0
    assert f"schema at version {v} (up to date)" in capsys.readouterr().out
    assert pg_store.upgrade(url) == (v, v)
    assert [r[0] for r in _sql(url, "SELECT version FROM schema_version ORDER BY version")] == list(range(1, v + 1))
    tables = {r[0] for r in _sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    # Version 2: the QA tables (tests/test_pg_review_db.py).
    assert tables == {"schema_version", "stations", "decisions", "meta", "qa_sequence", "audit", "users", "reviews"}
    keys = _sql(url, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'decisions'::regclass")
    assert ("PRIMARY KEY (station_id, container_id)",) in keys and ("UNIQUE (station_id, chain_pos)",) in keys


def test_a_newer_schema_is_refused(pg_server, pg_db, tmp_path, capsys):  # noqa: F811
    url = pg_server.url(pg_db, station="L1-ST1")
    pg_store.upgrade(url)
    _sql(url, "INSERT INTO schema_version (version) VALUES (7)")
    with pytest.raises(StoreError, match=rf"schema version 7 is newer than this vialinspect knows "
                                         rf"\({pg_store.SCHEMA_VERSION}\)"):
        pg_store.upgrade(url)
    assert main(["db", "upgrade", "--db", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "newer" in err
    with RecordStore(tmp_path / "spool") as spool, pytest.raises(StoreError, match="newer"):
        preflight(spool, parse_url(url))  # the station refuses to start


def test_decision_rows_are_append_only(pg_server, pg_db, tmp_path):  # noqa: F811
    url = pg_server.url(pg_db, station="L1-ST1")
    with _spool(tmp_path / "spool", 3) as spool:
        assert Drainer(spool, parse_url(url)).drain() is True
    assert len(_rows(url, "L1-ST1")) == 3
    for sql in ("UPDATE decisions SET accept = 1", "DELETE FROM decisions WHERE chain_pos = 2",
                "TRUNCATE decisions CASCADE"):
        with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
            _sql(url, sql)
    assert len(_rows(url, "L1-ST1")) == 3


# ---------------------------------------------------------------- draining: order, idempotence, refusals


def test_a_drain_copies_the_chain_and_a_differing_row_halts_it(pg_server, pg_db, tmp_path):  # noqa: F811
    url = pg_server.url(pg_db, station="L1-ST1")
    target = parse_url(url)
    with _spool(tmp_path / "spool", 25) as spool:
        d = Drainer(spool, target, batch=4)
        assert d.drain() and d.status()["backlog_units"] == 0 and d.status()["drained_units"] == 25
        got = pg_store.verify(target)
        assert got["ok"] and got["rows"] == 25 and got["head"] == spool.head == spool.verify()["head"]
        assert [r[1] for r in _rows(url, "L1-ST1")] == [f"unit-{s:05d}" for s in range(25)]
        # A second drainer (a restart) finds PostgreSQL's progress and copies nothing twice.
        for seq in range(25, 30):
            c, dd, _ = _unit(seq)
            spool.record(dd, c)
        d2 = Drainer(spool, target, batch=4)
        assert d2.drain() and d2.status()["drained_units"] == 5 and len(_rows(url, "L1-ST1")) == 30
    assert main(["records", "verify", "--store", url]) == 0
    # Another station's spool with the same keys: a chain of its own, by the same key space (unique per station).
    with _spool(tmp_path / "other", 5) as other:
        assert Drainer(other, parse_url(pg_server.url(pg_db, station="L2-ST1"))).drain()
    assert len(_rows(url, "L2-ST1")) == 5 and pg_store.verify(target)["ok"]

    # A spool that does not continue the station's records (a new, empty one; another station's) is refused.
    with RecordStore(tmp_path / "fresh") as fresh:
        with pytest.raises(StoreError, match="does not continue station L1-ST1's records"):
            preflight(fresh, target)
        c, dd, _ = _unit(99)
        fresh.record(dd, c)
        halted = Drainer(fresh, target)
        assert halted.drain() is False and "does not continue" in halted.status()["halted"]

    # Someone else writes the station's next record (another writer, a forged row) while the drainer is between
    # two batches: the key is there, the record is not the spool's. Halted, the batch rolled back.
    url3 = pg_server.url(pg_db, station="L3-ST1")
    with _spool(tmp_path / "s3", 6) as s3:
        warned: list[str] = []
        d3 = Drainer(s3, parse_url(url3), batch=2, on_warning=warned.append)
        assert d3.drain(until=0) is True and len(_rows(url3, "L3-ST1")) == 2  # one batch: positions 1-2
        cols = [r[0] for r in _sql(url3, "SELECT column_name FROM information_schema.columns WHERE "
                                         "table_name = 'decisions' ORDER BY ordinal_position")]
        row = dict(zip(cols, _sql(url3, "SELECT * FROM decisions WHERE chain_pos = 2 AND station_id = 'L3-ST1'")[0],
                       strict=True))
        row.update(container_id="unit-00002", chain_pos=3, accept=1, row_hash="f" * 64)
        _sql(url3, f"INSERT INTO decisions ({','.join(row)}) VALUES ({','.join(['%s'] * len(row))})", *row.values())
        assert d3.drain() is False
        assert "'unit-00002' (position 3) in PostgreSQL differs from the spool's" in d3.status()["halted"]
        assert warned and "draining stopped, the spool keeps every record" in warned[-1]
        assert [r[1] for r in _rows(url3, "L3-ST1")] == ["unit-00000", "unit-00001", "unit-00002"]
        again = Drainer(s3, parse_url(url3))  # a restart: the head is not the spool's record, refused
        assert again.drain() is False and "is another one there" in again.status()["halted"]
        assert not pg_store.verify(parse_url(url3))["ok"]
        assert s3.count() == 6 and s3.verify()["ok"]


# ---------------------------------------------------------------- kill -9 during draining

_DRAIN_CHILD = """
import sys
from vialinspect.inspection_station.pg_store import Drainer, parse_url
from vialinspect.inspection_station.store import RecordStore
with RecordStore(sys.argv[1], readonly=True) as spool:
    d = Drainer(spool, parse_url(sys.argv[2]), batch=7, _hold_s=0.03)  # each transaction held open 30 ms
    d.drain()
print("done", d.status())
"""


def test_kill_9_during_draining_loses_nothing_and_duplicates_nothing(pg_server, pg_db, tmp_path):  # noqa: F811
    url = pg_server.url(pg_db, station="L1-ST1")
    n = 300
    _spool(tmp_path / "spool", n).close()
    pg_store.upgrade(url)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kill_at in (40, 150):  # killed twice, mid-way, with a transaction held open most of the time
        proc = subprocess.Popen([sys.executable, "-c", _DRAIN_CHILD, str(tmp_path / "spool"), url], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(_rows(url, "L1-ST1")) < kill_at:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        copied = _rows(url, "L1-ST1")
        assert kill_at <= len(copied) < n and [r[0] for r in copied] == list(range(1, len(copied) + 1))
    with RecordStore(tmp_path / "spool", readonly=True) as spool:
        d = Drainer(spool, parse_url(url))
        assert d.drain() and d.status()["drained_units"] == n - len(copied)
        spooled = [(rowid, r["container_id"], r["row_hash"]) for rowid, r in spool.rows_after(0, 10 * n)]
    assert _rows(url, "L1-ST1") == spooled  # every unit once, in order, the same records
    assert pg_store.verify(parse_url(url))["ok"]


# ---------------------------------------------------------------- the station


@pytest.fixture
def pg_station(tmp_path, monkeypatch):
    """Run the station on a sim:// line with a stand-in model (drawn scores) into a given store."""
    from .test_drift import DrawingRunner
    from .test_failsafe_outputs import forge_package

    forge_package(tmp_path / "pkg")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('name = "pg"\nformat = "vial-2R"\nmodel = "pkg"\nframes = 2\ndeadline_ms = 5000\n'
                      'frame_size = [150, 308]\nbatch_max = 4\nsample_accepted = 0.0\nmin_free_mb = 0\n')
    monkeypatch.setattr(station_mod, "load_model",
                        lambda *a, **k: LoadedModel(DrawingRunner(3), "m1", dict.fromkeys(CLASSES, 0.5)))

    def run(store: str, n: int, rate: int = 6000, printed: list | None = None, **opts):
        printed = [] if printed is None else printed
        snap = run_station(StationOptions(recipe=recipe, source=f"sim://?rate={rate}&seed=7&pixel_um=120",
                                          store=store, max_containers=n, quiet=True, status_every_s=0.0, **opts),
                           print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))))
        return snap, printed

    run.recipe = recipe  # type: ignore[attr-defined]
    return run


def test_the_station_records_every_unit_once_in_postgresql(pg_server, pg_db, pg_station, tmp_path,  # noqa: F811
                                                           capsys, monkeypatch):
    url = pg_server.url(pg_db, station="L1-ST1", line="L1")
    snap, printed = pg_station(url, 40, spool=tmp_path / "spool")
    assert snap["containers"] == 40 and snap["alarm"] is None
    assert snap["spool"]["backlog_units"] == 0 and snap["spool"]["db_reachable"] == 1
    assert "s3cret" not in " ".join(printed) and "user=" not in " ".join(printed)  # the URL is shown short
    rows = _rows(url, "L1-ST1")
    with RecordStore(tmp_path / "spool", readonly=True) as spool:
        assert len(rows) == 40 == spool.count() and spool.verify()["head"] == rows[-1][2] == snap["records_head"]
    assert len({r[1] for r in rows}) == 40
    assert _sql(url, "SELECT station_id, line_id, spool FROM stations") == [
        ("L1-ST1", "L1", str((tmp_path / "spool").resolve()))]
    flagged = _sql(url, "SELECT frames_dir, frames FROM decisions WHERE accept = 0 LIMIT 1")
    if flagged:  # frames stay in the spool; the row names them relative to its frames/ folder
        assert (tmp_path / "spool" / "frames" / flagged[0][0] / json.loads(flagged[0][1])[0]).is_file()
    # A restart resumes after the last unit, into the same chain.
    snap2, _ = pg_station(url, 10, spool=tmp_path / "spool")
    assert snap2["resumed_at"] == 40 and len(_rows(url, "L1-ST1")) == 50
    # The command line: the store from $VIALINSPECT_STORE, the station id from $VIALINSPECT_STATION.
    monkeypatch.setenv(pg_store.STORE_ENV, pg_server.url(pg_db))
    monkeypatch.setenv(pg_store.STATION_ENV, "L1-ST1")
    cmd = ["station", "--recipe", str(pg_station.recipe), "--source", "sim://?rate=6000&seed=7&pixel_um=120",
           "--max-containers", "5", "--quiet", "--line", "none", "--spool", str(tmp_path / "spool")]
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "through the spool" in out and "5 units drained, 0 left in the spool" in out
    assert main(["records", "verify", "--store", url]) == 0
    assert "intact (55 records" in capsys.readouterr().out
    # A new, empty spool for a station that has records: refused at the start, in one line.
    assert main([*cmd[:-1], str(tmp_path / "new-spool")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not continue station L1-ST1's records" in err
    monkeypatch.delenv(pg_store.STORE_ENV)
    assert main([*cmd, "--store", str(tmp_path / "sqlite")]) == 2  # --spool goes with a postgresql:// store
    assert "--spool goes with a postgresql:// store" in capsys.readouterr().err


def test_the_station_keeps_deciding_while_the_database_is_down(pg_server, pg_db, pg_station, tmp_path):  # noqa: F811
    url = pg_server.url(pg_db, station="L1-ST1")
    spool_dir, n = tmp_path / "spool", 480
    pg_store.upgrade(url)
    printed: list[str] = []
    seen: dict[str, object] = {}

    def spooled() -> int:
        try:
            with RecordStore(spool_dir, readonly=True) as ro:
                return ro.count()
        except StoreError:
            return 0

    def chaos() -> None:
        try:
            deadline = time.monotonic() + 40
            while len(_rows(url, "L1-ST1")) < 30:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            pg_server.stop("fast")
            at_stop = spooled()
            while spooled() < at_stop + 100:  # the line goes on: 100 more units while the database is down
                assert time.monotonic() < deadline
                time.sleep(0.05)
            port = next(int(m.group(1)) for p in printed if (m := re.search(r"127\.0\.0\.1:(\d+)/metrics", p)))
            seen["metrics"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            seen["warned"] = [p for p in printed if "WARNING: record store" in p]
            pg_server.start()
            while len(_rows(url, "L1-ST1")) < at_stop + 100:  # drained while the line runs on (retry <= 5 s)
                assert time.monotonic() < deadline
                time.sleep(0.05)
            seen["drained_while_running"] = spooled() < n
        except BaseException as e:  # noqa: BLE001
            seen["error"] = repr(e)
        finally:
            pg_server.start()

    t = threading.Thread(target=chaos)
    t.start()
    snap, _ = pg_station(url, n, rate=3000, printed=printed, spool=spool_dir, metrics_port=0)
    t.join()
    assert "error" not in seen, seen.get("error")
    assert seen["drained_while_running"]
    assert snap["containers"] == n and snap["alarm"] is None
    assert snap["not_inspected"] == 0, snap["reasons"]  # no unit paid for the database being down
    assert any("unreachable" in w and "keeps deciding" in w for w in seen["warned"])  # type: ignore[union-attr]
    metrics = str(seen["metrics"])
    assert "vialinspect_store_db_reachable 0.0" in metrics
    backlog = float(re.search(r"^vialinspect_spool_backlog_units (\S+)$", metrics, re.M).group(1))
    assert backlog >= 100
    # Back again: drained (during the run or at its end), every unit exactly once, the chain intact.
    assert snap["spool"]["backlog_units"] == 0 and snap["spool"]["db_reachable"] == 1
    rows = _rows(url, "L1-ST1")
    assert len(rows) == n == len({r[1] for r in rows}) and [r[0] for r in rows] == list(range(1, n + 1))
    assert pg_store.verify(parse_url(url))["ok"]


def test_the_status_line_shows_the_spool():
    base = {"containers": 5, "containers_per_min": 0.0, "reject_rate": 0.0, "not_inspected": 0,
            "reject_rate_by_class": dict.fromkeys(CLASSES, 0.0)}
    down = {"backlog_units": 412, "db_reachable": 0, "seconds_since_drain": 37.2, "halted": None}
    assert status_line({**base, "spool": down}).endswith("| SPOOL 412 (db down 37 s)")
    assert "SPOOL" not in status_line({**base, "spool": {**down, "db_reachable": 1, "backlog_units": 0}})
    assert status_line({**base, "spool": {**down, "halted": "x"}}).endswith("| SPOOL DRAIN HALTED")
