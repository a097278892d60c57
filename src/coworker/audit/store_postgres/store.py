"""PostgresStore: the shared audit store."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from coworker.audit import _fork
from coworker.audit.chain import check_chain_name
from coworker.audit.erasure import KeyStore
from coworker.audit.spool import Spool
from coworker.audit.store import (
    StoredRecord,
)
from coworker.audit.store_postgres._wire import (
    AppendResult,
    _Item,
    _redact,
    _ServerDown,
    _split_url,
    chain_schema,
    default_spool_path,
    url_chain,
)
from coworker.audit.store_postgres.erase import _Erasure
from coworker.audit.store_postgres.group_flush import FlushLost, GroupFlush, PendingAppend
from coworker.exceptions import ConfigError

_log = logging.getLogger("coworker.audit")


class PostgresStore(_Erasure):
    """An :class:`~coworker.audit.store.AuditStore` in PostgreSQL, shared by processes and hosts.

    Safe to share between threads. Creates its schema on first use when the connecting role
    may (idempotent, versioned, serialized by an advisory lock); a writer role with INSERT and
    SELECT only uses an existing schema.

    Args:
        url: ``postgresql://user@host:port/dbname`` plus libpq parameters; coworker's own
            query parameters: ``schema`` (default :data:`DEFAULT_SCHEMA`), ``chain`` (a
            chain name) and ``spool`` (a file path, or ``off``).
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
        chain: the chain to open (overrides the URL's ``?chain=``); default: the default chain.
            A named chain lives in the schema ``<schema>:<chain>`` with its own lock, seq,
            head and guards; its genesis binds its name (:func:`coworker.audit.chain.genesis`).

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
        chain: str | None = None,
    ) -> None:
        conninfo, url_schema, url_spool = _split_url(url)
        if encrypt_payloads is None:
            import importlib.util

            encrypt_payloads = importlib.util.find_spec("cryptography") is not None
        self.encrypt_payloads = encrypt_payloads
        self.subject_field = subject_field
        self.keystore = keystore
        self._key_table = False  # set when the schema (version 3+) has one
        self.base_schema = schema or url_schema
        if ":" in self.base_schema:
            raise ConfigError(
                f"schema={self.base_schema!r}: ':' separates a chain from its store's schema; "
                "name the chain with ?chain=NAME"
            )
        try:
            self.chain = check_chain_name(chain) if chain is not None else url_chain(url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.schema = chain_schema(self.base_schema, self.chain)
        # PostgreSQL cuts an identifier at 63 *bytes* (NAMEDATALEN - 1), silently: a longer
        # "<schema>:<chain>" would land in the schema of another chain sharing its first 63
        # bytes (and be sealed onto that chain). Refuse it instead.
        if not self.base_schema or len(self.schema.encode("utf-8")) > 63:
            raise ConfigError(
                f"schema={self.schema!r} is not a valid PostgreSQL schema name "
                "(empty, or longer than 63 bytes in UTF-8)"
            )
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
        self._append_sql: bytes | None = None
        self._prepared: psycopg.Connection[Any] | None = None
        self._version = 0  # the schema version, known once connected
        self._floor = 0  # a seq below every record this store may still append
        self._sealed_seq = 0  # once an append found the chain sealed (retired): its seal
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
        # Durable flushes of submit_unique's appends, on a connection of their own.
        self._group = GroupFlush(self._connect_flusher, self._flush_on)
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
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        # Another thread of the parent may have held these through a round trip at the fork;
        # its connection stays the parent's (pid-checked: the child connects anew).
        self._lock = threading.RLock()
        self._connect_lock = threading.Lock()
        self._watch_lock = threading.Lock()
        self._watches = {}

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
        items = self._unique_items(entries, payloads, dedup_keys)
        return self._append(items) if items else AppendResult([])

    def submit_unique(
        self,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None,
        dedup_keys: Sequence[bytes],
    ) -> PendingAppend:
        """Like :meth:`append_unique`, but return once the entries are committed, before
        they are durable: :meth:`PendingAppend.wait` returns the result once they are.

        This is group commit for concurrent appenders (the ingest endpoint's requests): the
        store's connection is free for the next append while this one waits for the WAL
        fsync, and one durable flush, on a connection of its own, answers every append
        committed before it was sent (:mod:`coworker.audit.store_postgres.group_flush`).
        Nothing is durable, and no caller may say it is, before ``wait()`` returned.

        Args:
            entries: record fields without ``seq``.
            payloads: one payload (or ``None``) per entry, or ``None``.
            dedup_keys: one key per entry.

        Returns:
            The pending append (already durable when the append had to take another way:
            a retry after a lost answer, the spool, an older schema).

        Raises:
            AuditUnavailable: nothing was written or spooled.
        """
        items = self._unique_items(entries, payloads, dedup_keys)
        if not items:
            return PendingAppend(AppendResult([]))
        try:
            connection = self._group.connection()  # up before the append is sent
        except (_ServerDown, FlushLost):
            return PendingAppend(self._append(items))  # as append_unique decides
        owed: list[_Item] = []
        result = self._append(items, owed)
        if not owed:
            return PendingAppend(result)
        return PendingAppend(
            result, self._group, self._group.ticket(connection), lambda: self._append(owed)
        )

    def reader(self) -> PostgresStore:
        """A read-only store on a connection of its own: the same server, schema and chain.

        For reads that must not queue behind this store's appends on its one connection
        (the ingest endpoint's conflict lookups). It sees every committed record, an
        asynchronously committed one included. Close it when done.
        """
        return PostgresStore(
            self.url,
            schema=self.base_schema,
            chain=self.chain,
            readonly=True,
            connect_timeout=self._connect_timeout,
            io_timeout=self._io_timeout,
            encrypt_payloads=self.encrypt_payloads,
            subject_field=self.subject_field,
            keystore=self.keystore,
        )

    def _unique_items(
        self,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None,
        dedup_keys: Sequence[bytes],
    ) -> list[_Item]:
        if len(dedup_keys) != len(entries):
            raise ConfigError("dedup_keys must have one key per entry")
        if not entries:
            return []
        entries, payloads = self._seal_payloads(entries, payloads)
        return [
            _Item(f, payloads[i] if payloads is not None else None, dedup_keys[i])
            for i, f in enumerate(entries)
        ]

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
            self._group.close()

    def __repr__(self) -> str:
        return f"PostgresStore({_redact(self.url)!r}, schema={self.schema!r})"
