"""Retiring a chain seals it: a writer that opened the chain before it was retired is refused
afterwards (nothing it was told is durable is lost when the chain is removed), and a
retirement killed between the seal and the registry record is completed by running it again
(real SQLite files, the real PostgreSQL server, a real SIGKILLed process)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.chain_seal import ChainSealed, sealed_head
from coworker.audit.store_sqlite import SQLiteStore, chain_file
from coworker.audit.urls import open_store, with_chain
from coworker.cli import main
from coworker.exceptions import AuditUnavailable
from tests.audit.conftest import store_url

ROOT = Path(__file__).resolve().parents[2]


def entry(i: int) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "create", "i": i}


def _setup(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A store URL with a default chain (1 record); the chain billing is made by the test."""
    url = store_url(backend, tmp_path, request)
    store = open_store(url)
    store.append([entry(0)])
    store.close()
    return url


def _writer(backend: str, url: str) -> Any:
    return open_store(with_chain(url, "billing"))


def _remove(backend: str, url: str, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        path = url[len("sqlite:///") :]
        target = Path(chain_file(path, "billing"))
        for leftover in target.parent.glob("billing.db*"):
            leftover.unlink()
        return
    import psycopg

    reader = open_store(with_chain(url, "billing"), readonly=True)
    schema = reader.schema
    reader.close()
    with psycopg.connect(request.getfixturevalue("pg").url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE'.encode())


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_writer_opened_before_retirement_is_refused_after_it_and_nothing_is_lost(
    backend: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    """The writer keeps its open store across the retirement: its next append is refused
    (AuditUnavailable naming the retired chain, an ERROR log line), not told durable; the
    chain ends at the seal the registry names, and once removed verify says retired."""
    url = _setup(backend, tmp_path, request)
    writer = _writer(backend, url)
    writer.append([entry(1), entry(2)])
    assert main(["audit", "retire-chain", "billing", "--reason", "tenant left", "--url", url]) == 0
    assert "retired  chain billing: sealed at seq 3" in capsys.readouterr().out
    caplog.set_level(logging.ERROR, logger="coworker.audit")
    with pytest.raises(AuditUnavailable, match=r"chain 'billing' was retired \(sealed at seq 3\)"):
        writer.append([entry(3)])  # the long-lived writer never re-reads the registry
    assert any("'billing' is retired" in r.getMessage() for r in caplog.records)
    with pytest.raises(ChainSealed):
        writer.append([entry(4), entry(5)])
    head = writer.head()
    writer.close()
    assert head is not None and head.seq == 3
    assert main(["audit", "verify", "--url", url]) == 0
    assert "OK    chain billing: retired" in capsys.readouterr().out
    _remove(backend, url, request)
    assert main(["audit", "verify", "--url", url]) == 0
    assert "OK    chain billing: retired" in capsys.readouterr().out


_KILLED_RETIRE = """
import sys
from coworker.audit.chain_seal import seal
from coworker.audit.urls import open_store, with_chain
store = open_store(with_chain(sys.argv[1], "billing"), readonly=True)
head = seal(store, "tenant left")
print("sealed", head.seq, flush=True)
sys.stdin.read()  # killed here: between the seal and the registry record
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_retirement_killed_between_seal_and_registry_record_is_completed_by_running_it_again(
    backend: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL after the seal, before the registry record: nothing can be written to the
    chain, verify names it sealed (exit 1); retire-chain again records that seal (no second
    one) and verify says retired, also once the chain is removed."""
    url = _setup(backend, tmp_path, request)
    writer = _writer(backend, url)
    writer.append([entry(1)])
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RETIRE, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == [b"sealed", b"2"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with pytest.raises(ChainSealed):
        writer.append([entry(2)])
    assert main(["audit", "verify", "--url", url]) == 1
    out = capsys.readouterr().out
    assert "FAIL  chain billing: sealed" in out and "retire-chain" in out
    assert main(["audit", "retire-chain", "billing", "--reason", "tenant left", "--url", url]) == 0
    assert "retired  chain billing: sealed at seq 2" in capsys.readouterr().out
    reader = open_store(with_chain(url, "billing"), readonly=True)
    found = sealed_head(reader)
    reader.close()
    assert found is not None and found.seq == 2
    writer.close()
    assert main(["audit", "verify", "--url", url]) == 0
    assert "OK    chain billing: retired" in capsys.readouterr().out
    _remove(backend, url, request)
    assert main(["audit", "verify", "--url", url]) == 0
    assert "OK    chain billing: retired" in capsys.readouterr().out


def test_a_record_that_only_begins_like_a_seal_seals_nothing(tmp_path: Path) -> None:
    """The head read's byte comparison is a filter: a record of the category chain-seal that
    is not this chain's seal is parsed and appended after."""
    store = SQLiteStore(tmp_path / "a.db")
    store.append([{"category": "chain-seal", "kind": "outcome", "operation": "seal"}])
    store.append([entry(1)])
    head = store.head()
    store.close()
    assert head is not None and head.seq == 2


def test_an_append_rolled_back_after_its_insert_does_not_hide_a_later_seal(
    tmp_path: Path,
) -> None:
    """The store skips the seal check for the head it appended last (its hash); an append
    whose transaction rolled back after the record's insert (here its payload's insert is
    refused) left that hash behind, and a seal appended since by another store is still
    found: the next append is refused, nothing after the seal."""
    import sqlite3

    from coworker.audit.chain_seal import seal

    path = tmp_path / "a.db"
    store = SQLiteStore(path, chain="billing")
    store.append([entry(1)])
    raw = sqlite3.connect(chain_file(str(path), "billing"))
    raw.execute(
        "CREATE TRIGGER no_payloads BEFORE INSERT ON audit_payloads "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    raw.commit()
    with pytest.raises(AuditUnavailable, match="refused"):
        store.append([entry(2)], [b'{"input":"x","output":null}'])
    raw.execute("DROP TRIGGER no_payloads")
    raw.commit()
    raw.close()
    head = store.head()
    assert head is not None and head.seq == 1  # the record went with its transaction
    assert seal(store, "tenant left").seq == 2
    with pytest.raises(ChainSealed):
        store.append([entry(3)])
    head = store.head()
    store.close()
    assert head is not None and head.seq == 2


@pytest.mark.postgres
def test_entries_spooled_before_a_retirement_stay_in_the_spool_and_later_appends_are_refused(
    pg: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer spools during an outage; meanwhile the chain is retired. Shipping is refused
    (ERROR naming the chain), the entries stay in the spool (never lost, never in the sealed
    chain), and from then on appends raise instead of spooling (a spooled entry is answered
    durable)."""
    from coworker.audit.chain_seal import retire
    from coworker.audit.store_postgres import PostgresStore
    from tests.pg import proxy_to, with_hostport

    url = pg.schema_url()
    PostgresStore(url, spool=None).close()
    with proxy_to(pg.url) as proxy:
        writer = PostgresStore(
            with_chain(with_hostport(url, "127.0.0.1", proxy.port), "billing"),
            spool=tmp_path / "spool.db",
            ship_interval=3600,  # shipped by the test's own ship() calls
        )
        writer.append([entry(1)])
        proxy.cut()
        assert writer.append([entry(2)]) == []  # spooled
        reader = PostgresStore(with_chain(url, "billing"), spool=None, readonly=True)
        _, head = retire(reader, "tenant left")
        reader.close()
        assert head.seq == 2  # entry 1 and the seal
        proxy.restore()
        caplog.set_level(logging.ERROR, logger="coworker.audit")
        deadline = time.monotonic() + 10
        with pytest.raises(ChainSealed):  # once the store reconnects (its retry interval)
            while time.monotonic() < deadline:
                writer.ship()
                time.sleep(0.05)
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("chain 'billing'" in m and "retired" in m for m in messages)
        with pytest.raises(ChainSealed):
            writer.append([entry(3)])
        status = writer.spool_status()
        assert status is not None and status.depth == 1
        writer.close()
    reader = PostgresStore(with_chain(url, "billing"), spool=None, readonly=True)
    assert [r.seq for r in reader.iter_from(1)] == [1, 2]
    reader.close()


def test_ingest_into_a_retired_chain_answers_503_and_writes_nothing(tmp_path: Path) -> None:
    """The ingest endpoint's store had the chain open before it was retired: a span sent
    afterwards is refused with 503 (the exporter keeps it and retries), not acknowledged."""
    from starlette.testclient import TestClient

    from coworker.ingest import create_app
    from tests.test_ingest import make_spans, request_bytes

    url = f"sqlite:///{tmp_path / 'a.db'}"
    open_store(url).close()
    store = open_store(with_chain(url, "billing"))
    assert main(["audit", "retire-chain", "billing", "--reason", "gone", "--url", url]) == 0
    with TestClient(create_app(store)) as client:
        response = client.post(
            "/v1/traces",
            content=request_bytes(make_spans(2)),
            headers={"content-type": "application/x-protobuf"},
        )
    assert response.status_code == 503
    head = store.head()
    store.close()
    assert head is not None and head.seq == 1  # the seal alone


@pytest.mark.postgres
def test_a_writer_roles_raw_insert_after_the_seal_is_refused_by_the_database(
    pg: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bypassing coworker's append: a writer role's INSERT of a correctly chained row after the
    seal is refused by the chain check (schema 7), so the retired chain stays as sealed."""
    import psycopg

    from coworker.audit.chain import link
    from coworker.audit.store_postgres import PostgresStore, writer_grants
    from tests.pg import with_user

    url = pg.schema_url(spool="off")
    open_store(url).close()
    store = PostgresStore(with_chain(url, "billing"), spool=None)
    store.append([entry(1)])
    assert main(["audit", "retire-chain", "billing", "--reason", "gone", "--url", url]) == 0
    head = store.head()
    assert head is not None and head.seq == 2
    writer = pg.create_role("seal_writer")
    for grant in writer_grants(writer, store.schema):
        pg.execute(grant)
    from coworker.audit.record import canonical

    body = canonical({**entry(3), "seq": 3})
    with psycopg.connect(with_user(pg.url, writer), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation):
            conn.execute(
                f'INSERT INTO "{store.schema}".records (seq, prev_hash, hash, body, category) '
                "VALUES (3, %s, %s, %s, 'state-change')",
                (head.hash, link(head.hash, body), body),
            )
    store.close()
    capsys.readouterr()
    assert main(["audit", "verify", "--url", url]) == 0
