"""Plant benchmark: N stations recording into one PostgreSQL through their local spools (issue 29, step 1).

    .venv/bin/python benchmarks/plant.py [--stations 8] [--rate 150] [--minutes 10] [--outage-stations N]
        [--outage-minutes 5] [--outage-seconds 60] [--scenario both|steady|outage] [--threads 1] [--stagger-s 2]
        [--deadline-ms MS] [--json /tmp/plant_bench/plant.json]

A throwaway PostgreSQL server (tests/pg.py: ``initdb`` into a temporary folder, unix socket only, trust
authentication; as root the server runs as ``postgres``), and for each scenario a fresh database and
``--stations`` station processes (``vialinspect station --recipe vial-2R --source sim://?rate=R&seed=S_i&...
--store postgresql://...?station=LINE{i}-ST1 --spool DIR_i --max-containers N``), each at ``--rate`` units/min
(K=4, the shipped default model), started ``--stagger-s`` apart. The simulator renders in each station's process
(~36 ms a vial-2R unit, about as much CPU as the inference), which a camera would not: on 2 cores the machine, not
the record store, is what limits the stations.

* **steady** (``--minutes``): units offered (= decided: the station decides every unit its source delivers, a
  unit turned away included) = rows in the spool = rows in PostgreSQL, the same keys (0 lost, 0 duplicated; the
  primary key makes a duplicate impossible, so the check is that the keys and positions 1..N match the spool's),
  every station's chain verified (``vialinspect records verify``), units not inspected (and by reason), the
  record latency (a unit's ``decided_at`` to its ``drained_utc`` in PostgreSQL) p50/p99, each station's resident
  memory (VmRSS every 5 s: its first minute of deciding against its last), the rate each station achieved, the
  machine's CPU use.
* **outage** (``--outage-minutes``, ``--outage-stations``, ``--outage-seconds``): the same, with the server
  stopped (``pg_ctl stop -m fast``) in the middle of the run for ``--outage-seconds`` and started again: the
  backlog at restart, the time from the restart until every station's backlog is 0 (PostgreSQL's counts against
  the spools' rows, polled every 0.5 s), and units not inspected while it was down against the same span before.

``--deadline-ms``: the simulator spreads a unit's K frames evenly over its period (a real camera takes them in a
burst after the spin stops): at 150 units/min the fourth frame comes 300 ms after the first, exactly the
assembly window (0.6 x the recipe's 500 ms deadline), so with the recipe's own deadline about a third of the
units are ``late_frame`` even on an idle machine (measured: 175 of 600, 4 stations, CPU 54% busy). Run with
``--deadline-ms 1000`` (window 600 ms) to measure the stations and the store rather than that artefact.

Prints the machine's pace (GFLOP/s, before and after) with the figures, a table per scenario, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()
os.environ.setdefault("VIALINSPECT_NO_PROGRESS", "1")

from benchmarks.pace import pace_gflops  # noqa: E402

VIALINSPECT = [str(Path(sys.executable).with_name("vialinspect"))]
if not Path(VIALINSPECT[0]).exists():
    VIALINSPECT = [sys.executable, "-c", "import sys; from vialinspect.cli import main; sys.exit(main())"]
SAMPLE_S = 5.0  # resident memory and CPU time of each station, every this many seconds
POLL_S = 1.0  # backlog (spool rows against PostgreSQL rows), every this many seconds (0.5 s while draining)


def start_server():
    """tests/pg.py's throwaway server; it calls pytest.skip when it cannot run one (no binaries, no psycopg)."""
    from tests.pg import PgServer

    try:
        return PgServer()
    except BaseException as e:  # noqa: BLE001 - pytest's Skipped is a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        sys.exit(f"cannot start a PostgreSQL server: {e}")


