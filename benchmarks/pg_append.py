"""PostgreSQL append throughput: chained appends vs raw INSERTs of the same rows.

Both sides write the same rows into the same table definition (a fresh schema each run, created
by :class:`~coworker.audit.store_postgres.PostgresStore`, triggers and indexes included), from
``--writers`` processes at once, ``--batch`` records per transaction, one commit (fsync) each:

* **chained**: ``PostgresStore.append`` — advisory lock, head read, seal (RFC 8785 + SHA-256),
  INSERT, COMMIT; the writers serialize on the lock.
* **raw**: the rows already sealed (one chain, split into one contiguous range per writer) and
  inserted with the same INSERT statement, no lock, no head read: the database's own cost.
  Without the ``records_chain`` trigger (schema version 2), which refuses a row whose
  predecessor is not in the log yet, as the writers' ranges arrive in any order: its cost is
  counted on the chained side only.

Prints the median of ``--runs`` runs of each and their ratio. Goal (issue 5): chained >= 0.5x
raw, and >= 5,000 records/s from 4 writers on the 2-core dev machine.

    python benchmarks/pg_append.py [--url postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import secrets
import statistics
import sys
import time
from typing import Any

import psycopg

from coworker.audit.chain import seal
from coworker.audit.chain_registry import CATEGORY_CHAIN_REGISTRY
from coworker.audit.record import entry_from_span
from coworker.audit.store_postgres import (
    PostgresStore,
    _ByteaArray,
    _column_values,
    _Int8Array,
    _TextArray,
)
from coworker.audit.store_postgres._wire import _pipelined


def make_entries(n: int) -> list[tuple[dict[str, Any], bytes | None]]:
    """``n`` realistic record entries from real finished SDK spans."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from coworker import attributes as a

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({a.SERVICE_NAME: "billing"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    for i in range(n):
        attributes = {
            a.AUDITED: True,
            a.AUDIT_CATEGORY: a.CATEGORY_STATE_CHANGE,
            a.OPERATION: "update",
            a.DOCTYPE: "Invoice",
            a.FLOW_TYPE: "workflow",
            a.FLOW_ID: f"flow-{i // 10}",
            a.STEP_ID: "approve",
            a.RUN_ID: f"run-{i}",
            a.CHAIN_ID: f"run-{i}",
            a.USER_ID: f"user-{i % 50}",
            a.AGENT_ID: "agent-7",
            a.AGENT_NAME: "billing-assistant",
        }
        with tracer.start_as_current_span("update Invoice", attributes=attributes):
            pass
    provider.shutdown()
    return [entry_from_span(s) for s in memory.get_finished_spans()]


def _chained(url: str, n: int, batch: int, barrier: Any, out: Any, chain: str = "") -> None:
    entries = make_entries(n)
    store = PostgresStore(url, spool=None, chain=chain)
    barrier.wait()
    start = time.perf_counter()
    for i in range(0, n, batch):
        chunk = entries[i : i + batch]
        store.append([e[0] for e in chunk], [e[1] for e in chunk])
    out.put((start, time.perf_counter()))
    store.close()


def _raw(url: str, rows: list[list[Any]], batch: int, barrier: Any, out: Any) -> None:
    # Only for the table name and INSERT statement; read-only, so that it does not restore
    # the chain trigger run_once dropped for the raw side.
    store = PostgresStore(url, spool=None, readonly=True)
    # Autocommit: each INSERT is its own transaction, committed synchronously (the server's
    # synchronous_commit, at least 'on'), in one round trip: the fastest way to durably insert
    # these rows from a client, so the strictest baseline. Sent the way the chained side sends
    # append(): a server-side prepared statement, binary arrays, libpq driven directly
    # (_pipelined), so that neither side pays psycopg's per-statement Python work.
    conn = psycopg.connect(store._conninfo, autocommit=True)
    conn.execute(
        "SELECT CASE WHEN current_setting('synchronous_commit') = 'off'"
        " THEN set_config('synchronous_commit', 'on', false) END"
    )
    numbers = iter(range(1, 1000))
    insert = re.sub("%b", lambda _: f"${next(numbers)}", store._insert_sql().as_string(conn))
    kinds = [_Int8Array] + [_ByteaArray] * 4 + [_TextArray] * (len(rows[0]) - 5)
    types = [1016] + [1001] * 4 + [1009] * (len(rows[0]) - 5)
    setup = [(b"raw_insert", insert.encode(), types)]
    barrier.wait()
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        columns = [k.of(list(c)).data for k, c in zip(kinds, zip(*chunk, strict=True), strict=True)]
        _pipelined(conn, [(b"raw_insert", columns)], setup)
        setup = []
    out.put((start, time.perf_counter()))
    conn.close()
    store.close()


def run_once(kind: str, url: str, writers: int, per_writer: int, batch: int) -> float:
    """One run in a fresh schema; returns records/s over the whole wall time."""
    schema = "bench_" + secrets.token_hex(4)
    run_url = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    PostgresStore(run_url, spool=None).close()  # create the schema outside the timing
    if kind == "raw":
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP TRIGGER IF EXISTS records_chain ON "{schema}".records')
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(writers), ctx.Queue()
    if kind == "chained":
        args = [(run_url, per_writer, batch, barrier, out) for _ in range(writers)]
        target: Any = _chained
    else:
        entries = make_entries(writers * per_writer)
        sealed = seal([e[0] for e in entries], None, [e[1] for e in entries])
        rows = [
            [r.seq, r.prev_hash, r.hash, r.body, None, *_column_values(e[0])]
            for r, e in zip(sealed, entries, strict=True)
        ]
        args = [
            (run_url, rows[w * per_writer : (w + 1) * per_writer], batch, barrier, out)
            for w in range(writers)
        ]
        target = _raw
    procs = [ctx.Process(target=target, args=a) for a in args]
    for p in procs:
        p.start()
    times = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"{kind} writer failed with exit code {p.exitcode}")
    with psycopg.connect(url, autocommit=True) as conn:
        (count,) = conn.execute(f'SELECT count(*) FROM "{schema}".records').fetchone()  # type: ignore[misc]
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    assert count == writers * per_writer, (count, writers * per_writer)
    wall = max(t[1] for t in times) - min(t[0] for t in times)
    return count / wall


def run_chains(url: str, writers: int, chains: int, per_writer: int, batch: int) -> float:
    """``writers`` processes spread over ``chains`` chains of one fresh store (writer ``w``
    appends to chain ``w % chains``); returns records/s over the whole wall time."""
    schema = "bench_" + secrets.token_hex(4)
    run_url = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    names = [""] + [f"c{i}" for i in range(1, chains)]
    for name in names:  # create every chain's schema outside the timing
        PostgresStore(run_url, spool=None, chain=name).close()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(writers), ctx.Queue()
    procs = [
        ctx.Process(
            target=_chained, args=(run_url, per_writer, batch, barrier, out, names[w % chains])
        )
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    times = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"chain writer failed with exit code {p.exitcode}")
    count = 0
    with psycopg.connect(url, autocommit=True) as conn:
        for name in names:
            s = schema if not name else f"{schema}:{name}"
            # Not the registry records the named chains filed in the default chain.
            (n,) = conn.execute(  # type: ignore[misc]
                f'SELECT count(*) FROM "{s}".records WHERE category IS DISTINCT FROM %s',
                (CATEGORY_CHAIN_REGISTRY,),
            ).fetchone()
            count += n
            conn.execute(f'DROP SCHEMA "{s}" CASCADE')
    assert count == writers * per_writer, (count, writers * per_writer)
    wall = max(t[1] for t in times) - min(t[0] for t in times)
    return count / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("COWORKER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--records", type=int, default=5000, help="per writer")
    parser.add_argument("--batches", default="1,10,100", help="records per transaction")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--chains",
        default=None,
        help="instead: appends/s with these chain counts (e.g. 1,2,4) under --writers writers",
    )
    args = parser.parse_args(argv)
    if args.chains:
        return _main_chains(args)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        # batch=1 commits once per record: fewer records keep the run short.
        per_writer = args.records if batch > 1 else max(args.records // 10, 100)
        rates: dict[str, list[float]] = {"chained": [], "raw": []}
        for _ in range(args.runs):
            for kind in ("raw", "chained"):
                rates[kind].append(run_once(kind, args.url, args.writers, per_writer, batch))
        chained, raw = statistics.median(rates["chained"]), statistics.median(rates["raw"])
        results.append(
            {
                "writers": args.writers,
                "batch": batch,
                "records": args.writers * per_writer,
                "chained_per_s": round(chained),
                "raw_per_s": round(raw),
                "ratio": round(chained / raw, 3),
                # per interleaved pair (raw, then chained): the spread on a noisy machine
                "pairs": [
                    round(c / r, 3) for c, r in zip(rates["chained"], rates["raw"], strict=True)
                ],
            }
        )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"PostgreSQL append, {args.writers} writer processes, median of {args.runs} runs")
        print(f"{'batch':>6} {'records':>8} {'chained/s':>10} {'raw/s':>10} {'ratio':>6}")
        for r in results:
            print(
                f"{r['batch']:>6} {r['records']:>8} {r['chained_per_s']:>10} "
                f"{r['raw_per_s']:>10} {r['ratio']:>6.2f}"
            )
    return 0


def _main_chains(args: argparse.Namespace) -> int:
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        per_writer = args.records if batch > 1 else max(args.records // 10, 100)
        for chains in (int(c) for c in args.chains.split(",")):
            rates = [
                run_chains(args.url, args.writers, chains, per_writer, batch)
                for _ in range(args.runs)
            ]
            rows.append(
                {
                    "writers": args.writers,
                    "chains": chains,
                    "batch": batch,
                    "per_s": round(statistics.median(rates)),
                    "runs": [round(r) for r in rates],
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"PostgreSQL chains, {args.writers} writer processes, median of {args.runs} runs")
    print(f"{'batch':>6} {'chains':>7} {'records/s':>10}  x 1 chain")
    base: dict[int, float] = {}
    for r in rows:
        base.setdefault(r["batch"], r["per_s"])
        scale = r["per_s"] / base[r["batch"]]
        print(f"{r['batch']:>6} {r['chains']:>7} {r['per_s']:>10}  {scale:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
