"""Audited appends with encrypted payload capture vs capture off (issue 15).

Run: ``python benchmarks/erasure.py [CALLS]``. Interleaved repeats (median of 7), each on a
fresh SQLite file (WAL, ``synchronous=FULL``, a durable commit per call), one thread:

* capture off: ``CALLS`` real ``@coworker.run(operation="update")`` calls, no payload;
* encrypted capture: the same calls with ``capture_input=True, capture_output=True``: the
  captured input/output is AES-256-GCM encrypted under the caller's data key, the record holds
  a salted digest, the key row lives in ``audit_keys`` (20 users, round-robin).

Goal: encrypted capture >= 0.8x capture off (calls per second).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import coworker

REPEATS = 7


@coworker.run(operation="update", doctype="Invoice")
def plain(invoice: dict[str, object]) -> str:
    return "ok"


@coworker.run(operation="update", doctype="Invoice", capture_input=True, capture_output=True)
def captured(invoice: dict[str, object]) -> str:
    return "ok"


def _run(tmp: Path, fn, calls: int) -> float:  # type: ignore[no-untyped-def]
    path = tmp / f"b-{time.perf_counter_ns()}.db"
    coworker.configure(audit=f"sqlite:///{path}", otlp=False)
    invoice = {"id": "INV-1", "email": "alice@example.com", "amount": 120, "lines": [1, 2, 3]}
    start = time.perf_counter()
    for i in range(calls):
        with coworker.acting_as(f"user-{i % 20}"):
            fn(invoice)
    elapsed = time.perf_counter() - start
    coworker.shutdown()
    return calls / elapsed


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    off: list[float] = []
    enc: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _run(tmp, captured, 200)  # warm-up (imports cryptography)
        for _ in range(REPEATS):
            off.append(_run(tmp, plain, calls))
            enc.append(_run(tmp, captured, calls))
    o, e = statistics.median(off), statistics.median(enc)
    print(f"capture off        {o:8.0f} calls/s")
    print(f"encrypted capture  {e:8.0f} calls/s")
    print(f"ratio              {e / o:8.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
