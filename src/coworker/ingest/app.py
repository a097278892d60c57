"""The ingest ASGI app: ``POST /v1/traces`` (authenticate, decode, dedup, append, answer) and
``GET /health``."""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final

import anyio
from opentelemetry.instrumentation.utils import suppress_instrumentation
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coworker.audit.record import (
    CATEGORY_INGEST_CONFLICT,
)
from coworker.audit.store import AuditStore
from coworker.exceptions import AuditUnavailable, ConfigError
from coworker.ingest.decode import (
    _JSON,
    _PROTOBUF,
    _PROTOBUF_TYPES,
    DEFAULT_MAX_ATTRIBUTE_LENGTH,
    DEFAULT_MAX_ATTRIBUTES,
    DEFAULT_MAX_BODY_BYTES,
)
from coworker.ingest.records import (
    _IDS_LEN,
    _KEY_LEN,
    _by_ids,
    _conflicts,
    _SeenSpans,
    content_digest,
)
from coworker.ingest.responses import _status_response, _success, _too_large
from coworker.ingest.tokens import IngestToken, _secret_digest
from coworker.ingest.usage import is_usage_key
from coworker.ingest.workers import (
    REJECT,
    Decoded,
    DecodePool,
    WorkerDied,
    WorkerFailed,
    decode_body,
    record_of,
)

_log = logging.getLogger("coworker.ingest")

DEFAULT_RETRY_AFTER: Final = 5
"""Seconds sent in ``Retry-After`` with a 503."""
TRACES_PATH: Final = "/v1/traces"
HEALTH_PATH: Final = "/health"

# -- the app -------------------------------------------------------------------------------------
_STATS: Final = (
    "requests",
    "appended",
    "duplicates",
    "rejected",
    "forbidden",
    "conflicts",
    "unauthorized",
    "read_timeouts",
    "refused_connections",
)


