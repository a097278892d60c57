"""Budgets across processes: separate Python processes (subprocesses) sharing one real SQLite
file or one real PostgreSQL schema; a budget one process spends refuses the next run in
another, and that refusal is audited."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from coworker.audit.urls import open_store

ROOT = Path(__file__).resolve().parents[2]
STORES = ("sqlite", "postgres")


def _policy(refresh: float) -> str:
    return json.dumps(
        {
            "roles": {"u": {"*": ["*"]}},
            "users": {"u1": ["u"], "u2": ["u"]},
            "usage": {
                "budget_refresh": refresh,
                "budgets": {"daily": {"per": "user", "window": "1d", "max_tokens": 1000}},
            },
        }
    )


class Worker:
    """One process running tests/audit/budget_worker.py; :meth:`ask` sends a command and
    waits (generously) for its answer."""

    def __init__(self, url: str, policy: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.audit.budget_worker", url, policy],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        assert self._answer() == "ready"

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def _answer(self) -> str:
        return self.lines.get(timeout=120)

    def ask(self, command: str) -> str:
        """Send one command line; return the answer line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def quit(self) -> None:
        """Shut coworker down in the worker (its records durable) and wait for the exit."""
        assert self.ask("quit") == "bye"
        assert self.proc.wait(timeout=120) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Any]:
    """A fresh database on the real server (skips, or fails under CI, without it)."""
    from tests.pg import PGServer, require_server

    server = PGServer(require_server())
    yield server
    server.close()


@pytest.fixture(params=STORES)
def audit_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, then a fresh schema on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    server = request.getfixturevalue("pg_server")
    url: str = server.schema_url()
    return url


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """The workers a test starts; any left running are killed at the end."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.kill()


def _refusals(url: str) -> list[dict[str, Any]]:
    store = open_store(url)
    try:
        return [
            f
            for f in (r.fields() for r in store.iter_from(1))
            if f.get("category") == "policy-violation"
            and f.get("error_type") == "coworker.exceptions.BudgetExceeded"
        ]
    finally:
        store.close()


def test_a_budget_spent_in_one_process_refuses_the_next_run_in_another(
    audit_url: str, workers: list[Worker]
) -> None:
    """Process A spends u1's budget and exits; process B's first run as u1 is refused with
    BudgetExceeded, audited; u2 in B still runs."""
    a = Worker(audit_url, _policy(1.0))
    workers.append(a)
    assert a.ask("chat u1 600") == "ok"
    assert a.ask("chat u1 600") == "ok"
    a.quit()
    b = Worker(audit_url, _policy(1.0))
    workers.append(b)
    assert b.ask("chat u1 1") == "refused usage.budgets.daily daily"
    assert b.ask("chat u2 1") == "ok"
    b.quit()
    (refusal,) = _refusals(audit_url)
    assert refusal["user_id"] == "u1"


def test_near_the_cap_every_check_reads_the_ledger(audit_url: str, workers: list[Worker]) -> None:
    """Both processes stay up with an hour-long cache; once B's own spend is within 10% of
    the cap its next check reads the ledger anyway and sees what A spent meanwhile (A, far
    from the cap by what it knows, does not look: the documented overshoot)."""
    a = Worker(audit_url, _policy(3600.0))
    b = Worker(audit_url, _policy(3600.0))
    workers += [a, b]
    assert a.ask("chat u2 1") == "ok"  # A's cache is warm: nothing of u1 in it
    assert b.ask("chat u1 950") == "ok"
    assert a.ask("chat u1 100") == "ok"  # A: 950 of B's + 0 of its own, under the cap
    assert b.ask("chat u1 1") == "refused usage.budgets.daily daily"  # 950 + A's 100
    # The documented overshoot: A is far from the cap by what it knows (its own 100) and
    # its cache is younger than budget_refresh, so it has not looked again.
    assert a.ask("chat u1 1") == "ok"
    a.quit()
    b.quit()
    (refusal,) = _refusals(audit_url)
    assert refusal["user_id"] == "u1"


def test_a_stale_cache_is_refreshed_and_then_refuses(audit_url: str, workers: list[Worker]) -> None:
    """Far from the cap B holds its cache for budget_refresh; after that it reads the
    ledger again and refuses u1 (polled: decided by B's answer, generously bounded)."""
    b = Worker(audit_url, _policy(0.2))
    workers.append(b)
    assert b.ask("chat u1 10") == "ok"
    a = Worker(audit_url, _policy(0.2))
    workers.append(a)
    assert a.ask("chat u1 990") == "ok"
    a.quit()
    deadline = time.monotonic() + 60
    while (answer := b.ask("chat u1 0")) == "ok":
        assert time.monotonic() < deadline, "B never saw A's spend"
    assert answer == "refused usage.budgets.daily daily"
    assert int(b.ask("refreshes")) >= 2
    b.quit()
    assert len(_refusals(audit_url)) == 1


def test_with_budget_refresh_0_processes_taking_turns_stop_exactly_at_the_cap(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """Three processes on one SQLite file take turns spending 100 tokens a run on one
    budget with budget_refresh = 0 (the ledger read at every check): with no run in flight
    elsewhere the cap holds exactly (10 runs of 100 for 1000), and every process is refused."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    procs = [Worker(url, _policy(0)) for _ in range(3)]
    workers += procs
    refused: set[int] = set()
    runs = 0
    for _ in range(40):
        for i, w in enumerate(procs):
            if w.ask("chat u1 100") == "ok":
                runs += 1
            else:
                refused.add(i)
        if len(refused) == 3:
            break
    assert refused == {0, 1, 2}
    assert runs == 10
    for w in procs:
        w.quit()
    assert len(_refusals(url)) >= 3
