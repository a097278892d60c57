"""The OTLP/HTTP ingest endpoint: receive traces, append their audit spans to a store.

``coworker audit serve`` runs this behind uvicorn. It is what an OpenTelemetry Collector's
``otlphttp`` exporter (or any OTLP/HTTP span exporter) points at, so that services only send
OTLP and the audit trail is written server-side, where their code cannot suppress or alter it.

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` encoded as protobuf
(``application/x-protobuf``) or OTLP JSON (``application/json``; ids as hex), optionally
``Content-Encoding: gzip`` or ``deflate``. Spans whose ``coworker.audit`` attribute is ``true``
become :class:`~opentelemetry.sdk.trace.ReadableSpan` objects and go through the same
:func:`coworker.audit.record.entry_from_span` as the in-process exporter; other spans are
ignored (they belong to the operational trail). Answers follow the OTLP/HTTP specification
(https://opentelemetry.io/docs/specs/otlp/#otlphttp-response):

======  ==========================================================================
200     appended (``partial_success`` counts the audit spans it rejected and why)
400     malformed body (reason in a ``google.rpc.Status``); nothing appended
401     missing or wrong bearer token
413     body (compressed or decompressed) larger than the limit
415     unsupported content type or content encoding
503     the store cannot append right now; ``Retry-After`` says when to retry (OTLP
        clients retry 429/502/503/504 only: a 500 would lose the data)
======  ==========================================================================

A span delivered twice (exporters retry) is recorded once: the key is trace id + span id,
checked and written in the same transaction by stores that support it
(:meth:`~coworker.audit.store_postgres.PostgresStore.append_unique`), and by an in-process
index of the log otherwise. ``GET /health`` answers 200 when the store can be read.
Store writes run with OpenTelemetry instrumentation suppressed.

Not imported by ``import coworker``; needs the ``server`` extra (starlette, uvicorn,
opentelemetry-proto).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import math
import signal
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coworker import attributes as attr
from coworker.audit.record import entry_from_span
from coworker.audit.store import AuditStore
from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = [
    "DEFAULT_MAX_ATTRIBUTE_LENGTH",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_RETRY_AFTER",
    "AuditBatch",
    "IngestServer",
    "MalformedRequest",
    "audit_spans",
    "create_app",
    "decode_request",
    "parse_listen",
    "serve",
]

_log = logging.getLogger("coworker.ingest")

DEFAULT_MAX_BODY_BYTES: Final = 20 * 1024 * 1024
"""Largest accepted body, before and after decompression (the Collector's default limit)."""
DEFAULT_RETRY_AFTER: Final = 5
"""Seconds sent in ``Retry-After`` with a 503."""
DEFAULT_MAX_ATTRIBUTE_LENGTH: Final = 64 * 1024
"""An audit span with a longer string attribute (or key) is rejected, not truncated: a
record must say what happened or nothing."""

TRACES_PATH: Final = "/v1/traces"
HEALTH_PATH: Final = "/health"

_PROTOBUF: Final = "application/x-protobuf"
_PROTOBUF_TYPES: Final = frozenset({"application/x-protobuf", "application/protobuf"})
_JSON: Final = "application/json"

# OTLP Span.SpanKind (0 unspecified, 1 internal, ... 5 consumer) -> the API's SpanKind.
_KINDS: Final = {
    0: SpanKind.INTERNAL,
    1: SpanKind.INTERNAL,
    2: SpanKind.SERVER,
    3: SpanKind.CLIENT,
    4: SpanKind.PRODUCER,
    5: SpanKind.CONSUMER,
}
_STATUS: Final = {0: StatusCode.UNSET, 1: StatusCode.OK, 2: StatusCode.ERROR}
_ZERO_TRACE: Final = bytes(16)
_ZERO_SPAN: Final = bytes(8)


class MalformedRequest(ValueError):
    """The request body cannot be decoded; the message says why (sent back with the 400)."""


@dataclass
class AuditBatch:
    """The audit spans of one request and the ones rejected.

    Attributes:
        spans: the audit-worthy spans, decoded.
        keys: one dedup key per span: ``trace_id (16 bytes) || span_id (8 bytes)``.
        rejected: how many audit spans were rejected.
        errors: one reason per rejected span (the first few are reported to the client).
        total: spans in the request, audit or not.
    """

    spans: list[ReadableSpan] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    total: int = 0

    def reject(self, reason: str) -> None:
        """Count one rejected span."""
        self.rejected += 1
        if len(self.errors) < 10:
            self.errors.append(reason)


# -- decoding --------------------------------------------------------------------------------------
def decode_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """Decode an OTLP ``ExportTraceServiceRequest`` from protobuf or OTLP JSON bytes.

    Args:
        body: the (decompressed) request body.
        content_type: ``application/x-protobuf`` or ``application/json``.

    Returns:
        The request message.

    Raises:
        MalformedRequest: the body is not a valid request in that encoding.
    """
    if content_type == _JSON:
        return _decode_json(body)
    try:
        return ExportTraceServiceRequest.FromString(body)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise MalformedRequest(f"invalid protobuf ExportTraceServiceRequest: {exc}") from None


def _decode_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedRequest("the JSON body must be an object (ExportTraceServiceRequest)")
    try:
        _hex_ids_to_base64(data)
        return json_format.ParseDict(data, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except MalformedRequest:
        raise
    except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise MalformedRequest(f"invalid OTLP JSON: {exc}") from None


_ID_KEYS: Final = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")


def _hex_ids_to_base64(data: dict[str, Any]) -> None:
    # OTLP JSON spells trace and span ids as hex, not as the base64 of the protobuf JSON
    # mapping (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding).
    for rs in _list(data, "resourceSpans", "resource_spans"):
        for ss in _list(rs, "scopeSpans", "scope_spans"):
            for span in _list(ss, "spans"):
                _convert_ids(span)
                for link in _list(span, "links"):
                    _convert_ids(link)


def _list(obj: Any, *keys: str) -> list[Any]:
    if not isinstance(obj, dict):
        raise MalformedRequest("expected a JSON object")
    for key in keys:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise MalformedRequest(f"{key} must be an array")
        return value
    return []


def _convert_ids(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise MalformedRequest("a span or link must be a JSON object")
    for key in _ID_KEYS:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise MalformedRequest(f"{key} must be a hex string")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise MalformedRequest(f"{key} {value[:40]!r} is not hex") from None
        obj[key] = base64.b64encode(raw).decode("ascii")


def audit_spans(
    request: ExportTraceServiceRequest,
    *,
    max_attribute_length: int = DEFAULT_MAX_ATTRIBUTE_LENGTH,
) -> AuditBatch:
    """Select the audit spans of a request (``coworker.audit`` is ``true``) and decode them.

    An audit span is rejected (counted, with a reason) when its ids are invalid, it has not
    ended, its ``coworker.audit`` is not a boolean, or a string attribute is longer than
    ``max_attribute_length``. Other spans are skipped without a look at the rest of them.

    Args:
        request: the decoded request.
        max_attribute_length: the longest string attribute value accepted.

    Returns:
        The batch of decoded spans, their dedup keys and the rejections.
    """
    batch = AuditBatch()
    for rs in request.resource_spans:
        resource: Resource | None = None
        for ss in rs.scope_spans:
            scope: InstrumentationScope | None = None
            for span in ss.spans:
                batch.total += 1
                flag = _audit_flag(span.attributes)
                if flag is None or flag is False:
                    continue  # not for the audit trail (every coworker span carries the flag)
                if flag is not True:
                    batch.reject(f"span {span.name[:80]!r}: coworker.audit must be a boolean")
                    continue
                try:
                    if resource is None:
                        resource = Resource(
                            _attributes(rs.resource.attributes, max_attribute_length),
                            rs.schema_url or None,
                        )
                    if scope is None:
                        scope = InstrumentationScope(
                            ss.scope.name,
                            ss.scope.version or None,
                            ss.schema_url or None,
                            _attributes(ss.scope.attributes, max_attribute_length),
                        )
                    readable = _readable_span(span, resource, scope, max_attribute_length)
                except _Invalid as exc:
                    batch.reject(f"span {span.name[:80]!r}: {exc}")
                    continue
                batch.spans.append(readable)
                batch.keys.append(bytes(span.trace_id) + bytes(span.span_id))
    return batch


class _Invalid(ValueError):
    pass


def _audit_flag(attributes: Iterable[KeyValue]) -> Any:
    for kv in attributes:
        if kv.key == attr.AUDIT:
            which = kv.value.WhichOneof("value")
            return kv.value.bool_value if which == "bool_value" else "not a boolean"
    return None


def _readable_span(
    span: Any, resource: Resource, scope: InstrumentationScope, limit: int
) -> ReadableSpan:
    trace_id, span_id, parent_id = (
        bytes(span.trace_id),
        bytes(span.span_id),
        bytes(span.parent_span_id),
    )
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE:
        raise _Invalid("trace_id must be 16 bytes, not all zero")
    if len(span_id) != 8 or span_id == _ZERO_SPAN:
        raise _Invalid("span_id must be 8 bytes, not all zero")
    if parent_id and (len(parent_id) != 8 or parent_id == _ZERO_SPAN):
        raise _Invalid("parent_span_id must be empty or 8 bytes, not all zero")
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if start == 0 or end == 0:
        raise _Invalid("start and end times are required (an audit span must have ended)")
    if end < start:
        raise _Invalid("end time before start time")
    if len(span.name) > limit:
        raise _Invalid(f"name longer than {limit} characters")
    state = _trace_state(span.trace_state)
    flags = TraceFlags(span.flags & 0xFF)
    context = SpanContext(
        int.from_bytes(trace_id, "big"),
        int.from_bytes(span_id, "big"),
        is_remote=True,
        trace_flags=flags,
        trace_state=state,
    )
    parent = (
        SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(parent_id, "big"), True)
        if parent_id
        else None
    )
    events = [
        Event(e.name, _attributes(e.attributes, limit), e.time_unix_nano or None, limit=None)
        for e in span.events
    ]
    links = []
    for link in span.links:
        ltrace, lspan = bytes(link.trace_id), bytes(link.span_id)
        if len(ltrace) != 16 or len(lspan) != 8:
            raise _Invalid("a link's trace_id/span_id have the wrong length")
        links.append(
            Link(
                SpanContext(int.from_bytes(ltrace, "big"), int.from_bytes(lspan, "big"), True),
                _attributes(link.attributes, limit),
            )
        )
    code = _STATUS.get(span.status.code)
    if code is None:
        raise _Invalid(f"unknown status code {span.status.code}")
    status = Status(code, span.status.message or None) if code is StatusCode.ERROR else Status(code)
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=_attributes(span.attributes, limit),
        events=events,
        links=links,
        kind=_KINDS.get(span.kind, SpanKind.INTERNAL),
        status=status,
        start_time=start,
        end_time=end,
        instrumentation_scope=scope,
    )


def _trace_state(header: str) -> TraceState:
    if not header:
        return TraceState()
    try:
        return TraceState.from_header([header])
    except Exception:  # an invalid tracestate is dropped, as the W3C spec says
        return TraceState()


def _attributes(kvs: Iterable[KeyValue], limit: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        if len(kv.key) > limit:
            raise _Invalid(f"attribute key longer than {limit} characters")
        value = _value(kv.value, limit, 0)
        if value is not None:
            out[kv.key] = value
    return out


_MAX_DEPTH: Final = 16


def _value(v: AnyValue, limit: int, depth: int) -> Any:
    which = v.WhichOneof("value")
    if which == "string_value":
        if len(v.string_value) > limit:
            raise _Invalid(f"attribute value longer than {limit} characters")
        return v.string_value
    if which == "bool_value":
        return v.bool_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        value = v.double_value
        return value if math.isfinite(value) else str(value)
    if which == "bytes_value":
        if len(v.bytes_value) > limit:
            raise _Invalid(f"attribute value longer than {limit} bytes")
        return bytes(v.bytes_value)
    if depth >= _MAX_DEPTH and which in ("array_value", "kvlist_value"):
        raise _Invalid(f"attribute nested deeper than {_MAX_DEPTH} levels")
    if which == "array_value":
        return tuple(_value(x, limit, depth + 1) for x in v.array_value.values)
    if which == "kvlist_value":
        return {kv.key: _value(kv.value, limit, depth + 1) for kv in v.kvlist_value.values}
    return None  # an empty AnyValue: the attribute is absent


# -- dedup for stores without append_unique ------------------------------------------------------
class _SeenSpans:
    """Trace id + span id of every outcome record in the log, for stores that cannot dedup.

    Loaded once from the log, then kept up to date by this process: one ingest process per
    such store. PostgresStore does the check in its append transaction instead.
    """

    def __init__(self, store: AuditStore) -> None:
        self._store = store
        self._keys: set[bytes] | None = None

    def _load(self) -> set[bytes]:
        keys: set[bytes] = set()
        for record in self._store.iter_from(1):
            fields = record.fields()
            if fields.get("kind", "outcome") != "outcome":
                continue
            trace_id, span_id = fields.get("trace_id"), fields.get("span_id")
            if isinstance(trace_id, str) and isinstance(span_id, str):
                with contextlib.suppress(ValueError):
                    keys.add(bytes.fromhex(trace_id) + bytes.fromhex(span_id))
        return keys

    def append(
        self, entries: list[Mapping[str, Any]], payloads: list[bytes | None], keys: list[bytes]
    ) -> tuple[int, int]:
        # Called with the app's append lock held.
        if self._keys is None:
            self._keys = self._load()
        fresh: list[int] = []
        batch_keys: set[bytes] = set()
        for i, key in enumerate(keys):
            if key in self._keys or key in batch_keys:
                continue
            batch_keys.add(key)
            fresh.append(i)
        if fresh:
            self._store.append([entries[i] for i in fresh], [payloads[i] for i in fresh])
            self._keys.update(batch_keys)
        return len(fresh), len(keys) - len(fresh)


# -- the app -------------------------------------------------------------------------------------
class _Ingest:
    def __init__(
        self,
        store: AuditStore,
        *,
        token: str | None,
        max_body_bytes: int,
        retry_after: int,
        max_attribute_length: int,
        close_store: bool,
    ) -> None:
        if max_body_bytes <= 0:
            raise ConfigError(f"max_body_bytes={max_body_bytes!r} must be positive")
        if retry_after < 0:
            raise ConfigError(f"retry_after={retry_after!r} must not be negative")
        if token is not None and not token.strip():
            raise ConfigError("token must not be empty (use None to disable authentication)")
        self.store = store
        self.token = None if token is None else token.encode("utf-8")
        self.max_body_bytes = max_body_bytes
        self.retry_after = retry_after
        self.max_attribute_length = max_attribute_length
        self.close_store = close_store
        self.unique = getattr(store, "append_unique", None)
        self.seen = None if self.unique is not None else _SeenSpans(store)
        self.append_lock = threading.Lock()
        self.in_flight = 0
        self.idle = threading.Condition()
        self.stats = {"requests": 0, "appended": 0, "duplicates": 0, "rejected": 0}

    # -- request handling ----------------------------------------------------------------------
    async def traces(self, request: Request) -> Response:
        self.stats["requests"] += 1
        if not self._authorized(request):
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
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return _too_large(self.max_body_bytes, media)
            chunks.append(chunk)
        body = b"".join(chunks)
        self._enter()
        try:
            # Decoding and appending are CPU and I/O bound: off the event loop. The thread is
            # not cancellable, so a client that hangs up does not abort an append half-way.
            return await anyio.to_thread.run_sync(self._handle, body, media, encoding)
        finally:
            self._leave()

    def _handle(self, body: bytes, media: str, encoding: str) -> Response:
        try:
            raw = _decompress(body, encoding, self.max_body_bytes)
        except _TooLarge:
            return _too_large(self.max_body_bytes, media)
        except MalformedRequest as exc:
            return _status_response(400, str(exc), media)
        try:
            request = decode_request(raw, media)
        except MalformedRequest as exc:
            return _status_response(400, str(exc), media)
        batch = audit_spans(request, max_attribute_length=self.max_attribute_length)
        entries: list[Mapping[str, Any]] = []
        payloads: list[bytes | None] = []
        keys: list[bytes] = []
        for span, key in zip(batch.spans, batch.keys, strict=True):
            try:
                fields, payload = entry_from_span(span)
            except Exception as exc:
                batch.reject(f"span {span.name[:80]!r}: cannot build its audit record: {exc}")
                continue
            entries.append(fields)
            payloads.append(payload)
            keys.append(key)
        if entries:
            try:
                appended, duplicates = self._append(entries, payloads, keys)
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
            self.stats["appended"] += appended
            self.stats["duplicates"] += duplicates
        self.stats["rejected"] += batch.rejected
        if batch.rejected:
            _log.warning(
                "rejected %d audit span(s) of %d: %s",
                batch.rejected,
                batch.total,
                "; ".join(batch.errors),
            )
        return _success(media, batch.rejected, "; ".join(batch.errors))

    def _append(
        self, entries: list[Mapping[str, Any]], payloads: list[bytes | None], keys: list[bytes]
    ) -> tuple[int, int]:
        with suppress_instrumentation():
            if self.unique is not None:
                result = self.unique(entries, payloads, keys)
                duplicates = len(result.duplicates)
                return len(entries) - duplicates, duplicates
            assert self.seen is not None
            with self.append_lock:
                return self.seen.append(entries, payloads, keys)

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time: compare_digest's time does not depend on where the bytes differ.
        return hmac.compare_digest(credentials.strip().encode("utf-8"), self.token)

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
        yield
        # uvicorn has stopped accepting and waited for open requests; make sure no append is
        # still running in a worker thread before the store goes away.
        finished = await anyio.to_thread.run_sync(self.wait_idle, 30.0)
        if not finished:
            _log.error("shutting down with %d append(s) still in flight", self.in_flight)
        if self.close_store:
            await anyio.to_thread.run_sync(self.store.close)
        _log.info(
            "ingest stopped: %(requests)d request(s), %(appended)d appended, "
            "%(duplicates)d duplicate(s), %(rejected)d rejected",
            self.stats,
        )


class _TooLarge(Exception):
    pass


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("identity", ""):
        return body
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    try:
        # max_length bounds the output: a small "zip bomb" cannot make us allocate gigabytes.
        out = decoder.decompress(body, limit + 1)
        if len(out) > limit or decoder.unconsumed_tail:
            raise _TooLarge
        out += decoder.flush()
    except zlib.error as exc:
        raise MalformedRequest(f"invalid {encoding} body: {exc}") from None
    if len(out) > limit:
        raise _TooLarge
    if not decoder.eof:
        raise MalformedRequest(f"truncated {encoding} body")
    return out


def _success(media: str, rejected: int, message: str) -> Response:
    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message[:1000]
    if media == _JSON:
        return Response(json_format.MessageToJson(response, indent=None).encode(), media_type=_JSON)
    return Response(response.SerializeToString(), media_type=_PROTOBUF)


def _status_response(
    code: int, message: str, media: str, headers: Mapping[str, str] | None = None
) -> Response:
    # OTLP/HTTP: 4xx/5xx bodies are a google.rpc.Status in the request's encoding.
    from google.rpc import code_pb2, status_pb2

    rpc = {
        400: code_pb2.INVALID_ARGUMENT,
        401: code_pb2.UNAUTHENTICATED,
        413: code_pb2.RESOURCE_EXHAUSTED,
        415: code_pb2.INVALID_ARGUMENT,
        503: code_pb2.UNAVAILABLE,
    }.get(code, code_pb2.UNKNOWN)
    status = status_pb2.Status(code=rpc, message=message[:1000])
    if media == _JSON:
        content = json_format.MessageToJson(status, indent=None).encode()
    else:
        content = status.SerializeToString()
    return Response(content, status_code=code, media_type=media, headers=dict(headers or {}))


def _too_large(limit: int, media: str) -> Response:
    return _status_response(413, f"request body larger than {limit} bytes", media)


def create_app(
    store: AuditStore,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after: int = DEFAULT_RETRY_AFTER,
    max_attribute_length: int = DEFAULT_MAX_ATTRIBUTE_LENGTH,
    close_store: bool = False,
) -> Starlette:
    """Build the ASGI app: ``POST /v1/traces`` and ``GET /health``.

    Args:
        store: where audit records go. A store with ``append_unique`` (PostgresStore)
            deduplicates in its own transaction; any other store is deduplicated in this
            process (run one ingest process per such store).
        token: the bearer token clients must send; ``None`` disables authentication.
        max_body_bytes: larger bodies (compressed or decompressed) get 413.
        retry_after: seconds in ``Retry-After`` when the store cannot append (503).
        max_attribute_length: longest string attribute accepted in an audit span.
        close_store: close the store when the app shuts down.

    Returns:
        The Starlette app; ``app.state.ingest_stats`` counts requests and records.

    Raises:
        ConfigError: a bad parameter.
    """
    ingest = _Ingest(
        store,
        token=token,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
        max_attribute_length=max_attribute_length,
        close_store=close_store,
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


# -- serving -------------------------------------------------------------------------------------
def parse_listen(listen: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:4318`` for IPv6).

    Raises:
        ConfigError: not a host and a port.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--listen={listen!r} must be HOST:PORT, e.g. 127.0.0.1:4318")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--listen={listen!r}: {port!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"--listen={listen!r}: port out of range")
    return host.strip("[]"), number


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_config(log_format: str = "text", level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn and coworker: text lines or JSON lines."""
    if log_format not in ("text", "json"):
        raise ConfigError(f"log_format={log_format!r} must be 'text' or 'json'")
    text = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    formatter: dict[str, Any] = (
        {"()": f"{__name__}._JsonFormatter"}
        if log_format == "json"
        else {"format": text, "datefmt": "%Y-%m-%dT%H:%M:%S%z"}
    )
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "stream": "ext://sys.stderr",
    }
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": lvl, "propagate": False},
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": {"handlers": ["default"], "level": lvl, "propagate": False},
            "coworker": {"handlers": ["default"], "level": lvl, "propagate": False},
        },
    }


def _uvicorn_config(app: Starlette, host: str, port: int, log_format: str, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=log_config(log_format, log_level),
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=30,
    )


def serve(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 4318,
    token: str | None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after: int = DEFAULT_RETRY_AFTER,
    log_format: str = "text",
    log_level: str = "info",
) -> None:
    """Run the ingest endpoint with uvicorn until SIGINT/SIGTERM (then finish in-flight appends).

    A PostgreSQL store is opened without a spool: when the server is down the endpoint
    answers 503 and the clients keep (and retry) the spans.

    Args:
        url: the audit store URL.
        host: address to listen on.
        port: TCP port.
        token: bearer token, or ``None`` for no authentication.
        max_body_bytes: request size limit.
        retry_after: seconds in ``Retry-After`` with a 503.
        log_format: ``text`` or ``json``.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
    """
    import uvicorn

    store = _open(url)
    app = create_app(
        store,
        token=token,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
        close_store=True,
    )
    server = uvicorn.Server(_uvicorn_config(app, host, port, log_format, log_level))
    _log.info("coworker audit ingest on http://%s:%d%s", host, port, TRACES_PATH)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully, then re-raises the signal to the previous handler:
        # make that a normal exit rather than death by SIGTERM or a KeyboardInterrupt trace.
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, _exit_quietly)
    server.run()


def _exit_quietly(number: int, frame: Any) -> None:
    raise SystemExit(0)


def _open(url: str) -> AuditStore:
    from coworker.audit.urls import open_store

    if url.split("://", 1)[0].lower().startswith("postgres"):
        from coworker.audit.store_postgres import PostgresStore

        return PostgresStore(url, spool=None)
    return open_store(url)


def _listen_socket(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto
    # says TCP, and without it every response waits ~40 ms for a delayed ACK (Nagle).
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    return sock


class IngestServer:
    """The ingest endpoint served by uvicorn in a background thread (tests, benchmarks, apps
    that embed it).

    Args:
        store: where audit records go.
        host: address to listen on.
        port: TCP port; 0 picks a free one (see :attr:`port`).
        **options: passed to :func:`create_app`.
    """

    def __init__(
        self, store: AuditStore, *, host: str = "127.0.0.1", port: int = 0, **options: Any
    ) -> None:
        import uvicorn

        self.app = create_app(store, **options)
        self.host = host
        config = _uvicorn_config(self.app, host, port, "text", "warning")
        self._socket = _listen_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        """``http://host:port/v1/traces``."""
        return f"http://{self.host}:{self.port}{TRACES_PATH}"

    @property
    def stats(self) -> dict[str, int]:
        """Requests, appended, duplicates and rejected counts."""
        return self.app.state.ingest_stats  # type: ignore[no-any-return]

    def start(self, timeout: float = 10.0) -> IngestServer:
        """Start serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the ingest server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 35.0) -> None:
        """Graceful shutdown: stop accepting, finish in-flight requests and appends."""
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> IngestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
