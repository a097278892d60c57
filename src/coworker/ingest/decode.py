"""Decoding OTLP/HTTP trace requests: bodies (gzip, deflate), protobuf and OTLP JSON, and the
audit spans they carry, with the limits that keep one request's cost bounded."""

from __future__ import annotations

import base64
import json
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from coworker import attributes as attr
from coworker.audit.record import KIND_OUTCOME, finish_outcome, record_fields
from coworker.ingest.usage import ROLLUP_SPAN_TYPES, TOKEN_KEYS

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


class SpanRecord(NamedTuple):
    """An audit span's record, made from the OTLP message without an SDK span.

    The same fields as :func:`coworker.audit.record.entry_from_span` of the span's
    ``ReadableSpan``, for a fraction of the cost (no ``Resource``, ``SpanContext``,
    ``Event``, ``Link``, ``Status`` objects per span).

    Attributes:
        name: the span name.
        fields: the outcome record fields (without ``seq``).
        payload: the canonical captured input/output, or ``None``.
        attributes: the span's attributes (plain values), for its usage record.
        end_time: the span's end (ns), for its usage record's pricing.
    """

    name: str
    fields: dict[str, Any]
    payload: bytes | None
    attributes: dict[str, Any]
    end_time: int


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
        audited: per span, ``True`` when it is an audit span (``False``: a usage span only).
        usage: per span, ``True`` when it carries token counts for the usage ledger
            (:func:`coworker.ingest.usage.wants_usage`; only with ``audit_spans(usage=True)``).
        records: with ``audit_spans(records=True)``, instead of ``spans``: per span its
            outcome record built straight from the protobuf message (:class:`SpanRecord`,
            or what ``audit_spans``'s ``build`` made of it).
    """

    spans: list[ReadableSpan] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    audited: list[bool] = field(default_factory=list)
    usage: list[bool] = field(default_factory=list)
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
    usage: bool = False,
    records: bool = False,
    build: Callable[[Any, _Parts, Any, bool], Any] | None = None,
) -> AuditBatch:
    """Select the audit spans of a request (``coworker.audited`` is ``true``) and decode them.

    A span is an audit span when ``coworker.audited`` or, from a coworker 0.1.0 sender,
    ``coworker.audit`` is ``true``. An audit span is rejected (counted, with a reason) when its
    ids are invalid, it has not ended, one of those flags is not a boolean, a string attribute
    is longer than ``max_attribute_length``, an attribute set (its own, its resource's, its
    scope's, an event's or a link's) has more than ``max_attributes`` entries or names a key
    twice, or it has more than ``max_attributes`` events or links. Other spans are skipped
    without a look at the rest of them.

    With ``usage``, spans that carry token counts and are no flow/step/turn roll-up
    (:func:`coworker.ingest.usage.wants_usage`) are decoded too, audited or not, under the
    same checks; ``batch.audited`` and ``batch.usage`` say what each decoded span is for.

    Args:
        request: the decoded request.
        max_attribute_length: the longest string attribute value accepted.
        max_attributes: the most attributes per set, events and links per span.
        usage: decode usage spans too (for the usage ledger).
        records: make each span's record (``batch.records``) instead of its
            ``ReadableSpan`` (``batch.spans`` stays empty): the same checks and the same
            record as ``entry_from_span`` of the span, without the SDK objects.
        build: with ``records``, what makes a span's entry of ``batch.records`` instead of
            :class:`SpanRecord`: called with the span message, its checked parts, the
            resource's ``service.name`` and whether it is a usage span (``decode_body``
            makes the stored record in one step, :mod:`coworker.ingest.prepare`); what it
            raises rejects the span as a record that cannot be built.

    Returns:
        The batch of decoded spans, their ids (``trace_id || span_id``) and the rejections.
    """
    limits = _Limits(max_attribute_length, max_attributes)
    batch = AuditBatch()
    for rs in request.resource_spans:
        resource: Resource | None = None
        resource_attributes: dict[str, Any] | None = None
        resource_error: str | None = None
        for ss in rs.scope_spans:
            scope: InstrumentationScope | None = None
            scope_checked = False
            for span in ss.spans:
                batch.total += 1
                if usage:
                    flag, wanted = _flags(span.attributes)
                else:
                    flag, wanted = _audit_flag(span.attributes), False
                if (flag is None or flag is False) and not wanted:
                    continue  # not for the audit trail (every coworker span carries the flag)
                if flag is not True and flag is not None and flag is not False:
                    batch.reject(f"span {span.name[:80]!r}: {flag}")
                    continue
                try:
                    if resource_error is not None:
                        raise _Invalid(resource_error)
                    if resource_attributes is None:
                        try:
                            checked = _attributes(rs.resource.attributes, limits)
                            # A record's service is a name: a token's services are matched
                            # against it, and "{'x': None}" is not one.
                            _resource_service(checked.get(attr.SERVICE_NAME))
                            if not records:
                                resource = Resource(checked, rs.schema_url or None)
                        except _Invalid as exc:
                            resource_error = f"resource: {exc}"
                            raise _Invalid(resource_error) from None
                        resource_attributes = checked
                    if records:
                        if not scope_checked:
                            _attributes(ss.scope.attributes, limits)
                            scope_checked = True
                        parts = _checked_span(span, limits)
                    else:
                        if scope is None:
                            scope = InstrumentationScope(
                                ss.scope.name,
                                ss.scope.version or None,
                                ss.schema_url or None,
                                _attributes(ss.scope.attributes, limits),
                            )
                        assert resource is not None
                        readable = _readable_span(span, resource, scope, limits)
                except _Invalid as exc:
                    batch.reject(f"span {span.name[:80]!r}: {exc}")
                    continue
                if records:
                    try:
                        service = resource_attributes.get(attr.SERVICE_NAME)
                        built = (
                            _span_record(span, parts, service)
                            if build is None
                            else build(span, parts, service, wanted)
                        )
                    except Exception as exc:
                        what = "audit" if flag is True else "usage"
                        batch.reject(
                            f"span {span.name[:80]!r}: cannot build its {what} record: {exc}"
                        )
                        continue
                    batch.records.append(built)
                    batch.keys.append(parts.trace_id + parts.span_id)
                else:
                    batch.spans.append(readable)
                    batch.keys.append(bytes(span.trace_id) + bytes(span.span_id))
                batch.audited.append(flag is True)
                batch.usage.append(wanted)
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


_AUDIT_KEYS: Final = frozenset({attr.AUDITED, attr.AUDITED_LEGACY})
_FLAG_KEYS: Final = _AUDIT_KEYS | TOKEN_KEYS | {attr.SPAN_TYPE}


def _flags(attributes: Iterable[KeyValue]) -> tuple[bool | str | None, bool]:
    """:func:`_audit_flag` and :func:`~coworker.ingest.usage.wants_usage` in one pass over
    the attributes (this runs for every span of every request, audit span or not)."""
    found: bool | None = None
    malformed: str | None = None
    tokens = rollup = False
    for kv in attributes:
        key = kv.key
        if key not in _FLAG_KEYS:
            continue
        if key in _AUDIT_KEYS:
            if kv.value.WhichOneof("value") != "bool_value":
                malformed = key
            elif kv.value.bool_value:
                found = True
            elif found is None:
                found = False
        elif key == attr.SPAN_TYPE:
            rollup = kv.value.string_value in ROLLUP_SPAN_TYPES
        else:
            tokens = True
    flag: bool | str | None = found
    if found is not True and malformed is not None:
        flag = f"{malformed} must be a boolean"
    return flag, tokens and not rollup


class _Parts(NamedTuple):
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    start: int
    end: int
    events: list[tuple[Any, dict[str, Any]]]
    links: list[tuple[bytes, bytes, dict[str, Any]]]
    code: StatusCode
    attributes: dict[str, Any]


def _checked_span(span: Any, limits: _Limits) -> _Parts:
    """Every check of an audit span (one place for both ways of decoding it), in the order
    that decides which reason a span with several faults is rejected for."""
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
    name = span.name
    if len(name) > limit:
        raise _Invalid(f"name longer than {limit} characters")
    span_events, span_links = span.events, span.links  # each read makes a container
    if len(span_events) > limits.count or len(span_links) > limits.count:
        raise _Invalid(f"more than {limits.count} events or links")
    events = [(e, _attributes(e.attributes, limits)) for e in span_events] if span_events else []
    links = []
    for link in span_links:
        ltrace, lspan = bytes(link.trace_id), bytes(link.span_id)
        if len(ltrace) != 16 or len(lspan) != 8:
            raise _Invalid("a link's trace_id/span_id have the wrong length")
        links.append((ltrace, lspan, _attributes(link.attributes, limits)))
    status = span.status.code
    code = _STATUS.get(status)
    if code is None:
        raise _Invalid(f"unknown status code {status}")
    attributes = _attributes(span.attributes, limits)
    return _Parts(name, trace_id, span_id, parent_id, start, end, events, links, code, attributes)


def _span_record(span: Any, parts: _Parts, service: Any) -> SpanRecord:
    # What entry_from_span makes of the ReadableSpan _readable_span would build: the same
    # parts through the same record_fields (tests/ingest: both ways, field for field).
    fields, payload = record_fields(
        KIND_OUTCOME,
        span.name,
        parts.attributes,
        service,
        parts.trace_id.hex(),
        parts.span_id.hex(),
        parts.parent_id.hex() if parts.parent_id else None,
        parts.start,
    )
    finish_outcome(fields, parts.end, parts.code is StatusCode.ERROR)
    return SpanRecord(span.name, fields, payload, parts.attributes, parts.end)


def _readable_span(
    span: Any, resource: Resource, scope: InstrumentationScope, limits: _Limits
) -> ReadableSpan:
    parts = _checked_span(span, limits)
    trace_id = int.from_bytes(parts.trace_id, "big")
    state = _trace_state(span.trace_state)
    flags = TraceFlags(span.flags & 0xFF)
    context = SpanContext(
        trace_id,
        int.from_bytes(parts.span_id, "big"),
        is_remote=True,
        trace_flags=flags,
        trace_state=state,
    )
    parent = (
        SpanContext(trace_id, int.from_bytes(parts.parent_id, "big"), True)
        if parts.parent_id
        else None
    )
    events = [
        Event(e.name, attributes, e.time_unix_nano or None, limit=None)
        for e, attributes in parts.events
    ]
    links = [
        Link(
            SpanContext(int.from_bytes(ltrace, "big"), int.from_bytes(lspan, "big"), True),
            attributes,
        )
        for ltrace, lspan, attributes in parts.links
    ]
    code = parts.code
    status = Status(code, span.status.message or None) if code is StatusCode.ERROR else Status(code)
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=parts.attributes,
        events=events,
        links=links,
        kind=_KINDS.get(span.kind, SpanKind.INTERNAL),
        status=status,
        start_time=parts.start,
        end_time=parts.end,
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
    absent: set[str] | None = None  # keys given with an empty value (not in out)
    for kv in kvs:
        key = kv.key
        if len(key) > limit:
            raise _Invalid(f"attribute key longer than {limit} characters")
        if key in out or (absent is not None and key in absent):
            # OTLP says keys are unique; a second user.id would make the record say one thing
            # and a trace viewer showing the first another.
            raise _Invalid(f"attribute {key[:80]!r} given twice")
        v = kv.value
        value: Any = v.string_value
        if value:  # most attributes: a string, which no other kind of value has
            if len(value) > limit:
                raise _Invalid(f"attribute value longer than {limit} characters")
        else:
            value = _value(v, limit, 0)
        if value is not None:
            out[key] = value
        else:
            absent = absent if absent is not None else set()
            absent.add(key)
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
