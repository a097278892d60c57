"""The embedded audit store: an append-only, hash-chained log in one SQLite file (the default).

Layout (schema version 2; :mod:`coworker.audit.sqlite_schema` has the definitions)::

    audit_records(seq INTEGER PRIMARY KEY, prev_hash BLOB, hash BLOB, body BLOB,
                  kind, category, operation, doctype, flow_id, user_id, agent_id, span_id,
                  time)  -- GENERATED ALWAYS AS (json_extract(body)) VIRTUAL, indexed
    audit_payloads(seq INTEGER PRIMARY KEY, payload BLOB)
    audit_meta(key TEXT PRIMARY KEY, value TEXT)

``seq``, ``prev_hash``, ``hash`` and ``body`` are exactly what the chain hashed (``seq`` at
least 1). The query columns are computed by SQLite from the body, so none can differ from it;
``verify`` compares the table's, indexes' and triggers' definitions with ours. Version 1 files
(plain columns the writer copied) are verified column by column and migrated on a read-write
open (:mod:`coworker.audit.sqlite_migrate`). Payloads live in their own table, which is *not*
append-only, so that a payload can be erased without touching the chain (the body keeps its
digest, and ``verify`` re-hashes every payload still there).

Append-only in the database itself: triggers reject ``UPDATE`` and ``DELETE`` on
``audit_records`` and any insert that is not the next seq (which also refuses ``INSERT OR
REPLACE`` of an earlier seq and upserts). The owner of the file can drop or replace them: a
read-write open compares their definitions with ours, logs an ERROR naming each one that is
missing, altered or foreign, and re-creates ours; ``verify`` reports the same, read-only. An
append also checks that every row it inserted is there (a foreign ``RAISE(IGNORE)`` trigger
would drop rows silently).

Durability: WAL journal; ``synchronous=FULL`` by default, which fsyncs the WAL on every
commit, so a record whose append returned survives a process crash *and* a power loss or OS
crash. ``synchronous=NORMAL`` (URL ``?synchronous=normal``) fsyncs only at checkpoints: still
safe against a process crash (SIGKILL), and the file is never corrupted, but the last
transactions before a power loss may be rolled back. Writers serialize with
``BEGIN IMMEDIATE`` and a busy timeout, across threads (one lock per store) and processes (the
SQLite write lock).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

from coworker.audit import _fork, erasure, sqlite_integrity, sqlite_open, sqlite_reads
from coworker.audit.chain import Prepared, check_chain_name, genesis, prepare
from coworker.audit.erasure import KeyStore
from coworker.audit.sqlite_append import append_in_txn
from coworker.audit.sqlite_erasure import _erase_in_txn, _shredding
from coworker.audit.sqlite_integrity import CANDIDATE_FLAG
from coworker.audit.sqlite_schema import (  # noqa: F401  (_DDL, _split_ddl...: benchmarks, tests)
    _COLUMNS,
    _DDL,
    _ERASURE_KINDS,
    _HEAD,
    _INSERT,
    _KEY_DDL,
    SCHEMA_VERSION,
    _column,
    _expected_triggers,
    _guard_problems,
    _normalise,
    _row,
    _split_ddl,
    column_sql,
)
from coworker.audit.store import (
    Finding,
    Head,
    StoredRecord,
)
from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

# OFF is refused: an audit store that can lose committed records on a crash is not one.
_SYNCHRONOUS: Final = frozenset({"NORMAL", "FULL", "EXTRA"})


CHAINS_SUFFIX: Final = ".chains"
"""Named chains of the store ``<path>`` live in ``<path>.chains/<name>.db``."""


def chain_file(path: str, chain: str) -> str:
    """The file that holds ``chain`` of the SQLite store at ``path`` (``path`` itself for the
    default chain)."""
    if not chain:
        return path
    return os.path.join(path + CHAINS_SUFFIX, check_chain_name(chain) + ".db")


class SQLiteStore:
    """An :class:`~coworker.audit.store.AuditStore` in a SQLite file.

    Safe to share between threads; several processes may append to the same file.

    Args:
        path: the database file; its directory is created if missing (logged as a WARNING:
            a mistyped path would otherwise start a new, empty chain unnoticed).
        synchronous: ``FULL`` (default: durable across power loss) or ``NORMAL`` (durable
            across process crashes only); see the module docstring.
        busy_timeout: seconds a writer waits for another process's write lock before the
            append fails with :class:`~coworker.AuditUnavailable`.
        readonly: open the file read-only (for verify/query/status): nothing is created,
            re-armed or written, a missing file is :class:`~coworker.AuditUnavailable`, and
            every append fails.
        max_page_count: cap the database size in pages (``PRAGMA max_page_count``); an
            append that would grow past it fails as if the disk were full.
        create: make a new store when the file does not exist (``False``: that is
            :class:`~coworker.audit.store.StoreNotFound`, as for ``coworker audit correct``).
        encrypt_payloads: keep captured payloads AES-GCM encrypted under per-subject keys
            (:mod:`coworker.audit.erasure`); default: when ``cryptography`` is installed.
        subject_field: the body field whose value names a payload's data-key subject.
        keystore: where data keys live (a KMS); default: the ``audit_keys`` table here.
        upgrade: migrate a schema version 1 file to version 2 on a read-write open (default;
            :mod:`coworker.audit.sqlite_migrate`); ``False`` keeps it at version 1, e.g. while
            an older coworker still reads it (version 2 files need coworker with this schema).

    Raises:
        ConfigError: a bad parameter.
        AuditUnavailable: the file cannot be opened or initialised.
    """

    schema_version: int
    """The file's schema version (:data:`~coworker.audit.sqlite_schema.SCHEMA_VERSIONS`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 10.0,
        readonly: bool = False,
        max_page_count: int | None = None,
        create: bool = True,
        encrypt_payloads: bool | None = None,
        subject_field: str = "user_id",
        keystore: KeyStore | None = None,
        chain: str = "",
        upgrade: bool = True,
    ) -> None:
        sync = synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise ConfigError(f"synchronous={synchronous!r} must be one of {sorted(_SYNCHRONOUS)}")
        if busy_timeout < 0:
            raise ConfigError(f"busy_timeout={busy_timeout!r} must not be negative")
        try:
            self.chain = check_chain_name(chain)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.store_path = os.fspath(path)
        # A named chain is a file of its own (its own write lock, seq and head) beside the
        # store's: <path>.chains/<name>.db; its genesis binds its name (chain.genesis).
        self.path = chain_file(self.store_path, self.chain)
        self._first_prev = genesis(self.chain)
        self.synchronous = sync
        self.busy_timeout = busy_timeout
        self.readonly = readonly
        self.max_page_count = max_page_count
        self.create = create
        if encrypt_payloads is None:
            encrypt_payloads = _have_cryptography()
        self.encrypt_payloads = encrypt_payloads
        self.subject_field = subject_field
        self.keystore = keystore
        self.upgrade = upgrade
        self.schema_version = 0  # set by the open
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._identity: tuple[int, int] | None = None
        self._wal: tuple[int, int] | None = None  # the -wal file this connection writes
        # The hash of the last record this store appended: an append that finds it at the
        # head needs no seal check (coworker.audit.sqlite_append).
        self._own_head: bytes | None = None
        self._closed = False
        _fork.register(self)
        _fork.hold_across_fork(self)
        if self.chain and not readonly:
            # A named chain is registered in the default chain before its first record
            # (coworker.audit.chain_registry): deleted whole, it is then named vanished.
            from coworker.audit.chain_registry import open_sqlite_chain

            open_sqlite_chain(self, self._open)
        else:
            self._open()

    def _open(self) -> None:
        with self._lock:
            self._connection()

    def _fork_lock(self) -> threading.Lock:
        # Held by the forking thread across a fork: no transaction of ours is open in it.
        return self._lock

    def _after_fork_in_child(self) -> None:
        # Fresh, in case the fork could not wait for an append; the connection is the
        # parent's (SQLite: never use or close one across a fork), the child opens its own.
        self._lock = threading.Lock()
        _fork.orphan(self._conn)
        self._conn = None

    @property
    def CANDIDATE_FLAG(self) -> str | None:
        """What the parallel verifier computes per row for :meth:`integrity_findings`: the
        SQL flag of a version 1 file, ``None`` for version 2 (nothing to check per row; the
        workers select the bodies that may commit to a payload in either)."""
        return CANDIDATE_FLAG if self.schema_version < 2 else None

    # -- connections (coworker.audit.sqlite_open) ---------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        # Called with self._lock held. A connection must not cross a fork: reopen in the child.
        if self._closed:
            raise AuditUnavailable(f"audit store {self.path!r} is closed")
        pid = os.getpid()
        if self._conn is None or self._pid != pid:
            if self._identity is not None:
                self._check_identity()  # a reconnect must find the very file it wrote
            self._conn = sqlite_open.connect(self)
            self._pid, self._wal, self._own_head = pid, None, None
            if self._identity is None and not self.readonly:
                self._identity = _file_identity(self.path)
                # From now on the file exists: a reconnect (a forked child) that finds it
                # gone must fail, not make a new, empty chain that would verify as intact.
                self.create = False
        return self._conn

    def _check_identity(self) -> None:
        # The file (or its -wal alone; kept while a connection is open: our first commit's
        # inode) deleted or replaced: SQLite commits into the unlinked inode, records lost.
        db = _file_identity(self.path)
        if db != self._identity:
            self._refuse_moved("", db)
        if self._pid == os.getpid():  # not a reconnect's check: this connection has a -wal
            wal = _file_identity(self.path + "-wal")
            if self._wal is None:
                self._wal = wal
            elif wal != self._wal:
                self._refuse_moved(" -wal", wal)

    def _refuse_moved(self, name: str, now: tuple[int, int] | None) -> None:
        what = "deleted" if now is None else "replaced by another file"
        raise AuditUnavailable(
            f"audit store {self.path!r}: the{name} file was {what} while this process had "
            "it open; coworker will not write into the unlinked file or start a new, empty "
            "chain in its place (restore the file, or configure another store)"
        )

    # -- the AuditStore protocol -------------------------------------------------------------
    def append(
        self,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None = None,
    ) -> list[StoredRecord]:
        """Seal and durably write ``entries`` in one transaction; see
        :class:`~coworker.audit.store.AuditStore`.

        Raises:
            AuditUnavailable: nothing was written (read-only file, disk full, lock timeout...).
        """
        if not entries:
            return []
        sealing = (
            self.encrypt_payloads and payloads is not None and payloads.count(None) != len(payloads)
        )
        try:
            # Canonicalise before the lock (less time holding it), unless payloads are to be
            # sealed: their digests are only known inside the transaction.
            prepared = None if sealing else prepare(entries)
        except ValueError as exc:
            raise AuditUnavailable(f"audit store {self.path!r}: unencodable record: {exc}") from exc
        with self._lock:
            conn = self._connection()
            try:
                # IMMEDIATE takes the write lock before we read the head: a deferred
                # transaction that upgrades from read to write gets SQLITE_BUSY at once,
                # ignoring the busy timeout, and two writers could read the same head.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    sealed = self._append_in_txn(conn, entries, payloads, prepared)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise AuditUnavailable(
                    f"audit store {self.path!r}: append of {len(entries)} record(s) failed: {exc}"
                ) from exc
            # After the commit: a file deleted or replaced at any time before it means these
            # records are not in the store at this path (one stat, ~1 us).
            self._check_identity()
            return sealed

    def _append_in_txn(
        self,
        conn: sqlite3.Connection,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None,
        prepared: list[Prepared] | None = None,
    ) -> list[StoredRecord]:
        # Called with the lock held, inside BEGIN IMMEDIATE (coworker.audit.sqlite_append).
        return append_in_txn(self, conn, entries, payloads, prepared)

    # -- erasure (issue 15) ------------------------------------------------------------------
    def key_for(self, subject: str) -> bytes | None:
        """The data key of ``subject``, or ``None`` (none made yet, or destroyed)."""
        if self.keystore is not None:
            return self.keystore.get_key(subject)
        try:
            rows = list(self._read("SELECT key FROM audit_keys WHERE subject = ?", (subject,)))
        except AuditUnavailable:
            return None  # a store from before encrypted payloads: no key table
        return bytes(rows[0][0]) if rows and isinstance(rows[0][0], bytes) else None

    def plaintext(self, record: StoredRecord) -> bytes | None:
        """The readable payload of ``record``: decrypted, or as stored when not encrypted."""
        return erasure.plaintext(record, self.key_for)

    def delete_payloads(self, seqs: Sequence[int]) -> bool:
        """Delete the payload rows of ``seqs`` (a purge; the records stay), overwriting the
        freed bytes and truncating the WAL as :meth:`erase` does.

        Returns:
            ``False`` when another reader kept the WAL from being truncated.

        Raises:
            AuditUnavailable: nothing was deleted.
        """
        with self._lock:
            conn = self._connection()
            try:
                _, truncated = _shredding(
                    conn,
                    lambda c: c.executemany(
                        "DELETE FROM audit_payloads WHERE seq = ?", [(s,) for s in seqs]
                    ),
                )
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"audit store {self.path!r}: purge failed: {exc}") from exc
        return truncated

    def erase(self, subject: str, reason: str, *, by: str | None = None) -> erasure.Erased:
        """Destroy ``subject``'s payloads and data key and append the erasure record.

        One transaction appends the record and deletes the payload rows (encrypted ones, and
        plain ones of stores written without encryption) and the key row. Deleted bytes are
        overwritten (``PRAGMA secure_delete``) and the WAL is checkpointed and truncated, so
        neither the key nor the ciphertext stays readable in the file or its ``-wal``.

        Raises:
            ErasureRefused: a legal hold covers the subject; nothing was changed.
            AuditUnavailable: nothing was erased.
        """
        by_subject = (
            f"{column_sql(self.subject_field, self.schema_version)} = ?"
            if self.subject_field in _COLUMNS
            else f"json_extract(CAST(r.body AS TEXT), '$.{self.subject_field}') = ?"
        )
        with self._lock:
            conn = self._connection()
            try:

                def work(conn: sqlite3.Connection) -> tuple[Any, list[int]]:
                    return _erase_in_txn(conn, subject, reason, by, by_subject, self._append_in_txn)

                (record, seqs), truncated = _shredding(conn, work)
            except sqlite3.Error as exc:
                raise AuditUnavailable(
                    f"audit store {self.path!r}: erase of {subject!r} failed: {exc}"
                ) from exc
        erasure.forget_keys()
        if self.keystore is not None:
            self.keystore.destroy_key(subject)
        return erasure.Erased(record, tuple(seqs), wal_truncated=truncated)

    def head(self) -> Head | None:
        """See :class:`~coworker.audit.store.AuditStore`."""
        with self._lock:
            try:
                row = self._connection().execute(_HEAD).fetchone()
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"audit store {self.path!r}: {exc}") from exc
        return Head(row[0], row[1]) if row is not None else None

    def iter_from(self, seq: int = 1) -> Iterator[StoredRecord]:
        """See :class:`~coworker.audit.store.AuditStore`. Reads one consistent snapshot."""
        query = (
            "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM audit_records r "
            "LEFT JOIN audit_payloads p ON p.seq = r.seq WHERE r.seq >= ? ORDER BY r.seq"
        )
        for row in self._read(query, (max(seq, 1),)):
            yield StoredRecord(row[0], row[1], row[2], row[3], row[4])

    def iter_chain(self, seq: int = 1) -> Iterator[tuple[int, bytes, bytes, bytes]]:
        """Yield ``(seq, prev_hash, hash, body)`` tuples in order: what verify needs, fast."""
        return self._read(
            "SELECT seq, prev_hash, hash, body FROM audit_records WHERE seq >= ? ORDER BY seq",
            (max(seq, 1),),
            mmap=True,
        )

    def count(self) -> int:
        """Number of records (for progress bars)."""
        head = self.head()
        return head.seq if head is not None else 0

    def search(
        self,
        filters: Mapping[str, str | None],
        *,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        after: int = 0,
    ) -> Iterator[StoredRecord]:
        """Records matching the filters, in seq order, using the indexed columns.

        Args:
            filters: keys ``flow_id``, ``user``, ``agent``, ``doctype``, ``operation``,
                ``category``, ``kind``, ``run_id``, ``span_id``; ``None`` values are ignored.
            since: RFC 3339 lower bound (inclusive) on the record time.
            until: RFC 3339 upper bound (exclusive) on the record time.
            limit: at most this many records.
            after: only records with a seq above this (an incremental reader's cursor).

        The caller should re-check the decoded body: the columns are unhashed copies.
        """
        query, params = sqlite_reads.search_query(
            self.schema_version, filters, since, until, limit, after
        )
        for row in self._read(query, params):
            yield StoredRecord(row[0], row[1], row[2], row[3], row[4])

    def open_intents(self) -> list[int]:
        """Seqs of intent records with no later outcome for the same span (in doubt)."""
        query = sqlite_reads.open_intents_query(self.schema_version)
        return [row[0] for row in self._read(query, ())]

    def _read(self, query: str, params: tuple[Any, ...], *, mmap: bool = False) -> Iterator[Any]:
        # A connection of its own per read (coworker.audit.sqlite_open.read).
        return sqlite_open.read(self, query, params, mmap=mmap)

    def storage_findings(self) -> list[Finding]:
        """What SQLite's ``PRAGMA integrity_check`` finds in the log's tables and their index
        b-trees (``coworker audit verify --deep``): an index entry cut out or added by a page
        edit, under coworker's definition, that hides a record from a query. Reads only.
        """
        return sqlite_integrity.storage_findings(self)

    def integrity_findings(
        self,
        head: Head | None,
        *,
        candidates: Sequence[int] | None = None,
        committed: Sequence[int] | None = None,
    ) -> list[Finding]:
        """See :class:`~coworker.audit.store.IntegrityChecked`: columns against bodies,
        payloads against digests, rows outside ``1..head``, the triggers' definitions.

        Args:
            head: the last record to check.
            candidates: the seqs :data:`CANDIDATE_FLAG` selects (a version 1 file), in
                order, when the caller computed them already (the parallel verifier, in its
                hashing scan).
            committed: likewise, the seqs whose body may commit to a payload
                (:func:`~coworker.audit._verify_parallel.committing`).
        """
        return sqlite_integrity.integrity_findings(self, head, candidates, committed)

    def tree_table(self) -> Any:
        """The Merkle tree's table: ``<file>.tree`` beside the chain's file (never the log's
        write lock); in memory for a read-only store (proofs work, nothing is kept)."""
        from coworker.audit import tlog

        if self.readonly:
            return tlog.MemoryTable()
        return tlog.SQLiteTable(self.path + tlog.TREE_SUFFIX, busy_timeout=self.busy_timeout)

    def erased_payloads(self) -> dict[int, Any]:
        """Erased payloads by record seq, from the erasure and purge records: in a version 2
        file read through their partial index (a search by ``kind`` would compute the
        column from every body), in a version 1 file by a search of the ``kind`` column."""
        from coworker.audit.erasure import payload_states, searched_erasures

        if self.schema_version < 2:
            return searched_erasures(self.search)
        rows = self._read(sqlite_reads.ERASURES, ())
        return payload_states(StoredRecord(r[0], r[1], r[2], r[3], r[4]) for r in rows)

    def chains(self) -> list[str]:
        """The chains of this store: ``""`` (the store's own file), then every
        ``<path>.chains/<name>.db``, by name."""
        names = [""] if os.path.exists(self.store_path) else []
        directory = self.store_path + CHAINS_SUFFIX
        if os.path.isdir(directory):
            for entry in sorted(os.listdir(directory)):
                name, ext = os.path.splitext(entry)
                if ext != ".db":
                    continue
                try:
                    names.append(check_chain_name(name))
                except ValueError:
                    continue
        return names

    def close(self) -> None:
        """Close the connection; idempotent."""
        with self._lock:
            self._closed = True
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, synchronous={self.synchronous!r})"


def _have_cryptography() -> bool:
    import importlib.util

    return importlib.util.find_spec("cryptography") is not None


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)
