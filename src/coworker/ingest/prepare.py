"""An audit span's stored record in one step: from the checked protobuf parts straight to its
canonical body halves, query values and dedup key, without the record's fields dict.

The general way (:func:`coworker.ingest.decode._span_record`, then
:func:`~coworker.audit.record.storable` and
:meth:`~coworker.ingest.records.PreparedRecord.with_digest`) builds a dict of 30 fields,
scans it for values no store can hold, copies it with a ``seq``, and writes the canonical JSON
of it twice (the body and the content its dedup key hashes), value by value. Every ingested
outcome record has the same 30 keys, so their sorted order, and with it the text between the
values, is known in advance: :func:`prepared_item` encodes each value once and formats three
fixed templates (the body before the seq, after it, and the content). The bytes are those of
the general way (``tests/test_ingest_records.py`` proves it, hostile requests included); a
record the templates cannot write as it would (a value with a NUL, a lone surrogate, an
``intent_seq`` beyond 2^53: what ``storable`` changes, loudly) returns ``None``, and the caller
takes the general way.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any, Final

from opentelemetry.trace.status import StatusCode

from coworker import attributes as attr
from coworker.audit.record import (
    _MAX_SAFE_INT,
    _STRING_ATTRIBUTES,
    KIND_OUTCOME,
    OUTCOME_OK,
    SCHEMA_VERSION,
    _as_str,
    _payload,
    finish_outcome,
    format_time,
    record_fields,
)
from coworker.ingest.decode import _Parts, _span_record
from coworker.ingest.records import _NOT_CONTENT, QUERY_FIELDS
from coworker.ingest.tokens import INGEST_TOKEN_FIELD

__all__ = ["ENTRY", "builder", "prepared_item"]

ENTRY: Final = "entry"
"""The kind of an item that is a record: ``(ENTRY, name, before, after, values, payload,
key)``, a :class:`~coworker.ingest.records.PreparedRecord`'s parts."""

_encode_str: Any = json.encoder.encode_basestring  # canonical()'s string encoder

# The keys of an ingested outcome record, as record_fields + finish_outcome + the token make
# them (checked below against what they make).
_ATTRIBUTE_FIELDS: Final = tuple(key for key, _ in _STRING_ATTRIBUTES)
_KEYS: Final = tuple(
    sorted(
        (
            "v", "kind", "recorded_at", "name", "service", "trace_id", "span_id",
            "parent_span_id", "start", "payload_digest", *_ATTRIBUTE_FIELDS, "intent_seq",
            "end", "outcome", INGEST_TOKEN_FIELD,
        )
    )
)  # fmt: skip
_SAMPLE, _ = record_fields(KIND_OUTCOME, "n", {}, None, None, None, None, 0)
finish_outcome(_SAMPLE, 0, False)
_SAMPLE[INGEST_TOKEN_FIELD] = None

_SEQ_AT: Final = sum(1 for key in _KEYS if key < "seq")
_TOKEN_AT: Final = _KEYS.index(INGEST_TOKEN_FIELD)
_RECORDED_AT_AT: Final = _KEYS.index("recorded_at")
# The body is four runs of members, split by the members the content leaves out (the token,
# recorded_at) and by the seq: the content is the runs alone, the body the runs with them.
_ENABLED: Final = (
    set(_SAMPLE) == set(_KEYS)
    and len(_SAMPLE) == len(_KEYS)
    and {INGEST_TOKEN_FIELD, "recorded_at", "seq"} == _NOT_CONTENT
    and 0 < _TOKEN_AT < _RECORDED_AT_AT < _SEQ_AT < len(_KEYS)
)
"""``False`` if the record's layout changed without this module: every span goes the general
way (correct, just slower) until it is brought in step (the tests fail then)."""


def _run(start: int, stop: int) -> str:
    text = ",".join(f"{_encode_str(key)}:%s" for key in _KEYS[start:stop])
    return "{" + text if start == 0 else "," + text


_RUN_A: Final = _run(0, _TOKEN_AT)
_RUN_B: Final = _run(_TOKEN_AT + 1, _RECORDED_AT_AT)
_RUN_C: Final = _run(_RECORDED_AT_AT + 1, _SEQ_AT)
_RUN_D: Final = _run(_SEQ_AT, len(_KEYS)) + "}"
_BEFORE: Final = (
    f"%s,{_encode_str(INGEST_TOKEN_FIELD)}:%s%s,{_encode_str('recorded_at')}:%s%s,"
    + _encode_str("seq")
    + ":"
)
_INDEX: Final = {key: i for i, key in enumerate(_KEYS)}
_QUERY_AT: Final = tuple(_INDEX[name] for name in QUERY_FIELDS)
_NUL: Final = "\\u0000"  # how a NUL (which storable escapes in query fields) is encoded

