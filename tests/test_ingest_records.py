"""Records made straight from OTLP protobuf (coworker.ingest.decode, records=True) and sent
canonicalised (coworker.ingest.records.PreparedRecord): the same records, the same rejections
and the same bodies as the ReadableSpan + entry_from_span path they replace."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.deps import require

require("opentelemetry.proto", "the server extra")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue  # noqa: E402

from coworker import attributes as attr  # noqa: E402
from coworker.audit.chain import Prepared  # noqa: E402
from coworker.audit.record import canonical, entry_from_span, storable  # noqa: E402
from coworker.audit.store_sqlite import SQLiteStore  # noqa: E402
from coworker.audit.verify import verify_chain  # noqa: E402
from coworker.ingest.decode import audit_spans  # noqa: E402
from coworker.ingest.records import (  # noqa: E402
    QUERY_FIELDS,
    PreparedRecord,
    _SeenSpans,
    content_digest,
    dedup_key,
)
from coworker.ingest.tokens import INGEST_TOKEN_FIELD  # noqa: E402
from coworker.ingest.usage import UsageRefused, usage_entries_of, usage_key  # noqa: E402
from coworker.ingest.workers import ENTRY, REJECT, decode_body, record_of  # noqa: E402

_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_KEYS = st.sampled_from(
    [
        attr.AUDIT_CATEGORY, attr.OPERATION, attr.DOCTYPE, attr.ERROR_TYPE, attr.RUN_ID,
        attr.RUN_PARENT_ID, attr.FLOW_ID, attr.FLOW_TYPE, attr.STEP_ID, attr.USER_ID,
        attr.AGENT_ID, attr.SESSION_ID, attr.CONVERSATION_ID, attr.AUDIT_INTENT_SEQ,
        attr.INPUT, attr.OUTPUT, attr.GEN_AI_USAGE_INPUT_TOKENS, attr.GEN_AI_REQUEST_MODEL,
        "x", "ü-key", "k" * 40,
    ]
)  # fmt: skip


def _scalar(draw: Any) -> AnyValue:
    kind = draw(st.sampled_from(["s", "i", "d", "b", "y", "empty", "long"]))
    if kind == "s":
        return AnyValue(string_value=draw(_TEXT))
    if kind == "long":
        return AnyValue(string_value="v" * draw(st.sampled_from([63, 64, 65])))
    if kind == "i":
        return AnyValue(int_value=draw(st.integers(-(2**63), 2**63 - 1)))
    if kind == "d":
        return AnyValue(double_value=draw(st.floats(allow_nan=True, allow_infinity=True)))
    if kind == "b":
        return AnyValue(bool_value=draw(st.booleans()))
    if kind == "y":
        return AnyValue(bytes_value=draw(st.binary(max_size=8)))
    return AnyValue()


@st.composite
def _value(draw: Any, depth: int = 0) -> AnyValue:
    if depth < 3 and draw(st.integers(0, 4)) == 0:
        if draw(st.booleans()):
            value = AnyValue()
            for _ in range(draw(st.integers(0, 3))):
                value.array_value.values.append(draw(_value(depth + 1)))
            return value
        value = AnyValue()
        for _ in range(draw(st.integers(0, 3))):
            value.kvlist_value.values.append(
                KeyValue(key=draw(_TEXT), value=draw(_value(depth + 1)))
            )
        return value
    return _scalar(draw)


@st.composite
def _attributes(draw: Any, audited: bool | None) -> list[KeyValue]:
    out = [KeyValue(key=draw(_KEYS), value=draw(_value())) for _ in range(draw(st.integers(0, 6)))]
    if audited is not None:
        out.insert(
            draw(st.integers(0, len(out))),
            KeyValue(key=attr.AUDITED, value=AnyValue(bool_value=audited)),
        )
    return out


@st.composite
def _requests(draw: Any, hostile: bool = True) -> ExportTraceServiceRequest:
    """Requests with spans of every kind of fault; with ``hostile=False``, spans that pass
    the checks (valid ids, times and status; audited), hostile values in their attributes."""

    def pick(valid: list[Any], faulty: list[Any]) -> Any:
        return draw(st.sampled_from(valid + faulty if hostile else valid))

    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(1, 2))):
        rs = request.resource_spans.add()
        if draw(st.booleans()):
            rs.resource.attributes.append(
                KeyValue(
                    key=attr.SERVICE_NAME,
                    value=draw(st.one_of(st.just(AnyValue(string_value="svc")), _value())),
                )
            )
        rs.resource.attributes.extend(draw(_attributes(None)))
        for _ in range(draw(st.integers(1, 2))):
            ss = rs.scope_spans.add()
            ss.scope.name = "scope"
            ss.scope.attributes.extend(draw(_attributes(None)))
            for _ in range(draw(st.integers(1, 4))):
                span = ss.spans.add()
                span.name = pick(["update Invoice", "ü", "n" * 40], ["n" * 70])
                span.trace_id = pick([bytes(range(1, 17))], [bytes(16), b"\x01" * 15])
                span.span_id = pick([bytes(range(1, 9)), bytes(range(2, 10))], [bytes(8)])
                span.parent_span_id = pick([b"", bytes(range(3, 11))], [bytes(8), b"\x01"])
                start = draw(st.integers(0 if hostile else 1, 2**62))
                span.start_time_unix_nano = start
                span.end_time_unix_nano = pick(
                    [start, start + 1_234_567_891], [0, max(start - 1, 0)]
                )
                span.status.code = pick([0, 1, 2], [7])
                span.status.message = draw(st.sampled_from(["", "boom"]))
                span.attributes.extend(draw(_attributes(pick([True], [True, False, None]))))
                for _ in range(draw(st.integers(0, 2))):
                    event = span.events.add()
                    event.name = "e"
                    event.time_unix_nano = draw(st.integers(0, 2**40))
                    event.attributes.extend(draw(_attributes(None)))
                for _ in range(draw(st.integers(0, 2))):
                    link = span.links.add()
                    link.trace_id = draw(st.sampled_from([bytes(range(1, 17)), b"\x01"]))
                    link.span_id = bytes(range(1, 9))
                    link.attributes.extend(draw(_attributes(None)))
    return request


def _without_time(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "recorded_at"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_records_from_protobuf_equal_entry_from_span_of_the_decoded_span(
    request: ExportTraceServiceRequest,
) -> None:
    """Every decoded span's record (fields and payload), its ids, what it is for, and every
    rejection with its reason are the same as ReadableSpan + entry_from_span gives."""
    limits = {"max_attribute_length": 64, "max_attributes": 5, "usage": True}
    old = audit_spans(request, **limits)  # type: ignore[arg-type]
    new = audit_spans(request, records=True, **limits)  # type: ignore[arg-type]
    assert (new.rejected, new.errors, new.total) == (old.rejected, old.errors, old.total)
    assert (new.keys, new.audited, new.usage) == (old.keys, old.audited, old.usage)
    assert new.spans == [] and len(new.records) == len(old.spans)
    for span, record in zip(old.spans, new.records, strict=True):
        fields, payload = entry_from_span(span)
        assert _without_time(record.fields) == _without_time(fields)
        assert record.payload == payload and record.name == span.name
        assert record.end_time == span.end_time and record.attributes == dict(span.attributes or {})
        assert list(record.fields) == list(fields)  # the same layout, so the same canonical path
        assert canonical(_without_time(record.fields)) == canonical(_without_time(fields))


_RECORDED_AT = QUERY_FIELDS.index("recorded_at")


def _reference_items(
    request: ExportTraceServiceRequest, token: str | None, got: list[tuple[Any, ...]]
) -> tuple[Any, list[tuple[Any, ...]]]:
    """What decode_body's items must be, the long way: ReadableSpan, entry_from_span,
    storable, the token, PreparedRecord.with_digest (usage records: usage_entries_of). Each
    record takes the recorded_at of the item it is compared with (``got``)."""
    old = audit_spans(request, max_attribute_length=64, max_attributes=5, usage=True)
    times = iter([item[4][_RECORDED_AT] for item in got if item[0] == ENTRY])
    want: list[tuple[Any, ...]] = []
    for span, ids, audited, usage in zip(old.spans, old.keys, old.audited, old.usage, strict=True):
        name = span.name[:80]
        fields = dict(storable(entry_from_span(span)[0])[0])
        if audited:
            fields.update({"recorded_at": next(times), INGEST_TOKEN_FIELD: token})
            prepared, digest = PreparedRecord.with_digest(fields)
            want.append((ENTRY, name, *prepared.parts, entry_from_span(span)[1], ids + digest))
        if usage:
            try:
                entries = usage_entries_of(span, fields)
            except UsageRefused as exc:
                want.append((REJECT, f"span {name!r}: usage refused: {exc}"))
                continue
            for entry in entries:
                entry.update({"recorded_at": next(times), INGEST_TOKEN_FIELD: token})
                parts = PreparedRecord.of(entry).parts
                want.append((ENTRY, name, *parts, None, usage_key(ids, entry)))
    return old, want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(_requests(), _requests(hostile=False)),
    st.sampled_from(["tok", None, 'ü"\\\x00']),
)
def test_decode_body_items_equal_the_records_of_entry_from_span(
    request: ExportTraceServiceRequest, token: str | None
) -> None:
    """What a decoding worker sends (most audit records made in one step by
    coworker.ingest.prepare, the others the general way) is, item for item and byte for
    byte, the records entry_from_span makes of the decoded spans, escaped by storable, with
    the token, canonicalised, with their dedup keys; and the same rejections."""
    decoded = decode_body(
        request.SerializeToString(), "application/x-protobuf", "identity", 1 << 20, 64, 5, token
    )
    old, want = _reference_items(request, token, decoded.items)
    assert decoded.status is None
    assert (decoded.batch.rejected, decoded.batch.errors, decoded.batch.total) == (
        old.rejected,
        old.errors,
        old.total,
    )
    assert decoded.items == want


def test_records_off_the_templates_take_the_general_way() -> None:
    """A NUL in a query field, an intent_seq beyond 2**53: what storable changes (and
    reports) is changed as before, not written by the templates."""
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add()
    for i, (key, value) in enumerate(
        [
            (attr.USER_ID, AnyValue(string_value="al\x00ice")),
            (attr.AUDIT_INTENT_SEQ, AnyValue(int_value=2**60)),
            (attr.USER_ID, AnyValue(string_value="plain")),
        ]
    ):
        span = spans.spans.add()
        span.name, span.trace_id, span.span_id = "op", bytes(range(1, 17)), bytes([i + 1] * 8)
        span.start_time_unix_nano, span.end_time_unix_nano = 1, 2
        span.attributes.append(KeyValue(key=attr.AUDITED, value=AnyValue(bool_value=True)))
        span.attributes.append(KeyValue(key=key, value=value))
    decoded = decode_body(
        request.SerializeToString(), "application/x-protobuf", "identity", 1 << 20, 64, 5, "t"
    )
    records = [record_of(item)[0] for item in decoded.items]
    assert records[0]["user_id"] == "al\\x00ice" and records[1]["intent_seq"] == str(2**60)
    assert decoded.items == _reference_items(request, "t", decoded.items)[1]


def test_usage_records_from_protobuf_equal_those_of_the_decoded_span() -> None:
    """A usage span's usage record is the one usage_entries_of makes of its ReadableSpan."""
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.name, span.trace_id, span.span_id = "llm", bytes(range(1, 17)), bytes(range(1, 9))
    span.start_time_unix_nano, span.end_time_unix_nano = (
        1_700_000_000_000_000_000,
        1_700_000_001_000_000_000,
    )
    for key, value in (
        (attr.GEN_AI_USAGE_INPUT_TOKENS, AnyValue(int_value=120)),
        (attr.GEN_AI_USAGE_OUTPUT_TOKENS, AnyValue(int_value=30)),
        (attr.GEN_AI_REQUEST_MODEL, AnyValue(string_value="gpt-4o")),
        (attr.USER_ID, AnyValue(string_value="alice")),
    ):
        span.attributes.append(KeyValue(key=key, value=value))
    (old,) = audit_spans(request, usage=True).spans
    (new,) = audit_spans(request, usage=True, records=True).records
    (want,) = usage_entries_of(old, entry_from_span(old)[0])
    (got,) = usage_entries_of(new, new.fields)
    assert _without_time(got) == _without_time(want) and got["input_tokens"] == 120