class _Ingest:
    def __init__(
        self,
        store: AuditStore,
        *,
        token: str | None,
        tokens: Sequence[IngestToken] | None,
        max_body_bytes: int,
        retry_after: int,
        max_attribute_length: int,
        max_attributes: int,
        close_store: bool,
        meter_provider: Any = None,
        decode_workers: int = 0,
    ) -> None:
        if decode_workers < 0:
            raise ConfigError(f"decode_workers={decode_workers!r} must not be negative")
        if max_body_bytes <= 0:
            raise ConfigError(f"max_body_bytes={max_body_bytes!r} must be positive")
        if retry_after < 0:
            raise ConfigError(f"retry_after={retry_after!r} must not be negative")
        if max_attributes <= 0:
            raise ConfigError(f"max_attributes={max_attributes!r} must be positive")
        if token is not None and tokens is not None:
            raise ConfigError("give token (one shared secret) or tokens (a token file), not both")
        if token is not None and not token.strip():
            raise ConfigError("token must not be empty (use None to disable authentication)")
        if tokens is not None and not tokens:
            raise ConfigError("tokens must not be empty (use None to disable authentication)")
        self.store = store
        self.tokens: list[IngestToken] | None = (
            [IngestToken.shared(token)] if token is not None else list(tokens or []) or None
        )
        self.max_body_bytes = max_body_bytes
        self.retry_after = retry_after
        self.max_attribute_length = max_attribute_length
        self.max_attributes = max_attributes
        self.close_store = close_store
        self.unique = getattr(store, "append_unique", None)
        # Group commit (PostgresStore): the next request's append runs while this one's
        # waits for the WAL fsync.
        self.submit = getattr(store, "submit_unique", None)
        # The conflict lookups after each append go through a reader of their own where the
        # store has one (PostgresStore.reader), so that they do not hold up the next
        # request's append on the store's connection; opened at the first lookup.
        self.between = getattr(store, "dedup_keys_between", None)
        self._open_reader = getattr(store, "reader", None)
        self._reader: Any = None  # a PostgresStore
        self._reader_lock = threading.Lock()
        self.seen = None if self.unique is not None else _SeenSpans(store)
        self.append_lock = threading.Lock()
        self.in_flight = 0
        self.idle = threading.Condition()
        self.stats_lock = threading.Lock()
        self.stats = dict.fromkeys(_STATS, 0)
        self.meter_provider = meter_provider
        self.pool = DecodePool(decode_workers) if decode_workers else None

    def _log_trust(self) -> None:
        # What the server trusts is a deployment decision: say it once, at start, loudly when
        # it is "everything".
        if self.tokens is None:
            _log.warning(
                "ingest runs WITHOUT authentication: any client that can connect may write "
                "audit records for any service, user and agent"
            )
        elif any(t.trusts_everything for t in self.tokens):
            names = ", ".join(t.name for t in self.tokens if t.trusts_everything)
            _log.warning(
                "ingest token(s) %s may write audit records for ANY service, user and agent "
                '(a single shared secret or services=["*"]): use a token file to limit them',
                names,
            )
        else:
            _log.info("ingest accepts %d token(s), each limited to its services", len(self.tokens))

    def count(self, **deltas: int) -> None:
        """Add to the stats (from the event loop and from worker threads)."""
        with self.stats_lock:
            for key, delta in deltas.items():
                self.stats[key] += delta
        from coworker.metrics import ingest_spans

        for key, delta in deltas.items():
            result = _METRIC_RESULTS.get(key)
            if result is not None and delta:
                ingest_spans(result, delta, meter_provider=self.meter_provider)

    # -- request handling ----------------------------------------------------------------------
    async def traces(self, request: Request) -> Response:
        self.count(requests=1)
        allowed, token = self._authorized(request)
        if not allowed:
            self.count(unauthorized=1)
            return _status_response(
                401, "missing or invalid bearer token", _PROTOBUF, {"WWW-Authenticate": "Bearer"}
            )
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media in _PROTOBUF_TYPES:
            media = _PROTOBUF
        elif media != _JSON:
            return _status_response(
                415, f"unsupported content type {media!r}; use {_PROTOBUF} or {_JSON}", _PROTOBUF
            )
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "", "gzip", "deflate"):
            return _status_response(415, f"unsupported content encoding {encoding!r}", media)
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return _status_response(400, "invalid Content-Length", media)
            if length > self.max_body_bytes:
                return _too_large(self.max_body_bytes, media)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    return _too_large(self.max_body_bytes, media)
                chunks.append(chunk)
        except ClientDisconnect:
            # The client hung up (or the read timeout closed the connection) before the body
            # was complete: nothing to append, nobody to answer.
            _log.info("client disconnected before sending the whole body (%d bytes read)", size)
            return Response(status_code=400)
        body = b"".join(chunks)
        self._enter()
        try:
            # Decoding (in a worker process, waited for here) and appending are CPU and I/O
            # bound: off the event loop, in one thread. The thread is not cancellable, so a
            # client that hangs up does not abort an append half-way.
            return await anyio.to_thread.run_sync(self._serve, body, media, encoding, token)
        finally:
            self._leave()

    def _serve(self, body: bytes, media: str, encoding: str, token: IngestToken | None) -> Response:
        decoded = self._decoded(body, media, encoding, token.name if token is not None else None)
        return self._handle(body, media, encoding, token, decoded)

    def _decoded(self, body: bytes, media: str, encoding: str, name: str | None) -> Decoded | None:
        """The request decoded by a worker process (this thread waits for it), or ``None``:
        decode in this process (no pool, or the pool failed; a dead worker never loses a
        request)."""
        pool = self.pool
        if pool is None:
            return None
        if pool.broken:
            pool.restart()
        try:
            return pool.decode(
                body, media, encoding, self.max_body_bytes, self.max_attribute_length,
                self.max_attributes, name,
            )  # fmt: skip
        except WorkerDied as exc:
            pool.mark_broken(exc.workers)
        except WorkerFailed as exc:
            _log.error("ingest decoding worker failed; decoding in the server process:\n%s", exc)
        except Exception:
            _log.exception("ingest decoding worker failed; decoding in the server process")
        return None

    def _handle(
        self,
        body: bytes,
        media: str,
        encoding: str,
        token: IngestToken | None,
        decoded: Decoded | None = None,
    ) -> Response:
        name = token.name if token is not None else None
        if decoded is None:
            decoded = decode_body(
                body, media, encoding, self.max_body_bytes, self.max_attribute_length,
                self.max_attributes, name,
            )  # fmt: skip
        if decoded.status == 413:
            return _too_large(self.max_body_bytes, media)
        if decoded.status is not None:
            return _status_response(decoded.status, decoded.message, media)
        batch = decoded.batch
        entries: list[Mapping[str, Any]] = []
        payloads: list[bytes | None] = []
        keys: list[bytes] = []
        forbidden = 0
        for item in decoded.items:
            if item[0] == REJECT:
                batch.reject(item[1])
                continue
            record, payload, key = record_of(item)
            refusal = token.refusal(record) if token is not None else None
            if record.get("category") == CATEGORY_INGEST_CONFLICT:
                # Only the server writes conflict records: a client's would read as one.
                refusal = f"category {CATEGORY_INGEST_CONFLICT!r} is reserved for the server"
            if refusal is not None:
                batch.reject(f"span {item[1]!r}: {refusal}")
                forbidden += 1
                continue
            entries.append(record)
            payloads.append(payload)
            keys.append(key)
        if entries:
            try:
                appended, duplicates, conflicts = self._append(entries, payloads, keys, name)
            except AuditUnavailable as exc:
                _log.warning(
                    "cannot append %d audit record(s), answering 503: %s", len(entries), exc
                )
                return _status_response(
                    503,
                    "the audit store cannot append right now; retry later",
                    media,
                    {"Retry-After": str(self.retry_after)},
                )
            except Exception:
                # Unexpected, but the client still holds the spans: 503 makes it retry, a 500
                # would make it drop them.
                _log.exception("unexpected error appending %d audit record(s)", len(entries))
                return _status_response(
                    503,
                    "internal error; retry later",
                    media,
                    {"Retry-After": str(self.retry_after)},
                )
            self.count(appended=appended, duplicates=duplicates, conflicts=conflicts)
            if conflicts:
                _log.warning(
                    "recorded %d ingest conflict(s): different spans with the same trace and "
                    "span id (token %r); both versions are kept",
                    conflicts,
                    name,
                )
        self.count(rejected=batch.rejected, forbidden=forbidden)
        if batch.rejected:
            _log.warning(
                "rejected %d audit span(s) of %d (token %r): %s",
                batch.rejected,
                batch.total,
                name,
                "; ".join(batch.errors),
            )
        return _success(media, batch.rejected, "; ".join(batch.errors))

    def _append(
        self,
        entries: list[Mapping[str, Any]],
        payloads: list[bytes | None],
        keys: list[bytes],
        token: str | None,
    ) -> tuple[int, int, int]:
        with suppress_instrumentation():
            if self.unique is None:
                assert self.seen is not None
                with self.append_lock:
                    return self.seen.append(entries, payloads, keys, token)
            result = self._append_unique(entries, payloads, keys)
            duplicates = len(result.duplicates)
            conflicts = self._record_conflicts(keys, token) if self.between is not None else 0
            return len(entries) - duplicates, duplicates, conflicts

    def _record_conflicts(self, keys: list[bytes], token: str | None) -> int:
        # After the append has committed: appends are serialized by the store, so of two
        # servers writing different content for the same ids concurrently, the second one to
        # commit sees both here. Duplicates are looked at too (an exporter's retry repairs a
        # crash between the record and its conflict record), and the conflict record's key is
        # derived from the set of versions, so recording it twice is a no-op.
        assert self.unique is not None and self.between is not None
        wanted = _by_ids(k for k in keys if not is_usage_key(k))  # usage keys: no versions
        if not wanted:
            return 0
        rows = self._lookup([(ids, ids + b"\xff" * 33) for ids in wanted])
        groups: dict[bytes, dict[bytes, int | None]] = {}
        for key, seq in rows:
            if len(key) == _KEY_LEN:
                digest = key[_IDS_LEN:]
            elif len(key) == _IDS_LEN:
                digest = self._digest_at(seq)  # written before keys carried the content
            else:
                continue
            groups.setdefault(key[:_IDS_LEN], {})[digest] = seq
        entries: list[Mapping[str, Any]] = []
        ckeys: list[bytes] = []
        for ids, members in groups.items():
            for ckey, entry in _conflicts(ids, members, token, wanted.get(ids, ())):
                entries.append(entry)
                ckeys.append(ckey)
        if not entries:
            return 0
        result = self._append_unique(entries, [None] * len(entries), ckeys)
        return len(entries) - len(result.duplicates)

    def _lookup(self, bounds: list[tuple[bytes, bytes]]) -> list[tuple[bytes, int]]:
        assert self.between is not None
        if self._open_reader is None:
            return list(self.between(bounds))
        with self._reader_lock:
            if self._reader is None:
                self._reader = self._open_reader()
            reader = self._reader
        return list(reader.dedup_keys_between(bounds))

    def _append_unique(
        self, entries: list[Mapping[str, Any]], payloads: list[bytes | None], keys: list[bytes]
    ) -> Any:
        """The store's ``append_unique``, returning once durable; through its group commit
        where it has one (the answer may be sent only after ``wait()`` returned)."""
        if self.submit is not None:
            return self.submit(entries, payloads, keys).wait()
        assert self.unique is not None
        return self.unique(entries, payloads, keys)

    def _digest_at(self, seq: int) -> bytes:
        record = next(iter(self.store.iter_from(seq)), None)
        if record is None or record.seq != seq:
            return b"?" + seq.to_bytes(8, "big")
        return content_digest(record.fields())

    def _authorized(self, request: Request) -> tuple[bool, IngestToken | None]:
        """``(allowed, the matching token)``; the token is ``None`` without authentication."""
        if self.tokens is None:
            return True, None
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return False, None
        digest = _secret_digest(credentials)
        found: IngestToken | None = None
        for token in self.tokens:
            # Constant time per token, and every token is compared: the time does not say
            # which token (or which byte) came close.
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found is not None, found

    async def health(self, request: Request) -> Response:
        def probe() -> dict[str, Any]:
            with suppress_instrumentation():
                head = self.store.head()
            return {"status": "ok", "head_seq": head.seq if head is not None else 0}

        try:
            return JSONResponse(await anyio.to_thread.run_sync(probe))
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)[:300]}, status_code=503)

    # -- in-flight tracking for graceful shutdown -----------------------------------------------
    def _enter(self) -> None:
        with self.idle:
            self.in_flight += 1

    def _leave(self) -> None:
        with self.idle:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.idle:
            while self.in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.idle.wait(remaining)
        return True

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._log_trust()  # here, once the server's logging is configured
        if self.pool is not None:
            await anyio.to_thread.run_sync(self.pool.start)
            _log.info("ingest decodes in %d worker process(es)", self.pool.workers)
        yield
        # uvicorn has stopped accepting and waited for open requests; make sure no append is
        # still running in a worker thread before the store goes away.
        finished = await anyio.to_thread.run_sync(self.wait_idle, 30.0)
        if not finished:
            _log.error("shutting down with %d append(s) still in flight", self.in_flight)
        if self.pool is not None:
            await anyio.to_thread.run_sync(self.pool.shutdown)
        if self._reader is not None:
            await anyio.to_thread.run_sync(self._reader.close)
        if self.close_store:
            await anyio.to_thread.run_sync(self.store.close)
        _log.info(
            "ingest stopped: %(requests)d request(s), %(appended)d appended, "
            "%(duplicates)d duplicate(s), %(rejected)d rejected, %(conflicts)d conflict(s)",
            self.stats,
        )


