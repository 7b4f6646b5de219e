"""One connection interface for the QA database on SQLite and on PostgreSQL.

The QA modules (audit, users, promotion, review) write their SQL once, in SQLite's dialect with ``?``
placeholders, portable otherwise (``ON CONFLICT``, ``TRUE``, the column ``"user"`` quoted: a reserved word in
PostgreSQL). Both connection classes here run that SQL and offer the same few extras, so that no query is written
twice:

- ``execute(sql, params)`` returning a cursor with ``fetchone()``/``fetchall()``/iteration, whose rows read as
  ``row["col"]`` and ``row[0]`` (``sqlite3.Row`` on SQLite, :class:`Row` on PostgreSQL);
- ``in_transaction``;
- ``begin_write()``: a write transaction that excludes every other QA writer from its start, so that reading the
  chain head and appending cannot interleave (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: READ COMMITTED plus a
  transaction-level advisory lock, see :data:`QA_WRITE_LOCK`);
- ``begin_snapshot()``: a read-only transaction that sees one snapshot throughout (for ``verify``);
- ``sequence_used(table)``: the highest ``seq``/``review_id`` ever taken in a table, deleted rows included
  (SQLite's ``sqlite_sequence``; PostgreSQL's ``qa_sequence``, kept by a trigger in the same transaction).
"""

from __future__ import annotations

import re
import sqlite3
from functools import lru_cache
from typing import Any

# pg_advisory_xact_lock key of the QA tables' writers ("viaQ"): every write transaction takes it first, the
# PostgreSQL twin of SQLite's BEGIN IMMEDIATE. An advisory lock needs no privilege on the tables (LOCK TABLE ...
# IN EXCLUSIVE MODE would need UPDATE on audit, which no role gets). A writer that skipped it could not fork the
# chain either: both would take the same seq, and audit's primary key refuses the second.
QA_WRITE_LOCK = 0x76696151


class SqliteConnection(sqlite3.Connection):
    """``sqlite3.connect(..., factory=SqliteConnection)``: a plain sqlite3 connection plus the extras above."""

    engine = "sqlite"

    def begin_write(self) -> None:
        self.execute("BEGIN IMMEDIATE")

    def begin_snapshot(self) -> None:
        self.execute("BEGIN")  # deferred: the snapshot is taken at the first read and kept to the end

    def sequence_used(self, table: str) -> int | None:
        row = self.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        return None if row is None else int(row[0])


class Row(tuple):
    """A result row read by position or by column name, as ``sqlite3.Row`` is."""

    _names: dict[str, int]

    def __new__(cls, values: Any, names: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return super().__getitem__(self._names[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any):
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: Row(values, names)


_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|[?%]")


@lru_cache(maxsize=512)
def to_pg(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s``, and a literal ``%`` to ``%%`` (psycopg reads ``%`` everywhere, string
    literals included); a ``?`` inside a string literal, a quoted name or a comment stays as it is."""

    def sub(m: re.Match[str]) -> str:
        t = m.group(0)
        return "%s" if t == "?" else t.replace("%", "%%")

    return _TOKEN.sub(sub, sql)


class PgConnection:
    """A psycopg 3 connection in autocommit mode (transactions are the explicit BEGIN ... COMMIT of the callers,
    as on SQLite with ``isolation_level=None``) that runs the QA modules' SQLite-dialect SQL."""

    engine = "postgresql"

    def __init__(self, raw: Any) -> None:
        raw.autocommit = True
        raw.row_factory = _row_factory
        self.raw = raw

    def execute(self, sql: str, params: Any = ()) -> Any:
        # Always with a tuple, even an empty one: psycopg then reads every % as a placeholder or %% (to_pg's).
        return self.raw.execute(to_pg(sql), tuple(params))

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def begin_write(self) -> None:
        # READ COMMITTED (whatever the server's default): each statement after the lock sees what the previous
        # holder committed. REPEATABLE READ would keep the snapshot taken before the lock was granted.
        self.raw.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (QA_WRITE_LOCK,))

    def begin_snapshot(self) -> None:
        self.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def sequence_used(self, table: str) -> int | None:
        row = self.execute("SELECT seq FROM qa_sequence WHERE name = ?", (table,)).fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        self.raw.close()


Connection = SqliteConnection | PgConnection  # what ReviewDB.connect() and .transaction() yield
RowLike = sqlite3.Row | Row | dict[str, Any]  # a row, or a dict with its columns
