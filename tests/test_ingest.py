"""The OTLP/HTTP ingest endpoint, driven by real OpenTelemetry exporters over loopback."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.deps import require

require("starlette", "the server extra")
require("uvicorn", "the server extra")
httpx = require("httpx", "the dev extra")

from google.protobuf import json_format  # noqa: E402
from google.rpc import status_pb2  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.exporter.otlp.proto.http import Compression  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: E402

from coworker import attributes as attr  # noqa: E402
from coworker.audit.chain import GENESIS_PREV_HASH, link  # noqa: E402
from coworker.audit.record import entry_from_span  # noqa: E402
from coworker.audit.store import InMemoryStore, StoredRecord  # noqa: E402
from coworker.exceptions import AuditUnavailable  # noqa: E402
from coworker.ingest import (  # noqa: E402
    IngestServer,
    MalformedRequest,
    audit_spans,
    decode_request,
)

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROTOBUF = {"Content-Type": "application/x-protobuf"}


# -- helpers -------------------------------------------------------------------------------------
def make_spans(
    n: int, *, audit_every: int = 1, service: str = "svc-a", prefix: str = "op"
) -> list[ReadableSpan]:
    """A parent span and ``n`` children; every ``audit_every``-th child (none for 0) is audited."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({attr.SERVICE_NAME: service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests.ingest", "1.2.3")
    with tracer.start_as_current_span(f"{prefix}-root", kind=SpanKind.SERVER):
        for i in range(n):
            attributes: dict[str, Any] = {
                attr.OPERATION: "create",
                attr.DOCTYPE: "Invoice",
                attr.FLOW_ID: f"flow-{i % 5}",
                attr.FLOW_TYPE: "workflow",
                attr.STEP_ID: f"step-{i % 3}",
                attr.USER_ID: "alice",
                attr.AGENT_ID: "agent-7",
                attr.RUN_ID: f"{prefix}-run-{i}",
                "n": 2**62 + i,
                "ratio": 0.25,
                "tags": ("a", "b"),
            }
            if audit_every and i % audit_every == 0:
                attributes[attr.AUDITED] = True
                attributes[attr.AUDIT_CATEGORY] = attr.CATEGORY_STATE_CHANGE
            with tracer.start_as_current_span(f"{prefix}-{i}", attributes=attributes) as span:
                span.add_event("checkpoint", {"i": i})
                if i % 7 == 3:
                    span.set_attribute(attr.ERROR_TYPE, "ValueError")
                    span.set_status(Status(StatusCode.ERROR, "boom"))
    provider.shutdown()
    return list(memory.get_finished_spans())


def audited(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if (s.attributes or {}).get(attr.AUDITED) is True]


def comparable(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in ("recorded_at", "seq", "ingest_token")}


def bodies(store: Any) -> list[dict[str, Any]]:
    """Decoded bodies after re-hashing the chain."""
    prev, out = GENESIS_PREV_HASH, []
    for i, rec in enumerate(store.iter_from(), start=1):
        assert rec.seq == i and rec.prev_hash == prev and rec.hash == link(prev, rec.body)
        prev = rec.hash
        out.append(json.loads(rec.body))
    return out


