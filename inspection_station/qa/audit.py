"""The review database and its append-only, hash-chained audit trail (21 CFR 11.10(e), ALCOA+).

Layout: ``STORE/review.sqlite`` (SQLite, WAL, synchronous=FULL) next to the station's ``records.sqlite``.
The station's record store has a single writer (the station), so everything the QA side writes -- users,
reviews, the audit trail -- lives in this separate database; the review app opens the record store
read-only.

Audit entries are never updated or deleted: triggers refuse UPDATE and DELETE, and there is no code path
that does either. Each entry stores ``hash = sha256(prev_hash + "\\n" + canonical content)``, so editing,
deleting or reordering rows (after dropping the triggers, as an attacker with file access would) breaks the
chain, and :func:`verify` names the first bad entry. The users and reviews tables are cross-checked against
their audit entries too. What the chain cannot prove on its own is that nobody rewrote the *whole* chain
from some point on: :func:`verify` prints the head hash, which can be recorded elsewhere (a batch record,
a log) to anchor it.

What :func:`verify` covers, column by column:

- reviews: every column. A review's audit entry records all of them (:func:`review_audit_value`: verdict,
  classes, comment, signer, printed name, signed time in both forms, meaning, supersedes, and the station's
  model version, recipe, reasons and decision time); the container id and ``audit_seq`` are checked against
  the entry itself.
- users: every column, the password hash included. Each user change (added, disabled, unlocked) records the
  readable fields and ``row_sha256``, a digest of the whole row (:func:`user_row_digest`), so the password
  hash itself never appears in the trail; verify recomputes each user's digest and compares it with the
  *latest* entry about that user. Replacing someone's password hash in the file is therefore reported.
- the file itself: ``PRAGMA integrity_check`` (the full check: ``quick_check`` does not compare indexes with
  their tables) runs first; damage -- a broken page, an index out of step with its table, invalid JSON or a
  wrong type in a column, a file that cannot be opened -- gives ``ok=False, damaged=True`` (or, for a bad
  value in a row, the entry it belongs to) with one line, never an exception. (Bytes SQLite never reads, such
  as free pages, can change unnoticed; they hold no data.)

Databases written before this coverage existed: their review entries hold only the review's own fields and
their user entries no row digest. Such an entry still checks what it recorded (verdict, classes, role, full
name, ...), but the columns it never recorded cannot be checked, so verify lists those rows in
``VerifyResult.not_covered`` ("not covered"): neither intact nor tampered, and ``ok`` stays true when nothing
else is wrong. A user row is covered again as soon as a new entry about it is written (disable, unlock);
a review row stays as it was signed. The old and the new format cannot be confused: entries are in the hash
chain, so nobody can rewrite a new entry into the old format without breaking the chain.

**On PostgreSQL** (:func:`open_review_db` with a ``postgresql://`` URL; :class:`PgReviewDB`) the same tables, with the
same columns, constraints and append-only triggers, are migration 2 of the plant database
(:data:`vialinspect.inspection_station.pg_store.MIGRATIONS`), and the same SQL runs on both engines through
:mod:`.dbconn`. Write transactions take a transaction-level advisory lock, the twin of ``BEGIN IMMEDIATE``, so the
chain stays linear with any number of writing threads and processes. The hashes are computed over the same
values (timestamps are the same ISO text), so a chain is the same on both engines. :func:`verify` does everything
above except ``PRAGMA integrity_check``, which has no PostgreSQL twin: the server's own page checksums
(``initdb --data-checksums``) and ``amcheck`` are the operator's. One database serves every station, so on
PostgreSQL ``container_id`` holds a unit key ``STATION_ID/CONTAINER_ID`` (station ids contain no ``/``).

The CSV export (:func:`export_csv`) guards against formula injection (OWASP): a text cell that starts with
``= + - @``, TAB or CR -- or with ``'`` itself, so that the rule can be undone -- gets one ``'`` in front.
To compare an exported cell with the chain, drop one leading ``'`` from every cell that has one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vialinspect.errors import VialinspectError
from vialinspect.export.hashchain import GENESIS, link_hash

from .dbconn import Connection, PgConnection, RowLike, SqliteConnection

REVIEW_DB_NAME = "review.sqlite"
# The schema's version is the database's ``PRAGMA user_version``. Databases written before that kept it in
# ``meta`` (key ``schema_version``): it is taken over into user_version when the database is opened, and the row
# is left, so that an earlier vialinspect still opens a database whose schema it knows. A migration to version 2
# must delete that row, so that an earlier vialinspect refuses what it does not know.
SCHEMA_VERSION = 1
GENESIS_HASH = GENESIS  # the first entry's prev_hash

# Actions written to the trail. Kept in one place so that the app, the CLI and verify() agree.
LOGIN, LOGIN_FAILED, LOGOUT = "login", "login_failed", "logout"
REVIEW, REVIEW_CHANGED, SIGNATURE_FAILED = "review", "review_changed", "signature_failed"
USER_ADDED, USER_DISABLED, USER_UNLOCKED = "user_added", "user_disabled", "user_unlocked"
USER_CHANGES: tuple[str, ...] = (USER_ADDED, USER_DISABLED, USER_UNLOCKED)  # entries that carry a user's row digest
EXPORT, AUDIT_EXPORT = "export", "audit_export"
MODEL_RETRAINED, MODEL_PROMOTED, MODEL_ROLLED_BACK = "model_retrained", "model_promoted", "model_rolled_back"
# Login attempts the review app's rate limiter refused without checking a password, summarised per window
# (vialinspect.inspection_station.qa.login_limit): evidence kept, one row per window rather than one per attempt.
LOGIN_REFUSED = "login_refused"
ACTIONS: tuple[str, ...] = (LOGIN, LOGIN_FAILED, LOGOUT, REVIEW, REVIEW_CHANGED, SIGNATURE_FAILED, USER_ADDED,
                            USER_DISABLED, USER_UNLOCKED, EXPORT, AUDIT_EXPORT, MODEL_RETRAINED, MODEL_PROMOTED,
                            MODEL_ROLLED_BACK, LOGIN_REFUSED)

_SCHEMA = f"""
PRAGMA user_version = {SCHEMA_VERSION};
CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);

