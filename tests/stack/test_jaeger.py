"""The demo app → the shipped collector config → Jaeger v2, read back through Jaeger's query API.

Every run the demo printed arrives with its attributes (``flow.id``, ``step.id``,
``coworker.run.id``, user, agent, conversation, break) in the trace the demo printed it under:
a run nests under its parent run, else under its flow, step or turn span (issue 13), and every
trace has one root.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from coworker import attributes as a
from tests.stack._stack import (
    OtlpSink,
    Procs,
    Stack,
    coworker_cli,
    otlp_attributes,
    python_env,
    start_collector,
    start_ingest,
    start_jaeger,
    wait_until,
)

pytestmark = pytest.mark.stack

_TRACE = re.compile(r"^trace ([0-9a-f]{32})")
_FLOW = re.compile(r"^\s*(?:.*: )?flow (\S+) (\S+)")
_STEP = re.compile(r"^\s+step (\S+)")
_RUN = re.compile(r"^\s+([✓✗]) (.+?)  run=([0-9a-f]+)(?:  step=(\S+))?")


def parse_demo_tree(output: str) -> list[dict[str, Any]]:
    """The runs the demo printed: trace id, flow type and id, step (``None`` where the demo
    prints none: a conversation's runs sit under their turn), name, run id prefix, ok."""
    runs: list[dict[str, Any]] = []
    trace: str | None = None
    flow: tuple[str, str] | None = None
    step: str | None = None
    for line in output.splitlines():
        if match := _TRACE.match(line):
            trace, flow, step = match.group(1), None, None
        elif match := _RUN.match(line):
            if flow is not None:
                runs.append(
                    {
                        "trace": trace,
                        "flow_type": flow[0],
                        "flow_id": flow[1],
                        "step": match.group(4) or step,  # a turn's run names its step
                        "name": match.group(2),
                        "run": match.group(3),
                        "ok": match.group(1) == "✓",
                    }
                )
        elif match := _STEP.match(line):
            step = match.group(1)
        elif match := _FLOW.match(line):
            flow, step = (match.group(1), match.group(2)), None
        elif line.startswith("audit trail"):
            break
    return runs


def _run_demo(collector_url: str, protocol: str, service: str, tmp_path: Path) -> str:
    env = python_env(
        OTEL_SERVICE_NAME=service,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector_url,
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
    )
    result = subprocess.run(
        [*coworker_cli(), "demo", "--audit-url", f"sqlite:///{tmp_path / 'demo-audit.db'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_demo_trace_tree_reaches_jaeger_through_the_collector(
    stack: Stack, procs: Procs, tmp_path: Path, protocol: str
) -> None:
    """Every run the demo prints is in Jaeger with its flow, step, run, user and agent."""
    jaeger = start_jaeger(procs, stack, tmp_path)
    tempo = OtlpSink()
    try:
        ingest = start_ingest(procs, f"sqlite:///{tmp_path / 'ingest.db'}")
        collector = start_collector(
            procs, stack, tmp_path, jaeger=jaeger.otlp_endpoint, tempo=tempo.endpoint,
            ingest=ingest.base_url,
        )  # fmt: skip
        service = f"coworker-demo-{secrets.token_hex(4)}"
        since = time.time()
        url = collector.otlp_http if protocol != "grpc" else collector.otlp_grpc
        output = _run_demo(url, protocol, service, tmp_path)
        printed = parse_demo_tree(output)
        assert len(printed) == 8, printed
        exported = re.search(r"^OTLP: (\d+) span\(s\) exported to ", output, re.MULTILINE)
        assert exported, output
        total = int(exported.group(1))  # the runs and their flow, step and turn spans

        everything = wait_until(
            lambda: (found := jaeger.find_spans(service, since)) and len(found) >= total
            and found,
            f"Jaeger has the demo's {total} spans",
            procs=procs,
            timeout=60,
        )  # fmt: skip
        assert len(everything) == total
        # The collector's traces pipeline fans out: the Tempo exporter got every span too.
        wait_until(lambda: tempo.count() >= total, "the Tempo stand-in has the spans")
    finally:
        # Processes first: a collector still exporting to a closed sink waits out its retries.
        procs.close()
        tempo.close()

    spans = [s for s in everything if a.RUN_ID in s["attrs"]]
    assert len(spans) == len(printed)
    by_span = {s["spanId"]: s for s in everything}
    by_run = {s["attrs"][a.RUN_ID][:8]: s for s in spans}
    assert set(by_run) == {r["run"] for r in printed}
    for run in printed:
        span = by_run[run["run"]]
        attrs = span["attrs"]
        assert span["resource"]["service.name"] == service
        assert span["name"] == run["name"]
        assert attrs[a.FLOW_TYPE] == run["flow_type"]
        assert attrs[a.FLOW_ID] == run["flow_id"]
        if run["step"] is not None:
            assert attrs[a.STEP_ID] == run["step"]
        assert span["traceId"] == run["trace"]
        failed = span.get("status", {}).get("code") in (2, "STATUS_CODE_ERROR")
        assert failed == (not run["ok"]), span
        # Nested runs are child spans of their parent run; the others of their flow, step or
        # turn span, in the same trace.
        parent = by_span[span["parentSpanId"]]
        parent_run = attrs.get(a.RUN_PARENT_ID)
        if parent_run is None:
            assert a.RUN_ID not in parent["attrs"], span
        else:
            assert parent["attrs"][a.RUN_ID] == parent_run
        assert span["traceId"] == parent["traceId"]
    roots = [s for s in everything if not s.get("parentSpanId")]
    assert len({s["traceId"] for s in roots}) == len(roots), "one root per trace"
    assert {s["traceId"] for s in roots} == {s["traceId"] for s in everything}

    # The workflow: one flow, three steps in order, the payment step failed once and retried.
    workflow = sorted(
        (s for s in spans if s["attrs"][a.FLOW_TYPE] == "workflow"),
        key=lambda s: int(s["startTimeUnixNano"]),
    )
    assert len({s["attrs"][a.FLOW_ID] for s in workflow}) == 1
    assert [s["attrs"][a.STEP_ID] for s in workflow] == [
        "validate", "validate", "payment", "payment", "ship",
    ]  # fmt: skip
    assert {s["attrs"][a.FLOW_DEFINITION_ID] for s in workflow} == {"order-processing"}
    assert {s["attrs"][a.USER_ID] for s in workflow} == {"clerk-17"}
    failed_payment = workflow[2]
    assert failed_payment["attrs"][a.ERROR_TYPE] == "coworker._demo.GatewayTimeout"
    assert failed_payment["attrs"][a.AUDITED] is True
    assert a.ERROR_TYPE not in workflow[3]["attrs"]

    # The conversation: three turns for one user and agent; the topic change broke the flow.
    chat = sorted(
        (s for s in spans if s["attrs"][a.FLOW_TYPE] == "ai-conversation"),
        key=lambda s: int(s["startTimeUnixNano"]),
    )
    assert [s["attrs"][a.STEP_ID] for s in chat] == [
        "turn-1-select-1", "turn-2-update-1", "turn-3-select-1",
    ]  # fmt: skip
    assert {s["attrs"][a.CONVERSATION_ID] for s in chat} == {"chat-42"}
    assert {(s["attrs"][a.USER_ID], s["attrs"][a.AGENT_ID]) for s in chat} == {
        ("user-456", "agent-789")
    }
    first, _second, third = chat
    assert Counter(s["attrs"][a.FLOW_ID] for s in chat)[first["attrs"][a.FLOW_ID]] == 2
    assert third["attrs"][a.FLOW_PREVIOUS_ID] == first["attrs"][a.FLOW_ID]
    assert third["attrs"][a.FLOW_BREAK_REASON] == "topic-change"

    # The trace shape (issue 13): the workflow is one trace, invoke_workflow → its three step
    # spans → the runs; each turn is a trace of its own, and the topic change is a span link
    # from the new flow's turn span to the old flow's, carrying the reason.
    flow_spans = [s for s in everything if a.SPAN_TYPE in s["attrs"]]
    assert len(flow_spans) == total - len(spans) == 8  # the workflow, 3 steps, 4 turn spans
    (root,) = [s for s in flow_spans if s["attrs"][a.SPAN_TYPE] == "flow"]
    assert root["name"] == "invoke_workflow order-processing" and not root.get("parentSpanId")
    assert root["attrs"][a.GEN_AI_WORKFLOW_NAME] == "order-processing"
    steps = sorted(
        (s for s in flow_spans if s["attrs"][a.SPAN_TYPE] == "step"),
        key=lambda s: int(s["startTimeUnixNano"]),
    )
    assert [s["name"] for s in steps] == ["step validate", "step payment", "step ship"]
    assert {s["parentSpanId"] for s in steps} == {root["spanId"]}
    assert {s["traceId"] for s in workflow} == {root["traceId"]}
    for run_span in workflow:
        assert (
            by_span[run_span["parentSpanId"]]["attrs"][a.STEP_ID] == (run_span["attrs"][a.STEP_ID])
        )
    turns = sorted(
        (s for s in flow_spans if s["attrs"][a.SPAN_TYPE] == "turn"),
        key=lambda s: int(s["startTimeUnixNano"]),
    )
    assert [s["name"] for s in turns] == ["invoke_agent billing-assistant"] * 4
    assert len({s["traceId"] for s in turns}) == 4
    old_turn, new_turn = turns[2], turns[3]
    (link,) = new_turn["links"]
    assert (link["traceId"], link["spanId"]) == (old_turn["traceId"], old_turn["spanId"])
    link_attrs = otlp_attributes(link.get("attributes", []))
    assert link_attrs[a.FLOW_BREAK_REASON] == "topic-change"
    assert link_attrs[a.FLOW_PREVIOUS_ID] == old_turn["attrs"][a.FLOW_ID]
    assert old_turn["attrs"][a.FLOW_NEXT_ID] == new_turn["attrs"][a.FLOW_ID]
