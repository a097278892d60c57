"""Verify throughput vs raw ``hashlib.sha256`` over the same canonical bytes.

Run: ``python benchmarks/audit_verify.py [N]``. Builds an N-record SQLite log (default 200k)
from records made by ``entry_from_span``, then times, median of 5 interleaved repeats:

* baseline: ``sha256(prev_hash + body)`` chained over the very bodies, already in memory, on
  as many cores as ``verify_chain`` uses (``os.cpu_count()`` forked processes, each chaining
  one contiguous range from that range's first ``prev_hash``, as verify's workers do; the
  pool is started before the clock, so the baseline pays no start-up and verify does; it is
  closed before verify runs, whose workers fork only in a process without other threads);
* ``verify_chain``: the same hashing plus reading the rows from SQLite and every other check
  (query columns, payloads, guards, rows out of range), as ``coworker audit verify`` runs it.

Also times the canonical encoder against the ``rfc8785`` reference. Goals: verify >= 0.5x the
baseline and >= 100k records/s.

``--callgrind [N]``: CPU instructions per record under ``valgrind --tool=callgrind`` (N and 2N
records, the difference / N), stable whatever else the machine runs: the baseline's hash loop
over the bodies in memory, and one verify worker's scan of the same records from the file
(``_verify_parallel.verify_range``: row fetch, hashing, every per-row check), for a file at the
current schema and one at schema version 1 (its per-row column check).
"""

from __future__ import annotations

import array
import hashlib
import multiprocessing
import os
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
from coworker.audit import _verify_parallel
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


# What the forked baseline workers inherit: every body in one buffer, offsets in an array (a
# list of bytes objects would be copied page by page as the workers touch their refcounts).
_BLOB = b""
_OFFSETS = array.array("q")
_PREVS: list[bytes] = []