# ---- /proc --------------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_s(pid: int) -> float | None:
    """utime + stime of a process, seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


# ---- spools and PostgreSQL ------------------------------------------------------------------------------------


def spool_rows(spool: Path) -> int:
    db = spool / "records.sqlite"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT COALESCE(MAX(rowid), 0) FROM decisions").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def spool_keys(spool: Path) -> list[tuple[int, str]]:
    con = sqlite3.connect(f"file:{spool / 'records.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return [(int(r), c) for r, c in con.execute("SELECT rowid, container_id FROM decisions ORDER BY rowid")]
    finally:
        con.close()


def pg_counts(url: str) -> dict[str, int] | None:
    """Rows per station in PostgreSQL; None while the server is down."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            return {s: int(n) for s, n in conn.execute(
                "SELECT station_id, count(*) FROM decisions GROUP BY station_id").fetchall()}
    except psycopg.Error:
        return None


def quantiles(conn, where: str, args: tuple) -> dict[str, float | None]:
    row = conn.execute(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lat), percentile_cont(0.99) WITHIN GROUP (ORDER BY lat), "
        f"max(lat), count(*) FROM (SELECT extract(epoch FROM drained_utc) - decided_at AS lat FROM decisions "
        f"WHERE {where}) q", args).fetchone()
    ms = [None if v is None else round(float(v) * 1e3, 1) for v in row[:3]]
    return {"p50_ms": ms[0], "p99_ms": ms[1], "max_ms": ms[2], "units": int(row[3])}


# ---- one scenario ---------------------------------------------------------------------------------------------


