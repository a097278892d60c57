"""`coworker demo` end to end, in a fresh process and working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    assert "audit trail: 8 records" in again.stdout


def test_demo_sends_otlp_when_endpoint_set(tmp_path: Path, otlp_receiver: str) -> None:  # noqa: F811
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, the demo's spans arrive over OTLP/HTTP."""
    res = _demo(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver})
    assert res.returncode == 0, res.stderr
    names = {name for name, _, _ in _Receiver.spans}
    assert {"submit Payment", "update Invoice", "select Task"} <= names
    assert {svc for _, _, svc in _Receiver.spans} == {"coworker-demo"}
