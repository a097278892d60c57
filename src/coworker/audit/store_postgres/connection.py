"""Connections, the watchdog and the schema check of the PostgreSQL store."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from coworker.audit.erasure import KeyStore
from coworker.audit.spool import Spool
from coworker.audit.store import (
    StoreNotFound,
)
from coworker.audit.store_postgres._wire import (
    _RECONNECT_INTERVAL,
    _close_owned,
    _is_unreachable,
    _refused_by_server,
    _register_arrays,
    _ServerDown,
)
from coworker.audit.store_postgres.ddl import (
    _DDL_LOCK,
    _LOCK_NAMESPACE,
    _MIGRATIONS,
    SCHEMA_VERSION,
    _quote_ident,
    render,
)
from coworker.audit.store_postgres.guards import (
    _guard_problems,
    _installed_version,
    _restore_guards_ddl,
)
from coworker.exceptions import AuditUnavailable, ConfigError

_log = logging.getLogger("coworker.audit")


class _Connections:
    """The connection of a store, its watchdog and its schema check.

    The attributes are set by :class:`~coworker.audit.store_postgres.PostgresStore`.
    """

    url: str
    schema: str
    base_schema: str
    chain: str
    readonly: bool
    create: bool
    encrypt_payloads: bool
    subject_field: str
    keystore: KeyStore | None
    _key_table: bool
    _conninfo: str
    _connect_options: dict[str, Any]
    _connect_timeout: float
    _ship_interval: float
    _io_timeout: float
    _table: sql.Identifier
    _payloads: sql.Identifier
    _lock: threading.RLock
    _conn: psycopg.Connection[Any] | None
    _pid: int
    _oid: int | None
    _version: int
    _floor: int
    _sealed_seq: int
    _insert: sql.Composed | None
    _lock_head: sql.Composed | None
    _append_sql: bytes | None
    _prepared: psycopg.Connection[Any] | None
    _next_connect: float
    _last_error: str
    _closed: bool
    _stop: threading.Event
    _shipper: threading.Thread | None
    _shipper_pid: int
    _connect_lock: threading.Lock
    _watch_lock: threading.Lock
    _watches: dict[int, tuple[psycopg.Connection[Any], float, int]]
    _watch_stop: threading.Event
    _watchdog: threading.Thread | None
    _watchdog_pid: int
    _warned_fsync: bool
    _spool: Spool | None
    _spool_path: Path | None

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
            problems = _guard_problems(cur, self.schema, self.chain)
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
        ddl = _restore_guards_ddl(self.schema, version, self.chain)
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
                    self._session_defaults(conn)
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
            return conn

    def _session_defaults(self, conn: psycopg.Connection[Any]) -> None:
        """Round trips of the connection's setup: inside the same error handling as the schema
        check, so a backend terminated between connect and these statements is a server
        that went away (spool, retry), not a psycopg error escaping ``append()``."""
        # From here on: autocommit; appends run explicit transactions (see _write),
        # reads are single statements.
        conn.autocommit = True
        # Statements outside an explicit BEGIN (the server-side append) run at the
        # session's default isolation: READ COMMITTED, whatever the server's default says
        # (append() refuses anything else rather than read a stale head).
        # Our SQL names its tables by schema, but not every function and operator: resolved
        # in pg_catalog alone, so that a search_path the database's owner sets (ALTER
        # DATABASE ... SET search_path = evil, pg_catalog) cannot slip a function of its own
        # into the durable flush (a no-op: appends answered durable before they are), a
        # read (an "=" that hides a record from a query) or a dedup lookup.
        conn.execute(
            "SET search_path = pg_catalog, pg_temp;"
            " SET default_transaction_isolation = 'read committed'"
        )
        if self.readonly:
            conn.execute("SET default_transaction_read_only = on")

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
        if self.chain and not self.readonly:
            # A named chain is registered in the default chain before its first record
            # (coworker.audit.chain_registry): its schema dropped, it is named vanished.
            from coworker.audit.chain_registry import open_postgres_chain
            from coworker.audit.chain_seal import ChainSealed

            try:
                open_postgres_chain(self, conn, lambda: self._ensure_chain_schema(conn))
            except ChainSealed as exc:
                # Retired: from now on appends are refused, never spooled (shipper.py).
                self._sealed_seq = exc.seq or self._sealed_seq or -1
                raise
        else:
            self._ensure_chain_schema(conn)

    def _ensure_chain_schema(self, conn: psycopg.Connection[Any]) -> None:
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
                        ddl = render(_MIGRATIONS[number], self.schema, self.chain)
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
                        "%d (database-side chain checks, the server-side append) but this role "
                        "may not; open a store once as the schema owner",
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
        self._version = version
        if not self.readonly:
            self._rearm(conn)
            self._warn_if_not_durable(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT %s::regclass::oid::int", (f"{_quote_ident(self.schema)}.records",))
            row = cur.fetchone()
            assert row is not None
            self._oid = int(row[0])
            self._lock_head = self._append_sql = None  # built with the oid
            self._prepared = None
            # The floor for finding a lost server-side append (writes._write_fast): rows
            # appended from now on are above it.
            cur.execute(
                sql.SQL("SELECT seq FROM {} WHERE seq >= 1 ORDER BY seq DESC LIMIT 1").format(
                    self._table
                )
            )
            head = cur.fetchone()
            self._floor = max(self._floor, int(head[0])) if head is not None else self._floor
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
        _close_owned(conn, self._pid)
