"""Review queue benchmark: the first page and filtered pages of the QA queue over a plant's worth of records.

    .venv/bin/python benchmarks/review_queue.py [--units 1000000] [--flagged 0.03] [--stations 8] [--lines 4]
        [--reviewed 0.9] [--repeats 50] [--page 50] [--engine both|sqlite|postgresql] [--work DIR]
        [--out /tmp/review_queue_bench/review_queue.json]

Fills a record store with ``--units`` decided units of which ``--flagged`` are rejected (reasons: particle 50%,
crack 20%, fill_level 20%, not inspected 10%; two recipes, two model versions; 1,200 units/min across the plant),
by bulk insert (not ``RecordStore.record``: the fill is not what is measured, so rows carry no hash chain and no
frame files), and reviews of the oldest ``--reviewed`` share of the flagged units (the rest pending: reviewers keep
up, so the pending units are the newest, and the "pending" page skips every reviewed unit before them):

* **SQLite**: one station's store directory (``records.sqlite`` with its indexes, as a station's writer creates
  them, and ``review.sqlite``);
* **PostgreSQL** (when the server binaries are installed: tests/pg.py's throwaway server, unix socket): one
  database, ``--stations`` stations on ``--lines`` lines with the same container ids (``unit-00000001``...), COPY
  into ``decisions``, then ANALYZE.

Then times ``ReviewService.queue(filter, limit=--page)`` ``--repeats`` times per case (after one warm-up call) and
``queue_count``: p50/p95 in ms, with each case's query plan (EXPLAIN: the indexes used). The issue's target: the
first page and a filtered page in <= 200 ms p95. Prints a table, writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vialinspect.inspection_station.qa import audit  # noqa: E402
from vialinspect.inspection_station.qa.audit import ReviewDB  # noqa: E402
from vialinspect.inspection_station.qa.records_view import NOT_INSPECTED  # noqa: E402
from vialinspect.inspection_station.qa.review import QueueFilter, ReviewService  # noqa: E402
from vialinspect.inspection_station.store import DB_NAME, RecordStore, frames_dir_name  # noqa: E402

T0 = 1_780_000_000.0
TARGET_MS = 200.0
CHUNK = 20_000
REASONS = [["particle"]] * 5 + [["crack"]] * 2 + [["fill_level"]] * 2 + [["not_inspected:deadline_missed"]]
VERDICTS = ["false_reject"] * 12 + ["confirmed_defect"] * 7 + ["escalate"]


def _iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")


def units(n: int, flagged: float, stations: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """The plant's units in time order: unit i at station i % stations, 1,200 units/min in all."""
    rng = random.Random(seed)
    frames_none, frames_kept = json.dumps([None] * 4), json.dumps([f"f{k}.png" for k in range(4)])
    thresholds = json.dumps({"crack": 0.5, "fill_level": 0.5, "particle": 0.5}, sort_keys=True)
    timings = json.dumps({"total": 40.0})
    for i in range(n):
        t = T0 + 0.05 * i
        seq = i // stations
        cid = f"unit-{seq:08d}"
        bad = rng.random() < flagged
        reasons = rng.choice(REASONS) if bad else []
        scores = {c: round(rng.uniform(0.5, 1.0) if c in reasons else rng.uniform(0.0, 0.4), 4)
                  for c in ("particle", "crack", "fill_level")}
        yield {"station": f"LINE{i % stations + 1}-ST1", "chain_pos": seq + 1,
               "container_id": cid, "sequence": seq, "decided_at": t, "decided_at_utc": _iso(t),
               "recorded_at_utc": _iso(t + 0.02), "recipe": ("vial-2R", "vial-10R")[seq % 7 == 0],
               "model_version": "m1" if i < n // 2 else "m2", "accept": 0 if bad else 1,
               "reasons": json.dumps(reasons), "scores": json.dumps(scores, sort_keys=True), "thresholds": thresholds,
               "fill_height_mm": 13.7, "timings_ms": timings, "provider": "CPUExecutionProvider", "truth": None,
               "format": "vial-2R", "kept": "flagged" if bad else None,
               "frames_dir": frames_dir_name(cid) if bad else None, "frames": frames_kept if bad else frames_none,
               "has_maps": int(bad), "unit_id": None, "prev_hash": "-", "row_hash": "-"}


COLUMNS = ("container_id", "sequence", "decided_at", "decided_at_utc", "recorded_at_utc", "recipe", "model_version",
           "accept", "reasons", "scores", "thresholds", "fill_height_mm", "timings_ms", "provider", "truth", "format",
           "kept", "frames_dir", "frames", "has_maps", "unit_id", "prev_hash", "row_hash")


def review_rows(flagged: list[dict[str, Any]], share: float, audit_seq: int, key) -> list[tuple]:
    """Reviews of the oldest ``share`` of the flagged units, one each, as the reviews table holds them."""
    rng = random.Random(1)
    out = []
    for k, u in enumerate(flagged[: int(len(flagged) * share)], start=1):
        verdict = rng.choice(VERDICTS)
        out.append((k, key(u), verdict, json.dumps(["particle"] if verdict == "confirmed_defect" else []), "",
                    "bench", "Bench Reviewer", _iso(u["decided_at"] + 600), u["decided_at"] + 600, "benchmark", None,
                    u["model_version"], u["recipe"], u["reasons"], u["decided_at"], audit_seq))
    return out