def _fields() -> dict[str, Any]:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.name, span.trace_id, span.span_id = "update ü", bytes(range(1, 17)), bytes(range(1, 9))
    span.start_time_unix_nano, span.end_time_unix_nano = (
        1_700_000_000_000_000_000,
        1_700_000_001_000_000_000,
    )
    for key, value in ((attr.AUDITED, True), (attr.USER_ID, 'al"ice'), (attr.INPUT, "q")):
        any_value = (
            AnyValue(bool_value=value) if type(value) is bool else AnyValue(string_value=value)
        )
        span.attributes.append(KeyValue(key=key, value=any_value))
    (record,) = audit_spans(request, records=True).records
    return {**record.fields, "ingest_token": "tok"}


def test_a_prepared_record_is_its_fields_and_its_body() -> None:
    """A PreparedRecord reads as the record's fields (query fields without parsing, the rest
    from its body), its body for any seq is canonical(fields + seq), its digest is the dedup
    digest, and its parts survive pickling (what a worker sends)."""
    fields = _fields()
    record, digest = PreparedRecord.with_digest(fields)
    assert digest == content_digest(fields)
    assert dedup_key(bytes(24), fields) == bytes(24) + digest
    for seq in (1, 9, 12345678901):
        assert record.body(seq) == canonical({**fields, "seq": seq}) == Prepared(fields).body(seq)
    again = PreparedRecord(*pickle.loads(pickle.dumps(record.parts)))
    assert dict(again) == fields and again.fields is again
    assert again.get("user_id") == 'al"ice' and again["name"] == "update ü"
    assert again.get("nope", 7) == 7 and "nope" not in again and "end" in again
    with pytest.raises(KeyError):
        again["nope"]
    assert set(QUERY_FIELDS) <= set(again)


