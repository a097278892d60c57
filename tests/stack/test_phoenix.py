"""Phoenix as a second real OTLP receiver: the demo over OTLP/HTTP and OTLP/gRPC, read back
through Phoenix's REST API (``GET /v1/projects/{project}/spans/otlpv1``).

Phoenix's gRPC port binds every interface, so the whole exchange runs in a network namespace
with only a loopback interface (tests/stack/phoenix_check.py explains).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

from coworker import attributes as a
from tests.stack._stack import ROOT, Stack, python_env, unavailable
from tests.stack.test_jaeger import parse_demo_tree

pytestmark = pytest.mark.stack


def _attributes(span: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for kv in span.get("attributes") or []:
        value = {k: v for k, v in kv["value"].items() if v is not None}
        out[kv["key"]] = next(iter(value.values())) if value else None
    return out


@pytest.fixture(scope="module")
def phoenix_result(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What phoenix_check.py read back from Phoenix, per protocol."""
    phoenix = stack.binary("PHOENIX_BIN")
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        unavailable("a network namespace for Phoenix needs root, unshare and ip")
    workdir = tmp_path_factory.mktemp("phoenix")
    inner = (
        f"ip link set lo up && exec {sys.executable} -m tests.stack.phoenix_check "
        f"--phoenix {phoenix} --workdir {workdir}"
    )
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", inner],
        env=python_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    log_file = workdir / "phoenix.log"
    log = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n--- phoenix.log\n{log}"
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_phoenix_has_every_demo_run_with_its_attributes(
    phoenix_result: dict[str, Any], protocol: str
) -> None:
    """Each run the demo printed is a Phoenix span with its flow, step, user and agent."""
    printed = parse_demo_tree(phoenix_result[protocol]["printed"])
    spans = [s for s in phoenix_result[protocol]["spans"] if a.RUN_ID in _attributes(s)]
    assert len(printed) == 8
    assert len(spans) == len(printed)
    by_run = {_attributes(s)[a.RUN_ID][:8]: s for s in spans}
    assert set(by_run) == {r["run"] for r in printed}
    for run in printed:
        span = by_run[run["run"]]
        attrs = _attributes(span)
        assert span["name"] == run["name"]
        assert span["trace_id"] == run["trace"]
        assert attrs[a.FLOW_TYPE] == run["flow_type"]
        assert attrs[a.FLOW_ID] == run["flow_id"]
        if run["step"] is not None:
            assert attrs[a.STEP_ID] == run["step"]
        assert (a.ERROR_TYPE in attrs) == (not run["ok"])
    chat = [_attributes(s) for s in spans if _attributes(s)[a.FLOW_TYPE] == "ai-conversation"]
    assert {(c[a.USER_ID], c[a.AGENT_ID], c[a.CONVERSATION_ID]) for c in chat} == {
        ("user-456", "agent-789", "chat-42")
    }
    audit = {s["name"] for s in spans if _attributes(s)[a.AUDITED] is True}
    assert audit == {"submit Payment", "create Shipment", "update Invoice"}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_phoenix_files_runs_by_openinference_kind_with_their_input_and_output(
    phoenix_result: dict[str, Any], protocol: str
) -> None:
    """Read back through Phoenix's own span model: runs an agent performs are TOOL spans,
    the workflow's runs CHAIN; the captured call shows its JSON input and output; the audit
    flag and its category both survive Phoenix's nested attribute store."""
    runs = [s for s in phoenix_result[protocol]["phoenix_spans"] if a.RUN_ID in s["attributes"]]
    assert len(runs) == 8
    for span in runs:
        attrs = span["attributes"]
        agent = a.AGENT_ID in attrs
        assert span["span_kind"] == ("TOOL" if agent else "CHAIN"), span["name"]
        assert (attrs.get(a.GEN_AI_OPERATION_NAME) == "execute_tool") == agent
        if agent:
            assert attrs[a.GEN_AI_TOOL_NAME] == span["name"]
    (captured,) = [s["attributes"] for s in runs if s["name"] == "select Invoice"]
    assert captured[a.INPUT_VALUE] == '{"customer":"ACME"}'
    assert captured[a.INPUT_MIME_TYPE] == captured[a.OUTPUT_MIME_TYPE] == "application/json"
    assert json.loads(captured[a.OUTPUT_VALUE]) == ["INV-ACME-1", "INV-ACME-2"]
    audited = [s for s in runs if s["attributes"].get(a.AUDITED) is True]
    assert {s["name"] for s in audited} == {"submit Payment", "create Shipment", "update Invoice"}
    assert {s["attributes"][a.AUDIT_CATEGORY] for s in audited} == {"state-change"}


