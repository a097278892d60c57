"""The audit record: its versioned schema, how a span becomes one, and its canonical bytes.

A record body is a flat JSON object (schema version :data:`SCHEMA_VERSION`) whose keys are
:data:`FIELDS`. Every value is a string, ``null``, a boolean or a small integer: OTel int64
values and nanosecond timestamps are mapped to strings and ids to lower-case hex *before*
canonicalising, because RFC 8785 numbers are IEEE doubles and would round anything above 2^53.

The canonical bytes are RFC 8785 (JCS). :func:`canonical` takes a fast path for the flat,
ASCII-keyed records this module produces (``json`` with sorted keys, which is byte-identical
to JCS for such objects; ``tests/audit/test_record.py`` proves it with hypothesis) and falls
back to the reference ``rfc8785`` encoder for anything else (nested correction fields,
floats, non-ASCII keys).

The captured input/output of a run is never in the body: the body holds the SHA-256 of the
payload bytes (``payload_digest``) and the payload itself is stored beside the record, so that
a payload can later be erased without breaking the chain.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any, Final

import rfc8785
from opentelemetry.trace import StatusCode

from coworker import attributes as attr

__all__ = [
    "CATEGORY_FLOW",
    "CATEGORY_INGEST_CONFLICT",
    "FIELDS",
    "KIND_CORRECTION",
    "KIND_INTENT",
    "KIND_OUTCOME",
    "OUTCOME_OK",
    "QUERY_FILTERS",
    "SCHEMA_VERSION",
    "canonical",
    "canonical_pair",
    "correction_entry",
    "entry_from_span",
    "finish_outcome",
    "format_time",
    "intent_from_span",
    "payload_digest",
    "record_fields",
    "storable",
]

SCHEMA_VERSION: Final = 1
"""Version of the record body schema, stored in every record as ``v``."""

KIND_OUTCOME: Final = "outcome"
"""A finished run (ok or failed)."""
KIND_INTENT: Final = "intent"
"""Written before a state-changing run executes in fail-closed mode; an intent without a
later outcome for the same span is *in doubt*."""
KIND_CORRECTION: Final = "correction"
"""A correction of an earlier record (``corrects`` = its seq); the original stays."""

CATEGORY_INGEST_CONFLICT: Final = "ingest-conflict"
"""Category of the record ``coworker audit serve`` writes when two different spans claim the
same trace and span id (both are kept; this record names them in ``conflict_seqs``)."""

CATEGORY_FLOW: Final = "flow"
"""Category of flow lifecycle events (flow started, step entered ... flow sealed; issue 14,
docs/flows.md). ``operation`` is the event name; the optional keys ``flow_event_v``,
``attempt``, ``definition_id``, ``definition_steps``, ``previous_flow_id``, ``break_reason``,
``next_flow_id``, ``head_seq``, ``head_hash``, ``flow_status`` and ``fold_version`` are added
without a schema version change, like ``ingest_token``."""

OUTCOME_OK: Final = "ok"
"""``outcome`` of a run that did not fail; a failed run has its error type instead."""

FIELDS: Final[tuple[str, ...]] = (
    "v",  # schema version (int)
    "seq",  # position in the log, gapless from 1 (int; assigned by chain.seal)
    "kind",  # outcome | intent | correction
    "recorded_at",  # when the record was made (RFC 3339, ns, UTC)
    "category",  # coworker.audit.category
    "operation",  # coworker.operation
    "doctype",  # coworker.doctype
    "name",  # span name
    "outcome",  # "ok", the error type, or null for an intent
    "error_type",  # error.type or null
    "run_id",  # coworker.run.id
    "parent_run_id",  # coworker.run.parent_id
    "chain_id",  # coworker.chain.id (root run of the tree)
    "flow_type",  # flow.type
    "flow_id",  # flow.id
    "step_id",  # step.id
    "user_id",  # user.id
    "agent_id",  # gen_ai.agent.id
    "agent_name",  # gen_ai.agent.name
    "session_id",  # session.id
    "conversation_id",  # gen_ai.conversation.id
    "service",  # service.name of the span's resource
    "trace_id",  # 32 hex
    "span_id",  # 16 hex
    "parent_span_id",  # 16 hex or null
    "start",  # span start (RFC 3339, ns, UTC)
    "end",  # span end, or null for an intent
    "intent_seq",  # seq of the intent record this outcome closes (int) or null
    "payload_digest",  # SHA-256 hex of the separate payload bytes, or null
)
"""The keys of a version-1 outcome/intent body. Corrections add ``corrects``, ``reason``,
``fields`` and ``corrected_by``. Optional keys, added without a schema version change (a
verifier hashes the body as stored, so older records verify unchanged): ``ingest_token`` (the
name of the bearer token that delivered an ingested record) and, on ingest conflict records,
``conflict_seqs`` and ``conflict_digests``."""

# Attribute -> record field, for the plain string-valued ones.
_STRING_ATTRIBUTES: Final = (
    ("category", attr.AUDIT_CATEGORY),
    ("operation", attr.OPERATION),
    ("doctype", attr.DOCTYPE),
    ("error_type", attr.ERROR_TYPE),
    ("run_id", attr.RUN_ID),
    ("parent_run_id", attr.RUN_PARENT_ID),
    ("chain_id", attr.CHAIN_ID),
    ("flow_type", attr.FLOW_TYPE),
    ("flow_id", attr.FLOW_ID),
    ("step_id", attr.STEP_ID),
    ("user_id", attr.USER_ID),
    ("agent_id", attr.AGENT_ID),
    ("agent_name", attr.AGENT_NAME),
    ("session_id", attr.SESSION_ID),
    ("conversation_id", attr.CONVERSATION_ID),
)

_MAX_SAFE_INT: Final = 2**53 - 1

# The sorted key order of each key tuple seen (records share a handful of layouts), with the
# ``"key":`` text of each key: canonical() then writes the values in that order without
# sorting 30 keys per record. Bounded: an unusual layout beyond it is sorted each time.
_ORDERS: dict[tuple[str, ...], tuple[tuple[str, str], ...] | None] = {}
_MAX_ORDERS: Final = 512
_encode_str: Any = json.encoder.encode_basestring  # the C encoder JSONEncoder uses for str


def _order(keys: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
    order: tuple[tuple[str, str], ...] | None = None
    if all(type(k) is str and k.isascii() for k in keys):
        order = tuple((k, _encode_str(k) + ":") for k in sorted(keys))
    if len(_ORDERS) < _MAX_ORDERS:
        _ORDERS[keys] = order
    return order


def canonical(fields: Mapping[str, Any]) -> bytes:
    """Return the RFC 8785 canonical JSON bytes of ``fields``.

    Flat objects with ASCII keys and string / null / boolean / safe-integer values (every
    record this module builds) are written directly: keys in sorted order (code unit order
    equals code point order for ASCII), strings escaped by the C ``json`` string encoder with
    ``ensure_ascii=False`` (the same escaping as JCS), integers as their decimal digits. For
    such objects that is byte-identical to JCS (``tests/audit/test_record.py`` proves it with
    hypothesis), and about 3x cheaper than ``json`` with ``sort_keys``. Anything else is handed
    to the reference ``rfc8785`` encoder.

    Args:
        fields: the record fields.

    Returns:
        UTF-8 bytes.

    Raises:
        ValueError: a value cannot be represented (NaN, an integer beyond 2^53 ...).
    """
    keys = tuple(fields)
    order = _ORDERS[keys] if keys in _ORDERS else _order(keys)
    if order is None:
        return _reference(fields)
    parts: list[str] = []
    append = parts.append
    for key, label in order:
        value = fields[key]
        kind = type(value)
        if kind is str:
            append(label + _encode_str(value))
        elif value is None:
            append(label + "null")
        elif kind is bool:
            append(label + ("true" if value else "false"))
        elif kind is int and -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            append(label + int.__repr__(value))
        else:
            return _reference(fields)
    try:
        return ("{" + ",".join(parts) + "}").encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate from a badly decoded attribute: not valid UTF-8, so JCS cannot
        # carry it either. Replace it rather than lose the record.
        return canonical(_scrub(fields))


def canonical_pair(fields: Mapping[str, Any], omit: frozenset[str]) -> tuple[bytes, bytes]:
    """``(canonical(fields), canonical(fields without the keys in omit))`` in one pass.

    The ingest endpoint needs both for every record: the body, and the content its dedup key
    hashes (the body without ``seq``, ``recorded_at`` and ``ingest_token``). The members of
    the second are the members of the first minus the omitted ones, in the same order, so
    both are joined from one list; anything off :func:`canonical`'s fast path is encoded
    twice by :func:`canonical` itself.
    """
    keys = tuple(fields)
    order = _ORDERS[keys] if keys in _ORDERS else _order(keys)
    if order is not None:
        parts: list[str] = []
        kept: list[str] = []
        for key, label in order:
            value = fields[key]
            kind = type(value)
            if kind is str:
                part = label + _encode_str(value)
            elif value is None:
                part = label + "null"
            elif kind is bool:
                part = label + ("true" if value else "false")
            elif kind is int and -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
                part = label + int.__repr__(value)
            else:
                break
            parts.append(part)
            if key not in omit:
                kept.append(part)
        else:
            try:
                return (
                    ("{" + ",".join(parts) + "}").encode("utf-8"),
                    ("{" + ",".join(kept) + "}").encode("utf-8"),
                )
            except UnicodeEncodeError:
                pass  # canonical() scrubs it
    return canonical(fields), canonical({k: v for k, v in fields.items() if k not in omit})


def _reference(fields: Mapping[str, Any]) -> bytes:
    try:
        return rfc8785.dumps(dict(fields))
    except UnicodeEncodeError:
        return rfc8785.dumps(_scrub(fields))
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(f"audit record cannot be canonicalised: {exc}") from exc


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, Mapping):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


QUERY_TEXT_FIELDS: Final = frozenset(
    {
        "kind", "category", "operation", "doctype", "outcome", "flow_id", "step_id", "run_id",
        "user_id", "agent_id", "trace_id", "span_id", "start", "recorded_at",
    }
)  # fmt: skip
"""The fields the stores keep as query columns (``time`` is ``start`` or ``recorded_at``): a
NUL in one cannot be kept there (SQLite's json_extract, which generates a version 2 column,
stops at ``\\u0000``; PostgreSQL text holds no NUL), so :func:`storable` escapes it."""


def storable(fields: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
    """Make every value of a record representable in every store, naming what changed.

    A record must never fail to append because of its content: a lone surrogate is not
    UTF-8, so no store (and no JCS body) can hold it, and a NaN or an integer beyond 2^53 has
    no canonical JSON form. Such values become text: a lone surrogate is escaped as
    ``\\udXXX`` (visible, never silently replaced), other values by :func:`str`. A NUL in a
    :data:`QUERY_TEXT_FIELDS` value becomes the text ``\\x00`` (a query column would hold
    less than the body says). Checked per
    value, with a fast path for ASCII strings, so the common record costs one scan.

    Args:
        fields: the record fields.

    Returns:
        ``(fields, altered)``: the same mapping when nothing needed changing (``altered`` is
        empty), else a fixed copy and the names of the fields that were changed.
    """
    altered: list[str] = []
    for value in fields.values():
        # The common record (ASCII text, null, booleans, small ints) in one cheap pass.
        kind = type(value)
        if kind is str:
            if not value.isascii() or "\x00" in value:
                break
        elif (
            value is not None
            and kind is not bool
            and not (kind is int and -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT)
        ):
            break
    else:
        return fields, altered
    for key, value in fields.items():
        if not _storable_value(value) or (
            key in QUERY_TEXT_FIELDS and type(value) is str and "\x00" in value
        ):
            altered.append(key)
    if not altered:
        return fields, altered
    fixed = dict(fields)
    for key in altered:
        fixed[key] = _as_storable(fixed[key])
    return fixed, altered


def _storable_value(value: Any) -> bool:
    kind = type(value)
    if kind is str:
        if value.isascii():
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if value is None or kind is bool:
        return True
    if kind is int:
        return bool(-_MAX_SAFE_INT <= value <= _MAX_SAFE_INT)
    if kind in (dict, list):  # correction records: nested, checked by the reference encoder
        try:
            rfc8785.dumps(value)
        except Exception:
            return False
        return True
    return False


def _as_storable(value: Any) -> Any:
    if isinstance(value, str):
        text = str.__str__(value).encode("utf-8", "backslashreplace").decode("utf-8")
        return text.replace("\x00", "\\x00")
    if isinstance(value, Mapping):
        return {str(_as_storable(k)): _as_storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_storable(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if type(value) is int and -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
        return value
    try:
        text = str(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return _as_storable(text)


# The text of the seconds formatted lately: the records of one batch share a few seconds
# (recorded_at is now, a span's start and end may be seconds older: one last-second slot
# missed on every call of an ingested span), and time.gmtime + the date formatting are most
# of format_time's cost. Emptied when full; dict reads and writes are atomic, so threads
# never see a second with another second's text.
_SECONDS: dict[int, str] = {}
_MAX_SECONDS: Final = 64


def format_time(ns: int | None) -> str | None:
    """Format a Unix time in nanoseconds as fixed-width RFC 3339 UTC, e.g.
    ``2026-01-02T03:04:05.123456789Z``.

    Fixed width makes the strings sort in time order, which the stores rely on for
    ``--since`` / ``--until``.
    """
    if ns is None:
        return None
    secs, frac = divmod(ns, 1_000_000_000)
    prefix = _SECONDS.get(secs)
    if prefix is None:
        t = time.gmtime(secs)
        prefix = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        )
        if len(_SECONDS) >= _MAX_SECONDS:
            _SECONDS.clear()
        _SECONDS[secs] = prefix
    return f"{prefix}.{frac:09d}Z"


def payload_digest(payload: bytes | None) -> str | None:
    """SHA-256 hex of the payload bytes, as kept in the body's ``payload_digest``."""
    if payload is None:
        return None
    return hashlib.sha256(payload).hexdigest()