def test_a_record_without_its_query_fields_or_with_a_seq_is_refused() -> None:
    """PreparedRecord.of refuses fields that would leave a store's columns unknown."""
    fields = _fields()
    del fields["ingest_token"]
    with pytest.raises(ValueError, match="ingest_token"):
        PreparedRecord.of(fields)
    with pytest.raises(ValueError, match="seq"):
        PreparedRecord.of({**_fields(), "seq": 3})


def test_prepared_records_append_to_sqlite_with_sealed_payloads(tmp_path: Path) -> None:
    """Through the SQLite store with payload encryption (which rewrites a record that has a
    payload from its fields): the chain verifies, the bodies are the canonical records, the
    query columns match and the payload decrypts."""
    pytest.importorskip("cryptography")
    body = ExportTraceServiceRequest()
    rs = body.resource_spans.add()
    rs.resource.attributes.append(
        KeyValue(key=attr.SERVICE_NAME, value=AnyValue(string_value="svc"))
    )
    spans = rs.scope_spans.add()
    for i in range(3):
        span = spans.spans.add()
        span.name, span.trace_id, span.span_id = (
            f"op-{i}",
            bytes(range(1, 17)),
            bytes([9, 9, 9, 9, 9, 9, 9, i + 1]),
        )
        span.start_time_unix_nano, span.end_time_unix_nano = (
            1_700_000_000_000_000_000,
            1_700_000_001_000_000_000,
        )
        span.attributes.append(KeyValue(key=attr.AUDITED, value=AnyValue(bool_value=True)))
        span.attributes.append(KeyValue(key=attr.USER_ID, value=AnyValue(string_value=f"user-{i}")))
        if i != 1:
            span.attributes.append(
                KeyValue(key=attr.INPUT, value=AnyValue(string_value=f"secret {i}"))
            )
    decoded = decode_body(
        body.SerializeToString(), "application/x-protobuf", "identity", 1 << 20, 1024, 64, "tok"
    )
    items = [record_of(item) for item in decoded.items]
    assert [item[0] for item in decoded.items] == [ENTRY] * 3 and REJECT not in decoded.items
    store = SQLiteStore(tmp_path / "a.db", encrypt_payloads=True)
    try:
        appended, duplicates, conflicts = _SeenSpans(store).append(
            [r for r, _, _ in items], [p for _, p, _ in items], [k for _, _, k in items], "tok"
        )
        assert (appended, duplicates, conflicts) == (3, 0, 0)
        assert verify_chain(store).ok
        stored = list(store.iter_from(1))
        for record, (prepared, payload, _) in zip(stored, items, strict=True):
            got = json.loads(record.body)
            assert got["user_id"] == prepared["user_id"] and got["ingest_token"] == "tok"
            if payload is None:
                assert record.body == prepared.body(record.seq)
            else:
                assert store.plaintext(record) == payload  # sealed, and it opens again
                assert got["payload_digest"] != prepared["payload_digest"]  # salted when sealed
        columns = store._read("SELECT user_id FROM audit_records ORDER BY seq", ())
        assert [r[0] for r in columns] == ["user-0", "user-1", "user-2"]
    finally:
        store.close()


