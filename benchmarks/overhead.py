"""Per-call cost of ``@coworker.run`` against a bare OTel span with the same attributes.

Run: ``python benchmarks/overhead.py [--calls N] [--repeats R] [--memory-calls M]``
     ``python benchmarks/overhead.py --callgrind`` (instruction counts, needs valgrind)

Timing: everything is measured in one process, interleaved, and reported as medians of R
repeats; ratios are against the floor (``tracer.start_as_current_span`` with the same
attributes as coworker emits, through the same SDK provider and a processor that does
nothing), so that a noisy shared machine moves both sides together.

Instructions (``--callgrind``): each case runs in its own process under
``valgrind --tool=callgrind`` twice, with N and 2N calls; the difference divided by N is the
instruction count of one call, free of start-up and of timing noise.

Cases: "plain" runs outside any coworker block; "scoped" runs inside ``acting_as`` + a
workflow flow + a step (13 attributes from the scope); the generator cases consume a
10-item generator (floor: a plain generator inside a bare span).
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

from _callgrind import instructions, per_iteration
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
    attr.FLOW_DEFINITION_ID: "bench",
    attr.STEP_ID: "payment",
    attr.USER_ID: "user-456",
    attr.AGENT_ID: "agent-789",
    attr.AGENT_NAME: "billing-assistant",
    attr.GEN_AI_OPERATION_NAME: "execute_tool",
    attr.GEN_AI_TOOL_NAME: "select Invoice",
    attr.OPENINFERENCE_SPAN_KIND: attr.OPENINFERENCE_TOOL,
    attr.RUN_ID: "0123456789abcdef",
    attr.CHAIN_ID: "0123456789abcdef",
    attr.AUDITED: False,
}


PLAIN_ATTRS = {
    attr.OPERATION: "select",
    attr.DOCTYPE: "Invoice",
    attr.CODE_FUNCTION: "bench.f",
    attr.OPENINFERENCE_SPAN_KIND: attr.OPENINFERENCE_CHAIN,
    attr.RUN_ID: "0123456789abcdef",
    attr.CHAIN_ID: "0123456789abcdef",
    attr.AUDITED: False,
}


def undecorated(x: int) -> int:
    return x + 1


def floor(x: int) -> int:
    with tracer.start_as_current_span("select Invoice", attributes=ATTRS):
        return x + 1


def floor_plain(x: int) -> int:
    with tracer.start_as_current_span("select Invoice", attributes=PLAIN_ATTRS):
        return x + 1


def floor_gen(x: int) -> int:
    def items() -> Any:
        yield from range(x, x + 10)

    with tracer.start_as_current_span("rows", attributes=PLAIN_ATTRS):
        return sum(items())


@coworker.run(operation="select", doctype="Invoice")
def _rows(x: int) -> Any:
    yield from range(x, x + 10)


def ours_gen(x: int) -> int:
    return sum(_rows(x))


async def afloor_gen(x: int) -> int:
    async def items() -> Any:
        for i in range(x, x + 10):
            yield i

    with tracer.start_as_current_span("rows", attributes=PLAIN_ATTRS):
        return sum([i async for i in items()])


@coworker.run(operation="select", doctype="Invoice")
async def _arows(x: int) -> Any:
    for i in range(x, x + 10):
        yield i


async def aours_gen(x: int) -> int:
    return sum([i async for i in _arows(x)])


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


# name: (function, async, scoped, floor case name)
CASES: dict[str, tuple[Callable[[int], Any], bool, bool, str | None]] = {
    "undecorated": (undecorated, False, False, None),
    "floor plain": (floor_plain, False, False, None),
    "run plain": (ours, False, False, "floor plain"),
    "floor scoped": (floor, False, True, None),
    "run scoped": (ours, False, True, "floor scoped"),
    "floor scoped 3-deep": (floor3, False, True, None),
    "run scoped 3-deep": (ours3, False, True, "floor scoped 3-deep"),
    "floor scoped async": (afloor, True, True, None),
    "run scoped async": (aours, True, True, "floor scoped async"),
    "floor generator x10": (floor_gen, False, False, None),
    "run generator x10": (ours_gen, False, False, "floor generator x10"),
    "floor async generator x10": (afloor_gen, True, False, None),
    "run async generator x10": (aours_gen, True, False, "floor async generator x10"),
}


def _scoped() -> Any:
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(coworker.acting_as("user-456", "agent-789", agent_name="billing-assistant"))
    f = stack.enter_context(coworker.workflow("bench", steps=["payment"]).start())
    stack.enter_context(f.step("payment"))
    return stack


def _run_case(name: str, calls: int) -> None:
    # No cyclic collections inside the measured window (they would land in N or 2N calls
    # at random); PYTHONHASHSEED is fixed by the caller.
    gc.disable()
    fn, is_async, scoped, _ = CASES[name]
    with _scoped() if scoped else _nothing():
        if is_async:
            _time_async(fn, calls)
        else:
            _time_sync(fn, calls)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def callgrind(calls: int, only: list[str] | None) -> None:
    wanted = set(only or CASES) | {CASES[o][3] for o in only or () if CASES[o][3]}
    instructions(__file__, "undecorated", "--calls", 1)  # warm-up: writes any stale .pyc first
    per_call: dict[str, float] = {}
    for name in CASES:
        if name not in wanted:
            continue
        per_call[name] = per_iteration(__file__, name, "--calls", calls)
    print(f"{'case':<28}{'instructions/call':>20}{'ratio':>8}{'extra':>10}")
    for name, value in per_call.items():
        base = CASES[name][3]
        ratio = extra = ""
        if base in per_call:
            ratio = f"{value / per_call[base]:.2f}x"
            n = 10 if "x10" in name else 1
            extra = f"{(value - per_call[base]) / n:+.0f}" + ("/item" if n > 1 else "")
        print(f"{name:<28}{value:>20,.0f}{ratio:>8}{extra:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4_000)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--memory-calls", type=int, default=1_000_000)
    parser.add_argument("--case", help="run one case --calls times (used under callgrind)")
    parser.add_argument("--callgrind", action="store_true", help="instruction counts per call")
    parser.add_argument("--only", nargs="*", help="with --callgrind: these cases (and floors)")
    args = parser.parse_args()
    if args.case:
        _run_case(args.case, args.calls)
        return
    if args.callgrind:
        callgrind(min(args.calls, 2_000), args.only)
        return
    timed(args.calls, args.repeats)
    if args.memory_calls:
        memory(args.memory_calls)


def timed(calls: int = 4_000, repeats: int = 31) -> None:
    """Medians of interleaved timings, each case against its floor."""
    results: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(repeats + 1):  # the first round warms up
        for name, (fn, is_async, scoped, _) in CASES.items():
            with _scoped() if scoped else _nothing():
                value = _time_async(fn, calls) if is_async else _time_sync(fn, calls)
            results[name].append(value)
    med = {k: statistics.median(v[1:]) for k, v in results.items()}
    print(f"{'case':<28}{'µs/call (median)':>18}{'ratio to floor':>16}")
    for name, value in med.items():
        base = CASES[name][3]
        ratio = f"{value / med[base]:.2f}x" if base else ""
        print(f"{name:<28}{value:>18.2f}{ratio:>16}")


def memory(calls: int) -> None:
    """Max RSS growth over many calls in one flow (flat = nothing kept per call)."""
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with coworker.flow("batch-job"):
        for i in range(calls):
            ours(i)
    gc.collect()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"memory: max RSS grew {(after - before) / 1024:.1f} MiB over "
        f"{calls:,} calls (flat = no growth per call)"
    )


if __name__ == "__main__":
    main()
