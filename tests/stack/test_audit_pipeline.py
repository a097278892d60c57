"""The shipped collector's audit pipeline → `coworker audit serve` → PostgreSQL, for real.

* Only spans with the boolean ``coworker.audited == true`` reach the ingest endpoint, with the
  bearer token from ``collector-config/secrets/ingest-token``.
* Under load, the ingest server stops for ``OUTAGE_S`` seconds and the collector is killed with
  SIGKILL in the middle of it and restarted, then killed and restarted once more with the
  ingest server up: every audit span the collector acknowledged ends up in the store exactly
  once, and the chain verifies.
"""

from __future__ import annotations

import gzip
import http.server
import os
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import coworker
from coworker import attributes as a
from tests.pg import PGServer, import_psycopg, require_server
from tests.stack._stack import (
    TOKEN_FILE,
    OtlpSink,
    Procs,
    Stack,
    coworker_cli,
    free_port,
    python_env,
    start_collector,
    start_ingest,
    wait_until,
)

pytestmark = [pytest.mark.stack, pytest.mark.postgres]

OUTAGE_S = float(os.environ.get("COWORKER_STACK_OUTAGE_S", "30"))
"""How long the ingest server is down. 30 s outlasts the exporter's first retries (1 s initial
interval, x1.5 per retry, 30 s maximum): by its end the backoff is ~10 s, so the queue is
drained by a late retry, not by one that happened to hit the restart."""


# ------------------------------------------------------------------------------ the app side
@coworker.run(operation="update", doctype="Invoice")
def _update_invoice(invoice: str) -> None:
    """A state-changing run: its span is an audit span."""


@coworker.run(operation="select", doctype="Invoice")
def _read_invoice(invoice: str) -> None:
    """A read: its span carries coworker.audited = false."""


def is_audit(attributes: Any) -> bool:
    """The span is for the audit trail: its flag, or the flag's 0.1.0 name, is boolean true."""
    return attributes.get(a.AUDITED) is True or attributes.get(a.AUDITED_LEGACY) is True


class Loader:
    """Sends batches of real coworker spans to the collector over OTLP/HTTP, in a thread.

    Each batch holds audit spans (``update Invoice``), non-audit spans (``select Invoice``),
    one foreign span whose ``coworker.audited`` is the *string* "true" and one audit span of
    an older sender (``coworker.audit`` true, the flag's name in coworker 0.1.0). A batch
    counts as acknowledged when the exporter reports SUCCESS (the collector answered 200).
    """

    def __init__(self, endpoint: str, *, audit_per_batch: int = 20, pause: float = 0.05) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.memory = InMemorySpanExporter()
        coworker.configure(
            "audit-loader", exporter=[SimpleSpanProcessor(self.memory)], audit=None, otlp=False
        )
        self.foreign = TracerProvider()
        self.foreign.add_span_processor(SimpleSpanProcessor(self.memory))
        # A short timeout: while the collector is down an export fails fast and is not acked.
        self.exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=3)
        self.audit_per_batch = audit_per_batch
        self.pause = pause
        self.acked: set[tuple[str, str]] = set()
        self.sent_audit: set[tuple[str, str]] = set()
        self.sent_other: set[tuple[str, str]] = set()
        self.batches_failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loader", daemon=True)
        self.error: BaseException | None = None

    @staticmethod
    def key(span: Any) -> tuple[str, str]:
        """(trace id hex, span id hex), as the store's trace_id/span_id columns hold them."""
        return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")

    def _batch(self) -> list[Any]:
        self.memory.clear()
        for i in range(self.audit_per_batch):
            _update_invoice(f"INV-{i}")
            if i % 4 == 0:
                _read_invoice(f"INV-{i}")
        foreign = self.foreign.get_tracer("foreign")
        with foreign.start_as_current_span("not coworker", attributes={a.AUDITED: "true"}):
            pass
        # A service still on coworker 0.1.0 marks its audit spans with the flag's old name.
        with foreign.start_as_current_span(
            "update Invoice (0.1.0)", attributes={a.AUDITED_LEGACY: True}
        ):
            pass
        return list(self.memory.get_finished_spans())

    def _run(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            while not self._stop.is_set():
                spans = self._batch()
                audit = {self.key(s) for s in spans if is_audit(s.attributes)}
                # New sets, not in-place updates: the test thread reads them meanwhile.
                self.sent_audit = self.sent_audit | audit
                self.sent_other = self.sent_other | ({self.key(s) for s in spans} - audit)
                if self.exporter.export(spans) is SpanExportResult.SUCCESS:
                    self.acked = self.acked | audit
                else:
                    self.batches_failed += 1
                self._stop.wait(self.pause)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> Loader:
        """Start sending."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending and wait for the last batch."""
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the loader did not stop"
        self.exporter.shutdown()
        self.foreign.shutdown()
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------------------ the store side
@pytest.fixture
def pg_url() -> Iterator[str]:
    """A store URL in a fresh schema of a fresh database on the test server."""
    import_psycopg()
    server = PGServer(require_server())
    try:
        yield server.schema_url("audit")
    finally:
        server.close()


def stored_keys(store_url: str) -> list[tuple[str, str]]:
    """(trace_id, span_id) of every record in the store, duplicates kept."""
    psycopg = import_psycopg()
    base, _, query = store_url.partition("?")
    schema = dict(p.split("=", 1) for p in query.split("&") if p)["schema"]
    with psycopg.connect(base) as conn:
        exists = conn.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = %s "
            "AND table_name = 'records'",
            (schema,),
        ).fetchone()
        if not exists:
            return []
        rows = conn.execute(f'SELECT trace_id, span_id FROM "{schema}".records').fetchall()
    return [(str(t), str(s)) for t, s in rows]


