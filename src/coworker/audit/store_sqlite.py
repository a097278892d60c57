"""The embedded audit store: an append-only, hash-chained log in one SQLite file (the default).

Layout (schema version 1)::

    audit_records(seq INTEGER PRIMARY KEY, prev_hash BLOB, hash BLOB, body BLOB,
                  kind, category, operation, doctype, outcome, flow_id, step_id, run_id,
                  user_id, agent_id, trace_id, span_id, time)
    audit_payloads(seq INTEGER PRIMARY KEY, payload BLOB)
    audit_meta(key TEXT PRIMARY KEY, value TEXT)

``seq``, ``prev_hash``, ``hash`` and ``body`` are exactly what the chain hashed; ``seq`` is
at least 1 (a ``CHECK`` in files created since it was added; every read skips anything
else). The other columns of ``audit_records`` are copies of body fields, indexed for
``coworker audit query``; ``verify`` checks that each equals the body (a column edited to hide
a record from a query is reported). Payloads (the redacted captured input/output) live in
their own table, which is *not* append-only, so that a payload can be erased without touching
the chain (the body keeps its digest, and ``verify`` re-hashes every payload still there).

Append-only in the database itself: triggers reject ``UPDATE`` and ``DELETE`` on
``audit_records``, and a ``BEFORE INSERT`` trigger rejects any insert whose seq is not the
next one, which also refuses ``INSERT OR REPLACE`` and upserts on an existing seq (``REPLACE``
deletes the old row without firing delete triggers unless ``recursive_triggers`` is on). The
owner of the file can drop or replace the triggers: a read-write open compares their
definitions (not only their names) with these, logs an ERROR naming each one that is
missing, altered or foreign, and re-creates ours; ``verify`` reports the same, read-only.
An append also checks that every row it inserted is there (a foreign ``RAISE(IGNORE)``
trigger would drop rows silently).

Durability: WAL journal; ``synchronous=FULL`` by default, which fsyncs the WAL on every
commit, so a record whose append returned survives a process crash *and* a power loss or OS
crash. ``synchronous=NORMAL`` (URL ``?synchronous=normal``) fsyncs only at checkpoints: still
safe against a process crash (SIGKILL), and the file is never corrupted, but the last
transactions before a power loss may be rolled back. Writers serialize with
``BEGIN IMMEDIATE`` and a busy timeout, across threads (one lock per store) and processes (the
SQLite write lock).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import quote

from coworker.audit import erasure
from coworker.audit.chain import Prepared, check_chain_name, genesis, prepare, seal
from coworker.audit.erasure import KeyStore
from coworker.audit.record import QUERY_FILTERS
from coworker.audit.store import (
    COLUMN_MISMATCH,
    GUARD,
    MAX_FINDINGS,
    OUT_OF_RANGE,
    PAYLOAD_MISMATCH,
    Finding,
    Head,
    StoredRecord,
    StoreNotFound,
    erased_seqs,
    payload_finding,
)
from coworker.config import DEFAULT_AUDIT_PATH
from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION: Final = 1
"""Version of the table layout, kept in ``audit_meta``."""

_log = logging.getLogger("coworker.audit")
_T = TypeVar("_T")

_MMAP_SIZE: Final = 1 << 30

_TRIGGERS: Final = (
    "audit_records_no_update",
    "audit_records_no_delete",
    "audit_records_append_only",
)

# OFF is refused: an audit store that can lose committed records on a crash is not one.
_SYNCHRONOUS: Final = frozenset({"NORMAL", "FULL", "EXTRA"})

# Body fields copied into plain indexed columns (column name = body key, except time).
_COLUMNS: Final = (
    "kind", "category", "operation", "doctype", "outcome", "flow_id", "step_id", "run_id",
    "user_id", "agent_id", "trace_id", "span_id",
)  # fmt: skip

_DDL: Final = f"""
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY CHECK (seq >= 1),
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    {", ".join(f"{c} TEXT" for c in _COLUMNS)},
    time TEXT
);
CREATE TABLE IF NOT EXISTS audit_payloads (seq INTEGER PRIMARY KEY, payload BLOB);
CREATE INDEX IF NOT EXISTS audit_records_flow ON audit_records(flow_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_user ON audit_records(user_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_agent ON audit_records(agent_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_doctype ON audit_records(doctype, seq);
CREATE INDEX IF NOT EXISTS audit_records_operation ON audit_records(operation, seq);
CREATE INDEX IF NOT EXISTS audit_records_category ON audit_records(category, seq);
CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records(time);
CREATE INDEX IF NOT EXISTS audit_records_span ON audit_records(span_id);
CREATE INDEX IF NOT EXISTS audit_records_intent ON audit_records(seq) WHERE kind = 'intent';
CREATE TRIGGER IF NOT EXISTS audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit_records is append-only: UPDATE is not allowed (write a correction)');
END;
CREATE TRIGGER IF NOT EXISTS audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit_records is append-only: DELETE is not allowed');
END;
CREATE TRIGGER IF NOT EXISTS audit_records_append_only BEFORE INSERT ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit_records is append-only: seq exists (INSERT OR REPLACE refused)')
    WHERE EXISTS (SELECT 1 FROM audit_records WHERE seq = NEW.seq);
    SELECT RAISE(ABORT, 'audit_records is append-only: seq must be the head seq + 1')
    WHERE NEW.seq <> COALESCE((SELECT MAX(seq) FROM audit_records), 0) + 1;
END;
"""

# Per-subject data keys of encrypted payloads (coworker.audit.erasure). Deliberately outside
# the append-only guards: erasing a subject deletes its row, and with it every payload sealed
# under the key. Created on existing stores too (it is not part of the chained schema).
_KEY_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS audit_keys "
    "(subject TEXT PRIMARY KEY, key BLOB NOT NULL, created TEXT NOT NULL)"
)

# The tables whose triggers are ours alone: any other trigger on them is reported.
_GUARDED_TABLES: Final = ("audit_records", "audit_payloads", "audit_meta")


def _normalise(statement: str) -> str:
    # SQLite keeps a CREATE statement as written, minus IF NOT EXISTS and the final ';'.
    text = " ".join(statement.split())
    return text.replace(" IF NOT EXISTS ", " ", 1).rstrip(";").strip()


def _expected_triggers() -> dict[str, str]:
    out: dict[str, str] = {}
    for statement in _split_ddl(_DDL):
        if statement.lstrip().startswith("CREATE TRIGGER"):
            name = statement.split()[5]
            out[name] = _normalise(statement)
    return out


# Rows whose columns or payload may not match their body (see SQLiteStore.integrity_findings),
# with one JSON parse per row: a multi-path json_extract yields the body's values as one JSON
# array, compared as one text with the same values taken from the columns. A row is clean
# when the two are equal: every column equals its body field, ``time`` equals a non-empty
# ``start`` (the writer's rule), and, for a row without a stored payload, the body commits to
# no payload (``payload_digest`` null). Anything else is a candidate, which Python checks
# exactly as the writer derived the columns (``_row``) and as ``payload_finding`` judges
# payloads: the SQL can over-report (a value that is not a string in the body never compares
# equal here, a record whose ``start`` is empty always differs), never hide a mismatch. A
# body that is not JSON makes SQLite raise; the caller then checks every row in Python.
_BODY_PATHS: Final = ", ".join(f"'$.{c}'" for c in (*_COLUMNS, "start"))
_COLUMN_VALUES: Final = ", ".join(f"r.{c}" for c in (*_COLUMNS, "time"))
CANDIDATE_FLAG: Final = (
    "r.time IS NULL OR r.time = '' OR CASE WHEN p.payload IS NULL"
    f" THEN json_extract(CAST(r.body AS TEXT), {_BODY_PATHS}, '$.payload_digest')"
    f" IS NOT json_array({_COLUMN_VALUES}, NULL)"
    f" ELSE json_extract(CAST(r.body AS TEXT), {_BODY_PATHS}) IS NOT json_array({_COLUMN_VALUES})"
    " END"
)
"""The SQL expression that is true for a candidate row of ``audit_records r LEFT JOIN
audit_payloads p`` (the parallel verifier computes it in the same scan as the hashes)."""
_CANDIDATES: Final = (
    "SELECT r.seq FROM audit_records r LEFT JOIN audit_payloads p ON p.seq = r.seq"
    f" WHERE r.seq BETWEEN 1 AND ? AND ({CANDIDATE_FLAG}) ORDER BY r.seq"
)
_ALL_ROWS: Final = "SELECT seq FROM audit_records WHERE seq BETWEEN 1 AND ? ORDER BY seq"

# Stored payloads with their record (the digest is read from the body in Python: a body
# that is not JSON must not abort the scan).
_PAYLOAD_ROWS: Final = (
    "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload"
    " FROM audit_payloads p JOIN audit_records r ON r.seq = p.seq"
    " WHERE p.payload IS NOT NULL AND r.seq BETWEEN 1 AND ? ORDER BY r.seq"
)

# One candidate with everything its checks need.
_CANDIDATE_ROW: Final = (
    "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload, "
    + ", ".join(f"r.{c}" for c in (*_COLUMNS, "time"))
    + " FROM audit_records r LEFT JOIN audit_payloads p ON p.seq = r.seq WHERE r.seq = ?"
)

_HEAD: Final = "SELECT seq, hash FROM audit_records WHERE seq >= 1 ORDER BY seq DESC LIMIT 1"

_INSERT: Final = (
    f"INSERT INTO audit_records (seq, prev_hash, hash, body, {', '.join(_COLUMNS)}, time) "
    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 5))})"
)

_FILTER_COLUMNS: Final = QUERY_FILTERS


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

    Raises:
        ConfigError: a bad parameter.
        AuditUnavailable: the file cannot be opened or initialised.
    """

    CANDIDATE_FLAG: Final = CANDIDATE_FLAG
    """What the parallel verifier computes per row for :meth:`integrity_findings`."""

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
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._closed = False
        with self._lock:
            self._connection()

    # -- connections -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if (self.readonly or not self.create) and not os.path.exists(self.path):
            raise StoreNotFound(
                f"cannot open audit store {self.path!r}: no such file (wrong path or URL?); "
                "a read-only open creates nothing"
            )
        try:
            if self.readonly:
                conn = sqlite3.connect(
                    _ro_uri(self.path), uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                directory = os.path.dirname(os.path.abspath(self.path))
                if not os.path.isdir(directory):
                    # Loud for a path someone typed; the embedded default's first use is normal.
                    default = os.path.normpath(self.path) == DEFAULT_AUDIT_PATH
                    # A store's first named chain makes its .chains directory: normal too.
                    default = default or bool(self.chain and os.path.exists(self.store_path))
                    _log.log(
                        logging.INFO if default else logging.WARNING,
                        "audit store %r: directory %r does not exist; creating it and a new, "
                        "EMPTY audit log (if you meant an existing log, the path or URL is wrong)",
                        self.path,
                        directory,
                    )
                os.makedirs(directory, exist_ok=True)
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if not self.readonly:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot switch to WAL (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            if self.max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count = {int(self.max_page_count)}")
            self._init_schema(conn)
        except (sqlite3.Error, OSError) as exc:
            raise AuditUnavailable(f"cannot open audit store {self.path!r}: {exc}") from exc
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'"
        ).fetchone()
        if exists is None:
            if self.readonly:
                raise sqlite3.OperationalError("not an audit store (no audit_records table)")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_ddl(_DDL):
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO audit_meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        row = conn.execute("SELECT value FROM audit_meta WHERE key = 'schema_version'").fetchone()
        if row is None or int(row[0]) != SCHEMA_VERSION:
            found = None if row is None else row[0]
            raise sqlite3.DatabaseError(
                f"audit store schema version {found}, this coworker reads {SCHEMA_VERSION}"
            )
        if exists is not None and not self.readonly:
            self._rearm(conn)
        if not self.readonly:
            conn.execute(_KEY_DDL)

    def _rearm(self, conn: sqlite3.Connection) -> None:
        # Somebody with the file can drop the append-only triggers, or replace them with
        # look-alikes of the same name that do nothing. Compare definitions, put ours back
        # for the appends to come, and say so loudly: what happened meanwhile is verify's job.
        problems = _guard_problems(conn)
        if not problems:
            return
        _log.error(
            "audit store %r: append-only guards tampered with: %s. Re-creating ours; run "
            "`coworker audit verify` on this file.",
            self.path,
            "; ".join(problems),
        )
        expected = _expected_triggers()
        present = {
            r[0]: _normalise(r[1] or "")
            for r in conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
        }
        conn.execute("BEGIN IMMEDIATE")
        try:
            for name, definition in expected.items():
                if name in present and present[name] != definition:
                    conn.execute(f'DROP TRIGGER "{name}"')
            for statement in _split_ddl(_DDL):
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        # Called with self._lock held. A connection must not cross a fork: reopen in the child.
        if self._closed:
            raise AuditUnavailable(f"audit store {self.path!r} is closed")
        pid = os.getpid()
        if self._conn is None or self._pid != pid:
            self._conn = self._connect()
            self._pid = pid
        return self._conn

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
            self.encrypt_payloads and payloads is not None and any(p is not None for p in payloads)
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
            return sealed

    def _append_in_txn(
        self,
        conn: sqlite3.Connection,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None,
        prepared: list[Prepared] | None = None,
    ) -> list[StoredRecord]:
        # Called with the lock held, inside BEGIN IMMEDIATE. Payloads are sealed here, in the
        # transaction that inserts them: a key created for them commits with them, and an
        # erase committed by another process just before cannot leave us a stale key.
        if self.encrypt_payloads and payloads is not None and any(p is not None for p in payloads):
            keys = (
                self.keystore.get_or_create_key
                if self.keystore is not None
                else lambda subject: _key_in_txn(conn, subject)
            )
            entries, payloads = erasure.seal_all(entries, payloads, keys, self.subject_field)
            try:
                prepared = prepare(entries)
            except ValueError as exc:
                raise sqlite3.DataError(f"unencodable record: {exc}") from exc
        if prepared is None:
            prepared = prepare(entries)
        # The head is read inside the write transaction, every time: it costs one indexed
        # lookup (~1.5 us; ``PRAGMA data_version`` to validate a cached head would cost ~1 us),
        # and whatever another process appended is then always the base of our chain.
        row = conn.execute(_HEAD).fetchone()
        head = Head(row[0], row[1]) if row is not None else None
        sealed = seal(prepared, head, payloads, first_prev=self._first_prev)
        if len(sealed) == 1:  # the common group of one: no executemany machinery
            inserted = conn.execute(_INSERT, _row(sealed[0], entries[0])).rowcount
        else:
            rows = [_row(r, e) for r, e in zip(sealed, entries, strict=True)]
            inserted = conn.executemany(_INSERT, rows).rowcount
        if inserted != len(sealed):
            # A foreign trigger doing RAISE(IGNORE) skips rows without an error.
            raise sqlite3.IntegrityError(
                f"only {inserted} of {len(sealed)} row(s) were inserted: a trigger "
                "dropped them (run `coworker audit verify`)"
            )
        blobs = [(r.seq, r.payload) for r in sealed if r.payload is not None]
        if blobs:
            conn.executemany("INSERT INTO audit_payloads (seq, payload) VALUES (?, ?)", blobs)
        return sealed

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
        column = self.subject_field if self.subject_field in _COLUMNS else None
        by_subject = (
            f"r.{column} = ?"
            if column is not None
            else f"json_extract(CAST(r.body AS TEXT), '$.{self.subject_field}') = ?"
        )
        with self._lock:
            conn = self._connection()
            try:

                def work(conn: sqlite3.Connection) -> tuple[Any, list[int]]:
                    # Under the write lock: a hold appended concurrently is seen, or comes after.
                    holds = erasure.active_holds(
                        StoredRecord(r[0], b"", b"", r[1])
                        for r in conn.execute(
                            "SELECT seq, body FROM audit_records WHERE kind IN ('hold', 'release')"
                            " ORDER BY seq"
                        )
                    )
                    erasure.refuse_if_held(holds, subject, lambda flow: _flow_subjects(conn, flow))
                    seqs = [
                        r[0]
                        for r in conn.execute(
                            "SELECT p.seq FROM audit_payloads p JOIN audit_records r "
                            "ON r.seq = p.seq WHERE json_extract(CAST(r.body AS TEXT), "
                            f"'$.payload_subject') = ? OR {by_subject} ORDER BY p.seq",
                            (subject, subject),
                        )
                    ]
                    entry = erasure.erasure_entry(subject, reason, by=by, seqs=seqs)
                    (record,) = self._append_in_txn(conn, [entry], None)
                    conn.executemany(
                        "DELETE FROM audit_payloads WHERE seq = ?", [(s,) for s in seqs]
                    )
                    conn.execute("DELETE FROM audit_keys WHERE subject = ?", (subject,))
                    return record, seqs

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
    ) -> Iterator[StoredRecord]:
        """Records matching the filters, in seq order, using the indexed columns.

        Args:
            filters: keys ``flow_id``, ``user``, ``agent``, ``doctype``, ``operation``,
                ``category``, ``kind``, ``run_id``, ``span_id``; ``None`` values are ignored.
            since: RFC 3339 lower bound (inclusive) on the record time.
            until: RFC 3339 upper bound (exclusive) on the record time.
            limit: at most this many records.

        The caller should re-check the decoded body: the columns are unhashed copies.
        """
        where: list[str] = ["r.seq >= 1"]
        params: list[Any] = []
        for key, value in filters.items():
            if value is None:
                continue
            column = _FILTER_COLUMNS.get(key)
            if column is None:
                raise ConfigError(f"unknown audit filter {key!r}")
            where.append(f"r.{column} = ?")
            params.append(value)
        if since is not None:
            where.append("r.time >= ?")
            params.append(since)
        if until is not None:
            where.append("r.time < ?")
            params.append(until)
        query = (
            "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM audit_records r "
            "LEFT JOIN audit_payloads p ON p.seq = r.seq"
        )
        query += " WHERE " + " AND ".join(where)
        query += " ORDER BY r.seq"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        for row in self._read(query, tuple(params)):
            yield StoredRecord(row[0], row[1], row[2], row[3], row[4])

    def open_intents(self) -> list[int]:
        """Seqs of intent records with no later outcome for the same span (in doubt)."""
        query = (
            "SELECT i.seq FROM audit_records i WHERE i.kind = 'intent' AND i.seq >= 1 AND "
            "NOT EXISTS ("
            "SELECT 1 FROM audit_records o WHERE o.span_id = i.span_id "
            "AND o.trace_id IS i.trace_id AND o.kind = 'outcome' AND o.seq > i.seq) "
            "ORDER BY i.seq"
        )
        return [row[0] for row in self._read(query, ())]

    def _read(self, query: str, params: tuple[Any, ...], *, mmap: bool = False) -> Iterator[Any]:
        # A connection of its own per read, so that a long verify neither holds the writers'
        # lock nor sees a half-written batch (WAL readers see one snapshot).
        try:
            if self.readonly:
                conn = sqlite3.connect(_ro_uri(self.path), uri=True, isolation_level=None)
            else:
                conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if mmap:
                # Long scans (verify) map the file rather than copy each page: ~1.6x faster.
                conn.execute(f"PRAGMA mmap_size = {_MMAP_SIZE}")
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"audit store {self.path!r}: {exc}") from exc
        try:
            try:
                conn.execute("BEGIN")
                cursor = conn.execute(query, params)
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"audit store {self.path!r}: {exc}") from exc
            cursor.arraysize = 2048
            while True:
                try:
                    rows = cursor.fetchmany()
                except sqlite3.Error as exc:
                    raise AuditUnavailable(f"audit store {self.path!r}: {exc}") from exc
                if not rows:
                    break
                yield from rows
        finally:
            conn.close()

    def integrity_findings(
        self, head: Head | None, *, candidates: Sequence[int] | None = None
    ) -> list[Finding]:
        """See :class:`~coworker.audit.store.IntegrityChecked`: columns against bodies,
        payloads against digests, rows outside ``1..head``, the triggers' definitions.

        Args:
            head: the last record to check.
            candidates: the seqs :data:`CANDIDATE_FLAG` selects, in order, when the caller
                computed them already (the parallel verifier, in its hashing scan).
        """
        findings: list[Finding] = []
        last = head.seq if head is not None else 0
        with self._lock:
            conn = self._connection()
            try:
                findings += [Finding(GUARD, None, p) for p in _guard_problems(conn)]
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"audit store {self.path!r}: {exc}") from exc
        # Only below 1: the head is the highest seq, and a row above it was appended after
        # the head was read (verify may run while the application writes).
        stray = list(self._read("SELECT seq FROM audit_records WHERE seq < 1 ORDER BY seq", ()))
        findings += _capped(
            Finding(OUT_OF_RANGE, r[0], f"seq {r[0]}: a row outside 1..{last} (never appended)")
            for r in stray
        )
        # A payload and its record commit together: one without the other was added by hand.
        orphans = self._read(
            "SELECT p.seq FROM audit_payloads p WHERE p.payload IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM audit_records r WHERE r.seq = p.seq) ORDER BY p.seq",
            (),
        )
        findings += _capped(
            Finding(PAYLOAD_MISMATCH, r[0], f"seq {r[0]}: a payload with no record")
            for r in orphans
        )
        # SQLite's own JSON parser picks the candidate rows (~10x faster than decoding every
        # body in Python), one parse per row for the columns and the payload commitment; each
        # candidate is then checked exactly. Values that are not strings are always
        # candidates, so that the SQL comparison can only over-report, never hide a mismatch.
        if candidates is None:
            try:
                candidates = [r[0] for r in self._read(_CANDIDATES, (last,), mmap=True)]
            except AuditUnavailable:  # a body is not JSON: decode them all, the slow way
                candidates = [r[0] for r in self._read(_ALL_ROWS, (last,))]
        columns: list[Finding] = []
        missing: list[StoredRecord] = []  # no payload stored: a finding if the body has a digest
        names = [*_COLUMNS, "time"]
        for seq in candidates:
            rows = list(self._read(_CANDIDATE_ROW, (seq,)))
            if not rows:
                continue
            (row,) = rows
            record = StoredRecord(row[0], row[1], row[2], row[3], row[4])
            try:
                fields = json.loads(record.body)
            except (ValueError, TypeError):
                continue  # the chain check already failed on it
            if not isinstance(fields, dict):
                continue
            if record.payload is None and fields.get("payload_digest") is not None:
                missing.append(record)
            expected = _row(record, fields)[4:]
            if tuple(row[5:]) != expected:
                wrong = [
                    f"{n}={got!r} (body: {want!r})"
                    for n, got, want in zip(names, row[5:], expected, strict=True)
                    if got != want
                ]
                columns.append(
                    Finding(
                        COLUMN_MISMATCH,
                        record.seq,
                        f"seq {record.seq}: query column(s) differ from the record: "
                        + ", ".join(wrong),
                    )
                )
        payloads: list[Finding] = []
        erased = erased_seqs(self)
        stored = [
            StoredRecord(r[0], r[1], r[2], r[3], r[4])
            for r in self._read(_PAYLOAD_ROWS, (last,), mmap=True)
        ]
        for record in [*stored, *missing]:
            try:
                fields = json.loads(record.body)
            except (ValueError, TypeError):
                continue  # the chain check already failed on it
            found = (
                payload_finding(record, fields, self.key_for, erased)
                if isinstance(fields, dict)
                else None
            )
            if found is not None:
                payloads.append(found)
        payloads.sort(key=lambda f: f.seq or 0)
        return findings + _capped(iter(columns)) + _capped(iter(payloads))

    def tree_table(self) -> Any:
        """The Merkle tree's table: ``<file>.tree`` beside the chain's file (never the log's
        write lock); in memory for a read-only store (proofs work, nothing is kept)."""
        from coworker.audit import tlog

        if self.readonly:
            return tlog.MemoryTable()
        return tlog.SQLiteTable(self.path + tlog.TREE_SUFFIX, busy_timeout=self.busy_timeout)

    def erased_payloads(self) -> dict[int, Any]:
        """Erased payloads by record seq, from an indexed search for erasure records."""
        from coworker.audit.erasure import searched_erasures

        return searched_erasures(self.search)

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


