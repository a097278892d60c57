"""Ingest throughput: audit spans/s from the real OTLP/HTTP exporter into an audit store.

``coworker audit serve`` runs in its own process (uvicorn; PostgresStore without spool, or a
SQLite file) on loopback. ``--clients`` processes each build their spans first (outside the
timing), then send them with ``opentelemetry-exporter-otlp-proto-http``'s ``OTLPSpanExporter``
in batches of ``--batch`` (the BatchSpanProcessor default is 512). The clock runs from the
first request to the last answer; the store is then counted, so every span is accounted for.

The baseline appends the very same spans directly: the same number of client processes each
build their spans first, then time ``entry_from_span`` + ``store.append`` per batch of the
same size into the same kind of store, at the same durability (fresh schema or file per run):
the ratio is what HTTP, OTLP encoding and decoding, authentication and dedup cost.

    python benchmarks/ingest.py [--url postgresql://postgres@127.0.0.1/postgres]
    python benchmarks/ingest.py --url sqlite
    python benchmarks/ingest.py --callgrind   # instructions per span of each part, SQLite

``--callgrind`` counts instructions (``valgrind --tool=callgrind``, N vs 2N requests of 512
spans, the same on a loaded machine) of the three parts in one process, without HTTP: what a
decoding worker does per span (``decode``: the body to canonicalised records), what the serve
process does per span with a decoded request (``append``: read the worker's answer,
``decoded_from``, token limits, dedup, chain, insert, commit), and what a direct appender does
(``direct``: ``entry_from_span`` + ``store.append``).
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
    endpoint: str,
    token: str,
    client: int,
    n: int,
    batch: int,
    gzip: bool,
    barrier: Any,
    out: Any,
    preencoded: bool = False,
) -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    spans = make_spans(n, client)
    if preencoded:
        # The exporter's own encoding, done before the clock: what is timed is the server.
        import zlib

        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
        bodies = [
            encode_spans(spans[i : i + batch]).SerializeToString() for i in range(0, n, batch)
        ]
        if gzip:
            headers["Content-Encoding"] = "gzip"
            bodies = [zlib.compress(b, wbits=31) for b in bodies]
        with httpx.Client(timeout=60) as http:
            barrier.wait()
            start, cpu = time.perf_counter(), time.process_time()
            for body in bodies:
                if http.post(endpoint, content=body, headers=headers).status_code != 200:
                    raise SystemExit("export failed")
        out.put((start, time.perf_counter(), time.process_time() - cpu))
        return
    exporter = OTLPSpanExporter(
        endpoint=endpoint,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
        compression=Compression.Gzip if gzip else Compression.NoCompression,
    )
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, n, batch):
        if exporter.export(spans[i : i + batch]) is not SpanExportResult.SUCCESS:
            raise SystemExit("export failed")
    out.put((start, time.perf_counter(), time.process_time() - cpu))


def _open(url: str) -> Any:
    if url.startswith("sqlite"):
        from coworker.audit.urls import open_store

        return open_store(url)
    from coworker.audit.store_postgres import PostgresStore

    return PostgresStore(url, spool=None)


def _direct(url: str, client: int, n: int, batch: int, barrier: Any, out: Any) -> None:
    from coworker.audit.record import entry_from_span

    spans = make_spans(n, client)
    store = _open(url)
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, n, batch):
        # entry_from_span is inside the timing on both sides.
        entries = [entry_from_span(s) for s in spans[i : i + batch]]
        store.append([e[0] for e in entries], [e[1] for e in entries])
    out.put((start, time.perf_counter(), time.process_time() - cpu))
    store.close()


_TICK: float = 1.0 / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the decoding workers, the resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def _server_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the server process and of its decoding workers (its children)."""
    workers = 0.0
    for child in _children(pid):
        try:
            workers += _cpu_seconds(child)
        except OSError:
            pass
    return _cpu_seconds(pid), workers


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
    preencoded: bool = False,
    workers: int | None = None,
    cpu: dict[str, float] | None = None,
) -> float:
    """One run in a fresh schema (or SQLite file); returns spans/s over the wall time.

    ``cpu`` (when given) receives CPU seconds per span: ``server`` (the serve process: HTTP,
    authentication, dedup, the append), ``workers`` (its decoding workers) and ``clients``
    (the senders: encoding and POSTing, on the same cores) for an ingest run, ``direct`` (the
    appending clients) for a direct one.
    """
    import tempfile

    schema = "bench_" + secrets.token_hex(4)
    sqlite_path = None
    if url.startswith("sqlite"):
        sqlite_path = os.path.join(tempfile.gettempdir(), f"coworker-{schema}.db")
        run_url = f"sqlite:///{sqlite_path}"
    else:
        run_url = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    _open(run_url).close()
    server = None
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    try:
        if kind == "ingest":
            port = _free_port()
            auth = ["--tokens-file", _tokens_file(clients)] if tokens else []
            if workers is not None:
                auth += ["--workers", str(workers)]
            server = subprocess.Popen(
                [sys.executable, "-m", "coworker", "audit", "serve", "--url", run_url,
                 "--listen", f"127.0.0.1:{port}", "--log-level", "error", *auth],
                env={**os.environ, "COWORKER_INGEST_TOKEN": TOKEN},
            )  # fmt: skip
            _wait_healthy(port, server)
            cpu_before = _server_cpu(server.pid)
            endpoint = f"http://127.0.0.1:{port}/v1/traces"
            args = [
                (endpoint, TOKEN, c, per_client, batch, gzip, barrier, out, preencoded)
                for c in range(clients)
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
        if server is not None:
            # Every answer is in: the server's appends are done (200 only once durable).
            cpu_after = _server_cpu(server.pid)
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"{kind} client failed with exit code {p.exitcode}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    if sqlite_path is not None:
        import sqlite3

        conn = sqlite3.connect(sqlite_path)
        (count,) = conn.execute("SELECT count(*) FROM audit_records").fetchone()
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(sqlite_path + suffix):
                os.remove(sqlite_path + suffix)
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            (count,) = conn.execute(f'SELECT count(*) FROM "{schema}".records').fetchone()  # type: ignore[misc]
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    assert count == clients * per_client, (count, clients * per_client)
    if cpu is not None:
        if kind == "ingest":
            cpu["server"] = (cpu_after[0] - cpu_before[0]) / count
            cpu["workers"] = (cpu_after[1] - cpu_before[1]) / count
            # The senders share the cores with the server: their CPU is stated, not hidden.
            cpu["clients"] = sum(t[2] for t in times) / count
        else:
            cpu["direct"] = sum(t[2] for t in times) / count
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


_POOL = 8  # requests built for every count (the setup is the same for N and 2N)


def _callgrind_case(case: str, requests: int) -> None:
    """One ``--callgrind`` measurement: ``requests`` requests of 512 spans through ``case``."""
    import tempfile

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from coworker.audit.record import entry_from_span
    from coworker.audit.store_sqlite import SQLiteStore
    from coworker.ingest.app import _Ingest
    from coworker.ingest.workers import decode_body, decoded_from, encode_decoded

    spans = make_spans(512 * _POOL, 0)
    batches = [spans[i : i + 512] for i in range(0, len(spans), 512)]
    bodies = [encode_spans(b).SerializeToString() for b in batches]
    args = ("application/x-protobuf", "identity", 20 << 20, 64 * 1024, 1024, "shared-token")
    store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "cg.db"))
    ingest = _Ingest(
        store, token=TOKEN, tokens=None, max_body_bytes=20 << 20, retry_after=5,
        max_attribute_length=64 * 1024, max_attributes=1024, close_store=False,
    )  # fmt: skip
    assert ingest.tokens is not None
    token = ingest.tokens[0]
    answers = [encode_decoded(decode_body(b, *args)) for b in bodies]  # what a worker sends
    first = decoded_from(answers[-1])
    ingest._handle(b"", args[0], args[1], token, first)  # warm: the index, the statements
    store.append([entry_from_span(s)[0] for s in batches[-1][:1]])
    for i in range(requests):
        if case == "decode":
            encode_decoded(decode_body(bodies[i], *args))
        elif case == "append":
            ingest._handle(b"", args[0], args[1], token, decoded_from(answers[i]))
        else:
            entries = [entry_from_span(s) for s in batches[i]]
            store.append([e[0] for e in entries], [e[1] for e in entries])
    store.close()