def verify(store_url: str) -> subprocess.CompletedProcess[str]:
    """`coworker audit verify --url ...`."""
    return subprocess.run(
        [*coworker_cli(), "audit", "verify", "--url", store_url],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# ------------------------------------------------------------------------------ a recording proxy
class RecordingProxy:
    """An HTTP proxy in front of the ingest server that decodes and keeps what it forwards."""

    def __init__(self, target: str) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        proxy = self
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                raw = gzip.decompress(body) if encoding == "gzip" else body
                if encoding == "deflate":
                    raw = zlib.decompress(body)
                request = ExportTraceServiceRequest.FromString(raw)
                spans = [
                    s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
                ]
                with proxy.lock:
                    proxy.requests.append(
                        {"authorization": self.headers.get("Authorization"), "spans": spans}
                    )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                answer = httpx.post(target + self.path, content=body, headers=headers, timeout=30)
                self.send_response(answer.status_code)
                for key in ("Content-Type", "Retry-After"):
                    if key in answer.headers:
                        self.send_header(key, answer.headers[key])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def forwarded(self) -> list[Any]:
        """Every span the collector sent to the ingest endpoint."""
        with self.lock:
            return [s for r in self.requests for s in r["spans"]]

    def close(self) -> None:
        """Stop the proxy."""
        self.server.shutdown()
        self.server.server_close()


def _attr(span: Any, key: str) -> Any:
    for kv in span.attributes:
        if kv.key == key:
            return kv.value.WhichOneof("value"), getattr(kv.value, kv.value.WhichOneof("value"))
    return None


# ------------------------------------------------------------------------------ tests
def test_only_audit_spans_reach_the_ingest_endpoint_with_the_token(
    stack: Stack, procs: Procs, tmp_path: Path, pg_url: str
) -> None:
    """The audit pipeline forwards boolean-true audit spans only (0.1.0's flag name too), with
    the secrets file token."""
    ingest = start_ingest(procs, pg_url)
    proxy = RecordingProxy(ingest.base_url)
    sink = OtlpSink()
    try:
        collector = start_collector(
            procs, stack, tmp_path, jaeger=sink.endpoint, tempo=sink.endpoint, ingest=proxy.url
        )
        loader = Loader(collector.otlp_http, audit_per_batch=10, pause=0.1).start()
        try:
            wait_until(
                lambda: len(loader.acked) >= 100, "100 audit spans acknowledged", procs=procs
            )
        finally:
            loader.stop()
        wait_until(
            lambda: loader.acked <= set(stored_keys(pg_url)),
            "every acknowledged audit span is in the store",
            procs=procs,
            timeout=120,
        )
        # The operational pipeline got everything, the foreign "true" string included.
        wait_until(
            lambda: sink.count() >= 2 * (len(loader.sent_audit) + len(loader.sent_other)),
            "Jaeger and Tempo stand-ins got every span",
        )
        forwarded = proxy.forwarded()
    finally:
        # Processes first: a collector still exporting to a closed sink waits out its retries.
        procs.close()
        proxy.close()
        sink.close()

    token = TOKEN_FILE.read_text().strip()
    assert {r["authorization"] for r in proxy.requests} == {f"Bearer {token}"}
    assert forwarded
    for span in forwarded:
        flags = {_attr(span, a.AUDITED), _attr(span, a.AUDITED_LEGACY)}
        assert ("bool_value", True) in flags, span
    legacy = {(s.trace_id.hex(), s.span_id.hex()) for s in forwarded if _attr(s, a.AUDITED_LEGACY)}
    assert legacy and legacy <= set(stored_keys(pg_url)), "a 0.1.0 sender's audit span was lost"
    forwarded_keys = {(s.trace_id.hex(), s.span_id.hex()) for s in forwarded}
    assert not forwarded_keys & loader.sent_other, "a non-audit span reached the ingest endpoint"
    assert loader.acked <= forwarded_keys <= loader.sent_audit
    stored = stored_keys(pg_url)
    assert len(stored) == len(set(stored))
    result = verify(pg_url)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_token_is_refused_by_the_ingest_endpoint(procs: Procs, pg_url: str) -> None:
    """The token matters: the same request with another bearer token gets 401."""
    ingest = start_ingest(procs, pg_url)
    answer = httpx.post(
        f"{ingest.base_url}/v1/traces",
        content=b"",
        headers={"Content-Type": "application/x-protobuf", "Authorization": "Bearer wrong"},
    )
    assert answer.status_code == 401


def test_acknowledged_audit_spans_survive_an_ingest_outage_and_a_collector_crash(
    stack: Stack, procs: Procs, tmp_path: Path, pg_url: str
) -> None:
    """Ingest down OUTAGE_S under load, collector SIGKILLed in it and after: none lost, no dups."""
    ingest = start_ingest(procs, pg_url)
    sink = OtlpSink()
    try:
        collector = start_collector(
            procs, stack, tmp_path, jaeger=sink.endpoint, tempo=sink.endpoint,
            ingest=ingest.base_url,
        )  # fmt: skip
        queue = "otelcol_exporter_queue_size"
        exporter = {"exporter": "otlphttp/coworker-audit"}
        loader = Loader(collector.otlp_http).start()
        try:
            wait_until(lambda: len(stored_keys(pg_url)) >= 200, "200 records stored", procs=procs)

            ingest.proc.stop()
            outage_start = time.monotonic()
            wait_until(
                lambda: (collector.internal_metric(queue, **exporter) or 0) >= 5,
                "audit spans queue up in the collector while the ingest server is down",
                procs=procs,
                watch=(collector.proc,),
            )
            acked_before_crash = len(loader.acked)
            wait_until(
                lambda: time.monotonic() - outage_start >= OUTAGE_S / 2,
                "half the outage",
                timeout=OUTAGE_S,
                interval=0.5,
            )
            collector.proc.kill9()
            collector.proc.start()
            collector.wait_ready(procs)
            # The backlog came back from the disk queue (fsync'd before the 200 to the app).
            restored = collector.internal_metric(queue, **exporter) or 0
            assert restored > 0, "the restarted collector has no queued audit spans"
            wait_until(
                lambda: len(loader.acked) > acked_before_crash,
                "the restarted collector acknowledges new spans",
                procs=procs,
                watch=(collector.proc,),
            )
            wait_until(
                lambda: time.monotonic() - outage_start >= OUTAGE_S,
                "the end of the outage",
                timeout=OUTAGE_S + 5,
                interval=0.5,
            )
            ingest.proc.start()
            ingest.wait_ready(procs)
            wait_until(
                lambda: len(loader.acked) > acked_before_crash + 200,
                "load continues after the restart",
                procs=procs,
            )
            # A second crash with the ingest server up: batches in flight are sent again
            # after the restart, and the store's dedup key makes the repeat a no-op.
            collector.proc.kill9()
            acked_before_second_crash = len(loader.acked)
            collector.proc.start()
            collector.wait_ready(procs)
            wait_until(
                lambda: len(loader.acked) > acked_before_second_crash + 200,
                "load continues after the second restart",
                procs=procs,
            )
        finally:
            loader.stop()

        # Retries back off up to max_interval 30 s (+50% jitter): wait well past that.
        wait_until(
            lambda: loader.acked <= set(stored_keys(pg_url)),
            "every acknowledged audit span is in the store",
            procs=procs,
            timeout=240,
            interval=1,
        )
        wait_until(
            lambda: collector.internal_metric(queue, **exporter) == 0,
            "the collector's audit queue drains",
            procs=procs,
            timeout=120,
        )
    finally:
        # Processes first: a collector still exporting to a closed sink waits out its retries.
        procs.close()
        sink.close()

    stored = stored_keys(pg_url)
    assert len(stored) == len(set(stored)), "an audit span was recorded twice"
    assert set(stored) <= loader.sent_audit, "a non-audit span was recorded"
    assert loader.acked <= set(stored)
    result = verify(pg_url)
    assert result.returncode == 0, result.stdout + result.stderr
