"""The record store: one row per decided container, and the frames of flagged (and audit-sampled) units.

Layout of a store directory::

    STORE/records.sqlite            decisions, one row per container (SQLite, WAL, synchronous=FULL)
    STORE/frames/<name>/f<k>.png    lossless frames of every rejected unit and of the accepted audit sample
    STORE/maps/<name>.npz           the model's localisation maps of those units (when given)
    STORE/.writer.lock              held (flock) by the one process that records into the store

``<name>`` is the record key when that is a plain file name, else ``_`` + a hash of the key; the row keeps
it in ``frames_dir``.

Record keys: a row's ``container_id`` is unique. A unit whose id was already decided here (a replayed trigger, a
camera that restarted its counter, a folder replayed twice) is rejected as ``not_inspected:duplicate_id`` by the
pipeline and recorded under ``<id>~dup<n>``, with the id it came with in ``unit_id``; the first record stands.

Crash safety (a crash or ``kill -9`` at any moment loses nothing decided and records nothing twice):
frames go to a temporary folder ``frames/.tmp-<name>`` and are fsynced (maps likewise), then the row is
inserted in one transaction, then the folder is renamed into place. The row is the commit point: a
temporary folder whose row exists is rolled forward (renamed into place) by the next writer on open, and one
without a row is debris of an interrupted ``record`` and removed. The store deletes nothing else: files in
``frames/`` and ``maps/`` that it did not write are left alone (and logged). Rows are append-only (triggers
refuse UPDATE and DELETE): review verdicts are kept elsewhere, so an earlier entry is never obscured
(21 CFR 11.10(e)).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.imageio import png_bytes
from vialinspect.errors import VialinspectError
from vialinspect.export.hashchain import GENESIS, content_hash

from .types import Container, Decision, not_inspected

try:  # POSIX: the kernel drops the lock when the holder dies, even by SIGKILL
    import fcntl
except ImportError:  # pragma: no cover - Windows: no single-writer guard
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# The schema's version is the database's ``PRAGMA user_version``. Stores written before that kept it in a table,
# ``schema_version`` (LEGACY_VERSION_TABLE): its version is taken over into user_version by the first writer that
# opens the store, and the table is left as it is, so that an earlier vialinspect still opens a store whose
# schema it knows; the next migration step drops it, so that an earlier vialinspect refuses what it does not know.
SCHEMA_VERSION = 2  # 2: unit_id (the id a duplicate-id unit came with), the rows' hash chain
LEGACY_VERSION_TABLE = "schema_version"
OVERLOAD_REASONS = frozenset({not_inspected("queue_full"), not_inspected("deadline_missed")})
DB_NAME = "records.sqlite"
FRAMES_DIR, MAPS_DIR = "frames", "maps"
LOCK_NAME = ".writer.lock"
TMP_PREFIX = ".tmp-"  # cannot clash with a frames folder name: those start with a letter, digit or "_"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PAGE = 256  # rows per query in iter_decisions, so no read transaction stays open between yields
# The review queue's order over the flagged units (qa/records_view.py): its first page reads a page of this index
# however many units are recorded. Only an index, not a schema change (an older vialinspect opens the store as it
# is), so it is created, if missing, whenever a writer opens the store, not by a version step.
_QUEUE_INDEX = "CREATE INDEX IF NOT EXISTS decisions_queue ON decisions (decided_at_utc, sequence) WHERE accept = 0"

_SCHEMA = f"""
PRAGMA user_version = {SCHEMA_VERSION};
CREATE TABLE decisions (
    container_id     TEXT PRIMARY KEY NOT NULL,
    sequence         INTEGER NOT NULL,
    decided_at       REAL NOT NULL,       -- unix seconds (UTC)
    decided_at_utc   TEXT NOT NULL,       -- the same instant, ISO 8601, for people and exports
    recorded_at_utc  TEXT NOT NULL,       -- when this row was written
    recipe           TEXT NOT NULL,
    model_version    TEXT,
    accept           INTEGER NOT NULL CHECK (accept IN (0, 1)),
    reasons          TEXT NOT NULL,       -- JSON list
    scores           TEXT NOT NULL,       -- JSON object
    thresholds       TEXT NOT NULL,       -- JSON object
    fill_height_mm   REAL,
    timings_ms       TEXT NOT NULL,       -- JSON object
    provider         TEXT,
    truth            TEXT,                -- JSON, simulated units only
    format           TEXT,
    kept             TEXT,                -- why frames were kept: 'flagged', 'sample' or NULL (none kept)
    frames_dir       TEXT,                -- folder under frames/ when frames were kept
    frames           TEXT NOT NULL,       -- JSON list, one entry per frame: file name, or null (no pixels)
    has_maps         INTEGER NOT NULL DEFAULT 0,
    unit_id          TEXT,                -- the id the unit came with, when container_id (the key) differs
    prev_hash        TEXT,                -- the previous row's row_hash (GENESIS for the first)
    row_hash         TEXT                 -- sha256 over prev_hash and this row's values (see row_hash())
);
CREATE INDEX decisions_unit_id ON decisions (unit_id) WHERE unit_id IS NOT NULL;
CREATE INDEX decisions_sequence ON decisions (sequence);
CREATE INDEX decisions_decided_at ON decisions (decided_at);
CREATE INDEX decisions_frames_dir ON decisions (frames_dir) WHERE frames_dir IS NOT NULL;
{_QUEUE_INDEX};
CREATE TRIGGER decisions_no_update BEFORE UPDATE ON decisions
BEGIN SELECT RAISE(ABORT, 'decision records are append-only'); END;
CREATE TRIGGER decisions_no_delete BEFORE DELETE ON decisions
BEGIN SELECT RAISE(ABORT, 'decision records are append-only'); END;
"""

# Each step takes a store from schema N to N + 1, in one transaction (with its user_version and without the
# legacy version table), when its writer opens it.
_MIGRATIONS = {
    1: """ALTER TABLE decisions ADD COLUMN unit_id TEXT;
