"""Read commands open the store read-only: they never create, re-arm or write anything, and a
path that does not exist is exit 2 with a clear message."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from coworker.audit.store_sqlite import SQLiteStore
from coworker.cli import main
from tests.audit.conftest import fill, raw

READ_COMMANDS = [
    ["status"],
    ["verify"],
    ["query"],
    ["query", "--user", "alice"],
    ["tree", "flow-1"],
]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: " ".join(c))
def test_missing_path_is_exit_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A mistyped path: exit 2, a message naming it, no directory and no file made."""
    url = f"sqlite:///{tmp_path}/typo/audit.db"
    assert main(["audit", *command, "--url", url]) == 2
    err = capsys.readouterr().err
    assert "typo/audit.db" in err and "no such file" in err
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: " ".join(c))
def test_read_commands_do_not_rearm_dropped_triggers(
    db_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """On a file whose triggers were dropped, a read command leaves the file as it is."""
    store = SQLiteStore(db_path)
    fill(store, 2)
    store.close()
    raw(db_path).close()
    before = db_path.read_bytes()
    main(["audit", *command, "--url", f"sqlite:///{db_path}"])
    capsys.readouterr()
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    assert (
        conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0] == 0
    )
    conn.close()
    assert db_path.read_bytes() == before


def test_verify_reports_the_dropped_triggers(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify names every missing guard and exits 1."""
    store = SQLiteStore(db_path)
    fill(store, 2)
    store.close()
    raw(db_path).close()
    assert main(["audit", "verify", "--url", f"sqlite:///{db_path}"]) == 1
    out = capsys.readouterr().out
    assert out.count(": guard") == 3 and "audit_records_no_delete is missing" in out


def test_store_in_a_new_directory_is_one_loud_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """configure() with a URL whose directory does not exist: one WARNING says a new, empty
    log is being created (and where)."""
    import coworker

    with caplog.at_level("INFO", logger="coworker"):
        coworker.configure(audit=f"sqlite:///{tmp_path}/tpyo/audit.db")
        coworker.shutdown()
    loud = [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert len(loud) == 1, caplog.text
    assert "EMPTY audit log" in loud[0].getMessage() and "tpyo" in loud[0].getMessage()
    # An existing directory (the usual first run in a project) stays quiet.
    caplog.clear()
    with caplog.at_level("WARNING", logger="coworker"):
        SQLiteStore(tmp_path / "audit.db").close()
    assert not caplog.records


def test_the_embedded_default_store_starts_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented default (./.coworker/audit.db) on its first use is no mistyped path:
    the new-directory line is INFO, not the WARNING a typed path gets."""
    import coworker

    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="coworker"):
        coworker.configure(audit="sqlite:///.coworker/audit.db")
        coworker.shutdown()
    assert (tmp_path / ".coworker" / "audit.db").exists()
    assert [r.levelname for r in caplog.records if "EMPTY audit log" in r.getMessage()] == ["INFO"]


def test_status_reads_a_spool_without_writing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status on a PostgreSQL URL reads the spool file read-only; a file that is not a spool
    is reported, not changed."""
    from coworker.audit.spool import Spool

    spool_path = tmp_path / "spool.db"
    spool = Spool(spool_path)
    spool.put([{"i": 1}, {"i": 2}])
    spool.close()
    before = spool_path.read_bytes()
    url = f"postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=1&spool={spool_path}"
    assert main(["audit", "status", "--url", url, "--json"]) == 1  # unreachable
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["spool"]["depth"] == 2
    assert spool_path.read_bytes() == before
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    assert main(["audit", "status", "--url", url, "--spool", str(junk)]) == 1
    assert "cannot read the spool" in capsys.readouterr().out
    assert junk.read_bytes() == b"not a database at all" * 100


def test_correct_on_a_missing_store_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`correct` writes, but never into a store it would have to create: exit 2."""
    url = f"sqlite:///{tmp_path}/typo.db"
    assert main(["audit", "correct", "1", "--reason", "typo", "--url", url]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()