def _as_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        # int64 attributes become decimal strings: JCS numbers are doubles.
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return json.dumps([_as_str(v) for v in value], ensure_ascii=False)
    return str(value)


def _payload(attributes: Mapping[str, Any]) -> bytes | None:
    captured_in = attributes.get(attr.INPUT)
    captured_out = attributes.get(attr.OUTPUT)
    if captured_in is None and captured_out is None:
        return None
    return canonical({"input": _as_str(captured_in), "output": _as_str(captured_out)})


def _attributes(span: Any) -> Mapping[str, Any]:
    # An ended SDK span's attributes are an immutable BoundedAttributes around a plain dict:
    # read that dict itself. Anything else (a live span, a decoded one) gets one plain-dict
    # copy: the public mapping pays a slow get() per key, and a live one can still change.
    bounded = getattr(span, "_attributes", None)
    inner = getattr(bounded, "_dict", None)
    if type(inner) is dict and getattr(bounded, "_immutable", False) is True:
        return inner
    return dict(span.attributes or {})


def _base(span: Any, kind: str) -> tuple[dict[str, Any], bytes | None]:
    attributes = _attributes(span)
    ctx = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    parent = span.parent
    resource = getattr(span, "resource", None)
    return record_fields(
        kind,
        span.name,
        attributes,
        resource.attributes.get(attr.SERVICE_NAME) if resource is not None else None,
        format(ctx.trace_id, "032x") if ctx is not None else None,
        format(ctx.span_id, "016x") if ctx is not None else None,
        format(parent.span_id, "016x") if parent is not None else None,
        span.start_time,
    )


