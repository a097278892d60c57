"""Threads, processes (W3C trace context + baggage) and the seeded-random property."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import coworker
from coworker import attributes as attr


@coworker.run(operation="select", doctype="Item")
def work(i: int) -> int:
    return i


def test_propagate_into_thread_pool(spans: Any) -> None:
    """propagate() carries flow, step, identity and parent span into pool threads."""
    with coworker.flow("batch-job", "b1"), coworker.acting_as("u1", "a1"):
        with coworker.run("fan-out") as parent, ThreadPoolExecutor(2) as pool:
            results = list(pool.map(coworker.propagate(work), range(4)))
    assert results == [0, 1, 2, 3]
    items = [s for s in spans.get_finished_spans() if s.name == "select Item"]
    assert len(items) == 4
    for s in items:
        assert s.attributes[attr.FLOW_ID] == "b1"
        assert s.attributes[attr.AGENT_ID] == "a1"
        assert s.attributes[attr.RUN_PARENT_ID] == parent.id


@pytest.mark.usefixtures("flow_spans_off")
def test_thread_without_propagate_has_no_context(spans: Any) -> None:
    """A plain thread does not see the caller's flow (documented: use propagate)."""
    with coworker.flow("batch-job", "b2"), ThreadPoolExecutor(1) as pool:
        pool.submit(work, 1).result()
    (s,) = spans.get_finished_spans()
    assert attr.FLOW_ID not in s.attributes


def test_inject_extract_round_trip_untrusted_identity(spans: Any) -> None:
    """inject/extract continue trace, flow, step and parent run; identity is not trusted."""
    carrier: dict[str, str] = {}
    with coworker.flow("api-request", "req-7"), coworker.step("checkout"):
        with coworker.acting_as("user-1", "agent-1"), coworker.run("client") as client:
            coworker.inject(carrier)
    assert "traceparent" in carrier and "coworker.flow.id=req-7" in carrier["baggage"]
    with coworker.extract(carrier) as ex:
        assert ex.identity_claimed is not None and ex.identity_claimed.user_id == "user-1"
        work(1)
    server = next(s for s in spans.get_finished_spans() if s.name == "select Item")
    client_span = next(s for s in spans.get_finished_spans() if s.name == "client")
    a = server.attributes
    assert server.context.trace_id == client_span.context.trace_id
    assert server.parent.span_id == client_span.context.span_id
    assert (a[attr.FLOW_ID], a[attr.STEP_ID]) == ("req-7", "checkout")
    assert a[attr.RUN_PARENT_ID] == client.id and a[attr.CHAIN_ID] == client.chain_id
    assert attr.USER_ID not in a and attr.AGENT_ID not in a


def test_extract_trusted_identity(spans: Any) -> None:
    """With trust_identity the caller's identity is applied."""
    carrier: dict[str, str] = {}
    with coworker.acting_as("user-2", "agent-2", agent_name="bot"):
        coworker.inject(carrier)
    with coworker.extract(carrier, trust_identity=True):
        work(2)
    (s,) = spans.get_finished_spans()
    assert s.attributes[attr.USER_ID] == "user-2"
    assert s.attributes[attr.AGENT_NAME] == "bot"


def test_extract_keeps_the_current_context_and_adds_the_carriers_baggage(spans: Any) -> None:
    """The application's own baggage survives extract; a nested extract's carrier (a remote
    parent only is current) gives the trace, and coworker's entries come from it alone."""
    from opentelemetry import baggage, context

    first: dict[str, str] = {}
    with coworker.flow("api-request", "outer"), coworker.run("first caller"):
        coworker.inject(first)
    second: dict[str, str] = {}
    with coworker.run("second caller"):
        coworker.inject(second)
    token = context.attach(baggage.set_baggage("tenant", "t-1"))
    try:
        with coworker.extract(first), coworker.extract(second):
            assert baggage.get_baggage("tenant") == "t-1"
            work(3)
    finally:
        context.detach(token)
    by = {s.name: s for s in spans.get_finished_spans()}
    run, caller = by["select Item"], by["second caller"]
    assert run.parent.span_id == caller.context.span_id
    assert run.attributes[attr.FLOW_ID] == "outer", "the second carrier has no flow: kept"


def test_extract_across_a_real_process(spans: Any, tmp_path: Any) -> None:
    """A child process continues the flow from headers and reports what its span carried."""
    carrier: dict[str, str] = {}
    with coworker.flow("api-request", "req-proc"), coworker.run("parent") as parent:
        coworker.inject(carrier)
    code = textwrap.dedent(
        """
        import json, sys
        import coworker
        from coworker.testing import span_exporter
        exp = span_exporter()
        @coworker.run(operation="select", doctype="Remote")
        def handler(): pass
        with coworker.extract(json.loads(sys.argv[1])):
            handler()
        (s,) = exp.get_finished_spans()
        print(json.dumps({"trace": s.context.trace_id, "attrs": dict(s.attributes)}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(carrier)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    got = json.loads(out.stdout)
    assert got["trace"] == parent.span.get_span_context().trace_id
    assert got["attrs"][attr.FLOW_ID] == "req-proc"
    assert got["attrs"][attr.RUN_PARENT_ID] == parent.id


SEEDED = textwrap.dedent(
    """
    import random, sys
    import coworker
    if sys.argv[1] == "traced":
        from coworker.testing import span_exporter
        coworker.configure("seeded", metrics=False)
        span_exporter()
    @coworker.run(operation="update", doctype="Dice")
    def roll():
        return random.randint(1, 10**9)
    random.seed(1234)
    with coworker.flow("batch-job"):
        print([roll() for _ in range(5)], random.random())
    """
)


def test_seeded_program_same_with_and_without_coworker() -> None:
    """Span/trace/run ids never draw from the global random state."""
    outs = []
    for mode in ("plain", "traced"):
        res = subprocess.run(
            [sys.executable, "-c", SEEDED, mode],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        outs.append(res.stdout)
    assert outs[0] == outs[1] and outs[0].startswith("[")
