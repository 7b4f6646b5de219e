"""The read side of the review: one station's SQLite record store, or every station of a plant in PostgreSQL.

:class:`~vialinspect.inspection_station.qa.review.ReviewService` reads decisions only through a
:class:`RecordsView`: ``get`` one unit, a page of the flagged units (``flagged``) with their review status, their
count, the filter choices, the trend aggregates, and where a unit's frames are (``frame_roots``). Nothing here
writes: the SQLite store is opened read-only (``mode=ro`` and ``query_only``), PostgreSQL sessions are
``default_transaction_read_only``.

**Unit keys.** On SQLite a unit's key is its ``container_id`` (unique in the store). PostgreSQL holds many stations,
whose container ids may repeat, so the review side keys a unit as ``"STATION_ID/CONTAINER_ID"`` (a station id
cannot contain ``/``: split at the first one); rows come back with that key as ``container_id``, plus
``station_id`` and ``line_id``.

**Paging in SQL.** A page is a query with ``LIMIT``/``OFFSET`` for its unit keys over an index of the flagged units
in queue order (``decisions_queue``: ``(decided_at_utc, sequence) WHERE accept = 0``; on PostgreSQL it also carries
the unit key, so the walk is index-only), then the page's rows by primary key: the first page reads a page's worth
of index entries however many units are recorded. The review status is a correlated lookup in the reviews table
(its ``container_id`` index): on SQLite the QA database ``review.sqlite`` is a separate file, ATTACHed read-only as
``qa``, so "pending" (no review yet) is a SQL anti-join there as on PostgreSQL, where the QA tables live in the
same database.

**Frames on a plant.** PostgreSQL holds the records, not the pixels: a station keeps its flagged units' frames in
its spool (``SPOOL/frames/<frames_dir>/``, ``SPOOL/maps/<frames_dir>.npz``). The review app reads them from a
shared folder named in its configuration, ``frames_root`` (``--frames-root``, ``$VIALINSPECT_FRAMES_ROOT``), laid
out as ``FRAMES_ROOT/<station_id>/frames/...`` and ``FRAMES_ROOT/<station_id>/maps/...`` (see docs/review.md).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vialinspect.errors import VialinspectError

from ..pg_store import STATION_RE, parse_url
from ..store import _CHAINED, DB_NAME, FRAMES_DIR, MAPS_DIR, RecordStore, StoreError, _row_dict, frames_dir_name

NOT_INSPECTED = "not_inspected"  # the class filter for units rejected because a check did not run
FRAMES_ROOT_ENV = "VIALINSPECT_FRAMES_ROOT"
_NI_PREFIX = "not_inspected:"
_CHUNK = 500  # keys per IN (...) list


class RecordsError(VialinspectError):
    """A request the records cannot answer (a filter this store has no data for)."""


@dataclass(frozen=True)
class RecordQuery:
    """Which flagged (rejected) units, as the review's filters ask for them; validated by the service."""

    since: float | None = None  # unix seconds, inclusive
    until: float | None = None  # exclusive
    cls: str | None = None  # a reason class, or NOT_INSPECTED
    recipe: str | None = None
    model_version: str | None = None
    line: str | None = None
    station: str | None = None
    status: str = "all"  # "pending" (no review), "escalated" (current review escalates) or "all"


@dataclass(frozen=True)
class Brief:
    """What the score sort needs of a flagged unit (parsed JSON), in recording order."""

    key: str
    decided_at_utc: str
    reasons: list[str]
    scores: dict[str, Any]


@dataclass(frozen=True)
class FrameRoots:
    """Where a unit's frames and maps are: the resolved folders that hold ``frames_dir`` and ``<frames_dir>.npz``,
    the folder name the unit's key gives (anything else in the row is refused), or why they cannot be reached."""

    frames: Path | None
    maps: Path | None
    name: str
    unreachable: str | None = None


@dataclass
class TrendCounts:
    totals: dict[tuple[str, str], tuple[int, int]]  # (period, model version) -> (inspected, rejected)
    per_class: list[tuple[str, str, str, int]]  # (period, model version, class, rejected)
    by_version: dict[str, tuple[int, int]]  # model version -> (inspected, rejected)


