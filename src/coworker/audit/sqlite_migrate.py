"""Migrate a SQLite audit store from schema version 1 (plain query columns copied by the writer)
to version 2 (query columns generated from the hashed body, :mod:`coworker.audit.sqlite_schema`).

SQLite cannot turn a plain column into a generated one, so the table is rebuilt: the old one is
renamed, the new one created under the name, every row's ``seq``, ``prev_hash``, ``hash`` and
``body`` copied as they are (the chained bytes, untouched), the old table dropped, the indexes
and triggers created. All of it is one transaction: a process killed at any point leaves the
version 1 file as it was (the WAL holds the uncommitted rebuild, which SQLite discards).

The migration never changes what a query returns: it runs only on a file whose guards are
coworker's and whose every old column equals what the new definition derives from the body.
Anything else (a column edited by hand, a row outside ``1..head``, a body that is not JSON)
leaves the file at version 1, where verify keeps reporting it, and logs an ERROR.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

from coworker.audit.sqlite_schema import (
    _COLUMNS,
    _GUARDS,
    _INDEXES,
    _INDEXES_V2,
    _TABLE_V2,
    _guard_problems,
    _split_ddl,
    column_sql,
)

if TYPE_CHECKING:
    from coworker.audit.store_sqlite import SQLiteStore

__all__ = ["migrate"]

_log = logging.getLogger("coworker.audit")

_OLD = "audit_records_v1"

_DIFFER = (
    f"SELECT count(*), min(o.seq) FROM {_OLD} o LEFT JOIN audit_records n ON n.seq = o.seq "
    "WHERE n.seq IS NULL OR "
    + " OR ".join(f"o.{c} IS NOT {column_sql(c, 2, 'n')}" for c in (*_COLUMNS, "time"))
)


def file_version(conn: sqlite3.Connection) -> int | None:
    """The schema version the file's ``audit_meta`` says (``None``: none)."""
    row = conn.execute("SELECT value FROM audit_meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else int(row[0])


def migrate(store: SQLiteStore, conn: sqlite3.Connection) -> int:
    """Rebuild a version 1 file as version 2 if it can be done without changing any query's
    answer; the file's version afterwards.

    Raises:
        sqlite3.Error: the file could not be read or locked (nothing was changed).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = file_version(conn)
        if version != 1:  # another process migrated it while we waited for the lock
            conn.execute("COMMIT")
            return version or 1
        problems = _guard_problems(conn, 1)
        if problems:
            refused: str | None = f"its guards are not coworker's ({'; '.join(problems)})"
        else:
            (count,) = conn.execute("SELECT count(*) FROM audit_records").fetchone()
            _log.info(
                "audit store %r: migrating %d record(s) to schema version 2 (query columns "
                "generated from the hashed body; one transaction)",
                store.path,
                count,
            )
            try:
                refused = _rebuild(conn)
            except sqlite3.Error as exc:
                # A row the new table refuses (seq below 1, a body that is not JSON), or the
                # disk filling up: the file stays as it was, and the store works at version 1.
                refused = str(exc)
        if refused is None:
            conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if refused is not None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        _log.error(
            "audit store %r: not migrated to schema version 2, it stays at version 1: %s; run "
            "`coworker audit verify` on this file",
            store.path,
            refused,
        )
        return 1
    _log.info("audit store %r: migrated to schema version 2", store.path)
    return 2


def _rebuild(conn: sqlite3.Connection) -> str | None:
    """The rebuild inside the caller's transaction: ``None`` when done, else why not (the
    caller rolls back)."""
    conn.execute(f"ALTER TABLE audit_records RENAME TO {_OLD}")
    conn.execute(_TABLE_V2)
    # The indexes come after the copy (one sorted build each, not a b-tree insert per row);
    # SQLite computes the generated columns, and refuses a body that is not JSON, as it copies.
    conn.execute(
        "INSERT INTO audit_records (seq, prev_hash, hash, body) "
        f"SELECT seq, prev_hash, hash, body FROM {_OLD} ORDER BY seq"
    )
    differ, first = conn.execute(_DIFFER).fetchone()
    if differ:
        return (
            f"{differ} record(s) have query columns that differ from their hashed body "
            f"(first: seq {first}); the migration would change what a query finds"
        )
    conn.execute(f"DROP TABLE {_OLD}")
    for statement in _split_ddl(_INDEXES + _INDEXES_V2 + "\n" + _GUARDS):
        conn.execute(statement)
    conn.execute("UPDATE audit_meta SET value = '2' WHERE key = 'schema_version'")
    return None