def _callgrind_report() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _callgrind import per_iteration

    counts = {
        case: per_iteration(__file__, case, "--requests", 2) / 512
        for case in ("decode", "append", "direct")
    }
    print("instructions per span (callgrind, 512-span requests into SQLite, no HTTP):")
    for case, count in counts.items():
        print(f"  {case:<7} {count:>10,.0f}")
    print(
        f"  direct / append (the serve process's serial part against a direct appender): "
        f"{counts['direct'] / counts['append']:.2f}"
    )
    print(
        f"  direct / (decode + append) (all the work per span): "
        f"{counts['direct'] / (counts['decode'] + counts['append']):.2f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("COWORKER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL, or 'sqlite' for a fresh SQLite file per run",
    )
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--spans", type=int, default=10000, help="per client")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--gzip", action="store_true", help="gzip the OTLP requests")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--tokens", action="store_true", help="a token file limited to the clients' services"
    )
    parser.add_argument(
        "--preencoded",
        action="store_true",
        help="clients encode their requests (with the exporter's encoder) before the clock "
        "and POST them: times the server, not the SDK exporter's Python encoder",
    )
    parser.add_argument("--workers", type=int, default=None, help="serve --workers")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--callgrind", action="store_true", help="instructions per span")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        _callgrind_case(args.case, args.requests)
        return 0
    if args.callgrind:
        return _callgrind_report()
    rates: dict[str, list[float]] = {"ingest": [], "direct": []}
    cpus: dict[str, list[float]] = {"server": [], "workers": [], "clients": [], "direct": []}
    for _ in range(args.runs):
        for kind in ("direct", "ingest"):
            cpu: dict[str, float] = {}
            rates[kind].append(
                run_once(
                    kind,
                    args.url,
                    args.clients,
                    args.spans,
                    args.batch,
                    args.gzip,
                    args.tokens,
                    args.preencoded,
                    args.workers,
                    cpu,
                )
            )
            for key, value in cpu.items():
                cpus[key].append(value)
    ingest, direct = statistics.median(rates["ingest"]), statistics.median(rates["direct"])
    result = {
        "clients": args.clients,
        "spans": args.clients * args.spans,
        "batch": args.batch,
        "gzip": args.gzip,
        "tokens": args.tokens,
        "preencoded": args.preencoded,
        "workers": args.workers,
        "ingest_spans_per_s": round(ingest),
        "direct_append_per_s": round(direct),
        "ratio": round(ingest / direct, 3),
        # CPU per span (median over the runs): what each part would sustain on a core of its own.
        "server_cpu_us_per_span": round(statistics.median(cpus["server"]) * 1e6, 1),
        "workers_cpu_us_per_span": round(statistics.median(cpus["workers"]) * 1e6, 1),
        "direct_cpu_us_per_span": round(statistics.median(cpus["direct"]) * 1e6, 1),
        "clients_cpu_us_per_span": round(statistics.median(cpus["clients"]) * 1e6, 1),
    }
    result["server_process_spans_per_s"] = round(1e6 / result["server_cpu_us_per_span"])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"OTLP ingest into {'SQLite' if args.url.startswith('sqlite') else 'PostgreSQL'}, "
            f"{args.clients} client processes, "
            f"{result['spans']} audit spans, batches of {args.batch}"
            f"{', gzip' if args.gzip else ''}, median of {args.runs} runs"
            f"{', serve --workers ' + str(args.workers) if args.workers is not None else ''}"
        )
        sender = "pre-encoded POSTs" if args.preencoded else "OTLPSpanExporter"
        print(f"  end-to-end, {sender} -> serve -> store: {ingest:>8.0f} spans/s")
        print(f"  direct store.append of the same spans:          {direct:>8.0f} records/s")
        print(f"  ratio: {result['ratio']:.2f}")
        print(
            f"  CPU per span: serve process {result['server_cpu_us_per_span']} us "
            f"(= {result['server_process_spans_per_s']} spans/s on one core), decoding workers "
            f"{result['workers_cpu_us_per_span']} us, sending clients "
            f"{result['clients_cpu_us_per_span']} us ({sender}, on the same cores), direct "
            f"appenders {result['direct_cpu_us_per_span']} us"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
