"""propagate/inject/extract under concurrency and with malformed headers."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry import trace

import coworker
from coworker import attributes as attr


@pytest.mark.usefixtures("flow_spans_off")
def test_propagate_used_concurrently_from_a_pool(spans: Any) -> None:
    """One propagate() wrapper called by 16 threads at once carries the caller's context."""
    barrier = threading.Barrier(16, timeout=5)

    @coworker.run(operation="select")
    def task(i: int) -> tuple[int, str | None]:
        barrier.wait()
        with coworker.acting_as(f"user-{i}"):
            return i, coworker.current_identity().user_id

    with coworker.flow("batch-job", "b"), coworker.step("fan"), coworker.acting_as("boss"):
        with coworker.run("parent") as parent, ThreadPoolExecutor(16) as pool:
            fn = coworker.propagate(task)
            results = list(pool.map(fn, range(16)))
        assert coworker.current_identity().user_id == "boss"
    assert results == [(i, f"user-{i}") for i in range(16)]
    runs = [s for s in spans.get_finished_spans() if s.name != "parent"]
    assert len(runs) == 16
    for s in runs:
        assert s.attributes[attr.FLOW_ID] == "b"
        assert s.attributes[attr.STEP_ID] == "fan"
        assert s.attributes[attr.USER_ID] == "boss"
        assert s.attributes[attr.RUN_PARENT_ID] == parent.id
    assert len({s.attributes[attr.RUN_ID] for s in runs}) == 16


def test_propagate_async_function_into_thread(spans: Any) -> None:
    """propagate() of a coroutine function carries the flow when run in a thread's loop."""

    @coworker.run
    async def af() -> str | None:
        f = coworker.current_flow()
        return f.id if f is not None else None

    with coworker.flow("batch-job", "J"), ThreadPoolExecutor(1) as pool:
        result = pool.submit(asyncio.run, coworker.propagate(af)()).result()
    assert result == "J"


@pytest.mark.parametrize(
    "carrier",
    [
        {"traceparent": "garbage"},
        {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},
        {"traceparent": "ff-zz", "tracestate": "==="},
        {"baggage": "%%%,==,;;"},
        {"baggage": "coworker.flow.type=BAD TYPE,coworker.flow.id=x"},
        {"baggage": "coworker.flow.type=batch-job,coworker.flow.id="},
        {"baggage": "coworker.user.id=,coworker.gen_ai.agent.id="},
        {"baggage": "coworker.user.id=" + "a" * 10_000},
        {"baggage": ",".join(f"k{i}=v" for i in range(500))},
        {"traceparent": ["a", "b"]},
        {},
    ],
)
def test_extract_malformed_strings_never_raises(spans: Any, carrier: dict) -> None:
    """Malformed W3C headers give an Extracted with no flow/identity; nothing raises."""

    @coworker.run
    def work() -> None:
        pass

    with coworker.extract(carrier, trust_identity=True) as ex:
        work()
        assert coworker.current_identity() is None
    assert ex.flow is None
    (span,) = spans.get_finished_spans()
    assert attr.FLOW_ID not in span.attributes and attr.USER_ID not in span.attributes


def test_extract_list_valued_headers_continue_trace_and_flow(spans: Any) -> None:
    """A carrier of str -> list[str] (OTel's default getter format) is read like str -> str."""
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    carrier: Any = {
        "traceparent": [f"00-{trace_id}-b7ad6b7169203331-01"],
        "baggage": ["coworker.flow.type=batch-job,coworker.flow.id=L1"],
    }

    @coworker.run
    def work() -> None:
        pass

    with coworker.extract(carrier) as ex:
        work()
    assert ex.flow is not None and ex.flow.id == "L1"
    (span,) = spans.get_finished_spans()
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.attributes[attr.FLOW_ID] == "L1"


def test_extract_bytes_header_values_never_raises() -> None:
    """bytes header values are decoded or ignored, never an exception."""
    carrier: Any = {
        "traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "baggage": b"coworker.flow.type=batch-job,coworker.flow.id=k1",
    }
    with coworker.extract(carrier) as ex:
        parent = trace.get_current_span().get_span_context()
    assert ex.flow is not None and ex.flow.id == "k1"  # the decoded baggage is used
    assert format(parent.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"


def test_current_run_inside_extract_is_a_run_or_none(spans: Any) -> None:
    """current_run() keeps its documented type on the receiving side of a propagation."""
    carrier: dict[str, str] = {}
    with coworker.run("client"):
        coworker.inject(carrier)
    with coworker.extract(carrier):
        r = coworker.current_run()
        assert r is None or isinstance(r, coworker.Run)


def test_inject_extract_round_trip_of_awkward_values(spans: Any) -> None:
    """Commas, '=', ';', '+', spaces, '%20' and non-ASCII survive the baggage round trip."""
    flow_id = "id with space,comma=eq;semi+plus é"
    carrier: dict[str, str] = {}
    with coworker.flow("batch-job", flow_id), coworker.step("s p;a=c,e"):
        with coworker.acting_as("u+1 2,3=4;é", agent="a%20b", agent_name="Ag ent"):
            coworker.inject(carrier)
    with coworker.extract(carrier, trust_identity=True) as ex:
        assert coworker.current_step() == "s p;a=c,e"
    assert ex.flow is not None and ex.flow.id == flow_id
    claimed = ex.identity_claimed
    assert claimed is not None
    assert (claimed.user_id, claimed.agent_id, claimed.agent.name) == (
        "u+1 2,3=4;é",
        "a%20b",
        "Ag ent",
    )
