"""CLI and store behaviours found by a docs-vs-code review."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coworker.audit.store_sqlite import SQLiteStore
from coworker.cli import main
from coworker.exceptions import ConfigError
from tests.audit.conftest import fill


def test_status_reads_the_spool_named_in_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit status` shows the ?spool= file the store really uses, with its depth."""
    from coworker.audit.store_postgres import PostgresStore

    spool = tmp_path / "sp.db"
    url = f"postgresql://postgres@127.0.0.1:1/coworker?spool={spool}&connect_timeout=1"
    store = PostgresStore(url)
    fill(store, 1)  # the server is unreachable: the record goes to the spool
    store.close()
    assert main(["audit", "status", "--url", url, "--json"]) == 1  # unreachable
    out = json.loads(capsys.readouterr().out)
    assert out["spool"]["path"] == str(spool)
    assert out["spool"]["depth"] == 1


def test_correct_refuses_reserved_field_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit correct --set seq=5` is a clear usage error, not a traceback."""
    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    fill(store, 2)
    store.close()
    for field in ("seq", "reason", "by", "store"):
        code = main(["audit", "correct", "2", "--reason", "x", "--set", f"{field}=5",
                     "--url", f"sqlite:///{db}"])  # fmt: skip
        assert code == 2
        assert "cannot be corrected" in capsys.readouterr().err


def test_synchronous_off_is_refused(tmp_path: Path) -> None:
    """An audit store that could lose committed records on a crash is a ConfigError."""
    with pytest.raises(ConfigError, match="synchronous"):
        SQLiteStore(tmp_path / "a.db", synchronous="off")


def test_query_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`coworker audit query --json | head -1` exits without a BrokenPipeError traceback."""
    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    fill(store, 400)
    store.close()
    cmd = f"{sys.executable} -m coworker audit query --json --url sqlite:///{db} | head -1"
    res = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "BrokenPipeError" not in res.stderr and "Traceback" not in res.stderr
    assert json.loads(res.stdout)["seq"] == 1
