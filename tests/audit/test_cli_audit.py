"""``coworker audit verify | query | tree | correct``."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import coworker
from coworker import attributes as a
from coworker.audit.correction import correct
from coworker.audit.store_sqlite import SQLiteStore
from coworker.cli import main
from coworker.exceptions import ConfigError
from tests.audit.conftest import fill, make_entries, raw


@pytest.fixture
def url(db_path: Path) -> str:
    """A store with records of two users, two doctypes and one failure, in flow-1."""
    store = SQLiteStore(db_path)
    fill(store, 3)
    for fields, payload in make_entries(
        1,
        start=10,
        **{a.USER_ID: "bob", a.DOCTYPE: "Payment", a.RUN_PARENT_ID: "run-1",
           a.ERROR_TYPE: "coworker.exceptions.PermissionDenied",
           a.AUDIT_CATEGORY: a.CATEGORY_AUTHORIZATION_FAILURE},
    ):  # fmt: skip
        store.append([fields], [payload])
    store.close()
    return f"sqlite:///{db_path}"


def test_verify_ok_prints_head(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """verify exits 0 and prints the head."""
    assert main(["audit", "verify", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "OK  4 records intact" in out
    assert "head  4:" in out


def test_verify_names_tampering(
    url: str, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify exits 1 naming the first bad seq and what happened."""
    raw(db_path).execute("DELETE FROM audit_records WHERE seq = 2")
    assert main(["audit", "verify", "--url", url]) == 1
    out = capsys.readouterr().out
    assert "FAIL  seq 2: deleted" in out


