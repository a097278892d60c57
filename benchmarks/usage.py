"""What usage recording costs (issue 16; goal: a run with usage at most 1.05x one without).

Measures, on a real OTel SDK ``TracerProvider`` with no exporter and no audit store:

* ``record_usage`` alone, per call, inside one open run (validation, pricing from the cached
  genai-prices rates, span totals, the ledger's span event, the two metrics);
* an empty-bodied ``@coworker.run`` with and without one ``record_usage`` call: the worst
  case, since a real body that calls a model spends milliseconds to seconds in it;
* the same pair with a body that does a fixed amount of CPU work (a JSON round trip of a
  small chat response, ~what an SDK does to parse one), closer to a real model call site.

Prints the median ns per call of interleaved repeats and the ratios.

Usage::

    python benchmarks/usage.py [--calls 20000] [--repeats 11]
    python benchmarks/usage.py --callgrind   # instructions per call (needs valgrind)

``--callgrind`` runs each empty-body case in its own process under ``valgrind
--tool=callgrind`` with N and 2N calls; the difference / N is the instructions per call, free
of start-up and timing noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings
from collections.abc import Callable

from _callgrind import instructions, per_iteration

import coworker
from coworker.pricing import UsageWarning

RESPONSE = json.dumps(
    {
        "id": "chatcmpl-1",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 2000}}],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 80, "total_tokens": 1280},
    }
)


def _record() -> None:
    coworker.record_usage(
        model="gpt-4o", input_tokens=1200, output_tokens=80, cache_read_input_tokens=256
    )


@coworker.run(operation="chat")
def bare() -> None:
    return None


@coworker.run(operation="chat")
def with_usage() -> None:
    _record()


@coworker.run(operation="chat")
def parse_bare() -> None:
    json.loads(RESPONSE)


@coworker.run(operation="chat")
def parse_with_usage() -> None:
    json.loads(RESPONSE)
    _record()


def _time(fn: Callable[[], None], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls


_n = [0]


@coworker.run(operation="chat")
def with_new_counts() -> None:
    # Counts no earlier call had: every call misses the per-counts cost cache.
    _n[0] += 1
    coworker.record_usage(
        model="gpt-4o", input_tokens=1200 + _n[0], output_tokens=80, cache_read_input_tokens=256
    )


_CASES: dict[str, Callable[[], None]] = {
    "bare": bare,
    "with_usage": with_usage,
    "with_new_counts": with_new_counts,
}


def _case(name: str, calls: int) -> None:
    fn = _CASES[name]
    for _ in range(200):
        fn()  # warm caches (pricing rates, instruments, metric attribute sets)
    gc.disable()
    for _ in range(calls):
        fn()
    coworker.shutdown()


def callgrind(n: int) -> None:
    """Print the instructions per call of each case and the ratio."""
    instructions(__file__, "bare", "--calls", 1)  # warm-up: writes any stale .pyc first
    per = {name: per_iteration(__file__, name, "--calls", n) for name in _CASES}
    for name, value in per.items():
        print(f"{name:<12}{value:>14,.0f} instructions/call")
    for name in ("with_usage", "with_new_counts"):
        print(
            f"{name}: record_usage {per[name] - per['bare']:+,.0f} instructions/call, "
            f"ratio, empty body: {per[name] / per['bare']:.3f}x"
        )


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--case", choices=sorted(_CASES), help="used under callgrind")
    parser.add_argument("--callgrind", action="store_true", help="instructions per call")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UsageWarning)
    coworker.configure("bench", otlp=False, metrics=True)
    if args.case:
        _case(args.case, args.calls)
        return
    if args.callgrind:
        callgrind(min(args.calls, 500))
        coworker.shutdown()
        return
    scenarios = {
        "run, empty body": bare,
        "run, empty body + record_usage": with_usage,
        "run, JSON parse body": parse_bare,
        "run, JSON parse body + record_usage": parse_with_usage,
    }
    for fn in scenarios.values():
        _time(fn, 2000)  # warm caches (pricing rates, instruments)
    results: dict[str, list[float]] = {k: [] for k in scenarios}
    alone: list[float] = []
    for _ in range(args.repeats):
        for name, fn in scenarios.items():
            results[name].append(_time(fn, args.calls))
        alone.append(results["run, empty body + record_usage"][-1] - results["run, empty body"][-1])
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"record_usage, per call (difference):  {statistics.median(alone):9.0f} ns/call")
    for name, ns in med.items():
        print(f"{name:40s} {ns:9.0f} ns/call")
    empty = med["run, empty body + record_usage"] / med["run, empty body"]
    print(f"ratio, empty body:      {empty:.3f}x")
    print(
        "ratio, JSON parse body: "
        f"{med['run, JSON parse body + record_usage'] / med['run, JSON parse body']:.3f}x"
    )
    extra = statistics.median(alone)
    print(f"ratio <= 1.05x for bodies of at least {extra / 0.05 / 1e6:.2f} ms (a model call)")
    coworker.shutdown()


if __name__ == "__main__":
    main()
