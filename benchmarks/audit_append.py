"""Append throughput of audited runs vs raw SQLite inserts of the same rows.

Run: ``python benchmarks/audit_append.py [CALLS]``. Median of 5 repeats, each on a fresh file,
WAL + ``synchronous=FULL`` on both sides (a durable commit per call):

* audited: ``CALLS`` real ``@coworker.run(operation="update")`` calls with
  ``coworker.configure(audit="sqlite:///...")`` (decorator, span, record, canonical JSON,
  SHA-256, group commit, SQLite), from 1 thread and from 4 threads;
* raw: the very rows those runs produced (same columns, same indexes, no triggers), inserted
  with ``sqlite3`` one ``BEGIN IMMEDIATE ... COMMIT`` per row, from 1 thread and from 4
  threads (a connection each).

Goal: audited >= 0.5x raw.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import coworker
from coworker.audit import store_sqlite

REPEATS = 5


@coworker.run(operation="update", doctype="Invoice")
def update_invoice(n: int) -> int:
    return n


def _threads(n_threads: int, fn) -> float:  # type: ignore[no-untyped-def]
    barrier = threading.Barrier(n_threads + 1)

    def body(t: int) -> None:
        barrier.wait()
        fn(t)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in threads:
        th.join()
    return time.perf_counter() - start


def audited(tmp: Path, calls: int, n_threads: int) -> tuple[float, list[tuple]]:
    path = tmp / f"audited-{time.perf_counter_ns()}.db"
    coworker.configure(audit=f"sqlite:///{path}", otlp=False)
    per = calls // n_threads

    def work(t: int) -> None:
        with coworker.acting_as(f"user-{t}"), coworker.flow("batch-job"):
            for i in range(per):
                update_invoice(i)

    elapsed = _threads(n_threads, work)
    coworker.shutdown()
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT * FROM audit_records ORDER BY seq").fetchall()
    conn.close()
    assert len(rows) == per * n_threads
    return elapsed, rows


def raw(tmp: Path, rows: list[tuple], n_threads: int) -> float:
    path = tmp / f"raw-{time.perf_counter_ns()}.db"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode = WAL")
    for statement in store_sqlite._split_ddl(store_sqlite._DDL):
        if "TRIGGER" not in statement:
            setup.execute(statement)
    setup.close()
    marks = ", ".join("?" * len(rows[0]))
    per = len(rows) // n_threads

    def work(t: int) -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA synchronous = FULL")
        for row in rows[t * per : (t + 1) * per]:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"INSERT INTO audit_records VALUES ({marks})", row)
            conn.execute("COMMIT")
        conn.close()

    return _threads(n_threads, work)


def main(calls: int = 2000) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.chdir(tmp)
        for n_threads in (1, 4):
            a_times, r_times = [], []
            for _ in range(REPEATS):
                elapsed, rows = audited(tmp, calls, n_threads)
                a_times.append(elapsed)
                r_times.append(raw(tmp, rows, n_threads))
            a, r = statistics.median(a_times), statistics.median(r_times)
            print(
                f"{n_threads} thread(s): audited runs {calls / a:8,.0f}/s   raw inserts "
                f"{calls / r:8,.0f}/s   ratio {r / a:5.2f}x   (goal >= 0.5x)"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