def record_fields(
    kind: str,
    name: str,
    attributes: Mapping[str, Any],
    service: Any,
    trace_id: str | None,
    span_id: str | None,
    parent_span_id: str | None,
    start: int | None,
) -> tuple[dict[str, Any], bytes | None]:
    """The fields every span record shares, from a span's parts (not an SDK span object).

    :func:`entry_from_span` and :func:`intent_from_span` take the parts from an SDK span; the
    OTLP ingest endpoint takes them straight from the protobuf message, so that a decoded span
    needs no ``ReadableSpan`` and still becomes the same record.

    Args:
        kind: :data:`KIND_OUTCOME` or :data:`KIND_INTENT`.
        name: the span name.
        attributes: the span attributes (plain values).
        service: the resource's ``service.name``.
        trace_id: 32 lower-case hex digits, or ``None``.
        span_id: 16 lower-case hex digits, or ``None``.
        parent_span_id: 16 lower-case hex digits, or ``None`` for a root span.
        start: the start time (ns since the epoch).

    Returns:
        ``(fields, payload)``: the fields without ``end``, ``outcome`` and ``seq``, and the
        canonical payload bytes or ``None``.
    """
    payload = _payload(attributes)
    fields: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "kind": kind,
        "recorded_at": format_time(time.time_ns()),
        "name": name,
        "service": _as_str(service),
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_span_id": parent_span_id,
        "start": format_time(start),
        "payload_digest": payload_digest(payload),
    }
    for key, attribute in _STRING_ATTRIBUTES:
        value = attributes.get(attribute)
        # Almost every value is a string or absent: no call for those (this runs 15 times
        # for every record).
        fields[key] = value if value is None or type(value) is str else _as_str(value)
    intent_seq = attributes.get(attr.AUDIT_INTENT_SEQ)
    fields["intent_seq"] = intent_seq if type(intent_seq) is int else None
    return fields, payload


