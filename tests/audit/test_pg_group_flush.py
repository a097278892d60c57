"""The PostgreSQL store's group commit (``submit_unique`` / ``PendingAppend.wait``,
``store_postgres/group_flush.py``) against the real server: an append is reported only once
a flush on an unbroken flusher connection covers it, and a flusher killed before that
re-appends through the lost-answer path, losing nothing and writing nothing twice."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from coworker.audit.verify import verify_chain
from tests.pg import import_psycopg

psycopg = import_psycopg()  # skips, or fails under CI, without the postgres extra

from coworker.audit.store_postgres import PostgresStore  # noqa: E402


def _entries(n: int, tag: str) -> tuple[list[dict[str, Any]], list[bytes]]:
    entries = [
        {"kind": "span", "category": "state-change", "operation": "update", "run_id": f"{tag}-{i}"}
        for i in range(n)
    ]
    return entries, [f"{tag}-{i}".encode().ljust(24, b".") for i in range(n)]


def _run_ids(store: PostgresStore) -> list[str]:
    import json

    return [json.loads(r.body)["run_id"] for r in store.iter_from(1)]


def test_wait_returns_records_that_are_in_the_log(pg: Any) -> None:
    store = PostgresStore(pg.schema_url(spool="off"), spool=None)
    try:
        entries, keys = _entries(5, "a")
        pending = store.submit_unique(entries, None, keys)
        result = pending.wait()
        assert [r.seq for r in result.records] == [1, 2, 3, 4, 5]
        assert _run_ids(store) == [f"a-{i}" for i in range(5)]
        assert verify_chain(store).ok
    finally:
        store.close()


def test_flusher_killed_before_its_flush_reappends_nothing_lost_nothing_twice(
    pg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The flusher's backend terminated between the append and its flush: the flush fails,
    wait() does not report the records on the word of a new connection's flush, it finds the
    committed rows by their nonce and answers them once."""
    store = PostgresStore(pg.schema_url(spool="off"), spool=None)
    try:
        entries, keys = _entries(3, "b")
        pending = store.submit_unique(entries, None, keys)
        conn = store._group._conn
        assert conn is not None  # the flusher connection was up before the append was sent
        with psycopg.connect(pg.url, autocommit=True) as admin:
            (killed,) = admin.execute(
                "SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,)
            ).fetchone()
        assert killed
        with caplog.at_level("WARNING", logger="coworker.audit"):
            result = pending.wait()
        assert "appending again to find out" in caplog.text  # the flush was not trusted
        assert [r.seq for r in result.records] == [1, 2, 3]
        assert _run_ids(store) == ["b-0", "b-1", "b-2"]
        # The next append opens a new flusher connection and is covered by it.
        entries, keys = _entries(2, "c")
        assert [r.seq for r in store.submit_unique(entries, None, keys).wait().records] == [4, 5]
        assert store._group._conn is not conn
        assert verify_chain(store).ok
    finally:
        store.close()


def test_concurrent_submitters_share_flushes_and_all_land_once(pg: Any) -> None:
    store = PostgresStore(pg.schema_url(spool="off"), spool=None)
    errors: list[BaseException] = []
    seqs: list[int] = []
    lock = threading.Lock()

    def submit(t: int) -> None:
        try:
            for j in range(20):
                entries, keys = _entries(2, f"t{t}-{j}")
                result = store.submit_unique(entries, None, keys).wait()
                with lock:
                    seqs.extend(r.seq for r in result.records)
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        assert sorted(seqs) == list(range(1, 161))
        assert len(set(_run_ids(store))) == 160
        assert verify_chain(store).ok
    finally:
        store.close()
