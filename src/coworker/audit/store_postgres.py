"""The shared audit store: an append-only, hash-chained log in PostgreSQL (psycopg 3).

Many processes on many hosts append to one log. Layout (schema version 2, in a PostgreSQL
schema of its own, ``coworker_audit`` by default)::

    records(seq bigint PRIMARY KEY, prev_hash bytea UNIQUE, hash bytea, body bytea,
            dedup_key bytea (unique when set), inserted_at timestamptz,
            kind, category, operation, doctype, outcome, flow_id, step_id, run_id,
            user_id, agent_id, trace_id, span_id, recorded_at, time)
    payloads(seq bigint PRIMARY KEY, payload bytea)
    schema_version(version integer PRIMARY KEY, applied_at timestamptz)

``seq``, ``prev_hash``, ``hash`` and ``body`` are exactly what :func:`coworker.audit.chain.seal`
hashed, as ``bytea`` (never ``jsonb``, which would reorder keys and change the bytes). The text
columns are copies of body fields for ``coworker audit query``: conveniences, not evidence.
``dedup_key`` makes a second delivery of the same span a no-op (:meth:`append_unique`, used by
the OTLP ingest endpoint). Payloads live in their own table, which is not append-only, so that
a payload can be erased without breaking the chain.

Serialization: every append runs in one READ COMMITTED transaction that calls
``<schema>.lock_head(oid)``: a PL/pgSQL function that takes a transaction-scoped advisory lock
keyed on the records table, *then* reads the head in a statement of its own (in READ COMMITTED
each statement of a VOLATILE function takes a fresh snapshot, so it sees the previous holder's
commit); the store then seals and inserts. The connection's isolation level is set explicitly:
under REPEATABLE READ the snapshot is taken before the lock is granted, two writers read the
same stale head and the chain forks. The primary key on ``seq`` and the unique constraint on
``prev_hash`` are the database's own backstop: a writer that forks the chain anyway is refused.
The COMMIT does not wait for its WAL flush, so the lock is free at once; :meth:`_flush` then
waits for it (group commit across processes) before ``append`` returns, with a transaction
that writes WAL of its own and commits synchronously.

Append-only in the database: BEFORE UPDATE / DELETE row triggers, BEFORE UPDATE / DELETE /
TRUNCATE statement triggers (TRUNCATE fires no row triggers), and (schema version 2) an AFTER
INSERT statement trigger that refuses rows that do not chain onto the log, all ``ENABLE
ALWAYS`` so they also fire under ``session_replication_role = replica`` (logical replication
apply, pg_restore).
Run the writers as a role with INSERT and SELECT only (:func:`writer_grants`). A superuser or
the table owner can still disable the triggers or rewrite rows: ``coworker audit verify`` and
signed checkpoints are what detect that (``docs/postgres.md``).

Outages: when the server cannot be reached, :meth:`PostgresStore.append` writes the entries to
a local durable :class:`~coworker.audit.spool.Spool` and returns an empty list (they are
sealed, i.e. get a seq, when they reach the shared log). One background thread per store
ships the spool in order when the server is back; the chain stays continuous. While the spool
is not empty, appends queue behind it without touching the network; a watchdog thread cuts any
round trip longer than ``io_timeout`` (a hung server). Read-only stores (``readonly=True``, the
CLI's read commands) run no DDL, restore no guard and never spool.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.pq import Format

from coworker import attributes as attr
from coworker.audit import erasure
from coworker.audit.chain import prepare, seal
from coworker.audit.erasure import KeyStore
from coworker.audit.record import QUERY_FILTERS, canonical
from coworker.audit.spool import Spool, SpoolEntry, SpoolStatus
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
from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = [
    "DEFAULT_SCHEMA",
    "SCHEMA_VERSION",
    "AppendResult",
    "PostgresStore",
    "default_spool_path",
    "spool_path",
    "writer_grants",
]

_log = logging.getLogger("coworker.audit")

SCHEMA_VERSION: Final = 3
"""Version of the table layout, kept in ``<schema>.schema_version``."""

DEFAULT_SCHEMA: Final = "coworker_audit"
"""The PostgreSQL schema that holds the audit tables unless the URL says ``?schema=``."""

# First key of the two-int advisory locks we take ('cowr'); the second is a table's oid.
_LOCK_NAMESPACE: Final = 0x636F7772
# Second key of the lock that serializes schema creation (before any table oid exists).
_DDL_LOCK: Final = 1

# Body fields copied into plain indexed columns; the same names as the SQLite store.
_COLUMNS: Final = (
    "kind", "category", "operation", "doctype", "outcome", "flow_id", "step_id", "run_id",
    "user_id", "agent_id", "trace_id", "span_id", "recorded_at",
)  # fmt: skip

_FILTER_COLUMNS: Final = QUERY_FILTERS

# Coworker's own URL query parameters; everything else goes to libpq.
_URL_SCHEMA: Final = "schema"
_URL_SPOOL: Final = "spool"

_PAGE: Final = 2000
_SHIP_BATCH: Final = 500
_RECONNECT_INTERVAL: Final = 1.0

# See PostgresStore._flush. The message is empty; logical decoding consumers (if any) see it
# under this prefix and can ignore it.
_FLUSH: Final = (
    "SELECT CASE WHEN current_setting('synchronous_commit') = 'off'"
    " THEN set_config('synchronous_commit', 'on', true) END,"
    " pg_logical_emit_message(true, 'coworker-audit-flush', ''::bytea)"
)

_DDL_V1: Final = """
CREATE TABLE IF NOT EXISTS {schema}.schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION {schema}.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'coworker audit log is append-only: % on %.% refused',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'write a correction record instead';
END
$$;
CREATE TABLE {schema}.records (
    seq bigint PRIMARY KEY CHECK (seq >= 1),
    prev_hash bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash bytea NOT NULL CHECK (octet_length(hash) = 32),
    body bytea NOT NULL,
    dedup_key bytea,
    inserted_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind text, category text, operation text, doctype text, outcome text,
    flow_id text, step_id text, run_id text, user_id text, agent_id text,
    trace_id text, span_id text,
    -- RFC 3339 fixed width: byte order is time order (COLLATE "C", whatever the database's).
    recorded_at text COLLATE "C", time text COLLATE "C",
    CONSTRAINT records_prev_hash_key UNIQUE (prev_hash)
);
CREATE TABLE {schema}.payloads (seq bigint PRIMARY KEY, payload bytea);
CREATE FUNCTION {schema}.lock_head(lock_key integer) RETURNS TABLE (seq bigint, hash bytea)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Commit without waiting for the WAL flush (the store waits for it after the lock is
    -- released, see PostgresStore._flush).
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock({namespace}, lock_key);
    -- A VOLATILE function takes a new snapshot for each statement (READ COMMITTED): this
    -- reads the head as of after the lock was granted.
    RETURN QUERY SELECT r.seq, r.hash FROM {schema}.records r ORDER BY r.seq DESC LIMIT 1;
END
$$;
CREATE UNIQUE INDEX records_dedup_key ON {schema}.records (dedup_key)
    WHERE dedup_key IS NOT NULL;
CREATE INDEX records_flow ON {schema}.records (flow_id, seq);
CREATE INDEX records_user ON {schema}.records (user_id, seq);
CREATE INDEX records_time ON {schema}.records (time);
CREATE TRIGGER records_no_change BEFORE UPDATE OR DELETE ON {schema}.records
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER records_no_change_stmt BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.records
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER schema_version_no_change BEFORE UPDATE OR DELETE ON {schema}.schema_version
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER schema_version_no_change_stmt
    BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.schema_version
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
ALTER TABLE {schema}.records ENABLE ALWAYS TRIGGER records_no_change;
ALTER TABLE {schema}.records ENABLE ALWAYS TRIGGER records_no_change_stmt;
ALTER TABLE {schema}.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change;
ALTER TABLE {schema}.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change_stmt;
"""

# Version 2: the database itself refuses an insert that does not chain onto the log (a seq
# that is not the next one, a prev_hash that is not its predecessor's hash, a hash that is not
# SHA-256(prev_hash || body)), whoever sends it: a writer role that INSERTs by hand, skipping
# the lock or forging a hash, is refused like a fork. One check per statement (a transition
# table), not per row.
_DDL_V2: Final = """
CREATE FUNCTION {schema}.check_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    SELECT n.seq INTO bad FROM new_rows n
        LEFT JOIN {schema}.records p ON p.seq = n.seq - 1
        WHERE n.hash IS DISTINCT FROM sha256(n.prev_hash || n.body)
           OR (n.seq = 1 AND n.prev_hash IS DISTINCT FROM decode(repeat('00', 32), 'hex'))
           OR (n.seq > 1 AND p.hash IS DISTINCT FROM n.prev_hash)
        ORDER BY n.seq LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'coworker audit log: record % does not chain onto the log', bad
            USING ERRCODE = 'integrity_constraint_violation',
                  HINT = 'seq must follow the head, prev_hash be its hash, hash be '
                         'sha256(prev_hash || body): append through coworker';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER records_chain AFTER INSERT ON {schema}.records
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.check_chain();
ALTER TABLE {schema}.records ENABLE ALWAYS TRIGGER records_chain;
"""

# Version 3 (issue 15): per-subject data keys of encrypted payloads. Deliberately without
# the append-only guards: erasing a subject deletes its row (coworker.audit.erasure).
_DDL_V3: Final = """
CREATE TABLE {schema}.keys (
    subject text PRIMARY KEY,
    key bytea NOT NULL CHECK (octet_length(key) = 32),
    created timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

_MIGRATIONS: Final = {1: _DDL_V1, 2: _DDL_V2, 3: _DDL_V3}


def writer_grants(role: str, schema: str = DEFAULT_SCHEMA) -> list[str]:
    """The SQL statements that give ``role`` exactly what an audit writer needs.

    INSERT and SELECT on the log tables and nothing else: no UPDATE, DELETE, TRUNCATE, no DDL
    (the schema and tables belong to a separate owner role). Run them as the owner after the
    schema exists (after the first :class:`PostgresStore` opened it as the owner).

    Args:
        role: the writer role (must exist).
        schema: the audit schema.

    Returns:
        SQL statements with quoted identifiers, in order.
    """
    s = _quote_ident(schema)
    r = _quote_ident(role)
    return [
        f"GRANT USAGE ON SCHEMA {s} TO {r}",
        f"GRANT SELECT, INSERT ON {s}.records, {s}.payloads TO {r}",
        f"GRANT SELECT ON {s}.schema_version TO {r}",
        # Data keys of encrypted payloads: made by writers, destroyed only by the owner
        # (coworker audit erase).
        f"GRANT SELECT, INSERT ON {s}.keys TO {r}",
    ]


def default_spool_path(url: str) -> Path:
    """Where :class:`PostgresStore` spools for ``url`` unless told otherwise.

    ``.coworker/spool/<digest>.db`` relative to the working directory, the digest naming the
    server, database and schema (not the password), so that every process of an application
    on one host, and ``coworker audit status``, find the same spool.

    Args:
        url: a ``postgresql://`` URL.
    """
    conninfo, schema, _ = _split_url(url)
    info = psycopg.conninfo.conninfo_to_dict(conninfo)
    key = "|".join(str(info.get(k) or "") for k in ("host", "hostaddr", "port", "dbname", "user"))
    digest = hashlib.sha256(f"{key}|{schema}".encode()).hexdigest()[:16]
    return Path(".coworker") / "spool" / f"pg-{digest}.db"


def spool_path(url: str) -> Path | None:
    """The spool a :class:`PostgresStore` opened on ``url`` uses: the URL's ``?spool=`` file,
    ``None`` for ``spool=off``, else :func:`default_spool_path`."""
    _, _, url_spool = _split_url(url)
    if url_spool is None:
        return default_spool_path(url)
    if url_spool.lower() in ("off", "none", "false", "0", ""):
        return None
    return Path(url_spool)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What :meth:`PostgresStore.append_unique` did.

    Attributes:
        records: the records written now, in order.
        duplicates: indexes of the entries skipped because their dedup key is already in the
            log (a second delivery of the same span).
        spooled: ``True`` when the server was unreachable and the entries went to the spool.
    """

    records: list[StoredRecord]
    duplicates: list[int] = field(default_factory=list)
    spooled: bool = False


@dataclass(slots=True)
class _Item:
    fields: Mapping[str, Any]
    payload: bytes | None
    dedup_key: bytes | None = None
    attempted: tuple[tuple[int, bytes], ...] = ()
    spool_id: int | None = None


class _Unreachable(Exception):
    """The server cannot be reached; carries the items with the hashes that were attempted."""

    def __init__(self, items: list[_Item], cause: BaseException) -> None:
        super().__init__(str(cause))
        self.items = items
        self.cause = cause


class PostgresStore:
    """An :class:`~coworker.audit.store.AuditStore` in PostgreSQL, shared by processes and hosts.

    Safe to share between threads. Creates its schema on first use when the connecting role
    may (idempotent, versioned, serialized by an advisory lock); a writer role with INSERT and
    SELECT only uses an existing schema.

    Args:
        url: ``postgresql://user@host:port/dbname`` plus libpq parameters; coworker's own
            query parameters: ``schema`` (default :data:`DEFAULT_SCHEMA`) and ``spool`` (a
            file path, or ``off``).
        schema: the PostgreSQL schema of the tables (overrides the URL).
        spool: the local spool file for outages; ``True`` (default) uses
            :func:`default_spool_path`, ``None``/``False`` disables spooling (an outage then
            raises :class:`~coworker.AuditUnavailable`).
        connect_timeout: seconds to wait for a connection.
        ship_interval: seconds between attempts to ship the spool while it is not empty.
        io_timeout: seconds one round trip on an open connection may take before the
            connection is cut and the server treated as unreachable (a hung server, or one
            whose replies are lost, would otherwise block every append forever).
        readonly: for readers (``coworker audit verify|query|status``): never create or
            alter the schema (a missing one is :class:`~coworker.AuditUnavailable`), never
            spool, every transaction read-only; ``append`` raises.
        create: create the schema when it does not exist (``False``: that is
            :class:`~coworker.audit.store.StoreNotFound`).
        encrypt_payloads: keep captured payloads AES-GCM encrypted under per-subject keys
            (:mod:`coworker.audit.erasure`); default: when ``cryptography`` is installed.
        subject_field: the body field whose value names a payload's data-key subject.
        keystore: where data keys live (a KMS); default: the schema's ``keys`` table.

    Raises:
        ConfigError: a bad parameter, or the schema is newer than this library.
        AuditUnavailable: the server refused (permissions, missing schema) while reachable.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        spool: str | os.PathLike[str] | bool | None = True,
        connect_timeout: float = 5.0,
        ship_interval: float = 1.0,
        io_timeout: float = 30.0,
        readonly: bool = False,
        create: bool = True,
        encrypt_payloads: bool | None = None,
        subject_field: str = "user_id",
        keystore: KeyStore | None = None,
    ) -> None:
        conninfo, url_schema, url_spool = _split_url(url)
        if encrypt_payloads is None:
            import importlib.util

            encrypt_payloads = importlib.util.find_spec("cryptography") is not None
        self.encrypt_payloads = encrypt_payloads
        self.subject_field = subject_field
        self.keystore = keystore
        self._key_table = False  # set when the schema (version 3+) has one
        self.schema = schema or url_schema
        if not self.schema or len(self.schema) > 63:
            raise ConfigError(f"schema={self.schema!r} is not a valid PostgreSQL schema name")
        if connect_timeout <= 0:
            raise ConfigError(f"connect_timeout={connect_timeout!r} must be positive")
        if io_timeout <= 0:
            raise ConfigError(f"io_timeout={io_timeout!r} must be positive")
        if readonly:
            spool = None
        if url_spool is not None and spool is True:
            spool = None if url_spool.lower() in ("off", "none", "false", "0", "") else url_spool
        self.url = url
        self._conninfo = conninfo
        # Defaults the URL may override. Keepalives and tcp_user_timeout turn a silent network
        # partition into an error (and a spooled record) in about 30 s instead of a hang.
        given = psycopg.conninfo.conninfo_to_dict(conninfo)
        self._connect_options: dict[str, Any] = {
            k: v
            for k, v in {
                "connect_timeout": max(1, round(connect_timeout)),
                "application_name": "coworker-audit",
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": 30000,
            }.items()
            if k not in given
        }
        self._connect_timeout = connect_timeout
        self._ship_interval = ship_interval
        self._io_timeout = io_timeout
        self.readonly = readonly
        self.create = create and not readonly
        self._table = sql.Identifier(self.schema, "records")
        self._payloads = sql.Identifier(self.schema, "payloads")
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = -1
        self._oid: int | None = None
        self._insert: sql.Composed | None = None
        self._lock_head: sql.Composed | None = None
        self._next_connect = 0.0
        self._last_error = "server unreachable"
        self._closed = False
        self._stop = threading.Event()
        # At most one shipper and one watchdog thread per store and process (the pid says
        # which process started them: a forked child has neither and starts its own).
        self._shipper: threading.Thread | None = None
        self._shipper_pid = -1
        self._connect_lock = threading.Lock()
        self._watch_lock = threading.Lock()
        # Round trips in progress (any thread): token -> (connection, start, pid). The pid:
        # a forked child inherits the dict, and must never shut down its parent's sockets.
        self._watches: dict[int, tuple[psycopg.Connection[Any], float, int]] = {}
        self._watch_stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._watchdog_pid = -1
        self._warned_fsync = False
        self._spool: Spool | None = None
        if spool is True:
            spool = default_spool_path(url)
        self._spool_path: Path | None = Path(spool) if spool else None
        if self._spool_path is not None and self._spool_path.exists():
            self._open_spool()  # entries left by an earlier run ship as soon as we can
        with self._lock:
            try:
                self._connection()
            except _ServerDown as exc:
                if self._spool is None:
                    _log.warning("audit store %s unreachable at start: %s", self, exc)
                else:
                    _log.warning("audit store %s unreachable at start, spooling: %s", self, exc)
        if self._spool is not None and not self._spool.is_empty():
            self._start_shipper()

    # -- the AuditStore protocol -------------------------------------------------------------
    def append(
        self,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None = None,
    ) -> list[StoredRecord]:
        """Seal and durably write ``entries`` in one transaction.

        See :class:`~coworker.audit.store.AuditStore`. When the server cannot be reached and a
        spool is configured, the entries are durably spooled instead and the result is an
        empty list: they get their seq when they are shipped.

        Raises:
            AuditUnavailable: nothing was written or spooled.
        """
        if not entries:
            return []
        entries, payloads = self._seal_payloads(entries, payloads)
        items = [
            _Item(f, payloads[i] if payloads is not None else None) for i, f in enumerate(entries)
        ]
        return self._append(items).records

    def append_unique(
        self,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None,
        dedup_keys: Sequence[bytes],
    ) -> AppendResult:
        """Like :meth:`append`, but skip the entries whose dedup key is already in the log.

        The check and the insert happen in the same locked transaction, so two servers
        receiving the same span at the same time record it once. The OTLP ingest endpoint
        uses ``trace_id || span_id`` as the key.

        Args:
            entries: record fields without ``seq``.
            payloads: one payload (or ``None``) per entry, or ``None``.
            dedup_keys: one key per entry.

        Returns:
            What was written and what was skipped.

        Raises:
            AuditUnavailable: nothing was written or spooled.
        """
        if len(dedup_keys) != len(entries):
            raise ConfigError("dedup_keys must have one key per entry")
        if not entries:
            return AppendResult([])
        entries, payloads = self._seal_payloads(entries, payloads)
        items = [
            _Item(f, payloads[i] if payloads is not None else None, dedup_keys[i])
            for i, f in enumerate(entries)
        ]
        return self._append(items)

    # -- erasure (issue 15) ------------------------------------------------------------------
    def _seal_payloads(
        self, entries: Sequence[Mapping[str, Any]], payloads: Sequence[bytes | None] | None
    ) -> tuple[Sequence[Mapping[str, Any]], Sequence[bytes | None] | None]:
        # Sealed before the entries become items: a retried or spooled item keeps the same
        # bytes (the dedup of a lost COMMIT answer compares hashes), and the spool file
        # holds ciphertext, never the captured plaintext.
        if (
            not self.encrypt_payloads
            or payloads is None
            or not any(p is not None for p in payloads)
            or (self.keystore is None and not self._key_table)
        ):
            return entries, payloads
        keys = self.keystore.get_or_create_key if self.keystore is not None else self._make_key
        try:
            return erasure.seal_all(entries, payloads, keys, self.subject_field)
        except AuditUnavailable as exc:
            # No key without the server: the record must not be lost for it. The payload is
            # kept as captured (erase still deletes it, by subject) and this is said loudly.
            _log.warning(
                "audit store %s: no data key (%s); %d payload(s) stored unencrypted",
                self,
                exc,
                sum(p is not None for p in payloads),
            )
            return entries, payloads

    def _make_key(self, subject: str) -> bytes:
        keys = sql.Identifier(self.schema, "keys")
        query = sql.SQL(
            "WITH ins AS (INSERT INTO {k} (subject, key) VALUES (%s, %s)"
            " ON CONFLICT (subject) DO NOTHING RETURNING key)"
            " SELECT key FROM ins UNION ALL SELECT key FROM {k} WHERE subject = %s"
        ).format(k=keys)
        for _ in range(3):  # a concurrent first insert is invisible to our snapshot: retry
            rows = self._fetch(query, (subject, erasure.new_key(), subject))
            if rows:
                return _bytes(rows[0][0])
        raise AuditUnavailable(f"audit store {self}: cannot make a data key for {subject!r}")

    def _flow_subjects(self, flow_id: str) -> set[str]:
        rows = self._fetch(
            sql.SQL(
                "SELECT DISTINCT user_id, convert_from(body, 'UTF8')::jsonb ->> 'payload_subject'"
                " FROM {} WHERE flow_id = %s"
            ).format(self._table),
            (flow_id,),
        )
        return {v for row in rows for v in row if isinstance(v, str)}

    def key_for(self, subject: str) -> bytes | None:
        """The data key of ``subject``, or ``None`` (none made yet, or destroyed)."""
        if self.keystore is not None:
            return self.keystore.get_key(subject)
        if not self._key_table:
            return None
        rows = self._fetch(
            sql.SQL("SELECT key FROM {} WHERE subject = %s").format(
                sql.Identifier(self.schema, "keys")
            ),
            (subject,),
        )
        return _bytes(rows[0][0]) if rows else None

    def plaintext(self, record: StoredRecord) -> bytes | None:
        """The readable payload of ``record``: decrypted, or as stored when not encrypted."""
        return erasure.plaintext(record, self.key_for)

    def delete_payloads(self, seqs: Sequence[int]) -> bool:
        """Delete the payload rows of ``seqs`` (a purge; the records stay), then ``VACUUM``.

        Raises:
            AuditUnavailable: nothing was deleted.
        """
        with self._lock:
            try:
                conn = self._connection()
            except _ServerDown as exc:
                raise AuditUnavailable(f"audit store {self}: {exc}") from exc
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        sql.SQL("DELETE FROM {} WHERE seq = ANY(%s)").format(self._payloads),
                        (list(seqs),),
                    )
                    cur.execute(sql.SQL("VACUUM {}").format(self._payloads))
            except psycopg.Error as exc:
                self._rollback_or_drop(conn)
                raise AuditUnavailable(f"audit store {self}: purge failed: {exc}") from exc
        return True

    def erase(self, subject: str, reason: str, *, by: str | None = None) -> erasure.Erased:
        """Append the erasure record of ``subject``, then delete its payloads and data key.

        The record comes first (an interrupted erase is re-run and completes; it never leaves
        payloads missing without a record). The key table is then rewritten
        (``VACUUM FULL``: the deleted key's bytes leave the table's files) and the payloads
        table vacuumed; the server's WAL and backups keep old pages until they are recycled
        (docs/privacy.md). Needs a role with DELETE on the tables (the schema owner).

        Raises:
            ErasureRefused: a legal hold covers the subject; nothing was changed.
            AuditUnavailable: the record was not appended or the rows not deleted.
        """
        if self.readonly:
            raise AuditUnavailable(f"audit store {self} is read-only: erase refused")
        erasure.refuse_if_held(erasure.store_holds(self), subject, self._flow_subjects)
        column = self.subject_field if self.subject_field in _COLUMNS else None
        by_subject = (
            sql.SQL("r.{} = %s").format(sql.Identifier(column))
            if column is not None
            else sql.SQL("convert_from(r.body, 'UTF8')::jsonb ->> %s = %s")
        )
        params: tuple[Any, ...] = (
            (subject, subject) if column is not None else (subject, self.subject_field, subject)
        )
        rows = self._fetch(
            sql.SQL(
                "SELECT p.seq FROM {p} p JOIN {t} r ON r.seq = p.seq WHERE"
                " convert_from(r.body, 'UTF8')::jsonb ->> 'payload_subject' = %s OR {by}"
                " ORDER BY p.seq"
            ).format(p=self._payloads, t=self._table, by=by_subject),
            params,
        )
        seqs = [int(r[0]) for r in rows]
        record = erasure.append_now(self, erasure.erasure_entry(subject, reason, by=by, seqs=seqs))
        deletes: list[tuple[sql.Composed, tuple[Any, ...]]] = [
            (sql.SQL("DELETE FROM {} WHERE seq = ANY(%s)").format(self._payloads), (seqs,))
        ]
        if self._key_table:
            deletes.append(
                (
                    sql.SQL("DELETE FROM {} WHERE subject = %s").format(
                        sql.Identifier(self.schema, "keys")
                    ),
                    (subject,),
                )
            )
        with self._lock:
            try:
                conn = self._connection()
            except _ServerDown as exc:
                raise AuditUnavailable(f"audit store {self}: {exc}") from exc
            try:
                with conn.cursor() as cur:
                    cur.execute("BEGIN")
                    for statement, args in deletes:
                        cur.execute(statement, args)
                    cur.execute("COMMIT")
                    # VACUUM runs outside a transaction (the connection is in autocommit).
                    if self._key_table:
                        cur.execute(
                            sql.SQL("VACUUM FULL {}").format(sql.Identifier(self.schema, "keys"))
                        )
                    cur.execute(sql.SQL("VACUUM {}").format(self._payloads))
            except psycopg.Error as exc:
                self._rollback_or_drop(conn)
                raise AuditUnavailable(
                    f"audit store {self}: erase of {subject!r} (record seq {record.seq}) did not "
                    f"complete; run it again: {exc}"
                ) from exc
        erasure.forget_keys()
        if self.keystore is not None:
            self.keystore.destroy_key(subject)
        return erasure.Erased(record, tuple(seqs))

    def head(self) -> Head | None:
        """See :class:`~coworker.audit.store.AuditStore` (the shared log's head)."""
        query = sql.SQL("SELECT seq, hash FROM {} WHERE seq >= 1 ORDER BY seq DESC LIMIT 1").format(
            self._table
        )
        rows = self._fetch(query, ())
        return Head(rows[0][0], bytes(rows[0][1])) if rows else None

    def iter_from(self, seq: int = 1) -> Iterator[StoredRecord]:
        """See :class:`~coworker.audit.store.AuditStore`; reads page by page in seq order."""
        query = sql.SQL(
            "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM {} r "
            "LEFT JOIN {} p ON p.seq = r.seq WHERE r.seq >= %s ORDER BY r.seq LIMIT %s"
        ).format(self._table, self._payloads)
        next_seq = max(seq, 1)
        while True:
            rows = self._fetch(query, (next_seq, _PAGE))
            for row in rows:
                yield _record(row)
            if len(rows) < _PAGE:
                return
            next_seq = rows[-1][0] + 1

    def iter_chain(self, seq: int = 1) -> Iterator[tuple[int, bytes, bytes, bytes]]:
        """Yield ``(seq, prev_hash, hash, body)`` tuples in order: what verify needs."""
        query = sql.SQL(
            "SELECT seq, prev_hash, hash, body FROM {} WHERE seq >= %s ORDER BY seq LIMIT %s"
        ).format(self._table)
        next_seq = max(seq, 1)
        while True:
            rows = self._fetch(query, (next_seq, _PAGE))
            for row in rows:
                yield row[0], _bytes(row[1]), _bytes(row[2]), _bytes(row[3])
            if len(rows) < _PAGE:
                return
            next_seq = rows[-1][0] + 1

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
        """Records matching the filters, in seq order (same contract as the SQLite store).

        Args:
            filters: keys ``flow_id``, ``user``, ``agent``, ``doctype``, ``operation``,
                ``category``, ``kind``, ``run_id``, ``span_id``, ``trace_id``; ``None`` values
                are ignored.
            since: RFC 3339 lower bound (inclusive) on the record time.
            until: RFC 3339 upper bound (exclusive) on the record time.
            limit: at most this many records.

        The caller should re-check the decoded body: the columns are unhashed copies.
        """
        where: list[sql.Composable] = []
        params: list[Any] = []
        for key, value in filters.items():
            if value is None:
                continue
            column = _FILTER_COLUMNS.get(key)
            if column is None:
                raise ConfigError(f"unknown audit filter {key!r}")
            where.append(sql.SQL("r.{} = %s").format(sql.Identifier(column)))
            params.append(value)
        if since is not None:
            where.append(sql.SQL("r.time >= %s"))
            params.append(since)
        if until is not None:
            where.append(sql.SQL("r.time < %s"))
            params.append(until)
        where.append(sql.SQL("r.seq >= %s"))
        query = sql.SQL(
            "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM {} r "
            "LEFT JOIN {} p ON p.seq = r.seq WHERE {} ORDER BY r.seq LIMIT %s"
        ).format(self._table, self._payloads, sql.SQL(" AND ").join(where))
        remaining = limit
        next_seq = 1
        while remaining is None or remaining > 0:
            page = _PAGE if remaining is None else min(_PAGE, remaining)
            rows = self._fetch(query, (*params, next_seq, page))
            for row in rows:
                yield _record(row)
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < page:
                return
            next_seq = rows[-1][0] + 1

    def dedup_keys_between(
        self, bounds: Sequence[tuple[bytes, bytes]], limit: int = 10_000
    ) -> list[tuple[bytes, int]]:
        """``(dedup_key, seq)`` of the records with ``low <= dedup_key < high`` for any bound
        (at most ``limit`` per bound, in key order).

        One index range scan per bound; the ingest endpoint uses it to find every record
        whose key starts with a span's trace and span id (a resend with other content).
        """
        if not bounds:
            return []
        # LATERAL + ORDER BY the indexed key: psycopg prepares a statement run often, and the
        # generic plan of a plain join scans the table; this one walks the index per bound.
        query = sql.SQL(
            "SELECT r.dedup_key, r.seq FROM unnest(%b, %b) AS b(low, high) CROSS JOIN LATERAL "
            "(SELECT dedup_key, seq FROM {} WHERE dedup_key >= b.low AND dedup_key < b.high "
            "ORDER BY dedup_key LIMIT %s) r"
        ).format(self._table)
        low = _ByteaArray.of([b[0] for b in bounds])
        high = _ByteaArray.of([b[1] for b in bounds])
        rows = self._fetch(query, (low, high, limit))
        return [(bytes(row[0]), int(row[1])) for row in rows]

    def close(self) -> None:
        """Stop the shipper, make one last attempt to ship the spool, close; idempotent.

        What cannot be shipped now stays in the spool for the next store that opens it.
        """
        self._stop.set()
        shipper = self._shipper
        if shipper is not None and shipper is not threading.current_thread():
            shipper.join(timeout=10)
        try:
            self._close_locked()
        finally:
            # Last: the final shipment below is watched too (a hung server cannot hang close).
            self._watch_stop.set()
            watchdog = self._watchdog
            if watchdog is not None and watchdog is not threading.current_thread():
                watchdog.join(timeout=10)

    def _close_locked(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._spool is not None:
                try:
                    self._drain_locked()
                except Exception as exc:  # the spool keeps what could not be shipped
                    _log.warning(
                        "audit spool %s not fully shipped at close: %s", self._spool.path, exc
                    )
                try:
                    from coworker import metrics

                    metrics.unregister_spool_depth(self._spool_depth)
                except ImportError:  # pragma: no cover
                    pass
                self._spool.close()
            self._closed = True
            self._drop_connection()

    # -- spool -------------------------------------------------------------------------------
    @property
    def spool_path(self) -> Path | None:
        """The local spool file (created on first need), or ``None`` when spooling is off."""
        return self._spool_path

    def spool_status(self) -> SpoolStatus | None:
        """Depth and timing of the local spool, or ``None`` when spooling is off."""
        if self._spool_path is None:
            return None
        if self._spool is None:
            return SpoolStatus(str(self._spool_path), 0, None, None)
        return self._spool.status()

    def ship(self) -> int:
        """Ship what waits in the spool now (normally a background thread does it).

        Returns:
            The number of entries still waiting.
        """
        if self._spool is None:
            return 0
        with self._lock:
            try:
                self._drain_locked()
            except _ServerDown:
                pass
            return self._spool.depth()

    def last_inserted_at(self) -> float | None:
        """UNIX time the newest record reached the shared log (server clock), or ``None``."""
        query = sql.SQL(
            "SELECT extract(epoch FROM inserted_at) FROM {} WHERE seq >= 1"
            " ORDER BY seq DESC LIMIT 1"
        )
        rows = self._fetch(query.format(self._table), ())
        return float(rows[0][0]) if rows else None

    def _open_spool(self) -> Spool:
        # Called at construction or with self._lock held. Created on first need, so that
        # read-only uses (verify, query) leave no file behind.
        if self._spool is None:
            assert self._spool_path is not None
            self._spool = Spool(self._spool_path)
            try:
                from coworker import metrics
            except ImportError:  # pragma: no cover - metrics is optional
                pass
            else:
                metrics.register_spool_depth(
                    self._spool_depth,
                    attributes={attr.METRIC_ATTR_SPOOL: str(self._spool_path)},
                )
        return self._spool

    def _spool_depth(self) -> int:
        spool = self._spool
        return spool.depth() if spool is not None else 0

    def _start_shipper(self) -> None:
        with self._lock:
            pid = os.getpid()
            if self._closed:
                return
            if self._shipper is not None and self._shipper_pid == pid and self._shipper.is_alive():
                return
            self._shipper = threading.Thread(
                target=self._ship_loop, name="coworker-audit-spool", daemon=True
            )
            self._shipper_pid = pid
            self._shipper.start()

    def _ship_loop(self) -> None:
        while not self._stop.wait(self._ship_interval):
            if not self._connected():
                # Connect outside the store lock: against an unresponsive server this takes
                # the connect timeout, and appends must keep spooling meanwhile.
                try:
                    self._install(self._new_connection())
                except _ServerDown:
                    continue
                except Exception:
                    _log.exception("audit spool %s: cannot connect to ship", self._spool_path)
                    continue
            with self._lock:
                if self._closed or self._spool is None:
                    return
                try:
                    self._drain_locked()
                except _ServerDown:
                    continue
                except Exception:
                    _log.exception("audit spool %s: shipping failed", self._spool.path)
                    continue
                if self._spool.is_empty():
                    self._shipper = None
                    return

    def _drain_locked(self) -> None:
        """Ship the spool, oldest first, until it is empty; raises _ServerDown if it cannot."""
        spool = self._spool
        assert spool is not None
        with spool.shipping() as mine:
            if not mine:  # another process or thread is shipping it
                return
            while True:
                batch = spool.peek(_SHIP_BATCH)
                if not batch:
                    return
                items = [_item_from_spool(e) for e in batch]
                try:
                    self._write_with_retry(items, note=spool)
                except _Unreachable as exc:
                    raise _ServerDown(str(exc.cause)) from exc.cause
                spool.remove([e.id for e in batch])
                _log.info("audit spool %s: shipped %d record(s)", spool.path, len(batch))

    # -- writing -----------------------------------------------------------------------------
    def _append(self, items: list[_Item]) -> AppendResult:
        if self.readonly:
            raise AuditUnavailable(f"audit store {self} is read-only: append refused")
        spool = self._spool
        with self._lock:
            if spool is not None and not spool.is_empty():
                # Older entries wait in the spool: these queue behind them, in order. The
                # shipper (one thread) ships them; an append never waits for a server that
                # just failed (it would hold the lock for a connect timeout each time).
                return self._to_spool(items)
            try:
                return self._write_with_retry(items)
            except _Unreachable as exc:
                if self._spool_path is None:
                    raise AuditUnavailable(
                        f"audit store {self}: server unreachable, {len(items)} record(s) not "
                        f"written: {exc.cause}"
                    ) from exc.cause
                _log.warning("audit store %s unreachable (%s): spooling", self, exc.cause)
                return self._to_spool(exc.items)

    def _to_spool(self, items: list[_Item]) -> AppendResult:
        # An entry that could never be sealed must fail now, as it would have in a direct
        # append, not sit in the spool forever blocking the ones behind it.
        for item in items:
            try:
                canonical({**item.fields, "seq": 1})
            except Exception as exc:
                raise AuditUnavailable(
                    f"audit store {self}: record cannot be canonicalised: {exc}"
                ) from exc
        try:
            spool = self._open_spool()
            spool.put(
                [i.fields for i in items],
                [i.payload for i in items],
                [i.dedup_key for i in items],
                [i.attempted for i in items],
            )
        except Exception as exc:
            raise AuditUnavailable(
                f"audit store {self}: server unreachable and spool {self._spool_path} failed: {exc}"
            ) from exc
        self._start_shipper()
        return AppendResult([], spooled=True)

    def _write_with_retry(self, items: list[_Item], note: Spool | None = None) -> AppendResult:
        """Write items; one reconnect on a dead connection; raises _Unreachable."""
        for attempt in range(2):
            try:
                conn = self._connection()
            except _ServerDown as exc:
                raise _Unreachable(items, exc) from exc
            sealed_hashes: list[tuple[int, bytes] | None] = [None] * len(items)
            try:
                with self._deadline(conn):
                    return self._write(conn, items, sealed_hashes, note)
            except AuditUnavailable:
                self._rollback_or_drop(conn)
                raise
            except Exception as exc:
                if not isinstance(exc, psycopg.Error):
                    # Not the database's doing (a record that cannot be canonicalised, a bug):
                    # nothing was committed; never let it escape as anything else.
                    self._rollback_or_drop(conn)
                    raise AuditUnavailable(
                        f"audit store {self}: append of {len(items)} record(s) failed: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                unreachable = _is_unreachable(exc, conn)
                self._rollback_or_drop(conn)
                if not unreachable:
                    if isinstance(exc, psycopg.errors.IntegrityError):
                        raise AuditUnavailable(
                            f"audit store {self}: the database refused the append as a fork "
                            f"of the chain (another writer without the lock?): {exc}"
                        ) from exc
                    raise AuditUnavailable(
                        f"audit store {self}: append of {len(items)} record(s) failed: {exc}"
                    ) from exc
                # COMMIT may have reached the server before the connection died: remember the
                # hashes so that the next attempt (or the shipper) can tell.
                items = [
                    _Item(
                        it.fields,
                        it.payload,
                        it.dedup_key,
                        it.attempted + ((h,) if h is not None else ()),
                        it.spool_id,
                    )
                    for it, h in zip(items, sealed_hashes, strict=True)
                ]
                if attempt == 1:
                    raise _Unreachable(items, exc) from exc
                self._next_connect = 0.0
        raise AssertionError("unreachable")  # pragma: no cover

    def _write(
        self,
        conn: psycopg.Connection[Any],
        items: list[_Item],
        sealed_hashes: list[tuple[int, bytes] | None],
        note: Spool | None,
    ) -> AppendResult:
        table = self._table
        # Everything that does not depend on the head is encoded before taking the lock:
        # the lock is held by one writer at a time, so every microsecond under it counts.
        plain = [_column_values(it.fields) for it in items]
        prepared = prepare(it.fields for it in items)
        attempted = [a for it in items for a in it.attempted]
        keys = [it.dedup_key for it in items if it.dedup_key is not None]
        committed: dict[int, StoredRecord] = {}
        duplicates: list[int] = []
        skip: set[int] = set()
        with conn.cursor() as cur:
            # One round trip: BEGIN (explicitly READ COMMITTED), then lock_head() takes the
            # advisory lock and reads the head in a statement of its own (a fresh snapshot,
            # after the lock is granted). The connection is in autocommit mode so that psycopg
            # does not spend a round trip on a BEGIN of its own; the transaction is ours.
            cur.execute(self._begin_lock_head())
            cur.nextset()
            row = cur.fetchone()
            head = Head(row[0], bytes(row[1])) if row is not None else None
            if attempted:
                # An earlier attempt whose COMMIT answer was lost may have gone through.
                cur.execute(
                    sql.SQL(
                        "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM {} r"
                        " LEFT JOIN {} p ON p.seq = r.seq WHERE r.seq = ANY(%b)"
                    ).format(table, self._payloads),
                    (_Int8Array.of([a[0] for a in attempted]),),
                )
                present = {(r[0], bytes(r[2])): _record(r) for r in cur.fetchall()}
                for i, it in enumerate(items):
                    for a in it.attempted:
                        if a in present:
                            committed[i] = present[a]
                            skip.add(i)
                            break
            if keys:
                cur.execute(
                    sql.SQL("SELECT dedup_key FROM {} WHERE dedup_key = ANY(%b)").format(table),
                    (_ByteaArray.of(keys),),
                )
                seen = {bytes(r[0]) for r in cur.fetchall()}
                for i, it in enumerate(items):
                    if i in skip or it.dedup_key is None:
                        continue
                    if it.dedup_key in seen:
                        duplicates.append(i)
                        skip.add(i)
                    else:
                        seen.add(it.dedup_key)
            todo = (
                [i for i in range(len(items)) if i not in skip] if skip else list(range(len(items)))
            )
            sealed = seal([prepared[i] for i in todo], head, [items[i].payload for i in todo])
            if sealed:
                for i, rec in zip(todo, sealed, strict=True):
                    sealed_hashes[i] = (rec.seq, rec.hash)
                params: list[Any] = [
                    _Int8Array.of([r.seq for r in sealed]),
                    _ByteaArray.of([r.prev_hash for r in sealed]),
                    _ByteaArray.of([r.hash for r in sealed]),
                    _ByteaArray.of([r.body for r in sealed]),
                    _ByteaArray.of([items[i].dedup_key for i in todo]),
                ]
                for c in range(len(_COLUMNS) + 1):
                    params.append(_TextArray.of([plain[i][c] for i in todo]))
                cur.execute(self._insert_sql(), params)
                if cur.rowcount != len(sealed):
                    # A rule (DO INSTEAD NOTHING) or a trigger returning NULL drops rows
                    # without an error: never report them as written.
                    raise AuditUnavailable(
                        f"audit store {self}: only {cur.rowcount} of {len(sealed)} row(s) were "
                        "inserted: a rule or trigger on the table dropped them "
                        "(run `coworker audit verify`)"
                    )
                blobs = [(r.seq, r.payload) for r in sealed if r.payload is not None]
                if blobs:
                    cur.execute(
                        sql.SQL(
                            "INSERT INTO {} (seq, payload)"
                            " SELECT * FROM unnest(%b::bigint[], %b::bytea[])"
                        ).format(self._payloads),
                        (
                            _Int8Array.of([b[0] for b in blobs]),
                            _ByteaArray.of([b[1] for b in blobs]),
                        ),
                    )
            if note is not None and sealed:
                # Durably note the hashes before COMMIT: if we crash after the server committed
                # and before the spool forgot the entries, the next shipper sees they are in.
                note.note_attempt(
                    {
                        spool_id: (rec.seq, rec.hash)
                        for i, rec in zip(todo, sealed, strict=True)
                        if (spool_id := items[i].spool_id)
                    }
                )
            cur.execute("COMMIT")
        if sealed or committed:  # found committed by an earlier attempt: make sure it is durable
            self._flush(conn)
        if committed:
            by_index = dict(zip(todo, sealed, strict=True))
            by_index.update(committed)
            sealed = [by_index[i] for i in sorted(by_index)]
        return AppendResult(sealed, duplicates)

    def _begin_lock_head(self) -> sql.Composed:
        if self._lock_head is None:
            self._lock_head = sql.SQL(
                "BEGIN ISOLATION LEVEL READ COMMITTED; SELECT seq, hash FROM {}({})"
            ).format(sql.Identifier(self.schema, "lock_head"), sql.Literal(self._oid))
        return self._lock_head

    def _flush(self, conn: psycopg.Connection[Any]) -> None:
        """Return once our (asynchronously committed) records are durable.

        The append committed with ``synchronous_commit=off`` so that the head lock is free
        at once. This second transaction writes one WAL record of its own (a transactional
        logical-decoding message, allowed to any role, at any ``wal_level``) and commits
        synchronously: PostgreSQL then flushes the WAL up to *its* commit record, which comes
        after ours. A transaction that writes no WAL (``SELECT txid_current()``) would not do:
        its commit is asynchronous whatever ``synchronous_commit`` says, and waits for
        nothing. This is group commit across processes: one fsync covers every writer that
        committed meanwhile. WAL is replayed in order, so a crash can lose only a tail of
        the log that no caller was told is durable; a later record (which hashes ours) is
        never durable without ours.
        """
        # One round trip: a single statement in autocommit mode is its own transaction.
        # Never weaker than 'on' (a server-wide 'off' would make this wait for nothing);
        # stronger settings (remote_write, remote_apply) are kept.
        conn.execute(_FLUSH)

    def _insert_sql(self) -> sql.Composed:
        if self._insert is None:
            names = ["seq", "prev_hash", "hash", "body", "dedup_key", *_COLUMNS, "time"]
            types = ["bigint"] + ["bytea"] * 4 + ["text"] * (len(_COLUMNS) + 1)
            self._insert = sql.SQL("INSERT INTO {} ({}) SELECT * FROM unnest({})").format(
                self._table,
                sql.SQL(", ").join(sql.Identifier(n) for n in names),
                sql.SQL(", ").join(sql.SQL("%b::" + t + "[]") for t in types),
            )
        return self._insert

    def open_intents(self) -> list[int]:
        """Seqs of intent records that no later outcome record of the same span closes.

        The fast path of :func:`coworker.audit.query.in_doubt`: one query (a hash anti-join
        over the log; no span index is kept, it would slow every append).
        """
        query = sql.SQL(
            "SELECT i.seq FROM {t} i WHERE i.kind = 'intent' AND i.seq >= 1 AND NOT EXISTS ("
            "SELECT 1 FROM {t} o WHERE o.span_id = i.span_id AND o.kind = 'outcome'"
            " AND o.trace_id IS NOT DISTINCT FROM i.trace_id AND o.seq > i.seq) ORDER BY i.seq"
        ).format(t=self._table)
        return [row[0] for row in self._fetch(query, ())]

    # -- integrity -----------------------------------------------------------------------------
    def integrity_findings(self, head: Head | None) -> list[Finding]:
        """See :class:`~coworker.audit.store.IntegrityChecked`: columns against bodies,
        payloads against digests, rows outside ``1..head``, the guards' definitions (triggers,
        their function, the constraints, no rules or row-level security on the log)."""
        last = head.seq if head is not None else 0
        findings: list[Finding] = []
        with self._lock:
            try:
                conn = self._connection()
            except _ServerDown as exc:
                raise AuditUnavailable(f"audit store {self}: {exc}") from exc
            try:
                with self._deadline(conn), conn.cursor() as cur:
                    problems = _guard_problems(cur, self.schema)
                conn.commit()
            except psycopg.Error as exc:
                self._rollback_or_drop(conn)
                raise AuditUnavailable(f"audit store {self}: {exc}") from exc
        findings += [Finding(GUARD, None, p) for p in problems]
        # Only below 1: the head is the highest seq, and a row above it was appended after
        # the head was read (verify runs while the applications write).
        stray = self._fetch(
            sql.SQL("SELECT seq FROM {} WHERE seq < 1 ORDER BY seq LIMIT %s").format(self._table),
            (MAX_FINDINGS,),
        )
        findings += [
            Finding(OUT_OF_RANGE, r[0], f"seq {r[0]}: a row outside 1..{last} (never appended)")
            for r in stray
        ]
        orphans = self._fetch(
            sql.SQL(
                "SELECT p.seq FROM {} p WHERE p.payload IS NOT NULL AND NOT EXISTS ("
                "SELECT 1 FROM {} r WHERE r.seq = p.seq) ORDER BY p.seq LIMIT %s"
            ).format(self._payloads, self._table),
            (MAX_FINDINGS,),
        )
        findings += [
            Finding(PAYLOAD_MISMATCH, r[0], f"seq {r[0]}: a payload with no record")
            for r in orphans
        ]
        names = [*_COLUMNS, "time"]
        query = sql.SQL(
            "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload, {} FROM {} r"
            " LEFT JOIN {} p ON p.seq = r.seq WHERE r.seq >= %s AND r.seq <= %s"
            " ORDER BY r.seq LIMIT %s"
        ).format(
            sql.SQL(", ").join(sql.SQL("r.") + sql.Identifier(n) for n in names),
            self._table,
            self._payloads,
        )
        columns: list[Finding] = []
        payloads: list[Finding] = []
        erased = erased_seqs(self)
        next_seq = 1
        while next_seq <= last:
            rows = self._fetch(query, (next_seq, last, _PAGE))
            for row in rows:
                record = _record(row)
                try:
                    fields = json.loads(record.body)
                except ValueError:
                    continue  # the chain check already failed on it
                want = [None if v is None else v.decode() for v in _column_values(fields)]
                got = list(row[5:])
                if got != want:
                    wrong = ", ".join(
                        f"{n}={g!r} (body: {w!r})"
                        for n, g, w in zip(names, got, want, strict=True)
                        if g != w
                    )
                    if len(columns) < MAX_FINDINGS:
                        columns.append(
                            Finding(
                                COLUMN_MISMATCH,
                                record.seq,
                                f"seq {record.seq}: query column(s) differ from the record: "
                                + wrong,
                            )
                        )
                found = payload_finding(record, fields, self.key_for, erased)
                if found is not None and len(payloads) < MAX_FINDINGS:
                    payloads.append(found)
            if len(rows) < _PAGE:
                break
            next_seq = rows[-1][0] + 1
        return findings + columns + payloads

    def _warn_if_not_durable(self, conn: psycopg.Connection[Any]) -> None:
        # The flush waits for the server's fsync; with fsync=off there is none to wait for.
        if self._warned_fsync:
            return
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('fsync')")
            row = cur.fetchone()
        conn.commit()
        if row is not None and row[0] != "on":
            self._warned_fsync = True
            _log.warning(
                "audit store %s: the server runs with fsync=%s: a record whose append returned "
                "can be lost in an OS crash or power loss",
                self,
                row[0],
            )

    def _rearm(self, conn: psycopg.Connection[Any]) -> None:
        """On a read-write open: say loudly (ERROR) which guards are missing or altered, and
        put ours back when this role may (the owner); what happened meanwhile is verify's."""
        with conn.cursor() as cur:
            problems = _guard_problems(cur, self.schema)
        conn.commit()
        if not problems:
            return
        _log.error(
            "audit store %s: append-only guards tampered with: %s. Run `coworker audit verify`.",
            self,
            "; ".join(problems),
        )
        with conn.cursor() as cur:
            version = _installed_version(cur, _quote_ident(self.schema))
        conn.commit()
        ddl = _restore_guards_ddl(self.schema, version)
        try:
            with conn.cursor() as cur:
                cur.execute(ddl.encode())
            conn.commit()
        except psycopg.Error as exc:
            conn.rollback()
            _log.error(
                "audit store %s: could not restore the guards (the schema owner must): %s",
                self,
                str(exc).strip(),
            )
            return
        _log.error("audit store %s: coworker's triggers and guard functions restored", self)

    # -- connections ---------------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection[Any]:
        # Called with self._lock held.
        if self._closed:
            raise AuditUnavailable(f"audit store {self} is closed")
        if self._connected():
            assert self._conn is not None
            return self._conn
        if time.monotonic() < self._next_connect:
            raise _ServerDown(f"{self._last_error} (retrying within {_RECONNECT_INTERVAL:g}s)")
        return self._install(self._new_connection())

    def _connected(self) -> bool:
        conn = self._conn
        return conn is not None and self._pid == os.getpid() and not conn.closed

    def _install(self, conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
        with self._lock:
            if self._closed:
                conn.close()
                raise AuditUnavailable(f"audit store {self} is closed")
            if self._connected():  # another thread connected meanwhile: keep one
                conn.close()
                assert self._conn is not None
                return self._conn
            # A connection must not cross a fork: a child leaves the parent's socket alone.
            self._conn = conn
            self._pid = os.getpid()
            return conn

    def _new_connection(self) -> psycopg.Connection[Any]:
        """Connect and check the schema; not installed. Raises _ServerDown or AuditUnavailable."""
        with self._connect_lock:
            now = time.monotonic()
            try:
                conn = psycopg.connect(self._conninfo, autocommit=False, **self._connect_options)
            except psycopg.OperationalError as exc:
                message = str(exc).strip()
                if _refused_by_server(message):
                    raise AuditUnavailable(f"audit store {self}: {message}") from exc
                self._next_connect = now + _RECONNECT_INTERVAL
                self._last_error = message
                raise _ServerDown(message) from exc
            # Never REPEATABLE READ / SERIALIZABLE, whatever default_transaction_isolation
            # says: the head must be read after the lock is granted (see the module docstring).
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            if self.readonly:
                conn.read_only = True
            _register_arrays(conn)
            try:
                with self._deadline(conn):
                    self._ensure_schema(conn)
            except psycopg.Error as exc:
                unreachable = _is_unreachable(exc, conn)
                conn.close()
                if unreachable:
                    self._next_connect = now + _RECONNECT_INTERVAL
                    self._last_error = str(exc).strip()
                    raise _ServerDown(str(exc).strip()) from exc
                raise AuditUnavailable(f"audit store {self}: cannot use schema: {exc}") from exc
            except BaseException:
                conn.close()
                raise
            # From here on: autocommit; appends run explicit transactions (see _write),
            # reads are single statements.
            conn.autocommit = True
            if self.readonly:
                conn.execute("SET default_transaction_read_only = on")
            return conn

    # -- the watchdog ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _deadline(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """Cut ``conn`` if what runs inside takes longer than ``io_timeout``.

        libpq waits for a reply forever: keepalives and ``tcp_user_timeout`` catch a dead
        network, not a server (or proxy) that keeps the TCP connection open and never
        answers. The watchdog shuts the socket down, the blocked call fails as a lost
        connection, and the append spools (or raises) instead of holding the lock forever.
        """
        self._ensure_watchdog()
        token = object()
        with self._watch_lock:
            self._watches[id(token)] = (conn, time.monotonic(), os.getpid())
        try:
            yield
        finally:
            with self._watch_lock:
                del self._watches[id(token)]

    def _ensure_watchdog(self) -> None:
        pid = os.getpid()
        if self._watchdog is not None and self._watchdog_pid == pid:
            return
        with self._watch_lock:
            if self._watchdog is not None and self._watchdog_pid == pid:
                return
            self._watchdog = threading.Thread(
                target=self._watch_loop, name="coworker-audit-watchdog", daemon=True
            )
            self._watchdog_pid = pid
            self._watchdog.start()

    def _watch_loop(self) -> None:
        tick = min(max(self._io_timeout / 4, 0.05), 5.0)
        while not self._watch_stop.wait(tick):
            cut = 0
            with self._watch_lock:
                now = time.monotonic()
                pid = os.getpid()
                for key, (conn, started, owner) in list(self._watches.items()):
                    if owner != pid or now - started < self._io_timeout:
                        continue
                    # Under the lock: the owner cannot close the connection (and the kernel
                    # cannot reuse its descriptor) while we shut it down. The blocked call
                    # then fails as a lost connection.
                    self._watches[key] = (conn, float("inf"), owner)  # once per round trip
                    try:
                        fd = conn.pgconn.socket
                        with socket.socket(fileno=os.dup(fd)) as sock:
                            sock.shutdown(socket.SHUT_RDWR)
                        cut += 1
                    except (OSError, psycopg.Error):
                        continue
            if cut:
                _log.warning(
                    "audit store %s: no answer from the server within %gs; %d connection(s) cut",
                    self,
                    self._io_timeout,
                    cut,
                )

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        version = self._schema_version(conn)
        if not self.create and version is None:
            raise StoreNotFound(
                f"audit store {self}: no audit log in schema {self.schema!r} "
                "(wrong URL or schema name? this open creates nothing)"
            )
        if not self.readonly and (version is None or version < SCHEMA_VERSION):
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _DDL_LOCK))
                # Only when missing: CREATE SCHEMA IF NOT EXISTS still needs CREATE on the
                # database, which a schema owner that is not the database owner may lack.
                cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
                conn.commit()
                cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _DDL_LOCK))
                current = self._schema_version(conn, in_tx=True) or 0
                try:
                    for number in sorted(_MIGRATIONS):
                        if number <= current:
                            continue
                        ddl = (
                            _MIGRATIONS[number]
                            .replace("{schema}", _quote_ident(self.schema))
                            .replace("{namespace}", str(_LOCK_NAMESPACE))
                        )
                        cur.execute(ddl.encode())
                        cur.execute(
                            sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(
                                sql.Identifier(self.schema, "schema_version")
                            ),
                            (number,),
                        )
                    conn.commit()
                except psycopg.errors.InsufficientPrivilege:
                    if current < 1:
                        raise
                    # A writer role on a schema an older coworker made: keep writing at that
                    # version; the owner upgrades it by opening a store once.
                    conn.rollback()
                    _log.warning(
                        "audit store %s: schema version %d, this coworker would upgrade it to "
                        "%d (database-side chain checks) but this role may not; open a store "
                        "once as the schema owner",
                        self,
                        current,
                        SCHEMA_VERSION,
                    )
            version = self._schema_version(conn)
        if version is None or version > SCHEMA_VERSION:
            conn.close()
            raise ConfigError(
                f"audit store {self}: schema version {version}, this coworker knows "
                f"{SCHEMA_VERSION}; upgrade coworker"
            )
        self._key_table = version >= 3
        if not self.readonly:
            self._rearm(conn)
            self._warn_if_not_durable(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT %s::regclass::oid::int", (f"{_quote_ident(self.schema)}.records",))
            row = cur.fetchone()
            assert row is not None
            self._oid = int(row[0])
            self._lock_head = None  # built with the oid
        conn.commit()

    def _schema_version(self, conn: psycopg.Connection[Any], in_tx: bool = False) -> int | None:
        with conn.cursor() as cur:
            # A plain query on pg_class, not to_regclass(): that one reads the catalog cache,
            # which waiting for an advisory lock does not refresh, so a store that waited
            # while another created the schema would not see it and run the DDL again.
            cur.execute(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = 'schema_version'",
                (self.schema,),
            )
            row = cur.fetchone()
            if row is None:
                if not in_tx:
                    conn.commit()
                return None
            cur.execute(
                sql.SQL("SELECT max(version) FROM {}").format(
                    sql.Identifier(self.schema, "schema_version")
                )
            )
            found = cur.fetchone()
        if not in_tx:
            conn.commit()
        return None if found is None or found[0] is None else int(found[0])

    def _fetch(self, query: sql.Composed | sql.SQL, params: tuple[Any, ...]) -> list[Any]:
        with self._lock:
            for attempt in range(2):
                try:
                    conn = self._connection()
                except _ServerDown as exc:
                    raise AuditUnavailable(f"audit store {self}: {exc}") from exc
                try:
                    with self._deadline(conn), conn.cursor() as cur:
                        cur.execute(query, params)
                        rows = cur.fetchall()
                    conn.commit()
                    return rows
                except psycopg.Error as exc:
                    unreachable = _is_unreachable(exc, conn)
                    self._rollback_or_drop(conn)
                    if not unreachable or attempt == 1:
                        raise AuditUnavailable(f"audit store {self}: {exc}") from exc
                    self._next_connect = 0.0
        raise AssertionError("unreachable")  # pragma: no cover

    def _rollback_or_drop(self, conn: psycopg.Connection[Any]) -> None:
        try:
            if conn.broken or conn.closed:
                raise psycopg.OperationalError("connection lost")
            conn.rollback()
        except psycopg.Error:
            self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            try:
                conn.close()
            except psycopg.Error:  # pragma: no cover - closing a dead socket
                pass

    def __repr__(self) -> str:
        return f"PostgresStore({_redact(self.url)!r}, schema={self.schema!r})"


class _Array:
    """A PostgreSQL array already in binary wire format (psycopg's generic list dumper is
    pure Python and slow for thousands of elements; ours is one join)."""

    __slots__ = ("data",)
    elem_oid: int = 0

    def __init__(self, data: bytes) -> None:
        self.data = data

    @classmethod
    def of(cls, values: Sequence[bytes | None]) -> _Array:
        if not values:
            return cls(_ARRAY_EMPTY.pack(0, 0, cls.elem_oid))
        parts = [b""]
        has_null = 0
        for v in values:
            if v is None:
                parts.append(_NULL)
                has_null = 1
            else:
                parts.append(_INT4.pack(len(v)))
                parts.append(v)
        parts[0] = _ARRAY_HEADER.pack(1, has_null, cls.elem_oid, len(values), 1)
        return cls(b"".join(parts))


class _TextArray(_Array):
    __slots__ = ()
    elem_oid = 25


class _ByteaArray(_Array):
    __slots__ = ()
    elem_oid = 17


class _Int8Array(_Array):
    __slots__ = ()
    elem_oid = 20

    @classmethod
    def of(cls, values: Sequence[Any]) -> _Array:
        return super().of([_INT8.pack(v) for v in values])


_INT4: Final = struct.Struct("!i")
_INT8: Final = struct.Struct("!q")
_NULL: Final = _INT4.pack(-1)
_ARRAY_HEADER: Final = struct.Struct("!iiiii")
_ARRAY_EMPTY: Final = struct.Struct("!iii")


def _array_dumper(array_oid: int) -> type[Dumper]:
    class _ArrayDumper(Dumper):
        format = Format.BINARY
        oid = array_oid

        def dump(self, obj: Any) -> bytes:
            return obj.data  # type: ignore[no-any-return]

    return _ArrayDumper


def _register_arrays(conn: psycopg.Connection[Any]) -> None:
    conn.adapters.register_dumper(_TextArray, _array_dumper(1009))
    conn.adapters.register_dumper(_ByteaArray, _array_dumper(1001))
    conn.adapters.register_dumper(_Int8Array, _array_dumper(1016))


class _ServerDown(Exception):
    """No connection to the server right now."""


def _item_from_spool(entry: SpoolEntry) -> _Item:
    return _Item(entry.fields, entry.payload, entry.dedup_key, entry.attempted, entry.id)


def _bytes(value: Any) -> bytes:
    # A column the owner retyped (text, jsonb...) must give a report, not a TypeError.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if value is None:
        return b""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.encode("utf-8", "surrogatepass")


def _record(row: Sequence[Any]) -> StoredRecord:
    return StoredRecord(
        row[0],
        _bytes(row[1]),
        _bytes(row[2]),
        _bytes(row[3]),
        None if row[4] is None else _bytes(row[4]),
    )


def _column_values(fields: Mapping[str, Any]) -> list[bytes | None]:
    values = [_column(fields.get(c)) for c in _COLUMNS]
    values.append(_column(fields.get("start") or fields.get("recorded_at")))
    return values


def _column(value: Any) -> bytes | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    # PostgreSQL text cannot hold NUL (and a lone surrogate is not UTF-8): the body keeps the
    # exact value, the query column a readable stand-in, rather than the append failing.
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace")


# SQLSTATE classes that mean "the server or the connection is not there right now":
# 08 connection exception, 53 insufficient resources, 57P admin/crash shutdown, cannot connect
# now, 58 system error. Anything else (permissions, constraint violations) is not an outage
# and must not be hidden in the spool.
_UNREACHABLE_PREFIXES: Final = ("08", "53", "57P", "58")


def _is_unreachable(exc: psycopg.Error, conn: psycopg.Connection[Any]) -> bool:
    if conn.broken or conn.closed:
        return True
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith(_UNREACHABLE_PREFIXES)


# A server that answers FATAL at connection time for one of these is there, just busy.
_TRANSIENT_FATAL: Final = (
    "starting up", "shutting down", "recovery", "too many", "connection slots",
    "terminating connection", "not yet accepting", "out of memory",
)  # fmt: skip


def _refused_by_server(message: str) -> bool:
    """A connection refused for what it asked (role, database, password, parameter)."""
    if "FATAL:" not in message:
        return False
    return not any(phrase in message for phrase in _TRANSIENT_FATAL)


def _split_url(url: str) -> tuple[str, str, str | None]:
    """Return ``(libpq URL, schema, spool)`` from a coworker ``postgresql://`` URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme.startswith("postgresql+"):  # postgresql+psycopg://, as SQLAlchemy spells it
        scheme = "postgresql"
    if scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"url={_redact(url)!r} is not a postgresql:// URL")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    spool: str | None = None
    rest: list[tuple[str, str]] = []
    for key, value in query:
        if key == _URL_SCHEMA:
            schema = value
        elif key == _URL_SPOOL:
            spool = value
        else:
            rest.append((key, value))
    conninfo = urlunsplit(
        (scheme, parts.netloc, parts.path, urlencode(rest, quote_via=quote), parts.fragment)
    )
    return conninfo, schema, spool


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# Our triggers, as pg_get_triggerdef prints them ({s}: the schema as quote_ident prints it).
_GUARD_TRIGGERS: Final = {
    ("records", "records_no_change"): "CREATE TRIGGER records_no_change BEFORE DELETE OR UPDATE"
    " ON {s}.records FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change()",
    ("records", "records_no_change_stmt"): "CREATE TRIGGER records_no_change_stmt BEFORE DELETE"
    " OR UPDATE OR TRUNCATE ON {s}.records FOR EACH STATEMENT EXECUTE FUNCTION"
    " {s}.refuse_change()",
    ("schema_version", "schema_version_no_change"): "CREATE TRIGGER schema_version_no_change"
    " BEFORE DELETE OR UPDATE ON {s}.schema_version FOR EACH ROW EXECUTE FUNCTION"
    " {s}.refuse_change()",
    ("schema_version", "schema_version_no_change_stmt"): "CREATE TRIGGER"
    " schema_version_no_change_stmt BEFORE DELETE OR UPDATE OR TRUNCATE ON {s}.schema_version"
    " FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change()",
}
_GUARD_CONSTRAINTS: Final = {
    "records_pkey": "PRIMARY KEY (seq)",
    "records_seq_check": "CHECK ((seq >= 1))",
    "records_prev_hash_check": "CHECK ((octet_length(prev_hash) = 32))",
    "records_hash_check": "CHECK ((octet_length(hash) = 32))",
    "records_prev_hash_key": "UNIQUE (prev_hash)",
}
_GUARDED_TABLES: Final = ("records", "payloads", "schema_version")

# Guards that came with a schema version after 1: (table, trigger) -> definition.
_GUARD_TRIGGERS_V2: Final = {
    ("records", "records_chain"): "CREATE TRIGGER records_chain AFTER INSERT ON {s}.records"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.check_chain()",
}


def _guards_for(version: int) -> tuple[dict[tuple[str, str], str], list[str]]:
    """The triggers and the DDL texts (for their functions) of a schema at ``version``."""
    triggers = dict(_GUARD_TRIGGERS)
    ddls = [_DDL_V1]
    if version >= 2:
        triggers.update(_GUARD_TRIGGERS_V2)
        ddls.append(_DDL_V2)
    return triggers, ddls


def _function_sources(ddls: Sequence[str]) -> dict[str, str]:
    """The bodies (``prosrc``) of our PL/pgSQL functions, with ``{schema}`` still in them."""
    import re

    return {
        m.group(1): m.group(2)
        for ddl in ddls
        for m in re.finditer(
            r"CREATE (?:OR REPLACE )?FUNCTION \{schema\}\.(\w+)\(.*?\$\$(.*?)\$\$",
            ddl,
            re.DOTALL,
        )
    }


def _installed_version(cur: psycopg.Cursor[Any], qs: str) -> int:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{qs}.schema_version",))
    row = cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur.execute(f"SELECT coalesce(max(version), 0) FROM {qs}.schema_version")
    found = cur.fetchone()
    return int(found[0]) if found is not None else 0


def _guard_problems(cur: psycopg.Cursor[Any], schema: str) -> list[str]:
    """What is wrong with the append-only guards of ``schema``: missing, altered, foreign."""
    cur.execute("SELECT quote_ident(%s)", (schema,))
    row = cur.fetchone()
    assert row is not None
    qs = row[0]
    guard_triggers, ddls = _guards_for(_installed_version(cur, _quote_ident(schema)))
    problems: list[str] = []
    cur.execute(
        "SELECT c.relname, t.tgname, t.tgenabled, pg_get_triggerdef(t.oid) FROM pg_trigger t"
        " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND NOT t.tgisinternal",
        (schema,),
    )
    present = {(r[0], r[1]): (r[2], r[3]) for r in cur.fetchall()}
    for key, definition in guard_triggers.items():
        found = present.get(key)
        if found is None:
            problems.append(f"trigger {key[1]} on {key[0]} is missing")
        elif found[1] != definition.format(s=qs):
            problems.append(f"trigger {key[1]} on {key[0]} is altered (not coworker's)")
        elif found[0] != "A":
            problems.append(f"trigger {key[1]} on {key[0]} is not ENABLE ALWAYS ({found[0]})")
    for table, name in sorted(set(present) - set(guard_triggers)):
        if table in _GUARDED_TABLES:
            problems.append(f"trigger {name} on {table} is not coworker's")
    cur.execute(
        "SELECT p.proname, p.prosrc, p.prosecdef, p.proconfig FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s",
        (schema,),
    )
    functions = {r[0]: (r[1], r[2], r[3]) for r in cur.fetchall()}
    for name, source in _function_sources(ddls).items():
        # The DDL ran with the schema always double-quoted (_quote_ident), not as quote_ident.
        expected = source.replace("{schema}", _quote_ident(schema)).replace(
            "{namespace}", str(_LOCK_NAMESPACE)
        )
        got = functions.get(name)
        if got is None:
            problems.append(f"function {name} is missing")
        elif got != (expected, False, None):
            problems.append(f"function {name} is altered (not coworker's)")
    cur.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
        "to_regclass(%s)",
        (f"{qs}.records",),
    )
    constraints = dict(cur.fetchall())
    for name, definition in _GUARD_CONSTRAINTS.items():
        if constraints.get(name) != definition:
            state = "missing" if name not in constraints else "altered"
            problems.append(f"constraint {name} on records is {state}")
    cur.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"
        " AND a.attname = ANY(%s)",
        (f"{qs}.records", ["seq", "prev_hash", "hash", "body"]),
    )
    types = dict(cur.fetchall())
    for column, wanted in (("seq", "bigint"), ("prev_hash", "bytea"), ("hash", "bytea")):
        if types.get(column) != wanted:
            problems.append(f"column records.{column} is {types.get(column)}, not {wanted}")
    if types.get("body") != "bytea":
        # jsonb would reorder keys, text would re-encode: the hashed bytes are gone.
        problems.append(f"column records.body is {types.get('body')}, not bytea")
    cur.execute(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,"
        " (SELECT count(*) FROM pg_rewrite w WHERE w.ev_class = c.oid AND w.rulename <> '_RETURN')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s)",
        (schema, list(_GUARDED_TABLES)),
    )
    for table, rls, force, rules in cur.fetchall():
        if rls or force:
            problems.append(f"row-level security is on for {table} (it can hide records)")
        if rules:
            problems.append(f"{rules} rule(s) on {table} (a rule can drop or divert inserts)")
    return problems


def _restore_guards_ddl(schema: str, version: int) -> str:
    """DDL that puts our functions and triggers back (the owner may run it)."""
    import re

    qs = _quote_ident(schema)
    guard_triggers, ddls = _guards_for(version)
    texts = [d.replace("{schema}", qs).replace("{namespace}", str(_LOCK_NAMESPACE)) for d in ddls]
    statements = [
        m.group(0).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
        for ddl in texts
        for m in re.finditer(r"CREATE (?:OR REPLACE )?FUNCTION .*?\$\$.*?\$\$;", ddl, re.DOTALL)
    ]
    for (table, name), _ in guard_triggers.items():
        statements.append(f"DROP TRIGGER IF EXISTS {name} ON {qs}.{table};")
    statements += [
        m.group(0)
        for ddl in texts
        for m in re.finditer(
            r"(?:CREATE TRIGGER|ALTER TABLE) .*?;", ddl.split("$$;")[-1], re.DOTALL
        )
    ]
    return "\n".join(statements)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
