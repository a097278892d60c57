"""Attacks on ``coworker audit serve`` found in review: each test failed before its fix."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deps import require

require("starlette", "the server extra")
require("uvicorn", "the server extra")

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from coworker import attributes as attr  # noqa: E402
from coworker.audit.store import InMemoryStore  # noqa: E402
from coworker.ingest import IngestServer  # noqa: E402

TOKEN = "test-token-0123456789abcdef"


def _trickle_until_closed(sock: socket.socket, data: bytes, closed: threading.Event) -> None:
    """Send ``data`` one byte every 0.2 s until the server hangs up (then set ``closed``)."""
    sock.settimeout(0.2)
    for byte in data:
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        try:
            while chunk := sock.recv(65536):
                del chunk  # responses to earlier requests: keep draining
            break  # b"": the server closed the connection
        except TimeoutError:
            continue
        except OSError:
            break
    closed.set()


def test_a_pipelined_request_trickling_its_body_is_cut_by_the_read_timeout() -> None:
    """A complete request followed in the same packet by the headers of a second one, whose body
    then trickles in a byte at a time, is closed by the read timeout like any slow client (the
    second request never reaches ``data_received`` while h11 starts it)."""
    store = InMemoryStore()
    with IngestServer(store, token=TOKEN, read_timeout=1.0) as server:
        first = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
        second = (
            f"POST /v1/traces HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n"
            "content-type: application/x-protobuf\r\ncontent-length: 100000\r\n\r\n"
        ).encode()
        closed = threading.Event()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(first + second)
            worker = threading.Thread(
                target=_trickle_until_closed, args=(sock, b"x" * 100_000, closed)
            )
            worker.start()
            try:
                assert closed.wait(30), "the pipelined slow request kept its connection"
            finally:
                closed.set()
                worker.join(10)
        deadline = time.monotonic() + 10
        while server.stats["read_timeouts"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats["read_timeouts"] >= 1


def _versions(n: int) -> list[Any]:
    """``n`` audit spans with one trace id and span id, each with other content."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({attr.SERVICE_NAME: "svc-a"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("tests.review").start_as_current_span(
        "update Invoice", attributes={attr.AUDITED: True, attr.USER_ID: "alice"}
    ):
        pass
    (span,) = memory.get_finished_spans()
    return [
        ReadableSpan(
            name=span.name,
            context=span.context,
            parent=span.parent,
            resource=span.resource,
            attributes={**(span.attributes or {}), attr.OPERATION: f"op-{i}"},
            kind=span.kind,
            status=span.status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )
        for i in range(n)
    ]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema on the shared PostgreSQL server."""
    from tests.pg import PGServer, require_server  # skips, or fails under CI, without psycopg

    server = PGServer(require_server())
    yield server.schema_url()
    server.close()


def test_each_new_version_of_a_span_costs_one_conflict_record_not_a_rescan(pg_url: str) -> None:
    """40 versions of one span in 40 requests: every request hands the store its own record and
    at most one conflict record (it handed over one per earlier version, quadratic in all), and
    the log ends with 40 records and 39 conflicts."""
    from coworker.audit.store_postgres import PostgresStore

    class CountingStore(PostgresStore):
        sizes: list[int]

        def submit_unique(self, entries, payloads, keys):  # type: ignore[no-untyped-def]
            self.sizes.append(len(entries))
            return super().submit_unique(entries, payloads, keys)

    store = CountingStore(pg_url, spool=None)
    store.sizes = []
    try:
        with IngestServer(store, token=TOKEN) as server:
            client = OTLPSpanExporter(
                endpoint=server.endpoint, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            for version in _versions(40):
                assert client.export([version]) is SpanExportResult.SUCCESS
            client.shutdown()
        assert max(store.sizes) == 1, store.sizes
        categories = [r.fields().get("category") for r in store.iter_from(1)]
        assert categories.count("ingest-conflict") == 39 and len(categories) == 79
    finally:
        store.close()


def _json_span(**extra: Any) -> dict[str, Any]:
    return {
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "spanId": "b7ad6b7169203331",
        "name": "update Invoice",
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000000000000001",
        "attributes": [{"key": "coworker.audit", "value": {"boolValue": True}}],
        **extra,
    }


def _resource(service: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "t"}, "spans": spans}],
    }


@pytest.mark.parametrize(
    "body",
    [
        {  # the parser read the second list, the hex-id conversion the first
            "resourceSpans": [_resource("billing", [_json_span()])],
            "resource_spans": [_resource("payroll", [_json_span()])],
        },
        {"resourceSpans": [_resource("billing", [_json_span(span_id="b7ad6b7169203332")])]},
    ],
    ids=["resourceSpans-twice", "spanId-twice"],
)
def test_a_json_body_spelling_one_field_two_ways_is_400(body: dict[str, Any]) -> None:
    """OTLP JSON giving a field both as camelCase and snake_case is refused: 400, nothing
    appended (protobuf's parser and the id conversion read different ones)."""
    import json

    import httpx

    store = InMemoryStore()
    with IngestServer(store, token=TOKEN) as server:
        r = httpx.post(
            server.endpoint,
            content=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
    assert r.status_code == 400, r.text
    assert "one spelling" in r.text
    assert store.head() is None


def test_conflict_lookups_do_not_wait_behind_an_append(pg_url: str) -> None:
    """The lookup for other versions of a request's spans runs on a reader of its own: with
    the next append stuck on the chain's lock (holding the store's connection), it still
    answers, and it sees what the store committed."""
    import psycopg

    from coworker.audit.store_postgres import PostgresStore
    from coworker.audit.store_postgres.ddl import _LOCK_NAMESPACE
    from coworker.ingest.app import _Ingest
    from coworker.ingest.records import _IDS_LEN

    store = PostgresStore(pg_url, spool=None)
    ingest = _Ingest(
        store, token=None, tokens=None, max_body_bytes=1 << 20, retry_after=5,
        max_attribute_length=4096, max_attributes=128, close_store=False,
    )  # fmt: skip
    ids = b"i" * _IDS_LEN
    keys = [ids + b"a" * 32, ids + b"b" * 32]
    store.append_unique([{"category": "state-change", "v": v} for v in (1, 2)], None, keys)
    bounds = [(ids, ids + b"\xff" * 33)]
    blocked: list[BaseException] = []
    try:
        with (
            psycopg.connect(store._conninfo, autocommit=True) as admin,
            psycopg.connect(store._conninfo) as holder,
        ):
            oid = admin.execute("SELECT %s::regclass::oid::int", (f'"{store.schema}".records',))
            holder.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, oid.fetchone()[0])
            )  # type: ignore[index]

            def append() -> None:
                try:
                    store.append([{"category": "state-change", "v": 3}])
                except BaseException as exc:
                    blocked.append(exc)

            writer = threading.Thread(target=append)
            writer.start()
            waiting = threading.Event()
            while not waiting.wait(0.01):  # until the store's append waits on the chain lock
                row = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND wait_event = 'advisory' AND application_name = 'coworker-audit'"
                ).fetchone()
                if row is not None and row[0] >= 1:
                    break
            found: list[list[tuple[bytes, int]]] = []
            lookup = threading.Thread(target=lambda: found.append(ingest._lookup(bounds)))
            lookup.start()
            lookup.join(30)
            stuck = lookup.is_alive()
            holder.rollback()  # the append goes on
            writer.join()
            lookup.join()
        assert not stuck, "the conflict lookup waited for the append holding the connection"
        assert sorted(k for k, _ in found[0]) == keys
        assert blocked == [] and store.count() == 3
    finally:
        if ingest._reader is not None:
            ingest._reader.close()
        store.close()
