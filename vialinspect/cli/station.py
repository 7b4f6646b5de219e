"""The line side: ``vialinspect station``, ``records verify`` (the record store's hash chain) and ``db upgrade``
(PostgreSQL migrations)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import UserError, positive_int, print_help_of

# ---------------------------------------------------------------- station


def cmd_station(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    # Checked before the start: without asyncua the line output would only log failed connects in the background.
    if (a.line or "").startswith("opc.tcp://"):
        require("opcua", "vialinspect station --line opc.tcp://...")
    if a.source.startswith("basler://"):
        require("camera", "vialinspect station --source basler://...")
    from vialinspect.inspection_station.station import StationOptions, run_station, summary_text

    store = a.store or os.environ.get("VIALINSPECT_STORE") or "station_store"
    pg = store.split(":", 1)[0].lower() in ("postgresql", "postgres")
    if pg:
        require("postgres", "vialinspect station --store postgresql://...")
    opts = StationOptions(recipe=Path(a.recipe), source=a.source, store=store if pg else Path(store),
                          spool=Path(a.spool) if a.spool else None,
                          max_containers=a.max_containers, duration_s=a.duration, line=a.line,
                          metrics_port=a.metrics_port, device=a.device, threads=a.threads, quiet=a.quiet,
                          registry=Path(a.registry) if a.registry else None,
                          trusted_keys=tuple(Path(k) for k in a.trusted_key), operator=a.operator,
                          challenge=_challenge_arg(a),
                          drift_baseline=Path(a.drift_baseline) if a.drift_baseline else None)
    try:
        summary = run_station(opts, print_fn=print)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    print(summary_text(summary))
    if a.summary_json:
        Path(a.summary_json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 1 if summary.get("alarm") or (summary.get("spool") or {}).get("halted") else 0


def _challenge_arg(a: argparse.Namespace):
    """``--challenge DIR`` with its rule and period as a ChallengeSpec; None leaves the recipe's challenge."""
    from vialinspect.inspection_station.challenge_spec import ChallengeSpecError, parse_spec

    if a.challenge is None:
        if a.challenge_rule is not None or a.challenge_every is not None:
            raise UserError("--challenge-rule and --challenge-every go with --challenge DIR (a recipe's challenge "
                            "table states its own)")
        return None
    try:
        spec = parse_spec({"set": a.challenge, "every_hours": a.challenge_every}, None)
    except ChallengeSpecError as e:  # the flag's name added to the message
        raise UserError(f"--challenge: {e}") from None
    return spec if a.challenge_rule is None else type(spec)(spec.set, a.challenge_rule, spec.every_hours)


def _challenge_rule(v: str):
    from vialinspect.inspection_station.challenge_spec import ChallengeSpecError, parse_rule_arg

    try:
        return parse_rule_arg(v)
    except ChallengeSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_station(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("station", help="run the inspection station on a frame source",
                        description="Run the inline station: acquire frames from SOURCE, assemble containers, "
                                    "decide with the recipe's model (positive release: any doubt rejects), record "
                                    "every decision, then tell the line. Ctrl-C or SIGTERM drains and stops cleanly.")
    st.add_argument("--recipe", required=True,
                    help="product recipe: a .toml or .yaml file, or a shipped recipe by name (vial-2R, syringe-1mL)")
    st.add_argument("--source", required=True,
                    help="frame source: sim://?rate=1200 | folder:PATH | video file | camera:N | rtsp://... | "
                         "basler://[serial]")
    st.add_argument("--store", default=None,
                    help="record store: a directory (SQLite), or postgresql://HOST/DB?station=ID (recorded into a "
                         "local spool and drained to PostgreSQL; the password from ~/.pgpass or PGPASSWORD, never "
                         "the URL). Default $VIALINSPECT_STORE, else station_store")
    st.add_argument("--spool", default=None, metavar="DIR",
                    help="with a postgresql:// store: the local spool (a record store folder) the station records "
                         "into first (default ~/.local/share/vialinspect/spool/STATION)")
    st.add_argument("--max-containers", type=positive_int, default=None, help="stop after this many units")
    st.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    st.add_argument("--line", default="log",
                    help="line output: log (STORE/line.jsonl), log:PATH, none, or an opc.tcp:// endpoint")
    st.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0 picks a free port)")
    st.add_argument("--device", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                    help="execution provider (default auto: GPU if installed, else CPU)")
    st.add_argument("--threads", type=positive_int, default=None, help="inference threads (default: all cores)")
    st.add_argument("--quiet", action="store_true", help="no live status line")
    st.add_argument("--summary-json", default=None, help="also write the final summary as JSON here")
    st.add_argument("--registry", default=None,
                    help="model registry: run its current model for the recipe's name (instead of the recipe's "
                         "model) and take up a promoted or rolled-back model between containers, without a restart")
    st.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                    help="public key (PEM) of the release signers, besides the recipe's trusted_keys; repeatable. "
                         "With any trusted key the station runs only a package signed by one of them (and, with "
                         "--registry, only signed changes)")
    st.add_argument("--operator", default=None, metavar="NAME",
                    help="who starts the station, recorded with each challenge result (default: the OS user)")
    st.add_argument("--challenge", default=None, metavar="DIR",
                    help="shift-start challenge: run this dataset folder (manifest with each unit's classes) through "
                         "the pipeline before production; on a miss raise the alarm and inspect nothing (exit 1). "
                         "Instead of the recipe's challenge table; results go to STORE/challenges.jsonl")
    st.add_argument("--challenge-rule", type=_challenge_rule, default=None, metavar="RULE",
                    help="all (default: every defective unit rejected, every good one accepted) or "
                         "tolerance:MISSED,FALSE (e.g. tolerance:0,1); a unit not inspected always fails")
    st.add_argument("--challenge-every", type=float, default=None, metavar="HOURS",
                    help="run the challenge again every HOURS of production (pausing intake meanwhile)")
    st.add_argument("--drift-baseline", default=None, metavar="FILE",
                    help="drift baseline (JSON) of the model's qualification: warn (status line, metrics, "
                         "heartbeat; never a stop) when a class's reject rate or score distribution drifts from it. "
                         "Instead of the recipe's drift_baseline")
    st.set_defaults(func=cmd_station)