ALTER TABLE decisions ADD COLUMN prev_hash TEXT;
ALTER TABLE decisions ADD COLUMN row_hash TEXT;
CREATE INDEX decisions_unit_id ON decisions (unit_id) WHERE unit_id IS NOT NULL;""",
}

_COLUMNS = (
    "container_id", "sequence", "decided_at", "decided_at_utc", "recorded_at_utc", "recipe", "model_version",
    "accept", "reasons", "scores", "thresholds", "fill_height_mm", "timings_ms", "provider", "truth", "format",
    "kept", "frames_dir", "frames", "has_maps", "unit_id",
)
_CHAINED = (*_COLUMNS, "prev_hash")  # what a row's hash covers: every value of the record and its predecessor
_JSON_COLUMNS = ("reasons", "scores", "thresholds", "timings_ms", "truth", "frames")


class StoreError(VialinspectError):
    """The store cannot be opened or used: not a store, a newer schema, already being written, closed."""


class DiskFullError(StoreError):
    """Too little free space to keep a record; nothing of the unit was written."""


def row_hash(values: dict[str, Any] | sqlite3.Row) -> str:
    """The hash of one decision row: sha256 over its values (as stored) and the previous row's hash.

    Rows form a chain in recording order, so a row edited, removed or inserted in the file (past the triggers
    that refuse it through SQLite) breaks every hash after it; ``RecordStore.verify`` recomputes them.
    """
    return content_hash([values[c] for c in _CHAINED], sort_keys=False)  # a JSON list, prev_hash last


class ChainCheck:
    """Recompute a chain of decision rows, fed in recording order; shared by the SQLite store and PostgreSQL's
    (``pg_store``), which hash the same values with the same ``row_hash``.

    A row without a hash before any hashed row is a record from before the chain (schema 1): counted as not
    covered, not judged. At most 20 problems are kept (``add`` then returns False).
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.rows = self.not_covered = 0
        self.prev: str | None = None
        self.problems: list[str] = []

    def add(self, r: Any, locate: str) -> bool:
        self.rows += 1
        if r["row_hash"] is None and self.prev is None:
            self.not_covered += 1
            return True
        expect_prev = GENESIS if self.prev is None else self.prev
        if r["prev_hash"] != expect_prev or r["row_hash"] != row_hash(r):
            self.problems.append(f"{self.where}: record {r['container_id']!r} ({locate}): hash chain broken (a "
                                 "record was edited, removed or inserted outside the store)")
        self.prev = r["row_hash"]
        return len(self.problems) < 20

    def result(self, problems: list[str] | None = None) -> dict[str, Any]:
        problems = [*(problems or []), *self.problems]
        return {"ok": not problems, "rows": self.rows, "not_covered": self.not_covered,
                "head": self.prev or GENESIS, "problems": problems}


