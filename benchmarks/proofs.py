"""Signed checkpoints and Merkle proofs: what they cost and how big they are.

Run: ``python benchmarks/proofs.py [CALLS] [RECORDS]`` (``RECORDS=0`` skips the proofs part;
env ``REPEATS``, default 5). In one run:

* appends: ``CALLS`` real ``@coworker.run(operation="update")`` calls into SQLite
  (``synchronous=FULL``), with ``configure(checkpoint_key=..., checkpoint_every=100)`` against
  without (interleaved repeats, median; goal: with/without >= 0.95x);
* proofs: a log of ``RECORDS`` records (default 1,000,000; bulk-appended), its tree synced
  once, then inclusion and consistency proof size (hashes) and verify time (median of
  1,000 random proofs; goal <= 20 hashes and < 1 ms), and proof generation time from the
  stored tree.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import coworker
from coworker.audit import merkle
from coworker.audit.keys import generate_signer, write_signer
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.tlog import LogTree

REPEATS = int(os.environ.get("REPEATS", "5"))


@coworker.run(operation="update", doctype="Invoice")
def update_invoice(n: int) -> int:
    return n


def appends(tmp: Path, calls: int, key: Path | None) -> float:
    path = tmp / f"a-{time.perf_counter_ns()}.db"
    extra = {"checkpoint_key": key, "checkpoint_every": 100} if key else {}
    coworker.configure(audit=f"sqlite:///{path}", otlp=False, metrics=False, **extra)
    with coworker.acting_as("bench"):
        start = time.perf_counter()
        for i in range(calls):
            update_invoice(i)
        elapsed = time.perf_counter() - start
    coworker.shutdown()
    return calls / elapsed


def _entry(i: int) -> dict[str, object]:
    return {"v": 1, "kind": "outcome", "name": "update_invoice", "operation": "update",
            "user_id": f"user-{i % 97}", "flow_id": f"flow-{i // 10}", "outcome": "ok"}  # fmt: skip


def proofs(tmp: Path, records: int) -> None:
    path = tmp / "big.db"
    store = SQLiteStore(path, synchronous="NORMAL")
    batch = 10_000
    t0 = time.perf_counter()
    for start in range(0, records, batch):
        store.append([_entry(i) for i in range(start, min(records, start + batch))])
    t1 = time.perf_counter()
    tree = LogTree(store)
    tree.sync()
    t2 = time.perf_counter()
    print(f"  filled {records:,} records in {t1 - t0:.1f} s; first tree sync {t2 - t1:.1f} s "
          f"({records / (t2 - t1):,.0f} records/s)")  # fmt: skip
    root = tree.root()
    rng = random.Random(7)
    bodies = {}
    indexes = [rng.randrange(records) for _ in range(1000)]
    wanted = set(indexes)
    for r in store.iter_from(1):
        if r.seq - 1 in wanted:
            bodies[r.seq - 1] = r.body
    gen, ver, sizes = [], [], []
    for index in indexes:
        a = time.perf_counter()
        proof = tree.inclusion(index, records)
        b = time.perf_counter()
        merkle.verify_inclusion(index, records, merkle.leaf_hash(bodies[index]), proof, root)
        c = time.perf_counter()
        gen.append(b - a)
        ver.append(c - b)
        sizes.append(len(proof))
    print(f"  inclusion @ {records:,}: max {max(sizes)} hashes ({max(sizes) * 32} bytes), "
          f"verify median {statistics.median(ver) * 1e6:.0f} us (max {max(ver) * 1e6:.0f} us), "
          f"generate median {statistics.median(gen) * 1e3:.2f} ms")  # fmt: skip
    cver, csizes = [], []
    for _ in range(200):
        old = rng.randrange(1, records)
        proof = tree.consistency(old, records)
        old_root = tree.root(old)
        a = time.perf_counter()
        merkle.verify_consistency(old, records, old_root, root, proof)
        cver.append(time.perf_counter() - a)
        csizes.append(len(proof))
    med, top = statistics.median(cver) * 1e6, max(cver) * 1e6
    print(f"  consistency -> {records:,}: max {max(csizes)} hashes, "
          f"verify median {med:.0f} us (max {top:.0f} us)")  # fmt: skip
    # Appending after the big sync stays O(log N): time one more small sync.
    store.append([_entry(i) for i in range(100)])
    a = time.perf_counter()
    tree.sync()
    print(f"  sync of 100 more records on top of {records:,}: "
          f"{(time.perf_counter() - a) * 1e3:.1f} ms")  # fmt: skip
    tree.close()
    store.close()


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    records = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = tmp / "log.key"
        write_signer(key, generate_signer("bench.example/log"))
        off, on = [], []
        for _ in range(REPEATS):
            off.append(appends(tmp, calls, None))
            on.append(appends(tmp, calls, key))
        m_off, m_on = statistics.median(off), statistics.median(on)
        print(f"appends ({calls} audited runs, SQLite FULL, median of {REPEATS}):")
        print(f"  checkpointing off {m_off:,.0f}/s  on {m_on:,.0f}/s  ratio {m_on / m_off:.3f}x "
              "(goal >= 0.95x)")  # fmt: skip
        if records:
            print(f"proofs ({records:,} records):")
            proofs(tmp, records)


if __name__ == "__main__":
    main()
