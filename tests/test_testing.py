"""coworker.testing: the capcoworker pytest plugin, run in real pytest sessions (pytester)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]

_USER_TESTS = """
import json, os
import coworker

@coworker.run(operation="select", doctype="Invoice")
def read(invoice_id):
    return invoice_id

@coworker.run(operation="update", doctype="Invoice")
def update(invoice_id):
    read(invoice_id)

def test_captures_tree_records_and_metrics(capcoworker):
    with coworker.acting_as("u1"), coworker.flow("api-request"):
        update("INV-1")
    assert capcoworker.tree() == [
        ("flow api-request", [("update Invoice", [("select Invoice", [])])])
    ]
    (record,) = capcoworker.audit_records()
    assert (record["user_id"], record["operation"], record["outcome"]) == ("u1", "update", "ok")
    runs = capcoworker.metrics()["coworker.runs"]
    assert sum(value for _, value in runs) == 2
    with open(os.environ["CAPTURE_OUT"], "w") as out:
        json.dump(
            {
                "spans": [
                    [s.name, s.context.span_id, s.context.trace_id, s.start_time, s.end_time,
                     dict(s.attributes)]
                    for s in capcoworker.spans()
                ],
                "records": capcoworker.audit_records(),
            },
            out,
        )

def test_the_next_test_starts_empty(capcoworker):
    assert capcoworker.spans() == []
    assert capcoworker.audit_records() == []
    assert coworker.current_flow() is None

def test_configure_keeps_the_capture(capcoworker):
    capcoworker.configure(policy={"roles": {"r": {"Invoice": ["select"]}},
                                  "users": {"u1": ["r"]}})
    with coworker.acting_as("u1"):
        try:
            update("INV-2")
        except coworker.PermissionDenied:
            pass
    (record,) = capcoworker.audit_records()
    assert record["category"] == "authorization-failure"
"""


def _run(pytester: pytest.Pytester, out: Path) -> Any:
    pytester.makepyfile(test_user=_USER_TESTS)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--basetemp={out}.tmp")


def test_capcoworker_fixture_in_a_user_test_session(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's tests get spans as a tree, audit records from a real pipeline, run metrics,
    a policy through capcoworker.configure, and a clean slate in every test."""
    monkeypatch.setenv("CAPTURE_OUT", str(tmp_path / "one.json"))
    result = _run(pytester, tmp_path / "one")
    result.assert_outcomes(passed=3)


def test_capcoworker_ids_and_clock_repeat_across_sessions(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sessions of the same test produce the same span ids, trace ids, timestamps, run
    and flow ids, and byte-identical audit records."""
    captured = []
    for name in ("first", "second"):
        monkeypatch.setenv("CAPTURE_OUT", str(tmp_path / f"{name}.json"))
        _run(pytester, tmp_path / name).assert_outcomes(passed=3)
        captured.append(json.loads((tmp_path / f"{name}.json").read_text()))
    assert captured[0] == captured[1]
    assert captured[0]["spans"][0][3] >= 1_700_000_000_000_000_000  # the capture's clock