# ---------------------------------------------------------------- records / db


def cmd_records_verify(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station import pg_store
    from vialinspect.inspection_station.store import RecordStore

    if pg_store.is_pg_url(a.store):  # one station's chain in PostgreSQL (?station=ID or $VIALINSPECT_STATION)
        target = pg_store.parse_url(a.store)
        a.store = target.display
        result = pg_store.verify(target)
    else:
        with RecordStore(a.store, readonly=True) as st:
            result = st.verify()
    if a.json:
        print(json.dumps(result, indent=2))
    elif result["ok"]:
        extra = f"; {result['not_covered']} older records not covered by the chain" if result["not_covered"] else ""
        print(f"{a.store}: intact ({result['rows']} records, chain head {result['head'][:16]}…{extra})")
    else:
        for p in result["problems"]:
            print(f"PROBLEM: {p}")
    return 0 if result["ok"] else 1


def cmd_db_upgrade(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("postgres", "vialinspect db upgrade")
    from vialinspect.inspection_station import pg_store

    if not pg_store.is_pg_url(a.db):
        raise UserError("--db takes a postgresql:// URL (a SQLite store migrates itself when a station opens it)")
    old, new = pg_store.upgrade(a.db)
    shown = pg_store.parse_url(a.db).display
    print(f"{shown}: schema at version {new}" + (f" (migrated from {old})" if old != new else " (up to date)"))
    return 0


def cmd_db_grants(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("postgres", "vialinspect db grants")
    from vialinspect.inspection_station import pg_store

    if not pg_store.is_pg_url(a.db):
        raise UserError("--db takes a postgresql:// URL")
    roles = {k: v for k, v in (("station", a.station_role), ("review", a.review_role)) if v}
    if not roles:
        raise UserError("name the roles to grant: --station-role NAME and/or --review-role NAME")
    shown = pg_store.parse_url(a.db, use_env=False).display
    for role, grants in pg_store.grant_roles(a.db, roles).items():
        print(f"{shown}: {role}: " + "; ".join(f"{t} {p}" for t, p in grants.items()) + "; nothing else")
    return 0


def add_records(sub: argparse._SubParsersAction) -> None:
    rc = sub.add_parser("records", help="verify the station's record store",
                        description="Check a record store's database file (SQLite integrity check) and recompute "
                                    "the hash chain over its decision records. Exit 0 intact, 1 damaged or "
                                    "tampered (each problem named), 2 not a store.")
    rcs = rc.add_subparsers(dest="records_command", metavar="ACTION")
    rv = rcs.add_parser("verify", help="check the file and the records' hash chain; exit 1 if tampered")
    rv.add_argument("--store", required=True,
                    help="record store directory, or postgresql://HOST/DB?station=ID (that station's chain)")
    rv.add_argument("--json", action="store_true", help="print the result as JSON")
    rv.set_defaults(func=cmd_records_verify)
    rc.set_defaults(func=print_help_of(rc))


def add_db(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="PostgreSQL: run the schema migrations, grant the roles",
                        description="Bring a PostgreSQL database's vialinspect schema to this version (stations "
                                    "and the QA side also do it when they start). Versioned, in one transaction, "
                                    "idempotent. 'db grants' gives the stations' and the review app's roles what "
                                    "they need and nothing more.")
    dbs = db.add_subparsers(dest="db_command", metavar="ACTION")
    du = dbs.add_parser("upgrade", help="run the migrations now")
    du.add_argument("--db", required=True, help="postgresql://HOST/DB (the password from ~/.pgpass or PGPASSWORD)")
    du.set_defaults(func=cmd_db_upgrade)
    dg = dbs.add_parser("grants", help="grant the station role and the review role their privileges",
                        description="Give existing roles exactly what they need on the vialinspect tables, "
                                    "revoking anything else they had there: the station role SELECT and INSERT on "
                                    "decisions, SELECT, INSERT and UPDATE on stations, nothing on the QA tables; the "
                                    "review role SELECT on decisions and stations, SELECT and INSERT on audit, "
                                    "reviews and meta, SELECT, INSERT and UPDATE on users (the trigger allows only "
                                    "disabling). Neither may UPDATE, DELETE or TRUNCATE decisions or audit, or run "
                                    "DDL. The roles must exist: the DBA creates them, with their passwords (CREATE "
                                    "ROLE NAME LOGIN PASSWORD ...). Run it as the tables' owner, after db upgrade.")
    dg.add_argument("--db", required=True, help="postgresql://HOST/DB, connecting as the tables' owner")
    dg.add_argument("--station-role", default=None, metavar="NAME", help="the role the stations connect as")
    dg.add_argument("--review-role", default=None, metavar="NAME",
                    help="the role the review app and the users/audit/registry commands connect as")
    dg.set_defaults(func=cmd_db_grants)
    db.set_defaults(func=print_help_of(db))