CREATE TABLE audit (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    at_utc        TEXT NOT NULL,
    user          TEXT NOT NULL,
    action        TEXT NOT NULL,
    container_id  TEXT,
    old_value     TEXT,
    new_value     TEXT,
    reason        TEXT,
    prev_hash     TEXT NOT NULL,
    hash          TEXT NOT NULL
);
CREATE INDEX audit_container ON audit (container_id) WHERE container_id IS NOT NULL;
CREATE INDEX audit_user_action ON audit (user, action);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END;

CREATE TABLE users (
    username         TEXT PRIMARY KEY NOT NULL,
    full_name        TEXT NOT NULL,
    role             TEXT NOT NULL CHECK (role IN ('reviewer', 'admin')),
    password_hash    TEXT NOT NULL,
    created_at_utc   TEXT NOT NULL,
    created_by       TEXT NOT NULL,
    disabled_at_utc  TEXT,
    disabled_by      TEXT
);
-- A user is disabled, never deleted, and a disabled user stays disabled: a user name in the audit trail
-- must always refer to the one person who held it.
CREATE TRIGGER users_no_delete BEFORE DELETE ON users
BEGIN SELECT RAISE(ABORT, 'users are disabled, never deleted'); END;
CREATE TRIGGER users_disable_only BEFORE UPDATE ON users
WHEN OLD.disabled_at_utc IS NOT NULL OR NEW.disabled_at_utc IS NULL
  OR NEW.username IS NOT OLD.username OR NEW.full_name IS NOT OLD.full_name OR NEW.role IS NOT OLD.role
  OR NEW.password_hash IS NOT OLD.password_hash OR NEW.created_at_utc IS NOT OLD.created_at_utc
  OR NEW.created_by IS NOT OLD.created_by
BEGIN SELECT RAISE(ABORT, 'a user can only be disabled'); END;

