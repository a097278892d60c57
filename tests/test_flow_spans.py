"""Flow and step spans: a workflow is one trace (flow → step → run), with the real SDK."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import coworker
from coworker import attributes as attr
from coworker._state import SETTINGS


class GatewayTimeout(Exception):
    """A transient failure."""


@coworker.run(operation="select", doctype="Order")
def load(order_id: str) -> str:
    return order_id


@coworker.run(operation="submit", doctype="Payment")
def charge(fail: bool) -> None:
    if fail:
        raise GatewayTimeout("gateway timed out")


@coworker.run(operation="create", doctype="Shipment")
def ship() -> None:
    load("child")  # a nested run: stays under its parent run


def tree(exporter: Any) -> list[tuple[str, list[Any]]]:
    """``[(name, children)]`` by parent span id, in start order."""
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time)
    ids = {s.context.span_id for s in spans}
    kids: dict[Any, list[Any]] = {}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        kids.setdefault(parent, []).append(s)

    def build(parent: Any) -> list[tuple[str, list[Any]]]:
        return [(s.name, build(s.context.span_id)) for s in kids.get(parent, [])]

    return build(None)


def named(exporter: Any, name: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: Any, name: str) -> Any:
    (span,) = named(exporter, name)
    return span


ORDERS = coworker.workflow("order-processing", steps=["validate", "payment", "ship"])


def _order_workflow() -> coworker.Flow:
    with coworker.acting_as("clerk-17", session="s-1"), ORDERS.start(channel="web") as f:
        with f.step("validate"):
            load("o-1")
        with f.step("payment"):
            for attempt in (1, 2):
                try:
                    charge(attempt == 1)
                    break
                except GatewayTimeout:
                    pass
        with f.step("ship"):
            ship()
    return f


def test_workflow_is_one_trace_flow_step_run(spans: Any) -> None:
    """A workflow is one trace: invoke_workflow → a span per step → its runs (both attempts
    of the retried payment, the failed one ERROR with error.type) → nested runs."""
    f = _order_workflow()
    assert tree(spans) == [
        (
            "invoke_workflow order-processing",
            [
                ("step validate", [("select Order", [])]),
                ("step payment", [("submit Payment", []), ("submit Payment", [])]),
                ("step ship", [("create Shipment", [("select Order", [])])]),
            ],
        )
    ]
    finished = spans.get_finished_spans()
    assert len({s.context.trace_id for s in finished}) == 1
    root = one(spans, "invoke_workflow order-processing")
    assert root.parent is None
    assert root.kind == trace.SpanKind.INTERNAL
    a = root.attributes
    assert a[attr.GEN_AI_OPERATION_NAME] == "invoke_workflow"
    assert a[attr.GEN_AI_WORKFLOW_NAME] == "order-processing"
    assert a[attr.OPENINFERENCE_SPAN_KIND] == "CHAIN"
    assert a[attr.SPAN_TYPE] == "flow"
    assert (a[attr.FLOW_TYPE], a[attr.FLOW_ID]) == ("workflow", f.id)
    assert a[attr.FLOW_DEFINITION_ID] == "order-processing"
    assert a[attr.FLOW_METADATA_PREFIX + "channel"] == "web"
    assert (a[attr.USER_ID], a[attr.SESSION_ID]) == ("clerk-17", "s-1")
    assert attr.AUDITED not in a and attr.RUN_ID not in a
    step = one(spans, "step payment")
    sa = step.attributes
    assert (sa[attr.STEP_ID], sa[attr.FLOW_ID], sa[attr.STEP_ATTEMPT]) == ("payment", f.id, 1)
    assert sa[attr.OPENINFERENCE_SPAN_KIND] == "CHAIN"
    assert sa[attr.SPAN_TYPE] == "step"
    assert sa[attr.STEP_OUTCOME] == "completed"
    failed, succeeded = sorted(named(spans, "submit Payment"), key=lambda s: s.start_time)
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes[attr.ERROR_TYPE].endswith("GatewayTimeout")
    assert succeeded.status.status_code is StatusCode.UNSET
    for run in named(spans, "submit Payment"):
        assert attr.SPAN_TYPE not in run.attributes  # runs: counted by the run panels
        assert run.parent.span_id == step.context.span_id
        assert run.attributes[attr.STEP_ID] == "payment"


def test_failed_step_block_and_its_retry_are_two_marked_step_spans(spans: Any) -> None:
    """A step block that raises is an ERROR step span (failed, attempt 1); entering the step
    again is attempt 2 (completed), both under the workflow span."""
    with ORDERS.start() as f:
        with pytest.raises(GatewayTimeout), f.step("payment"):
            charge(True)
        with f.step("payment"):
            charge(False)
    first, second = sorted(named(spans, "step payment"), key=lambda s: s.start_time)
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes[attr.ERROR_TYPE].endswith("GatewayTimeout")
    assert (first.attributes[attr.STEP_ATTEMPT], first.attributes[attr.STEP_OUTCOME]) == (
        1,
        "failed",
    )
    assert (second.attributes[attr.STEP_ATTEMPT], second.attributes[attr.STEP_OUTCOME]) == (
        2,
        "completed",
    )
    assert second.status.status_code is StatusCode.UNSET
    root = one(spans, "invoke_workflow order-processing")
    assert first.parent.span_id == second.parent.span_id == root.context.span_id


def test_flow_block_failing_marks_the_flow_span_error(spans: Any) -> None:
    """An exception out of the flow block: the flow span is ERROR with error.type, ended once,
    and the context is restored (no span current afterwards)."""
    with pytest.raises(KeyError), coworker.flow("batch-job", "nightly"):
        load("x")
        raise KeyError("missing")
    root = one(spans, "flow batch-job")
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes[attr.ERROR_TYPE] == "KeyError"
    assert root.attributes[attr.OPENINFERENCE_SPAN_KIND] == "CHAIN"
    assert attr.GEN_AI_OPERATION_NAME not in root.attributes  # not a GenAI workflow
    assert not trace.get_current_span().get_span_context().is_valid


@pytest.mark.parametrize("flow_type", ["batch-job", "api-request", "nightly.export"])
def test_flow_blocks_of_any_type_get_a_span(spans: Any, flow_type: str) -> None:
    """Any flow type gets a CHAIN span named after its type, its runs nested under it."""
    with coworker.flow(flow_type) as f:
        ship()
    assert tree(spans) == [(f"flow {flow_type}", [("create Shipment", [("select Order", [])])])]
    root = one(spans, f"flow {flow_type}")
    assert (root.attributes[attr.FLOW_TYPE], root.attributes[attr.FLOW_ID]) == (flow_type, f.id)


def test_workflow_without_definition_is_invoke_workflow(spans: Any) -> None:
    """``coworker.flow("workflow")`` has no definition: the span is plain ``invoke_workflow``."""
    with coworker.flow("workflow"):
        load("x")
    root = one(spans, "invoke_workflow")
    assert root.attributes[attr.GEN_AI_OPERATION_NAME] == "invoke_workflow"
    assert attr.GEN_AI_WORKFLOW_NAME not in root.attributes


def test_flow_inside_a_current_span_keeps_it_as_parent(spans: Any) -> None:
    """A flow started inside an existing trace (an incoming request's server span) is a
    child of that span: same trace id, the request stays the root."""
    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("GET /orders") as request:
        _order_workflow()
    root = one(spans, "invoke_workflow order-processing")
    assert root.parent.span_id == request.get_span_context().span_id
    assert {s.context.trace_id for s in spans.get_finished_spans()} == {
        request.get_span_context().trace_id
    }


def test_flow_inside_an_extracted_traceparent_continues_the_remote_trace(spans: Any) -> None:
    """``coworker.extract(headers)`` with a remote traceparent: the flow span's parent is the
    remote span; every span is in the caller's trace."""
    trace_id, span_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    headers = {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}
    with coworker.extract(headers):
        _order_workflow()
    root = one(spans, "invoke_workflow order-processing")
    assert root.parent is not None and root.parent.is_remote
    assert root.parent.span_id == span_id
    assert {s.context.trace_id for s in spans.get_finished_spans()} == {trace_id}


def test_two_workflows_are_two_traces(spans: Any) -> None:
    """Each workflow run is its own trace (the flow's trace id)."""
    _order_workflow()
    _order_workflow()
    roots = named(spans, "invoke_workflow order-processing")
    assert len(roots) == 2 and roots[0].context.trace_id != roots[1].context.trace_id
    for root in roots:
        members = [
            s for s in spans.get_finished_spans() if s.context.trace_id == root.context.trace_id
        ]
        assert len(members) == 1 + 3 + 5  # the flow, three steps, five runs


def test_off_switch_keeps_todays_shape(spans: Any) -> None:
    """``configure(flow_spans=False)``: no flow or step spans; each top-level run is its own
    trace root carrying the flow and step as attributes (the pre-issue-13 shape)."""
    coworker.configure(flow_spans=False, metrics=False)
    f = _order_workflow()
    finished = spans.get_finished_spans()
    names = sorted(s.name for s in finished)
    assert names == [
        "create Shipment",
        "select Order",
        "select Order",
        "submit Payment",
        "submit Payment",
    ]
    roots = [s for s in finished if s.parent is None]
    assert len(roots) == 4 and len({s.context.trace_id for s in roots}) == 4
    assert all(s.attributes[attr.FLOW_ID] == f.id for s in finished)
    assert SETTINGS.flow_spans is False


def test_off_switch_from_the_environment(monkeypatch: pytest.MonkeyPatch, spans: Any) -> None:
    """``COWORKER_FLOW_SPANS=false`` turns them off like ``flow_spans=False``."""
    monkeypatch.setenv("COWORKER_FLOW_SPANS", "false")
    coworker.configure(metrics=False)
    with coworker.flow("batch-job"):
        load("x")
    assert [s.name for s in spans.get_finished_spans()] == ["select Order"]


def test_no_sdk_means_no_flow_span_and_no_error() -> None:
    """Without an SDK provider (a fresh interpreter, nothing configured) the blocks work and
    no span is current inside them."""
    code = """
import coworker
from opentelemetry import trace
orders = coworker.workflow("w", steps=["a"])

@coworker.run(operation="update", doctype="X")
def update():
    return trace.get_current_span().get_span_context().is_valid

chat = coworker.conversation("c")
with orders.start() as f, f.step("a"):
    assert not trace.get_current_span().get_span_context().is_valid
    assert update() is False
with chat.turn():
    coworker.break_flow("topic-change")
    assert update() is False
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# -- threads, asyncio, cancellation, generators ---------------------------------------------


def _no_double_end(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r.getMessage() for r in caplog.records if "ended span" in r.getMessage()]
    assert bad == [], bad


def test_threads_started_in_a_step_nest_under_it(
    spans: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs in a thread pool (``coworker.propagate``) started inside a step are children of
    that step's span, in the flow's trace."""
    from concurrent.futures import ThreadPoolExecutor

    with ORDERS.start(), coworker.step("ship"), ThreadPoolExecutor(4) as pool:
        list(pool.map(coworker.propagate(load), [f"o-{i}" for i in range(8)]))
    step = one(spans, "step ship")
    runs = named(spans, "select Order")
    assert len(runs) == 8
    assert {r.parent.span_id for r in runs} == {step.context.span_id}
    assert {r.context.trace_id for r in runs} == {step.context.trace_id}
    _no_double_end(caplog)


def test_asyncio_tasks_started_in_a_step_nest_under_it(spans: Any) -> None:
    """asyncio tasks copy the context: their runs are children of the step span."""
    import asyncio

    @coworker.run(operation="select", doctype="Stock")
    async def check(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def main() -> None:
        async with ORDERS.start() as f:
            async with f.step("validate"):
                await asyncio.gather(*(asyncio.create_task(check(i)) for i in range(5)))

    asyncio.run(main())
    step = one(spans, "step validate")
    runs = named(spans, "select Stock")
    assert len(runs) == 5 and {r.parent.span_id for r in runs} == {step.context.span_id}


def test_cancelled_task_ends_its_flow_span_once(
    spans: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A task cancelled inside its flow and step blocks: both spans end exactly once, as
    errors (``asyncio.CancelledError``), and the context is restored."""
    import asyncio

    started = asyncio.Event()

    async def job() -> None:
        async with coworker.flow("batch-job") as f:
            async with f.step("wait"):
                started.set()
                await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(job())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    for name in ("flow batch-job", "step wait"):
        span = one(spans, name)
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes[attr.ERROR_TYPE] == "asyncio.exceptions.CancelledError"
    _no_double_end(caplog)


def test_generator_closed_inside_a_flow_block_ends_its_span_once(
    spans: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A generator holding a flow block, closed early (GeneratorExit), ends the flow span
    once and not as an error."""

    def batches() -> Any:
        with coworker.flow("batch-job"):
            for i in range(10):
                load(str(i))
                yield i

    gen = batches()
    assert next(gen) == 0 and next(gen) == 1
    gen.close()
    root = one(spans, "flow batch-job")
    assert root.status.status_code is StatusCode.UNSET
    assert {s.parent.span_id for s in named(spans, "select Order")} == {root.context.span_id}
    _no_double_end(caplog)


def test_nested_flow_blocks_nest_their_spans(spans: Any) -> None:
    """A workflow started inside an api-request flow is a child of the request's flow span."""
    with coworker.flow("api-request"), ORDERS.start() as f, f.step("validate"):
        load("x")
    assert tree(spans) == [
        (
            "flow api-request",
            [("invoke_workflow order-processing", [("step validate", [("select Order", [])])])],
        )
    ]


# -- the bound: long-lived flows ------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The bound's clock, driven by the test (seconds)."""
    from coworker import _flow_spans

    now = [1_000.0]
    monkeypatch.setattr(_flow_spans, "clock", lambda: now[0])
    return now


def test_flow_span_past_the_bound_is_continued_by_a_linked_span(
    spans: Any, clock: list[float]
) -> None:
    """A flow open longer than ``flow_span_max_duration``: at the next run its span (and the
    open step's) end, marked continued; continuation spans of the same flow and step start in
    a new trace, linked to them, and the run nests under the continued step."""
    coworker.configure(flow_span_max_duration=60, metrics=False)
    with coworker.flow("batch-job") as f, coworker.step("export"):
        load("1")
        clock[0] += 59
        load("2")  # within the bound
        clock[0] += 2
        load("3")  # past it: continued first
    first, second = sorted(named(spans, "flow batch-job"), key=lambda s: s.start_time)
    step1, step2 = sorted(named(spans, "step export"), key=lambda s: s.start_time)
    assert first.attributes[attr.SPAN_CONTINUED] is True
    assert step1.attributes[attr.SPAN_CONTINUED] is True
    assert attr.SPAN_CONTINUED not in second.attributes
    assert (second.attributes[attr.SPAN_SEGMENT], step2.attributes[attr.SPAN_SEGMENT]) == (2, 2)
    assert second.attributes[attr.FLOW_ID] == f.id
    (link,) = second.links
    assert link.context.span_id == first.context.span_id
    assert link.attributes[attr.LINK_TYPE] == "continuation"
    (step_link,) = step2.links
    assert step_link.context.span_id == step1.context.span_id
    assert step2.parent.span_id == second.context.span_id
    assert second.context.trace_id != first.context.trace_id
    r1, r2, r3 = sorted(named(spans, "select Order"), key=lambda s: s.start_time)
    assert r1.parent.span_id == r2.parent.span_id == step1.context.span_id
    assert r3.parent.span_id == step2.context.span_id
    assert first.end_time <= r3.start_time  # ended before the next run: exported in time


def test_bound_continuation_in_a_thread_redirects_the_other_contexts(
    spans: Any, clock: list[float]
) -> None:
    """The bound passed and a worker thread continued the flow span: the main context's next
    run is redirected to the continuation (not the ended span), and the block ends it."""
    from concurrent.futures import ThreadPoolExecutor

    coworker.configure(flow_span_max_duration=10, metrics=False)
    with coworker.flow("batch-job"), ThreadPoolExecutor(1) as pool:
        load("main-1")
        clock[0] += 11
        pool.submit(coworker.propagate(load), "worker").result()
        load("main-2")
    first, second = sorted(named(spans, "flow batch-job"), key=lambda s: s.start_time)
    by_arg = {s.start_time: s for s in named(spans, "select Order")}
    runs = [by_arg[t] for t in sorted(by_arg)]
    assert runs[0].parent.span_id == first.context.span_id
    assert runs[1].parent.span_id == second.context.span_id  # the thread's, continued there
    assert runs[2].parent.span_id == second.context.span_id  # main: redirected
    assert second.end_time is not None


def test_bound_zero_turns_continuation_off(spans: Any, clock: list[float]) -> None:
    """``flow_span_max_duration=0``: one flow span however long the flow lives."""
    coworker.configure(flow_span_max_duration=0, metrics=False)
    with coworker.flow("batch-job"):
        load("1")
        clock[0] += 10**9
        load("2")
    assert len(named(spans, "flow batch-job")) == 1


def test_bound_applies_to_turns(spans: Any, clock: list[float]) -> None:
    """A turn span past the bound is continued like a flow span."""
    coworker.configure(flow_span_max_duration=30, metrics=False)
    chat = coworker.conversation("c")
    with coworker.acting_as("u", "a", agent_name="bot"), chat.turn():
        load("1")
        clock[0] += 31
        load("2")
    first, second = sorted(named(spans, "invoke_agent bot"), key=lambda s: s.start_time)
    assert second.links[0].context.span_id == first.context.span_id
    assert second.attributes[attr.TURN_NUMBER] == 1 and second.attributes[attr.SPAN_SEGMENT] == 2


@pytest.mark.parametrize("bad", [-1, "10", True, float("nan")])
def test_bad_bound_is_a_config_error(bad: Any) -> None:
    """A negative, non-numeric or NaN bound fails at configure()."""
    with pytest.raises(coworker.ConfigError, match="flow_span_max_duration"):
        coworker.configure(flow_span_max_duration=bad, metrics=False)


# -- usage roll-ups (issue 16) --------------------------------------------------------------


@coworker.run(operation="select", doctype="Prompt")
def model_call(
    tokens_in: int, tokens_out: int, fail: bool = False, model: str = "gpt-4o-mini"
) -> None:
    coworker.record_usage(model=model, input_tokens=tokens_in, output_tokens=tokens_out)
    if fail:
        raise GatewayTimeout("retry me")


@coworker.run(operation="select", doctype="Agent")
def agent_step() -> None:
    coworker.record_usage(model="gpt-4o-mini", input_tokens=100, output_tokens=10)
    model_call(50, 5)  # a nested run


def _tokens(span: Any) -> tuple[int, int]:
    a = span.attributes
    return a[attr.GEN_AI_USAGE_INPUT_TOKENS], a[attr.GEN_AI_USAGE_OUTPUT_TOKENS]


def _run_cost(spans: Any, trace_id: int) -> float:
    return sum(
        s.attributes.get(attr.GEN_AI_USAGE_COST_AMOUNT, 0.0)
        for s in spans.get_finished_spans()
        if attr.RUN_ID in s.attributes and s.context.trace_id == trace_id
    )


def test_usage_rolls_up_to_step_and_flow_spans(spans: Any) -> None:
    """Token totals and cost on the step and flow spans: across nested runs, a retried
    (failed) run and threads; the flow's equals the sum of its runs' spans."""
    from concurrent.futures import ThreadPoolExecutor

    with pytest.warns(Warning) if False else _nothing():
        with ORDERS.start() as f:
            with f.step("validate"):
                agent_step()  # 100/10 + nested 50/5
            with f.step("payment"):
                with pytest.raises(GatewayTimeout):
                    model_call(20, 2, fail=True)
                model_call(30, 3)
            with f.step("ship"), ThreadPoolExecutor(2) as pool:
                list(pool.map(coworker.propagate(lambda n: model_call(n, 1)), [7, 7]))
    assert _tokens(one(spans, "step validate")) == (150, 15)
    assert _tokens(one(spans, "step payment")) == (50, 5)
    assert _tokens(one(spans, "step ship")) == (14, 2)
    root = one(spans, "invoke_workflow order-processing")
    assert _tokens(root) == (214, 22)
    assert root.attributes[attr.FLOW_ID] == f.id
    cost = root.attributes.get(attr.GEN_AI_USAGE_COST_AMOUNT)
    if cost is not None:  # genai-prices installed: the roll-up equals the runs' sum
        assert cost == pytest.approx(_run_cost(spans, root.context.trace_id), rel=1e-9)
        assert root.attributes[attr.GEN_AI_USAGE_COST_CURRENCY] == "USD"
        assert root.attributes[attr.GEN_AI_USAGE_COST_SOURCE]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_usage_roll_ups_split_at_a_break(spans: Any) -> None:
    """Usage before a break is on the old flow's span, after it on the new one's."""
    with coworker.flow("batch-job"):
        model_call(10, 1)
        coworker.break_flow("task-completed")
        model_call(20, 2)
    old, new = sorted(named(spans, "flow batch-job"), key=lambda s: s.start_time)
    assert _tokens(old) == (10, 1) and _tokens(new) == (20, 2)


def test_usage_rolls_up_to_turn_spans(spans: Any) -> None:
    """A turn span totals its runs' usage; a turn without usage carries none."""
    chat = coworker.conversation("c")
    with coworker.acting_as("u", "a", agent_name="bot"):
        with chat.turn():
            agent_step()
        with chat.turn():
            load("x")
    first, second = sorted(named(spans, "invoke_agent bot"), key=lambda s: s.start_time)
    assert _tokens(first) == (150, 15)
    assert attr.GEN_AI_USAGE_INPUT_TOKENS not in second.attributes


def test_unpriced_usage_is_counted_not_priced(spans: Any) -> None:
    """A model without a price: its tokens roll up, its calls are counted as unpriced and no
    cost is invented (null, never 0)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with coworker.flow("batch-job"):
            model_call(5, 1, model="no-such-model-xyz")
    root = one(spans, "flow batch-job")
    assert _tokens(root) == (5, 1)
    assert root.attributes[attr.USAGE_UNPRICED] == 1
    assert attr.GEN_AI_USAGE_COST_AMOUNT not in root.attributes


# -- audit ----------------------------------------------------------------------------------


def test_flow_spans_are_not_audit_records(spans: Any) -> None:
    """With an audit trail, the flow, step and turn spans write no record, even when the
    application sets ``coworker.audited`` on the current (flow) span; the runs' records and the
    flow events do, and carry the flow's trace id."""
    from coworker import _setup

    coworker.configure(audit="memory://", metrics=False)
    with ORDERS.start() as f:
        trace.get_current_span().set_attribute(attr.AUDITED, True)
        with f.step("payment"):
            trace.get_current_span().set_attribute(attr.AUDITED, True)
            charge(False)
    chat = coworker.conversation("c")
    with coworker.acting_as("u", "a"), chat.turn():
        trace.get_current_span().set_attribute(attr.AUDITED, True)
        trace.get_current_span().set_attribute(attr.AUDITED_LEGACY, True)  # the 0.1.0 name
    coworker.force_flush()
    records = [r.fields() for r in _setup.audit_store().iter_from(1)]
    runs = [r for r in records if r["category"] != "flow"]
    assert [(r["operation"], r["doctype"]) for r in runs] == [("submit", "Payment")]
    root = one(spans, "invoke_workflow order-processing")
    trace_id = f"{root.context.trace_id:032x}"
    assert {r["trace_id"] for r in records if r["flow_id"] == f.id} == {trace_id}
    assert runs[0]["parent_span_id"] == f"{one(spans, 'step payment').context.span_id:016x}"
    for name in ("invoke_workflow order-processing", "step payment", "invoke_agent"):
        assert attr.AUDITED not in one(spans, name).attributes
        assert attr.AUDITED_LEGACY not in one(spans, name).attributes


def test_one_step_block_shared_by_concurrent_tasks(spans: Any) -> None:
    """A module-level step block entered by two tasks at once: each entry has its own span,
    each task's run under its own entry's span, both ended."""
    import asyncio

    shared = coworker.step("ship")
    inside = asyncio.Event()

    @coworker.run(operation="select", doctype="Parcel")
    async def pack(n: int) -> int:
        return n

    async def task(n: int) -> None:
        async with shared:
            if n == 0:
                await inside.wait()  # both entries are open at once
            else:
                inside.set()
            await pack(n)

    async def main() -> None:
        async with ORDERS.start():
            await asyncio.gather(task(0), task(1))

    asyncio.run(main())
    steps = named(spans, "step ship")
    assert len(steps) == 2
    runs = named(spans, "select Parcel")
    assert {r.parent.span_id for r in runs} == {s.context.span_id for s in steps}


def test_flow_block_in_a_generator_resumed_in_another_context(
    spans: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A flow block spanning a generator's yield, the generator resumed in another context:
    the span still ends once. (A plain generator runs in its consumer's context: after the
    resume neither the flow nor its span is current there, like every ContextVar.)"""
    import contextvars

    def job() -> Any:
        with coworker.flow("batch-job"):
            load("a")
            yield 1
            load("b")

    gen = job()
    contextvars.copy_context().run(next, gen)
    with pytest.raises(StopIteration):
        contextvars.copy_context().run(next, gen)
    root = one(spans, "flow batch-job")
    a, b = sorted(named(spans, "select Order"), key=lambda s: s.start_time)
    assert a.parent.span_id == root.context.span_id
    assert b.parent is None and attr.FLOW_ID not in b.attributes  # the consumer's context
    assert root.end_time >= b.end_time  # ended when the block exited, after "b"
    assert not trace.get_current_span().get_span_context().is_valid
    _no_double_end(caplog)


def test_run_after_a_step_continued_at_the_bound_nests_under_the_continuation(
    spans: Any, clock: list[float]
) -> None:
    """The bound passes inside a step: after the step block the flow block continues in the
    flow's continuation span (not the ended first one), for runs and later steps alike."""
    coworker.configure(flow_span_max_duration=60, metrics=False)
    with coworker.flow("batch-job"):
        with coworker.step("a"):
            clock[0] += 61
            load("in-a")  # continues flow and step
        load("after-a")
        with trace.get_tracer("app").start_as_current_span("mine"):
            pass  # an application span: the current context is the continuation's
        with coworker.step("b"):
            load("in-b")
    first, second = sorted(named(spans, "flow batch-job"), key=lambda s: s.start_time)
    in_a, after_a, in_b = sorted(named(spans, "select Order"), key=lambda s: s.start_time)
    (step_a,) = [s for s in named(spans, "step a") if s.attributes.get(attr.SPAN_SEGMENT) == 2]
    assert in_a.parent.span_id == step_a.context.span_id
    assert after_a.parent.span_id == second.context.span_id
    assert one(spans, "step b").parent.span_id == second.context.span_id
    assert in_b.parent.span_id == one(spans, "step b").context.span_id
    assert first.attributes[attr.SPAN_CONTINUED] is True
    assert one(spans, "mine").parent.span_id == second.context.span_id