def finish_outcome(fields: dict[str, Any], end: int | None, failed: bool) -> None:
    """Complete :func:`record_fields` into an outcome record: ``end`` and ``outcome``
    (``error_type``, else ``"error"`` when ``failed``, else ``"ok"``)."""
    fields["end"] = format_time(end)
    if failed or fields["error_type"] is not None:
        fields["outcome"] = fields["error_type"] or "error"
    else:
        fields["outcome"] = OUTCOME_OK


def entry_from_span(span: Any) -> tuple[dict[str, Any], bytes | None]:
    """Build the outcome record of a finished span.

    Reads only the public fields of an SDK ``ReadableSpan`` (``name``, ``attributes``,
    ``get_span_context()``, ``parent``, ``resource``, ``start_time``, ``end_time``,
    ``status``), so spans decoded from OTLP work the same as local ones.

    Args:
        span: a finished ``opentelemetry.sdk.trace.ReadableSpan``.

    Returns:
        ``(fields, payload)``: the record fields without ``seq``, and the canonical bytes of
        the captured ``{"input", "output"}`` or ``None`` when nothing was captured.
    """
    fields, payload = _base(span, KIND_OUTCOME)
    failed = span.status is not None and span.status.status_code is StatusCode.ERROR
    finish_outcome(fields, span.end_time, failed)
    return fields, payload


