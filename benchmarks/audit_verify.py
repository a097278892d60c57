"""Verify throughput vs raw ``hashlib.sha256`` over the same canonical bytes.

Run: ``python benchmarks/audit_verify.py [N]``. Builds an N-record SQLite log (default 200k)
from records made by ``entry_from_span``, then times, median of 5 repeats:

* baseline: ``sha256(prev_hash + body)`` chained over the bodies already in memory;
* ``verify_chain``: the same hashing plus reading the rows from SQLite and the checks.

Also times the canonical encoder against the ``rfc8785`` reference. Goals: verify >= 0.5x the
baseline and >= 100k records/s.
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import rfc8785
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coworker import attributes as a
from coworker.audit.chain import GENESIS_PREV_HASH
from coworker.audit.record import canonical, entry_from_span
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain

REPEATS = 5


def _entries(n: int) -> list[dict]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({a.SERVICE_NAME: "bench"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    for i in range(min(n, 1000)):
        attrs = {
            a.AUDITED: True, a.AUDIT_CATEGORY: a.CATEGORY_STATE_CHANGE, a.OPERATION: "update",
            a.DOCTYPE: "Invoice", a.FLOW_TYPE: "workflow", a.FLOW_ID: f"flow-{i % 50}",
            a.STEP_ID: "approve", a.RUN_ID: f"{i:016x}", a.CHAIN_ID: f"{i:016x}",
            a.USER_ID: f"user-{i % 7}", a.AGENT_ID: "agent-1", a.SESSION_ID: "s-1",
        }  # fmt: skip
        with tracer.start_as_current_span("update Invoice", attributes=attrs):
            pass
    spans = memory.get_finished_spans()
    return [entry_from_span(spans[i % len(spans)])[0] for i in range(n)]


def _median(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(n: int = 200_000) -> None:
    entries = _entries(n)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "verify.db", synchronous="NORMAL")
        for i in range(0, n, 10_000):
            store.append(entries[i : i + 10_000])
        rows = [(prev, body) for _, prev, _, body in store.iter_chain(1)]
        # Verify the way `coworker audit verify` does: the writer gone, the file opened
        # read-only (a live writer's uncheckpointed WAL slows every page read).
        store.close()
        store = SQLiteStore(Path(tmp) / "verify.db", readonly=True)
        avg = sum(len(b) for _, b in rows) / len(rows)

        def baseline() -> None:
            prev = GENESIS_PREV_HASH
            for _, body in rows:
                prev = hashlib.sha256(prev + body).digest()

        def verify() -> None:
            report = verify_chain(store, check_in_doubt=False)
            assert report.ok and report.checked == n

        t_raw = _median(baseline)
        t_verify = _median(verify)
        store.close()

    sample = [{**e, "seq": i + 1} for i, e in enumerate(entries[:20_000])]
    t_fast = _median(lambda: [canonical(e) for e in sample], 3)
    t_ref = _median(lambda: [rfc8785.dumps(e) for e in sample], 3)

    print(f"records: {n}, mean body {avg:.0f} bytes, median of {REPEATS} runs")
    print(f"hashlib.sha256 chain (in memory): {n / t_raw:>12,.0f} records/s")
    print(f"verify_chain (SQLite):           {n / t_verify:>12,.0f} records/s")
    print(f"ratio verify / hashlib:          {t_raw / t_verify:>12.2f}x   (goal >= 0.5x)")
    print(f"canonical (fast path):           {len(sample) / t_fast:>12,.0f} records/s")
    print(f"rfc8785.dumps (reference):       {len(sample) / t_ref:>12,.0f} records/s")
    print(f"ratio fast / reference:          {t_ref / t_fast:>12.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