def audit_sampled(container_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether an accepted unit belongs to the audit sample.

    A hash of the id, not random state, decides: the same unit is sampled whichever process records it, in
    whatever order, and a restart does not change the sample.
    """
    if fraction <= 0.0:
        return False
    h = hashlib.sha256(f"{seed}:{container_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


def frames_dir_name(container_id: str) -> str:
    if _SAFE_NAME.fullmatch(container_id) and container_id not in (".", ".."):
        return container_id
    return "_" + hashlib.sha256(container_id.encode()).hexdigest()[:32]


def _utc_iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")


def _to_json(value: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        return repr(o)  # a record must never fail on an odd value in an audit field

    return json.dumps(value, default=default, sort_keys=True)


def _as_unix(t: float | datetime | str | None) -> float | None:
    if t is None:
        return None
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return t.timestamp()
    return float(t)


def time_range_sql(t0: float | None, t1: float | None) -> tuple[list[str], list[float]]:
    """WHERE clauses and arguments for decided_at in [t0, t1); either end may be open."""
    where, args = [], []
    if t0 is not None:
        where.append("decided_at >= ?")
        args.append(t0)
    if t1 is not None:
        where.append("decided_at < ?")
        args.append(t1)
    return where, args


def _fsync_path(path: Path) -> None:
    if os.name != "posix" and path.is_dir():  # pragma: no cover - directories cannot be fsynced there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == 13 or "disk is full" in str(e)  # SQLITE_FULL
    return False


class RecordStore:
    """The station's record of every decision; see the module docstring for the layout and write order.

    One process records (``readonly=False``, the default; it takes an exclusive lock on the store and
    cleans up after a crash on open); any number of others may read (``readonly=True``, e.g. the review app).
    """

    def __init__(
        self,
        path: str | Path,
        sample_accepted: float = 0.0,
        min_free_mb: float = 200.0,
        seed: int = 0,
        *,
        readonly: bool = False,
        disk_usage: Callable[[Path], Any] = shutil.disk_usage,
    ) -> None:
        if not 0.0 <= sample_accepted <= 1.0:
            raise ValueError(f"sample_accepted must be within 0..1, got {sample_accepted}")
        if not min_free_mb >= 0.0:
            raise ValueError(f"min_free_mb must be >= 0, got {min_free_mb}")
        self.path = Path(path)
        self.sample_accepted = float(sample_accepted)
        self.min_free_mb = float(min_free_mb)
        self.seed = int(seed)
        self.readonly = readonly
        self._disk_usage = disk_usage
        self._db = self.path / DB_NAME
        self._frames = self.path / FRAMES_DIR
        self._maps = self.path / MAPS_DIR
        # Threads: `record` uses one writer connection behind `_write_lock` (one recording thread, but close()
        # may come from another). Queries use one read-only connection per thread: in WAL mode they read a
        # committed snapshot concurrently, so a slow review query never holds up the recording thread, and
        # no connection is ever shared between threads mid-query.
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._lock_fh = None
        self._closed = False
        self.cleaned_up: list[str] = []  # what the opening writer completed or removed after an interrupted record
        self.schema = SCHEMA_VERSION
        self.head = GENESIS  # the last row's hash (the writer's chain head; the line heartbeat carries it)
        if readonly:
            if not self._db.is_file():
                raise StoreError(f"{self.path}: no record store here ({DB_NAME} missing)")
            if not self._check_schema(self._reader()):  # the file exists, its tables not yet: a store being created
                self.close()
                raise StoreError(f"{self._db}: holds no records yet (a station is creating the store)")
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._frames.mkdir(exist_ok=True)
            self._maps.mkdir(exist_ok=True)
            self._take_writer_lock()
            self._writer = self._connect(readonly=False)
            self._init_schema(self._writer)
            last = self._writer.execute("SELECT row_hash FROM decisions WHERE row_hash IS NOT NULL "
                                        "ORDER BY rowid DESC LIMIT 1").fetchone()
            self.head = last[0] if last else GENESIS
            self.cleaned_up = self._cleanup()
        except BaseException:
            self.close()
            raise

    # ---- opening -------------------------------------------------------------------------------------------

    def _take_writer_lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fh = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise StoreError(
                f"{self.path}: already open for recording by another process or store object; "
                "only one station may record into a store (open it with readonly=True to read)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock_fh = fh

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        try:
            if readonly and self.readonly:
                conn = sqlite3.connect(self._db.resolve().as_uri() + "?mode=ro", uri=True, timeout=30.0,
                                       isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(self._db, timeout=30.0, isolation_level=None, check_same_thread=False)
            if readonly:
                conn.execute("PRAGMA query_only=ON")
            else:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.close()
                    raise StoreError(f"{self._db}: cannot switch to WAL mode (got {mode!r})")
                # FULL: a commit is on disk when execute() returns, so the row really is the commit point.
                conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            raise StoreError(f"{self._db}: cannot open ({e})") from None
        conn.row_factory = sqlite3.Row
        return conn

    def _check_schema(self, conn: sqlite3.Connection) -> bool:
        """True when the schema exists and is ours (its version in ``self.schema``); False for an empty database;
        raise otherwise."""
        try:
            conn.execute("BEGIN")  # one snapshot: the version and the tables as one writer left them
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if version == 0 and LEGACY_VERSION_TABLE in tables:  # written before user_version
                    version = conn.execute(f"SELECT MAX(version) FROM {LEGACY_VERSION_TABLE}").fetchone()[0]
                    if version is None:
                        raise StoreError(f"{self._db}: {LEGACY_VERSION_TABLE} is empty; not a complete record store")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self._db}: not a readable SQLite database ({e})") from None
        if not tables and not version:
            return False
        if not version or "decisions" not in tables:
            raise StoreError(f"{self._db}: not a vialinspect record store (tables: {sorted(tables)})")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self._db}: written by a newer vialinspect (store schema {version}, this version reads up to "
                f"{SCHEMA_VERSION}); upgrade vialinspect to open it"
            )
        self.schema = int(version)  # older ones are read as they are (missing columns read as None)
        return True

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        if self._check_schema(conn):
            self._migrate(conn)
            try:
                conn.execute(_QUEUE_INDEX)
            except sqlite3.Error as e:
                raise StoreError(f"{self._db}: cannot create the review queue's index ({e})") from None
            return
        try:
            conn.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA + "\nCOMMIT;")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"{self._db}: cannot create the schema ({e})") from None

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:  # a store from before user_version
            conn.execute(f"PRAGMA user_version = {self.schema}")
        while self.schema < SCHEMA_VERSION:
            try:
                conn.executescript(f"BEGIN IMMEDIATE;\n{_MIGRATIONS[self.schema]}\n"
                                   f"DROP TABLE IF EXISTS {LEGACY_VERSION_TABLE};\n"
                                   f"PRAGMA user_version = {self.schema + 1};\nCOMMIT;")
            except sqlite3.Error as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StoreError(f"{self._db}: cannot migrate the schema from {self.schema} ({e})") from None
            log.warning("%s: record store schema migrated from %d to %d", self._db, self.schema, self.schema + 1)
            self.schema += 1

    def _cleanup(self) -> list[str]:
        """Finish or remove what an interrupted ``record`` left: only the store's own temporary files.

        A temporary frames folder (or maps file) whose row exists was committed and is renamed into place; one
        without a row is removed. Nothing else is touched: a file the store did not write is logged, never
        deleted. Safe only for the writer (it holds the lock, so no ``record`` is in flight anywhere). Cost: one
        directory listing per folder and one indexed query per 500 temporary entries.
        Returns what it did, one ``"removed <path>"`` or ``"completed <path>"`` line each (also logged).
        """
        done: list[str] = []
        assert self._writer is not None
        for folder, suffix in ((self._frames, ""), (self._maps, ".npz")):
            temps: dict[str, Path] = {}
            for entry in os.scandir(folder):
                if entry.name.startswith(TMP_PREFIX) and entry.name.endswith(suffix):
                    temps[entry.name[len(TMP_PREFIX): len(entry.name) - len(suffix)]] = Path(entry.path)
                elif entry.name.startswith(TMP_PREFIX):
                    temps[entry.name] = Path(entry.path)  # not a name the store writes there: no row matches
            names = list(temps)
            for i in range(0, len(names), 500):
                chunk = names[i : i + 500]
                marks = ",".join("?" * len(chunk))
                committed = {r[0] for r in self._writer.execute(
                    f"SELECT frames_dir FROM decisions WHERE frames_dir IN ({marks})", chunk)}
                for name in chunk:
                    tmp, final = temps[name], folder / f"{name}{suffix}"
                    if name in committed and not final.exists():
                        os.rename(tmp, final)
                        done.append(f"completed {folder.name}/{final.name}")
                    else:
                        _remove(tmp)
                        done.append(f"removed {folder.name}/{tmp.name}")
        for line in done:
            log.warning("%s: %s (left by an interrupted record)", self.path, line)
        if done:
            _fsync_path(self._frames)
            _fsync_path(self._maps)
        return done

    # ---- recording -----------------------------------------------------------------------------------------

    def is_sampled(self, container_id: str) -> bool:
        """Whether an accepted unit's frames are kept for audit (deterministic in the id and ``seed``)."""
        return audit_sampled(container_id, self.sample_accepted, self.seed)

    def free_space_ok(self) -> bool:
        try:
            free = self._disk_usage(self.path).free
        except OSError:
            return False  # cannot tell whether the record would fit: treat as full (any doubt stops)
        return free / 2**20 >= self.min_free_mb

    def record(self, decision: Decision, container: Container, maps: np.ndarray | None = None, *,
               compress: bool = True) -> bool:
        """Record a decided unit; True when recorded now, False when it was already recorded (nothing written).

        ``compress=False`` writes the kept frames as uncompressed PNG (lossless either way, ~8x less CPU,
        twice the bytes): the station's choice while inspection needs the CPU.

        Raises ``DiskFullError`` before writing anything when free space is below ``min_free_mb`` (or when the
        disk fills up mid-way; what was written is then removed), so the caller can reject the unit as
        ``not_inspected:disk_full``. When this returns True the record is durable.
        """
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only; cannot record")
        if decision.container_id != container.id:
            raise ValueError(f"decision is for {decision.container_id!r} but the container is {container.id!r}")
        with self._write_lock:
            conn = self._writer_conn()
            cid = decision.key
            if conn.execute("SELECT 1 FROM decisions WHERE container_id = ?", (cid,)).fetchone():
                return False  # this key is decided already: the first record stands (see duplicate_key)
            if not self.free_space_ok():
                raise DiskFullError(
                    f"{self.path}: less than {self.min_free_mb:g} MB free; container {cid!r} was not recorded"
                )
            kept = "flagged" if not decision.accept else ("sample" if self.is_sampled(cid) else None)
            if kept and not decision.accept and set(decision.reasons) <= OVERLOAD_REASONS:
                # Turned away or timed out under load: QA still sees what the line rejected uninspected (and can
                # send it to re-inspection), but the frames are stored uncompressed (an eighth of the CPU) so
                # that an overload does not also become a recording backlog.
                compress = False
            name = self._free_name(frames_dir_name(cid)) if kept else None
            try:
                files: list[str | None] = []
                has_maps = False
                if name is not None:
                    files = self._write_frames(name, container, compress)
                    if maps is not None:
                        self._write_maps(name, maps)
                        has_maps = True
                else:
                    files = [None] * len(container.frames)
                self._insert(conn, decision, container, kept, name, files, has_maps)
            except BaseException as e:
                if name is not None:
                    self._discard(name)
                if _is_disk_full(e):
                    raise DiskFullError(f"{self.path}: disk full while recording {cid!r}; nothing kept ({e})") from e
                raise
            if name is not None:
                self._publish(name, has_maps)
            return True

    def duplicate_key(self, unit_id: str) -> str:
        """A free record key for another unit that came with ``unit_id``: ``<id>~dup<n>``."""
        conn = self._writer_conn()
        n = 1 + int(conn.execute("SELECT COUNT(*) FROM decisions WHERE unit_id = ?", (unit_id,)).fetchone()[0])
        while conn.execute("SELECT 1 FROM decisions WHERE container_id = ?", (f"{unit_id}~dup{n}",)).fetchone():
            n += 1
        return f"{unit_id}~dup{n}"

    def _free_name(self, name: str) -> str:
        """``name``, or ``name-<n>`` when something not of this store's rows already has that name on disk."""
        base, n = name, 1
        while (self._frames / name).exists() or (self._maps / f"{name}.npz").exists():
            name, n = f"{base}-{n}", n + 1
        return name

    def _publish(self, name: str, has_maps: bool) -> None:
        """Rename a committed unit's files into place. A failure here loses nothing: the row is committed and the
        files stay readable in their temporary place until the next writer's open completes the rename."""
        try:
            os.rename(self._frames / f"{TMP_PREFIX}{name}", self._frames / name)
            if has_maps:
                os.replace(self._maps / f"{TMP_PREFIX}{name}.npz", self._maps / f"{name}.npz")
            _fsync_path(self._frames)
            if has_maps:
                _fsync_path(self._maps)
        except OSError as e:
            log.error("%s: recorded %s but could not move its files into place (%s); the next open completes it",
                      self.path, name, e)

    def _writer_conn(self) -> sqlite3.Connection:
        if self._closed or self._writer is None:
            raise StoreError(f"{self.path}: store is closed")
        return self._writer

    def _write_frames(self, name: str, container: Container, compress: bool = True) -> list[str | None]:
        tmp = self._frames / f"{TMP_PREFIX}{name}"
        _remove(tmp)
        tmp.mkdir()
        files: list[str | None] = []
        for k, frame in enumerate(container.frames):
            files.append(None if frame.pixels is None else _write_frame(tmp, k, frame.pixels, compress))
        _fsync_path(tmp)
        return files

    def _write_maps(self, name: str, maps: np.ndarray) -> None:
        tmp = self._maps / f"{TMP_PREFIX}{name}.npz"
        with open(tmp, "wb") as fh:
            # Not compressed: ~80 kB of float maps gain a few percent from deflate, for 2.4 ms of CPU a unit.
            np.savez(fh, maps=np.asarray(maps))
            fh.flush()
            os.fsync(fh.fileno())

    def _discard(self, name: str) -> None:
        for p in (self._frames / f"{TMP_PREFIX}{name}", self._maps / f"{TMP_PREFIX}{name}.npz"):
            try:
                _remove(p)
            except OSError:
                pass  # the next open cleans up whatever is left

    def _insert(self, conn: sqlite3.Connection, d: Decision, c: Container, kept: str | None, name: str | None,
                files: list[str | None], has_maps: bool) -> None:
        now = time.time()
        # An unset decision time (0) would file the unit in 1970; the recording time is the closest truth.
        decided_at = d.decided_at if d.decided_at and math.isfinite(d.decided_at) and d.decided_at > 0 else now
        fill = d.fill_height_mm if d.fill_height_mm is not None and math.isfinite(d.fill_height_mm) else None
        values = (
            d.key, int(d.sequence), float(decided_at), _utc_iso(decided_at), _utc_iso(now), d.recipe,
            d.model_version, int(bool(d.accept)), _to_json(list(d.reasons)), _to_json(d.scores),
            _to_json(d.thresholds), fill, _to_json(d.timings_ms), d.provider,
            None if d.truth is None else _to_json(d.truth), c.format, kept, name, _to_json(files), int(has_maps),
            d.container_id if d.key != d.container_id else None,
        )
        row = {**dict(zip(_COLUMNS, values, strict=True)), "prev_hash": self.head}
        h = row_hash(row)
        # One INSERT in autocommit mode is one transaction; with synchronous=FULL it is durable on return.
        conn.execute(f"INSERT INTO decisions ({','.join(_CHAINED)}, row_hash) VALUES "
                     f"({','.join('?' * (len(_CHAINED) + 1))})", (*values, self.head, h))
        self.head = h

    # ---- queries (any thread) ------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"{self.path}: store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def get(self, container_id: str) -> dict[str, Any] | None:
        row = self._reader().execute("SELECT * FROM decisions WHERE container_id = ?", (container_id,)).fetchone()
        return None if row is None else _row_dict(row)

    def count(self) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM decisions").fetchone()[0])

    def last_sequence(self) -> int | None:
        """The highest sequence recorded (a restarted station resumes after it), or None for an empty store."""
        v = self._reader().execute("SELECT MAX(sequence) FROM decisions").fetchone()[0]
        return None if v is None else int(v)

    def iter_decisions(
        self,
        since: float | datetime | str | None = None,
        until: float | datetime | str | None = None,
        flagged_only: bool = False,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Records in recording order; ``since`` inclusive, ``until`` exclusive (unix seconds, datetime or ISO).

        Rows are fetched a page at a time, so the generator may be consumed slowly without holding a read
        transaction open (which would keep the WAL from being checkpointed).
        """
        where, args = time_range_sql(_as_unix(since), _as_unix(until))
        where, args = ["rowid > ?", *where], args
        if flagged_only:
            where.append("accept = 0")
        sql = f"SELECT rowid AS _rowid, * FROM decisions WHERE {' AND '.join(where)} ORDER BY rowid LIMIT ?"
        last, left = 0, limit
        while left is None or left > 0:
            page = _PAGE if left is None else min(_PAGE, left)
            rows = self._reader().execute(sql, (last, *args, page)).fetchall()
            for row in rows:
                d = _row_dict(row)
                last = d.pop("_rowid")
                yield d
            if left is not None:
                left -= len(rows)
            if len(rows) < page:
                return

    def frame_paths(self, container_id: str) -> list[Path]:
        """Kept frames of a unit, in frame order (frames that had no pixels are skipped); [] if none kept."""
        rec = self.get(container_id)
        if rec is None or rec["frames_dir"] is None:
            return []
        folder = self._frames / rec["frames_dir"]
        if not folder.exists():  # committed a moment ago, not yet renamed into place (see _publish)
            folder = self._frames / f"{TMP_PREFIX}{rec['frames_dir']}"
        return [folder / f for f in rec["frames"] if f is not None]

    def maps_path(self, container_id: str) -> Path | None:
        rec = self.get(container_id)
        if rec is None or not rec["has_maps"]:
            return None
        p = self._maps / f"{rec['frames_dir']}.npz"
        return p if p.exists() else self._maps / f"{TMP_PREFIX}{rec['frames_dir']}.npz"

    def stats(self, since: float | datetime | str | None = None,
              until: float | datetime | str | None = None) -> dict[str, Any]:
        """Counts: total, accepted, rejected, not_inspected, and rejections per reason."""
        where, args = time_range_sql(_as_unix(since), _as_unix(until))
        w = " AND ".join(["1", *where])
        conn = self._reader()
        total, accepted = conn.execute(f"SELECT COUNT(*), COALESCE(SUM(accept), 0) FROM decisions WHERE {w}",
                                       args).fetchone()
        per_reason = {
            r[0]: int(r[1])
            for r in conn.execute(
                f"SELECT j.value, COUNT(*) FROM decisions, json_each(decisions.reasons) AS j "
                f"WHERE accept = 0 AND {w} GROUP BY j.value ORDER BY j.value", args)
        }
        not_inspected = conn.execute(
            f"SELECT COUNT(*) FROM decisions WHERE accept = 0 AND {w} AND EXISTS "
            f"(SELECT 1 FROM json_each(decisions.reasons) AS j WHERE j.value LIKE 'not_inspected:%')", args
        ).fetchone()[0]
        return {
            "total": int(total),
            "accepted": int(accepted),
            "rejected": int(total) - int(accepted),
            "not_inspected": int(not_inspected),
            "reasons": per_reason,
        }

    # ---- verification --------------------------------------------------------------------------------------

    def verify(self) -> dict[str, Any]:
        """Check the file (``PRAGMA integrity_check``) and recompute the rows' hash chain.

        Returns ``{"ok", "rows", "not_covered", "head", "problems"}``: ``not_covered`` counts rows recorded
        before the chain existed (schema 1), which are reported, not judged. Never raises for a damaged store.
        """
        problems: list[str] = []
        chain = ChainCheck(str(self._db))
        try:
            conn = self._reader()
            bad = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
            if bad != ["ok"]:
                problems.append(f"{self._db}: SQLite integrity check failed: {'; '.join(bad[:3])}")
            for r in conn.execute(f"SELECT rowid, {','.join(_CHAINED)}, row_hash FROM decisions ORDER BY rowid"):
                if not chain.add(r, f"row {r['rowid']}"):
                    break
        except (sqlite3.Error, StoreError) as e:
            problems.append(f"{self._db}: cannot be read completely ({e})")
        return chain.result(problems)

    # ---- the spool's reader (inspection_station.pg_store copies rows from here, in recording order) ---------

    def rows_after(self, rowid: int, limit: int = 500) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` rows after ``rowid``, in recording order, as stored (JSON columns as their text, so a
        copy hashes the same): ``(rowid, {column: value, ..., "prev_hash", "row_hash"})``."""
        rows = self._reader().execute(
            f"SELECT rowid, {','.join(_CHAINED)}, row_hash FROM decisions WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (rowid, limit)).fetchall()
        return [(int(r["rowid"]), {k: r[k] for k in (*_CHAINED, "row_hash")}) for r in rows]

    def row_at(self, rowid: int) -> dict[str, Any] | None:
        """The row with this rowid, as stored (see ``rows_after``), or None."""
        got = self.rows_after(rowid - 1, 1)
        return got[0][1] if got and got[0][0] == rowid else None

    def last_rowid(self) -> int:
        """The rowid of the last row (rows are append-only and never deleted, so rowids run 1..N); 0 if none."""
        return int(self._reader().execute("SELECT COALESCE(MAX(rowid), 0) FROM decisions").fetchone()[0])

    # ---- closing -------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._write_lock:
            self._closed = True
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._lock_fh is not None:
                self._lock_fh.close()  # releases the flock
                self._lock_fh = None

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_frame(folder: Path, k: int, pixels: np.ndarray, compress: bool = True) -> str | None:
    px = np.asarray(pixels)
    png_shape = px.ndim == 2 or (px.ndim == 3 and px.shape[2] in (1, 3, 4))
    # Not an image a PNG holds (float, odd shape): kept exactly as .npy, since such frames are often the
    # very evidence of why the unit was rejected (wrong_size, corrupt_frame).
    name = f"f{k}.png" if px.size and px.dtype in (np.uint8, np.uint16) and png_shape else f"f{k}.npy"
    try:
        with open(folder / name, "wb") as fh:
            if name.endswith(".png"):
                fh.write(png_bytes(px, compress=compress))
            else:
                np.save(fh, px, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        raise
    except Exception:
        # Evidence that cannot be encoded at all (object arrays, ...) must not cost the unit its record.
        _remove(folder / name)
        return None
    return name


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _row_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for k in _JSON_COLUMNS:
        if d.get(k) is not None:
            d[k] = json.loads(d[k])
    d["accept"] = bool(d["accept"])
    d["has_maps"] = bool(d["has_maps"])
    d["unit_id"] = d.get("unit_id") or d["container_id"]  # schema 1 rows have no unit_id
    return d