def intent_from_span(span: Any) -> dict[str, Any]:
    """Build the intent record of a live span that is about to run its body (fail-closed).

    Args:
        span: the live SDK span (its start attributes are set).

    Returns:
        The record fields without ``seq``; an intent carries no payload.
    """
    fields, _ = _base(span, KIND_INTENT)
    fields["end"] = None
    fields["outcome"] = None
    fields["payload_digest"] = None
    fields["intent_seq"] = None
    return fields


def correction_entry(
    original: Mapping[str, Any],
    original_seq: int,
    reason: str,
    changes: Mapping[str, Any],
    *,
    by: str | None = None,
) -> dict[str, Any]:
    """Build a correction record for the record at ``original_seq``.

    The correction repeats the original's identity fields (category, flow, run, user, agent
    ...) so that it shows up under the same filters (``query --user <original user>``), names
    the fields it corrects in ``fields``, says why in ``reason`` and who corrected it in
    ``corrected_by``.

    Args:
        original: the decoded body of the corrected record.
        original_seq: its seq.
        reason: why it is corrected (required, non-empty).
        changes: the corrected field values.
        by: who makes the correction (a user id), if known; kept in ``corrected_by``, never in
            place of the original's ``user_id``.

    Returns:
        The record fields without ``seq``.
    """
    keep = (
        "category", "operation", "doctype", "run_id", "parent_run_id", "chain_id",
        "flow_type", "flow_id", "step_id", "user_id", "agent_id", "agent_name", "session_id",
        "conversation_id", "service", "trace_id", "span_id",
    )  # fmt: skip
    fields: dict[str, Any] = {key: original.get(key) for key in keep}
    now = format_time(time.time_ns())
    fields.update(
        {
            "v": SCHEMA_VERSION,
            "kind": KIND_CORRECTION,
            "recorded_at": now,
            "start": now,
            "corrected_by": by,
            "corrects": original_seq,
            "reason": reason,
            "fields": {k: _correction_value(v) for k, v in changes.items()},
        }
    )
    return fields


def _correction_value(value: Any) -> Any:
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int) and -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
        return value
    return _as_str(value)


QUERY_FILTERS: Final = {
    "flow_id": "flow_id",
    "user": "user_id",
    "agent": "agent_id",
    "doctype": "doctype",
    "operation": "operation",
    "category": "category",
    "kind": "kind",
    "run_id": "run_id",
    "span_id": "span_id",
    "trace_id": "trace_id",
}
"""Query filter name (``coworker audit query --user``) → record field, for every store."""
