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
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REVIEW_DB_NAME = "review.sqlite"
SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64

# Actions written to the trail. Kept in one place so that the app, the CLI and verify() agree.
LOGIN, LOGIN_FAILED, LOGOUT = "login", "login_failed", "logout"
REVIEW, REVIEW_CHANGED, SIGNATURE_FAILED = "review", "review_changed", "signature_failed"
USER_ADDED, USER_DISABLED = "user_added", "user_disabled"
EXPORT, AUDIT_EXPORT = "export", "audit_export"
MODEL_RETRAINED, MODEL_PROMOTED, MODEL_ROLLED_BACK = "model_retrained", "model_promoted", "model_rolled_back"
ACTIONS: tuple[str, ...] = (LOGIN, LOGIN_FAILED, LOGOUT, REVIEW, REVIEW_CHANGED, SIGNATURE_FAILED, USER_ADDED,
                            USER_DISABLED, EXPORT, AUDIT_EXPORT, MODEL_RETRAINED, MODEL_PROMOTED, MODEL_ROLLED_BACK)

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');

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


class ReviewDBError(Exception):
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
    """``STORE/review.sqlite``: users, reviews and the audit trail.

    Every operation opens its own short-lived connection, so the object is safe to share between the
    app's worker threads and several processes (the app and a CLI command) may write at once: each write
    is one ``BEGIN IMMEDIATE`` transaction, which is what keeps the hash chain linear.
    """

    def __init__(self, store_dir: str | Path, create: bool = True) -> None:
        self.store_dir = Path(store_dir)
        self.path = self.store_dir / REVIEW_DB_NAME
        if not self.store_dir.is_dir():
            raise ReviewDBError(f"{self.store_dir}: no such store directory")
        if not self.path.exists() and not create:
            raise ReviewDBError(f"{self.store_dir}: no review database here ({REVIEW_DB_NAME} missing)")
        self._init_lock = threading.Lock()
        with self.connect() as conn:
            self._init_schema(conn)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
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
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE so that reading the chain head and appending cannot interleave."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

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
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else None
            if version is None or version > SCHEMA_VERSION:
                raise ReviewDBError(f"{self.path}: review schema {version} is not readable by this vialinspect "
                                    f"(reads up to {SCHEMA_VERSION}); upgrade vialinspect")


# ---------------------------------------------------------------- writing entries

def _canonical(seq: int, at_utc: str, user: str, action: str, container_id: str | None, old_value: str | None,
               new_value: str | None, reason: str | None) -> str:
    return json.dumps([seq, at_utc, user, action, container_id, old_value, new_value, reason],
                      ensure_ascii=False, separators=(",", ":"))


def entry_hash(prev_hash: str, seq: int, at_utc: str, user: str, action: str, container_id: str | None,
               old_value: str | None, new_value: str | None, reason: str | None) -> str:
    content = _canonical(seq, at_utc, user, action, container_id, old_value, new_value, reason)
    return hashlib.sha256(f"{prev_hash}\n{content}".encode()).hexdigest()


