"""Ingest throughput: audit spans/s from the real OTLP/HTTP exporter into the PostgreSQL store.

``coworker audit serve`` runs in its own process (uvicorn, PostgresStore without spool) on
loopback. ``--clients`` processes each build their spans first (outside the timing), then send
them with ``opentelemetry-exporter-otlp-proto-http``'s ``OTLPSpanExporter`` in batches of
``--batch`` (the BatchSpanProcessor default is 512). The clock runs from the first request to
the last answer; the store is then counted, so every span is accounted for.

For reference the same spans are appended directly with ``PostgresStore.append`` (same batch
size, same number of processes): the ratio is what HTTP + OTLP decoding cost.

    python benchmarks/ingest.py [--url postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import secrets
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
import psycopg

TOKEN = secrets.token_hex(16)  # spawned clients get it as an argument (they re-import us)


def make_spans(n: int, client: int) -> list[Any]:
    """``n`` finished audit spans (real SDK spans) of one client service."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from coworker import attributes as a

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({a.SERVICE_NAME: f"client-{client}"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    for i in range(n):
        attributes = {
            a.AUDITED: True,
            a.AUDIT_CATEGORY: a.CATEGORY_STATE_CHANGE,
            a.OPERATION: "update",
            a.DOCTYPE: "Invoice",
            a.FLOW_TYPE: "workflow",
            a.FLOW_ID: f"flow-{client}-{i // 10}",
            a.STEP_ID: "approve",
            a.RUN_ID: f"run-{client}-{i}",
            a.USER_ID: f"user-{i % 50}",
            a.AGENT_ID: "agent-7",
        }
        with tracer.start_as_current_span("update Invoice", attributes=attributes):
            pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def _client(
    endpoint: str, token: str, client: int, n: int, batch: int, gzip: bool, barrier: Any, out: Any
) -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    spans = make_spans(n, client)
    exporter = OTLPSpanExporter(
        endpoint=endpoint,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
        compression=Compression.Gzip if gzip else Compression.NoCompression,
    )
    barrier.wait()
    start = time.perf_counter()
    for i in range(0, n, batch):
        if exporter.export(spans[i : i + batch]) is not SpanExportResult.SUCCESS:
            raise SystemExit("export failed")
    out.put((start, time.perf_counter()))


def _direct(url: str, client: int, n: int, batch: int, barrier: Any, out: Any) -> None:
    from coworker.audit.record import entry_from_span
    from coworker.audit.store_postgres import PostgresStore

    spans = make_spans(n, client)
    store = PostgresStore(url, spool=None)
    barrier.wait()
    start = time.perf_counter()
    for i in range(0, n, batch):
        # entry_from_span is inside the timing on both sides.
        entries = [entry_from_span(s) for s in spans[i : i + batch]]
        store.append([e[0] for e in entries], [e[1] for e in entries])
    out.put((start, time.perf_counter()))
    store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tokens_file(clients: int) -> str:
    """A token file whose one token may write for exactly the clients' services."""
    import tempfile

    services = ", ".join(f'"client-{c}"' for c in range(clients))
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(f'[[tokens]]\nname = "bench"\nsecret = "{TOKEN}"\nservices = [{services}]\n')
        return f.name


def run_once(
    kind: str,
    url: str,
    clients: int,
    per_client: int,
    batch: int,
    gzip: bool,
    tokens: bool = False,
) -> float:
    """One run in a fresh schema; returns spans/s over the wall time."""
    schema = "bench_" + secrets.token_hex(4)
    run_url = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    from coworker.audit.store_postgres import PostgresStore

    PostgresStore(run_url, spool=None).close()
    server = None
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    try:
        if kind == "ingest":
            port = _free_port()
            auth = ["--tokens-file", _tokens_file(clients)] if tokens else []
            server = subprocess.Popen(
                [sys.executable, "-m", "coworker", "audit", "serve", "--url", run_url,
                 "--listen", f"127.0.0.1:{port}", "--log-level", "error", *auth],
                env={**os.environ, "COWORKER_INGEST_TOKEN": TOKEN},
            )  # fmt: skip
            _wait_healthy(port, server)
            endpoint = f"http://127.0.0.1:{port}/v1/traces"
            args = [
                (endpoint, TOKEN, c, per_client, batch, gzip, barrier, out) for c in range(clients)
            ]
            target: Any = _client
        else:
            args = [(run_url, c, per_client, batch, barrier, out) for c in range(clients)]
            target = _direct
        procs = [ctx.Process(target=target, args=a) for a in args]
        for p in procs:
            p.start()
        times = []
        while len(times) < len(procs):
            try:
                times.append(out.get(timeout=1))
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed:
                    raise SystemExit(f"{kind} client failed with exit code {failed[0]}") from None
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"{kind} client failed with exit code {p.exitcode}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    with psycopg.connect(url, autocommit=True) as conn:
        (count,) = conn.execute(f'SELECT count(*) FROM "{schema}".records').fetchone()  # type: ignore[misc]
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    assert count == clients * per_client, (count, clients * per_client)
    return count / (max(t[1] for t in times) - min(t[0] for t in times))


def _wait_healthy(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the ingest server exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("the ingest server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("COWORKER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--spans", type=int, default=10000, help="per client")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--gzip", action="store_true", help="gzip the OTLP requests")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--tokens", action="store_true", help="a token file limited to the clients' services"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"ingest": [], "direct": []}
    for _ in range(args.runs):
        for kind in ("direct", "ingest"):
            rates[kind].append(
                run_once(
                    kind, args.url, args.clients, args.spans, args.batch, args.gzip, args.tokens
                )
            )
    ingest, direct = statistics.median(rates["ingest"]), statistics.median(rates["direct"])
    result = {
        "clients": args.clients,
        "spans": args.clients * args.spans,
        "batch": args.batch,
        "gzip": args.gzip,
        "tokens": args.tokens,
        "ingest_spans_per_s": round(ingest),
        "direct_append_per_s": round(direct),
        "ratio": round(ingest / direct, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"OTLP ingest into PostgreSQL, {args.clients} client processes, "
            f"{result['spans']} audit spans, batches of {args.batch}"
            f"{', gzip' if args.gzip else ''}, median of {args.runs} runs"
        )
        print(f"  end-to-end, OTLPSpanExporter -> serve -> store: {ingest:>8.0f} spans/s")
        print(f"  direct PostgresStore.append of the same spans:  {direct:>8.0f} records/s")
        print(f"  ratio: {result['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
