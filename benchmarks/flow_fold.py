"""What folding flows from the audit log costs (issue 14), against reading the same rows raw.

Two measurements on a real SQLite file (synchronous=NORMAL while building it):

1. **One flow of 1,000 events** among ``--noise`` records of other flows:
   ``coworker.audit.replay`` (index read + decode + fold) against (a) reading the same rows
   through the same index without decoding (``store.search(flow_id=...)``, the floor) and (b)
   folding by scanning the whole log (what replay would cost without the index).
2. **100,000 flows listed with status** (3 flow events each: started, completed, sealed):
   ``coworker.audit.fold.list_flows`` against (a) reading the same rows raw and (b) reading
   and ``json.loads``-ing them (the decode floor a fold cannot avoid).

3. **What the events cost a workflow**: workflows of 3 steps with one audited run each, through
   ``coworker.configure(audit=sqlite, synchronous=FULL)``, with flow events on (the default
   for workflows) against ``flow_events="none"``, interleaved.

Prints the median of ``--repeats`` runs and the ratios.

Usage::

    python benchmarks/flow_fold.py [--flows 100000] [--noise 50000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coworker.audit.fold import fold, list_flows, replay
from coworker.audit.store_sqlite import SQLiteStore

NOW = "2026-01-01T00:00:00.000000000Z"


def event(flow_id: str, name: str, step: str | None = None, **extra: Any) -> dict[str, Any]:
    """A flow event record as coworker._flow_events writes it (same keys)."""
    return {
        "v": 1, "kind": "outcome", "recorded_at": NOW, "category": "flow", "operation": name,
        "doctype": None, "name": name, "outcome": "ok", "error_type": None, "run_id": None,
        "parent_run_id": None, "chain_id": None, "flow_type": "workflow", "flow_id": flow_id,
        "step_id": step, "user_id": "alice", "agent_id": None, "agent_name": None,
        "session_id": None, "conversation_id": None, "service": None, "trace_id": None,
        "span_id": None, "parent_span_id": None, "start": NOW, "end": NOW, "intent_seq": None,
        "payload_digest": None, "flow_event_v": 1, **extra,
    }  # fmt: skip


def append_all(store: SQLiteStore, entries: list[dict[str, Any]], batch: int = 5000) -> None:
    """Append in batches (one transaction each)."""
    for i in range(0, len(entries), batch):
        store.append(entries[i : i + batch])


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    """Build the logs, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--noise", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workflows", type=int, default=300)
    parser.add_argument("--workflows-only", action="store_true", help="only measurement 3")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flow-fold-"))
    if not args.workflows_only:
        fold_and_list(args, tmp)
    workflow_cost(args, tmp)


def fold_and_list(args: argparse.Namespace, tmp: Path) -> None:
    """Measurements 1 and 2."""

    # 1. one flow of 1,000 events, interleaved with other flows' records
    store = SQLiteStore(tmp / "one.db", synchronous="NORMAL")
    entries: list[dict[str, Any]] = []
    per_event = max(args.noise // 1000, 1)
    entries.append(event("big", "flow-started"))
    for i in range(999):
        step = f"s{i % 50}"
        name = ("step-entered", "step-completed")[i % 2]
        entries.append(event("big", name, step, attempt=1 + i // 100))
        entries.extend(event(f"noise-{i}-{k}", "step-entered", "x") for k in range(per_event))
    append_all(store, entries)
    total = store.count()
    state = replay(store, "big")
    assert state.events == 1000, state.events
    t_replay = timed(lambda: replay(store, "big"), args.repeats)
    t_raw = timed(lambda: list(store.search({"flow_id": "big"})), args.repeats)
    t_scan = timed(lambda: fold(store.iter_from(1), "big"), max(1, args.repeats // 2))
    print(f"one flow of 1,000 events in a log of {total:,} records")
    print(f"  replay (index + decode + fold)   {t_replay * 1e3:8.2f} ms")
    print(f"  same rows raw through the index  {t_raw * 1e3:8.2f} ms   replay / raw = "
          f"{t_replay / t_raw:.1f}x")  # fmt: skip
    print(f"  fold by scanning the whole log   {t_scan * 1e3:8.2f} ms   scan / replay = "
          f"{t_scan / t_replay:.0f}x")  # fmt: skip
    store.close()

    # 2. 100,000 flows with status
    store = SQLiteStore(tmp / "many.db", synchronous="NORMAL")
    entries = []
    for n in range(args.flows):
        fid = f"flow-{n:06d}"
        entries.append(event(fid, "flow-started"))
        last = "flow-failed" if n % 10 == 0 else "flow-completed"
        entries.append(event(fid, last))
        entries.append(event(fid, "flow-sealed", head_seq=None, flow_status="x", fold_version=1))
    append_all(store, entries)
    flows = list_flows(store)
    assert len(flows) == args.flows
    assert sum(f.status == "failed" for f in flows) == (args.flows + 9) // 10

    def raw() -> None:
        for _ in store.search({"category": "flow"}):
            pass

    def decoded() -> None:
        for rec in store.search({"category": "flow"}):
            json.loads(rec.body)

    t_list = timed(lambda: list_flows(store), args.repeats)
    t_raw = timed(raw, args.repeats)
    t_dec = timed(decoded, args.repeats)
    print(f"{args.flows:,} flows ({store.count():,} flow events) listed with status")
    print(f"  list_flows                       {t_list:8.2f} s")
    print(f"  same rows raw                    {t_raw:8.2f} s   list / raw = {t_list / t_raw:.1f}x")
    print(f"  same rows read + json.loads      {t_dec:8.2f} s   list / decoded = "
          f"{t_list / t_dec:.1f}x")  # fmt: skip
    store.close()


def workflow_cost(args: argparse.Namespace, tmp: Path) -> None:
    """Measurement 3: flow events on against off (and with ``flow_seal="wait"``)."""
    import coworker

    wf = coworker.workflow("orders", steps=["validate", "pay", "ship"])

    @coworker.run(operation="update", doctype="Order")
    def update() -> None:
        pass

    def one_thread(n: int) -> None:
        for _ in range(n):
            with wf.start() as f:
                for step in wf.steps:
                    with f.step(step):
                        update()

    def workflows(events: str, threads: int, seal: str = "deferred") -> float:
        import threading

        coworker.configure(
            audit=f"sqlite:///{tmp / f'wf-{events}-{seal}.db'}", flow_events=events, flow_seal=seal
        )
        per = max(1, args.workflows // threads)
        workers = [threading.Thread(target=one_thread, args=(per,)) for _ in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        coworker.shutdown()
        return per * threads / elapsed

    print("workflows of 3 steps x 1 audited run, SQLite synchronous=FULL")
    for threads in (1, 4):
        on: list[float] = []
        off: list[float] = []
        wait: list[float] = []
        for _ in range(args.repeats):
            off.append(workflows("none", threads))
            on.append(workflows("workflow", threads))
            wait.append(workflows("workflow", threads, "wait"))
        r_on, r_off, r_wait = statistics.median(on), statistics.median(off), statistics.median(wait)
        print(
            f"  {threads} thread(s): events off {r_off:6.0f}/s, on {r_on:6.0f}/s"
            f"   on / off = {r_on / r_off:.2f}x;"
            f" flow_seal='wait' {r_wait:6.0f}/s = {r_wait / r_off:.2f}x"
        )


if __name__ == "__main__":
    main()
