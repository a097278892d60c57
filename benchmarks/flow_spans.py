"""Cost of flow and step spans (issue 13): a 3-step workflow with ``flow_spans`` on vs off.

Run: ``python benchmarks/flow_spans.py [--flows N] [--repeats R]``
     ``python benchmarks/flow_spans.py --callgrind`` (instruction counts, needs valgrind)

Each case is one workflow ``start()`` with three ``step()`` blocks and one decorated run per
step, through a real SDK ``TracerProvider`` with a processor that does nothing (span creation,
not export, is measured). With flow spans on, a flow makes 7 spans (workflow, 3 steps, 3 runs);
off, 3. Timing: cases interleaved in one process, medians of R repeats of N flows, ratio on /
off. A second pair times 100 runs inside one step (the per-run cost of looking up the flow's
span: ``_flow_spans.parent_for_run``), on vs off. Instructions (``--callgrind``): each case in
its own process under ``valgrind --tool=callgrind`` with N and 2N flows; the difference / N
is one flow's count, free of start-up and timing noise.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

from _callgrind import instructions, per_iteration
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

import coworker
from coworker._state import SETTINGS


class _Discard(SpanProcessor):
    """Ends spans without exporting them."""


provider = TracerProvider()
provider.add_span_processor(_Discard())
trace.set_tracer_provider(provider)

ORDERS = coworker.workflow("bench", steps=["validate", "payment", "ship"])


@coworker.run(operation="select", doctype="Order")
def work(x: int) -> int:
    return x


def one_flow() -> None:
    with ORDERS.start() as f:
        with f.step("validate"):
            work(1)
        with f.step("payment"):
            work(2)
        with f.step("ship"):
            work(3)


def hundred_runs() -> None:
    with ORDERS.start() as f, f.step("payment"):
        for i in range(100):
            work(i)


CASES: dict[str, tuple[Callable[[], None], bool]] = {
    "flow3-spans-off": (one_flow, False),
    "flow3-spans-on": (one_flow, True),
    "100runs-spans-off": (hundred_runs, False),
    "100runs-spans-on": (hundred_runs, True),
}


def _loop(name: str, n: int) -> float:
    fn, on = CASES[name]
    SETTINGS.flow_spans = on
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def timed(flows: int, repeats: int) -> None:
    for name in CASES:  # warm-up
        _loop(name, 50)
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    gc.disable()
    for _ in range(repeats):
        for name in CASES:
            n = flows if name.startswith("flow3") else max(1, flows // 20)
            samples[name].append(_loop(name, n) / n)
        gc.collect()
    gc.enable()
    med = {name: statistics.median(v) for name, v in samples.items()}
    print(f"{'case':<22}{'median/iteration':>18}{'ratio on/off':>14}")
    for name, value in med.items():
        ratio = ""
        if name.endswith("-on"):
            ratio = f"{value / med[name.replace('-on', '-off')]:.2f}x"
        print(f"{name:<22}{value * 1e6:>15.1f} µs{ratio:>14}")
    extra = med["flow3-spans-on"] - med["flow3-spans-off"]
    print(f"flow and step spans add {extra * 1e6:.1f} µs per 3-step flow")
    per_run = (med["100runs-spans-on"] - med["100runs-spans-off"]) / 100
    print(f"inside a step, per run (with the 2 extra spans amortised): {per_run * 1e9:+.0f} ns")


def callgrind(n: int) -> None:
    instructions(__file__, "flow3-spans-off", "--flows", 1)  # warm-up: writes any stale .pyc
    per: dict[str, float] = {}
    for name in CASES:
        k = n if name.startswith("flow3") else max(1, n // 20)
        per[name] = per_iteration(__file__, name, "--flows", k)
    print(f"{'case':<22}{'instructions/iteration':>24}{'ratio on/off':>14}")
    for name, value in per.items():
        ratio = ""
        if name.endswith("-on"):
            ratio = f"{value / per[name.replace('-on', '-off')]:.2f}x"
        print(f"{name:<22}{value:>24,.0f}{ratio:>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--case", help="run one case --flows times (used under callgrind)")
    parser.add_argument("--callgrind", action="store_true", help="instruction counts per flow")
    args = parser.parse_args()
    if args.case:
        gc.disable()
        _loop(args.case, args.flows)
    elif args.callgrind:
        callgrind(min(args.flows, 400))
    else:
        timed(args.flows, args.repeats)


if __name__ == "__main__":
    main()