CREATE TABLE reviews (
    review_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    container_id     TEXT NOT NULL,
    verdict          TEXT NOT NULL CHECK (verdict IN ('confirmed_defect', 'false_reject', 'escalate')),
    classes          TEXT NOT NULL,      -- JSON list: the reviewed defect classes (confirmed defects only)
    comment          TEXT NOT NULL,
    reviewer         TEXT NOT NULL,      -- user name
    printed_name     TEXT NOT NULL,      -- 21 CFR 11.50(a)(1)
    signed_at_utc    TEXT NOT NULL,      -- 11.50(a)(2)
    signed_at        REAL NOT NULL,
    meaning          TEXT NOT NULL,      -- 11.50(a)(3)
    supersedes       INTEGER REFERENCES reviews (review_id),
    model_version    TEXT,               -- copied from the station's decision, for trends
    recipe           TEXT,
    station_reasons  TEXT NOT NULL,      -- JSON list, copied from the decision
    decided_at       REAL,
    audit_seq        INTEGER NOT NULL REFERENCES audit (seq)
);
-- One first review per container, and each review is changed at most once: the reviews of a container form
-- one chain, whose last link is the current review.
CREATE UNIQUE INDEX reviews_first ON reviews (container_id) WHERE supersedes IS NULL;
CREATE UNIQUE INDEX reviews_changed_once ON reviews (supersedes) WHERE supersedes IS NOT NULL;
CREATE INDEX reviews_container ON reviews (container_id);
CREATE TRIGGER reviews_no_update BEFORE UPDATE ON reviews
BEGIN SELECT RAISE(ABORT, 'reviews are append-only; a change is a new review'); END;
CREATE TRIGGER reviews_no_delete BEFORE DELETE ON reviews
BEGIN SELECT RAISE(ABORT, 'reviews are append-only; a change is a new review'); END;
"""

AUDIT_COLUMNS = ("seq", "at_utc", "user", "action", "container_id", "old_value", "new_value", "reason",
                 "prev_hash", "hash")
_AUDIT_COLUMNS_SQL = ",".join(f'"{c}"' for c in AUDIT_COLUMNS)  # quoted: "user" is reserved in PostgreSQL
USER_COLUMNS = ("username", "full_name", "role", "password_hash", "created_at_utc", "created_by", "disabled_at_utc",
                "disabled_by")


class ReviewDBError(VialinspectError):
    """The review database cannot be opened or used."""


def utc_now() -> tuple[float, str]:
    """Now as unix seconds and as ISO 8601 UTC with milliseconds (the same instant)."""
    t = time.time()
    return t, datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")


def to_text(value: Any) -> str | None:
    """Old/new values are stored as text: strings as they are, anything else as canonical JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class ReviewDB:
    """``STORE/review.sqlite``: users, reviews and the audit trail (:class:`PgReviewDB`: the same on PostgreSQL).

    Every operation opens its own short-lived connection, so the object is safe to share between the
    app's worker threads and several processes (the app and a CLI command) may write at once: each write
    is one ``BEGIN IMMEDIATE`` transaction, which is what keeps the hash chain linear.
    """

    engine = "sqlite"

    def __init__(self, store_dir: str | Path, create: bool = True) -> None:
        self.store_dir: Path | None = Path(store_dir)
        self.path: Path | None = self.store_dir / REVIEW_DB_NAME
        self.where = str(self.path)  # what messages name: the file, or PostgreSQL's short URL
        if not self.store_dir.is_dir():
            raise ReviewDBError(f"{self.store_dir}: no such store directory")
        if not self.path.exists() and not create:
            raise ReviewDBError(f"{self.store_dir}: no review database here ({REVIEW_DB_NAME} missing)")
        self._init_lock = threading.Lock()
        with self.connect() as conn:
            self._init_schema(conn)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, factory=SqliteConnection)
        except sqlite3.Error as e:
            raise ReviewDBError(f"{self.path}: cannot open ({e})") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ReviewDBError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
            # FULL: a signature or an audit entry is on disk when the call returns.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
        except sqlite3.DatabaseError as e:
            raise ReviewDBError(f"{self.path}: {e}") from None
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction that excludes other writers from its start (``begin_write``: IMMEDIATE, or
        PostgreSQL's advisory lock), so that reading the chain head and appending cannot interleave."""
        with self.connect() as conn:
            conn.begin_write()
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read transaction that sees one state throughout, even while others append (for :func:`verify`)."""
        with self.connect() as conn:
            conn.begin_snapshot()
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def close(self) -> None:
        """Nothing to release on SQLite (every operation closes its connection); PostgreSQL's idle ones go."""

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        with self._init_lock:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables - {"sqlite_sequence"}:
                try:
                    conn.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA + "\nCOMMIT;")
                except sqlite3.OperationalError as e:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if "already exists" not in str(e):  # else another process created it just now
                        raise ReviewDBError(f"{self.path}: cannot create the schema ({e})") from None
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"meta", "audit", "users", "reviews"} <= tables:
                raise ReviewDBError(f"{self.path}: not a vialinspect review database (tables: {sorted(tables)})")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:  # written before user_version: the version is in meta
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else None
                if version is not None and 0 < version <= SCHEMA_VERSION:
                    try:
                        conn.execute(f"PRAGMA user_version = {version}")
                    except sqlite3.OperationalError:  # a file this process may not write: meta says it all the same
                        pass
            if not version or version > SCHEMA_VERSION:
                raise ReviewDBError(f"{self.path}: review schema {version} is not readable by this vialinspect "
                                    f"(reads up to {SCHEMA_VERSION}); upgrade vialinspect")