def test_prepared_records_spool_as_their_fields(tmp_path: Path) -> None:
    """A store that spools its entries (PostgreSQL during an outage) writes a PreparedRecord
    as the record's fields, and the spooled record canonicalises to the same body."""
    from coworker.audit.spool import Spool

    fields = _fields()
    record = PreparedRecord.of(fields)
    spool = Spool(tmp_path / "spool.db")
    try:
        spool.put([record], [None], [b"k" * 56])
        (entry,) = spool.peek()
    finally:
        spool.close()
    assert entry.fields == fields
    assert canonical({**entry.fields, "seq": 4}) == record.body(4)


def test_the_one_step_records_are_in_step_with_the_record_layout() -> None:
    """coworker.ingest.prepare knows every key of an ingested outcome record (else it would
    quietly hand every span to the general way)."""
    from coworker.ingest import prepare

    assert prepare._ENABLED


def test_a_record_with_every_field_set_is_the_general_ways_byte_for_byte() -> None:
    """The hypothesis test above holds at most five attributes per span (its limits), so no
    record it draws has most of the 30 fields set at once; here every string field, the
    intent seq, the payload and ERROR status are set together, with the values the templates
    must encode as canonical() does (non-BMP text, U+2028, control characters, -0.0, 5e-324,
    2**63-1 as text, an empty error_type, raw bytes), and times up to fixed64's limit."""
    from coworker.audit.record import _STRING_ATTRIBUTES

    values = [
        AnyValue(string_value="ü€\U0001d11e"),
        AnyValue(string_value='\u2028\u2029\x7f\x1f"\\/'),
        AnyValue(int_value=2**63 - 1),
        AnyValue(double_value=-0.0),
        AnyValue(double_value=5e-324),
        AnyValue(bool_value=False),
        AnyValue(bytes_value=b"\x00\xff"),
        AnyValue(string_value=""),
    ]
    keys = [attribute for _, attribute in _STRING_ATTRIBUTES] + [attr.INPUT, attr.OUTPUT]
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add()
    spans.resource.attributes.append(
        KeyValue(key=attr.SERVICE_NAME, value=AnyValue(string_value="svc ü"))
    )
    scope = spans.scope_spans.add()
    for i, start in enumerate([1, 2**64 - 1, 10**18, 1_700_000_000 * 10**9 + 999_999_999]):
        span = scope.spans.add()
        span.name = ["op", "\U0001d11e" * 3, "a\u2028", "n" * 80][i]
        span.trace_id, span.span_id = bytes(range(1, 17)), bytes([i + 1] * 8)
        span.parent_span_id = b"" if i % 2 else bytes(range(3, 11))
        span.start_time_unix_nano = span.end_time_unix_nano = start
        span.status.code = 2 if i % 2 else 0
        span.attributes.append(KeyValue(key=attr.AUDITED, value=AnyValue(bool_value=True)))
        for j, key in enumerate(keys):
            span.attributes.append(KeyValue(key=key, value=values[(i + j) % len(values)]))
        seq = [0, 2**53 - 1, -(2**53 - 1), 7][i]
        span.attributes.append(KeyValue(key=attr.AUDIT_INTENT_SEQ, value=AnyValue(int_value=seq)))
    decoded = decode_body(
        request.SerializeToString(), "application/x-protobuf", "identity", 1 << 20, 4096, 128, "t"
    )
    old = audit_spans(request, max_attribute_length=4096, max_attributes=128, usage=True)
    assert decoded.status is None and not old.errors and len(decoded.items) == len(old.spans) == 4
    for item, span, ids in zip(decoded.items, old.spans, old.keys, strict=True):
        fields, payload = entry_from_span(span)
        assert storable(fields)[1] == []  # nothing the general way would alter
        fields.update({"recorded_at": item[4][_RECORDED_AT], INGEST_TOKEN_FIELD: "t"})
        prepared, digest = PreparedRecord.with_digest(fields)
        assert payload is not None
        assert item == (ENTRY, span.name[:80], *prepared.parts, payload, ids + digest)