# Attribute -> its place in _KEYS, for the string-valued ones.
_ATTRIBUTE_AT: Final = tuple((_INDEX[key], attribute) for key, attribute in _STRING_ATTRIBUTES)
(_V, _KIND, _RECORDED_AT, _NAME, _SERVICE, _TRACE_ID, _SPAN_ID, _PARENT_SPAN_ID, _START, _END,
 _PAYLOAD_DIGEST, _INTENT_SEQ, _ERROR_TYPE, _OUTCOME, _TOKEN) = (
    _INDEX[key]
    for key in (
        "v", "kind", "recorded_at", "name", "service", "trace_id", "span_id", "parent_span_id",
        "start", "end", "payload_digest", "intent_seq", "error_type", "outcome",
        INGEST_TOKEN_FIELD,
    )
)  # fmt: skip


def prepared_item(
    name: str,
    trace_id: bytes,
    span_id: bytes,
    parent_id: bytes,
    start: int,
    end: int,
    failed: bool,
    attributes: dict[str, Any],
    service: str | None,
    token: str | None,
) -> tuple[bytes, bytes, tuple[Any, ...], bytes | None, bytes] | None:
    """``(body before the seq, body after it, query values, payload, dedup key)`` of an
    audit span's outcome record, as :class:`~coworker.ingest.records.PreparedRecord` and
    :func:`~coworker.ingest.records.dedup_key` make them of ``entry_from_span``'s fields with
    ``ingest_token`` set; ``None`` when the record needs the general way (see the module).

    Args:
        name: the span name.
        trace_id: 16 bytes; span_id: 8 bytes; parent_id: 8 bytes or empty (checked).
        start: start time (ns); end: end time (ns).
        failed: the span's status is ERROR.
        attributes: the span's checked attributes (plain values).
        service: the resource's ``service.name`` (checked: a string or ``None``).
        token: the name of the token that delivered it.
    """
    if not _ENABLED:
        return None
    values: list[Any] = [None] * len(_KEYS)
    values[_V] = SCHEMA_VERSION
    values[_KIND] = KIND_OUTCOME
    get = attributes.get
    for at, attribute in _ATTRIBUTE_AT:
        value = get(attribute)
        values[at] = value if value is None or type(value) is str else _as_str(value)
    intent_seq = get(attr.AUDIT_INTENT_SEQ)
    if type(intent_seq) is int:
        if not -_MAX_SAFE_INT <= intent_seq <= _MAX_SAFE_INT:
            return None  # storable makes it text
        values[_INTENT_SEQ] = intent_seq
    payload = None
    if attr.INPUT in attributes or attr.OUTPUT in attributes:
        payload = _payload(attributes)
        if payload is not None:
            values[_PAYLOAD_DIGEST] = hashlib.sha256(payload).hexdigest()
    error_type = values[_ERROR_TYPE]
    values[_OUTCOME] = error_type or "error" if failed or error_type is not None else OUTCOME_OK
    values[_RECORDED_AT] = format_time(time.time_ns())
    values[_NAME] = name
    values[_SERVICE] = service
    values[_TRACE_ID] = trace_id.hex()
    values[_SPAN_ID] = span_id.hex()
    if parent_id:
        values[_PARENT_SPAN_ID] = parent_id.hex()
    values[_START] = format_time(start)
    values[_END] = format_time(end)
    values[_TOKEN] = token
    encoded = [
        "null"
        if value is None
        else _encode_str(value)
        if type(value) is str
        else int.__repr__(value)
        for value in values
    ]
    a = _RUN_A % tuple(encoded[:_TOKEN_AT])
    b = _RUN_B % tuple(encoded[_TOKEN_AT + 1 : _RECORDED_AT_AT])
    c = _RUN_C % tuple(encoded[_RECORDED_AT_AT + 1 : _SEQ_AT])
    after = _RUN_D % tuple(encoded[_SEQ_AT:])
    before = _BEFORE % (a, encoded[_TOKEN_AT], b, encoded[_RECORDED_AT_AT], c)
    if _NUL in before or _NUL in after:
        return None  # storable escapes a NUL in a query field (and this cannot tell which)
    try:
        halves = before.encode("utf-8"), after.encode("utf-8")
        content = (a + b + c + after).encode("utf-8")
    except UnicodeEncodeError:
        return None  # a lone surrogate: storable escapes it
    query = tuple([values[i] for i in _QUERY_AT])
    return (*halves, query, payload, trace_id + span_id + hashlib.sha256(content).digest())


def builder(token: str | None) -> Callable[[Any, _Parts, Any, bool], Any]:
    """What :func:`~coworker.ingest.decode.audit_spans` calls (its ``build``) for a request
    delivered with ``token``: an audit span's stored record as a ready
    :data:`ENTRY` item ``(ENTRY, name, before, after, values,
    payload, key)``, or, for a usage span and a record off the templates, its
    :class:`~coworker.ingest.decode.SpanRecord` (the general way)."""

    def build(span: Any, parts: _Parts, service: Any, usage: bool) -> Any:
        if not usage:
            name = parts.name
            item = prepared_item(
                name,
                parts.trace_id,
                parts.span_id,
                parts.parent_id,
                parts.start,
                parts.end,
                parts.code is StatusCode.ERROR,
                parts.attributes,
                service,
                token,
            )
            if item is not None:
                return (ENTRY, name[:80], *item)
        return _span_record(span, parts, service)

    return build