def _shredding(
    conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]
) -> tuple[_T, bool]:
    """Run ``work`` in one write transaction that overwrites what it deletes
    (``PRAGMA secure_delete``), then copy the pages back and truncate the WAL, so deleted
    bytes stay neither in the file nor in its ``-wal`` (erase and purge).

    Returns:
        ``work``'s result, and ``False`` when another reader kept the WAL from being truncated.
    """
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    conn.execute("PRAGMA secure_delete = OFF")
    return result, not busy


def _ro_uri(path: str) -> str:
    # A read-only URI: SQLite creates nothing, even a -wal/-shm file stays as it is.
    return "file:" + quote(os.path.abspath(path)) + "?mode=ro"


def _guard_problems(conn: sqlite3.Connection) -> list[str]:
    """What is wrong with the append-only triggers: missing, altered, or foreign ones."""
    expected = _expected_triggers()
    present = {
        r[0]: (r[1], _normalise(r[2] or ""))
        for r in conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"
        )
    }
    problems: list[str] = []
    for name, definition in expected.items():
        if name not in present:
            problems.append(f"trigger {name} is missing")
        elif present[name][1] != definition:
            problems.append(f"trigger {name} is altered (not coworker's definition)")
    for name, (table, _) in sorted(present.items()):
        if name not in expected and table in _GUARDED_TABLES:
            problems.append(f"trigger {name} on {table} is not coworker's")
    # The table itself (PRAGMA writable_schema can rewrite it, e.g. to drop the CHECK): as
    # created now, or as created before the CHECK existed.
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'"
    ).fetchone()
    table_sql = _normalise(row[0] if row and row[0] else "")
    if table_sql not in _expected_tables():
        problems.append("table audit_records is altered (not coworker's definition)")
    return problems