def _hash_range(bounds: tuple[int, int]) -> bytes:
    lo, hi = bounds
    sha256 = hashlib.sha256
    view = memoryview(_BLOB)
    offsets = _OFFSETS
    prev = _PREVS[lo]
    for i in range(lo, hi):
        h = sha256(prev)
        h.update(view[offsets[i] : offsets[i + 1]])
        prev = h.digest()
    return prev


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
        global _BLOB, _OFFSETS, _PREVS
        _BLOB = b"".join(body for _, body in rows)
        _OFFSETS = array.array("q", [0])
        for _, body in rows:
            _OFFSETS.append(_OFFSETS[-1] + len(body))
        _PREVS = [prev for prev, _ in rows]
        cores = os.cpu_count() or 1
        step = -(-len(rows) // cores)
        ranges = [(lo, min(lo + step, len(rows))) for lo in range(0, len(rows), step)]
        # The workers share _PREVS' objects: only each range's first prev_hash is read there.
        # Verify the way `coworker audit verify` does: the writer gone, the file opened
        # read-only (a live writer's uncheckpointed WAL slows every page read).
        store.close()
        store = SQLiteStore(Path(tmp) / "verify.db", readonly=True)
        avg = sum(len(b) for _, b in rows) / len(rows)

        def baseline_one() -> None:
            prev = GENESIS_PREV_HASH
            for _, body in rows:
                prev = hashlib.sha256(prev + body).digest()

        def baseline() -> float:
            # A pool started and warm before the clock, gone before verify runs: its threads
            # would make verify refuse to fork (_verify_parallel.can_fork) and run serially.
            with multiprocessing.get_context("fork").Pool(cores) as pool:
                pool.map(_hash_range, [(0, 1)] * cores)
                t = time.perf_counter()
                pool.map(_hash_range, ranges, chunksize=1)
                elapsed = time.perf_counter() - t
                pool.close()
                pool.join()
            return elapsed

        def verify() -> None:
            assert _verify_parallel.can_fork(), "verify would not run in parallel"
            report = verify_chain(store, check_in_doubt=False)
            assert report.ok and report.checked == n

        raw_times, verify_times = [], []
        for _ in range(REPEATS):
            raw_times.append(baseline())
            verify_times.append(_median(verify, 1))
        t_raw, t_verify = statistics.median(raw_times), statistics.median(verify_times)
        t_one = _median(baseline_one, 3)
        store.close()

    sample = [{**e, "seq": i + 1} for i, e in enumerate(entries[:20_000])]
    t_fast = _median(lambda: [canonical(e) for e in sample], 3)
    t_ref = _median(lambda: [rfc8785.dumps(e) for e in sample], 3)

    print(f"records: {n}, mean body {avg:.0f} bytes, median of {REPEATS} runs")
    print(f"sha256 chain, 1 core (in memory): {n / t_one:>12,.0f} records/s")
    print(f"sha256 chain, {cores} cores (baseline): {n / t_raw:>12,.0f} records/s")
    print(f"verify_chain (SQLite):           {n / t_verify:>12,.0f} records/s")
    print(f"ratio verify / baseline:         {t_raw / t_verify:>12.2f}x   (goal >= 0.5x)")
    print(f"canonical (fast path):           {len(sample) / t_fast:>12,.0f} records/s")
    print(f"rfc8785.dumps (reference):       {len(sample) / t_ref:>12,.0f} records/s")
    print(f"ratio fast / reference:          {t_ref / t_fast:>12.2f}x")


_CG_ROWS = 40_000  # records read into memory by every case: the same for N and 2N


def _case(case: str, db: str, n: int) -> None:
    """One callgrind case over the first ``n`` records of ``db``."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = conn.execute(
        "SELECT prev_hash, body FROM audit_records WHERE seq <= ? ORDER BY seq", (_CG_ROWS,)
    ).fetchall()
    conn.close()
    global _BLOB, _OFFSETS, _PREVS
    _BLOB = b"".join(body for _, body in rows)
    _OFFSETS = array.array("q", [0])
    for _, body in rows:
        _OFFSETS.append(_OFFSETS[-1] + len(body))
    _PREVS = [prev for prev, _ in rows]
    del rows
    if case == "baseline":
        _hash_range((0, n))
    else:
        store = SQLiteStore(db, readonly=True)
        flag = store.CANDIDATE_FLAG
        store.close()
        ok = _verify_parallel.verify_range((db, 1, n, flag))[0]
        assert ok


def callgrind(n: int) -> None:
    """Print instructions per record: baseline hashing vs a verify worker's scan."""
    from pathlib import Path as _Path

    from _callgrind import per_iteration

    entries = _entries(_CG_ROWS)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for version in (2, 1):
            path = _Path(tmp) / f"v{version}.db"
            if version == 1:
                from coworker.audit import sqlite_schema

                conn = __import__("sqlite3").connect(path, isolation_level=None)
                for statement in sqlite_schema._split_ddl(sqlite_schema._DDL_V1):
                    conn.execute(statement)
                conn.execute("INSERT INTO audit_meta VALUES ('schema_version', '1')")
                conn.close()
            store = SQLiteStore(path, synchronous="NORMAL", upgrade=False)
            for i in range(0, _CG_ROWS, 10_000):
                store.append(entries[i : i + 10_000])
            assert store.schema_version == version
            store.close()
            paths[version] = str(path)
        os.environ["AUDIT_VERIFY_DB"] = paths[2]  # the cases' file (inherited by valgrind)
        base = per_iteration(__file__, "baseline", "--rows", n)
        scan2 = per_iteration(__file__, "scan", "--rows", n)
        os.environ["AUDIT_VERIFY_DB"] = paths[1]
        scan1 = per_iteration(__file__, "scan", "--rows", n)
    print(f"baseline hash loop (in memory): {base:>10,.0f} instructions/record")
    print(
        f"verify worker, schema v2:       {scan2:>10,.0f} instructions/record "
        f"(baseline/verify {base / scan2:.2f}x)"
    )
    print(
        f"verify worker, schema v1:       {scan1:>10,.0f} instructions/record "
        f"(baseline/verify {base / scan1:.2f}x)"
    )


if __name__ == "__main__":
    if "--case" in sys.argv:
        argv = sys.argv
        _case(
            argv[argv.index("--case") + 1],
            os.environ["AUDIT_VERIFY_DB"],
            int(argv[argv.index("--rows") + 1]),
        )
    elif "--callgrind" in sys.argv:
        rest = sys.argv[sys.argv.index("--callgrind") + 1 :]
        callgrind(int(rest[0]) if rest else 10_000)
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
