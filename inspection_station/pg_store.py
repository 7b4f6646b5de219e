"""The record store of one station of a plant on PostgreSQL, behind a local spool.

``vialinspect station --store postgresql://HOST/DB?station=LINE1-ST1 [--spool DIR]``

**The spool.** The station never writes to PostgreSQL in its recording thread. It records every decision into a
local SQLite ``RecordStore`` (the spool: the same file, durability, frames, chain and crash safety as a
``--store DIR``), and only then tells the line. A background thread, the :class:`Drainer`, copies the spool's rows
to PostgreSQL in recording order, a batch per transaction. So the line never waits for the network: when
PostgreSQL is down or slow the station keeps deciding into the spool, warns (status line, metrics, heartbeat),
retries with backoff and drains when the database is back. A unit whose record cannot be written into the spool is
rejected and the station stops, as with any store (positive release).

**Crash safety of the drain** (kill -9 at any moment loses nothing and records nothing twice): the spool is
written first and is never changed; a row's position in the station's chain (``chain_pos``) is its spool rowid
(rows are append-only and never deleted, so rowids run 1..N). A batch is inserted in one transaction with
``ON CONFLICT (station_id, container_id) DO NOTHING``, and every row of the batch is then read back and its hash
compared with the spool's: a row already there from an earlier, interrupted drain is accepted only when it is
the same record; any other difference halts the drain with an alarm. The drain's progress is PostgreSQL's own:
on (re)connecting, the drainer reads the station's last ``chain_pos`` and continues after it, after checking
that that row is the spool's row at that position (same key, same hash). A transaction cut off by a kill is
rolled back by the server, and is simply done again.

**The password** never goes in the URL (refused, in one line) nor on the command line nor in a log: libpq reads
it from ``PGPASSWORD``, ``~/.pgpass`` (or ``PGPASSFILE``), or a service file (``PGSERVICE``/``service=``). Only a
short form of the URL (host, database, station) is ever printed.

**Frames** of flagged units stay on the station, under ``SPOOL/frames`` and ``SPOOL/maps``; the rows in
PostgreSQL carry their relative paths (``frames_dir``, ``frames``) and the ``stations`` table names the host and
spool folder that hold them. The review app reads them from a shared folder named in its configuration
(``--frames-root DIR``: ``DIR/<station_id>/frames`` and ``.../maps``; qa/records_view.py, docs/review.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .backoff import Backoff
from .store import _CHAINED, ChainCheck, RecordStore, StoreError

log = logging.getLogger("vialinspect.pg_store")

SCHEMA_VERSION = 3
QA_SCHEMA_VERSION = 2  # the first version holding the QA tables (users, reviews, audit): qa.audit.PgReviewDB
STATION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
STATION_ENV = "VIALINSPECT_STATION"
STORE_ENV = "VIALINSPECT_STORE"
DRAIN_HINT = "drained.json"  # SPOOL/drained.json: the last drained position, a hint for the backlog shown offline
_MIGRATION_LOCK = 0x7669616C  # pg_advisory_xact_lock key: one migrator at a time when many stations start at once
_SECRET_PARAMS = ("password", "sslpassword")
_CONNECT_TIMEOUT_S = 3
_STATEMENT_TIMEOUT_MS = 15_000

# Each migration takes the database from version N - 1 to N; all pending ones run in one transaction.
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE stations (
    station_id      TEXT PRIMARY KEY CHECK (station_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    line_id         TEXT,                              -- the line it inspects on (optional, for grouping)
    host            TEXT,                              -- the machine whose spool holds its frames
    spool           TEXT,                              -- that spool folder: frames under frames/, maps under maps/
    registered_utc  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_utc   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE decisions (
    station_id       TEXT NOT NULL REFERENCES stations (station_id),
    container_id     TEXT NOT NULL,
    chain_pos        BIGINT NOT NULL CHECK (chain_pos > 0),  -- position in the station's chain (its spool rowid)
    sequence         BIGINT NOT NULL,
    decided_at       DOUBLE PRECISION NOT NULL,
    decided_at_utc   TEXT NOT NULL,
    recorded_at_utc  TEXT NOT NULL,
    recipe           TEXT NOT NULL,
    model_version    TEXT,
    accept           SMALLINT NOT NULL CHECK (accept IN (0, 1)),
    reasons          TEXT NOT NULL,    -- JSON, the very text the spool hashed (jsonb would reformat it)
    scores           TEXT NOT NULL,
    thresholds       TEXT NOT NULL,
    fill_height_mm   DOUBLE PRECISION,
    timings_ms       TEXT NOT NULL,
    provider         TEXT,
    truth            TEXT,
    format           TEXT,
    kept             TEXT,
    frames_dir       TEXT,             -- relative to the station's spool frames/ (see stations.host, .spool)
    frames           TEXT NOT NULL,
    has_maps         SMALLINT NOT NULL DEFAULT 0,
    unit_id          TEXT,
    prev_hash        TEXT NOT NULL,
    row_hash         TEXT NOT NULL,
    drained_utc      TIMESTAMPTZ NOT NULL DEFAULT now(),  -- when it reached PostgreSQL (not hashed)
    PRIMARY KEY (station_id, container_id),
    UNIQUE (station_id, chain_pos)
);
CREATE INDEX decisions_station_sequence ON decisions (station_id, sequence);
CREATE INDEX decisions_decided_at ON decisions (decided_at);
CREATE INDEX decisions_flagged ON decisions (decided_at) WHERE accept = 0;
CREATE INDEX decisions_unit_id ON decisions (station_id, unit_id) WHERE unit_id IS NOT NULL;
CREATE FUNCTION vialinspect_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'decision records are append-only (% refused)', TG_OP USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER decisions_no_update BEFORE UPDATE OR DELETE ON decisions
    FOR EACH ROW EXECUTE FUNCTION vialinspect_append_only();
CREATE TRIGGER decisions_no_truncate BEFORE TRUNCATE ON decisions
    FOR EACH STATEMENT EXECUTE FUNCTION vialinspect_append_only();
""",
    # The QA database (inspection_station.qa.audit): the SQLite review.sqlite's tables, columns, constraints and
    # triggers. One database serves every station, so container_id holds the unit key "STATION_ID/CONTAINER_ID".
    # seq and review_id are taken explicitly under the QA write lock, not from a sequence: a sequence is not
    # transactional, and the gap a rolled-back transaction left would read as a deleted entry. qa_sequence keeps
    # the highest number ever inserted (SQLite's sqlite_sequence), in the same transaction, so that verify still
    # sees entries deleted from the end of the trail.
    2: """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE qa_sequence (name TEXT PRIMARY KEY, seq BIGINT NOT NULL);
CREATE TABLE audit (
    seq           BIGINT PRIMARY KEY CHECK (seq > 0),
    at_utc        TEXT NOT NULL,
    "user"        TEXT NOT NULL,
    action        TEXT NOT NULL,
    container_id  TEXT,
    old_value     TEXT,
    new_value     TEXT,
    reason        TEXT,
    prev_hash     TEXT NOT NULL,
    hash          TEXT NOT NULL
);
CREATE INDEX audit_container ON audit (container_id) WHERE container_id IS NOT NULL;
CREATE INDEX audit_user_action ON audit ("user", action);
CREATE TABLE users (
    username         TEXT PRIMARY KEY,
    full_name        TEXT NOT NULL,
    role             TEXT NOT NULL CHECK (role IN ('reviewer', 'admin')),
    password_hash    TEXT NOT NULL,
    created_at_utc   TEXT NOT NULL,
    created_by       TEXT NOT NULL,
    disabled_at_utc  TEXT,
    disabled_by      TEXT
);
CREATE TABLE reviews (
    review_id        BIGINT PRIMARY KEY CHECK (review_id > 0),
    container_id     TEXT NOT NULL,      -- the unit key STATION_ID/CONTAINER_ID
    verdict          TEXT NOT NULL CHECK (verdict IN ('confirmed_defect', 'false_reject', 'escalate')),
    classes          TEXT NOT NULL,
    comment          TEXT NOT NULL,
    reviewer         TEXT NOT NULL,
    printed_name     TEXT NOT NULL,
    signed_at_utc    TEXT NOT NULL,
    signed_at        DOUBLE PRECISION NOT NULL,
    meaning          TEXT NOT NULL,
    supersedes       BIGINT REFERENCES reviews (review_id),
    model_version    TEXT,
    recipe           TEXT,
    station_reasons  TEXT NOT NULL,
    decided_at       DOUBLE PRECISION,
    audit_seq        BIGINT NOT NULL REFERENCES audit (seq)
);
-- One first review per unit, each review changed at most once; the current review of a unit is the one nothing
-- supersedes: (container_id, review_id) finds a unit's reviews in order, reviews_changed_once the anti-join.
CREATE UNIQUE INDEX reviews_first ON reviews (container_id) WHERE supersedes IS NULL;
CREATE UNIQUE INDEX reviews_changed_once ON reviews (supersedes) WHERE supersedes IS NOT NULL;
CREATE INDEX reviews_container ON reviews (container_id, review_id);

CREATE FUNCTION qa_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% (% refused)', TG_ARGV[0], TG_OP USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION qa_refuse('audit entries are append-only');
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION qa_refuse('audit entries are append-only');
-- A user is disabled, never deleted, and a disabled user stays disabled.
CREATE TRIGGER users_no_delete BEFORE DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION qa_refuse('users are disabled, never deleted');
CREATE TRIGGER users_no_truncate BEFORE TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION qa_refuse('users are disabled, never deleted');
CREATE TRIGGER users_disable_only BEFORE UPDATE ON users FOR EACH ROW
    WHEN (OLD.disabled_at_utc IS NOT NULL OR NEW.disabled_at_utc IS NULL
          OR NEW.username IS DISTINCT FROM OLD.username OR NEW.full_name IS DISTINCT FROM OLD.full_name
          OR NEW.role IS DISTINCT FROM OLD.role OR NEW.password_hash IS DISTINCT FROM OLD.password_hash
          OR NEW.created_at_utc IS DISTINCT FROM OLD.created_at_utc OR NEW.created_by IS DISTINCT FROM OLD.created_by)
    EXECUTE FUNCTION qa_refuse('a user can only be disabled');
CREATE TRIGGER reviews_no_update BEFORE UPDATE OR DELETE ON reviews
    FOR EACH ROW EXECUTE FUNCTION qa_refuse('reviews are append-only; a change is a new review');
CREATE TRIGGER reviews_no_truncate BEFORE TRUNCATE ON reviews
    FOR EACH STATEMENT EXECUTE FUNCTION qa_refuse('reviews are append-only; a change is a new review');

-- SECURITY DEFINER: the review role needs no write grant on qa_sequence (it could not lower or raise it).
CREATE FUNCTION qa_sequence_note() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO qa_sequence (name, seq) VALUES (TG_TABLE_NAME, (to_jsonb(NEW) ->> TG_ARGV[0])::bigint)
        ON CONFLICT (name) DO UPDATE SET seq = GREATEST(qa_sequence.seq, EXCLUDED.seq);
    RETURN NULL;
END $$;
CREATE TRIGGER audit_sequence AFTER INSERT ON audit FOR EACH ROW EXECUTE FUNCTION qa_sequence_note('seq');
CREATE TRIGGER reviews_sequence AFTER INSERT ON reviews FOR EACH ROW EXECUTE FUNCTION qa_sequence_note('review_id');
""",
    # The review queue's order over every station's flagged units (qa/records_view.py): a page of the queue is a
    # range of this index, however many units are recorded. container_id makes it cover the unit key, so the
    # "pending" anti-join walks it without reading the rows it skips (an index-only scan).
    3: """
CREATE INDEX decisions_queue ON decisions (decided_at_utc, sequence, station_id, chain_pos) INCLUDE (container_id)
    WHERE accept = 0;
""",
}
assert max(MIGRATIONS) == SCHEMA_VERSION