_METRIC_RESULTS: Final = {
    "appended": "appended",
    "duplicates": "duplicate",
    "rejected": "rejected",
    "conflicts": "conflict",
}


def create_app(
    store: AuditStore,
    *,
    token: str | None = None,
    tokens: Sequence[IngestToken] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after: int = DEFAULT_RETRY_AFTER,
    max_attribute_length: int = DEFAULT_MAX_ATTRIBUTE_LENGTH,
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
    close_store: bool = False,
    meter_provider: Any = None,
    decode_workers: int = 0,
) -> Starlette:
    """Build the ASGI app: ``POST /v1/traces`` and ``GET /health``.

    Args:
        store: where audit records go. A store with ``append_unique`` (PostgresStore)
            deduplicates in its own transaction; any other store is deduplicated in this
            process (run one ingest process per such store).
        token: one shared bearer secret that may write anything (single-secret mode).
        tokens: the tokens of a token file (:func:`load_tokens`), each limited to its
            services and identities. With neither, authentication is off.
        max_body_bytes: larger bodies (compressed or decompressed) get 413.
        retry_after: seconds in ``Retry-After`` when the store cannot append (503).
        max_attribute_length: longest string attribute accepted in an audit span.
        max_attributes: most attributes (and events, links) accepted per audit span.
        close_store: close the store when the app shuts down.
        meter_provider: records ``coworker.ingest.spans`` with this provider instead of the
            global one.
        decode_workers: decode requests in this many worker processes
            (:mod:`coworker.ingest.workers`; 0: in the server process, on one core).

    Returns:
        The Starlette app; ``app.state.ingest_stats`` counts requests and records.

    Raises:
        ConfigError: a bad parameter.
    """
    ingest = _Ingest(
        store,
        token=token,
        tokens=tokens,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
        max_attribute_length=max_attribute_length,
        max_attributes=max_attributes,
        close_store=close_store,
        meter_provider=meter_provider,
        decode_workers=decode_workers,
    )
    app = Starlette(
        routes=[
            Route(TRACES_PATH, ingest.traces, methods=["POST"]),
            Route(HEALTH_PATH, ingest.health, methods=["GET"]),
        ],
        lifespan=ingest.lifespan,
    )
    app.state.ingest_stats = ingest.stats
    app.state.ingest = ingest
    return app
