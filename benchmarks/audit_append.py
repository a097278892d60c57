"""Append throughput of audited runs vs raw SQLite commits of the same rows, same guarantee.

Run: ``python benchmarks/audit_append.py [CALLS]``. Median of 5 interleaved repeats, each on a
fresh file, WAL + ``synchronous=FULL`` on every side (a durable commit before a call returns):

* audited: ``CALLS`` real ``@coworker.run(operation="update")`` calls with
  ``coworker.configure(audit="sqlite:///...")`` (decorator, span, record, canonical JSON,
  SHA-256, group commit, SQLite), from 1 thread and from 4 threads;
* raw, 1 thread: the very rows those runs produced (same table, same indexes, no triggers),
  inserted with ``sqlite3`` one ``BEGIN IMMEDIATE; INSERT; COMMIT`` per row: the durable
  one-row commit loop, the physical limit of one fsync'd WAL commit per call;
* raw, 4 threads: the same rows, through the very group commit coworker's writer uses
  (:class:`coworker.audit.group_commit.GroupCommit`, leader/follower with hand-over): each
  thread queues its row and waits; the leader inserts every queued row in one
  ``BEGIN IMMEDIATE ... COMMIT`` (one fsync for all of them) and each caller returns only
  once its own row is committed. Without it, four threads each committing alone is not
  the same guarantee at the same cost, and the ratio would flatter coworker;
* store, 1 thread: ``SQLiteStore.append`` of the same entries one per call (no span, no
  writer), to split what the store costs from what the run costs.

Goals (issue 17): 1 thread >= 0.9x raw; 4 threads >= 0.8x raw group commit.

``--callgrind``: instructions per one-record append under ``valgrind --tool=callgrind``
(``synchronous=NORMAL``, so that only CPU work counts; N and 2N appends, the difference / N):
the raw one-row commit of the very rows the store inserts, ``SQLiteStore.append``, the whole
audited call (``@coworker.run(operation="update")`` into ``audit="sqlite:///...?synchronous=
normal"``, inside ``acting_as`` + ``flow`` as above) and the same call with no audit trail.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import coworker
from coworker.audit import store_sqlite
from coworker.audit.group_commit import GroupCommit, Turn
from coworker.audit.store_sqlite import SQLiteStore

REPEATS = 5

# The columns an append inserts (schema version 2: seq, prev_hash, hash, body; SQLite derives
# the query columns), so that the raw baseline inserts exactly what the store does.
_INSERTED = store_sqlite._INSERT[
    store_sqlite._INSERT.index("(") + 1 : store_sqlite._INSERT.index(")")
]


@coworker.run(operation="update", doctype="Invoice")
def update_invoice(n: int) -> int:
    return n


def _threads(n_threads: int, fn: Callable[[int], None]) -> float:
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


def audited(tmp: Path, calls: int, n_threads: int) -> tuple[float, list[tuple[Any, ...]]]:
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
    rows = conn.execute(f"SELECT {_INSERTED} FROM audit_records ORDER BY seq").fetchall()
    conn.close()
    assert len(rows) == per * n_threads
    return elapsed, rows


def _raw_file(tmp: Path) -> Path:
    path = tmp / f"raw-{time.perf_counter_ns()}.db"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode = WAL")
    for statement in store_sqlite._split_ddl(store_sqlite._DDL):
        if "TRIGGER" not in statement:
            setup.execute(statement)
    setup.close()
    return path


def raw(tmp: Path, rows: list[tuple[Any, ...]]) -> float:
    """The durable one-row commit loop, one thread."""
    path = _raw_file(tmp)

    def work(_: int) -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA synchronous = FULL")
        insert = store_sqlite._INSERT
        for row in rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(insert, row)
            conn.execute("COMMIT")
        conn.close()

    return _threads(1, work)


class _Row(Turn):
    __slots__ = ("row",)

    def __init__(self, row: tuple[Any, ...]) -> None:
        super().__init__()
        self.row = row


class _GroupCommit:
    """The raw rows through the very group commit coworker's writer uses
    (:class:`coworker.audit.group_commit.GroupCommit`) over one connection."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA synchronous = FULL")
        self.insert = store_sqlite._INSERT
        self.group: GroupCommit[_Row, None] = GroupCommit(self._commit)

    def _commit(self, batch: list[_Row]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany(self.insert, [t.row for t in batch])
        self.conn.execute("COMMIT")

    def write(self, row: tuple[Any, ...]) -> None:
        self.group.submit(_Row(row))  # returns once its row is committed: durable


def raw_group(tmp: Path, rows: list[tuple[Any, ...]], n_threads: int) -> float:
    """The same rows from ``n_threads`` threads through a raw group commit."""
    group = _GroupCommit(_raw_file(tmp))
    per = len(rows) // n_threads

    def work(t: int) -> None:
        for row in rows[t * per : (t + 1) * per]:
            group.write(row)

    elapsed = _threads(n_threads, work)
    group.conn.close()
    return elapsed


def store_only(tmp: Path, calls: int) -> float:
    """``SQLiteStore.append`` of one audited run's entry per call, one thread."""
    import json

    path = tmp / f"store-{time.perf_counter_ns()}.db"
    store = SQLiteStore(path)
    sample = tmp / f"sample-{time.perf_counter_ns()}.db"
    coworker.configure(audit=f"sqlite:///{sample}", otlp=False)
    update_invoice(0)
    coworker.shutdown()
    reader = SQLiteStore(sample, readonly=True)
    fields = json.loads(next(iter(reader.iter_from(1))).body)
    reader.close()
    fields.pop("seq")

    def work(_: int) -> None:
        for _i in range(calls):
            store.append([fields])

    elapsed = _threads(1, work)
    store.close()
    return elapsed


def main(calls: int = 2000) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.chdir(tmp)
        for n_threads in (1, 4):
            a_times, r_times, s_times = [], [], []
            for _ in range(REPEATS):
                elapsed, rows = audited(tmp, calls, n_threads)
                a_times.append(elapsed)
                if n_threads == 1:
                    r_times.append(raw(tmp, rows))
                    s_times.append(store_only(tmp, calls))
                else:
                    r_times.append(raw_group(tmp, rows, n_threads))
            a, r = statistics.median(a_times), statistics.median(r_times)
            goal = 0.9 if n_threads == 1 else 0.8
            baseline = "raw one-row commits" if n_threads == 1 else "raw group commit   "
            print(
                f"{n_threads} thread(s): audited runs {calls / a:8,.0f}/s   {baseline} "
                f"{calls / r:8,.0f}/s   ratio {r / a:5.2f}x   (goal >= {goal}x)"
            )
            if s_times:
                s = statistics.median(s_times)
                print(
                    f"           SQLiteStore.append alone {calls / s:8,.0f}/s   ratio to raw "
                    f"{r / s:5.2f}x"
                )


_SETUP_ROWS = 1_000  # rows sealed for the raw case, the same number for N and 2N calls


def _case(case: str, calls: int) -> None:
    """One callgrind case: ``calls`` one-record appends, CPU work only (``synchronous=NORMAL``)."""
    import json

    tmp = Path(tempfile.mkdtemp())
    if case in ("call", "run"):
        _calls_case(tmp, case, calls)
        return
    store = SQLiteStore(tmp / "store.db", synchronous="NORMAL")
    sample = tmp / "sample.db"
    coworker.configure(audit=f"sqlite:///{sample}", otlp=False)
    update_invoice(0)
    coworker.shutdown()
    reader = SQLiteStore(sample, readonly=True)
    fields = json.loads(next(iter(reader.iter_from(1))).body)
    reader.close()
    fields.pop("seq")
    store.append([fields] * _SETUP_ROWS)
    conn = sqlite3.connect(tmp / "store.db")
    rows = conn.execute(f"SELECT {_INSERTED} FROM audit_records ORDER BY seq").fetchall()
    conn.close()
    store.close()
    if case == "raw":
        path = _raw_file(tmp)
        raw_conn = sqlite3.connect(path, isolation_level=None)
        raw_conn.execute("PRAGMA synchronous = NORMAL")
        for row in rows[:calls]:
            raw_conn.execute("BEGIN IMMEDIATE")
            raw_conn.execute(store_sqlite._INSERT, row)
            raw_conn.execute("COMMIT")
        raw_conn.close()
    else:
        target = SQLiteStore(tmp / "target.db", synchronous="NORMAL")
        for _ in range(calls):
            target.append([fields])
        target.close()


def _calls_case(tmp: Path, case: str, calls: int) -> None:
    """``calls`` runs as in :func:`audited` (1 thread), with the audit trail (``"call"``,
    ``synchronous=NORMAL``) or without it (``"run"``: the span alone)."""
    import gc

    audit = f"sqlite:///{tmp / 'calls.db'}?synchronous=normal" if case == "call" else None
    coworker.configure(audit=audit, otlp=False)
    with coworker.acting_as("user-0"), coworker.flow("batch-job"):
        for i in range(10):  # warm-up: first-call imports and caches
            update_invoice(i)
        gc.disable()  # no cyclic collection lands in N or 2N calls at random
        for i in range(calls):
            update_invoice(i)
        gc.enable()
    coworker.shutdown()


def callgrind(calls: int) -> None:
    """Instructions per one-record append (raw commit, ``SQLiteStore.append``) and per call
    (the whole audited call, and the same run without an audit trail)."""
    from _callgrind import instructions, per_iteration

    instructions(__file__, "raw", "--calls", 1)  # warm-up: writes any stale .pyc first
    raw_per = per_iteration(__file__, "raw", "--calls", calls)
    store_per = per_iteration(__file__, "store", "--calls", calls)
    call_per = per_iteration(__file__, "call", "--calls", calls)
    run_per = per_iteration(__file__, "run", "--calls", calls)
    print(f"raw one-row commit (SQLite work only): {raw_per:>10,.0f} instructions/record")
    print(
        f"SQLiteStore.append:                    {store_per:>10,.0f} instructions/record "
        f"(+{store_per - raw_per:,.0f} over raw)"
    )
    print(
        f"audited call (run + record + append):  {call_per:>10,.0f} instructions/call "
        f"(+{call_per - raw_per:,.0f} over raw, {raw_per / call_per:.2f}x)"
    )
    print(
        f"the same run, no audit trail:          {run_per:>10,.0f} instructions/call "
        f"(audit path: {call_per - run_per - store_per:+,.0f} beside the store)"
    )


if __name__ == "__main__":
    if "--case" in sys.argv:
        _case(sys.argv[sys.argv.index("--case") + 1], int(sys.argv[sys.argv.index("--calls") + 1]))
    elif "--callgrind" in sys.argv:
        callgrind(300)
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