_DB_COLUMNS = ("station_id", "chain_pos", *_CHAINED, "row_hash")


def _software_version() -> str:
    """The installed package's version (the one version source, as ``vialinspect.__version__`` reads it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vialinspect")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"

def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise StoreError("a postgresql:// store needs the postgres extra: pip install 'vialinspect[postgres]'") \
            from None
    return psycopg


def is_pg_url(spec: str | Path | None) -> bool:
    return isinstance(spec, str) and spec.split(":", 1)[0].lower() in ("postgresql", "postgres")


@dataclass(frozen=True)
class PgTarget:
    """Where a station's records go: libpq's conninfo (a URL without the station), the station id, and a short,
    printable form (no user name, no parameters but the host)."""

    conninfo: str
    station_id: str | None
    line_id: str | None
    display: str

    def need_station(self) -> str:
        if not self.station_id:
            raise StoreError(f"{self.display}: a station id is needed for a PostgreSQL record store: add "
                             f"?station=LINE1-ST1 to the URL or set ${STATION_ENV}")
        return self.station_id


def parse_url(url: str, station: str | None = None, use_env: bool = True) -> PgTarget:
    """Split ``postgresql://[USER@]HOST[:PORT]/DB[?station=ID&line=L&libpq params]``.

    ``station`` (``$VIALINSPECT_STATION`` when None and ``use_env``) gives the station id when the URL does not;
    both given and different is an error. A password in the URL (``user:secret@`` or ``password=``) is refused in
    one line. ``use_env=False`` for a URL that names no station (the QA database, grants).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise StoreError(f"not a postgresql:// URL: {parts.scheme}://...")
    query = parse_qsl(parts.query, keep_blank_values=True)
    hosts = parts.netloc.rsplit("@", 1)
    if (len(hosts) == 2 and ":" in hosts[0]) or any(k in _SECRET_PARAMS for k, _ in query):
        raise StoreError("a password does not go in the store URL (it would show in the process list and logs): "
                         "put it in ~/.pgpass (or the file $PGPASSFILE names), $PGPASSWORD or a pg_service.conf "
                         "service")
    keep = [(k, v) for k, v in query if k not in ("station", "line")]
    given = {k: v for k, v in query if k in ("station", "line")}
    env_station = (os.environ.get(STATION_ENV) or None) if use_env else None
    url_station = given.get("station") or None
    station_id = url_station or station or env_station
    if url_station and (station or env_station) and (station or env_station) != url_station:
        raise StoreError(f"two station ids: {url_station!r} in the store URL and {station or env_station!r} "
                         f"({'the recipe' if station else '$' + STATION_ENV}); give one")
    if station_id is not None and not STATION_RE.fullmatch(station_id):
        raise StoreError(f"station id {station_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit (e.g. LINE1-ST1)")
    host = hosts[-1]
    sock = dict(keep).get("host")
    shown = f"{parts.scheme}://{host}{parts.path}" + (f"?host={sock}" if sock else "")
    if station_id:
        shown += f"{'&' if sock else '?'}station={station_id}"
    # Built by hand: urlunsplit drops the empty host of postgresql:///db?host=/socket/dir.
    conninfo = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{urlencode(keep)}" if keep else "")
    return PgTarget(conninfo, station_id, unquote(given["line"]) if given.get("line") else None, shown)


