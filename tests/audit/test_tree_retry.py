"""`coworker audit tree` on a flow whose step failed once and was retried."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import coworker
from coworker.cli import main


class Timeout(Exception):
    pass


def test_retried_step_is_marked_recovered_not_failed(
    tmp_path: Path, spans: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed run followed by a successful retry shows 'failed 1x, then retried ok'."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    coworker.configure(audit=url, metrics=False)
    calls = {"n": 0}

    @coworker.run(operation="submit", doctype="Payment")
    def charge() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Timeout("gateway")

    @coworker.run(operation="create", doctype="Shipment")
    def ship(fail: bool) -> None:
        if fail:
            raise Timeout("carrier")

    wf = coworker.workflow("orders", steps=["payment", "ship"])
    with wf.start("flow-ok") as f:
        with f.step("payment"):
            for _ in range(2):
                try:
                    charge()
                    break
                except Timeout:
                    pass
    with wf.start("flow-bad") as f, f.step("ship"):
        with pytest.raises(Timeout):
            ship(True)
    coworker.shutdown()
    assert main(["audit", "tree", "flow-ok", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "ok after retries" in out.splitlines()[0]
    assert "step payment  ✗ failed 1x, then retried ok" in out
    assert main(["audit", "tree", "flow-bad", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "FAILED" in out.splitlines()[0] and "step ship  ✗ FAILED" in out
