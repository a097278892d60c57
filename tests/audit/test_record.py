"""The record schema, span -> record mapping, and canonical bytes (RFC 8785)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

from coworker import attributes as a
from coworker.audit import record
from coworker.audit.record import (
    FIELDS,
    SCHEMA_VERSION,
    canonical,
    entry_from_span,
    format_time,
    intent_from_span,
)
from tests.audit.conftest import SpanFactory, audit_attributes


def _decoded_span(**kwargs: Any) -> ReadableSpan:
    """A ReadableSpan built the way the OTLP ingest endpoint builds one."""
    ctx = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, False, TraceFlags(1))
    parent = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0x00F067AA0BA902B7, True)
    defaults: dict[str, Any] = {
        "name": "update Invoice",
        "context": ctx,
        "parent": parent,
        "resource": Resource({a.SERVICE_NAME: "remote-billing"}),
        "attributes": audit_attributes(3),
        "start_time": 1_700_000_000_123_456_789,
        "end_time": 1_700_000_001_000_000_001,
        "status": Status(StatusCode.UNSET),
    }
    defaults.update(kwargs)
    return ReadableSpan(**defaults)


def test_decoded_span_maps_every_field() -> None:
    """A ReadableSpan from OTLP (public fields only) becomes a complete v1 record."""
    fields, payload = entry_from_span(_decoded_span())
    assert set(fields) == set(FIELDS) - {"seq"}
    assert fields["v"] == SCHEMA_VERSION
    assert fields["kind"] == "outcome"
    assert fields["outcome"] == "ok"
    assert fields["service"] == "remote-billing"
    assert fields["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert fields["span_id"] == "b7ad6b7169203331"
    assert fields["parent_span_id"] == "00f067aa0ba902b7"
    assert fields["start"] == "2023-11-14T22:13:20.123456789Z"
    assert fields["end"] == "2023-11-14T22:13:21.000000001Z"
    who = (fields["run_id"], fields["user_id"], fields["agent_id"])
    assert who == ("run-3", "alice", "agent-7")
    assert (fields["flow_type"], fields["flow_id"], fields["step_id"]) == (
        "workflow",
        "flow-1",
        "approve",
    )
    assert fields["category"] == a.CATEGORY_STATE_CHANGE
    assert payload is None and fields["payload_digest"] is None


def test_failed_span_outcome_is_error_type() -> None:
    """A failed run is recorded with its error type as the outcome."""
    span = _decoded_span(
        attributes=audit_attributes(1, **{a.ERROR_TYPE: "coworker.exceptions.ValidationError"}),
        status=Status(StatusCode.ERROR),
    )
    fields, _ = entry_from_span(span)
    assert fields["outcome"] == "coworker.exceptions.ValidationError"
    assert fields["error_type"] == "coworker.exceptions.ValidationError"
    fields, _ = entry_from_span(_decoded_span(status=Status(StatusCode.ERROR)))
    assert fields["outcome"] == "error"


def test_captured_input_output_is_a_payload_not_body() -> None:
    """Captured input/output stay out of the body: digest in the body, bytes as payload."""
    secret_in = '{"amount": 120, "note": "unique-input-marker"}'
    attrs = audit_attributes(2, **{a.INPUT: secret_in, a.OUTPUT: '"done-marker"'})
    fields, payload = entry_from_span(_decoded_span(attributes=attrs))
    body = canonical({**fields, "seq": 1})
    assert b"unique-input-marker" not in body and b"done-marker" not in body
    assert payload is not None and b"unique-input-marker" in payload
    assert json.loads(payload) == {"input": secret_in, "output": '"done-marker"'}
    assert fields["payload_digest"] == hashlib.sha256(payload).hexdigest()


def test_int64_attribute_is_a_string_not_rounded() -> None:
    """Integers above 2^53 survive exactly (as decimal strings)."""
    big = 2**63 - 1
    fields, _ = entry_from_span(_decoded_span(attributes=audit_attributes(1, **{a.USER_ID: big})))
    assert fields["user_id"] == str(big)
    assert json.loads(canonical({**fields, "seq": 1}))["user_id"] == "9223372036854775807"


def test_intent_from_live_span() -> None:
    """An intent has no end, no outcome and the live span's identity."""
    factory = SpanFactory()
    with factory.tracer.start_as_current_span("x", attributes=audit_attributes(5)) as span:
        fields = intent_from_span(span)
    factory.shutdown()
    assert fields["kind"] == "intent"
    assert fields["end"] is None and fields["outcome"] is None
    assert fields["run_id"] == "run-5"
    assert fields["span_id"] == format(span.get_span_context().span_id, "016x")


def test_format_time_fixed_width_and_sortable() -> None:
    """Times are fixed-width RFC 3339 so that string order is time order."""
    times = [0, 1, 999_999_999, 1_000_000_000, 1_700_000_000_000_000_000, 4_102_444_800 * 10**9]
    formatted = [format_time(t) for t in times]
    assert formatted[0] == "1970-01-01T00:00:00.000000000Z"
    assert len({len(f) for f in formatted}) == 1
    assert formatted == sorted(formatted)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4_102_444_800 * 10**9), min_size=1, max_size=200))