def request_bytes(spans: Sequence[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializeToString()


def otlp_json(spans: Sequence[ReadableSpan]) -> bytes:
    """OTLP JSON of spans: the protobuf JSON mapping with hex ids, as the spec says."""
    data = json_format.MessageToDict(encode_spans(spans))
    import base64

    for rs in data.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(data).encode()


def exporter(server: IngestServer, **kwargs: Any) -> OTLPSpanExporter:
    kwargs.setdefault("headers", AUTH)
    kwargs.setdefault("timeout", 10)
    return OTLPSpanExporter(endpoint=server.endpoint, **kwargs)


@pytest.fixture
def memory_server() -> Iterator[tuple[IngestServer, InMemoryStore]]:
    store = InMemoryStore()
    server = IngestServer(store, token=TOKEN).start()
    yield server, store
    server.stop()


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    from tests.pg import PGServer, require_server  # skips, or fails under CI, without psycopg

    server = PGServer(require_server())
    yield server
    server.close()


@pytest.fixture
def pg_store(pg: Any) -> Iterator[Any]:
    from coworker.audit.store_postgres import PostgresStore

    store = PostgresStore(pg.schema_url(), spool=None)
    yield store
    store.close()


@pytest.fixture
def pg_server(pg_store: Any) -> Iterator[IngestServer]:
    server = IngestServer(pg_store, token=TOKEN).start()
    yield server
    server.stop()


# -- decoding ------------------------------------------------------------------------------------
def test_decoded_spans_keep_resource_ids_times_status_and_attribute_types() -> None:
    """protobuf -> ReadableSpan: same record as the original span, typed attributes."""
    spans = make_spans(8)
    batch = audit_spans(decode_request(request_bytes(spans), "application/x-protobuf"))
    originals = audited(spans)
    assert len(batch.spans) == len(originals) == 8 and batch.rejected == 0
    by_id = {s.context.span_id: s for s in originals}
    for got in batch.spans:
        want = by_id[got.context.span_id]
        assert got.context.trace_id == want.context.trace_id
        assert got.parent is not None and got.parent.span_id == want.parent.span_id  # type: ignore[union-attr]
        assert (got.start_time, got.end_time, got.name) == (
            want.start_time,
            want.end_time,
            want.name,
        )
        assert got.status.status_code == want.status.status_code
        assert got.resource.attributes[attr.SERVICE_NAME] == "svc-a"
        assert got.instrumentation_scope.name == "tests.ingest"  # type: ignore[union-attr]
        assert got.instrumentation_scope.version == "1.2.3"  # type: ignore[union-attr]
        assert got.attributes["n"] == want.attributes["n"] and type(got.attributes["n"]) is int  # type: ignore[index]
        assert got.attributes["ratio"] == 0.25 and got.attributes[attr.AUDITED] is True  # type: ignore[index]
        assert tuple(got.attributes["tags"]) == ("a", "b")  # type: ignore[index]
        assert (
            got.events[0].name == "checkpoint"
            and got.events[0].attributes["i"] == want.events[0].attributes["i"]
        )  # type: ignore[index]
        assert comparable(entry_from_span(got)[0]) == comparable(entry_from_span(want)[0])
    assert batch.keys[0] == batch.spans[0].context.trace_id.to_bytes(16, "big") + batch.spans[
        0
    ].context.span_id.to_bytes(8, "big")


def test_json_decodes_like_protobuf() -> None:
    """OTLP JSON (hex ids, int64 as strings) decodes to the same spans as protobuf."""
    spans = make_spans(4)
    a = audit_spans(decode_request(request_bytes(spans), "application/x-protobuf"))
    b = audit_spans(decode_request(otlp_json(spans), "application/json"))
    assert [comparable(entry_from_span(s)[0]) for s in a.spans] == [
        comparable(entry_from_span(s)[0]) for s in b.spans
    ]
    with pytest.raises(MalformedRequest, match="hex"):
        decode_request(
            b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}', "application/json"
        )


# -- the real OTLP exporter ----------------------------------------------------------------------
def test_real_protobuf_exporter_into_postgres(pg_server: IngestServer, pg_store: Any) -> None:
    """OTLPSpanExporter (protobuf, gzip too) -> live server -> one chained record per audit span."""
    spans = make_spans(30, audit_every=2)
    assert exporter(pg_server).export(spans[:15]) is SpanExportResult.SUCCESS
    assert (
        exporter(pg_server, compression=Compression.Gzip).export(spans[15:])
        is SpanExportResult.SUCCESS
    )
    got = bodies(pg_store)
    want = audited(spans)
    assert len(got) == len(want) == 15
    assert sorted(json.dumps(comparable(b), sort_keys=True) for b in got) == sorted(
        json.dumps(comparable(entry_from_span(s)[0]), sort_keys=True) for s in want
    )
    errors = [b for b in got if b["outcome"] != "ok"]
    assert errors and all(b["outcome"] == "ValueError" for b in errors)
    assert {b["service"] for b in got} == {"svc-a"}
    assert {b["ingest_token"] for b in got} == {"shared-token"}


def test_real_json_exporter(memory_server: tuple[IngestServer, InMemoryStore]) -> None:
    """The OTLP/HTTP JSON exporter (opentelemetry-exporter-otlp-json-http) is accepted too."""
    json_http = pytest.importorskip(
        "opentelemetry.exporter.otlp.json.http.trace_exporter",
        reason="opentelemetry-exporter-otlp-json-http is not installed",
    )
    server, store = memory_server
    spans = make_spans(6)
    client = json_http.OTLPSpanExporter(endpoint=server.endpoint, headers=AUTH, timeout=10)
    assert client.export(spans) is SpanExportResult.SUCCESS
    assert sorted(b["span_id"] for b in bodies(store)) == sorted(
        format(s.context.span_id, "016x") for s in audited(spans)
    )


def test_json_body_over_http_with_gzip(memory_server: tuple[IngestServer, InMemoryStore]) -> None:
    """application/json with Content-Encoding gzip; the response is OTLP JSON."""
    server, store = memory_server
    spans = make_spans(5)
    r = httpx.post(
        server.endpoint,
        content=gzip.compress(otlp_json(spans)),
        headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {}
    assert len(bodies(store)) == 5


def test_a_span_delivered_twice_is_recorded_once(pg_server: IngestServer, pg_store: Any) -> None:
    """Exporter retries (or a second collector) deliver the same span again: one record."""
    spans = make_spans(10)
    client = exporter(pg_server)
    assert client.export(spans) is SpanExportResult.SUCCESS
    assert client.export(spans[:5]) is SpanExportResult.SUCCESS
    assert client.export(spans + spans) is SpanExportResult.SUCCESS
    assert len(bodies(pg_store)) == 10
    assert pg_server.stats["duplicates"] == 5 + 20


def test_dedup_without_append_unique_survives_restart(tmp_path: Path) -> None:
    """A store without append_unique (SQLite) is deduplicated from its log, also after restart."""
    from coworker.audit.urls import open_store

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    spans = make_spans(6)
    for _ in range(2):
        store = open_store(url)
        with IngestServer(store, token=TOKEN) as server:
            assert exporter(server).export(spans) is SpanExportResult.SUCCESS
        store.close()
    store = open_store(url)
    assert len(bodies(store)) == 6
    store.close()


# -- status codes --------------------------------------------------------------------------------
def test_bearer_token_is_required(memory_server: tuple[IngestServer, InMemoryStore]) -> None:
    """No token, another scheme or a wrong token: 401 with WWW-Authenticate, nothing appended."""
    server, store = memory_server
    body = request_bytes(make_spans(2))
    for headers in (
        {},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ):
        r = httpx.post(server.endpoint, content=body, headers={**PROTOBUF, **headers})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert status_pb2.Status.FromString(r.content).message
    assert (
        exporter(server, headers={"Authorization": "Bearer nope"}).export(make_spans(1))
        is SpanExportResult.FAILURE
    )
    assert list(store.iter_from()) == []
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 200


def test_size_limits_give_413(tmp_path: Path) -> None:
    """Declared, streamed (chunked) and decompressed sizes are all limited."""
    store = InMemoryStore()
    with IngestServer(store, token=TOKEN, max_body_bytes=4096) as server:
        big = request_bytes(make_spans(60))
        assert len(big) > 4096
        r = httpx.post(server.endpoint, content=big, headers={**AUTH, **PROTOBUF})
        assert r.status_code == 413

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        r = httpx.post(server.endpoint, content=chunks(), headers={**AUTH, **PROTOBUF})
        assert r.status_code == 413
        bomb = gzip.compress(b"\x00" * 3_000_000)
        assert len(bomb) < 4096
        r = httpx.post(
            server.endpoint, content=bomb, headers={**AUTH, **PROTOBUF, "Content-Encoding": "gzip"}
        )
        assert r.status_code == 413
    assert list(store.iter_from()) == []


def test_unsupported_media_type_and_encoding(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """Content types other than protobuf/JSON and unknown encodings: 415."""
    server, _ = memory_server
    body = request_bytes(make_spans(1))
    r = httpx.post(server.endpoint, content=body, headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(
        server.endpoint, content=body, headers={**AUTH, **PROTOBUF, "Content-Encoding": "br"}
    )
    assert r.status_code == 415
    assert httpx.get(server.endpoint, headers=AUTH).status_code == 405


def test_malformed_body_is_400_with_reason_and_appends_nothing(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """A truncated protobuf: 400, a google.rpc.Status naming the problem, no record."""
    server, store = memory_server
    body = request_bytes(make_spans(3))
    r = httpx.post(server.endpoint, content=body[: len(body) // 2], headers={**AUTH, **PROTOBUF})
    assert r.status_code == 400
    assert "protobuf" in status_pb2.Status.FromString(r.content).message
    r = httpx.post(
        server.endpoint, content=b"{", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    assert list(store.iter_from()) == []


def test_invalid_audit_spans_are_rejected_as_partial_success(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """Bad ids, an unended span, a non-boolean coworker.audited: rejected and counted; rest kept."""
    server, store = memory_server
    request = encode_spans(make_spans(6))
    spans = request.resource_spans[0].scope_spans[0].spans
    audit_ones = [s for s in spans if any(kv.key == attr.AUDITED for kv in s.attributes)]
    audit_ones[0].span_id = b"\x00" * 8
    audit_ones[1].trace_id = b"\x01" * 3
    audit_ones[2].end_time_unix_nano = 0
    for kv in audit_ones[3].attributes:
        if kv.key == attr.AUDITED:
            kv.value.string_value = "true"
    r = httpx.post(
        server.endpoint, content=request.SerializeToString(), headers={**AUTH, **PROTOBUF}
    )
    assert r.status_code == 200
    response = ExportTraceServiceResponse.FromString(r.content)
    assert response.partial_success.rejected_spans == 4
    assert "span_id" in response.partial_success.error_message
    assert len(bodies(store)) == 2


def test_audit_spans_of_a_0_1_0_sender_under_the_old_flag_name_are_appended(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """coworker.audit (the flag before the rename) still selects audit spans; a non-boolean
    one is rejected under its own name."""
    server, store = memory_server
    request = encode_spans(make_spans(4))
    spans = request.resource_spans[0].scope_spans[0].spans
    audit_ones = [s for s in spans if any(kv.key == attr.AUDITED for kv in s.attributes)]
    assert len(audit_ones) == 4
    for span in audit_ones[:3]:
        for kv in span.attributes:
            if kv.key == attr.AUDITED:
                kv.key = attr.AUDITED_LEGACY
    for kv in audit_ones[1].attributes:
        if kv.key == attr.AUDITED_LEGACY:
            kv.value.string_value = "true"
    # Both flags, disagreeing: true wins (over-sending is safe, losing a record is not).
    audit_ones[2].attributes.add(key=attr.AUDITED).value.bool_value = False
    r = httpx.post(
        server.endpoint, content=request.SerializeToString(), headers={**AUTH, **PROTOBUF}
    )
    assert r.status_code == 200
    response = ExportTraceServiceResponse.FromString(r.content)
    assert response.partial_success.rejected_spans == 1
    assert "coworker.audit must be a boolean" in response.partial_success.error_message
    names = sorted(b["name"] for b in bodies(store))
    assert names == sorted([audit_ones[0].name, audit_ones[2].name, audit_ones[3].name])


class _FailingStore(InMemoryStore):
    """A store that is down until told otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    def append(self, entries: Any, payloads: Any = None) -> list[StoredRecord]:
        if self.down:
            raise AuditUnavailable("store is down")
        return super().append(entries, payloads)

    def head(self) -> Any:
        if self.down:
            raise AuditUnavailable("store is down")
        return super().head()


def test_store_down_is_503_with_retry_after_and_the_exporter_retries() -> None:
    """While the store cannot append: 503 + Retry-After; the real exporter retries and lands."""
    store = _FailingStore()
    with IngestServer(store, token=TOKEN, retry_after=1) as server:
        body = request_bytes(make_spans(3))
        r = httpx.post(server.endpoint, content=body, headers={**AUTH, **PROTOBUF})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 503
        threading.Timer(1.0, lambda: setattr(store, "down", False)).start()
        assert exporter(server, timeout=20).export(make_spans(4)) is SpanExportResult.SUCCESS
        assert len(list(store.iter_from())) == 4
        assert httpx.get(f"http://127.0.0.1:{server.port}/health").json()["head_seq"] == 4


def test_postgres_outage_is_503_and_nothing_is_lost(pg: Any) -> None:
    """The network to PostgreSQL cut: 503; restored: the exporter's retry lands, once."""
    from coworker.audit.store_postgres import PostgresStore
    from tests.pg import proxy_to, with_hostport

    url = pg.schema_url()
    PostgresStore(url, spool=None).close()
    with proxy_to(pg.url) as proxy:
        store = PostgresStore(with_hostport(url, "127.0.0.1", proxy.port), spool=None)
        with IngestServer(store, token=TOKEN, retry_after=1) as server:
            proxy.cut()
            r = httpx.post(
                server.endpoint, content=request_bytes(make_spans(2)), headers={**AUTH, **PROTOBUF}
            )
            assert r.status_code == 503 and "retry-after" in r.headers
            threading.Timer(1.5, proxy.restore).start()
            spans = make_spans(5)
            assert exporter(server, timeout=30).export(spans) is SpanExportResult.SUCCESS
        assert len(bodies(store)) == 5
        store.close()


class _SlowStore(InMemoryStore):
    def append(self, entries: Any, payloads: Any = None) -> list[StoredRecord]:
        time.sleep(1.0)
        return super().append(entries, payloads)


def test_graceful_shutdown_finishes_in_flight_appends() -> None:
    """Stopping the server while an append runs: the request completes and the record is kept."""
    store = _SlowStore()
    server = IngestServer(store, token=TOKEN).start()
    results: list[int] = []
    body = request_bytes(make_spans(3))
    t = threading.Thread(
        target=lambda: results.append(
            httpx.post(
                server.endpoint, content=body, headers={**AUTH, **PROTOBUF}, timeout=10
            ).status_code
        )
    )
    t.start()
    time.sleep(0.3)
    server.stop()
    t.join()
    assert results == [200]
    assert len(list(store.iter_from())) == 3


# -- fuzz ----------------------------------------------------------------------------------------
def _hostile_bodies(rng: random.Random) -> Iterator[tuple[str, bytes, dict[str, str], set[int]]]:
    """(label, body, headers, acceptable status codes); none may create a record."""
    plain = make_spans(4, audit_every=0)  # valid spans, none audited
    for s in plain:
        assert attr.AUDITED not in (s.attributes or {})
    valid = request_bytes(plain)
    valid_json = otlp_json(plain)
    pb, js = PROTOBUF, {"Content-Type": "application/json"}
    for _ in range(300):  # random bytes
        yield "random", rng.randbytes(rng.randint(0, 400)), pb, {200, 400}
    for _ in range(200):  # truncated protobuf
        yield "truncated", valid[: rng.randint(1, len(valid) - 1)], pb, {200, 400}
    for _ in range(300):  # bit flips
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        yield "bitflip", bytes(data), pb, {200, 400}
    for _ in range(150):  # JSON with wrong types in random places
        doc = json.loads(valid_json)
        span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][rng.randrange(4)]
        key = rng.choice(["name", "startTimeUnixNano", "kind", "attributes", "status", "traceId"])
        span[key] = rng.choice([None, 12.5, [], {}, "x" * 5, True, -1, [1, {"a": 2}]])
        yield "json-types", json.dumps(doc).encode(), js, {200, 400}
    for _ in range(60):  # truncated JSON
        yield "json-truncated", valid_json[: rng.randint(1, len(valid_json) - 1)], js, {400}
    for depth in (50, 200, 1000, 5000):  # deep nesting: JSON arrays and AnyValue kvlists
        yield "json-deep", b"[" * depth + b"]" * depth, js, {400}
        inner = _ld(1, b"leaf")  # AnyValue{string_value}
        for _ in range(depth):
            # AnyValue{kvlist_value = 6 {values = 1 [KeyValue{key = 1, value = 2}]}}
            inner = _ld(6, _ld(1, _ld(1, b"k") + _ld(2, inner)))
        yield "proto-deep", _request_with_attribute_value(inner), pb, {200, 400}
    for _ in range(40):  # huge attributes on audit spans: rejected, never recorded
        request = encode_spans(make_spans(1))
        (span,) = [
            s
            for s in request.resource_spans[0].scope_spans[0].spans
            if any(kv.key == attr.AUDITED for kv in s.attributes)
        ]
        extra = span.attributes.add()
        extra.key = "huge" if rng.random() < 0.5 else "k" * 70_000
        extra.value.string_value = "x" * rng.randint(70_000, 200_000)
        yield "huge-attribute", request.SerializeToString(), pb, {200}
    for _ in range(60):  # compression garbage
        enc = rng.choice(["gzip", "deflate"])
        body = rng.randbytes(rng.randint(0, 200))
        if rng.random() < 0.5:
            packed = gzip.compress(valid) if enc == "gzip" else zlib.compress(valid)
            body = packed[: rng.randint(0, len(packed) - 1)]
        yield "compressed", body, {**pb, "Content-Encoding": enc}, {400}
    for _ in range(40):  # wrong content types
        ctype = rng.choice(
            ["text/plain", "application/xml", "", "application/grpc", "multipart/form-data"]
        )
        yield "content-type", valid, {"Content-Type": ctype}, {415}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _request_with_attribute_value(any_value: bytes) -> bytes:
    """A valid request whose audit span carries one more attribute holding raw AnyValue bytes
    (built on the wire: the protobuf runtime would refuse to build what we want to send)."""
    request = encode_spans(make_spans(1))
    scope_spans = request.resource_spans[0].scope_spans[0]
    encoded = []
    for span in scope_spans.spans:
        raw = span.SerializeToString()
        if any(kv.key == attr.AUDITED for kv in span.attributes):
            raw += _ld(9, _ld(1, b"deep") + _ld(2, any_value))  # Span.attributes = 9
        encoded.append(raw)
    ss = _ld(1, scope_spans.scope.SerializeToString()) + b"".join(_ld(2, e) for e in encoded)
    rs = _ld(1, request.resource_spans[0].resource.SerializeToString()) + _ld(2, ss)
    return _ld(1, rs)


def test_fuzz_hostile_bodies_crash_nothing_and_record_nothing() -> None:
    """>= 1000 malformed or hostile bodies: right status codes, no 5xx, no record, still healthy."""
    rng = random.Random(20261122)
    store = InMemoryStore()
    seen: dict[str, set[int]] = {}
    count = 0
    with (
        IngestServer(store, token=TOKEN, max_body_bytes=1_000_000) as server,
        httpx.Client(headers=AUTH, timeout=30) as client,
    ):
        for label, body, headers, allowed in _hostile_bodies(rng):
            r = client.post(server.endpoint, content=body, headers=headers)
            count += 1
            assert r.status_code in allowed, (label, r.status_code, r.content[:200])
            seen.setdefault(label, set()).add(r.status_code)
            if r.status_code == 200 and label in ("huge-attribute", "proto-deep"):
                rejected = ExportTraceServiceResponse.FromString(r.content).partial_success
                assert rejected.rejected_spans >= 1, label
        assert client.get(f"http://127.0.0.1:{server.port}/health").status_code == 200
    assert count >= 1000
    assert list(store.iter_from()) == [], "a hostile body produced a record"
    assert 400 in seen["random"] and 400 in seen["truncated"]


# -- load: several client processes --------------------------------------------------------------
_CLIENT = r"""
import sys
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

endpoint, token, proc, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
exporter = OTLPSpanExporter(endpoint=endpoint, headers={"Authorization": "Bearer " + token},
                            timeout=60, compression=Compression.Gzip if proc % 2 else None)
provider = TracerProvider(resource=Resource.create({"service.name": f"client-{proc}"}))
provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=n + 10,
                                               max_export_batch_size=256, schedule_delay_millis=50))
tracer = provider.get_tracer("load")
for i in range(n):
    audit = i % 2 == 0
    attrs = {"coworker.operation": "update", "coworker.run.id": f"p{proc}-{i}", "user.id": "u"}
    if audit:
        attrs.update({"coworker.audit": True, "coworker.audit.category": "state-change"})
    with tracer.start_as_current_span(f"load-{i}", attributes=attrs):
        pass
provider.force_flush(60_000)
provider.shutdown()
print("done", flush=True)
"""


@pytest.mark.slow
def test_several_client_processes_each_audit_span_recorded_once(
    pg_server: IngestServer, pg_store: Any
) -> None:
    """4 processes x 2500 spans (half audited) via the real exporter: 5000 records, once each."""
    procs, n = 4, 2500
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CLIENT, pg_server.endpoint, TOKEN, str(p), str(n)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in range(procs)
    ]
    for c in children:
        out, _ = c.communicate(timeout=180)
        assert c.returncode == 0 and out.strip() == "done"
    runs = [b["run_id"] for b in bodies(pg_store)]
    assert len(runs) == len(set(runs)) == procs * n // 2


# -- the command ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serve_runs_uvicorn_logs_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`coworker audit serve` with the token in the environment, JSON logs, clean SIGTERM exit."""
    port = _free_port()
    db = tmp_path / "audit.db"
    env = {**os.environ, "COWORKER_INGEST_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coworker",
            "audit",
            "serve",
            "--url",
            f"sqlite:///{db}",
            "--listen",
            f"127.0.0.1:{port}",
            "--log-format",
            "json",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        client = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", headers=AUTH)
        assert client.export(make_spans(3)) is SpanExportResult.SUCCESS
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert any("POST /v1/traces" in x["message"] for x in lines), err
    # Single-secret mode trusts every client with everything, and says so at start.
    assert any(
        x["level"] == "warning" and "ANY service, user and agent" in x["message"] for x in lines
    ), err
    from coworker.audit.urls import open_store

    store = open_store(f"sqlite:///{db}")
    assert len(bodies(store)) == 3
    store.close()


def test_cli_serve_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    """No token file and no COWORKER_INGEST_TOKEN: exit 2 with the reason."""
    env = {k: v for k, v in os.environ.items() if k != "COWORKER_INGEST_TOKEN"}
    r = subprocess.run(
        [sys.executable, "-m", "coworker", "audit", "serve", "--url", f"sqlite:///{tmp_path}/a.db"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "COWORKER_INGEST_TOKEN" in r.stderr


def test_real_coworker_spans_with_audit_false_are_skipped_not_rejected(
    memory_server: tuple[IngestServer, InMemoryStore], spans: Any
) -> None:
    """Every coworker span carries coworker.audited (true or false): false is skipped quietly,
    never reported as a rejected span; the true ones are recorded."""
    import coworker

    server, store = memory_server

    @coworker.run(operation="select", doctype="Invoice")
    def read() -> None: ...

    @coworker.run(operation="update", doctype="Invoice")
    def write() -> None:
        read()

    with coworker.flow("api-request", "ingest-flow"), coworker.acting_as("u1", "agent-1"):
        write()
    finished = list(spans.get_finished_spans())
    runs = [s for s in finished if attr.RUN_ID in (s.attributes or {})]
    assert [s.attributes[attr.AUDITED] for s in runs] == [False, True]
    # the api-request block's flow span (no coworker.audited, never an audit record) rides along
    assert len(finished) == 3
    r = httpx.post(
        server.endpoint,
        content=encode_spans(finished).SerializeToString(),
        headers={**AUTH, **PROTOBUF},
    )
    assert r.status_code == 200
    response = ExportTraceServiceResponse.FromString(r.content)
    assert response.partial_success.rejected_spans == 0
    assert [b["operation"] for b in bodies(store)] == ["update"]
    assert exporter(server).export(finished) is SpanExportResult.SUCCESS
    assert len(bodies(store)) == 1  # the re-delivery is deduplicated


# -- issue 9: whole gzip bodies --------------------------------------------------------------------
def test_gzip_body_of_two_members_appends_the_spans_of_both(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """`cat a.gz b.gz` is one gzip stream (RFC 1952): the spans of both members are appended."""
    server, store = memory_server
    first, second = make_spans(3, prefix="a"), make_spans(4, prefix="b")
    # Two serialized requests concatenated are one request (protobuf merges repeated fields).
    body = gzip.compress(request_bytes(first)) + gzip.compress(request_bytes(second))
    r = httpx.post(
        server.endpoint, content=body, headers={**AUTH, **PROTOBUF, "Content-Encoding": "gzip"}
    )
    assert r.status_code == 200
    assert ExportTraceServiceResponse.FromString(r.content).partial_success.rejected_spans == 0
    assert sorted(b["name"] for b in bodies(store)) == sorted(
        s.name for s in audited(first) + audited(second)
    )


def test_gzip_or_deflate_with_trailing_garbage_is_400_and_appends_nothing(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """Bytes after the last gzip member (or after a deflate stream) are a malformed body."""
    server, store = memory_server
    valid = request_bytes(make_spans(2))
    for encoding, body in (
        ("gzip", gzip.compress(valid) + b"garbage"),
        ("gzip", gzip.compress(valid) + b"\x1f\x8b" + b"\x00" * 20),
        ("deflate", zlib.compress(valid) + b"x"),
    ):
        r = httpx.post(
            server.endpoint,
            content=body,
            headers={**AUTH, **PROTOBUF, "Content-Encoding": encoding},
        )
        assert r.status_code == 400, (encoding, body[-8:])
        assert status_pb2.Status.FromString(r.content).message
    assert list(store.iter_from()) == []


def test_gzip_members_are_limited_by_their_decompressed_total() -> None:
    """Many small members, each under the limit, together over it: 413 (no zip bomb by parts)."""
    store = InMemoryStore()
    with IngestServer(store, token=TOKEN, max_body_bytes=100_000) as server:
        member = gzip.compress(b"\x00" * 60_000)
        r = httpx.post(
            server.endpoint,
            content=member * 2,
            headers={**AUTH, **PROTOBUF, "Content-Encoding": "gzip"},
        )
        assert r.status_code == 413
    assert list(store.iter_from()) == []


# -- issue 9: dedup by content, conflicts recorded -------------------------------------------------
def forged(span: ReadableSpan, **changes: Any) -> ReadableSpan:
    """A span with the same trace and span id as ``span`` and other attributes."""
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes={**(span.attributes or {}), **changes},
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _check_substitution(server: IngestServer, store: Any) -> None:
    real = audited(make_spans(3))
    fake = forged(real[0], **{attr.USER_ID: "mallory", attr.OPERATION: "delete"})
    client = exporter(server)
    assert client.export([fake]) is SpanExportResult.SUCCESS  # the forgery arrives first
    assert client.export(real) is SpanExportResult.SUCCESS
    assert client.export(real) is SpanExportResult.SUCCESS  # an exporter retry: duplicates
    records = bodies(store)
    span_id = format(real[0].context.span_id, "016x")
    same_ids = [b for b in records if b["span_id"] == span_id]
    versions = [b for b in same_ids if b["category"] != "ingest-conflict"]
    conflicts = [b for b in same_ids if b["category"] == "ingest-conflict"]
    assert sorted(b["user_id"] for b in versions) == ["alice", "mallory"]  # both kept
    assert len(records) == 3 + 1 + 1  # three real, the forgery, one conflict record
    (conflict,) = conflicts
    assert conflict["outcome"] == "conflict"
    assert conflict["trace_id"] == format(real[0].context.trace_id, "032x")
    assert sorted(conflict["conflict_seqs"]) == sorted(b["seq"] for b in versions)
    assert len(conflict["conflict_digests"]) == 2
    assert server.stats["conflicts"] == 1
    assert server.stats["duplicates"] == 3
    # The forgery resent again changes nothing: a duplicate, the conflict is recorded once.
    assert client.export([fake]) is SpanExportResult.SUCCESS
    assert len(bodies(store)) == 5 and server.stats["conflicts"] == 1
    # A third version: one more conflict record, naming the first version and the new one
    # (N versions make N - 1 records of two seqs each, never a growing list).
    other = forged(real[0], **{attr.USER_ID: "eve"})
    assert client.export([other]) is SpanExportResult.SUCCESS
    records = bodies(store)
    first_seq = min(b["seq"] for b in versions)
    eve = next(b for b in records if b.get("user_id") == "eve")
    latest = [b for b in records if b["category"] == "ingest-conflict"][-1]
    assert latest["conflict_seqs"] == [first_seq, eve["seq"]]
    assert latest["conflict_versions"] == 3 and server.stats["conflicts"] == 2
    from coworker.audit.query import query

    found = [e.fields["conflict_seqs"] for e in query(store, category="ingest-conflict")]
    assert found == [sorted(b["seq"] for b in versions), [first_seq, eve["seq"]]]


def test_a_forged_span_sent_first_does_not_hide_the_real_one(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """Same trace and span id, other content: both records kept, a conflict record names both."""
    _check_substitution(*memory_server)


def test_a_forged_span_sent_first_does_not_hide_the_real_one_postgres(
    pg_server: IngestServer, pg_store: Any
) -> None:
    """The same with PostgreSQL's in-transaction dedup (content keys, a range scan by ids)."""
    _check_substitution(pg_server, pg_store)


def test_conflicts_are_not_recorded_again_after_a_restart(tmp_path: Path) -> None:
    """SQLite: the index of versions and of recorded conflicts is rebuilt from the log."""
    from coworker.audit.urls import open_store

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    real = audited(make_spans(2))
    fake = forged(real[1], **{attr.USER_ID: "mallory"})
    for batch in ([fake], real, [fake, *real]):
        store = open_store(url)
        with IngestServer(store, token=TOKEN) as server:
            assert exporter(server).export(batch) is SpanExportResult.SUCCESS
        store.close()
    store = open_store(url)
    categories = [b["category"] for b in bodies(store)]
    store.close()
    assert categories.count("ingest-conflict") == 1 and len(categories) == 4


def test_content_key_ignores_only_seq_recorded_at_and_token() -> None:
    """Two deliveries of one span have one key; any change in the record makes another."""
    from coworker.ingest import dedup_key

    (span,) = audited(make_spans(1))
    ids = span.context.trace_id.to_bytes(16, "big") + span.context.span_id.to_bytes(8, "big")
    a, _ = entry_from_span(span)
    b = {**a, "recorded_at": "2000-01-01T00:00:00.000000000Z", "ingest_token": "other", "seq": 9}
    assert dedup_key(ids, a) == dedup_key(ids, b) and dedup_key(ids, a)[:24] == ids
    assert dedup_key(ids, a) != dedup_key(ids, {**a, "user_id": "bob"})


# -- issue 9: what the server trusts -------------------------------------------------------------
BILLING = "billing-secret-0123456789"
OPS = "ops-secret-0123456789abcd"


def _token_file(tmp_path: Path) -> Path:
    import hashlib

    path = tmp_path / "tokens.toml"
    path.write_text(
        f"""
[[tokens]]
name = "billing-collector"
secret = "{BILLING}"
services = ["billing"]
users = ["alice", "bob"]

[[tokens]]
name = "ops"
secret_sha256 = "{hashlib.sha256(OPS.encode()).hexdigest()}"
services = ["*"]
""",
        encoding="utf-8",
    )
    return path


def _post(server: IngestServer, spans: Sequence[ReadableSpan], secret: str) -> Any:
    r = httpx.post(
        server.endpoint,
        content=request_bytes(spans),
        headers={**PROTOBUF, "Authorization": f"Bearer {secret}"},
    )
    assert r.status_code == 200, r.content
    return ExportTraceServiceResponse.FromString(r.content).partial_success


def test_a_token_writes_only_for_its_services_and_identities(tmp_path: Path) -> None:
    """billing's token: service billing, users alice/bob; the rest is rejected with a reason."""
    from coworker.ingest import load_tokens

    store = InMemoryStore()
    with IngestServer(store, tokens=load_tokens(_token_file(tmp_path))) as server:
        ok = _post(server, make_spans(2, service="billing"), BILLING)
        assert ok.rejected_spans == 0
        other_service = _post(server, make_spans(2, service="payroll", prefix="p"), BILLING)
        assert other_service.rejected_spans == 2
        assert "'billing-collector' may not write for service 'payroll'" in (
            other_service.error_message
        )
        (span,) = audited(make_spans(1, service="billing", prefix="m"))
        other_user = _post(server, [forged(span, **{attr.USER_ID: "mallory"})], BILLING)
        assert other_user.rejected_spans == 1 and "user 'mallory'" in other_user.error_message
        anything = _post(server, make_spans(1, service="payroll", prefix="o"), OPS)
        assert anything.rejected_spans == 0
        assert server.stats["forbidden"] == 3
        r = httpx.post(
            server.endpoint,
            content=request_bytes(make_spans(1)),
            headers={**PROTOBUF, "Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code == 401
    got = bodies(store)
    assert [(b["service"], b["ingest_token"]) for b in got] == [
        ("billing", "billing-collector"),
        ("billing", "billing-collector"),
        ("payroll", "ops"),
    ]
    assert all(BILLING not in json.dumps(b) and OPS not in json.dumps(b) for b in got)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[tokens]]\nname = "a"\nsecret = "short"\nservices = ["x"]\n', "at least 16"),
        ('[[tokens]]\nname = "a"\nsecret = "0123456789abcdefg"\n', "services is required"),
        ('[[tokens]]\nname = "a"\nsecret = "0123456789abcdefg"\nservices = []\n', "empty list"),
        (
            '[[tokens]]\nname = "a"\nsecret = "0123456789abcdefg"\nservices = ["*", "b"]\n',
            "cannot be combined",
        ),
        (
            '[[tokens]]\nname = "a"\nsecret = "0123456789abcdefg"\nservices = ["x"]\n'
            '[[tokens]]\nname = "a"\nsecret = "0123456789abcdefh"\nservices = ["x"]\n',
            "unique",
        ),
        (
            '[[tokens]]\nname = "a"\nsecret = "0123456789abcdefg"\nservices = ["x"]\n'
            'user = ["u"]\n',
            "unknown key",
        ),
        ("tokens = 3\n", "non-empty list"),
        ("[[tokens\n", "token file"),
    ],
)
def test_bad_token_files_are_refused_with_the_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    """Every mistake in a token file stops the server from starting, saying which."""
    from coworker.exceptions import ConfigError
    from coworker.ingest import load_tokens

    path = tmp_path / "tokens.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_tokens(path)


def test_token_file_in_json(tmp_path: Path) -> None:
    """A .json token file has the same shape: {"tokens": [...]}."""
    from coworker.ingest import load_tokens

    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps({"tokens": [{"name": "j", "secret": BILLING, "services": ["s"]}]}),
        encoding="utf-8",
    )
    (token,) = load_tokens(path)
    assert token.name == "j" and token.services == frozenset({"s"}) and token.users is None


def test_duplicate_attribute_keys_reject_the_audit_span(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """Two user.id attributes (or two service.name): the record and a viewer would disagree."""
    server, store = memory_server
    request = encode_spans(make_spans(2))
    spans = request.resource_spans[0].scope_spans[0].spans
    audit_ones = [s for s in spans if any(kv.key == attr.AUDITED for kv in s.attributes)]
    extra = audit_ones[0].attributes.add()
    extra.key, extra.value.string_value = attr.USER_ID, "root"
    r = httpx.post(
        server.endpoint, content=request.SerializeToString(), headers={**AUTH, **PROTOBUF}
    )
    partial = ExportTraceServiceResponse.FromString(r.content).partial_success
    assert partial.rejected_spans == 1 and "given twice" in partial.error_message
    assert len(bodies(store)) == 1
    resource = request.resource_spans[0].resource.attributes.add()
    resource.key, resource.value.string_value = attr.SERVICE_NAME, "billing"
    r = httpx.post(
        server.endpoint, content=request.SerializeToString(), headers={**AUTH, **PROTOBUF}
    )
    partial = ExportTraceServiceResponse.FromString(r.content).partial_success
    assert partial.rejected_spans == 2 and "resource" in partial.error_message
    assert len(bodies(store)) == 1


def test_huge_attribute_counts_reject_the_span_quickly() -> None:
    """100,000 tiny attributes on an audit span: rejected (bounded work), the rest appended."""
    store = InMemoryStore()
    with IngestServer(store, token=TOKEN) as server:
        request = encode_spans(make_spans(2))
        spans = request.resource_spans[0].scope_spans[0].spans
        audit_ones = [s for s in spans if any(kv.key == attr.AUDITED for kv in s.attributes)]
        for i in range(100_000):
            kv = audit_ones[0].attributes.add()
            kv.key, kv.value.int_value = f"k{i}", i
        r = httpx.post(
            server.endpoint,
            content=request.SerializeToString(),
            headers={**AUTH, **PROTOBUF},
            timeout=60,
        )
        partial = ExportTraceServiceResponse.FromString(r.content).partial_success
        assert partial.rejected_spans == 1 and "more than 1024 attributes" in partial.error_message
    assert len(bodies(store)) == 1


# -- issue 9: slow clients -----------------------------------------------------------------------
def _trickle(
    port: int, burst: bytes, slow: bytes, closed: threading.Event, stop: threading.Event
) -> None:
    """Send ``burst`` at once, then ``slow`` one byte a second, until the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(1.0)
        if burst:
            sock.sendall(burst)
        data = iter(slow)
        while not stop.is_set():
            try:
                sock.send(bytes([next(data)]))
                if sock.recv(4096) == b"":
                    break  # the server closed the connection
            except TimeoutError:
                continue  # nothing from the server yet: send the next byte
            except OSError:
                break  # reset: closed as well
        closed.set()


def test_slow_clients_are_disconnected_by_the_read_timeout() -> None:
    """50 connections sending one byte a second (headers or body) are all closed by the server,
    while a normal client is served meanwhile."""
    store = InMemoryStore()
    with IngestServer(store, token=TOKEN, read_timeout=1.5) as server:
        body_first = (
            f"POST /v1/traces HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n"
            "content-type: application/x-protobuf\r\ncontent-length: 10000\r\n\r\n"
        ).encode()
        stop = threading.Event()
        events, threads = [], []
        for i in range(50):
            closed = threading.Event()
            # Half trickle their headers, half send the headers and trickle the body.
            burst, slow = (b"", body_first) if i % 2 else (body_first, b"x" * 10_000)
            t = threading.Thread(target=_trickle, args=(server.port, burst, slow, closed, stop))
            t.start()
            events.append(closed)
            threads.append(t)
        try:
            assert exporter(server).export(make_spans(2)) is SpanExportResult.SUCCESS
            deadline = time.monotonic() + 30
            for closed in events:
                assert closed.wait(max(deadline - time.monotonic(), 0)), "a slow client stayed"
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert server.stats["read_timeouts"] >= 50
    assert len(bodies(store)) == 2


def test_connections_beyond_the_limit_get_503_and_are_closed() -> None:
    """With max_connections=3, a fourth connection is answered 503 and closed at once; once the
    others close, requests are served again."""
    store = InMemoryStore()
    with IngestServer(store, token=TOKEN, max_connections=3, read_timeout=60) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
        try:
            # The server must have accepted the three before the fourth arrives: a request on
            # one of them is answered only once it is.
            idle[0].sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            assert idle[0].recv(4096).startswith(b"HTTP/1.1 200")
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
                answer = b""
                while chunk := extra.recv(4096):  # b"": the server closed it
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 503") and b"too many open connections" in answer
            assert server.stats["refused_connections"] >= 1
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 30
        while True:  # connection_lost of the three reaches the server asynchronously
            try:
                if exporter(server, timeout=5).export(make_spans(1)) is SpanExportResult.SUCCESS:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "the server did not serve again"
            time.sleep(0.1)
    assert len(bodies(store)) >= 1


def test_cli_serve_with_a_tokens_file_limits_each_token(tmp_path: Path) -> None:
    """`serve --tokens-file`: a token writes for its services only; records name the token;
    combining it with --token-file is refused."""
    port = _free_port()
    db = tmp_path / "audit.db"
    tokens = _token_file(tmp_path)
    base = [sys.executable, "-m", "coworker", "audit", "serve", "--url", f"sqlite:///{db}"]
    both = subprocess.run(
        [*base, "--tokens-file", str(tokens), "--token-file", str(tokens)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert both.returncode == 2 and "exclude each other" in both.stderr
    proc = subprocess.Popen(
        [*base, "--tokens-file", str(tokens), "--listen", f"127.0.0.1:{port}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        client = OTLPSpanExporter(
            endpoint=f"http://127.0.0.1:{port}/v1/traces",
            headers={"Authorization": f"Bearer {BILLING}"},
        )
        assert client.export(make_spans(2, service="billing")) is SpanExportResult.SUCCESS
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/traces",
            content=request_bytes(make_spans(1, service="hr", prefix="h")),
            headers={**PROTOBUF, "Authorization": f"Bearer {BILLING}"},
        )
        assert ExportTraceServiceResponse.FromString(r.content).partial_success.rejected_spans == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "token(s) ops may write audit records for ANY service" in err  # ops has services=*
    from coworker.audit.urls import open_store

    store = open_store(f"sqlite:///{db}")
    assert [b["ingest_token"] for b in bodies(store)] == ["billing-collector"] * 2
    store.close()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_client_hanging_up_mid_body_appends_nothing_and_logs_no_traceback() -> None:
    """Headers promising 10,000 bytes, 100 sent, then close: no record, no ASGI exception, the
    server keeps serving."""
    store = InMemoryStore()
    errors = _Lines()
    logging.getLogger("uvicorn.error").addHandler(errors)
    try:
        with IngestServer(store, token=TOKEN) as server:
            body = request_bytes(make_spans(3))
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                    sock.sendall(
                        (
                            f"POST /v1/traces HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}"
                            "\r\ncontent-type: application/x-protobuf\r\ncontent-length: 10000"
                            "\r\n\r\n"
                        ).encode()
                        + body[:100]
                    )
            assert exporter(server).export(make_spans(2)) is SpanExportResult.SUCCESS
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
    assert not [line for line in errors.lines if "Exception" in line], errors.lines
    assert len(bodies(store)) == 2


def test_concurrent_requests_during_shutdown_lose_nothing_that_was_answered_200() -> None:
    """8 threads export while the server stops: every span answered 200 is in the store, and
    every other export failed (the exporter keeps and retries it), none is half-written."""
    store = _SlowStore()
    server = IngestServer(store, token=TOKEN).start()
    results: list[tuple[list[str], bool]] = []
    lock = threading.Lock()
    started = threading.Barrier(9)

    def send(i: int) -> None:
        spans = make_spans(5, prefix=f"t{i}")
        started.wait()
        try:
            r = httpx.post(
                server.endpoint,
                content=request_bytes(spans),
                headers={**AUTH, **PROTOBUF},
                timeout=30,
            )
            ok = r.status_code == 200
        except httpx.TransportError:
            ok = False
        with lock:
            results.append(([s.name for s in audited(spans)], ok))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()
    server.stop()
    for t in threads:
        t.join(60)
    names = [b["name"] for b in bodies(store)]
    assert len(results) == 8
    for sent, ok in results:
        if ok:
            assert all(n in names for n in sent)
        else:
            assert not any(n in names for n in sent)  # all or nothing per request


def test_a_client_cannot_write_a_record_of_the_servers_conflict_category(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """coworker.audit.category = ingest-conflict from a client: rejected with the reason."""
    server, store = memory_server
    (span,) = audited(make_spans(1))
    partial = _post(server, [forged(span, **{attr.AUDIT_CATEGORY: "ingest-conflict"})], TOKEN)
    assert partial.rejected_spans == 1 and "reserved for the server" in partial.error_message
    assert list(store.iter_from()) == []


def test_many_gzip_members_decode_in_linear_time(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """400,000 empty gzip members and one real one (8 MB): decoded whole, well within the
    client's timeout (a per-member copy of the rest of the body made this minutes)."""
    server, store = memory_server
    spans = make_spans(2)
    body = gzip.compress(b"") * 400_000 + gzip.compress(request_bytes(spans))
    r = httpx.post(
        server.endpoint,
        content=body,
        headers={**AUTH, **PROTOBUF, "Content-Encoding": "gzip"},
        timeout=60,
    )
    assert r.status_code == 200
    assert len(bodies(store)) == len(audited(spans))


def test_a_non_string_service_name_rejects_the_audit_spans(
    memory_server: tuple[IngestServer, InMemoryStore],
) -> None:
    """service.name as an int or a map: the record's service (and a token's check) needs a name."""
    server, store = memory_server
    request = encode_spans(make_spans(1))
    for kv in request.resource_spans[0].resource.attributes:
        if kv.key == attr.SERVICE_NAME:
            kv.value.kvlist_value.values.add().key = "x"
    r = httpx.post(
        server.endpoint, content=request.SerializeToString(), headers={**AUTH, **PROTOBUF}
    )
    partial = ExportTraceServiceResponse.FromString(r.content).partial_success
    assert partial.rejected_spans == 1 and "service.name must be a string" in partial.error_message
    assert list(store.iter_from()) == []


def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (head + Content-Length body), however TCP splits it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed mid-body: {data!r}"
        body += chunk
    assert len(body) == length, "more bytes than one response: the next read would be off"
    return head + b"\r\n\r\n" + body


def test_the_read_timeout_does_not_cut_idle_keep_alive_connections() -> None:
    """Between requests on a keep-alive connection only uvicorn's keep-alive timeout applies:
    a pause longer than the read timeout does not close the connection."""
    store = InMemoryStore()
    with (
        IngestServer(store, token=TOKEN, read_timeout=0.3) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        request = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"  # keep-alive is HTTP/1.1's default
        for _ in range(3):
            sock.sendall(request)
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(1.0)  # idle for more than the read timeout, less than keep-alive (5 s)
        assert server.stats["read_timeouts"] == 0


def test_ingest_metric_counts_appended_duplicates_rejections_and_conflicts() -> None:
    """coworker.ingest.spans{result} follows what the server did with each audit span."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    store = InMemoryStore()
    real = audited(make_spans(3))
    bad = encode_spans(make_spans(1, prefix="bad"))
    for span in bad.resource_spans[0].scope_spans[0].spans:
        span.end_time_unix_nano = 0
    with IngestServer(store, token=TOKEN, meter_provider=provider) as server:
        client = exporter(server)
        assert client.export(real) is SpanExportResult.SUCCESS
        assert client.export(real[:1]) is SpanExportResult.SUCCESS
        assert client.export([forged(real[0], **{attr.USER_ID: "x"})]) is SpanExportResult.SUCCESS
        httpx.post(server.endpoint, content=bad.SerializeToString(), headers={**AUTH, **PROTOBUF})
    data = reader.get_metrics_data()
    points = {
        p.attributes["result"]: p.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "coworker.ingest.spans"
        for p in m.data.data_points
    }
    assert points == {"appended": 4, "duplicate": 1, "conflict": 1, "rejected": 1}
    provider.shutdown()


def test_a_readable_token_file_with_plain_secrets_is_warned_about(tmp_path: Path) -> None:
    """Plain secrets in a file others can read: one warning naming the tokens (not the secrets)."""
    from coworker.ingest import load_tokens

    path = _token_file(tmp_path)
    lines = _Lines()
    log = logging.getLogger("coworker.ingest")
    log.addHandler(lines)  # directly: uvicorn's logging config stops propagation to the root
    try:
        path.chmod(0o644)
        load_tokens(path)
        (message,) = [m for m in lines.lines if "plain secrets" in m]
        assert "billing-collector" in message and BILLING not in message
        lines.lines.clear()
        path.chmod(0o600)
        load_tokens(path)
        assert not [m for m in lines.lines if "plain secrets" in m]
    finally:
        log.removeHandler(lines)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--read-timeout", "0"), ("--read-timeout", "-1"), ("--max-connections", "0"),
     ("--max-body-bytes", "0")],
)  # fmt: skip
def test_cli_serve_refuses_non_positive_limits(tmp_path: Path, option: str, value: str) -> None:
    """`--read-timeout 0` is a usage error (exit 2), not silently the default."""
    r = subprocess.run(
        [sys.executable, "-m", "coworker", "audit", "serve", "--url", f"sqlite:///{tmp_path}/a.db",
         "--no-auth", option, value],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "must be" in r.stderr, r.stderr
