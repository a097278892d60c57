"""`coworker demo` end to end, in a fresh process and working directory."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_setup import _Receiver, otlp_receiver  # noqa: F401 (fixture)


def _demo(cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "COWORKER_"))}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "coworker", "demo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_prints_tree_and_verified_audit_trail(tmp_path: Path) -> None:
    """The demo shows both flows, the retried step, the break, and an intact audit trail."""
    res = _demo(tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "flow workflow" in out and "definition=order-processing" in out
    assert "step payment  (failed once, retried)" in out
    assert "✗ submit Payment" in out and "✓ submit Payment" in out
    assert "← broke from" in out and "(topic-change)" in out
    assert "agent=billing-assistant(agent-789)" in out
    assert "verify: intact" in out
    assert (tmp_path / ".coworker" / "audit.db").exists()
    # A second run appends to the same chain, which still verifies.
    again = _demo(tmp_path)
    assert again.returncode == 0 and "verify: intact" in again.stdout
    assert "audit trail: 12 run records and 18 flow events" in again.stdout  # +2 usage a demo
    # The workflow's state, folded from its flow events (docs/flows.md).
    assert "completed at step ship, sealed=yes" in again.stdout
    assert "usage: 1840 input + 105 output tokens, cost 0." in out
    assert "tokens=1200+80" in out
    # One trace for the workflow (its whole tree under one "trace" header), one per turn.
    workflow = out.split("trace ")[1]
    assert "invoke_workflow order-processing: flow workflow" in workflow
    assert all(f"step {s}" in workflow for s in ("validate", "payment", "ship"))
    assert "create Shipment" in workflow and "invoke_agent" not in workflow
    assert out.count("invoke_agent billing-assistant: flow ai-conversation") == 4


def test_demo_order_workflow_is_one_trace_with_the_tree(spans: Any) -> None:
    """The demo's order workflow, in process with the SDK's in-memory exporter: one trace,
    invoke_workflow → steps → runs, the retried payment's two attempts under its step."""
    from coworker import _demo
    from tests.test_flow_spans import tree

    _demo._gateway_calls["n"] = 0
    _demo.process_order("ORD-1")
    assert tree(spans) == [
        (
            "invoke_workflow order-processing",
            [
                ("step validate", [("select Order", []), ("validate Order", [])]),
                ("step payment", [("submit Payment", []), ("submit Payment", [])]),
                ("step ship", [("create Shipment", [])]),
            ],
        )
    ]
    assert len({s.context.trace_id for s in spans.get_finished_spans()}) == 1


def test_demo_sends_otlp_when_endpoint_set(tmp_path: Path, otlp_receiver: str) -> None:  # noqa: F811
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, the demo's spans arrive over OTLP/HTTP."""
    res = _demo(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver})
    assert res.returncode == 0, res.stderr
    names = {name for name, _, _ in _Receiver.spans}
    assert {"submit Payment", "update Invoice", "select Task"} <= names
    assert {svc for _, _, svc in _Receiver.spans} == {"coworker-demo"}
    assert f"OTLP: {len(_Receiver.spans)} span(s) exported to {otlp_receiver}/v1/traces" in (
        res.stdout
    )


def test_demo_points_at_the_configured_trace_viewer(
    tmp_path: Path,
    otlp_receiver: str,  # noqa: F811
) -> None:
    """COWORKER_TRACE_VIEWER_URL: the demo prints it and the flow ids to search for; the
    captured call reaches OTLP as OpenInference input/output values."""
    res = _demo(
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver,
            "COWORKER_TRACE_VIEWER_URL": "http://127.0.0.1:16686/",
        },
    )
    assert res.returncode == 0, res.stderr
    assert "look at it: http://127.0.0.1:16686\n" in res.stdout
    flow_ids = {attrs["flow.id"] for _, attrs, _ in _Receiver.spans}
    assert len(flow_ids) == 3
    for flow_id in flow_ids:
        assert f"search flow.id = {flow_id}" in res.stdout
    (found,) = [attrs for name, attrs, _ in _Receiver.spans if name == "select Invoice"]
    assert found["input.value"] == '{"customer":"ACME"}'
    assert found["input.mime_type"] == "application/json"
    assert found["output.value"] == '["INV-ACME-1","INV-ACME-2"]'


def test_demo_without_otlp_says_how_to_see_it_in_phoenix(tmp_path: Path) -> None:
    """No endpoint: one line on running Phoenix locally and pointing the demo at it."""
    res = _demo(tmp_path)
    assert res.returncode == 0, res.stderr
    assert "`phoenix serve`" in res.stdout
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:6006 coworker demo" in res.stdout


@pytest.mark.parametrize(
    ("env", "viewer"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:6006"}, "http://127.0.0.1:6006"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://phoenix.example:6006/v1/traces"},
            "https://phoenix.example:6006",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://host:notaport"}, None),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:6006",
                "COWORKER_TRACE_VIEWER_URL": "http://grafana:3000/explore",
            },
            "http://grafana:3000/explore",
        ),
    ],
)
def test_the_trace_viewer_is_the_setting_or_a_phoenix_endpoint(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], viewer: str | None
) -> None:
    """The explicit setting wins; else an OTLP endpoint on Phoenix's port 6006 is Phoenix."""
    from coworker._demo import trace_viewer

    for key in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "COWORKER_TRACE_VIEWER_URL",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert trace_viewer() == viewer


def test_demo_with_only_the_traces_endpoint_set_sends_and_says_so(
    tmp_path: Path,
    otlp_receiver: str,  # noqa: F811
) -> None:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT alone: the spans are sent and the count is printed."""
    endpoint = f"{otlp_receiver}/v1/traces"
    res = _demo(tmp_path, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint})
    assert res.returncode == 0, res.stderr
    assert _Receiver.spans
    assert f"OTLP: {len(_Receiver.spans)} span(s) exported to {endpoint}" in res.stdout


def test_demo_says_the_export_failed_when_the_port_refuses(tmp_path: Path) -> None:
    """Connection refused: no "sent" claim; the failed count and the cause; exit 1."""
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        res = _demo(
            tmp_path,
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
            },
        )
    assert res.returncode == 1
    assert "sent over OTLP" not in res.stdout and "span(s) exported to" not in res.stdout
    assert "OTLP: FAILED to export 16 of 16 span(s)" in res.stdout
    assert "Connection refused" in res.stdout
    assert "verify: intact" in res.stdout  # the audit trail is not affected


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    """An OTLP endpoint that wants a token the demo does not have."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(401, "Unauthorized")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def unauthorized_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_demo_says_the_export_failed_on_401(tmp_path: Path, unauthorized_endpoint: str) -> None:
    """A real HTTP server answering 401: the demo reports the failure and the status."""
    res = _demo(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": unauthorized_endpoint})
    assert res.returncode == 1
    assert "OTLP: FAILED to export 16 of 16 span(s)" in res.stdout
    assert "401" in res.stdout


def test_demo_escapes_control_characters_in_what_it_prints(tmp_path: Path) -> None:
    """A store path with an ANSI escape and a newline prints escaped, on its line."""
    res = _demo(tmp_path, {"COWORKER_AUDIT_URL": f"sqlite:///{tmp_path}/a\x1b[2J.db"})
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout
    assert "a\\x1b[2J.db" in res.stdout