def connect(target: PgTarget, timeout_s: float = _CONNECT_TIMEOUT_S, app: str = "vialinspect"):
    """A connection (autocommit off) with short connect and statement timeouts and TCP keepalives, so a dead
    network shows as an error within seconds instead of a hung drain."""
    psycopg = _psycopg()
    conn = psycopg.connect(target.conninfo, connect_timeout=max(1, int(round(timeout_s))), application_name=app,
                           keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
    conn.execute(f"SET statement_timeout = {_STATEMENT_TIMEOUT_MS}")
    conn.commit()
    return conn


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def schema_version(conn) -> int | None:
    """The database's schema version; None when it has no vialinspect schema yet."""
    if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
        return None
    v = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    return None if v is None else int(v)


def migrate(conn, where: str = "the database") -> tuple[int, int]:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction (idempotent; concurrent callers queue on an
    advisory lock). Returns ``(from, to)``. A newer schema than this code knows raises ``StoreError``."""
    have = schema_version(conn)
    conn.commit()
    if have == SCHEMA_VERSION:  # the usual case: no DDL, so a station role without CREATE can start
        return have, have
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                     "applied_utc TIMESTAMPTZ NOT NULL DEFAULT now(), by_software TEXT)")
        have = schema_version(conn) or 0
        if have > SCHEMA_VERSION:
            raise StoreError(f"{where}: schema version {have} is newer than this vialinspect knows "
                             f"({SCHEMA_VERSION}); upgrade vialinspect")
        for n in range(have + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[n])
            conn.execute("INSERT INTO schema_version (version, by_software) VALUES (%s, %s)",
                         (n, f"vialinspect {_software_version()}"))
    conn.commit()
    if have < SCHEMA_VERSION:
        log.warning("%s: schema migrated from %d to %d", where, have, SCHEMA_VERSION)
    return have, SCHEMA_VERSION


def upgrade(url: str) -> tuple[int, int]:
    """``vialinspect db upgrade --db URL``: run the migrations now. Returns ``(from, to)``."""
    target = parse_url(url, station=None)
    with closing(_connect_or_raise(target)) as conn:
        return migrate(conn, target.display)


# What each role may do with the vialinspect tables (``vialinspect db grants``); everything else is revoked. Neither
# may UPDATE, DELETE or TRUNCATE decisions or audit, nor run DDL (neither owns a table). The station role gets
# nothing of the QA tables. users' UPDATE is for disabling: the trigger refuses any other change. There are no
# sequences to grant: seq and review_id are taken explicitly (migration 2), and qa_sequence is written by a
# SECURITY DEFINER trigger.
ROLE_GRANTS: dict[str, dict[str, str]] = {
    "station": {"schema_version": "SELECT", "stations": "SELECT, INSERT, UPDATE", "decisions": "SELECT, INSERT"},
    "review": {"schema_version": "SELECT", "stations": "SELECT", "decisions": "SELECT", "meta": "SELECT, INSERT",
               "qa_sequence": "SELECT", "audit": "SELECT, INSERT", "reviews": "SELECT, INSERT",
               "users": "SELECT, INSERT, UPDATE"},
}


def grant_roles(url: str, roles: dict[str, str]) -> dict[str, dict[str, str]]:
    """``vialinspect db grants``: give each existing role (``{"station": NAME, "review": NAME}``, either may be
    left out) exactly its :data:`ROLE_GRANTS` on the vialinspect tables, revoking anything else it had on them.

    The roles must exist (the DBA creates them, with their passwords) and must be neither superusers nor the tables'
    owner (privileges do not restrict either); the schema must be current. Returns ``{role: {table: privileges}}``.
    """
    psycopg = _psycopg()
    from psycopg import sql

    target = parse_url(url, use_env=False)
    if len(set(roles.values())) != len(roles):
        raise StoreError("the station role and the review role must be two roles (one would hold both grants)")
    tables = sorted({t for grants in ROLE_GRANTS.values() for t in grants})
    with closing(_connect_or_raise(target)) as conn:
        try:
            version = schema_version(conn)
            if version != SCHEMA_VERSION:
                raise StoreError(f"{target.display}: schema version {version or 0}, this vialinspect's is "
                                 f"{SCHEMA_VERSION}: run vialinspect db upgrade (with the same vialinspect) first")
            found = {r[0]: r[1] for r in conn.execute("SELECT rolname, rolsuper FROM pg_roles WHERE rolname = ANY(%s)",
                                                      (list(roles.values()),))}
            missing = [n for n in roles.values() if n not in found]
            if missing:
                raise StoreError(f"{target.display}: no role {', '.join(map(repr, missing))}: the DBA creates it first "
                                 "(CREATE ROLE NAME LOGIN PASSWORD ...), then grants are given here")
            owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'audit' AND schemaname = "
                                 "current_schema()").fetchone()[0]
            for name in roles.values():
                if found[name] or name == owner:
                    what = "a superuser" if found[name] else "the tables' owner"
                    raise StoreError(f"{target.display}: role {name!r} is {what}: grants would not restrict it; give "
                                     "the stations and the review app roles of their own")
            schema = conn.execute("SELECT current_schema()").fetchone()[0]
            with conn.transaction():
                for kind, name in roles.items():
                    role = sql.Identifier(name)
                    conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(
                        sql.SQL(", ").join(map(sql.Identifier, tables)), role))
                    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), role))
                    for table, privileges in ROLE_GRANTS[kind].items():
                        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privileges), sql.Identifier(table),
                                                                           role))
            conn.commit()
        except psycopg.Error as e:
            raise StoreError(f"{target.display}: {type(e).__name__}: {_first_line(e)}") from None
    return {name: ROLE_GRANTS[kind] for kind, name in roles.items()}


def _connect_or_raise(target: PgTarget, timeout_s: float = _CONNECT_TIMEOUT_S):
    psycopg = _psycopg()
    try:
        return connect(target, timeout_s)
    except psycopg.Error as e:
        raise StoreError(f"{target.display}: cannot connect ({_first_line(e)})") from None


def register_station(conn, target: PgTarget, spool: Path | None) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO stations (station_id, line_id, host, spool) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (station_id) DO UPDATE SET line_id = COALESCE(EXCLUDED.line_id, stations.line_id), "
            "host = EXCLUDED.host, spool = COALESCE(EXCLUDED.spool, stations.spool), last_seen_utc = now()",
            (target.need_station(), target.line_id, socket.gethostname(),
             str(spool.resolve()) if spool is not None else None))
    conn.commit()


def station_head(conn, station_id: str) -> tuple[int, str, str] | None:
    """The station's last row in PostgreSQL: ``(chain_pos, container_id, row_hash)``, or None."""
    row = conn.execute("SELECT chain_pos, container_id, row_hash FROM decisions WHERE station_id = %s "
                       "ORDER BY chain_pos DESC LIMIT 1", (station_id,)).fetchone()
    conn.commit()
    return None if row is None else (int(row[0]), row[1], row[2])


def continuation_problem(spool: RecordStore, head: tuple[int, str, str] | None, target: PgTarget) -> str | None:
    """Why the spool does not continue the station's chain in PostgreSQL (None when it does): PostgreSQL's last
    row for the station must be the spool's row at the same position, same key and hash."""
    if head is None:
        return None
    pos, cid, h = head
    mine = spool.row_at(pos)
    if mine is not None and mine["container_id"] == cid and mine["row_hash"] == h:
        return None
    n = spool.last_rowid()
    return (f"{target.display}: the spool {spool.path} does not continue station {target.station_id}'s records in "
            f"PostgreSQL (its record {pos}, {cid!r}, is {'not in the spool' if mine is None else 'another one there'}"
            f"; the spool holds {n}): run the station with its own spool folder (--spool), or give it a new station "
            "id")


def default_spool(station_id: str) -> Path:
    """``$XDG_DATA_HOME/vialinspect/spool/ID`` (``~/.local/share/...``): the same folder whatever directory the
    station is started from, so a restart finds its undrained records."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "vialinspect" / "spool" / station_id


def preflight(spool: RecordStore, target: PgTarget) -> str | None:
    """At the station's start: migrate, register the station and check that the spool continues its chain.

    An unreachable database is not an error (the station starts and spools; returns the reason to warn with); a
    newer schema or a spool that does not continue the station's records is (``StoreError``: refuse to start).
    """
    psycopg = _psycopg()
    try:
        conn = connect(target, _CONNECT_TIMEOUT_S, f"vialinspect station {target.station_id}")
    except psycopg.Error as e:
        return _first_line(e)
    try:
        migrate(conn, target.display)
        register_station(conn, target, spool.path)
        problem = continuation_problem(spool, station_head(conn, target.need_station()), target)
        if problem:
            raise StoreError(problem)
        return None
    except (psycopg.OperationalError, psycopg.InterfaceError) as e:  # went away meanwhile
        return _first_line(e)
    except psycopg.Error as e:  # a permission, a schema that is not ours: retrying would not help
        raise StoreError(f"{target.display}: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        conn.close()


class DrainHalted(Exception):
    """PostgreSQL holds something other than the spool for this station: draining stops (the spool keeps all)."""


class Drainer:
    """Copies a spool's rows to PostgreSQL in recording order, in a thread of its own (see the module docstring).

    ``status()`` is what the station shows: ``db_reachable``, ``backlog_units`` (spooled, not yet in PostgreSQL),
    ``seconds_since_drain`` (since the drainer last had nothing left to copy: PostgreSQL is at most this far
    behind), ``drained_units`` (copied by this drainer), ``halted`` (the reason, when a row in PostgreSQL differs
    from the spool's) and ``error`` (the last connection error).
    """

    def __init__(self, spool: RecordStore, target: PgTarget, *, batch: int = 500, poll_s: float = 0.2,
                 retry_s: tuple[float, float] = (0.5, 5.0), on_warning: Callable[[str], None] | None = None,
                 on_status: Callable[[dict[str, Any]], None] | None = None, _hold_s: float = 0.0) -> None:
        self.spool, self.target = spool, target
        self.station_id = target.need_station()
        self.batch, self.poll_s, self.retry_s = batch, poll_s, retry_s
        self.on_warning, self.on_status = on_warning, on_status
        self._hold_s = _hold_s  # tests: hold each batch's transaction open this long (a kill lands inside it)
        self._conn = None
        self._pos: int | None = None  # spool rowid drained up to (known after contact with PostgreSQL)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        hint = self._read_hint()
        now = time.monotonic()
        self._status: dict[str, Any] = {
            "station": self.station_id, "target": target.display, "db_reachable": None, "backlog_units": None,
            "seconds_since_drain": 0.0, "drained_units": 0, "halted": None, "error": None}
        self._hint_pos = hint
        self._caught_up_at = now
        self._down_since: float | None = None
        self._warned_down = False
        self._update_backlog()

    # ---- thread ---------------------------------------------------------------------------------------------

    def start(self) -> Drainer:
        self._thread = threading.Thread(target=self._run, name="store-drain", daemon=True)
        self._thread.start()
        return self

    def close(self, drain_timeout_s: float = 10.0) -> dict[str, Any]:
        """Stop, after one last try to copy what is left (at most ``drain_timeout_s``). Returns ``status()``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.drain(until=time.monotonic() + drain_timeout_s)
        self._disconnect()
        return self.status()

    def _run(self) -> None:
        backoff = Backoff(*self.retry_s)
        while not self._stop.is_set():
            try:
                ok = self.drain(until=None)
            except Exception as e:  # noqa: BLE001 - the drainer must never take the station down
                log.exception("record store drain failed")
                self._set(error=f"{type(e).__name__}: {e}")
                ok = False
            if self._status["halted"]:
                self._wait(1.0)
                self._update_backlog()
                continue
            if ok:
                backoff.reset()
                self._wait(self.poll_s)
            else:
                delay = backoff.delay
                backoff.failed(time.monotonic())
                self._wait(delay)

    def _wait(self, s: float) -> None:
        """Wait ``s`` seconds (or until kicked), keeping the backlog figure fresh meanwhile (a backoff is long)."""
        end = time.monotonic() + s
        while not self._wake.wait(min(self.poll_s, max(0.0, end - time.monotonic()))):
            if time.monotonic() >= end:
                break
            self._update_backlog()
        self._wake.clear()

    # ---- one pass -------------------------------------------------------------------------------------------

    def drain(self, until: float | None = None) -> bool:
        """Copy spooled rows until none is left (or ``until``, monotonic). False when PostgreSQL is unreachable
        (the spool keeps everything; try again later); True when caught up or out of time."""
        psycopg = _psycopg()
        if self._status["halted"]:
            return False
        try:
            if self._conn is None:
                self._open()
            while True:
                rows = self.spool.rows_after(self._pos or 0, self.batch)
                if not rows:
                    self._caught_up()
                    return True
                self._copy(rows)
                self._pos = rows[-1][0]
                self._write_hint(rows[-1])
                with self._lock:
                    self._status["drained_units"] += len(rows)
                self._update_backlog()
                if until is not None and time.monotonic() >= until:
                    return True
                if self._stop.is_set() and until is None:
                    return True
        except DrainHalted as e:
            self._halt(str(e))
            return False
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as e:  # the network or the server
            self._down(_first_line(e))
            return False
        except psycopg.Error as e:  # anything else will not pass by retrying (a permission, a value refused)
            self._halt(f"{self.target.display}: station {self.station_id}: PostgreSQL refused the records "
                       f"({type(e).__name__}: {_first_line(e)}); draining stopped, the spool keeps every record")
            return False

    def _open(self) -> None:
        conn = connect(self.target, _CONNECT_TIMEOUT_S, f"vialinspect station {self.station_id}")
        try:
            migrate(conn, self.target.display)
            register_station(conn, self.target, self.spool.path)
            head = station_head(conn, self.station_id)
        except StoreError as e:  # a newer schema: nothing is copied into a database this code does not know
            conn.close()
            raise DrainHalted(str(e)) from None
        except BaseException:
            conn.close()
            raise
        problem = continuation_problem(self.spool, head, self.target)
        if problem:
            conn.close()
            raise DrainHalted(problem)
        self._conn, self._pos = conn, 0 if head is None else head[0]
        was_down = self._down_since is not None and self._warned_down
        self._down_since = None
        self._set(db_reachable=1, error=None)
        self._update_backlog()
        if was_down:
            self._warn(f"record store: PostgreSQL {self.target.display} reachable again; draining "
                       f"{self._status['backlog_units']} spooled unit(s)")
            self._warned_down = False

    def _copy(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        conn = self._conn
        values = [(self.station_id, rowid, *(r[c] for c in _CHAINED), r["row_hash"]) for rowid, r in rows]
        cols = ",".join(_DB_COLUMNS)
        psycopg = _psycopg()
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    cur.executemany(f"INSERT INTO decisions ({cols}) VALUES ({','.join(['%s'] * len(_DB_COLUMNS))}) "
                                    "ON CONFLICT (station_id, container_id) DO NOTHING", values)
                    if self._hold_s:
                        time.sleep(self._hold_s)
                    got = {r[0]: (int(r[1]), r[2]) for r in cur.execute(
                        "SELECT container_id, chain_pos, row_hash FROM decisions WHERE station_id = %s AND "
                        "chain_pos BETWEEN %s AND %s", (self.station_id, rows[0][0], rows[-1][0])).fetchall()}
                    for rowid, r in rows:
                        if got.get(r["container_id"]) != (rowid, r["row_hash"]):
                            raise DrainHalted(
                                f"{self.target.display}: station {self.station_id}'s record {r['container_id']!r} "
                                f"(position {rowid}) in PostgreSQL differs from the spool's; draining stopped, the "
                                "spool keeps every record")
        except psycopg.errors.UniqueViolation as e:  # another record at this chain position
            raise DrainHalted(f"{self.target.display}: station {self.station_id}: PostgreSQL holds other records "
                              f"at positions {rows[0][0]}-{rows[-1][0]} ({_first_line(e)}); draining stopped, the "
                              "spool keeps every record") from None
        conn.commit()

    # ---- state ----------------------------------------------------------------------------------------------

    def _caught_up(self) -> None:
        self._caught_up_at = time.monotonic()
        self._update_backlog()

    def _down(self, reason: str) -> None:
        self._disconnect()
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._set(db_reachable=0, error=reason)
        self._update_backlog()
        if not self._warned_down:
            self._warned_down = True
            self._warn(f"record store: PostgreSQL {self.target.display} unreachable ({reason}); the station keeps "
                       "deciding and recording into its spool, and drains it when the database is back")

    def _halt(self, reason: str) -> None:
        self._disconnect()
        log.error("%s", reason)
        self._set(halted=reason)
        self._warn(f"record store: {reason}")

    def _warn(self, text: str) -> None:
        if self.on_warning is None:
            log.warning("%s", text)
        else:
            try:
                self.on_warning(text)
            except Exception:  # noqa: BLE001
                log.exception("warning callback failed")

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None

    def _set(self, **kw: Any) -> None:
        with self._lock:
            self._status.update(kw)
        self._publish()

    def _update_backlog(self) -> None:
        try:
            last = self.spool.last_rowid()
        except Exception:  # noqa: BLE001 - a closing spool: keep the last figure
            return
        pos = self._pos if self._pos is not None else self._hint_pos
        with self._lock:
            self._status["backlog_units"] = None if pos is None else max(0, last - pos)
            if self._status["backlog_units"] == 0:
                self._caught_up_at = time.monotonic()
        self._publish()

    def status(self) -> dict[str, Any]:
        with self._lock:
            s = dict(self._status)
        s["seconds_since_drain"] = 0.0 if s["backlog_units"] == 0 else time.monotonic() - self._caught_up_at
        return s

    def _publish(self) -> None:
        if self.on_status:
            self.on_status(self.status())

    # ---- the hint file --------------------------------------------------------------------------------------

    def _read_hint(self) -> int | None:
        try:
            data = json.loads((self.spool.path / DRAIN_HINT).read_text())
            return int(data["chain_pos"]) if data.get("station") == self.station_id else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_hint(self, last: tuple[int, dict[str, Any]]) -> None:
        """Not the drain's progress (PostgreSQL's is): only what the status shows before the first contact."""
        tmp = self.spool.path / f".{DRAIN_HINT}.tmp"
        try:
            tmp.write_text(json.dumps({"station": self.station_id, "chain_pos": last[0],
                                       "container_id": last[1]["container_id"], "row_hash": last[1]["row_hash"]}))
            os.replace(tmp, self.spool.path / DRAIN_HINT)
        except OSError:
            pass


def verify(target: PgTarget) -> dict[str, Any]:
    """Recompute one station's chain in PostgreSQL, in chain order: ``RecordStore.verify``'s result."""
    psycopg = _psycopg()
    station = target.need_station()
    conn = _connect_or_raise(target)
    chain = ChainCheck(f"{target.display}")
    problems: list[str] = []
    try:
        v = schema_version(conn)
        if v is None:
            raise StoreError(f"{target.display}: no vialinspect schema in this database (vialinspect db upgrade)")
        if v > SCHEMA_VERSION:
            raise StoreError(f"{target.display}: schema version {v} is newer than this vialinspect knows "
                             f"({SCHEMA_VERSION}); upgrade vialinspect")
        expect = 1
        from psycopg.rows import dict_row

        with conn.cursor(name="verify", row_factory=dict_row) as cur:
            cur.itersize = 2000
            cur.execute(f"SELECT chain_pos, {','.join(_CHAINED)}, row_hash FROM decisions WHERE station_id = %s "
                        "ORDER BY chain_pos", (station,))
            for r in cur:
                if r["chain_pos"] != expect and len(problems) < 20:
                    problems.append(f"{target.display}: records missing at positions {expect}-{r['chain_pos'] - 1}")
                expect = r["chain_pos"] + 1
                if not chain.add(r, f"position {r['chain_pos']}"):
                    break
    except psycopg.Error as e:
        problems.append(f"{target.display}: cannot be read completely ({_first_line(e)})")
    finally:
        conn.close()
    return chain.result(problems)

