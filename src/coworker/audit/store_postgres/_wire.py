"""Wire helpers of the PostgreSQL store: binary arrays, row decoding, URLs, error classes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import pq
from psycopg.adapt import Dumper
from psycopg.pq import Format

from coworker.audit.record import QUERY_FILTERS
from coworker.audit.spool import SpoolEntry
from coworker.audit.store import (
    StoredRecord,
)
from coworker.exceptions import ConfigError

_log = logging.getLogger("coworker.audit")

DEFAULT_SCHEMA: Final = "coworker_audit"
"""The PostgreSQL schema that holds the audit tables unless the URL says ``?schema=``."""


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
    # One spool per chain (a spooled entry is sealed onto the chain it waits for).
    digest = hashlib.sha256(f"{key}|{chain_schema(schema, url_chain(url))}".encode()).hexdigest()
    digest = digest[:16]
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
        add, size = parts.append, _INT4.pack
        has_null = 0
        for v in values:
            if v is None:
                add(_NULL)
                has_null = 1
            else:
                add(size(len(v)))
                add(v)
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


def _pipelined(
    conn: psycopg.Connection[Any],
    calls: Sequence[tuple[bytes, Sequence[bytes | None] | None]],
    prepare: Sequence[tuple[bytes, bytes, Sequence[int]]] = (),
    prepared: Callable[[], None] | None = None,
) -> list[pq.abc.PGresult]:
    """Run prepared statements in one round trip, each its own transaction; their results.

    ``calls`` are ``(statement name, binary parameters)``; each is followed by a Sync, so each
    commits on its own (autocommit) and one that fails does not stop the next. ``prepare``
    (``(name, query, parameter type oids)``) are sent first, in the same round trip: the
    statements a new connection has not prepared yet; ``prepared()`` is called once they all
    are, even when a call then fails (the session keeps them). This is libpq's pipeline mode driven
    directly: psycopg's own pipeline costs about 170 µs of client CPU for two statements here
    against about 25 µs, and an append of one record pays it every time. Every result is read
    before returning (the connection is idle again); then the first error is raised as
    psycopg raises it. Waiting happens in poll() (the GIL released: the store's watchdog can
    cut a hung connection, which then raises :class:`psycopg.OperationalError` with
    ``conn.broken``); anything that interrupts the exchange midway closes the connection, so
    that it is never reused half-read.
    """
    pg = conn.pgconn
    done = False
    pg.enter_pipeline_mode()
    try:
        for name, query, types in prepare:
            pg.send_prepare(name, query, list(types))
        for name, params in calls:
            formats = None if params is None else [1] * len(params)
            pg.send_query_prepared(name, params, param_formats=formats, result_format=1)
            pg.pipeline_sync()
        fd = pg.socket
        while pg.flush():
            _wait(fd, write=True)
        results: list[pq.abc.PGresult] = []
        error: pq.abc.PGresult | None = None
        syncs = 0
        while syncs < len(calls):
            while pg.is_busy():
                _wait(fd, write=False)
                pg.consume_input()
            res = pg.get_result()
            if res is None:
                continue  # the end of one statement's results
            status = res.status
            if status == pq.ExecStatus.PIPELINE_SYNC:
                syncs += 1
                continue
            last_prepare = len(results) == len(prepare) - 1
            if last_prepare and status == pq.ExecStatus.COMMAND_OK and error is None and prepared:
                prepared()
            if error is None and status in (
                pq.ExecStatus.FATAL_ERROR,
                pq.ExecStatus.PIPELINE_ABORTED,
            ):
                error = res
            results.append(res)
        pg.exit_pipeline_mode()
        done = True
    finally:
        if not done and pg.status != pq.ConnStatus.BAD:
            conn.close()  # interrupted midway: never reuse a connection half-read
    if error is not None:
        if error.status == pq.ExecStatus.PIPELINE_ABORTED:  # pragma: no cover - after an error
            raise psycopg.errors.PipelineAborted("pipeline aborted")
        raise psycopg.errors.error_from_result(error, encoding=conn.info.encoding)
    return results[len(prepare) :]


def _wait(fd: int, *, write: bool) -> None:
    # poll(), unlike select(), takes descriptors above FD_SETSIZE; select() where it is
    # missing (Windows sockets are small integers there).
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        poller.poll()
    elif write:
        select.select([], [fd], [fd])
    else:
        select.select([fd], [], [fd])


def _int(value: bytes | None) -> int | None:
    """A binary int2/int4/int8 result value."""
    return None if value is None else int.from_bytes(value, "big", signed=True)


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


def _column_arrays(rows: Sequence[Mapping[str, Any]]) -> list[_Array]:
    """The query columns of ``rows``, one binary ``text[]`` per column (:data:`_COLUMNS`, then
    ``time``): byte for byte ``_TextArray.of`` of :func:`_column_values` transposed, built
    column by column in one pass (it runs for every record appended: no per-value calls)."""
    if not rows:
        return [_TextArray.of([]) for _ in range(len(_COLUMNS) + 1)]
    dumps, size = json.dumps, _INT4.pack
    header = _ARRAY_HEADER.pack
    out: list[_Array] = []
    for c in (*_COLUMNS, "time"):
        if c == "time":
            values = [f.get("start") or f.get("recorded_at") for f in rows]
        else:
            values = [f.get(c) for f in rows]
        parts = [b""]
        add = parts.append
        has_null = 0
        for v in values:
            if v is None:
                add(_NULL)
                has_null = 1
                continue
            # The same as _column(): a readable stand-in for NUL and lone surrogates.
            text = (v if isinstance(v, str) else dumps(v)).replace("\x00", "\ufffd")
            data = text.encode("utf-8", "replace")
            add(size(len(data)))
            add(data)
        parts[0] = header(1, has_null, _TextArray.elem_oid, len(rows), 1)
        out.append(_TextArray(b"".join(parts)))
    return out


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


def url_chain(url: str) -> str:
    """The chain a ``postgresql://`` URL names (``?chain=NAME``), or the default chain ``""``.

    Raises:
        ConfigError: not a valid chain name, `chain=` empty, or `chain` given twice.
    """
    from coworker.audit.chain import chain_from_query

    names = [v for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True) if k == "chain"]
    try:
        return chain_from_query(names)
    except ValueError as exc:
        raise ConfigError(f"url={_redact(url)!r}: {exc}") from None


def chain_schema(schema: str, chain: str) -> str:
    """The PostgreSQL schema that holds ``chain`` of the store in ``schema``: the schema itself
    for the default chain, ``<schema>:<chain>`` for a named one (its own tables, lock, guards,
    sequence and head)."""
    return schema if not chain else f"{schema}:{chain}"


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
        elif key == "chain":
            continue  # url_chain()
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


def _close_owned(conn: psycopg.Connection[Any] | None, pid: int) -> None:
    """Close ``conn`` if this process (``pid``) opened it; a child never touches its parent's
    socket. Closing a dead connection's socket may fail: that is ignored."""
    if conn is not None and pid == os.getpid():
        try:
            conn.close()
        except psycopg.Error:  # pragma: no cover - closing a dead socket
            pass