def test_verify_expected_head_and_json(
    url: str, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--expected-head catches a cut-off tail; --json prints the report."""
    main(["audit", "verify", "--url", url, "--json"])
    report = json.loads(capsys.readouterr().out)
    head = f"{report['head']['seq']}:{report['head']['hash']}"
    raw(db_path).execute("DELETE FROM audit_records WHERE seq = 4")
    assert main(["audit", "verify", "--url", url, "--expected-head", head, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["bad_seq"], report["kind"]) == (False, 4, "truncated")
    assert main(["audit", "verify", "--url", url, "--expected-head", "nonsense"]) == 2


def test_verify_progress_on_stderr(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--progress writes progress to stderr, never stdout."""
    assert main(["audit", "verify", "--url", url, "--progress"]) == 0
    captured = capsys.readouterr()
    assert "verified 4/4" in captured.err
    assert "verified" not in captured.out


def test_verify_missing_store_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store that cannot be opened is exit 2 with a message, and is not created."""
    assert main(["audit", "verify", "--url", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "cannot open" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_verify_uses_env_url(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --url, COWORKER_AUDIT_URL is used."""
    monkeypatch.setenv("COWORKER_AUDIT_URL", url)
    assert main(["audit", "verify"]) == 0
    assert "4 records intact" in capsys.readouterr().out


def test_query_table_and_filters(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """query prints an aligned table, filtered."""
    assert main(["audit", "query", "--url", url, "--user", "bob"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "SEQ", "TIME", "CATEGORY", "OPERATION", "DOCTYPE", "OUTCOME", "USER", "AGENT", "FLOW",
        "STEP", "RUN", "PAYLOAD",
    ]  # fmt: skip
    assert len(lines) == 2 and "Payment" in lines[1] and "bob" in lines[1]
    assert lines[0].index("DOCTYPE") == lines[1].index("Payment")
    main(["audit", "query", "--url", url, "--category", "state-change", "--doctype", "Invoice"])
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_query_json_lines(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints one object per record."""
    assert main(["audit", "query", "--url", url, "--json", "--agent", "agent-7"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["status"] == "coworker.exceptions.PermissionDenied"


def test_query_time_window(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--since/--until take ISO times and durations."""
    main(["audit", "query", "--url", url, "--json", "--since", "1h"])
    assert len(capsys.readouterr().out.splitlines()) == 4
    main(["audit", "query", "--url", url, "--json", "--until", "2000-01-01"])
    assert capsys.readouterr().out == ""
    assert main(["audit", "query", "--url", url, "--since", "yesterday-ish"]) == 2


def test_tree_marks_failure(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """tree shows flow → step → run → child run with the failing step and run marked."""
    assert main(["audit", "tree", "flow-1", "--url", url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("flow flow-1 (workflow)") and "FAILED" in lines[0]
    assert any("step approve  ✗ FAILED" in line for line in lines)
    assert "✓ run run-0 " in out
    failing = next(line for line in lines if "run-10" in line)
    assert "✗" in failing and "failed here" in failing
    parent = next(i for i, line in enumerate(lines) if "run run-1 " in line)
    child = lines.index(failing)
    assert child == parent + 1 and len(failing) - len(failing.lstrip("│ └├─")) > 3
    assert main(["audit", "tree", "no-such-flow", "--url", url]) == 1


def test_correct_command_and_api(
    url: str, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A correction is a new record pointing at the original; the original stays."""
    original = (
        sqlite3.connect(db_path)
        .execute("SELECT body FROM audit_records WHERE seq = 2")
        .fetchone()[0]
    )
    assert main(["audit", "correct", "2", "--reason", "wrong doctype", "--set",
                 "doctype=Payment", "--url", url]) == 0  # fmt: skip
    assert "correction #5 appended for #2" in capsys.readouterr().out
    store = SQLiteStore(db_path)
    records = list(store.iter_from(1))
    assert records[1].body == original
    fields = records[4].fields()
    assert (fields["kind"], fields["corrects"], fields["reason"]) == (
        "correction",
        2,
        "wrong doctype",
    )
    assert fields["fields"] == {"doctype": "Payment"}
    rec = correct(3, "user was bob", store=store, by="auditor", user_id="bob")
    assert rec.seq == 6 and rec.fields()["user_id"] == "alice"  # the original's user stays
    assert rec.fields()["corrected_by"] == "auditor"
    with pytest.raises(ConfigError, match="colour"):
        correct(3, "x", store=store, colour="red")
    with pytest.raises(ConfigError, match="reason"):
        correct(3, " ", store=store)
    with pytest.raises(LookupError):
        correct(99, "missing", store=store)
    store.close()
    main(["audit", "query", "--url", url, "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[4]["status"] == "correction of #2"
    assert main(["audit", "verify", "--url", url]) == 0


def test_correct_uses_configured_store(db_path: Path) -> None:
    """coworker.audit.correct without store= uses the configure()d pipeline's store."""
    from coworker.audit import correct as public_correct

    with pytest.raises(ConfigError, match="no audit store"):
        public_correct(1, "nothing configured")
    coworker.configure(audit=f"sqlite:///{db_path}")

    @coworker.run(operation="update", doctype="Invoice")
    def update() -> None:
        pass

    update()
    rec = public_correct(1, "amount typo", doctype="Payment")
    assert rec.seq == 2 and rec.fields()["corrects"] == 1


def test_in_doubt_shown_by_verify_and_query(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An intent without an outcome is listed by verify and shown as in-doubt by query."""
    from coworker.audit.pipeline import build_pipeline
    from tests.audit.conftest import SpanFactory

    pipeline = build_pipeline(f"sqlite:///{db_path}", fail_closed=True)
    assert pipeline.gate is not None
    factory = SpanFactory()  # the outcome never reaches the store: as if the process died
    with factory.tracer.start_as_current_span("delete", attributes={a.AUDITED: True}) as span:
        pipeline.gate.intent(span)
    factory.shutdown()
    pipeline.shutdown()
    url = f"sqlite:///{db_path}"
    assert main(["audit", "verify", "--url", url]) == 0
    assert "in-doubt  #1" in capsys.readouterr().out
    main(["audit", "query", "--url", url])
    assert "in-doubt" in capsys.readouterr().out.splitlines()[1]