def append(conn: sqlite3.Connection, user: str, action: str, container_id: str | None = None,
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
    # deletion at the end; taking it explicitly lets the hash cover the seq.
    used = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    seq = max(int(used[0]) if used else 0, int(last["seq"]) if last else 0) + 1
    prev = last["hash"] if last else GENESIS_HASH
    old, new = to_text(old_value), to_text(new_value)
    h = entry_hash(prev, seq, at, user, action, container_id, old, new, reason)
    conn.execute(f"INSERT INTO audit ({','.join(AUDIT_COLUMNS)}) VALUES ({','.join('?' * len(AUDIT_COLUMNS))})",
                 (seq, at, user, action, container_id, old, new, reason, prev, h))
    return seq


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


def _entry(row: sqlite3.Row) -> AuditEntry:
    return AuditEntry(**{k: row[k] for k in AUDIT_COLUMNS})


def entries(db: ReviewDB, user: str | None = None, action: str | None = None, container_id: str | None = None,
            since_utc: str | None = None, limit: int | None = None, newest_first: bool = False) -> list[AuditEntry]:
    where, args = ["1"], []
    for col, v in (("user", user), ("action", action), ("container_id", container_id)):
        if v:
            where.append(f"{col} = ?")
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


def export_csv(db: ReviewDB, out: str | Path, user: str) -> int:
    """Write the whole trail to ``out`` as CSV (one row per entry, every column, hashes included so the
    copy can be checked against the chain). The export is audited once written, with the head hash the file
    ends with. Returns the row count."""
    out = Path(out)
    rows = entries(db)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(AUDIT_COLUMNS)
        for e in rows:
            w.writerow([getattr(e, k) for k in AUDIT_COLUMNS])
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(db: ReviewDB) -> VerifyResult:
    """Walk the chain from the first entry; report the first edited, missing or out-of-order one.

    Then cross-check the tables that the trail describes: each review must match the entry that recorded it,
    and each user must have been added (and, if disabled, disabled) by an entry.
    """
    prev, expected, n = GENESIS_HASH, 1, 0
    with db.connect() as conn:
        conn.execute("BEGIN")  # one snapshot for the whole walk, even while others append
        try:
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
            used = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
            if used is not None and int(used[0]) >= expected:
                return VerifyResult(False, n, prev, expected,
                                    f"entries {expected}..{int(used[0])} were deleted from the end of the trail")
            problem = _cross_check(conn)
        finally:
            conn.execute("ROLLBACK")
    if problem is not None:
        return VerifyResult(False, n, prev, problem[0], problem[1])
    return VerifyResult(True, n, prev)


def review_audit_value(row: sqlite3.Row | dict[str, Any]) -> dict[str, Any]:
    """What a review's audit entry records as its new value; verify() compares the reviews table with it."""
    return {
        "review_id": row["review_id"], "verdict": row["verdict"], "classes": json.loads(row["classes"]),
        "comment": row["comment"], "reviewer": row["reviewer"], "printed_name": row["printed_name"],
        "signed_at_utc": row["signed_at_utc"], "meaning": row["meaning"], "supersedes": row["supersedes"],
    }


def _cross_check(conn: sqlite3.Connection) -> tuple[int | None, str] | None:
    for r in conn.execute("SELECT * FROM reviews ORDER BY review_id"):
        a = conn.execute("SELECT * FROM audit WHERE seq = ?", (r["audit_seq"],)).fetchone()
        expected_action = REVIEW_CHANGED if r["supersedes"] is not None else REVIEW
        if a is None or a["action"] != expected_action or a["container_id"] != r["container_id"]:
            return (r["audit_seq"], f"review {r['review_id']} of {r['container_id']!r} has no matching audit entry")
        if a["new_value"] != to_text(review_audit_value(r)):
            return (a["seq"], f"review {r['review_id']} of {r['container_id']!r} differs from what audit entry "
                              f"{a['seq']} recorded (the reviews table was altered)")
    n_reviews = conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0]
    n_review_entries = conn.execute("SELECT COUNT(*) FROM audit WHERE action IN (?, ?)",
                                    (REVIEW, REVIEW_CHANGED)).fetchone()[0]
    if n_reviews != n_review_entries:
        return (None, f"the trail records {n_review_entries} review(s) but the reviews table holds {n_reviews} "
                      "(a review was deleted)")
    added: dict[str, dict[str, Any]] = {}
    disabled: set[str] = set()
    for a in conn.execute("SELECT seq, action, new_value FROM audit WHERE action IN (?, ?) ORDER BY seq",
                          (USER_ADDED, USER_DISABLED)):
        v = json.loads(a["new_value"] or "{}")
        if a["action"] == USER_ADDED:
            added[v.get("username")] = {**v, "_seq": a["seq"]}
        else:
            disabled.add(v.get("username"))
    users = {r["username"]: r for r in conn.execute("SELECT * FROM users")}
    for name, u in users.items():
        if name not in added:
            return (None, f"user {name!r} exists but no audit entry added it")
        a = added[name]
        if a.get("role") != u["role"] or a.get("full_name") != u["full_name"]:
            return (a["_seq"], f"user {name!r} differs from what audit entry {a['_seq']} recorded")
        if (u["disabled_at_utc"] is not None) != (name in disabled):
            return (a["_seq"], f"user {name!r} is {'disabled' if u['disabled_at_utc'] else 'active'} but the trail "
                               f"says {'disabled' if name in disabled else 'active'}")
    for name in added:
        if name not in users:
            return (added[name]["_seq"], f"user {name!r} was added (entry {added[name]['_seq']}) but is gone")
    return None
