"""The review queue over a plant's records: paged in SQL, the same on one station's SQLite store as the Python walk
it replaced; on PostgreSQL one queue across stations (unit keys STATION_ID/CONTAINER_ID), filtered by line and
station, with frames from a shared frames folder (``frames_root``)."""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vialinspect.datasets.records import DEFECT_CLASSES
from vialinspect.inspection_station.pg_store import Drainer, parse_url
from vialinspect.inspection_station.qa import users
from vialinspect.inspection_station.qa.audit import ReviewDB
from vialinspect.inspection_station.qa.records_view import FRAMES_ROOT_ENV, PgRecords
from vialinspect.inspection_station.qa.review import NOT_INSPECTED, QueueFilter, QueueItem, ReviewError, ReviewService
from vialinspect.inspection_station.store import RecordStore
from vialinspect.inspection_station.types import Container, Decision, Frame

from .pg import pg_db, pg_server  # noqa: F401 - fixtures
from .test_review import PW, make_store
from .test_store import _unit

T0 = 1_780_000_000.0


def python_queue(svc: ReviewService, f: QueueFilter) -> list[QueueItem]:
    """The queue as ReviewService computed it before it was SQL: every flagged unit walked and filtered here."""
    since, until = svc._query(f).since, svc._query(f).until
    current = svc.current_reviews()
    items = []
    for rec in svc.store.iter_decisions(since=since, until=until, flagged_only=True):
        rv = current.get(rec["container_id"])
        status = "pending" if rv is None else rv.verdict
        if (f.status == "pending" and rv is not None) or (f.status == "escalated" and status != "escalate"):
            continue
        classes = {NOT_INSPECTED if r.startswith("not_inspected:") else r for r in rec["reasons"]}
        if (f.cls and f.cls not in classes) or (f.recipe and rec["recipe"] != f.recipe) or \
                (f.model_version and rec["model_version"] != f.model_version):
            continue
        scores = [float(rec["scores"][c]) for c in rec["reasons"] if c in rec["scores"]]
        scores = [s for s in scores if np.isfinite(s)]
        items.append(QueueItem(rec["container_id"], rec["sequence"], rec["decided_at_utc"], rec["recipe"],
                               rec["model_version"], rec["format"], list(rec["reasons"]),
                               max(scores) if scores else None, status))
    if f.sort == "score":
        items.sort(key=lambda q: (q.score is None, -(q.score or 0.0), q.decided_at_utc))
    else:
        items.sort(key=lambda q: (q.decided_at_utc, q.sequence))
    if f.descending:
        items.reverse()
    return items


