"""Run Phoenix, send it the demo over OTLP/HTTP and OTLP/gRPC, read the spans back (stack tests).

Phoenix's gRPC server binds every interface (``[::]``, not configurable), and test servers
here may listen on loopback only. So tests/stack/test_phoenix.py runs this script in a network
namespace of its own that has nothing but a loopback interface (``unshare --net``); Phoenix,
the demo and the reads all happen inside it, and the result is printed as one JSON document:

    {"http": {"printed": "<demo output>", "spans": [<Phoenix OTLP spans>],
              "phoenix_spans": [<Phoenix's own span model>]}, "grpc": {...}, "sessions": [...]}

    python -m tests.stack.phoenix_check --phoenix PATH --workdir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

EXPORTED = re.compile(r"^OTLP: (\d+) span\(s\) exported to ", re.MULTILINE)
"""The demo's own count of the spans the OTLP endpoint took (runs, flow, step, turn spans)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(condition: Any, what: str, timeout: float, proc: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"phoenix exited while waiting for: {what}")
        try:
            if result := condition():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for: {what}")


def _otlp_attributes(span: dict[str, Any]) -> dict[str, Any]:
    """An OTLP JSON span's attributes as a plain dict."""
    out = {}
    for kv in span.get("attributes") or []:
        value = {k: v for k, v in kv["value"].items() if v is not None}
        out[kv["key"]] = next(iter(value.values())) if value else None
    return out


def _spans(base: str, project: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{base}/v1/projects/{project}/spans/otlpv1", params={"limit": 1000}, timeout=10
    )
    if response.status_code == 404:  # the project exists once its first span arrived
        return []
    response.raise_for_status()
    return list(response.json()["data"])


def _phoenix_spans(base: str, project: str) -> list[dict[str, Any]]:
    """Phoenix's own reading of the spans (``GET /v1/projects/{project}/spans``): the span kind
    it parsed from ``openinference.span.kind``, attributes flattened from its nested store."""
    response = httpx.get(f"{base}/v1/projects/{project}/spans", params={"limit": 1000}, timeout=10)
    response.raise_for_status()
    return list(response.json()["data"])


FLOW_FILTER = "attributes['flow']['id'] == '{flow_id}'"
"""Phoenix's span filter for one flow, as docs/observability.md gives it: Phoenix stores
attributes nested by their dots, so the path is ``['flow']['id']``."""


def _filtered(base: str, project: str, flow_id: str) -> str:
    """The raw answer of Phoenix's query DSL (``POST /v1/spans``) for :data:`FLOW_FILTER`."""
    condition = FLOW_FILTER.format(flow_id=flow_id)
    response = httpx.post(
        f"{base}/v1/spans",
        params={"project_name": project},
        json={"queries": [{"filter": {"condition": condition}}], "limit": 1000},
        headers={"Accept": "application/json"},
        timeout=30,
    )
    response.raise_for_status()
    return response.text


def _sessions(base: str, project: str) -> list[dict[str, Any]]:
    """The sessions Phoenix built from ``session.id`` (``GET /v1/projects/{project}/sessions``)."""
    response = httpx.get(f"{base}/v1/projects/{project}/sessions", timeout=10)
    response.raise_for_status()
    return list(response.json()["data"])


def main(argv: list[str] | None = None) -> int:
    """Run the check; print the JSON result; 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phoenix", required=True, help="the phoenix executable")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    http_port, grpc_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(http_port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_WORKING_DIR": str(workdir / "phoenix"),
        "PHOENIX_TELEMETRY_ENABLED": "false",
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
    }
    with (workdir / "phoenix.log").open("ab") as log:
        phoenix = subprocess.Popen(
            [args.phoenix, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{http_port}"
    result: dict[str, Any] = {}
    try:
        _wait(lambda: httpx.get(f"{base}/healthz", timeout=5).is_success, "/healthz", 180, phoenix)
        for protocol, endpoint in (
            ("http/protobuf", base),
            ("grpc", f"http://127.0.0.1:{grpc_port}"),
        ):
            name = "grpc" if protocol == "grpc" else "http"
            project = f"coworker-demo-{name}"
            demo_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
            demo_env.update(
                OTEL_SERVICE_NAME=f"coworker-demo-{name}",
                OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
                # Phoenix files spans by project: this resource attribute names it.
                OTEL_RESOURCE_ATTRIBUTES=f"openinference.project.name={project}",
            )
            demo = subprocess.run(
                [sys.executable, "-m", "coworker", "demo", "--no-audit"],
                env=demo_env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if demo.returncode != 0:
                raise SystemExit(f"coworker demo failed: {demo.stdout}{demo.stderr}")
            exported = EXPORTED.search(demo.stdout)
            if exported is None:
                raise SystemExit(f"coworker demo did not say what it exported: {demo.stdout}")
            total = int(exported.group(1))
            spans = _wait(
                lambda p=project, n=total: len(found := _spans(base, p)) >= n and found,
                f"{total} spans in Phoenix project {project}",
                120,
                phoenix,
            )
            workflow = next(
                a["flow.id"] for a in map(_otlp_attributes, spans) if a["flow.type"] == "workflow"
            )
            result[name] = {
                "printed": demo.stdout,
                "spans": spans,
                "workflow": workflow,
                "filtered": _filtered(base, project, workflow),
                "phoenix_spans": _wait(
                    lambda p=project, n=len(spans): (
                        len(found := _phoenix_spans(base, p)) >= n and found
                    ),
                    f"Phoenix's own view of the spans of {project}",
                    60,
                    phoenix,
                ),
            }
        # A session id is Phoenix-wide: the demo's session ("s-1") belongs to the project
        # that sent it first (http), and the grpc run's traces join it there. Phoenix files
        # sessions as it inserts spans: wait for it.
        result["sessions"] = _wait(
            lambda: _sessions(base, "coworker-demo-http"), "the demo's session", 60, phoenix
        )
    finally:
        phoenix.terminate()
        try:
            phoenix.wait(timeout=30)
        except subprocess.TimeoutExpired:
            phoenix.kill()
            phoenix.wait()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
