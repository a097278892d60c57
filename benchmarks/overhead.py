"""Per-call cost of ``@coworker.run`` against a bare OTel span with the same attributes.

Run: ``python benchmarks/overhead.py [--calls N] [--repeats R] [--memory-calls M]``

Everything is measured in one process, interleaved, and reported as medians of R repeats;
ratios are against the floor (``tracer.start_as_current_span`` with the same attributes as
coworker emits, through the same SDK provider and a processor that does nothing), so that a
noisy shared machine moves both sides together.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

import coworker
from coworker import attributes as attr


class _Discard(SpanProcessor):
    """Ends spans without exporting them: measures span creation, not export."""


provider = TracerProvider()
provider.add_span_processor(_Discard())
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("bench")

ATTRS = {
    attr.OPERATION: "select",
    attr.DOCTYPE: "Invoice",
    attr.CODE_FUNCTION: "bench.f",
    attr.FLOW_TYPE: "workflow",
    attr.FLOW_ID: "5d3c2c64-0a5b-4a44-8f57-6e9b0b0b0b0b",
    attr.STEP_ID: "payment",
    attr.USER_ID: "user-456",
    attr.AGENT_ID: "agent-789",
    attr.AGENT_NAME: "billing-assistant",
    attr.GEN_AI_OPERATION_NAME: "execute_tool",
    attr.GEN_AI_TOOL_NAME: "select Invoice",
    attr.RUN_ID: "0123456789abcdef",
    attr.CHAIN_ID: "0123456789abcdef",
    attr.AUDIT: False,
}


def undecorated(x: int) -> int:
    return x + 1


def floor(x: int) -> int:
    with tracer.start_as_current_span("select Invoice", attributes=ATTRS):
        return x + 1


def floor3(x: int) -> int:
    with tracer.start_as_current_span("a", attributes=ATTRS):
        with tracer.start_as_current_span("b", attributes=ATTRS):
            with tracer.start_as_current_span("select Invoice", attributes=ATTRS):
                return x + 1


@coworker.run(operation="select", doctype="Invoice")
def ours(x: int) -> int:
    return x + 1


@coworker.run(operation="select", doctype="Invoice")
def ours_b(x: int) -> int:
    return ours(x)


@coworker.run(operation="select", doctype="Invoice")
def ours3(x: int) -> int:
    return ours_b(x)


async def afloor(x: int) -> int:
    with tracer.start_as_current_span("select Invoice", attributes=ATTRS):
        return x + 1


@coworker.run(operation="select", doctype="Invoice")
async def aours(x: int) -> int:
    return x + 1


def _time_sync(fn: Callable[[int], int], calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - start) / calls * 1e6


def _time_async(fn: Callable[[int], Any], calls: int) -> float:
    async def loop() -> float:
        start = time.perf_counter()
        for i in range(calls):
            await fn(i)
        return (time.perf_counter() - start) / calls * 1e6

    return asyncio.run(loop())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4_000)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--memory-calls", type=int, default=1_000_000)
    args = parser.parse_args()

    cases: dict[str, Callable[[], float]] = {
        "undecorated": lambda: _time_sync(undecorated, args.calls),
        "floor: bare OTel span": lambda: _time_sync(floor, args.calls),
        "coworker.run flat": lambda: _time_sync(ours, args.calls),
        "floor: 3 nested spans": lambda: _time_sync(floor3, args.calls),
        "coworker.run 3-deep": lambda: _time_sync(ours3, args.calls),
        "floor: async span": lambda: _time_async(afloor, args.calls),
        "coworker.run async": lambda: _time_async(aours, args.calls),
    }
    results: dict[str, list[float]] = {k: [] for k in cases}
    with coworker.acting_as("user-456", "agent-789", agent_name="billing-assistant"):
        wf = coworker.workflow("bench", steps=["payment"])
        with wf.start() as f, f.step("payment"):
            for fn in cases.values():  # warm-up
                fn()
            for _ in range(args.repeats):
                for name, fn in cases.items():  # interleaved: noise hits every case alike
                    results[name].append(fn())
    med = {k: statistics.median(v) for k, v in results.items()}
    pairs = {
        "coworker.run flat": "floor: bare OTel span",
        "coworker.run 3-deep": "floor: 3 nested spans",
        "coworker.run async": "floor: async span",
    }
    print(f"{'case':<26}{'µs/call (median)':>18}{'ratio to floor':>16}")
    for name, value in med.items():
        ratio = f"{value / med[pairs[name]]:.2f}x" if name in pairs else ""
        print(f"{name:<26}{value:>18.2f}{ratio:>16}")

    if args.memory_calls:
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with coworker.flow("batch-job"):
            for i in range(args.memory_calls):
                ours(i)
        gc.collect()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            f"memory: max RSS grew {(after - before) / 1024:.1f} MiB over "
            f"{args.memory_calls:,} calls (flat = no growth per call)"
        )


if __name__ == "__main__":
    main()
