"""A durable local spool (SQLite) for audit entries the shared store cannot take right now.

When the PostgreSQL server is unreachable, :class:`~coworker.audit.store_postgres.PostgresStore`
writes the *unsealed* entries here (they get their ``seq`` and hash only when they reach the
shared log, because only the shared log knows its head) and ships them, oldest first, when the
server is back. The spool is a plain SQLite file in WAL mode with ``synchronous=FULL``: an entry
that :meth:`Spool.put` returned for survives a crash or a power loss.

Each spooled entry remembers the ``(seq, hash)`` under which a shipment was attempted. A
connection can die after ``COMMIT`` was sent and before its answer arrived; the shipper then
looks those records up in the shared log first, so an entry whose commit did go through is not
shipped twice.

Several processes on one host may share a spool file: SQLite serializes their writes, and an
advisory file lock (``<spool>.lock``) makes sure only one of them ships at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from coworker.audit import _fork

__all__ = ["Spool", "SpoolEntry", "SpoolStatus"]

_log = logging.getLogger("coworker.audit")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fields TEXT NOT NULL,
    payload BLOB,
    dedup_key BLOB,
    attempted BLOB NOT NULL DEFAULT x'',
    spooled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""

_ATTEMPT = struct.Struct("!q32s")  # (seq, hash) of one shipment attempt


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One entry waiting in the spool.

    Attributes:
        id: position in the spool (ships in ascending order).
        fields: the record fields, exactly as given to ``append`` (without ``seq``).
        payload: the separate payload bytes, or ``None``.
        dedup_key: the key that makes a second delivery a no-op (ingest), or ``None``.
        attempted: ``(seq, hash)`` under which a shipment of this entry was already tried.
        spooled_at: UNIX time the entry was spooled.
    """

    id: int
    fields: dict[str, Any]
    payload: bytes | None
    dedup_key: bytes | None
    attempted: tuple[tuple[int, bytes], ...]
    spooled_at: float


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    """What ``coworker audit status`` shows about a spool.

    Attributes:
        path: the spool file.
        depth: entries waiting to be shipped.
        oldest_spooled_at: UNIX time of the oldest waiting entry, or ``None``.
        last_shipped_at: UNIX time of the last shipment from this spool, or ``None``.
    """

    path: str
    depth: int
    oldest_spooled_at: float | None
    last_shipped_at: float | None


