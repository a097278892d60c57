"""SQLite appends/s with 1, 2 and 4 chains under 8 writer processes (issue 17).

A store's chains are independent (``sqlite:///audit.db?chain=NAME``: a file of its own per named
chain, with its own write lock, WAL, ``seq`` and head, docs/audit.md). ``--writers`` processes
(default 8) each append ``--records`` one-record entries with ``SQLiteStore.append``
(``synchronous=FULL``: each append is a durable commit when it returns); writer ``w`` appends to
chain ``w % chains``. The rate is every record over the wall time from the first append to the
last; the files are counted afterwards, so every record is accounted for. With one chain the
writers serialize on the file's write lock (one fsync'd commit at a time); with several, their
commits run side by side. Fresh files per run; median of ``--runs`` runs per chain count.

    python benchmarks/sqlite_chains.py [--writers 8] [--chains 1,2,4] [--records 300]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from coworker.audit.chain_registry import CATEGORY_CHAIN_REGISTRY
from coworker.audit.store_sqlite import SQLiteStore


def _entry() -> dict[str, Any]:
    """One audited run's record fields, made by a real audited call."""
    import coworker

    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample.db"
        coworker.configure(audit=f"sqlite:///{sample}", otlp=False)

        @coworker.run(operation="update", doctype="Invoice")
        def update_invoice(n: int) -> int:
            return n

        with coworker.acting_as("user-1"), coworker.flow("batch-job"):
            update_invoice(0)
        coworker.shutdown()
        reader = SQLiteStore(sample, readonly=True)
        fields: dict[str, Any] = json.loads(next(iter(reader.iter_from(1))).body)
        reader.close()
    fields.pop("seq")
    return fields


def _writer(path: str, chain: str, n: int, barrier: Any, out: Any) -> None:
    fields = _entry()
    store = SQLiteStore(path, chain=chain)
    barrier.wait()
    start = time.perf_counter()
    for i in range(n):
        store.append([{**fields, "run_id": f"{chain}-{i}"}])
    out.put((start, time.perf_counter()))
    store.close()


def run_once(tmp: Path, writers: int, chains: int, per_writer: int) -> float:
    """One run on a fresh store; returns records/s over the whole wall time."""
    path = str(tmp / f"chains-{time.perf_counter_ns()}.db")
    names = [""] + [f"c{i}" for i in range(1, chains)]
    for name in names:  # create every chain (and register it) outside the timing
        SQLiteStore(path, chain=name).close()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(writers), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(path, names[w % chains], per_writer, barrier, out))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    times = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"writer failed with exit code {p.exitcode}")
    count = 0
    for name in names:
        store = SQLiteStore(path, chain=name, readonly=True)
        count += sum(
            1
            for r in store.iter_from(1)
            if json.loads(r.body).get("category") != CATEGORY_CHAIN_REGISTRY
        )
        store.close()
    assert count == writers * per_writer, (count, writers * per_writer)
    return count / (max(t[1] for t in times) - min(t[0] for t in times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--chains", default="1,2,4")
    parser.add_argument("--records", type=int, default=300, help="per writer")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.chains.split(",")]
    rates: dict[int, list[float]] = {c: [] for c in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):  # interleaved: each round runs every chain count once
            for c in counts:
                rates[c].append(run_once(Path(tmp), args.writers, c, args.records))
    print(f"SQLite chains, {args.writers} writers, synchronous=FULL, median of {args.runs}")
    print(f"{'chains':>7} {'records/s':>10}  x 1 chain   runs")
    base = statistics.median(rates[counts[0]])
    for c in counts:
        median = statistics.median(rates[c])
        runs = ", ".join(f"{r:,.0f}" for r in rates[c])
        print(f"{c:>7} {median:>10,.0f}  {median / base:>9.2f}   {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