def window_mean(samples: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    xs = [v for t, v in samples if t0 <= t < t1]
    return round(sum(xs) / len(xs), 1) if xs else None


def recipe_file(a, work: Path) -> str:
    """The recipe the stations run: ``--recipe`` as it is, or with ``deadline_ms`` set to ``--deadline-ms``."""
    if not a.deadline_ms:
        return a.recipe
    src = Path(a.recipe) if Path(a.recipe).is_file() else ROOT / "inspection_station" / "recipes" / f"{a.recipe}.toml"
    text, n = re.subn(r"(?m)^deadline_ms\s*=\s*\d+", f"deadline_ms = {a.deadline_ms}", src.read_text())
    if n != 1:
        sys.exit(f"{src}: no deadline_ms line to set")
    out = work / src.name
    out.write_text(text)
    return str(out)


def run_scenario(name: str, server, a, n_stations: int, minutes: float, outage_s: float, work: Path) -> dict:
    import psycopg

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = recipe_file(a, work)
    db = server.create_db()
    base = server.url(db)
    n_units = int(round(a.rate * minutes))
    ids = [f"LINE{i + 1}-ST1" for i in range(n_stations)]
    urls = {s: f"{base}&station={s}&line=LINE{i + 1}" for i, s in enumerate(ids)}
    spools = {s: work / s / "spool" for s in ids}
    env = {**os.environ, "VIALINSPECT_NO_PROGRESS": "1"}
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    print(f"\n[{name}] {n_stations} stations x {a.rate:g} units/min x {minutes:g} min ({n_units} units each)"
          + (f", database stopped for {outage_s:g} s in the middle" if outage_s else ""), flush=True)
    t_spawn = time.time()
    for i, s in enumerate(ids):
        (work / s).mkdir()
        source = (f"sim://?rate={a.rate:g}&formats=vial-2R&frames=4&seed={1000 + i}"
                  f"&defect_rate={a.defect_rate:g}")
        cmd = [*VIALINSPECT, "station", "--recipe", recipe, "--source", source, "--store", urls[s],
               "--spool", str(spools[s]), "--max-containers", str(n_units), "--quiet", "--threads", str(a.threads),
               "--summary-json", str(work / s / "summary.json")]
        logs[s] = open(work / s / "station.log", "w")  # noqa: SIM115 - closed below
        procs[s] = subprocess.Popen(cmd, stdout=logs[s], stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if i + 1 < n_stations:
            time.sleep(a.stagger_s)

    rss: dict[str, list[tuple[float, float]]] = {s: [] for s in ids}
    cpu: dict[str, float] = {}
    backlog: list[dict] = []
    t_first_all = None  # every station has recorded a unit
    ticks0 = ticks1 = None
    outage: dict = {}
    next_sample = 0.0
    deadline = time.time() + minutes * 60 * 3 + 300
    while any(p.poll() is None for p in procs.values()):
        now = time.time()
        if now > deadline:
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
            print(f"[{name}] timed out: stations terminated", flush=True)
            break
        if now >= next_sample:
            next_sample = now + SAMPLE_S
            for s, p in procs.items():
                if p.poll() is None:
                    r, c = rss_mb(p.pid), cpu_s(p.pid)
                    if r is not None:
                        rss[s].append((now, r))
                    if c is not None:
                        cpu[s] = c
        rows = {s: spool_rows(spools[s]) for s in ids}
        if t_first_all is None and all(rows.values()):
            t_first_all = time.time()
            ticks0 = machine_ticks()
            print(f"[{name}] all stations deciding after {t_first_all - t_spawn:.0f} s", flush=True)
        if ticks1 is None and ticks0 is not None and any(p.poll() is not None for p in procs.values()):
            ticks1 = machine_ticks()
        in_pg = pg_counts(base)
        if in_pg is not None:
            backlog.append({"t": round(now - t_spawn, 1),
                            "backlog": sum(max(0, rows[s] - in_pg.get(s, 0)) for s in ids)})
        else:
            backlog.append({"t": round(now - t_spawn, 1), "backlog": None, "spooled": sum(rows.values())})
        # The outage: in the middle of the deciding span.
        if outage_s and t_first_all is not None and "down_utc" not in outage \
                and now >= t_first_all + (minutes * 60 - outage_s) / 2:
            print(f"[{name}] stopping PostgreSQL (pg_ctl stop -m fast) for {outage_s:g} s", flush=True)
            outage["stop_called"] = time.time()
            server.stop("fast")
            outage["down_utc"] = time.time()
            outage["stop_s"] = round(outage["down_utc"] - outage["stop_called"], 2)
        if "down_utc" in outage and "up_utc" not in outage and now >= outage["down_utc"] + outage_s:
            server.start()
            outage["up_utc"] = time.time()
            outage["backlog_at_restart"] = sum(rows.values()) - sum((pg_counts(base) or {}).values())
            print(f"[{name}] PostgreSQL started again; backlog {outage['backlog_at_restart']} units", flush=True)
        if "up_utc" in outage and "drained_utc" not in outage and in_pg is not None \
                and all(in_pg.get(s, 0) >= rows[s] for s in ids) and now > outage["up_utc"]:
            outage["drained_utc"] = now
            outage["time_to_drain_s"] = round(now - outage["up_utc"], 1)
            print(f"[{name}] every spool drained {outage['time_to_drain_s']} s after the restart", flush=True)
        draining = "up_utc" in outage and "drained_utc" not in outage
        time.sleep(0.5 if draining else POLL_S)
    if ticks1 is None:
        ticks1 = machine_ticks()
    for f in logs.values():
        f.close()
    if outage_s and "up_utc" not in outage:  # the run ended during the outage: start it again to check
        server.start()
        outage["up_utc"] = time.time()

    # ---- the checks, after every station has stopped (each drains what is left for up to 10 s at its end) ----
    stations = []
    with psycopg.connect(base, autocommit=True) as conn:
        for s in ids:
            summ_file = work / s / "summary.json"
            summ = json.loads(summ_file.read_text()) if summ_file.exists() else {}
            keys = spool_keys(spools[s]) if (spools[s] / "records.sqlite").exists() else []
            pg = conn.execute("SELECT chain_pos, container_id FROM decisions WHERE station_id = %s ORDER BY chain_pos",
                              (s,)).fetchall()
            pg_keys = [(int(p), c) for p, c in pg]
            dup = conn.execute("SELECT count(*) FROM (SELECT container_id FROM decisions WHERE station_id = %s "
                               "GROUP BY container_id HAVING count(*) > 1) d", (s,)).fetchone()[0]
            span = conn.execute("SELECT min(decided_at), max(decided_at) FROM decisions WHERE station_id = %s",
                                (s,)).fetchone()
            t0 = time.perf_counter()
            v = subprocess.run([*VIALINSPECT, "records", "verify", "--store", urls[s]], capture_output=True,
                               text=True, env=env, cwd=ROOT)
            verify_s = time.perf_counter() - t0
            reasons = summ.get("reasons", {})
            first, last = (float(span[0]), float(span[1])) if span[0] is not None else (None, None)
            samples = rss[s]
            end = samples[-1][0] if samples else 0.0
            st = {
                "station": s, "exit": procs[s].returncode, "offered": summ.get("containers"),
                "spool_rows": len(keys), "in_postgresql": len(pg_keys),
                "lost": len(set(keys) - set(pg_keys)), "extra_in_postgresql": len(set(pg_keys) - set(keys)),
                "duplicates": int(dup), "same_keys_and_positions": keys == pg_keys,
                "verify_ok": v.returncode == 0, "verify_s": round(verify_s, 1),
                "verify_out": (v.stdout + v.stderr).strip().splitlines()[-1:] if v.returncode else [],
                "not_inspected": {k.split(":", 1)[1]: n for k, n in reasons.items() if k.startswith("not_inspected:")},
                "not_inspected_units": summ.get("not_inspected"),  # a unit may have several reasons
                "rejected": summ.get("rejected"),
                "units_per_min": round(60 * (len(pg_keys) - 1) / (last - first), 1) if first and last > first else None,
                "latency": quantiles(conn, "station_id = %s", (s,)),
                "decision_latency_p99_ms": summ.get("latency_p99_ms"),
                "rss_first_min_mb": window_mean(samples, first or 0, (first or 0) + 60),
                "rss_last_min_mb": window_mean(samples, end - 60, end + 1),
                "rss_max_mb": round(max((r for _, r in samples), default=0), 1),
                "cpu_s": round(cpu.get(s, 0.0), 1),
                "spool_at_exit": summ.get("spool"),
            }
            f_, l_ = st["rss_first_min_mb"], st["rss_last_min_mb"]
            st["rss_growth"] = round((l_ - f_) / f_, 3) if f_ and l_ else None
            stations.append(st)
        overall_lat = quantiles(conn, "true", ())
        db_mb = round(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 2**20, 1)
        if outage_s and "down_utc" in outage:
            down, up = outage["down_utc"], outage["up_utc"]
            span_s = up - down

            def not_inspected_between(t0: float, t1: float) -> tuple[int, int]:
                n, ni = conn.execute("SELECT count(*), count(*) FILTER (WHERE reasons LIKE '%%not_inspected:%%') "
                                     "FROM decisions WHERE decided_at >= %s AND decided_at < %s",
                                     (t0, t1)).fetchone()
                return int(n), int(ni)

            n_in, ni_in = not_inspected_between(down, up)
            n_before, ni_before = not_inspected_between(down - span_s, down)
            outage.update({
                "down_s": round(span_s, 1), "units_decided_while_down": n_in, "not_inspected_while_down": ni_in,
                "units_decided_same_span_before": n_before, "not_inspected_same_span_before": ni_before,
                "latency_decided_before_outage": quantiles(conn, "decided_at < %s", (outage["stop_called"],)),
                "latency_decided_while_down": quantiles(conn, "decided_at >= %s AND decided_at < %s", (down, up)),
            })
            for k in ("stop_called", "down_utc", "up_utc", "drained_utc"):
                if k in outage:
                    outage[k] = time.strftime("%H:%M:%S", time.gmtime(outage[k]))
    warned = {s: "unreachable" in (work / s / "station.log").read_text() for s in ids}
    busy = None
    if ticks0 and ticks1 and ticks1[1] > ticks0[1]:
        busy = round((ticks1[0] - ticks0[0]) / (ticks1[1] - ticks0[1]), 3)
    offered = sum(st["offered"] or 0 for st in stations)
    res = {
        "scenario": name, "stations": n_stations, "stagger_s": a.stagger_s, "rate_per_station": a.rate,
        "minutes": minutes,
        "units_per_station": n_units, "threads_per_station": a.threads,
        "deadline_ms": a.deadline_ms or "the recipe's", "defect_rate": a.defect_rate,
        "startup_s": round(t_first_all - t_spawn, 1) if t_first_all else None,
        "wall_s": round(time.time() - t_spawn, 1),
        "offered": offered, "in_postgresql": sum(st["in_postgresql"] for st in stations),
        "lost": sum(st["lost"] for st in stations), "duplicates": sum(st["duplicates"] for st in stations),
        "all_verified": all(st["verify_ok"] for st in stations),
        "all_same_keys": all(st["same_keys_and_positions"] for st in stations),
        "not_inspected_units": sum(st["not_inspected_units"] or 0 for st in stations),
        "not_inspected": {}, "units_per_min_total": round(sum(st["units_per_min"] or 0 for st in stations), 1),
        "latency": overall_lat, "machine_cpu_busy": busy, "database_mb": db_mb,
        "cpu_ms_per_unit": round(1e3 * sum(st["cpu_s"] for st in stations) / max(1, offered), 1),
        "decision_latency_p99_ms_max": max((st["decision_latency_p99_ms"] or 0 for st in stations), default=None),
        "rss_growth_max": max((st["rss_growth"] for st in stations if st["rss_growth"] is not None), default=None),
        "stations_detail": stations, "backlog_max": max((b["backlog"] or 0 for b in backlog), default=0),
        "backlog_timeline": backlog[::5],
    }
    for st in stations:
        for k, n in st["not_inspected"].items():
            res["not_inspected"][k] = res["not_inspected"].get(k, 0) + n
    if outage_s:
        res["outage"] = {**outage, "warned": sum(warned.values())}
    return res


def pct(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def print_scenario(r: dict) -> None:
    print(f"\n== {r['scenario']}: {r['stations']} stations x {r['rate_per_station']:g}/min x {r['minutes']:g} min, "
          f"{r['threads_per_station']} inference thread(s) each; start-up {r['startup_s']} s, wall {r['wall_s']} s")
    print(f"{'station':10s} {'offered':>7s} {'spool':>6s} {'in PG':>6s} {'lost':>4s} {'dup':>3s} {'chain':>5s} "
          f"{'/min':>6s} {'lat p50':>8s} {'lat p99':>8s} {'RSS 1st':>7s} {'RSS last':>8s} {'cpu s':>6s}  not inspected")
    for st in r["stations_detail"]:
        lat = st["latency"]
        print(f"{st['station']:10s} {st['offered'] or 0:>7d} {st['spool_rows']:>6d} {st['in_postgresql']:>6d} "
              f"{st['lost']:>4d} {st['duplicates']:>3d} {'ok' if st['verify_ok'] else 'BAD':>5s} "
              f"{st['units_per_min'] or 0:>6.1f} {lat['p50_ms'] or 0:>7.0f}ms {lat['p99_ms'] or 0:>7.0f}ms "
              f"{st['rss_first_min_mb'] or 0:>6.0f}M {st['rss_last_min_mb'] or 0:>7.0f}M {st['cpu_s']:>6.0f}  "
              f"{st['not_inspected_units'] or 0} {json.dumps(st['not_inspected'], sort_keys=True)}")
    lat = r["latency"]
    print(f"{'all':10s} {r['offered']:>7d} {'':>6s} {r['in_postgresql']:>6d} {r['lost']:>4d} {r['duplicates']:>3d} "
          f"{'ok' if r['all_verified'] else 'BAD':>5s} {r['units_per_min_total']:>6.0f} {lat['p50_ms'] or 0:>7.0f}ms "
          f"{lat['p99_ms'] or 0:>7.0f}ms  (max {lat['max_ms']} ms)")
    ni = r["not_inspected_units"]
    print(f"units not inspected: {ni} of {r['offered']} ({ni / max(1, r['offered']):.2%}) "
          f"by reason {json.dumps(r['not_inspected'], sort_keys=True)} (a unit may have several); "
          f"decision latency p99 (worst station) "
          f"{r['decision_latency_p99_ms_max']:.0f} ms; machine CPU busy "
          f"{pct(r['machine_cpu_busy'], '.0%')}; station CPU {r['cpu_ms_per_unit']} ms/unit (start-up included); "
          f"RSS growth first->last minute max {pct(r['rss_growth_max'], '+.1%')}; database {r['database_mb']} MB; "
          f"max backlog {r['backlog_max']} units; keys and positions = spool's: {r['all_same_keys']}")
    o = r.get("outage")
    if o:
        before = o["latency_decided_before_outage"]
        print(f"outage: stopped {o.get('down_utc')} ({o.get('stop_s')} s to stop), started {o.get('up_utc')} "
              f"after {o.get('down_s')} s; backlog at restart {o.get('backlog_at_restart')} units; every spool "
              f"drained {o.get('time_to_drain_s')} s after the restart; stations that warned: {o['warned']}")
        print(f"  not inspected while down: {o.get('not_inspected_while_down')} of {o.get('units_decided_while_down')}"
              f" (the same span before: {o.get('not_inspected_same_span_before')} of "
              f"{o.get('units_decided_same_span_before')}); record latency of units decided before the outage "
              f"p50 {before['p50_ms']} ms p99 {before['p99_ms']} ms;"
              f" decided while down: p50 {o['latency_decided_while_down']['p50_ms']} ms, max "
              f"{o['latency_decided_while_down']['max_ms']} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stations", type=int, default=8, help="station processes (default 8)")
    ap.add_argument("--rate", type=float, default=150, help="units/min per station (default 150: 1,200/min for 8)")
    ap.add_argument("--minutes", type=float, default=10, help="length of the steady run (default 10)")
    ap.add_argument("--outage-minutes", type=float, default=5, help="length of the outage run (default 5)")
    ap.add_argument("--outage-stations", type=int, default=0,
                    help="stations in the outage run (default 0: as many as --stations)")
    ap.add_argument("--outage-seconds", type=float, default=60,
                    help="how long the database is stopped in the middle of the outage run (default 60)")
    ap.add_argument("--scenario", choices=["both", "steady", "outage"], default="both",
                    help="which runs (default both: steady, then outage)")
    ap.add_argument("--threads", type=int, default=1,
                    help="inference threads per station (default 1: N stations share this machine's cores)")
    ap.add_argument("--recipe", default="vial-2R", help="recipe (default vial-2R, the shipped default model)")
    ap.add_argument("--stagger-s", type=float, default=2.0,
                    help="seconds between station starts (default 2: stations of a plant do not all load their "
                         "model on the same two cores at once)")
    ap.add_argument("--deadline-ms", type=int, default=0,
                    help="run the recipe with this deadline_ms (default 0: the recipe's own)")
    ap.add_argument("--defect-rate", type=float, default=0.05, help="defective share on the lines (default 0.05)")
    ap.add_argument("--work", default="/tmp/plant_bench/work", help="the stations' spools and logs (emptied)")
    ap.add_argument("--json", default="/tmp/plant_bench/plant.json", help="where to write the JSON result")
    a = ap.parse_args()
    work = Path(a.work)
    pace0 = pace_gflops()
    print(f"pace {pace0:.0f} GFLOP/s (float32), {os.cpu_count()} CPUs", flush=True)
    server = start_server()
    results = []
    try:
        if a.scenario in ("both", "steady"):
            results.append(run_scenario("steady", server, a, a.stations, a.minutes, 0, work / "steady"))
        if a.scenario in ("both", "outage"):
            results.append(run_scenario("outage", server, a, a.outage_stations or a.stations, a.outage_minutes,
                                        a.outage_seconds, work / "outage"))
    finally:
        server.close()
    pace1 = pace_gflops()
    print(f"\nvialinspect plant benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; pace "
          f"{pace0:.0f}-{pace1:.0f} GFLOP/s (float32), {os.cpu_count()} CPUs; PostgreSQL on a unix socket, same "
          "machine")
    for r in results:
        print_scenario(r)
    out = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pace_gflops": [round(pace0), round(pace1)],
           "cpus": os.cpu_count(), "command": " ".join(sys.argv), "scenarios": results}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"JSON: {a.json}")
    ok = all(r["lost"] == 0 and r["duplicates"] == 0 and r["all_verified"] and r["all_same_keys"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
