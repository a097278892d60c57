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
    assert (a[attr.FLOW_TYPE], a[attr.FLOW_ID]) == ("workflow", f.id)
    assert a[attr.FLOW_DEFINITION_ID] == "order-processing"
    assert a[attr.FLOW_METADATA_PREFIX + "channel"] == "web"
    assert (a[attr.USER_ID], a[attr.SESSION_ID]) == ("clerk-17", "s-1")
    assert attr.AUDIT not in a and attr.RUN_ID not in a
    step = one(spans, "step payment")
    sa = step.attributes
    assert (sa[attr.STEP_ID], sa[attr.FLOW_ID], sa[attr.STEP_ATTEMPT]) == ("payment", f.id, 1)
    assert sa[attr.OPENINFERENCE_SPAN_KIND] == "CHAIN"
    assert sa[attr.STEP_OUTCOME] == "completed"
    failed, succeeded = sorted(named(spans, "submit Payment"), key=lambda s: s.start_time)
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes[attr.ERROR_TYPE].endswith("GatewayTimeout")
    assert succeeded.status.status_code is StatusCode.UNSET
    for run in named(spans, "submit Payment"):
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
