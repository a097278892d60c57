"""The benchmarks still run: each one, at a tiny size, exits 0 and prints its ratio line.

The figures are not checked (they are the benchmarks' job, on a quiet machine); what is checked
is that a benchmark has not rotted — it runs against today's code and every one of them still
accounts for its records (the benchmarks assert that the store holds every record they wrote;
``pg_append.py --chains`` once failed that way after the chain registry was added, unnoticed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import PGServer, import_psycopg, require_server

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# (script and arguments, a piece of the output that says the run finished)
CASES = [
    ("acl_overhead.py --calls 200 --repeats 1", "rate limit"),
    ("audit_append.py 40", "4 thread(s): audited runs"),
    ("audit_verify.py 2000", "ratio verify / baseline"),
    ("erasure.py 40", "ratio"),
    ("flow_spans.py --flows 20 --repeats 1", "inside a step"),
    ("overhead.py --calls 50 --repeats 1 --memory-calls 1000", "memory: max RSS"),
    ("usage.py --calls 100 --repeats 1", "ratio"),
    ("flow_fold.py --flows 100 --noise 100 --repeats 1 --workflows 3", "on / off ="),
    ("proofs.py 30 2000", "sync of 100 more records"),
    ("sqlite_chains.py --writers 2 --records 5 --runs 1 --chains 1,2", "x 1 chain"),
]

PG_CASES = [
    ("pg_append.py --writers 2 --records 40 --batches 1,10 --runs 1", "ratio"),
    ("pg_append.py --writers 2 --chains 1,2 --records 20 --batches 1 --runs 1", "x 1 chain"),
    ("ingest.py --spans 600 --runs 1", "CPU per span"),
]


def _run(command: str, *extra: str) -> str:
    script, *args = command.split()
    # This checkout's code (src/ first), not whichever one the environment has installed.
    root = BENCHMARKS.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=BENCHMARKS.parent,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    import_psycopg()
    server = PGServer(require_server())
    yield server.url
    server.close()


@pytest.mark.parametrize(("command", "finished"), CASES, ids=[c[0].split()[0] for c in CASES])
def test_a_benchmark_runs_to_its_end(command: str, finished: str) -> None:
    """A SQLite (or store-less) benchmark runs at a tiny size and prints its last figures."""
    assert finished in _run(command)


@pytest.mark.parametrize(
    ("command", "finished"),
    PG_CASES,
    ids=["pg_append", "pg_append-chains", "ingest"],
)
def test_a_postgresql_benchmark_runs_to_its_end(command: str, finished: str, pg_url: str) -> None:
    """A PostgreSQL benchmark runs at a tiny size against the test server's fresh database."""
    assert finished in _run(command, "--url", pg_url)
