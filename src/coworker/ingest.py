"""The OTLP/HTTP ingest endpoint: receive traces, append their audit spans to a store.

``coworker audit serve`` runs this behind uvicorn. It is what an OpenTelemetry Collector's
``otlphttp`` exporter (or any OTLP/HTTP span exporter) points at, so that services only send
OTLP and the audit trail is written server-side, where their code cannot suppress or alter it.

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` encoded as protobuf
(``application/x-protobuf``) or OTLP JSON (``application/json``; ids as hex), optionally
``Content-Encoding: gzip`` or ``deflate``. Spans whose ``coworker.audited`` attribute is
``true`` (or ``coworker.audit``, its name in coworker 0.1.0) become
:class:`~opentelemetry.sdk.trace.ReadableSpan` objects and go through the same
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

A span delivered twice (exporters retry) is recorded once: the dedup key is trace id + span
id + the SHA-256 of the record's content (:func:`dedup_key`), checked and written in the same
transaction by stores that support it
(:meth:`~coworker.audit.store_postgres.PostgresStore.append_unique`), and by an in-process
index of the log otherwise. A *different* span with the same ids (a forgery by a service that
saw them in ``traceparent``) is kept as well, and the server writes an ``ingest-conflict``
record naming both. Each bearer token (:class:`IngestToken`, :func:`load_tokens`) names the
services and identities it may write for; spans outside them are rejected with the reason, and
every record names the token that delivered it (``ingest_token``). uvicorn runs with a protocol
that closes connections whose request does not arrive whole within a read timeout and refuses
connections beyond a limit. ``GET /health`` answers 200 when the store can be read. Store
writes run with OpenTelemetry instrumentation suppressed. What is guaranteed against whom:
docs/ingest.md.

Not imported by ``import coworker``; needs the ``server`` extra (starlette, uvicorn,
opentelemetry-proto).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import signal
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coworker import attributes as attr
from coworker.audit.record import (
    CATEGORY_INGEST_CONFLICT,
    KIND_OUTCOME,
    SCHEMA_VERSION,
    canonical,
    entry_from_span,
    format_time,
)
from coworker.audit.store import AuditStore
from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = [
    "CATEGORY_INGEST_CONFLICT",
    "DEFAULT_MAX_ATTRIBUTES",
    "DEFAULT_MAX_ATTRIBUTE_LENGTH",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_RETRY_AFTER",
    "INGEST_TOKEN_FIELD",
    "SHARED_TOKEN_NAME",
    "AuditBatch",
    "IngestServer",
    "IngestToken",
    "MalformedRequest",
    "audit_spans",
    "content_digest",
    "create_app",
    "decode_request",
    "dedup_key",
    "load_tokens",
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
DEFAULT_MAX_ATTRIBUTES: Final = 1024
"""An audit span (or its resource, scope, an event or a link) with more attributes, or a span
with more events or links, is rejected: the decoding cost per span stays bounded."""
DEFAULT_READ_TIMEOUT: Final = 30.0
"""Seconds a client has to send one whole request (headers and body) once it starts; then
the server closes the connection (slow clients cannot hold connections forever)."""
DEFAULT_MAX_CONNECTIONS: Final = 512
"""Open connections beyond this are answered 503 and closed at once."""

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
        message: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(body)
        return message
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
        message: ExportTraceServiceRequest = json_format.ParseDict(
            data, ExportTraceServiceRequest(), ignore_unknown_fields=True
        )
        return message
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
    _one_spelling(obj, keys)
    for key in keys:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise MalformedRequest(f"{key} must be an array")
        return value
    return []


def _one_spelling(obj: Mapping[str, Any], keys: Sequence[str]) -> None:
    # protobuf's JSON parser takes the last of "resourceSpans" and "resource_spans" while the
    # id conversion above reads the first: a body giving both says two things. Refuse it.
    given = [key for key in keys if key in obj]
    if len(given) > 1:
        raise MalformedRequest(f"both {given[0]!r} and {given[1]!r} given: use one spelling")


def _convert_ids(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise MalformedRequest("a span or link must be a JSON object")
    for i in range(0, len(_ID_KEYS), 2):
        _one_spelling(obj, _ID_KEYS[i : i + 2])
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
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
) -> AuditBatch:
    """Select the audit spans of a request (``coworker.audited`` is ``true``) and decode them.

    A span is an audit span when ``coworker.audited`` or, from a coworker 0.1.0 sender,
    ``coworker.audit`` is ``true``. An audit span is rejected (counted, with a reason) when its
    ids are invalid, it has not ended, one of those flags is not a boolean, a string attribute
    is longer than ``max_attribute_length``, an attribute set (its own, its resource's, its
    scope's, an event's or a link's) has more than ``max_attributes`` entries or names a key
    twice, or it has more than ``max_attributes`` events or links. Other spans are skipped
    without a look at the rest of them.

    Args:
        request: the decoded request.
        max_attribute_length: the longest string attribute value accepted.
        max_attributes: the most attributes per set, events and links per span.

    Returns:
        The batch of decoded spans, their ids (``trace_id || span_id``) and the rejections.
    """
    limits = _Limits(max_attribute_length, max_attributes)
    batch = AuditBatch()
    for rs in request.resource_spans:
        resource: Resource | None = None
        resource_error: str | None = None
        for ss in rs.scope_spans:
            scope: InstrumentationScope | None = None
            for span in ss.spans:
                batch.total += 1
                flag = _audit_flag(span.attributes)
                if flag is None or flag is False:
                    continue  # not for the audit trail (every coworker span carries the flag)
                if flag is not True:
                    batch.reject(f"span {span.name[:80]!r}: {flag}")
                    continue
                try:
                    if resource_error is not None:
                        raise _Invalid(resource_error)
                    if resource is None:
                        try:
                            resource_attributes = _attributes(rs.resource.attributes, limits)
                            # A record's service is a name: a token's services are matched
                            # against it, and "{'x': None}" is not one.
                            _resource_service(resource_attributes.get(attr.SERVICE_NAME))
                            resource = Resource(resource_attributes, rs.schema_url or None)
                        except _Invalid as exc:
                            resource_error = f"resource: {exc}"
                            raise _Invalid(resource_error) from None
                    if scope is None:
                        scope = InstrumentationScope(
                            ss.scope.name,
                            ss.scope.version or None,
                            ss.schema_url or None,
                            _attributes(ss.scope.attributes, limits),
                        )
                    readable = _readable_span(span, resource, scope, limits)
                except _Invalid as exc:
                    batch.reject(f"span {span.name[:80]!r}: {exc}")
                    continue
                batch.spans.append(readable)
                batch.keys.append(bytes(span.trace_id) + bytes(span.span_id))
    return batch


@dataclass(frozen=True, slots=True)
class _Limits:
    length: int
    count: int


class _Invalid(ValueError):
    pass


def _audit_flag(attributes: Iterable[KeyValue]) -> bool | str | None:
    """The span's audit flag: ``True``, ``False``, ``None`` (absent) or why it is malformed.

    ``coworker.audited``, or ``coworker.audit`` from senders of coworker 0.1.0 (before the
    rename); either one being the boolean ``true`` makes an audit span, whatever the other
    says: over-sending is safe, losing a record is not.
    """
    found: bool | None = None
    malformed: str | None = None
    for kv in attributes:
        if kv.key == attr.AUDITED or kv.key == attr.AUDITED_LEGACY:
            if kv.value.WhichOneof("value") != "bool_value":
                malformed = kv.key
            elif kv.value.bool_value:
                return True
            else:
                found = False
    return f"{malformed} must be a boolean" if malformed is not None else found


def _readable_span(
    span: Any, resource: Resource, scope: InstrumentationScope, limits: _Limits
) -> ReadableSpan:
    limit = limits.length
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
    if len(span.events) > limits.count or len(span.links) > limits.count:
        raise _Invalid(f"more than {limits.count} events or links")
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
        Event(e.name, _attributes(e.attributes, limits), e.time_unix_nano or None, limit=None)
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
                _attributes(link.attributes, limits),
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
        attributes=_attributes(span.attributes, limits),
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


def _attributes(kvs: Sequence[KeyValue], limits: _Limits) -> dict[str, Any]:
    limit = limits.length
    if len(kvs) > limits.count:
        raise _Invalid(f"more than {limits.count} attributes")
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for kv in kvs:
        if len(kv.key) > limit:
            raise _Invalid(f"attribute key longer than {limit} characters")
        if kv.key in seen:
            # OTLP says keys are unique; a second user.id would make the record say one thing
            # and a trace viewer showing the first another.
            raise _Invalid(f"attribute {kv.key[:80]!r} given twice")
        seen.add(kv.key)
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
        if len(v.array_value.values) > limit:
            raise _Invalid(f"attribute array longer than {limit} elements")
        return tuple(_value(x, limit, depth + 1) for x in v.array_value.values)
    if which == "kvlist_value":
        if len(v.kvlist_value.values) > limit:
            raise _Invalid(f"attribute map larger than {limit} entries")
        return {kv.key: _value(kv.value, limit, depth + 1) for kv in v.kvlist_value.values}
    return None  # an empty AnyValue: the attribute is absent


# -- who may write what ----------------------------------------------------------------------------
INGEST_TOKEN_FIELD: Final = "ingest_token"
"""Record field naming the bearer token (its ``name``, never the secret) that delivered an
ingested record; ``null`` when the server runs without authentication."""

SHARED_TOKEN_NAME: Final = "shared-token"
"""The token name recorded in single-secret mode (``--token-file`` / ``COWORKER_INGEST_TOKEN``)."""

_ANY: Final = "*"
_MIN_SECRET: Final = 16
_TOKEN_KEYS: Final = frozenset({"name", "secret", "secret_sha256", "services", "users", "agents"})


@dataclass(frozen=True)
class IngestToken:
    """One bearer token and what the records it delivers may claim.

    Attributes:
        name: recorded in every record the token delivers (``ingest_token``); not secret.
        digest: SHA-256 of the secret (the secret itself is not kept).
        services: the ``service.name`` values it may write for; ``None`` means any.
        users: the ``user.id`` values its records may carry; ``None`` means any (a record
            without a user id is always allowed: it claims nobody).
        agents: the same for ``gen_ai.agent.id``.
    """

    name: str
    digest: bytes
    services: frozenset[str] | None
    users: frozenset[str] | None = None
    agents: frozenset[str] | None = None

    @classmethod
    def shared(cls, secret: str) -> IngestToken:
        """The single-secret mode: one token that may write anything."""
        return cls(SHARED_TOKEN_NAME, _secret_digest(secret), None)

    @property
    def trusts_everything(self) -> bool:
        """``True`` when the token is limited to nothing."""
        return self.services is None and self.users is None and self.agents is None

    def refusal(self, fields: Mapping[str, Any]) -> str | None:
        """Why this token may not write a record with these fields, or ``None`` if it may."""
        for label, allowed, value in (
            ("service", self.services, fields.get("service")),
            ("user", self.users, fields.get("user_id")),
            ("agent", self.agents, fields.get("agent_id")),
        ):
            if allowed is None:
                continue
            if label == "service" and value is None:
                return f"token {self.name!r} may not write a span without service.name"
            if value is not None and value not in allowed:
                return f"token {self.name!r} may not write for {label} {_quote(value)}"
        return None


def _quote(value: Any) -> str:
    # repr() escapes control characters: the reason goes back to the client and into logs.
    return repr(str(value)[:80])


def _secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.strip().encode("utf-8")).digest()


def load_tokens(path: str | Path) -> list[IngestToken]:
    """Read a token file (TOML, or JSON when the name ends in ``.json``).

    The file holds ``[[tokens]]`` tables (JSON: ``{"tokens": [...]}``), each with ``name``,
    either ``secret`` (at least 16 characters) or ``secret_sha256`` (64 hex digits), a
    required ``services`` list (``["*"]`` for any service) and optional ``users`` and
    ``agents`` lists. See docs/ingest.md.

    Raises:
        ConfigError: the file cannot be read or is not a valid token file.
    """
    where = f"token file {str(path)!r}"
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        if str(path).lower().endswith(".json"):
            data = json.loads(raw)
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: needs a non-empty list of tokens ([[tokens]] tables)")
    tokens = [_token(entry, f"{where}, token {i + 1}") for i, entry in enumerate(entries)]
    names = [t.name for t in tokens]
    digests = [t.digest for t in tokens]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: token names must be unique")
    if len(set(digests)) != len(digests):
        raise ConfigError(f"{where}: two tokens have the same secret")
    plain = [e.get("name") for e in entries if isinstance(e, dict) and "secret" in e]
    with contextlib.suppress(OSError):
        if plain and Path(path).stat().st_mode & 0o077:
            _log.warning(
                "%s holds plain secrets (%s) and is readable by others than its owner: "
                "chmod 600 it, or use secret_sha256",
                where,
                ", ".join(map(str, plain)),
            )
    return tokens


def _token(entry: Any, where: str) -> IngestToken:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table/object")
    unknown = sorted(set(entry) - _TOKEN_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or not name.isprintable():
        raise ConfigError(f"{where}: name must be a non-empty printable string")
    secret, hashed = entry.get("secret"), entry.get("secret_sha256")
    if (secret is None) == (hashed is None):
        raise ConfigError(f"{where} ({name!r}): give exactly one of secret, secret_sha256")
    if secret is not None:
        if not isinstance(secret, str) or len(secret.strip()) < _MIN_SECRET:
            raise ConfigError(f"{where} ({name!r}): secret must be at least 16 characters")
        digest = _secret_digest(secret)
    else:
        try:
            digest = bytes.fromhex(hashed) if isinstance(hashed, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(f"{where} ({name!r}): secret_sha256 must be 64 hex digits")
    if "services" not in entry:
        raise ConfigError(f'{where} ({name!r}): services is required (["*"] for any)')
    return IngestToken(
        name,
        digest,
        _names(entry["services"], f"{where} ({name!r}) services"),
        _names(entry.get("users"), f"{where} ({name!r}) users"),
        _names(entry.get("agents"), f"{where} ({name!r}) agents"),
    )


def _names(value: Any, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: must be a list of non-empty strings")
    if not value:
        raise ConfigError(f"{where}: an empty list would refuse everything; remove the token")
    if _ANY in value:
        if len(value) != 1:
            raise ConfigError(f'{where}: "*" cannot be combined with names')
        return None
    return frozenset(value)


# -- content-addressed dedup -----------------------------------------------------------------------
_NOT_CONTENT: Final = frozenset({"seq", "recorded_at", INGEST_TOKEN_FIELD})
_IDS_LEN: Final = 24
_KEY_LEN: Final = _IDS_LEN + 32
_CONFLICT_TAG: Final = b"coworker.ingest-conflict\x00"


def content_digest(fields: Mapping[str, Any]) -> bytes:
    """SHA-256 of a record's content: its canonical body without ``seq``, ``recorded_at`` and
    ``ingest_token`` (what differs between two deliveries of the same span)."""
    return hashlib.sha256(
        canonical({k: v for k, v in fields.items() if k not in _NOT_CONTENT})
    ).digest()


def dedup_key(ids: bytes, fields: Mapping[str, Any]) -> bytes:
    """The dedup key of an ingested record: trace id (16) + span id (8) + content digest (32).

    A resend of the same span has the same key (a duplicate); another span with the same
    ids has another key, so both are kept, and the shared 24-byte prefix finds the conflict.
    """
    return ids + content_digest(fields)


def _conflict_key(ids: bytes, digest: bytes) -> bytes:
    # One conflict record per version after the first, keyed on that version: recorded once
    # however often it is resent, and N forged versions make N records, not N^2 digests.
    # 32 bytes: never the length of a span key (24 legacy, 56 now), so a range scan over a
    # span's ids cannot return a conflict record.
    return hashlib.sha256(_CONFLICT_TAG + ids + digest).digest()


def _conflicts(
    ids: bytes, members: Mapping[bytes, int | None], token: str | None, only: Iterable[bytes]
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``(key, record)`` of the conflict records of one trace + span id for the versions in
    ``only`` (those of the request at hand): each later version named with the first one (the
    earliest seq). Versions of earlier requests got theirs then: a client sending version
    after version of one span costs one conflict record each, not a rescan of all of them.
    """
    if len(members) < 2:
        return
    first_digest, first_seq = min(members.items(), key=lambda m: (m[1] is None, m[1] or 0, m[0]))
    for digest in dict.fromkeys(only):
        if digest == first_digest or digest not in members:
            continue
        yield (
            _conflict_key(ids, digest),
            _conflict_entry(
                ids, [(first_digest, first_seq), (digest, members[digest])], len(members), token
            ),
        )


def _conflict_entry(
    ids: bytes, pair: list[tuple[bytes, int | None]], versions: int, token: str | None
) -> dict[str, Any]:
    now = format_time(time.time_ns())
    return {
        "v": SCHEMA_VERSION,
        "kind": KIND_OUTCOME,
        "recorded_at": now,
        "category": CATEGORY_INGEST_CONFLICT,
        "operation": None,
        "doctype": None,
        "name": "ingest conflict: different spans with the same trace and span id",
        "outcome": "conflict",
        "error_type": None,
        "run_id": None,
        "parent_run_id": None,
        "chain_id": None,
        "flow_type": None,
        "flow_id": None,
        "step_id": None,
        "user_id": None,
        "agent_id": None,
        "agent_name": None,
        "session_id": None,
        "conversation_id": None,
        "service": None,
        "trace_id": ids[:16].hex(),
        "span_id": ids[16:].hex(),
        "parent_span_id": None,
        "start": now,
        "end": now,
        "intent_seq": None,
        "payload_digest": None,
        # The first version and this one (seq null: not known, e.g. a spooled append).
        "conflict_seqs": [seq for _, seq in pair],
        "conflict_digests": [digest.hex() for digest, _ in pair],
        "conflict_versions": versions,
        INGEST_TOKEN_FIELD: token,
    }


def _conflict_key_of(fields: Mapping[str, Any]) -> bytes | None:
    try:
        ids = bytes.fromhex(fields["trace_id"]) + bytes.fromhex(fields["span_id"])
        digest = bytes.fromhex(fields["conflict_digests"][-1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return _conflict_key(ids, digest)


def _by_ids(keys: Iterable[bytes]) -> dict[bytes, list[bytes]]:
    """Dedup keys grouped by trace + span id: ids -> the content digests, in order."""
    grouped: dict[bytes, list[bytes]] = {}
    for key in keys:
        grouped.setdefault(key[:_IDS_LEN], []).append(key[_IDS_LEN:])
    return grouped


_Slot = tuple[bytes, int | None] | dict[bytes, int | None]
"""The versions of one span id: ``(digest, seq)`` for the usual one, a dict once there are
more (a tuple is about half the memory of a dict, and almost every span has one version)."""


def _has(slot: _Slot | None, digest: bytes) -> bool:
    if slot is None:
        return False
    if isinstance(slot, tuple):
        return slot[0] == digest
    return digest in slot


def _add(index: dict[bytes, _Slot], ids: bytes, digest: bytes, seq: int | None) -> None:
    slot = index.get(ids)
    if slot is None or (isinstance(slot, tuple) and slot[0] == digest):
        index[ids] = (digest, seq)
    elif isinstance(slot, tuple):
        index[ids] = {slot[0]: slot[1], digest: seq}
    else:
        slot[digest] = seq


class _SeenSpans:
    """What the log holds per trace id + span id, for stores that cannot dedup themselves.

    ids -> the content digests (and seqs) of its records, loaded once from the log and kept up
    to date by this process (one ingest process per such store); PostgresStore checks keys in
    its append transaction instead. Also the conflicts already recorded, so none is recorded
    twice.
    """

    def __init__(self, store: AuditStore) -> None:
        self._store = store
        self._index: dict[bytes, _Slot] | None = None
        self._conflicts: set[bytes] = set()

    def _load(self) -> dict[bytes, _Slot]:
        index: dict[bytes, _Slot] = {}
        for record in self._store.iter_from(1):
            fields = record.fields()
            if fields.get("category") == CATEGORY_INGEST_CONFLICT:
                key = _conflict_key_of(fields)
                if key is not None:
                    self._conflicts.add(key)
                continue
            if fields.get("kind", KIND_OUTCOME) != KIND_OUTCOME:
                continue
            trace_id, span_id = fields.get("trace_id"), fields.get("span_id")
            if isinstance(trace_id, str) and isinstance(span_id, str):
                with contextlib.suppress(ValueError):
                    ids = bytes.fromhex(trace_id) + bytes.fromhex(span_id)
                    _add(index, ids, content_digest(fields), record.seq)
        return index

    def append(
        self,
        entries: list[Mapping[str, Any]],
        payloads: list[bytes | None],
        keys: list[bytes],
        token: str | None,
    ) -> tuple[int, int, int]:
        # Called with the app's append lock held.
        if self._index is None:
            self._index = self._load()
        index = self._index
        fresh: list[int] = []
        batch: set[bytes] = set()
        for i, key in enumerate(keys):
            if key in batch or _has(index.get(key[:_IDS_LEN]), key[_IDS_LEN:]):
                continue
            batch.add(key)
            fresh.append(i)
        if fresh:
            written = self._store.append([entries[i] for i in fresh], [payloads[i] for i in fresh])
            seqs: list[int | None] = (
                [r.seq for r in written] if len(written) == len(fresh) else [None] * len(fresh)
            )
            for i, seq in zip(fresh, seqs, strict=True):
                _add(index, keys[i][:_IDS_LEN], keys[i][_IDS_LEN:], seq)
        # Duplicates are checked too: a crash between a record and its conflict record is
        # repaired by the exporter's retry.
        conflicts: list[Mapping[str, Any]] = []
        new_keys: list[bytes] = []
        for ids, digests in _by_ids(keys).items():
            slot = index.get(ids)
            if not isinstance(slot, dict):
                continue  # one version (or none): no conflict
            for ckey, entry in _conflicts(ids, slot, token, digests):
                if ckey not in self._conflicts and ckey not in new_keys:
                    conflicts.append(entry)
                    new_keys.append(ckey)
        if conflicts:
            self._store.append(conflicts, [None] * len(conflicts))
            self._conflicts.update(new_keys)
        return len(fresh), len(keys) - len(fresh), len(conflicts)


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
    ) -> None:
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
        self.between = getattr(store, "dedup_keys_between", None)
        self.seen = None if self.unique is not None else _SeenSpans(store)
        self.append_lock = threading.Lock()
        self.in_flight = 0
        self.idle = threading.Condition()
        self.stats_lock = threading.Lock()
        self.stats = dict.fromkeys(_STATS, 0)
        self.meter_provider = meter_provider

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
            # Decoding and appending are CPU and I/O bound: off the event loop. The thread is
            # not cancellable, so a client that hangs up does not abort an append half-way.
            return await anyio.to_thread.run_sync(self._handle, body, media, encoding, token)
        finally:
            self._leave()

    def _handle(
        self, body: bytes, media: str, encoding: str, token: IngestToken | None
    ) -> Response:
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
        batch = audit_spans(
            request,
            max_attribute_length=self.max_attribute_length,
            max_attributes=self.max_attributes,
        )
        name = token.name if token is not None else None
        entries: list[Mapping[str, Any]] = []
        payloads: list[bytes | None] = []
        keys: list[bytes] = []
        forbidden = 0
        for span, ids in zip(batch.spans, batch.keys, strict=True):
            try:
                fields, payload = entry_from_span(span)
                key = dedup_key(ids, fields)
            except Exception as exc:
                batch.reject(f"span {span.name[:80]!r}: cannot build its audit record: {exc}")
                continue
            refusal = token.refusal(fields) if token is not None else None
            if fields.get("category") == CATEGORY_INGEST_CONFLICT:
                # Only the server writes conflict records: a client's would read as one.
                refusal = f"category {CATEGORY_INGEST_CONFLICT!r} is reserved for the server"
            if refusal is not None:
                batch.reject(f"span {span.name[:80]!r}: {refusal}")
                forbidden += 1
                continue
            fields[INGEST_TOKEN_FIELD] = name
            entries.append(fields)
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
            result = self.unique(entries, payloads, keys)
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
        wanted = _by_ids(keys)
        rows = self.between([(ids, ids + b"\xff" * 33) for ids in wanted])
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
        result = self.unique(entries, [None] * len(entries), ckeys)
        return len(entries) - len(result.duplicates)

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
            "%(duplicates)d duplicate(s), %(rejected)d rejected, %(conflicts)d conflict(s)",
            self.stats,
        )


_METRIC_RESULTS: Final = {
    "appended": "appended",
    "duplicates": "duplicate",
    "rejected": "rejected",
    "conflicts": "conflict",
}


class _TooLarge(Exception):
    pass


_GZIP_MAGIC: Final = b"\x1f\x8b"


_CHUNK: Final = 64 * 1024


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Decode the whole body: every member of a multi-member gzip stream (RFC 1952 allows
    them; ``cat a.gz b.gz`` makes one), nothing after the last; at most ``limit`` bytes out."""
    if encoding in ("identity", ""):
        return body
    gzip_body = encoding == "gzip"
    wbits = 16 + zlib.MAX_WBITS if gzip_body else zlib.MAX_WBITS
    view = memoryview(body)
    out = bytearray()
    pos = 0
    while True:
        decoder = zlib.decompressobj(wbits)
        while not decoder.eof:
            if pos >= len(view):
                raise MalformedRequest(f"truncated {encoding} body")
            # Bounded slices: zlib copies what it does not consume into unused_data, and
            # handing it the rest of the body per member would be quadratic in the members.
            chunk = view[pos : pos + _CHUNK]
            pos += len(chunk)
            try:
                # max_length bounds the output (>= 1; 0 would mean unbounded): a small zip
                # bomb cannot make us allocate gigabytes, and the bound is on all members.
                out += decoder.decompress(chunk, limit + 1 - len(out))
            except zlib.error as exc:
                raise MalformedRequest(f"invalid {encoding} body: {exc}") from None
            if len(out) > limit or decoder.unconsumed_tail:
                raise _TooLarge
        pos -= len(decoder.unused_data)  # what follows this member
        if pos >= len(view):
            return bytes(out)
        if not (gzip_body and bytes(view[pos : pos + 2]) == _GZIP_MAGIC):
            raise MalformedRequest(
                f"{len(view) - pos} byte(s) of trailing data after the {encoding} stream"
            )


def _resource_service(value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise _Invalid("resource attribute service.name must be a string")


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
    tokens: Sequence[IngestToken] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after: int = DEFAULT_RETRY_AFTER,
    max_attribute_length: int = DEFAULT_MAX_ATTRIBUTE_LENGTH,
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
    close_store: bool = False,
    meter_provider: Any = None,
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


_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 25\r\n"
    b"retry-after: 1\r\nconnection: close\r\n\r\ntoo many open connections"
)


def _check_server_limits(read_timeout: float, max_connections: int) -> None:
    if not read_timeout > 0 or not math.isfinite(read_timeout):
        raise ConfigError(f"read_timeout={read_timeout!r} must be a positive number of seconds")
    if max_connections < 1:
        raise ConfigError(f"max_connections={max_connections!r} must be at least 1")


def _guarded_protocol(ingest: _Ingest, read_timeout: float, max_connections: int) -> type[Any]:
    """uvicorn's h11 protocol with a deadline for reading each request and a connection cap.

    uvicorn times out idle keep-alive connections only: a client that sends its headers or
    body one byte at a time keeps a connection (and a file descriptor) forever. Here every
    request must arrive whole within ``read_timeout`` seconds of its first byte (of the
    connection, for the first request), or the connection is closed; a connection beyond
    ``max_connections`` gets a 503 and is closed before anything is read.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    _check_server_limits(read_timeout, max_connections)
    reading = (h11.IDLE, h11.SEND_BODY)

    class _GuardedProtocol(H11Protocol):
        _refused = False
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                self._refused = True
                transport.write(_BUSY)
                transport.close()
                ingest.count(refused_connections=1)
                refused = ingest.stats["refused_connections"]
                if refused == 1 or refused % 1000 == 0:
                    _log.warning(
                        "refused a connection: %d open (--max-connections); %d refused so far",
                        len(self.connections),
                        refused,
                    )
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._read_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on a keep-alive connection starts
            super().data_received(data)
            if self.conn.their_state not in reading:
                self._disarm()  # the request is complete (or broken and answered)

        def on_response_complete(self) -> None:
            # A pipelined request that arrived with the previous one is started here, from
            # h11's buffer, not in data_received: without this its body could trickle in
            # forever (data_received only arms the timer for a request that starts IDLE).
            super().on_response_complete()
            if (
                self._read_timer is None
                and not self.transport.is_closing()
                and self.conn.their_state is h11.SEND_BODY
            ):
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                self._arm()  # we are answering (say a 413 before the body): let it finish
                return
            ingest.count(read_timeouts=1)
            _log.info(
                "closed the connection from %s: no whole request within %.1f s",
                f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                read_timeout,
            )
            self.transport.close()

    return _GuardedProtocol


def _uvicorn_config(
    app: Starlette,
    host: str,
    port: int,
    log_format: str,
    log_level: str,
    *,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Any:
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
        http=_guarded_protocol(app.state.ingest, read_timeout, max_connections),
    )


def serve(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 4318,
    token: str | None,
    tokens: Sequence[IngestToken] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after: int = DEFAULT_RETRY_AFTER,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
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
        token: one shared bearer secret (trusted for everything), or ``None``.
        tokens: the tokens of a token file; with neither, no authentication.
        max_body_bytes: request size limit.
        retry_after: seconds in ``Retry-After`` with a 503.
        read_timeout: seconds a client has to send a whole request.
        max_connections: open connections beyond this get 503 and are closed.
        log_format: ``text`` or ``json``.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
    """
    import uvicorn

    _check_server_limits(read_timeout, max_connections)  # before the store is opened
    store = _open(url)
    app = create_app(
        store,
        token=token,
        tokens=tokens,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
        close_store=True,
    )
    config = _uvicorn_config(
        app,
        host,
        port,
        log_format,
        log_level,
        read_timeout=read_timeout,
        max_connections=max_connections,
    )
    server = uvicorn.Server(config)
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
        read_timeout: seconds a client has to send a whole request.
        max_connections: open connections beyond this get 503 and are closed.
        **options: passed to :func:`create_app`.
    """

    def __init__(
        self,
        store: AuditStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        **options: Any,
    ) -> None:
        import uvicorn

        self.app = create_app(store, **options)
        self.host = host
        config = _uvicorn_config(
            self.app,
            host,
            port,
            "text",
            "warning",
            read_timeout=read_timeout,
            max_connections=max_connections,
        )
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
        """Counts: requests, appended, duplicates, rejected, forbidden, conflicts, ..."""
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
