"""A hostile sender's NUL in a query field (``user_id`` ...): SQLite's json_extract stops at
``\\u0000``, so a version 2 generated column would read ``alice`` from a body that says
``alice\\x00mallory`` (PostgreSQL cannot hold a NUL in text at all). Such a value is made
storable where the record is built, so that a query and the body agree."""

from __future__ import annotations

import json
from pathlib import Path

from tests.deps import require

require("opentelemetry.proto", "the server extra")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue  # noqa: E402

from coworker import attributes as attr  # noqa: E402
from coworker.audit.query import query  # noqa: E402
from coworker.audit.record import storable  # noqa: E402
from coworker.audit.store_sqlite import SQLiteStore  # noqa: E402
from coworker.audit.verify import verify_chain  # noqa: E402
from coworker.ingest.records import _SeenSpans  # noqa: E402
from coworker.ingest.workers import ENTRY, decode_body, record_of  # noqa: E402


def _request(user: str) -> bytes:
    body = ExportTraceServiceRequest()
    span = body.resource_spans.add().scope_spans.add().spans.add()
    span.name, span.trace_id, span.span_id = "op", bytes(range(1, 17)), bytes(range(1, 9))
    span.start_time_unix_nano = 1_700_000_000_000_000_000
    span.end_time_unix_nano = 1_700_000_001_000_000_000
    span.attributes.append(KeyValue(key=attr.AUDITED, value=AnyValue(bool_value=True)))
    span.attributes.append(KeyValue(key=attr.USER_ID, value=AnyValue(string_value=user)))
    return body.SerializeToString()


def test_a_nul_in_an_ingested_user_id_cannot_split_query_and_body(tmp_path: Path) -> None:
    """The ingested record's user id holds no NUL: the query column (SQLite's reading of the
    body) equals the body's value, a query for the forged prefix finds nothing, verify is OK."""
    decoded = decode_body(
        _request("alice\x00mallory"), "application/x-protobuf", "identity", 1 << 20, 1024, 64, None
    )
    assert [item[0] for item in decoded.items] == [ENTRY]
    record, payload, key = record_of(decoded.items[0])
    store = SQLiteStore(tmp_path / "a.db")
    try:
        assert store.schema_version == 2
        _SeenSpans(store).append([record], [payload], [key], None)
        (stored,) = list(store.iter_from(1))
        user = json.loads(stored.body)["user_id"]
        assert "\x00" not in user and user.startswith("alice") and "mallory" in user
        (column,) = next(iter(store._read("SELECT user_id FROM audit_records", ())))
        assert column == user
        assert [e.seq for e in query(store, user="alice")] == []
        assert [e.seq for e in query(store, user=user)] == [1]
        assert verify_chain(store).ok
    finally:
        store.close()


def test_storable_escapes_a_nul_in_query_fields_only() -> None:
    """A NUL in a query field becomes the text ``\\x00`` (named as altered); one in a field
    no store indexes is kept as it is (the body holds it exactly)."""
    fixed, altered = storable({"user_id": "a\x00b", "name": "n\x00m", "kind": "outcome"})
    assert altered == ["user_id"]
    assert fixed["user_id"] == "a\\x00b" and fixed["name"] == "n\x00m"
