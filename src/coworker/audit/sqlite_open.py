"""Opening a SQLite audit store: the connection (read-write or read-only), the schema made or
checked, the append-only guards re-armed, and the per-read connections of long scans
(:class:`~coworker.audit.store_sqlite.SQLiteStore`'s connection half)."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from coworker.audit.sqlite_migrate import file_version, migrate
from coworker.audit.sqlite_schema import (
    _KEY_DDL,
    GENERATED_MIN_SQLITE,
    SCHEMA_VERSION,
    SCHEMA_VERSIONS,
    _expected_indexes,
    _expected_triggers,
    _guard_problems,
    _normalise,
    _split_ddl,
    ddl,
)
from coworker.audit.store import StoreNotFound
from coworker.config import DEFAULT_AUDIT_PATH
from coworker.exceptions import AuditUnavailable

if TYPE_CHECKING:
    from coworker.audit.store_sqlite import SQLiteStore

__all__ = ["MMAP_SIZE", "connect", "read", "ro_uri"]

_log = logging.getLogger("coworker.audit")

MMAP_SIZE: Final = 1 << 30
"""Long scans (verify) map the file rather than copy each page: ~1.6x faster."""


def connect(store: SQLiteStore) -> sqlite3.Connection:
    """The store's own connection: opened, the schema made (or checked), the guards re-armed.

    Raises:
        StoreNotFound: a read-only (or ``create=False``) open of a missing file.
        AuditUnavailable: the file cannot be opened or initialised.
    """
    if (store.readonly or not store.create) and not os.path.exists(store.path):
        raise StoreNotFound(
            f"cannot open audit store {store.path!r}: no such file (wrong path or URL?); "
            "a read-only open creates nothing"
        )
    try:
        if store.readonly:
            conn = sqlite3.connect(
                ro_uri(store.path), uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            directory = os.path.dirname(os.path.abspath(store.path))
            if not os.path.isdir(directory):
                # Loud for a path someone typed; the embedded default's first use is normal.
                default = os.path.normpath(store.path) == DEFAULT_AUDIT_PATH
                # A store's first named chain makes its .chains directory: normal too.
                default = default or bool(store.chain and os.path.exists(store.store_path))
                _log.log(
                    logging.INFO if default else logging.WARNING,
                    "audit store %r: directory %r does not exist; creating it and a new, "
                    "EMPTY audit log (if you meant an existing log, the path or URL is wrong)",
                    store.path,
                    directory,
                )
            os.makedirs(directory, exist_ok=True)
            conn = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(store.busy_timeout * 1000)}")
        conn.text_factory = _lenient_text  # see read()
        if not store.readonly:
            mode = _switch_to_wal(conn, store.busy_timeout)
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch to WAL (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous = {store.synchronous}")
        if store.max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count = {int(store.max_page_count)}")
        _init_schema(store, conn)
    except (sqlite3.Error, OSError) as exc:
        raise AuditUnavailable(f"cannot open audit store {store.path!r}: {exc}") from exc
    return conn


def _switch_to_wal(conn: sqlite3.Connection, timeout: float) -> object:
    # SQLite answers a journal-mode switch that meets another connection's write lock on a
    # file still in rollback mode with SQLITE_BUSY at once, without calling the busy handler:
    # two processes opening a new store together hit it (one of them failed its open). Wait
    # for the lock as the busy handler would, up to busy_timeout.
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def new_file_version() -> int:
    """The schema version a new file gets with this SQLite library."""
    return SCHEMA_VERSION if sqlite3.sqlite_version_info >= GENERATED_MIN_SQLITE else 1


def _init_schema(store: SQLiteStore, conn: sqlite3.Connection) -> None:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'"
    ).fetchone()
    if exists is None:
        if store.readonly:
            raise sqlite3.OperationalError("not an audit store (no audit_records table)")
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have created it since we looked: every statement is
            # IF NOT EXISTS and the version is only set once, so both agree.
            created = new_file_version()
            for statement in _split_ddl(ddl(created)):
                conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO audit_meta (key, value) VALUES ('schema_version', ?)",
                (str(created),),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    version = file_version(conn)
    if version not in SCHEMA_VERSIONS:
        raise sqlite3.DatabaseError(
            f"audit store schema version {version}, this coworker reads "
            f"{', '.join(map(str, sorted(SCHEMA_VERSIONS)))}"
        )
    if exists is not None and not store.readonly:
        _rearm(store, conn, version)
        if version == 1 and store.upgrade and new_file_version() >= 2:
            version = migrate(store, conn)
    store.schema_version = version
    if not store.readonly:
        conn.execute(_KEY_DDL)


def _rearm(store: SQLiteStore, conn: sqlite3.Connection, version: int) -> None:
    # Somebody with the file can drop the append-only triggers, or replace them with
    # look-alikes of the same name that do nothing (or, in version 2, drop or alter the
    # indexes verify reads). Compare definitions, put ours back for the appends to come, and
    # say so loudly: what happened meanwhile is verify's job.
    problems = _guard_problems(conn, version)
    if not problems:
        return
    _log.error(
        "audit store %r: append-only guards tampered with: %s. Re-creating ours; run "
        "`coworker audit verify` on this file.",
        store.path,
        "; ".join(problems),
    )
    expected = {**_expected_triggers(version), **(_expected_indexes() if version >= 2 else {})}
    present = {
        r[0]: (r[1], _normalise(r[2] or ""))
        for r in conn.execute(
            "SELECT name, type, sql FROM sqlite_master WHERE type IN ('trigger', 'index')"
        )
    }
    conn.execute("BEGIN IMMEDIATE")
    try:
        for name, definition in expected.items():
            if name in present and present[name][1] != definition:
                conn.execute(f'DROP {present[name][0].upper()} "{name}"')
        for statement in _split_ddl(ddl(version)):
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def read(
    store: SQLiteStore, query: str, params: tuple[Any, ...], *, mmap: bool = False
) -> Iterator[Any]:
    """The rows of ``query``, read on a connection of its own in one snapshot.

    A connection of its own per read, so that a long verify neither holds the writers' lock
    nor sees a half-written batch (WAL readers see one snapshot).

    Raises:
        AuditUnavailable: the file cannot be read.
    """
    try:
        if store.readonly:
            conn = sqlite3.connect(ro_uri(store.path), uri=True, isolation_level=None)
        else:
            conn = sqlite3.connect(store.path, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(store.busy_timeout * 1000)}")
        # A column rewritten as TEXT that is not UTF-8 (a hash or body CAST by hand) must
        # reach verify as a value of the wrong type, which it reports, not abort the read.
        conn.text_factory = _lenient_text
        if mmap:
            conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"audit store {store.path!r}: {exc}") from exc
    try:
        try:
            conn.execute("BEGIN")
            cursor = conn.execute(query, params)
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"audit store {store.path!r}: {exc}") from exc
        cursor.arraysize = 2048
        while True:
            try:
                rows = cursor.fetchmany()
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"audit store {store.path!r}: {exc}") from exc
            if not rows:
                break
            yield from rows
    finally:
        conn.close()


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def ro_uri(path: str) -> str:
    """A read-only URI: SQLite creates nothing, even a -wal/-shm file stays as it is."""
    return "file:" + quote(os.path.abspath(path)) + "?mode=ro"