@dataclass
class ChartCounts:
    totals: dict[str, tuple[int, int]]  # period -> (decided, rejected)
    per_class: dict[tuple[str, str], int] = field(default_factory=dict)  # (period, class) -> rejected


class RecordsView(ABC):
    """The decisions as the review reads them; the SQL is written once, the engines differ in a few fragments."""

    multi_station: bool = False  # records of several stations (the queue shows line and station)
    display: str = ""  # where the records are, for people (no secrets)
    data_dirs: list[Path]  # folders the review must never write into (an export) nor serve

    # SQL fragments of the engine (``d`` is decisions, ``s`` stations on PostgreSQL).
    KEY: str  # the unit key
    REVIEWS: str  # the reviews table
    SOURCE: str  # FROM ...
    COLUMNS: str  # a row as RecordStore gives it (plus station_id, line_id on PostgreSQL)
    QUEUE_ORDER: tuple[str, ...]  # the queue's time order, ties in recording order
    RECORDING_ORDER: str
    REASONS: str  # the reasons as a table {a}(value), {a} the alias
    NO_LIMIT: Any

    # ---- the engine --------------------------------------------------------------------------------------------

    @abstractmethod
    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Run one query (``?`` placeholders); rows read as ``row["col"]``."""

    @abstractmethod
    def _period(self, bucket: str) -> str:
        """SQL for the UTC day ("YYYY-MM-DD") or hour ("YYYY-MM-DDTHH:00") of ``d.decided_at``."""

    @abstractmethod
    def _key_in(self, keys: Sequence[str]) -> tuple[str, list[Any]]:
        """A WHERE term selecting these unit keys through the primary key."""

    @abstractmethod
    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A decision row as RecordStore.get returns it (the unit key as container_id)."""

    @abstractmethod
    def get(self, key: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def frame_roots(self, rec: dict[str, Any]) -> FrameRoots: ...

    def close(self) -> None:  # noqa: B027 - nothing to close unless the engine keeps connections
        """Close what the view holds open."""

    # ---- the filters -------------------------------------------------------------------------------------------

    def _where(self, q: RecordQuery, flagged: bool = True) -> tuple[list[str], list[Any]]:
        where: list[str] = ["d.accept = 0"] if flagged else []
        args: list[Any] = []
        if q.since is not None:
            where.append("d.decided_at >= ?")
            args.append(q.since)
        if q.until is not None:
            where.append("d.decided_at < ?")
            args.append(q.until)
        if q.cls == NOT_INSPECTED:  # as the Python filter read it: "not_inspected" or "not_inspected:<why>"
            where.append(f"EXISTS (SELECT 1 FROM {self._reasons()} WHERE j.value = ? OR substr(j.value, 1, ?) = ?)")
            args += [NOT_INSPECTED, len(_NI_PREFIX), _NI_PREFIX]
        elif q.cls:
            where.append(f"EXISTS (SELECT 1 FROM {self._reasons()} WHERE j.value = ?)")
            args.append(q.cls)
        for col, v in (("d.recipe", q.recipe), ("d.model_version", q.model_version)):
            if v:
                where.append(f"{col} = ?")
                args.append(v)
        w, a = self._station_where(q)
        where += w
        args += a
        # A unit has a current review exactly when it has any review (a change supersedes, never deletes), so
        # "pending" needs one index probe per unit.
        if q.status == "pending":
            where.append(f"NOT EXISTS (SELECT 1 FROM {self.REVIEWS} r WHERE r.container_id = {self.KEY})")
        elif q.status == "escalated":
            where.append(f"EXISTS (SELECT 1 FROM {self.REVIEWS} r WHERE r.container_id = {self.KEY} AND "
                         f"r.verdict = 'escalate' AND NOT EXISTS (SELECT 1 FROM {self.REVIEWS} n "
                         "WHERE n.supersedes = r.review_id))")
        return where, args

    def _station_where(self, q: RecordQuery) -> tuple[list[str], list[Any]]:
        if q.line or q.station:
            raise RecordsError(f"{self.display}: the records of one station have no line or station to filter by")
        return [], []

    @property
    def _status(self) -> str:
        # The current review's verdict; the latest one should the data ever hold two (as a dict of them would).
        return (f"(SELECT r.verdict FROM {self.REVIEWS} r WHERE r.container_id = {self.KEY} AND NOT EXISTS "
                f"(SELECT 1 FROM {self.REVIEWS} n WHERE n.supersedes = r.review_id) "
                "ORDER BY r.review_id DESC LIMIT 1) AS review_status")

    def _reasons(self, alias: str = "j") -> str:
        return self.REASONS.format(a=alias)

    def _record(self, row: Any) -> dict[str, Any]:
        d = dict(row)
        queued = "review_status" in d
        status = d.pop("review_status", None)
        out = self._row(d)
        if queued:
            out["review_status"] = status
        return out

    # ---- the queue ---------------------------------------------------------------------------------------------

    def _page_sql(self, q: RecordQuery, descending: bool = False) -> tuple[str, list[Any]]:
        where, args = self._where(q)
        order = ", ".join(f"{c} DESC" if descending else c for c in self.QUEUE_ORDER)
        return (f"SELECT {self.KEY} AS k FROM {self.SOURCE} WHERE {' AND '.join(where)} ORDER BY {order} "
                "LIMIT ? OFFSET ?"), args

    def flagged(self, q: RecordQuery, limit: int | None = None, offset: int = 0,
                descending: bool = False) -> list[dict[str, Any]]:
        """Flagged units in queue order (decided_at_utc, sequence, recording order; all reversed with
        ``descending``), ``limit`` from ``offset``; each row with ``review_status`` (None: not reviewed).

        Two steps: the page's keys, then their rows. The first reads only what the filters need, so a page that
        skips many units (a "pending" page walks every reviewed unit before it) can be answered from the queue's
        index alone (PostgreSQL's index-only scan) instead of reading each skipped unit's row.
        """
        sql, args = self._page_sql(q, descending)
        keys = [r["k"] for r in self._rows(sql, [*args, self.NO_LIMIT if limit is None else int(limit), int(offset)])]
        got = self.rows(keys)
        return [got[k] for k in keys if k in got]  # rows are never deleted; the check only keeps a race harmless

    def count_flagged(self, q: RecordQuery) -> int:
        where, args = self._where(q)
        return int(self._rows(f"SELECT COUNT(*) AS n FROM {self.SOURCE} WHERE {' AND '.join(where)}", args)[0]["n"])

    def flagged_brief(self, q: RecordQuery) -> list[Brief]:
        """Every flagged unit the query selects, in recording order, with only what a sort by score needs."""
        where, args = self._where(q)
        rows = self._rows(f"SELECT {self.KEY} AS k, d.decided_at_utc, d.reasons, d.scores FROM {self.SOURCE} "
                          f"WHERE {' AND '.join(where)} ORDER BY {self.RECORDING_ORDER}", args)
        return [Brief(r["k"], r["decided_at_utc"], json.loads(r["reasons"]), json.loads(r["scores"])) for r in rows]

    def rows(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The rows (with ``review_status``) of these unit keys; unknown keys are left out."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(keys), _CHUNK):
            term, args = self._key_in(keys[i: i + _CHUNK])
            for r in self._rows(f"SELECT {self.COLUMNS}, {self._status} FROM {self.SOURCE} WHERE {term}", args):
                d = self._record(r)
                out[d["container_id"]] = d
        return out

    def filter_options(self) -> dict[str, list[str]]:
        """The recipes and model versions among flagged units (and the lines and stations, on a plant)."""
        recipes = [r["v"] for r in self._rows("SELECT DISTINCT recipe AS v FROM decisions WHERE accept = 0 "
                                              "ORDER BY recipe")]
        versions = [r["v"] for r in self._rows("SELECT DISTINCT model_version AS v FROM decisions WHERE accept = 0 "
                                               "AND model_version IS NOT NULL ORDER BY model_version")]
        return {"recipes": recipes, "model_versions": versions, **self._stations()}

    def _stations(self) -> dict[str, list[str]]:
        return {"lines": [], "stations": []}

    # ---- trends ------------------------------------------------------------------------------------------------

    def trend_counts(self, bucket: str, q: RecordQuery) -> TrendCounts:
        """Per period and model version: units inspected and rejected, rejected per reason class."""
        where, args = self._where(q, flagged=False)
        w = " AND ".join(["1 = 1", *where])
        period, mv = self._period(bucket), "COALESCE(d.model_version, '(none)')"
        totals = {(r["p"], r["m"]): (int(r["n"]), int(r["r"])) for r in self._rows(
            f"SELECT {period} AS p, {mv} AS m, COUNT(*) AS n, SUM(1 - d.accept) AS r FROM {self.SOURCE} WHERE {w} "
            "GROUP BY 1, 2", args)}
        per_class = [(r["p"], r["m"], r["c"], int(r["k"])) for r in self._rows(
            f"SELECT {period} AS p, {mv} AS m, CASE WHEN j.value LIKE ? THEN '{NOT_INSPECTED}' ELSE j.value END "
            f"AS c, COUNT(DISTINCT {self.KEY}) AS k FROM {self.SOURCE} CROSS JOIN {self._reasons()} "
            f"WHERE d.accept = 0 AND {w} GROUP BY 1, 2, 3", [_NI_PREFIX + "%", *args])]
        by_version = {r["m"]: (int(r["n"]), int(r["r"])) for r in self._rows(
            f"SELECT {mv} AS m, COUNT(*) AS n, SUM(1 - d.accept) AS r FROM {self.SOURCE} WHERE {w} GROUP BY 1",
            args)}
        return TrendCounts(totals, per_class, by_version)

    def chart_counts(self, bucket: str, q: RecordQuery, model_version: str | None = None) -> ChartCounts:
        """Per period: units the model decided (no not_inspected reason) and rejected, rejected per reason."""
        where, args = self._where(q, flagged=False)
        where.append(f"NOT EXISTS (SELECT 1 FROM {self._reasons('n')} WHERE n.value LIKE ?)")
        args.append(_NI_PREFIX + "%")
        if model_version is not None:
            where.append("COALESCE(d.model_version, '(none)') = ?")
            args.append(model_version)
        w, period = " AND ".join(where), self._period(bucket)
        totals = {r["p"]: (int(r["n"]), int(r["r"])) for r in self._rows(
            f"SELECT {period} AS p, COUNT(*) AS n, SUM(1 - d.accept) AS r FROM {self.SOURCE} WHERE {w} GROUP BY 1",
            args)}
        per_class = {(r["p"], r["c"]): int(r["k"]) for r in self._rows(
            f"SELECT {period} AS p, j.value AS c, COUNT(*) AS k FROM {self.SOURCE} CROSS JOIN {self._reasons()} "
            f"WHERE d.accept = 0 AND {w} GROUP BY 1, 2", args)}
        return ChartCounts(totals, per_class)

    def review_outcomes(self, q: RecordQuery) -> dict[str, dict[str, int]]:
        """Current reviews per model version (as the review recorded it) and verdict; with a time, line or station
        filter only those of units recorded here that it selects."""
        where, args = self._where(q, flagged=False)
        where.insert(0, f"NOT EXISTS (SELECT 1 FROM {self.REVIEWS} n WHERE n.supersedes = r.review_id)")
        # Joined with the decisions only to filter them: without a filter, reviews of units missing here count too.
        source = f"{self.REVIEWS} r" + (f" JOIN {self.SOURCE} ON {self._review_join}" if len(where) > 1 else "")
        sql = (f"SELECT COALESCE(NULLIF(r.model_version, ''), '(none)') AS m, r.verdict AS v, COUNT(*) AS k "
               f"FROM {source} WHERE {' AND '.join(where)} GROUP BY 1, 2")
        out: dict[str, dict[str, int]] = {}
        for r in self._rows(sql, args):
            out.setdefault(r["m"], {})[r["v"]] = int(r["k"])
        return out

    @property
    def _review_join(self) -> str:
        return f"{self.KEY} = r.container_id"

    def explain(self, q: RecordQuery, limit: int = 50) -> list[str]:
        """The query plan of the queue's first page (its keys; the rows are then read by primary key), and of
        reading one row with its review status: which indexes answer them."""
        sql, args = self._page_sql(q)
        keys = [r["k"] for r in self._rows(sql, [*args, limit, 0])]
        term, key_args = self._key_in(keys or ["-/-"])
        return [*self._explain(sql, [*args, limit, 0]),
                *self._explain(f"SELECT {self.COLUMNS}, {self._status} FROM {self.SOURCE} WHERE {term}", key_args)]

    @abstractmethod
    def _explain(self, sql: str, args: Sequence[Any]) -> list[str]: ...


# ---------------------------------------------------------------- SQLite: one station's store


class SqliteRecords(RecordsView):
    """A station's record store (``STORE/records.sqlite``, read-only) and its QA database ATTACHed read-only."""

    KEY = "d.container_id"
    REVIEWS = "qa.reviews"
    SOURCE = "decisions d"
    COLUMNS = "d.*"
    QUEUE_ORDER = ("d.decided_at_utc", "d.sequence", "d.rowid")
    RECORDING_ORDER = "d.rowid"
    REASONS = "json_each(d.reasons) AS {a}"
    NO_LIMIT = -1

    def __init__(self, store: RecordStore, review_db: Path) -> None:
        self.store = store
        self.display = str(store.path)
        self.data_dirs = [store.path.resolve()]
        self._db_uri = (store.path / DB_NAME).resolve().as_uri() + "?mode=ro"
        self._qa_uri = Path(review_db).resolve().as_uri() + "?mode=ro"
        self._frames = FrameRoots((store.path / FRAMES_DIR).resolve(), (store.path / MAPS_DIR).resolve(), "")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per query: any thread may ask, and nothing stays open between requests (a read
        # transaction left open would keep the station's WAL from being checkpointed).
        conn = sqlite3.connect(self._db_uri, uri=True, timeout=30.0)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=ON")
            conn.execute("ATTACH DATABASE ? AS qa", (self._qa_uri,))
            yield conn
        finally:
            conn.close()

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            with self._connect() as conn:
                return conn.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"{self.display}: cannot read the records ({e})") from None

    def _explain(self, sql: str, args: Sequence[Any]) -> list[str]:
        return [r["detail"] for r in self._rows("EXPLAIN QUERY PLAN " + sql, args)]

    def _period(self, bucket: str) -> str:
        fmt = {"day": "%Y-%m-%d", "hour": "%Y-%m-%dT%H:00"}[bucket]
        return f"strftime('{fmt}', d.decided_at, 'unixepoch')"

    def _key_in(self, keys: Sequence[str]) -> tuple[str, list[Any]]:
        return f"d.container_id IN ({','.join('?' * len(keys))})", list(keys)

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        return _row_dict(row)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.store.get(key)

    def frame_roots(self, rec: dict[str, Any]) -> FrameRoots:
        return FrameRoots(self._frames.frames, self._frames.maps, frames_dir_name(rec["container_id"]))


# ---------------------------------------------------------------- PostgreSQL: every station of a plant


def split_key(key: str) -> tuple[str, str] | None:
    """``"STATION/CONTAINER"`` -> (station, container); None when it is not a unit key."""
    station, sep, cid = key.partition("/")
    return (station, cid) if sep and station and cid else None


class PgRecords(RecordsView):
    """Every station's decisions in one PostgreSQL database (``pg_store``'s schema), read-only."""

    multi_station = True
    KEY = "(d.station_id || '/' || d.container_id)"
    REVIEWS = "reviews"
    SOURCE = "decisions d LEFT JOIN stations s ON s.station_id = d.station_id"
    COLUMNS = ", ".join([*(f"d.{c}" for c in (*_CHAINED, "row_hash", "station_id")), "s.line_id"])
    QUEUE_ORDER = ("d.decided_at_utc", "d.sequence", "d.station_id", "d.chain_pos")
    RECORDING_ORDER = "d.station_id, d.chain_pos"
    REASONS = "jsonb_array_elements_text(d.reasons::jsonb) AS {a}(value)"
    NO_LIMIT = None  # LIMIT NULL: no limit

    def __init__(self, url: str, frames_root: str | Path | None = None) -> None:
        self.target = parse_url(url, use_env=False)
        self.display = self.target.display
        root = frames_root if frames_root not in (None, "") else os.environ.get(FRAMES_ROOT_ENV) or None
        self.frames_root = None if root is None else Path(root).resolve()
        self.data_dirs = [] if self.frames_root is None else [self.frames_root]
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        if not self._rows("SELECT to_regclass('decisions') IS NOT NULL AND to_regclass('reviews') IS NOT NULL "
                          "AS ok")[0]["ok"]:
            self.close()
            raise StoreError(f"{self.display}: no vialinspect records and QA tables in this database (run "
                             "vialinspect db upgrade --db URL)")

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            from psycopg.rows import dict_row

            from ..pg_store import connect

            conn = connect(self.target, app="vialinspect review")
            conn.autocommit = True  # each query its own snapshot; no transaction left idle between requests
            conn.execute("SET default_transaction_read_only = on")
            conn.row_factory = dict_row
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        import psycopg

        assert "%" not in sql, "psycopg reads % as a placeholder"
        for attempt in (1, 2):  # a connection the server dropped (a restart) is opened again, once
            try:
                conn = self._conn()
                return conn.execute(sql.replace("?", "%s"), tuple(args)).fetchall()
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                self._drop()
                if attempt == 2:
                    raise StoreError(f"{self.display}: records not reachable ({_first_line(e)})") from None
            except psycopg.Error as e:
                raise StoreError(f"{self.display}: {type(e).__name__}: {_first_line(e)}") from None
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is gone already
                pass

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

    def _explain(self, sql: str, args: Sequence[Any]) -> list[str]:
        return [next(iter(r.values())) for r in self._rows("EXPLAIN " + sql, args)]

    def _period(self, bucket: str) -> str:
        fmt = {"day": "YYYY-MM-DD", "hour": 'YYYY-MM-DD"T"HH24:00'}[bucket]
        return f"to_char(to_timestamp(d.decided_at) AT TIME ZONE 'UTC', '{fmt}')"

    def _key_in(self, keys: Sequence[str]) -> tuple[str, list[Any]]:
        pairs = [p for p in map(split_key, keys) if p is not None]
        if not pairs:
            return "FALSE", []
        return (f"(d.station_id, d.container_id) IN ({','.join(['(?, ?)'] * len(pairs))})",
                [v for p in pairs for v in p])

    @property
    def _review_join(self) -> str:
        # Through the primary key (station_id, container_id), not the concatenated key.
        return ("d.station_id = split_part(r.container_id, '/', 1) AND "
                "d.container_id = substr(r.container_id, strpos(r.container_id, '/') + 1)")

    def _station_where(self, q: RecordQuery) -> tuple[list[str], list[Any]]:
        where, args = [], []
        if q.line:
            where.append("s.line_id = ?")
            args.append(q.line)
        if q.station:
            where.append("d.station_id = ?")
            args.append(q.station)
        return where, args

    def _stations(self) -> dict[str, list[str]]:
        rows = self._rows("SELECT station_id, line_id FROM stations ORDER BY station_id")
        return {"lines": sorted({r["line_id"] for r in rows if r["line_id"]}),
                "stations": [r["station_id"] for r in rows]}

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = _row_dict(row)  # JSON columns parsed, booleans, unit_id: as RecordStore.get gives them
        out["container_id"] = f"{row['station_id']}/{row['container_id']}"
        return out

    def get(self, key: str) -> dict[str, Any] | None:
        p = split_key(key)
        if p is None:
            return None
        rows = self._rows(f"SELECT {self.COLUMNS} FROM {self.SOURCE} WHERE d.station_id = ? AND d.container_id = ?",
                          p)
        return self._record(rows[0]) if rows else None

    def frame_roots(self, rec: dict[str, Any]) -> FrameRoots:
        station, cid = split_key(rec["container_id"]) or ("", "")
        name = frames_dir_name(cid)
        if not STATION_RE.fullmatch(station):
            return FrameRoots(None, None, name, f"refused: invalid station id {station!r} in the records")
        if self.frames_root is None:
            where = self._rows("SELECT host, spool FROM stations WHERE station_id = ?", (station,))
            held = f" (station {station} keeps them on {where[0]['host']}:{where[0]['spool']})" if where else ""
            return FrameRoots(None, None, name, f"frames not reachable: no frames folder is configured (review "
                                                f"--frames-root DIR or ${FRAMES_ROOT_ENV}){held}")
        base = self.frames_root / station
        frames, maps = base / FRAMES_DIR, base / MAPS_DIR
        if not frames.is_dir():
            return FrameRoots(None, None, name, f"frames not reachable at {frames} (station {station}'s folder in "
                                                "the shared frames folder)")
        return FrameRoots(frames.resolve(), maps.resolve(), name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
