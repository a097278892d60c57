"""What the policy check costs per ``@coworker.run`` call (goal: at most 1.2x unchecked).

Runs the same decorated function under one ``acting_as`` identity with:

* no policy (the baseline),
* a policy whose grant is unconditional (the cached fast path),
* a policy whose grant has a ``where`` condition on a bound argument (binds the arguments),
* a policy with a rate limit on the operation (one limiter hit per call),

on a real OTel SDK ``TracerProvider`` with no exporter, and prints the median ns per call of
interleaved repeats and the ratio to the baseline. Also prints ``Enforcer.enforce`` alone.

Usage::

    python benchmarks/acl_overhead.py [--calls 20000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import coworker
from coworker.acl import build_enforcer
from coworker.identity import Identity, User

UNCONDITIONAL: dict[str, Any] = {
    "roles": {"clerk": {"Task": ["select", "update"]}},
    "users": {"user-456": ["clerk"]},
}
CONDITIONAL: dict[str, Any] = {
    "roles": {"clerk": {"Task": [{"op": "update", "where": {"owner": "$user.id"}}]}},
    "users": {"user-456": ["clerk"]},
}
RATE_LIMITED: dict[str, Any] = {
    **UNCONDITIONAL,
    "rate_limits": {
        "updates": {"per": "user", "operations": ["update"], "limit": 10**9, "window": "1h"}
    },
}
SCENARIOS: dict[str, dict[str, Any] | None] = {
    "no policy": None,
    "policy, allowed": UNCONDITIONAL,
    "policy, where condition": CONDITIONAL,
    "policy, rate limit": RATE_LIMITED,
}


@coworker.run(operation="update", doctype="Task")
def update_task(task_id: str, owner: str) -> str:
    return task_id


def _time_calls(calls: int) -> float:
    fn = update_task
    with coworker.acting_as("user-456"):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn("T-1", "user-456")
        return (time.perf_counter_ns() - start) / calls


def _time_enforce(policy: dict[str, Any], calls: int) -> float:
    enforcer = build_enforcer(policy)
    assert enforcer is not None
    identity = Identity(User("user-456"))
    enforce = enforcer.enforce
    args: Callable[[], dict[str, Any]] = lambda: {"task_id": "T-1", "owner": "user-456"}  # noqa: E731
    start = time.perf_counter_ns()
    for _ in range(calls):
        enforce(identity, "update", "Task", args)
    return (time.perf_counter_ns() - start) / calls


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=15)
    opts = parser.parse_args(argv)

    results: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    for policy in SCENARIOS.values():  # warm up caches and code paths
        coworker.configure(policy=policy, metrics=False)
        _time_calls(1000)
    for _ in range(opts.repeats):
        for name, policy in SCENARIOS.items():  # interleaved, so drift hits all alike
            coworker.configure(policy=policy, metrics=False)
            results[name].append(_time_calls(opts.calls))
    coworker.shutdown()

    base = statistics.median(results["no policy"])
    print(f"@coworker.run, {opts.calls} calls x {opts.repeats} repeats, median ns/call")
    print(f"{'scenario':<26}{'ns/call':>10}{'ratio':>8}")
    for name, samples in results.items():
        median = statistics.median(samples)
        print(f"{name:<26}{median:>10.0f}{median / base:>7.3f}x")
    print()
    print("Enforcer.enforce alone, median ns/call")
    for name in ("policy, allowed", "policy, where condition", "policy, rate limit"):
        policy = SCENARIOS[name]
        assert policy is not None
        samples = [_time_enforce(policy, opts.calls) for _ in range(opts.repeats)]
        print(f"{name:<26}{statistics.median(samples):>10.0f}")


if __name__ == "__main__":
    main()
