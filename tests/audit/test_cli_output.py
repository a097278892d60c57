"""Human-readable output of ``coworker audit`` under hostile stored values, and the query,
tree and correct behaviours of issue 9 (no silent no-match, short flow ids, corrections that
keep their user)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import coworker
from coworker import attributes as a
from coworker.audit.correction import correct
from coworker.audit.store_sqlite import SQLiteStore
from coworker.cli import main
from tests.audit.conftest import fill

FORGED_USER = "root\n9999  2026-01-01 00:00:00.000  state-change  delete  Ledger  ok  admin\x1b[1A"
HOSTILE = "a\x1b[2Jb\rc\x00d\x7fe\x85f\u2028g\u202eh\u2066i\\j"


@pytest.fixture
def url(db_path: Path) -> str:
    """Two flows with ids sharing a prefix, one record with a hostile user id."""
    store = SQLiteStore(db_path)
    fill(store, 2, **{a.FLOW_ID: "3f2a9c1e-0000-4000-8000-000000000001"})
    fill(store, 1, **{a.FLOW_ID: "3f2a9d77-0000-4000-8000-000000000002", a.OPERATION: "delete"})
    fill(store, 1, **{a.FLOW_ID: "flow-x", a.USER_ID: FORGED_USER, a.STEP_ID: HOSTILE})
    store.close()
    return f"sqlite:///{db_path}"


def test_query_table_escapes_control_characters(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user id with a newline and ANSI escapes stays on its row, escaped; --json is exact."""
    assert main(["audit", "query", "--url", url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1 + 4  # the header and four rows: no forged fifth row
    assert "\x1b" not in out and "\r" not in out and "\u2028" not in out
    assert "root\\x0a9999" in lines[4] and "admin\\x1b[1A" in lines[4]
    assert main(["audit", "query", "--url", url, "--json", "--flow-id", "flow-x"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["user_id"] == FORGED_USER and row["step_id"] == HOSTILE  # stored as given


def test_tree_escapes_control_characters(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Step and user ids in the tree are escaped: C0, DEL, C1, separators, bidi, backslash."""
    assert main(["audit", "tree", "flow-x", "--url", url]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 3  # title, step, run
    assert "a\\x1b[2Jb\\x0dc\\x00d\\x7fe\\x85f\\u2028g\\u202eh\\u2066i\\\\j" in out, out
    assert "root\\x0a9999" in out


def test_status_escapes_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`audit status` prints a store path with control characters escaped."""
    db = tmp_path / "a\x1b[31mred.db"
    fill(store := SQLiteStore(db), 1)
    store.close()
    assert main(["audit", "status", "--url", f"sqlite:///{db}"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "a\\x1b[31mred.db" in out


def test_unknown_category_is_an_error_listing_the_valid_ones(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--category state_change` (a typo) exits 2 naming every valid category."""
    assert main(["audit", "query", "--url", url, "--category", "state_change"]) == 2
    err = capsys.readouterr().err
    assert "unknown category 'state_change'" in err
    for category in (*a.AUDIT_CATEGORIES, "ingest-conflict"):
        assert category in err
    assert main(["audit", "query", "--url", url, "--category", "state-change", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_operation_filter_is_case_insensitive(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--operation UPDATE` matches records of operation update, like the policy does."""
    assert main(["audit", "query", "--url", url, "--operation", "UPDATE", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["operation"] for r in rows] == ["update", "update", "update"]
    assert main(["audit", "query", "--url", url, "--operation", "Delete", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_tree_accepts_a_unique_prefix_of_a_flow_id(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tree 3f2a9c1e` (the short id the demo prints) is the flow it starts; ambiguous and
    unknown prefixes are clear errors."""
    assert main(["audit", "tree", "3f2a9c1e", "--url", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flow 3f2a9c1e-0000-4000-8000-000000000001 (workflow)  2 record(s)")
    assert main(["audit", "tree", "3f2a9", "--url", url]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and "2 flows" in err and "3f2a9d77-0000" in err
    assert main(["audit", "tree", "ffff", "--url", url]) == 1
    assert "no audit records for flow 'ffff'" in capsys.readouterr().err


def test_tree_json(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`tree --json` prints the tree as one JSON object with the records as stored."""
    assert main(["audit", "tree", "3f2a9d", "--url", url, "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["flow_id"] == "3f2a9d77-0000-4000-8000-000000000002"
    assert tree["records"] == 1 and tree["first_failure_seq"] is None
    (step,) = tree["steps"]
    (run,) = step["runs"]
    assert step["state"] == "ok" and run["seq"] == 3 and run["record"]["operation"] == "delete"
    assert run["children"] == [] and run["corrections"] == [] and run["failed"] is False
    assert main(["audit", "tree", "flow-x", "--url", url, "--json"]) == 0
    hostile = json.loads(capsys.readouterr().out)
    assert hostile["steps"][0]["step_id"] == HOSTILE


def test_correct_by_keeps_the_original_user_and_records_the_corrector(
    url: str, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`correct --by auditor`: the correction keeps user alice (so `query --user alice` shows
    it) and names the corrector in corrected_by; the tree says who corrected."""
    assert main(["audit", "correct", "1", "--reason", "wrong doctype", "--set",
                 "doctype=Payment", "--by", "auditor", "--url", url]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["audit", "query", "--url", url, "--user", "alice", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (fix,) = [r for r in rows if r["kind"] == "correction"]
    assert (fix["user_id"], fix["agent_id"], fix["corrected_by"]) == ("alice", "agent-7", "auditor")
    assert main(["audit", "query", "--url", url, "--user", "auditor"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "tree", "3f2a9c1e", "--url", url]) == 0
    assert "corrected by #5 (auditor): wrong doctype" in capsys.readouterr().out
    store = SQLiteStore(db_path)
    rec = correct(2, "no corrector given", store=store, doctype="Payment")
    assert rec.fields()["corrected_by"] is None and rec.fields()["user_id"] == "alice"
    store.close()
    assert main(["audit", "verify", "--url", url]) == 0


def test_acting_as_with_a_forged_row_end_to_end(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reported case: acting_as("root\\n9999 …\\x1b[1A") through the real decorator."""
    coworker.configure(audit=f"sqlite:///{db_path}")

    @coworker.run(operation="update", doctype="Invoice")
    def update() -> None:
        pass

    with coworker.acting_as(FORGED_USER):
        update()
    coworker.shutdown()
    assert main(["audit", "query", "--url", f"sqlite:///{db_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "\x1b" not in lines[1] and "root\\x0a9999" in lines[1]