def test_format_time_is_the_calendar_time_whatever_seconds_it_saw_before(times: list[int]) -> None:
    """Interleaved seconds (recorded_at now, a span's start and end older: one batch of
    ingested spans) format as the calendar says, the cache of seconds full or not."""
    import datetime as dt

    for ns in times * 2:
        secs, frac = divmod(ns, 10**9)
        day = dt.datetime.fromtimestamp(secs, dt.UTC)
        assert format_time(ns) == f"{day:%Y-%m-%dT%H:%M:%S}.{frac:09d}Z"


def test_canonical_matches_reference_for_a_real_record() -> None:
    """The fast encoder's bytes equal rfc8785's for a record built from a span."""
    fields, _ = entry_from_span(_decoded_span())
    fields["seq"] = 42
    assert canonical(fields) == rfc8785.dumps(fields)


def test_canonical_nested_falls_back_to_reference() -> None:
    """Non-flat records (corrections) and floats go through rfc8785 itself."""
    value = {"seq": 1, "fields": {"doctype": "Invoice", "é": [1, 2]}, "x": 1.5e21}
    assert canonical(value) == rfc8785.dumps(value)


_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_scalar = st.one_of(
    st.none(), st.booleans(), _text, st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
)


@settings(max_examples=400, deadline=None)
@given(
    values=st.fixed_dictionaries({k: _scalar for k in FIELDS}),
    extra=st.dictionaries(
        st.text(alphabet=st.characters(max_codepoint=127), max_size=12), _scalar, max_size=4
    ),
)
def test_fast_canonical_is_byte_identical_to_rfc8785(
    values: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Every flat record the schema can produce encodes exactly as the RFC 8785 reference."""
    fields = {**extra, **values}
    assert canonical(fields) == rfc8785.dumps(fields)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_span_strings_round_trip(value: str) -> None:
    """Arbitrary attribute text is recorded exactly and canonicalises like the reference."""
    fields, _ = entry_from_span(_decoded_span(attributes=audit_attributes(1, **{a.DOCTYPE: value})))
    fields["seq"] = 7
    body = canonical(fields)
    assert body == rfc8785.dumps(fields)
    assert json.loads(body)["doctype"] == value


def test_lone_surrogate_does_not_lose_the_record() -> None:
    """A badly decoded attribute is replaced, not a reason to drop the record."""
    body = canonical({"seq": 1, "doctype": "bad\ud800"})
    assert json.loads(body)["doctype"].startswith("bad")


def test_module_exports_schema() -> None:
    """The schema version and fields are public."""
    assert record.SCHEMA_VERSION == 1
    assert "payload_digest" in record.FIELDS and "seq" in record.FIELDS


def test_sdk_and_decoded_spans_make_the_same_record() -> None:
    """An ended SDK span's record (read from its attribute dict, not a copy) equals the record
    of the same span handed over as a plain ReadableSpan, and a live span's intent is built
    from a copy: attributes set after it was built do not reach it."""
    factory = SpanFactory()
    ended = factory.run(3)
    decoded = ReadableSpan(
        name=ended.name,
        context=ended.get_span_context(),
        parent=ended.parent,
        resource=ended.resource,
        attributes=dict(ended.attributes or {}),
        status=ended.status,
        start_time=ended.start_time,
        end_time=ended.end_time,
    )
    sdk_fields, sdk_payload = entry_from_span(ended)
    plain_fields, plain_payload = entry_from_span(decoded)
    sdk_fields.pop("recorded_at")
    plain_fields.pop("recorded_at")
    assert sdk_fields == plain_fields and sdk_payload == plain_payload
    with factory.tracer.start_as_current_span("x", attributes=audit_attributes(4)) as span:
        fields = intent_from_span(span)
        span.set_attribute(a.DOCTYPE, "Changed")
    factory.shutdown()
    assert fields["doctype"] != "Changed"


def test_format_time_from_many_threads_at_once_is_the_calendar_time() -> None:
    """The cache of seconds is shared by every thread (ingest decodes on several): threads
    formatting interleaved seconds at once, the cache emptied under them again and again,
    each get the calendar text of its own second."""
    import datetime as dt
    import threading

    start = threading.Barrier(4)
    wrong: list[tuple[int, str | None]] = []

    def work(offset: int) -> None:
        start.wait()
        for i in range(3_000):
            ns = (1_700_000_000 + (i * 7 + offset) % 150) * 10**9 + i
            secs, frac = divmod(ns, 10**9)
            day = dt.datetime.fromtimestamp(secs, dt.UTC)
            got = format_time(ns)
            if got != f"{day:%Y-%m-%dT%H:%M:%S}.{frac:09d}Z":
                wrong.append((ns, got))

    threads = [threading.Thread(target=work, args=(k * 37,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