def _expected_tables() -> tuple[str, str]:
    (create,) = [s for s in _split_ddl(_DDL) if "TABLE IF NOT EXISTS audit_records" in s]
    current = _normalise(create)
    return current, current.replace(" CHECK (seq >= 1)", "")


def _have_cryptography() -> bool:
    import importlib.util

    return importlib.util.find_spec("cryptography") is not None


def _key_in_txn(conn: sqlite3.Connection, subject: str) -> bytes:
    # Inside the append's transaction: the key row commits with the payloads sealed under it.
    row = conn.execute("SELECT key FROM audit_keys WHERE subject = ?", (subject,)).fetchone()
    if row is not None:
        return bytes(row[0])
    key = erasure.new_key()
    conn.execute(
        "INSERT INTO audit_keys (subject, key, created) VALUES (?, ?, datetime('now'))",
        (subject, key),
    )
    return key


def _flow_subjects(conn: sqlite3.Connection, flow_id: str) -> set[str]:
    rows = conn.execute(
        "SELECT DISTINCT user_id, json_extract(CAST(body AS TEXT), '$.payload_subject') "
        "FROM audit_records WHERE flow_id = ?",
        (flow_id,),
    )
    return {v for row in rows for v in row if isinstance(v, str)}


def _capped(findings: Iterator[Finding]) -> list[Finding]:
    out: list[Finding] = []
    extra = 0
    for f in findings:
        if len(out) < MAX_FINDINGS:
            out.append(f)
        else:
            extra += 1
    if extra:
        last = out[-1]
        out[-1] = Finding(last.kind, last.seq, f"{last.detail} (and {extra} more like it)")
    return out


_TEXT_TYPES: Final = frozenset({str, type(None)})


def _row(record: StoredRecord, fields: Mapping[str, Any]) -> tuple[Any, ...]:
    values = tuple(map(fields.get, _COLUMNS))
    if not _TEXT_TYPES.issuperset(map(type, values)):  # rare: a hand-made entry
        values = tuple(map(_column, values))
    return (
        record.seq,
        record.prev_hash,
        record.hash,
        record.body,
        *values,
        fields.get("start") or fields.get("recorded_at"),
    )


def _column(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _split_ddl(ddl: str) -> list[str]:
    # sqlite3.Connection.executescript would COMMIT our BEGIN IMMEDIATE; split instead,
    # keeping trigger bodies (which contain ';') whole.
    statements: list[str] = []
    current: list[str] = []
    in_trigger = False
    for line in ddl.strip().splitlines():
        current.append(line)
        stripped = line.strip()
        if stripped.startswith("CREATE TRIGGER"):
            in_trigger = True
        if (in_trigger and stripped == "END;") or (not in_trigger and stripped.endswith(";")):
            statements.append("\n".join(current))
            current = []
            in_trigger = False
    return statements
