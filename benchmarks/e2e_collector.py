"""End-to-end audit throughput: app → collector → `coworker audit serve` → PostgreSQL, in spans/s,
against app → `coworker audit serve` → PostgreSQL directly, in the same run.

The collector is the one ``collector-config/build-local-stack.sh`` builds, running the shipped
``otelcol-config.yaml`` with only addresses and paths substituted (its traces pipeline exports
to an in-process OTLP/gRPC sink standing in for Jaeger and Tempo). ``--clients`` processes
send real SDK audit spans with ``OTLPSpanExporter`` in batches of ``--batch`` (as in
``benchmarks/ingest.py``). The clock runs from the first request until the store holds every
span (polled), so the collector path is timed to the database, not to its acknowledgement.
Each run uses a fresh schema, a fresh ingest server and a fresh collector (empty disk queue).

    python benchmarks/e2e_collector.py [--url postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.stack helpers

from ingest import _client  # benchmarks/ingest.py, beside this file
from tests.stack._stack import (
    TOKEN_FILE,
    CollectorPorts,
    OtlpSink,
    free_port,
    render_collector_config,
    state_dir,
    write_yaml,
)


def _otelcol() -> str:
    env = state_dir() / "stack.env"
    for line in env.read_text().splitlines() if env.is_file() else []:
        if line.startswith("OTELCOL_BIN="):
            return line.split("=", 1)[1]
    raise SystemExit("no collector: run collector-config/build-local-stack.sh otelcol")


def _wait(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not start")


def _count(conn: Any, schema: str) -> int:
    row = conn.execute(f'SELECT count(*) FROM "{schema}".records').fetchone()
    return int(row[0])


def run_once(
    kind: str, url: str, otelcol: str, clients: int, per_client: int, batch: int, tmp: Path
) -> float:
    """One run; returns spans/s from the first request until PostgreSQL holds them all."""
    from coworker.audit.store_postgres import PostgresStore

    schema = "bench_" + secrets.token_hex(4)
    run_url = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    PostgresStore(run_url, spool=None).close()
    token = TOKEN_FILE.read_text().strip()
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    sink = OtlpSink()
    try:
        serve = subprocess.Popen(
            [sys.executable, "-m", "coworker", "audit", "serve", "--url", run_url,
             "--listen", f"127.0.0.1:{port}", "--token-file", str(TOKEN_FILE),
             "--log-level", "warning"],
        )  # fmt: skip
        procs.append(serve)
        _wait(f"http://127.0.0.1:{port}/health", serve, "coworker audit serve")
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        if kind == "collector":
            ports = CollectorPorts()
            queue = Path(tempfile.mkdtemp(dir=tmp))
            config = render_collector_config(
                ports=ports, queue_dir=queue, jaeger=sink.endpoint, tempo=sink.endpoint,
                ingest=f"http://127.0.0.1:{port}",
            )  # fmt: skip
            path = write_yaml(queue / "config.yaml", config)
            log = (tmp / "collector.log").open("ab")
            collector = subprocess.Popen([otelcol, f"--config={path}"], stdout=log, stderr=log)
            procs.append(collector)
            _wait(f"http://127.0.0.1:{ports.health}/", collector, "the collector")
            endpoint = f"http://127.0.0.1:{ports.http}/v1/traces"
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(clients), ctx.Queue()
        workers = [
            ctx.Process(
                target=_client, args=(endpoint, token, c, per_client, batch, False, barrier, out)
            )
            for c in range(clients)
        ]
        for w in workers:
            w.start()
        starts = [out.get(timeout=600)[0] for _ in workers]
        for w in workers:
            w.join()
            if w.exitcode != 0:
                raise SystemExit(f"{kind} client failed with exit code {w.exitcode}")
        total = clients * per_client
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while (n := _count(conn, schema)) < total:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{kind}: only {n} of {total} records arrived")
                time.sleep(0.02)
            end = time.perf_counter()
            assert n == total, (n, total)
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        return total / (end - min(starts))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=60)
        sink.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("COWORKER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--otelcol", default=None, help="collector binary (default: the build's)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--spans", type=int, default=5000, help="per client")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    otelcol = args.otelcol or _otelcol()
    rates: dict[str, list[float]] = {"direct": [], "collector": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for kind in ("direct", "collector"):
                rates[kind].append(
                    run_once(kind, args.url, otelcol, args.clients, args.spans, args.batch,
                             Path(tmp))
                )  # fmt: skip
    direct, via = statistics.median(rates["direct"]), statistics.median(rates["collector"])
    result = {
        "clients": args.clients,
        "spans": args.clients * args.spans,
        "batch": args.batch,
        "direct_spans_per_s": round(direct),
        "collector_spans_per_s": round(via),
        "ratio": round(via / direct, 3),
        "runs": {k: [round(r) for r in v] for k, v in rates.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"audit spans into PostgreSQL, {args.clients} client processes, {result['spans']} "
            f"spans, batches of {args.batch}, median of {args.runs} runs"
        )
        print(f"  app -> coworker audit serve -> PostgreSQL:              {direct:>8.0f} spans/s")
        print(f"  app -> collector -> coworker audit serve -> PostgreSQL: {via:>8.0f} spans/s")
        print(f"  ratio (collector / direct): {result['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
