"""Retiring a chain while writers append to it: every record a writer was told is durable is
under the seal (so under the head the registry records), every append after it is refused,
and a writer whose failure policy is "log" keeps and reports what it could not write (the
real SQLite file, the real PostgreSQL server, threads with stores of their own)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.chain_seal import ChainSealed, sealed_head
from coworker.audit.urls import open_store, with_chain
from coworker.audit.writer import AuditWriter
from coworker.cli import main
from coworker.exceptions import AuditUnavailable
from tests.audit.conftest import store_url

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
WRITERS = 3


def entry(writer: int, i: int) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "w", "w": writer, "i": i}


def _url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    url = store_url(backend, tmp_path, request)
    default = open_store(url)
    default.append([entry(-1, 0)])
    default.close()
    return url


@pytest.mark.parametrize("backend", BACKENDS)
def test_writers_appending_across_a_retirement_lose_nothing_they_were_told_is_durable(
    backend: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    """Three writers append one record at a time while retire-chain runs: each stops at its
    first refusal; the chain holds exactly the acknowledged records, each at the seq it was
    given, then the seal, and verify says retired."""
    url = _url(backend, tmp_path, request)
    chain = with_chain(url, "billing")
    open_store(chain).close()  # registered
    acknowledged: list[list[tuple[int, int]]] = [[] for _ in range(WRITERS)]
    refused = [threading.Event() for _ in range(WRITERS)]
    started = threading.Barrier(WRITERS + 1)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        store = open_store(chain)
        try:
            started.wait()
            i = 0
            while True:
                try:
                    (record,) = store.append([entry(n, i)])
                except ChainSealed:
                    refused[n].set()
                    return
                acknowledged[n].append((record.seq, i))
                i += 1
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            refused[n].set()
        finally:
            store.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    started.wait()
    assert main(["audit", "retire-chain", "billing", "--reason", "left", "--url", url]) == 0
    for n, t in enumerate(threads):
        assert refused[n].wait(60)
        t.join()
    assert errors == []
    reader = open_store(chain, readonly=True)
    try:
        seal = sealed_head(reader)
        assert seal is not None
        records = [(r.seq, r.fields()) for r in reader.iter_from(1)]
        stored = {(f["w"], f["i"]): seq for seq, f in records if seq != seal.seq}
    finally:
        reader.close()
    told = {(n, i): seq for n in range(WRITERS) for seq, i in acknowledged[n]}
    assert all(seq < seal.seq for seq in told.values())
    assert {k: stored[k] for k in told} == told  # every acknowledged record, where it was told
    assert len(stored) == seal.seq - 1 == len(told)  # nothing under the seal unacknowledged
    assert records[-1][0] == seal.seq  # nothing after it
    capsys.readouterr()
    assert main(["audit", "verify", "--url", url]) == 0
    assert "OK    chain billing: retired" in capsys.readouterr().out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_log_policy_writer_keeps_and_reports_what_a_retired_chain_refused(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    """The "log" policy swallows ChainSealed: the record is queued for retry (ERROR), and at
    close, still refused, logged as lost one by one (CRITICAL): never dropped silently."""
    url = _url(backend, tmp_path, request)
    store = open_store(with_chain(url, "billing"))
    writer = AuditWriter(store, on_failure="log")
    try:
        assert len(writer.write([(entry(0, 0), None)])) == 1
        assert main(["audit", "retire-chain", "billing", "--reason", "left", "--url", url]) == 0
        caplog.set_level(logging.ERROR, logger="coworker.audit")
        assert writer.write([(entry(0, 1), None)]) == []
        assert writer.retry_depth == 1
        assert any("queued for retry" in r.getMessage() for r in caplog.records)
        assert writer.flush() is False
        writer.close()
        assert writer.lost == 1
        assert any(
            r.levelno == logging.CRITICAL and "AUDIT RECORD LOST" in r.getMessage()
            for r in caplog.records
        )
    finally:
        store.close()


@pytest.mark.postgres
def test_entries_spooled_before_a_retirement_stay_in_the_spool_and_later_appends_are_refused(
    pg: Any, tmp_path: Path
) -> None:
    """A writer spooled an entry during an outage, the chain was retired meanwhile: shipping
    it is refused (nothing appended after the seal), it stays in the spool, and once the
    store has met the seal every later append is refused rather than spooled (never answered
    durable); close is quiet. (Until it meets the seal, a store with entries waiting in its
    spool spools new ones behind them: docs/audit.md.)"""
    import time

    from tests.pg import proxy_to, with_hostport

    url = pg.schema_url()
    default = open_store(url)
    default.append([entry(-1, 0)])
    default.close()
    chain = with_chain(url, "billing")
    with proxy_to(pg.url) as proxy:
        proxied = with_chain(with_hostport(url, "127.0.0.1", proxy.port), "billing")
        from coworker.audit.store_postgres import PostgresStore

        store = PostgresStore(proxied, spool=tmp_path / "spool.db", ship_interval=3600)
        try:
            assert len(store.append([entry(0, 0)])) == 1
            proxy.cut()
            assert store.append([entry(0, 1)]) == []  # spooled: durable in the spool file
            assert main(["audit", "retire-chain", "billing", "--reason", "x", "--url", url]) == 0
            proxy.restore()
            deadline = time.monotonic() + 30
            while True:  # until the store reaches the server again (its reconnect backoff)
                try:
                    store.ship()
                except AuditUnavailable as exc:  # it met the retirement
                    assert "retired" in str(exc)
                    break
                assert time.monotonic() < deadline, "the shipper never reached the server"
                time.sleep(0.05)
            status = store.spool_status()
            assert status is not None and status.depth == 1
            with pytest.raises(ChainSealed):
                store.append([entry(0, 2)])
            assert store.spool_status().depth == 1  # type: ignore[union-attr]
        finally:
            store.close()
    reader = open_store(chain, readonly=True)
    try:
        seal = sealed_head(reader)
        assert seal is not None and seal.seq == 2
    finally:
        reader.close()