def test_phoenix_groups_the_conversation_into_its_session(phoenix_result: dict[str, Any]) -> None:
    """Phoenix's Sessions view has the demo's session with every trace of the conversation
    (both demo runs use session "s-1", and a session id is one session in Phoenix)."""
    chat_traces = {
        s["context"]["trace_id"]
        for protocol in ("http", "grpc")
        for s in phoenix_result[protocol]["phoenix_spans"]
        if s["attributes"].get(a.SESSION_ID) == "s-1"
    }
    assert chat_traces
    (session,) = [s for s in phoenix_result["sessions"] if s["session_id"] == "s-1"]
    assert {t["trace_id"] for t in session["traces"]} == chat_traces


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_documented_phoenix_filter_finds_one_flow(
    phoenix_result: dict[str, Any], protocol: str
) -> None:
    """docs/observability.md's span filter (attributes['flow']['id'] == ...) run by Phoenix's
    query DSL returns the workflow's runs and nothing of the conversation."""
    result = phoenix_result[protocol]
    workflow, filtered = result["workflow"], result["filtered"]
    for span in result["spans"]:
        attrs = _attributes(span)
        found = span["span_id"] in filtered
        assert found == (attrs.get(a.FLOW_ID) == workflow), span["name"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_phoenix_shows_the_workflow_as_one_trace_flow_step_run(
    phoenix_result: dict[str, Any], protocol: str
) -> None:
    """The order workflow is one trace in Phoenix: an invoke_workflow CHAIN root, a CHAIN
    step span per step in order, each run under its step, the retried payment's two attempts
    under one step span with the failed one marked ERROR."""
    spans = phoenix_result[protocol]["phoenix_spans"]
    workflow_id = phoenix_result[protocol]["workflow"]
    mine = [s for s in spans if s["attributes"].get(a.FLOW_ID) == workflow_id]
    (trace_id,) = {s["context"]["trace_id"] for s in mine}
    in_trace = [s for s in spans if s["context"]["trace_id"] == trace_id]
    assert len(in_trace) == len(mine) == 1 + 3 + 5, "the trace is the workflow and only it"
    by_id = {s["context"]["span_id"]: s for s in in_trace}
    (root,) = [s for s in in_trace if s["parent_id"] is None]
    assert root["name"] == "invoke_workflow order-processing"
    assert root["span_kind"] == "CHAIN"
    assert root["attributes"][a.GEN_AI_OPERATION_NAME] == "invoke_workflow"
    steps = sorted(
        (s for s in in_trace if a.RUN_ID not in s["attributes"] and s is not root),
        key=lambda s: s["start_time"],
    )
    assert [s["name"] for s in steps] == ["step validate", "step payment", "step ship"]
    assert all(s["parent_id"] == root["context"]["span_id"] for s in steps)
    assert {s["span_kind"] for s in steps} == {"CHAIN"}
    runs = sorted(
        (s for s in in_trace if a.RUN_ID in s["attributes"]), key=lambda s: s["start_time"]
    )
    tree = [(by_id[r["parent_id"]]["name"], r["name"], r["status_code"]) for r in runs]
    assert tree == [
        ("step validate", "select Order", "UNSET"),
        ("step validate", "validate Order", "UNSET"),
        ("step payment", "submit Payment", "ERROR"),
        ("step payment", "submit Payment", "UNSET"),
        ("step ship", "create Shipment", "UNSET"),
    ]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_phoenix_shows_each_turn_as_an_agent_trace_of_tool_runs(
    phoenix_result: dict[str, Any], protocol: str
) -> None:
    """Each conversation turn is its own trace: an invoke_agent AGENT root with the TOOL runs
    the agent performed under it, all of the conversation's session."""
    spans = phoenix_result[protocol]["phoenix_spans"]
    by_id = {s["context"]["span_id"]: s for s in spans}
    tools = [s for s in spans if s["span_kind"] == "TOOL"]
    assert sorted(s["name"] for s in tools) == ["select Invoice", "select Task", "update Invoice"]
    for tool in tools:
        turn = by_id[tool["parent_id"]]
        assert turn["span_kind"] == "AGENT" and turn["parent_id"] is None
        assert turn["name"] == "invoke_agent billing-assistant"
        assert turn["context"]["trace_id"] == tool["context"]["trace_id"]
        assert tool["attributes"][a.SESSION_ID] == "s-1"
    assert len({s["context"]["trace_id"] for s in tools}) == 3


def test_phoenix_keeps_the_two_protocols_apart(phoenix_result: dict[str, Any]) -> None:
    """The HTTP and gRPC runs landed in their own projects (no span in both)."""
    ids = [{s["span_id"] for s in phoenix_result[p]["spans"]} for p in ("http", "grpc")]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
