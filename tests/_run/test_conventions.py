"""Run spans follow the OTel GenAI and OpenInference conventions (docs/observability.md).

A run an agent performs is a tool execution: ``gen_ai.operation.name = execute_tool``,
``gen_ai.tool.name`` and OpenInference kind ``TOOL``, under its own span name; other runs are
``CHAIN``. With capture on, the captured input/output also sit under OpenInference's
``input.value`` / ``output.value`` with their mime types, redacted and dropped with coworker's
own keys on export.
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import coworker
from coworker import attributes as attr
from coworker._capture import TRUNCATED
from tests.conftest import by_name


@coworker.run(operation="update", doctype="Invoice", capture_input=True, capture_output=True)
def set_due_date(invoice: str, due: str) -> dict[str, str]:
    return {"invoice": invoice, "due": due}


@coworker.run(operation="select", doctype="Invoice")
def find_invoices(customer: str) -> list[str]:
    return [customer]


@coworker.run(name="ask model", attributes={attr.GEN_AI_OPERATION_NAME: "chat"})
def ask_model() -> None:
    return None


def test_a_run_an_agent_performs_is_a_tool_execution_under_its_own_name(spans: Any) -> None:
    """execute_tool, the tool name and kind TOOL; the span keeps the name users filter on;
    user, session, agent and conversation are on it."""
    chat = coworker.conversation("chat-1")
    with coworker.acting_as("alice", "agent-7", agent_name="billing", session="s-9"):
        with chat.turn():
            find_invoices("ACME")
    span = by_name(spans)["select Invoice"]
    a = span.attributes
    assert a[attr.GEN_AI_OPERATION_NAME] == attr.GEN_AI_OP_EXECUTE_TOOL
    assert a[attr.GEN_AI_TOOL_NAME] == "select Invoice"
    assert a[attr.OPENINFERENCE_SPAN_KIND] == attr.OPENINFERENCE_TOOL
    assert (a[attr.USER_ID], a[attr.SESSION_ID]) == ("alice", "s-9")
    assert (a[attr.AGENT_ID], a[attr.AGENT_NAME]) == ("agent-7", "billing")
    assert a[attr.CONVERSATION_ID] == "chat-1"


def test_a_run_without_an_agent_is_a_chain(spans: Any) -> None:
    """No agent acts: OpenInference CHAIN, and no GenAI tool attributes."""
    with coworker.acting_as("alice"):
        find_invoices("ACME")
    find_invoices("anonymous")
    for span in spans.get_finished_spans():
        assert span.attributes[attr.OPENINFERENCE_SPAN_KIND] == attr.OPENINFERENCE_CHAIN
        assert attr.GEN_AI_OPERATION_NAME not in span.attributes


def test_the_apps_own_gen_ai_operation_decides_the_kind(spans: Any) -> None:
    """A run the app marks as a model call is LLM, even when an agent acts."""
    with coworker.acting_as("alice", "agent-7"):
        ask_model()
    a = by_name(spans)["ask model"].attributes
    assert a[attr.GEN_AI_OPERATION_NAME] == "chat"
    assert a[attr.OPENINFERENCE_SPAN_KIND] == attr.OPENINFERENCE_LLM
    assert attr.GEN_AI_TOOL_NAME not in a


def test_captured_input_and_output_are_openinference_values(spans: Any) -> None:
    """input.value/output.value are the capture (JSON), with application/json."""
    set_due_date("INV-1", "2026-12-24")
    a = by_name(spans)["update Invoice"].attributes
    assert a[attr.INPUT_VALUE] == a[attr.INPUT]
    assert json.loads(a[attr.INPUT_VALUE]) == {"invoice": "INV-1", "due": "2026-12-24"}
    assert a[attr.OUTPUT_VALUE] == a[attr.OUTPUT]
    assert a[attr.INPUT_MIME_TYPE] == a[attr.OUTPUT_MIME_TYPE] == attr.MIME_JSON


def test_a_capture_cut_by_the_size_limit_is_plain_text(spans: Any) -> None:
    """Truncated JSON is no longer JSON: its mime type says text/plain."""
    coworker.configure(capture_limit=40, otlp=False, audit=None)
    set_due_date("INV-" + "9" * 100, "2026-12-24")
    a = by_name(spans)["update Invoice"].attributes
    assert a[attr.INPUT_VALUE].endswith(TRUNCATED) and len(a[attr.INPUT_VALUE]) <= 40
    assert a[attr.INPUT_MIME_TYPE] == attr.MIME_TEXT
    assert a[attr.OUTPUT_MIME_TYPE] == attr.MIME_TEXT


def test_exported_values_are_redacted_like_coworkers_own_keys() -> None:
    """On export the OpenInference copies are redacted exactly like coworker.input/output."""
    exporter = InMemorySpanExporter()
    coworker.configure(exporter=exporter, audit=None, otlp=False)
    set_due_date("mail alice@example.com", "2026-12-24")
    coworker.shutdown()
    (span,) = exporter.get_finished_spans()
    a = span.attributes
    assert "alice@example.com" not in a[attr.INPUT_VALUE]
    assert "[REDACTED]" in a[attr.INPUT_VALUE]
    assert a[attr.INPUT_VALUE] == a[attr.INPUT]
    assert a[attr.OUTPUT_VALUE] == a[attr.OUTPUT]


def test_trace_payloads_none_drops_the_openinference_values_too() -> None:
    """trace_payloads="none": no value nor mime type of the capture reaches the exporter."""
    exporter = InMemorySpanExporter()
    coworker.configure(exporter=exporter, audit=None, otlp=False, trace_payloads="none")
    set_due_date("INV-1", "2026-12-24")
    coworker.shutdown()
    (span,) = exporter.get_finished_spans()
    for key in (
        attr.INPUT,
        attr.OUTPUT,
        attr.INPUT_VALUE,
        attr.OUTPUT_VALUE,
        attr.INPUT_MIME_TYPE,
        attr.OUTPUT_MIME_TYPE,
    ):
        assert key not in span.attributes