REVIEW_COLUMNS = ("review_id", "container_id", "verdict", "classes", "comment", "reviewer", "printed_name",
                  "signed_at_utc", "signed_at", "meaning", "supersedes", "model_version", "recipe", "station_reasons",
                  "decided_at", "audit_seq")


# ---------------------------------------------------------------- filling


def fill_sqlite(root: Path, a: argparse.Namespace) -> dict[str, Any]:
    import sqlite3

    t = time.perf_counter()
    RecordStore(root, min_free_mb=0).close()  # the schema and indexes as a station's writer creates them
    conn = sqlite3.connect(root / DB_NAME, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    flagged: list[dict[str, Any]] = []
    sql = f"INSERT INTO decisions ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})"
    batch: list[tuple] = []
    conn.execute("BEGIN")
    # One station's store: every unit under its own key (the plant's station number kept in the id).
    for u in units(a.units, a.flagged, a.stations):
        u["container_id"] = f"{u['container_id']}-{u['station']}"
        if not u["accept"]:
            u["frames_dir"] = frames_dir_name(u["container_id"])
            flagged.append(u)
        batch.append(tuple(u[c] for c in COLUMNS))
        if len(batch) >= CHUNK:
            conn.executemany(sql, batch)
            batch = []
    conn.executemany(sql, batch)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    db = ReviewDB(root)
    seq = audit.record(db, "bench", audit.EXPORT, reason="benchmark fill: reviews inserted in bulk")
    rows = review_rows(flagged, a.reviewed, seq, key=lambda u: u["container_id"])
    conn = sqlite3.connect(db.path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO reviews ({','.join(REVIEW_COLUMNS)}) VALUES ({','.join('?' * 16)})", rows)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return {"units": a.units, "flagged": len(flagged), "reviews": len(rows),
            "fill_s": round(time.perf_counter() - t, 1), "bytes": sum(p.stat().st_size for p in root.glob("*.sqlite*"))}


def fill_pg(url: str, a: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    from vialinspect.inspection_station.pg_store import parse_url

    t = time.perf_counter()
    db = audit.open_review_db(url)  # runs every migration: records and QA tables, the queue's index
    seq = audit.record(db, "bench", audit.EXPORT, reason="benchmark fill: reviews inserted in bulk")
    db.close()
    flagged: list[dict[str, Any]] = []
    with psycopg.connect(parse_url(url, use_env=False).conninfo) as conn:
        lines = max(1, a.lines)
        with conn.cursor() as cur:
            for s in range(a.stations):
                cur.execute("INSERT INTO stations (station_id, line_id, host, spool) VALUES (%s, %s, 'bench', %s)",
                            (f"LINE{s + 1}-ST1", f"L{s % lines + 1}", f"/spool/LINE{s + 1}-ST1"))
            cols = ("station_id", "chain_pos", *COLUMNS)
            with cur.copy(f"COPY decisions ({','.join(cols)}) FROM STDIN") as copy:
                for u in units(a.units, a.flagged, a.stations):
                    if not u["accept"]:
                        flagged.append(u)
                    copy.write_row((u["station"], u["chain_pos"], *(u[c] for c in COLUMNS)))
            rows = review_rows(flagged, a.reviewed, seq, key=lambda u: f"{u['station']}/{u['container_id']}")
            with cur.copy(f"COPY reviews ({','.join(REVIEW_COLUMNS)}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return {"units": a.units, "flagged": len(flagged), "reviews": len(rows),
            "fill_s": round(time.perf_counter() - t, 1), "bytes": int(size)}


# ---------------------------------------------------------------- timing


def cases(plant: bool, page: int) -> list[tuple[str, QueueFilter, int, bool]]:
    """(name, filter, offset, counts toward the 200 ms target)."""
    out = [("first page (all flagged)", QueueFilter(status="all"), 0, True),
           ("pending (the app's default)", QueueFilter(), 0, True),
           ("class crack, pending", QueueFilter(cls="crack"), 0, True),
           ("not inspected, all", QueueFilter(cls=NOT_INSPECTED, status="all"), 0, True),
           ("pending, newest first", QueueFilter(descending=True), 0, True),
           ("escalated", QueueFilter(status="escalated"), 0, True),
           (f"page 21 (offset {20 * page}), all", QueueFilter(status="all"), 20 * page, False),
           ("by score, pending", QueueFilter(sort="score"), 0, False)]
    if plant:
        out[3:3] = [("line L2, pending", QueueFilter(line="L2"), 0, True),
                    ("station LINE3-ST1, class particle", QueueFilter(station="LINE3-ST1", cls="particle"), 0, True)]
    return out


def _pct(ms: list[float], p: float) -> float:
    """The nearest-rank percentile."""
    s = sorted(ms)
    return round(s[max(0, math.ceil(p / 100 * len(s)) - 1)], 2)


def time_queue(svc: ReviewService, a: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for name, f, offset, target in cases(svc.multi_station, a.page):
        got = svc.queue(f, limit=a.page, offset=offset)  # warm-up (and the page's size)
        ms = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            svc.queue(f, limit=a.page, offset=offset)
            ms.append(1000 * (time.perf_counter() - t))
        plan = svc.records.explain(svc._query(f), a.page) if f.sort == "time" else ["(scores sorted in Python)"]
        results.append({"case": name, "rows": len(got), "p50_ms": _pct(ms, 50), "p95_ms": _pct(ms, 95),
                        "max_ms": round(max(ms), 2), "target": target,
                        "ok": (not target) or _pct(ms, 95) <= TARGET_MS, "plan": plan})
    for name, f in (("count: pending", QueueFilter()), ("count: all flagged", QueueFilter(status="all"))):
        n = svc.queue_count(f)
        ms = []
        for _ in range(max(3, a.repeats // 5)):
            t = time.perf_counter()
            svc.queue_count(f)
            ms.append(1000 * (time.perf_counter() - t))
        results.append({"case": name, "rows": n, "p50_ms": _pct(ms, 50), "p95_ms": _pct(ms, 95),
                        "max_ms": round(max(ms), 2), "target": False, "ok": True, "plan": []})
    return results


def indexes(plan: list[str]) -> str:
    """The index names a plan (SQLite's EXPLAIN QUERY PLAN or PostgreSQL's EXPLAIN) uses, in order."""
    import re

    if plan and plan[0].startswith("("):
        return plan[0]
    names = []
    for line in plan:
        for m in re.finditer(r"(?:INDEX|Index (?:Only )?Scan(?: Backward)? using|Index Scan on) ([A-Za-z_]\w*)", line):
            if m.group(1) not in names:
                names.append(m.group(1))
    return ", ".join(names) or ("no index" if plan else "")


def report(engine: str, fill: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print(f"\n{engine}: {fill['units']:,} units, {fill['flagged']:,} flagged, {fill['reviews']:,} reviewed; filled in "
          f"{fill['fill_s']} s, {fill['bytes'] / 2**20:.0f} MiB")
    print(f"  {'case':38s} {'rows':>7s} {'p50 ms':>8s} {'p95 ms':>8s}  target  indexes")
    for r in rows:
        mark = ("ok" if r["ok"] else "MISSED") if r["target"] else "-"
        print(f"  {r['case']:38s} {r['rows']:>7,} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f}  {mark:6s}  "
              f"{indexes(r['plan'])}")


def run_sqlite(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / "sqlite-store"
    fill = fill_sqlite(root, a)
    with ReviewService(root) as svc:
        rows = time_queue(svc, a)
    report("SQLite", fill, rows)
    return {"fill": fill, "cases": rows}


def run_pg(a: argparse.Namespace) -> dict[str, Any] | None:
    from tests import pg

    if pg._bin_dir() is None:
        print("\nPostgreSQL: skipped (no server binaries: initdb, pg_ctl, postgres)")
        return None
    server = pg.PgServer()
    try:
        url = server.url(server.create_db())
        fill = fill_pg(url, a)
        with ReviewService(url) as svc:
            rows = time_queue(svc, a)
        report("PostgreSQL", fill, rows)
        version = server._cmd([str(server.bin / "postgres"), "--version"]).stdout.strip()
        return {"fill": fill, "cases": rows, "server": version}
    finally:
        server.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=1_000_000, help="recorded units (default 1,000,000)")
    ap.add_argument("--flagged", type=float, default=0.03, help="rejected share (default 0.03)")
    ap.add_argument("--stations", type=int, default=8, help="stations of the plant (default 8)")
    ap.add_argument("--lines", type=int, default=4, help="lines they are on (default 4)")
    ap.add_argument("--reviewed", type=float, default=0.9, help="reviewed share of the flagged, oldest first (0.9)")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per case (default 50)")
    ap.add_argument("--page", type=int, default=50, help="units per page (default 50)")
    ap.add_argument("--engine", choices=["both", "sqlite", "postgresql"], default="both")
    ap.add_argument("--work", default=None, help="folder for the SQLite store (default: a temporary one, removed)")
    ap.add_argument("--out", default="/tmp/review_queue_bench/review_queue.json", help="where to write the JSON")
    a = ap.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="vi-queue-"))
    shutil.rmtree(work / "sqlite-store", ignore_errors=True)
    out: dict[str, Any] = {"args": vars(a), "cpus": os.cpu_count(), "load_before": os.getloadavg(),
                           "target_p95_ms": TARGET_MS}
    try:
        if a.engine in ("both", "sqlite"):
            out["sqlite"] = run_sqlite(a, work)
        if a.engine in ("both", "postgresql"):
            out["postgresql"] = run_pg(a)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    out["load_after"] = os.getloadavg()
    print(f"\nload average before {out['load_before'][0]:.2f}, after {out['load_after'][0]:.2f} "
          f"({os.cpu_count()} CPUs)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