def _tied_store(root: Path) -> Path:
    """40 units whose times share milliseconds and whose sequences run against time, with every kind of reason,
    NaN scores and reviews of every status (one changed)."""
    rng = np.random.default_rng(3)
    reasons = [["particle"], ["crack"], ["particle", "fill_level"], ["not_inspected:missing_frame"],
               ["not_inspected"], ["fill_level"], []]
    with RecordStore(root, min_free_mb=0) as st:
        for i in range(40):
            why = reasons[i % len(reasons)]
            scores = {c: float(rng.choice([0.7, 0.8, 0.9, np.nan])) for c in DEFECT_CLASSES}
            if i % 5 == 0:
                scores = {}  # no check ran: no score, sorted last
            frame = Frame(np.full((8, 4), i, np.uint8), 0.0, 0, "t")
            c = Container(f"c{i:02d}", [frame], trigger_time=0.0, sequence=1000 - (i * 7) % 13, format="vial-2R")
            d = Decision(c.id, c.sequence, not why, why, recipe=("r1", "r2")[i % 2],
                         model_version=("m1", "m2")[i % 3 == 0], scores=scores, thresholds={},
                         decided_at=T0 + 0.0004 * (i // 3) + 3600.0 * (i // 10))
            st.record(d, c)
    users.add_user(ReviewDB(root), "alice", "Alice Smith", "reviewer", PW["alice"], actor="os:test")
    with ReviewService(root) as svc:
        for cid, verdict in (("c01", "false_reject"), ("c02", "escalate"), ("c07", "confirmed_defect"),
                             ("c09", "escalate"), ("c16", "false_reject")):
            svc.sign_review("alice", PW["alice"], cid, verdict, "crack" if verdict == "confirmed_defect" else None)
        svc.sign_review("alice", PW["alice"], "c09", "false_reject", None, "second look: a bubble", supersedes=4)
    return root


def test_sql_pages_are_the_python_queue_paged(tmp_path):
    with ReviewService(_tied_store(tmp_path / "s")) as svc:
        assert svc.store.readonly and not svc.multi_station
        combos = itertools.product(("pending", "escalated", "all"), (None, "particle", "crack", NOT_INSPECTED),
                                   ("time", "score"), (False, True), (None, "r2"))
        for status, cls, sort, desc, recipe in combos:
            f = QueueFilter(cls=cls, recipe=recipe, sort=sort, descending=desc, status=status)
            want = python_queue(svc, f)
            assert svc.queue(f) == want, f
            assert svc.queue_count(f) == len(want)
            for limit, offset in ((1, 0), (3, 2), (7, 5), (50, 0), (4, max(0, len(want) - 1)), (5, len(want) + 3)):
                assert svc.queue(f, limit=limit, offset=offset) == want[offset: offset + limit], (f, limit, offset)
        f = QueueFilter(since="2026-05-28T21:00", until="2026-05-28T22:30", model_version="m1", status="all")
        assert svc.queue(f) == python_queue(svc, f)
        assert 0 < len(svc.queue(f)) < svc.queue_count(QueueFilter(status="all"))
        with pytest.raises(ReviewError, match="no line or station"):
            svc.queue(QueueFilter(line="L1"))
        with pytest.raises(ReviewError, match="negative"):
            svc.queue(QueueFilter(), limit=-1)
        assert svc.filter_options()["lines"] == [] and svc.filter_options()["stations"] == []


def test_the_queue_reads_the_review_database_read_only(tmp_path):
    root = make_store(tmp_path / "s")
    with ReviewService(root) as svc:
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            with svc.records._connect() as conn:
                conn.execute("INSERT INTO qa.meta (key, value) VALUES ('x', 'y')")
        svc.sign_review("alice", PW["alice"], "u001", "escalate", None, "")  # the app's own writes still work
        assert [q.container_id for q in svc.queue(QueueFilter(status="escalated"))] == ["u001"]


# ---------------------------------------------------------------- PostgreSQL: a plant of two lines


STATIONS = {"L1-ST1": "L1", "L2-ST1": "L2"}
N = 12  # units per station: every third rejected (unit-00000, -00003, -00006, -00009), with frames and maps


@pytest.fixture
def plant(pg_server, pg_db, tmp_path):  # noqa: F811
    """Two stations on two lines recording the SAME container ids, each drained into one database; their spools lie
    in one folder as a shared frames folder would hold them (FRAMES/<station_id>/frames, .../maps)."""
    frames = tmp_path / "frames"
    for sid, line in STATIONS.items():
        with RecordStore(frames / sid, min_free_mb=0) as spool:
            for seq in range(N):
                c, d, maps = _unit(seq)
                if sid == "L2-ST1" and seq == 6:  # one unit the other line rejected for a missing frame instead
                    d = dataclasses.replace(d, reasons=["not_inspected:missing_frame"])
                assert spool.record(d, c, maps=maps)
            assert Drainer(spool, parse_url(pg_server.url(pg_db, station=sid, line=line))).drain()
    url = pg_server.url(pg_db)
    with ReviewService(url, frames_root=frames) as svc:
        for name in ("alice", "root"):
            users.add_user(svc.db, name, name.title(), "admin" if name == "root" else "reviewer", PW[name],
                           actor="os:test")
        yield svc


def _keys(items: list[QueueItem]) -> list[str]:
    return [q.container_id for q in items]


def test_the_reader_gives_the_stores_rows_keyed_by_station(plant, tmp_path):
    rec = plant.records.get("L2-ST1/unit-00003")
    with RecordStore(tmp_path / "frames" / "L2-ST1", readonly=True) as spool:
        own = spool.get("unit-00003")
    assert rec == {**own, "container_id": "L2-ST1/unit-00003", "station_id": "L2-ST1", "line_id": "L2"}
    assert rec["reasons"] == ["particle"] and rec["accept"] is False and rec["unit_id"] == "unit-00003"
    for bad in ("unit-00003", "L3-ST1/unit-00003", "L2-ST1/", "/unit-00003", "L2-ST1/unit-00003/x"):
        assert plant.records.get(bad) is None
    assert plant.multi_station and plant.filter_options()["lines"] == ["L1", "L2"]
    assert plant.filter_options()["stations"] == ["L1-ST1", "L2-ST1"]
    assert plant.source.startswith("postgresql://") and "user=" not in plant.source


def test_one_queue_across_stations_filtered_by_line_and_station(plant):
    flagged = [f"unit-{s:05d}" for s in range(0, N, 3)]
    # The same times and sequences on both stations: ties in recording order, station by station.
    every = [f"{sid}/{cid}" for cid in flagged for sid in STATIONS]
    assert _keys(plant.queue()) == every
    items = plant.queue(limit=3, offset=1)
    assert _keys(items) == every[1:4] and [(q.station_id, q.line_id) for q in items] == \
        [("L2-ST1", "L2"), ("L1-ST1", "L1"), ("L2-ST1", "L2")]
    assert _keys(plant.queue(QueueFilter(descending=True))) == every[::-1]
    assert _keys(plant.queue(QueueFilter(line="L1"))) == [f"L1-ST1/{c}" for c in flagged]
    assert _keys(plant.queue(QueueFilter(station="L2-ST1", cls="particle"))) == \
        [f"L2-ST1/{c}" for c in flagged if c != "unit-00006"]
    assert _keys(plant.queue(QueueFilter(cls=NOT_INSPECTED))) == ["L2-ST1/unit-00006"]
    assert plant.queue_count(QueueFilter(line="L2")) == 4 and plant.queue_count(QueueFilter(line="L9")) == 0
    assert _keys(plant.queue(QueueFilter(sort="score")))[-1] == "L2-ST1/unit-00006"  # no score of its reasons

    # A review of one unit leaves the other station's unit of the same id in the queue.
    rv = plant.sign_review("alice", PW["alice"], "L1-ST1/unit-00003", "escalate", None, "")
    assert rv.container_id == "L1-ST1/unit-00003"
    assert "L1-ST1/unit-00003" not in _keys(plant.queue()) and "L2-ST1/unit-00003" in _keys(plant.queue())
    assert _keys(plant.queue(QueueFilter(status="escalated"))) == ["L1-ST1/unit-00003"]
    assert plant.queue(QueueFilter(status="all", line="L1"))[1].status == "escalate"
    plant.sign_review("root", PW["root"], "L1-ST1/unit-00003", "confirmed_defect", "particle", "a fibre",
                      supersedes=rv.review_id)
    assert plant.queue(QueueFilter(status="escalated")) == []
    assert [r.verdict for r in plant.reviews("L1-ST1/unit-00003")] == ["escalate", "confirmed_defect"]
    assert plant.reviews("L2-ST1/unit-00003") == []
    with pytest.raises(ReviewError, match="accepted by the station"):
        plant.sign_review("alice", PW["alice"], "L1-ST1/unit-00001", "false_reject", None, "")

    t = plant.trends(line="L1")
    rates = {(r.cls, r.rejected, r.inspected) for r in t.reject_rates}
    assert ("any", 4, N) in rates and ("particle", 4, N) in rates
    out = {o.model_version: o for o in t.outcomes}
    assert (out["v-test"].inspected, out["v-test"].confirmed, out["v-test"].pending) == (N, 1, 3)
    assert {o.model_version: o.confirmed for o in plant.trends(line="L2").outcomes} == {"v-test": 0}
    charts = {(c.cls, c.rejected, c.decided) for c in plant.control_counts(station="L2-ST1")}
    assert ("any", 3, N - 1) in charts  # the unit not inspected is left out


def test_frames_come_from_the_shared_folder_or_say_where_they_are_not(plant, pg_server, pg_db, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    d = plant.detail("L2-ST1/unit-00003")
    assert d.frames_note is None and len(d.frames) == 2 and d.frames[0].shape == (12, 10) and len(d.overlays) == 2
    p = plant.frame_file("L2-ST1/unit-00003", 1)
    assert p.is_relative_to((tmp_path / "frames" / "L2-ST1" / "frames").resolve())
    with RecordStore(tmp_path / "frames" / "L2-ST1", readonly=True) as spool:
        assert p == spool.frame_paths("unit-00003")[1].resolve()

    out = plant.export_reviewed(tmp_path / "ds", "os:test", line="L2")
    assert out.containers == 0  # nothing of line L2 reviewed yet
    with pytest.raises(ReviewError, match="inside the record store"):
        plant.export_reviewed(tmp_path / "frames" / "ds", "os:test")

    monkeypatch.delenv(FRAMES_ROOT_ENV, raising=False)
    with ReviewService(pg_server.url(pg_db)) as bare:
        d = bare.detail("L1-ST1/unit-00000")
        assert d.frames == [] and d.frames_note.startswith("frames not reachable: no frames folder is configured")
        assert "--frames-root" in d.frames_note and str((tmp_path / "frames" / "L1-ST1").resolve()) in d.frames_note
        with pytest.raises(ReviewError, match="frames not reachable"):
            bare.frame_file("L1-ST1/unit-00000", 0)
        assert bare.load_maps("L1-ST1/unit-00000") is None
    monkeypatch.setenv(FRAMES_ROOT_ENV, str(tmp_path / "elsewhere"))
    with ReviewService(pg_server.url(pg_db)) as moved:
        note = moved.detail("L1-ST1/unit-00000").frames_note
        assert note == f"frames not reachable at {tmp_path / 'elsewhere' / 'L1-ST1' / 'frames'} (station L1-ST1's " \
                       "folder in the shared frames folder)"


@pytest.mark.parametrize("frames_dir,frames", [("../../..", '["etc"]'), ("unit-00000", '["../../../../etc/passwd"]'),
                                               ("unit-00000", '["/etc/passwd"]'), ("other", '["f0.png"]')])
def test_a_tampered_row_cannot_lead_outside_the_stations_folder(plant, pg_server, pg_db, frames_dir,  # noqa: F811
                                                                 frames):
    import psycopg

    with psycopg.connect(parse_url(pg_server.url(pg_db)).conninfo, autocommit=True) as conn:
        conn.execute("ALTER TABLE decisions DISABLE TRIGGER decisions_no_update")  # what a superuser can do
        conn.execute("UPDATE decisions SET frames_dir = %s, frames = %s WHERE container_id = 'unit-00000'",
                     (frames_dir, frames))
    for key in ("L1-ST1/unit-00000", "L2-ST1/unit-00000"):
        with pytest.raises(ReviewError, match="refused"):
            plant.frame_file(key, 0)
    for bad in ("../L1-ST1/unit-00000", "L1-ST1/../L2-ST1/unit-00000", "L1-ST1", "", "L1-ST1/unit-00000\x00"):
        with pytest.raises(ReviewError):
            plant.frame_file(bad, 0)


def test_a_records_database_without_the_qa_tables_is_refused(pg_server, pg_db):  # noqa: F811
    from vialinspect.inspection_station.store import StoreError

    with pytest.raises(StoreError, match="db upgrade"):
        PgRecords(pg_server.url(pg_db))


def test_the_app_shows_lines_and_stations_and_says_where_frames_are_not(plant, pg_server, pg_db,  # noqa: F811
                                                                         monkeypatch):
    pytest.importorskip("gradio")
    from types import SimpleNamespace

    from vialinspect.inspection_station.qa.review_app import ANY, PLANT_HEADERS, _App

    req = SimpleNamespace(username="alice")
    app = _App(plant)
    try:
        text, table, ids = app.queue_page("all", ANY, ANY, ANY, "", "", "time", "L2", ANY, req)
        assert list(table.columns) == PLANT_HEADERS and text.startswith("**4** unit(s) rejected")
        assert ids == [f"L2-ST1/unit-{s:05d}" for s in range(0, N, 3)] and set(table["line"]) == {"L2"}
        assert app.queue("pending", ANY, ANY, ANY, "", "", "time", req)[2][:2] == ["L1-ST1/unit-00000",
                                                                                 "L2-ST1/unit-00000"]
        recipes, _, _, lines, stations = app.filter_choices(req)
        assert lines["visible"] and lines["choices"] == [ANY, "L1", "L2"] and stations["choices"][1:] == list(STATIONS)
        title = app._unit("L1-ST1/unit-00003", True)[1]
        assert "line L1" in title and "not reachable" not in title
    finally:
        app.close()
    monkeypatch.delenv(FRAMES_ROOT_ENV, raising=False)
    with ReviewService(pg_server.url(pg_db)) as bare:
        app = _App(bare)
        try:
            cid, title, gallery, *_ = app._unit("L1-ST1/unit-00003", True)
            assert gallery == [] and "**frames not reachable: no frames folder is configured" in title
        finally:
            app.close()


def test_the_apps_trends_filter_by_line_and_station(plant):
    pytest.importorskip("gradio")
    from types import SimpleNamespace

    from vialinspect.inspection_station.qa.review_app import ANY, _App

    plant.sign_review("alice", PW["alice"], "L1-ST1/unit-00003", "confirmed_defect", "particle", "")
    plant.sign_review("alice", PW["alice"], "L2-ST1/unit-00000", "false_reject", None, "")
    req = SimpleNamespace(username="alice")
    app = _App(plant)
    try:
        *_, t_lines, t_stations = app.page_choices(req)  # the Trends tab's filters, shown for a plant's records
        assert t_lines["visible"] and t_lines["choices"] == [ANY, "L1", "L2"]
        assert t_stations["visible"] and t_stations["choices"] == [ANY, *STATIONS]

        def row(*settings: str) -> list:
            _, _, table, models = app.trends_page("day", ANY, *settings, req)
            assert models["choices"] == [ANY, "v-test"]
            return table.iloc[0, :7].tolist()  # version, inspected, rejected, confirmed, false reject, escalated, not

        assert row("L1", ANY) == ["v-test", N, 4, 1, 0, 0, 3]
        assert row(ANY, "L2-ST1") == row("L2", ANY) == ["v-test", N, 4, 0, 1, 0, 3]
        assert row(ANY, ANY) == ["v-test", 2 * N, 8, 1, 1, 0, 6]
        assert app.trends("day", ANY, req)[2].iloc[0, :7].tolist() == row(ANY, ANY)  # the API: every line
        chosen = app.trends_page("day", "v-old", "L1", ANY, req)[3]  # a version the line has none of stays a choice
        assert chosen["choices"] == [ANY, "v-old", "v-test"]

        def centre(*settings: str) -> str:  # the "any" panel of the control chart: rejected / units decided
            return app.control_chart("day", ANY, *settings, req).axes[-1].get_title(loc="left").split(" from")[0]

        assert centre("L1", ANY) == "any: centre 33.33%"  # 4 / 12
        assert centre(ANY, "L2-ST1") == "any: centre 27.27%"  # 3 / 11: the unit not inspected is left out
        assert centre(ANY, ANY) == "any: centre 30.43%"  # 7 / 23
    finally:
        app.close()


def test_review_export_from_a_plants_database_on_the_command_line(plant, pg_server, pg_db, tmp_path,  # noqa: F811
                                                                  monkeypatch, capsys):
    from vialinspect.cli import main
    from vialinspect.datasets.manifest import read_manifest

    plant.sign_review("alice", PW["alice"], "L2-ST1/unit-00003", "confirmed_defect", "particle", "")
    plant.sign_review("alice", PW["alice"], "L1-ST1/unit-00003", "false_reject", None, "")
    monkeypatch.delenv(FRAMES_ROOT_ENV, raising=False)
    url = pg_server.url(pg_db)
    assert main(["review", "export", "--db", url, "--frames-root", str(tmp_path / "frames"), "--line", "L2",
                 "--out", str(tmp_path / "l2")]) == 0
    assert "wrote 1 reviewed container(s)" in capsys.readouterr().out
    rows = read_manifest(tmp_path / "l2").records
    assert [r.classes for r in rows] == [["particle"]]
    assert main(["review", "export", "--db", url, "--frames-root", str(tmp_path / "frames"),
                 "--out", str(tmp_path / "all")]) == 0
    assert "1 confirmed defect(s), 1 false reject(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # one of the two, not both
        main(["review", "export", "--store", str(tmp_path / "frames" / "L1-ST1"), "--db", url, "--out",
              str(tmp_path / "x")])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_plants_database_restored_from_a_backup_verifies(plant, pg_server, pg_db, tmp_path, capsys):  # noqa: F811
    """The documented backup (docs/plant.md): pg_dump of the whole database, pg_restore into an empty one; every
    station's chain, the audit trail and the append-only triggers come back."""
    import subprocess

    import psycopg

    from vialinspect.cli import main

    plant.sign_review("alice", PW["alice"], "L2-ST1/unit-00003", "confirmed_defect", "particle", "")
    dump = tmp_path / "plant.dump"
    conn = ["-h", str(pg_server.root), "-U", "postgres"]
    subprocess.run([pg_server.tool("pg_dump"), *conn, "-Fc", "-f", str(dump), pg_db], check=True)
    restored = pg_server.create_db()
    subprocess.run([pg_server.tool("pg_restore"), *conn, "--exit-on-error", "-d", restored, str(dump)],
                   check=True)
    capsys.readouterr()
    for sid in STATIONS:
        assert main(["records", "verify", "--store", pg_server.url(restored, station=sid)]) == 0
    assert main(["audit", "verify", "--db", pg_server.url(restored)]) == 0
    assert "intact" in capsys.readouterr().out
    with psycopg.connect(pg_server.url(restored)) as c, pytest.raises(psycopg.Error, match="append-only"):
        c.execute("DELETE FROM audit")
    with ReviewService(pg_server.url(restored), frames_root=tmp_path / "frames") as svc:
        assert [r.verdict for r in svc.reviews("L2-ST1/unit-00003")] == ["confirmed_defect"]