class PgReviewDB(ReviewDB):
    """The QA tables in the plant's PostgreSQL database: migration 2 of ``pg_store``, in the same database and
    schema-version table as the stations' decisions.

    ``url`` follows the station's rules (``postgresql://[USER@]HOST[:PORT]/DB[?libpq params]``; the password from
    ``~/.pgpass``, ``$PGPASSWORD`` or a service file, refused in the URL) but names no station: one QA database
    serves every station. With ``create`` the pending migrations run (as a station's start does), else a
    database without the QA tables is refused. Connections are kept in a small pool (a connect costs a
    handshake, and a login takes several operations); each operation takes one for its own use, so the object
    is safe to share between threads. Every PostgreSQL error becomes a one-line ``ReviewDBError``.
    """

    engine = "postgresql"
    POOL = 4  # idle connections kept

    def __init__(self, url: str, create: bool = True) -> None:
        from vialinspect.inspection_station import pg_store
        from vialinspect.inspection_station.store import StoreError

        try:
            self.target = pg_store.parse_url(url, use_env=False)
            self._psycopg = pg_store._psycopg()
        except StoreError as e:
            raise ReviewDBError(str(e)) from None
        self.store_dir = self.path = None  # no files: the database is the server's
        self.where = self.target.display
        if self.target.station_id or self.target.line_id:
            raise ReviewDBError(f"{self.where}: the QA database serves every station: no station= or line= in "
                                "its URL")
        self._idle: list[PgConnection] = []
        self._pool_lock = threading.Lock()
        raw = self._connect_raw()
        try:
            if create:
                pg_store.migrate(raw, self.where)
            version = pg_store.schema_version(raw)
            raw.commit()
        except StoreError as e:
            raw.close()
            raise ReviewDBError(str(e)) from None
        except self._psycopg.Error as e:
            raw.close()
            raise ReviewDBError(f"{self.where}: {_one_line(e)}") from None
        if version is None or version < pg_store.QA_SCHEMA_VERSION:
            raw.close()
            raise ReviewDBError(f"{self.where}: no QA tables in this database yet (schema version {version or 0}); "
                                f"run: vialinspect db upgrade --db {self.where}")
        if version > pg_store.SCHEMA_VERSION:
            raw.close()
            raise ReviewDBError(f"{self.where}: schema version {version} is newer than this vialinspect knows "
                                f"({pg_store.SCHEMA_VERSION}); upgrade vialinspect")
        self._give_back(PgConnection(raw))

    def _connect_raw(self):
        from vialinspect.inspection_station import pg_store

        try:
            return pg_store.connect(self.target, app="vialinspect qa")
        except self._psycopg.Error as e:
            raise ReviewDBError(f"{self.where}: cannot connect ({_one_line(e)})") from None

    def _take(self) -> PgConnection:
        with self._pool_lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.raw.closed:  # psycopg closes a connection it found broken
                    return conn
        return PgConnection(self._connect_raw())

    def _give_back(self, conn: PgConnection) -> None:
        if not conn.raw.closed and not conn.in_transaction:
            with self._pool_lock:
                if len(self._idle) < self.POOL:
                    self._idle.append(conn)
                    return
        conn.close()

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        conn = self._take()
        try:
            yield conn
        except self._psycopg.Error as e:
            raise ReviewDBError(f"{self.where}: {_one_line(e)}") from None
        finally:
            self._give_back(conn)

    def close(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def open_review_db(spec: str | Path, create: bool = True) -> ReviewDB:
    """The QA database ``spec`` names: a store directory (``STORE/review.sqlite``, :class:`ReviewDB`) or a
    ``postgresql://`` / ``postgres://`` URL (:class:`PgReviewDB`). ``create``: make the SQLite file, or run
    PostgreSQL's pending migrations, when missing."""
    if isinstance(spec, str) and spec.split(":", 1)[0].lower() in ("postgresql", "postgres"):
        return PgReviewDB(spec, create)
    return ReviewDB(spec, create)


# ---------------------------------------------------------------- writing entries

def entry_hash(prev_hash: str, seq: int, at_utc: str, user: str, action: str, container_id: str | None,
               old_value: str | None, new_value: str | None, reason: str | None) -> str:
    """prev_hash, a newline, the entry's columns as a JSON list (non-ASCII kept as is), hashed."""
    return link_hash(prev_hash, [seq, at_utc, user, action, container_id, old_value, new_value, reason],
                     sort_keys=False, ensure_ascii=False)


def append(conn: Connection, user: str, action: str, container_id: str | None = None,
           old_value: Any = None, new_value: Any = None, reason: str | None = None,
           at_utc: str | None = None) -> int:
    """Append one entry inside the caller's write transaction (``ReviewDB.transaction``); returns its seq.

    Taking the caller's connection lets an action and its audit entry commit together or not at all.
    """
    if not conn.in_transaction:
        raise ReviewDBError("audit entries must be appended inside a write transaction")
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if not user:
        raise ValueError("an audit entry needs a user")
    at = at_utc or utc_now()[1]
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    # AUTOINCREMENT never reuses a number, so the next seq is sqlite_sequence + 1 even after a (forbidden)
    # deletion at the end (PostgreSQL: qa_sequence, kept by a trigger); taking it explicitly lets the hash cover
    # the seq. (Not a PostgreSQL sequence: a rolled-back transaction would leave a gap that verify calls a deletion.)
    seq = max(conn.sequence_used("audit") or 0, int(last["seq"]) if last else 0) + 1
    prev = last["hash"] if last else GENESIS_HASH
    old, new = to_text(old_value), to_text(new_value)
    h = entry_hash(prev, seq, at, user, action, container_id, old, new, reason)
    conn.execute(f"INSERT INTO audit ({_AUDIT_COLUMNS_SQL}) VALUES ({','.join('?' * len(AUDIT_COLUMNS))})",
                 (seq, at, user, action, container_id, old, new, reason, prev, h))
    return seq


def entry_hash_of(db: ReviewDB, seq: int) -> str | None:
    """The chain hash of entry ``seq`` (for anchoring the trail's head outside the database), or None."""
    with db.connect() as conn:
        row = conn.execute("SELECT hash FROM audit WHERE seq = ?", (int(seq),)).fetchone()
    return None if row is None else str(row[0])


def record(db: ReviewDB, user: str, action: str, container_id: str | None = None, old_value: Any = None,
           new_value: Any = None, reason: str | None = None) -> int:
    """Append one entry in its own transaction (for actions that change nothing else: logins, exports)."""
    with db.transaction() as conn:
        return append(conn, user, action, container_id, old_value, new_value, reason)


# ---------------------------------------------------------------- reading

@dataclass
class AuditEntry:
    seq: int
    at_utc: str
    user: str
    action: str
    container_id: str | None
    old_value: str | None
    new_value: str | None
    reason: str | None
    prev_hash: str
    hash: str


def _entry(row: RowLike) -> AuditEntry:
    return AuditEntry(**{k: row[k] for k in AUDIT_COLUMNS})


def entries(db: ReviewDB, user: str | None = None, action: str | None = None, container_id: str | None = None,
            since_utc: str | None = None, limit: int | None = None, newest_first: bool = False) -> list[AuditEntry]:
    where, args = ["TRUE"], []
    for col, v in (("user", user), ("action", action), ("container_id", container_id)):
        if v:
            where.append(f'"{col}" = ?')
            args.append(v)
    if since_utc:
        where.append("at_utc >= ?")
        args.append(since_utc)
    sql = f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY seq {'DESC' if newest_first else 'ASC'}"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(int(limit))
    with db.connect() as conn:
        return [_entry(r) for r in conn.execute(sql, args)]


def history(db: ReviewDB, container_id: str) -> list[AuditEntry]:
    """Every audit entry about one container, oldest first."""
    return entries(db, container_id=container_id)


CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value made safe for a spreadsheet (OWASP CSV injection): text starting with ``= + - @``, TAB or CR
    gets a leading ``'`` so that no spreadsheet runs it as a formula; text already starting with ``'`` gets
    one too, so that :func:`csv_uncell` restores every cell exactly. Numbers and None pass unchanged."""
    if isinstance(value, str) and value.startswith((*CSV_FORMULA_START, "'")):
        return "'" + value
    return value


def csv_uncell(text: str) -> str:
    """The stored text of an exported cell (undoes :func:`csv_cell`)."""
    return text[1:] if text.startswith("'") else text


def export_csv(db: ReviewDB, out: str | Path, user: str) -> int:
    """Write the whole trail to ``out`` as CSV (one row per entry, every column, hashes included so the
    copy can be checked against the chain; text cells escaped with :func:`csv_cell`). The export is audited
    once written, with the head hash the file ends with. Returns the row count."""
    out = Path(out)
    rows = entries(db)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(AUDIT_COLUMNS)
        for e in rows:
            w.writerow([csv_cell(getattr(e, k)) for k in AUDIT_COLUMNS])
    tmp.replace(out)
    record(db, user, AUDIT_EXPORT, new_value={"file": str(out.resolve()), "entries": len(rows),
                                              "head_hash": rows[-1].hash if rows else GENESIS_HASH})
    return len(rows)


# ---------------------------------------------------------------- verification

@dataclass
class VerifyResult:
    ok: bool
    entries: int
    head_hash: str
    first_bad_seq: int | None = None  # the first entry (or, for a cross-check, the entry) that is wrong
    problem: str | None = None
    damaged: bool = False  # the file itself is damaged or unreadable (``problem`` says how); no entry to name
    not_covered: list[str] = field(default_factory=list)  # rows whose audit entry predates full coverage

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What verify() reads from a damaged file can fail in many ways; each one is reported, never raised.
_DAMAGE: tuple[type[BaseException], ...] = (ReviewDBError, sqlite3.Error, ValueError, TypeError, KeyError,
                                            AttributeError, IndexError, OverflowError)


def _one_line(e: BaseException | str) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _damaged(problem: str) -> VerifyResult:
    return VerifyResult(False, 0, "", None, problem, damaged=True)


def verify(db: ReviewDB) -> VerifyResult:
    """Check the file, then walk the chain from the first entry; report the first edited, missing or
    out-of-order one.

    Then cross-check the tables that the trail describes: each review must match the entry that recorded it
    (every column), and each user must have been added (and, if disabled, disabled) by an entry, and match
    the row digest of the latest entry about them. Rows whose entry predates that coverage are listed in
    ``not_covered`` (see the module docstring). A damaged or unreadable database gives ``ok=False`` and
    ``damaged=True`` with a one-line ``problem``; nothing raises.

    On PostgreSQL every step is the same except the file check (SQLite's ``PRAGMA integrity_check``), which has no
    twin there: page checksums and ``amcheck`` are the database operator's. The walk reads one snapshot
    (REPEATABLE READ), so writers may go on meanwhile.
    """
    try:
        return _verify(db)
    except _DAMAGE as e:
        where = str(e) if isinstance(e, ReviewDBError) else f"{db.where}: {type(e).__name__}: {e}"
        return _damaged(f"the review database is damaged or unreadable: {_one_line(where)}")


def verify_store(store_dir: str | Path) -> VerifyResult:
    """:func:`verify` of ``STORE/review.sqlite``, where a file that cannot even be opened is reported as
    damaged too. A missing store or database raises ``ReviewDBError`` (a wrong path, not damage)."""
    store = Path(store_dir)
    if not store.is_dir():
        raise ReviewDBError(f"{store}: no such store directory")
    if not (store / REVIEW_DB_NAME).is_file():
        raise ReviewDBError(f"{store}: no review database here ({REVIEW_DB_NAME} missing)")
    try:
        db = ReviewDB(store, create=False)
    except _DAMAGE as e:
        return _damaged(f"the review database cannot be opened: {_one_line(e)}")
    return verify(db)


def _verify(db: ReviewDB) -> VerifyResult:
    prev, expected, n = GENESIS_HASH, 1, 0
    with db.snapshot() as conn:  # one snapshot for the whole walk, even while others append
        # The full check: quick_check does not compare the indexes with their tables. (PostgreSQL has no twin:
        # its page checksums and amcheck are the operator's.)
        found = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(10)")] if db.engine == "sqlite" else ["ok"]
        if found != ["ok"]:
            more = f" (and {len(found) - 2} more)" if len(found) > 2 else ""
            return _damaged(f"{db.where}: the database file is damaged: integrity check says "
                            f"{'; '.join(_one_line(f) for f in found[:2])}{more}")
        for row in conn.execute("SELECT * FROM audit ORDER BY seq"):
            n += 1
            seq = int(row["seq"])
            if seq != expected:
                gap = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
                what = "deleted" if seq > expected else "duplicated or reordered"
                return VerifyResult(False, n, prev, expected if seq > expected else seq,
                                    f"entry {gap} is missing before entry {seq} ({what})")
            if row["prev_hash"] != prev:
                return VerifyResult(False, n, prev, seq, f"entry {seq} does not follow entry {seq - 1} "
                                    "(entries reordered, or an earlier entry removed or altered)")
            h = entry_hash(prev, seq, row["at_utc"], row["user"], row["action"], row["container_id"],
                           row["old_value"], row["new_value"], row["reason"])
            if h != row["hash"]:
                return VerifyResult(False, n, prev, seq, f"entry {seq} was altered (its content does not match "
                                    "its hash)")
            prev, expected = row["hash"], expected + 1
        used = conn.sequence_used("audit")
        if used is not None and used >= expected:
            return VerifyResult(False, n, prev, expected,
                                f"entries {expected}..{used} were deleted from the end of the trail")
        problem, not_covered = _cross_check(conn)
    if problem is not None:
        return VerifyResult(False, n, prev, problem[0], problem[1], not_covered=not_covered)
    return VerifyResult(True, n, prev, not_covered=not_covered)


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


# The fields a review's entry held before every column was covered (see the module docstring).
_REVIEW_LEGACY_KEYS = ("review_id", "verdict", "classes", "comment", "reviewer", "printed_name", "signed_at_utc",
                       "meaning", "supersedes")


def review_audit_value(row: RowLike) -> dict[str, Any]:
    """What a review's audit entry records as its new value; verify() compares the reviews table with it.

    Every column of the row except ``container_id`` and ``audit_seq``, which verify() checks against the
    entry itself: the signature and what the reviewer saw (the station's model version, recipe, reasons and
    decision time). ``classes`` and ``station_reasons`` are JSON text in the row and lists here.
    """
    return {
        "review_id": row["review_id"], "verdict": row["verdict"], "classes": json.loads(row["classes"]),
        "comment": row["comment"], "reviewer": row["reviewer"], "printed_name": row["printed_name"],
        "signed_at_utc": row["signed_at_utc"], "meaning": row["meaning"], "supersedes": row["supersedes"],
        "signed_at": _num(row["signed_at"]), "model_version": row["model_version"], "recipe": row["recipe"],
        "station_reasons": json.loads(row["station_reasons"]), "decided_at": _num(row["decided_at"]),
    }


def user_row_digest(row: RowLike) -> str:
    """sha256 of every column of a users row (the password hash included), as canonical JSON."""
    return hashlib.sha256((to_text([row[c] for c in USER_COLUMNS]) or "").encode("utf-8")).hexdigest()


def user_audit_value(row: RowLike) -> dict[str, Any]:
    """What a user change (added, disabled, unlocked) records as its new value: the readable columns and
    ``row_sha256`` (:func:`user_row_digest`), which covers the password hash without putting it in the trail."""
    return {
        "username": row["username"], "full_name": row["full_name"], "role": row["role"],
        "active": row["disabled_at_utc"] is None, "created_at_utc": row["created_at_utc"],
        "created_by": row["created_by"], "disabled_at_utc": row["disabled_at_utc"],
        "disabled_by": row["disabled_by"], "row_sha256": user_row_digest(row),
    }


def _json_dict(text: Any) -> dict[str, Any] | None:
    try:
        v = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


CrossCheck = tuple[tuple[int | None, str] | None, list[str]]


def _cross_check(conn: Connection) -> CrossCheck:
    """(the first problem as (entry, text), or None; the rows not covered)."""
    not_covered: list[str] = []
    for r in conn.execute("SELECT * FROM reviews ORDER BY review_id"):
        rid, cid = r["review_id"], r["container_id"]
        a = conn.execute("SELECT * FROM audit WHERE seq = ?", (r["audit_seq"],)).fetchone()
        expected_action = REVIEW_CHANGED if r["supersedes"] is not None else REVIEW
        if a is None or a["action"] != expected_action or a["container_id"] != cid:
            return (r["audit_seq"], f"review {rid} of {cid!r} has no matching audit entry"), not_covered
        try:
            want = review_audit_value(r)
        except (ValueError, TypeError) as e:
            return (a["seq"], f"review {rid} of {cid!r} cannot be read ({_one_line(e)}): the reviews table was "
                              "altered or damaged"), not_covered
        if a["new_value"] == to_text(want):
            continue
        if a["new_value"] == to_text({k: want[k] for k in _REVIEW_LEGACY_KEYS}):
            not_covered.append(f"review {rid} of {cid!r}: audit entry {a['seq']} predates full coverage (model "
                               "version, recipe, station reasons and times not checked)")
            continue
        return (a["seq"], f"review {rid} of {cid!r} differs from what audit entry {a['seq']} recorded (the reviews "
                          "table was altered)"), not_covered
    n_reviews = conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0]
    n_review_entries = conn.execute("SELECT COUNT(*) FROM audit WHERE action IN (?, ?)",
                                    (REVIEW, REVIEW_CHANGED)).fetchone()[0]
    if n_reviews != n_review_entries:
        return (None, f"the trail records {n_review_entries} review(s) but the reviews table holds {n_reviews} "
                      "(a review was deleted)"), not_covered
    added: dict[str, dict[str, Any]] = {}
    latest: dict[str, dict[str, Any]] = {}  # the latest user change about each user
    disabled: set[str] = set()
    marks = ",".join("?" * len(USER_CHANGES))
    for a in conn.execute(f"SELECT seq, action, new_value FROM audit WHERE action IN ({marks}) ORDER BY seq",
                          USER_CHANGES):
        v = _json_dict(a["new_value"])
        if v is None or not isinstance(v.get("username"), str):
            return (a["seq"], f"audit entry {a['seq']} ({a['action']}) does not name a user"), not_covered
        v = {**v, "_seq": a["seq"]}
        if a["action"] == USER_ADDED:
            added[v["username"]] = v
        elif a["action"] == USER_DISABLED:
            disabled.add(v["username"])
        latest[v["username"]] = v
    users = {r["username"]: r for r in conn.execute("SELECT * FROM users")}
    for name, u in users.items():
        if name not in added:
            return (None, f"user {name!r} exists but no audit entry added it"), not_covered
        a = added[name]
        if a.get("role") != u["role"] or a.get("full_name") != u["full_name"]:
            return (a["_seq"], f"user {name!r} differs from what audit entry {a['_seq']} recorded"), not_covered
        if (u["disabled_at_utc"] is not None) != (name in disabled):
            return (a["_seq"], f"user {name!r} is {'disabled' if u['disabled_at_utc'] else 'active'} but the trail "
                               f"says {'disabled' if name in disabled else 'active'}"), not_covered
        last = latest[name]
        if "row_sha256" not in last:
            not_covered.append(f"user {name!r}: its latest audit entry {last['_seq']} predates full coverage "
                               "(password hash and created/disabled by/at not checked)")
        elif last["row_sha256"] != user_row_digest(u):
            return (last["_seq"], f"user {name!r} differs from what audit entry {last['_seq']} recorded (the users "
                                  "table was altered: password hash, name, role or dates)"), not_covered
    for name in added:
        if name not in users:
            return (added[name]["_seq"], f"user {name!r} was added (entry {added[name]['_seq']}) but is gone"), \
                not_covered
    return None, not_covered