class Spool:
    """A durable FIFO of unsealed audit entries in a local SQLite file.

    Args:
        path: the spool file; its directory is created if needed.

    Raises:
        coworker.ConfigError: the file cannot be created or opened.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from coworker.exceptions import ConfigError

        self.path = str(Path(path))
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self._conn = self._open()
                break
            except sqlite3.OperationalError as exc:
                # Several processes creating the same spool at once: switching to WAL and
                # creating the tables take locks that ignore the busy timeout. Retry.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise ConfigError(
                        f"spool={self.path!r}: cannot open the spool file: {exc}"
                    ) from exc
                time.sleep(0.05)
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(
                    f"spool={self.path!r}: cannot open the spool file: {exc}"
                ) from exc
        try:
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            self._conn.close()
            raise ConfigError(f"spool={self.path!r}: cannot create its lock file: {exc}") from exc
        self._pid = os.getpid()
        self._mutex = threading.RLock()
        self._ship_mutex = threading.Lock()
        self._closed = False
        _fork.register(self)
        _fork.hold_across_fork(self)

    @property
    def _db(self) -> sqlite3.Connection:
        # Called with self._mutex held. A SQLite connection must not cross a fork: the child
        # opens its own (and never closes the parent's).
        if self._pid != os.getpid():
            _fork.orphan(self._conn)
            self._conn = self._open()
            self._pid = os.getpid()
        return self._conn

    def _fork_lock(self) -> threading.RLock:
        # Held by the forking thread: no spool transaction is open across a fork.
        return self._mutex

    def _after_fork_in_child(self) -> None:
        self._mutex = threading.RLock()
        self._ship_mutex = threading.Lock()
        # flock() locks belong to the open file description, which the child shares with the
        # parent: the child's shipping lock must be a description of its own.
        try:
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # pragma: no cover - the directory became unwritable
            _log.error("spool %s: no lock file of its own after a fork: %s", self.path, exc)

    def _open(self) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Unsealed records and their payloads wait here: readable by this user only (SQLite
        # gives the -wal and -shm files the database file's permissions).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a put() that returned is on disk even after a power loss.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    # -- writing -------------------------------------------------------------------------------
    def put(
        self,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None = None,
        dedup_keys: Sequence[bytes | None] | None = None,
        attempted: Sequence[Sequence[tuple[int, bytes]]] | None = None,
    ) -> None:
        """Durably add entries at the end of the spool, all or none.

        Args:
            entries: record fields without ``seq``.
            payloads: one payload (or ``None``) per entry.
            dedup_keys: one dedup key (or ``None``) per entry.
            attempted: per entry, ``(seq, hash)`` under which a write was already attempted.

        Raises:
            sqlite3.Error: the spool could not be written (nothing was added).
        """
        now = time.time()
        rows = [
            (
                json.dumps(dict(fields), separators=(",", ":"), ensure_ascii=False),
                payloads[i] if payloads is not None else None,
                dedup_keys[i] if dedup_keys is not None else None,
                b"".join(_ATTEMPT.pack(*a) for a in attempted[i]) if attempted is not None else b"",
                now,
            )
            for i, fields in enumerate(entries)
        ]
        with self._mutex, self._transaction():
            self._db.executemany(
                "INSERT INTO spool (fields, payload, dedup_key, attempted, spooled_at)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def note_attempt(self, attempts: Mapping[int, tuple[int, bytes]]) -> None:
        """Remember, before a shipment commits, the seq and hash each entry is shipped under.

        Args:
            attempts: spool entry id -> ``(seq, hash)`` it was sealed with for this shipment.
        """
        with self._mutex, self._transaction():
            self._db.executemany(
                # SQLite's || yields TEXT even for two BLOBs; a hash byte that is not UTF-8
                # then made every later peek() fail and the spooled records unshippable.
                "UPDATE spool SET attempted = CAST(attempted || ? AS BLOB) WHERE id = ?",
                [(_ATTEMPT.pack(*a), i) for i, a in attempts.items()],
            )

    def remove(self, ids: Sequence[int], *, shipped_at: float | None = None) -> None:
        """Drop shipped entries (and note the shipment time).

        Args:
            ids: the spool entry ids that are now in the shared log.
            shipped_at: when they were shipped (default: now).
        """
        if not ids:
            return
        with self._mutex, self._transaction():
            self._db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])
            self._db.execute(
                "INSERT INTO meta (k, v) VALUES ('last_shipped_at', ?)"
                " ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                (repr(shipped_at if shipped_at is not None else time.time()),),
            )

    # -- reading -------------------------------------------------------------------------------
    def peek(self, limit: int = 500) -> list[SpoolEntry]:
        """The oldest ``limit`` entries, in shipping order."""
        with self._mutex:
            rows = self._db.execute(
                # CAST: spool files written before the fix hold TEXT-typed attempts.
                "SELECT id, fields, payload, dedup_key, CAST(attempted AS BLOB), spooled_at"
                " FROM spool ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            SpoolEntry(
                id=row[0],
                fields=json.loads(row[1]),
                payload=row[2],
                dedup_key=row[3],
                attempted=tuple(
                    _ATTEMPT.unpack_from(row[4], i) for i in range(0, len(row[4]), _ATTEMPT.size)
                ),
                spooled_at=row[5],
            )
            for row in rows
        ]

    def depth(self) -> int:
        """Number of entries waiting to be shipped."""
        with self._mutex:
            return int(self._db.execute("SELECT count(*) FROM spool").fetchone()[0])

    def is_empty(self) -> bool:
        """``True`` when nothing waits (cheaper than :meth:`depth`)."""
        with self._mutex:
            return self._db.execute("SELECT 1 FROM spool LIMIT 1").fetchone() is None

    def status(self) -> SpoolStatus:
        """Depth, age of the oldest entry and time of the last shipment."""
        with self._mutex:
            depth, oldest = self._db.execute(
                "SELECT count(*), min(spooled_at) FROM spool"
            ).fetchone()
        last = self._get_meta("last_shipped_at")
        return SpoolStatus(self.path, int(depth), oldest, float(last) if last else None)

    @staticmethod
    def read_status(path: str | os.PathLike[str]) -> SpoolStatus:
        """:meth:`status` of a spool file, opened read-only (creates and changes nothing).

        Raises:
            sqlite3.Error: the file is not a readable spool.
        """
        uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=30.0)
        try:
            depth, oldest = db.execute("SELECT count(*), min(spooled_at) FROM spool").fetchone()
            row = db.execute("SELECT v FROM meta WHERE k = 'last_shipped_at'").fetchone()
        finally:
            db.close()
        return SpoolStatus(str(path), int(depth), oldest, float(row[0]) if row else None)

    # -- shipping lock -------------------------------------------------------------------------
    @contextlib.contextmanager
    def shipping(self) -> Iterator[bool]:
        """Hold the spool's shipping lock if it is free; yields whether it was acquired.

        Only one process (and one thread) ships a spool at a time, so entries leave in order.
        """
        if not self._ship_mutex.acquire(blocking=False):
            yield False
            return
        try:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._ship_mutex.release()

    def close(self) -> None:
        """Close the file; idempotent."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            if self._pid == os.getpid():
                self._conn.close()
            os.close(self._lock_fd)

    # -- internals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # BEGIN IMMEDIATE: take the write lock up front so the busy timeout applies.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _get_meta(self, key: str) -> str | None:
        with self._mutex:
            row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None
