"""The append lock key of the PostgreSQL store (the oid of a chain's records table): a call
with another key fails alone, before taking any lock, instead of appending beside the
correct writers (whose appends then failed as forks) or blocking another chain (the real
PostgreSQL server)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from coworker.audit.store_postgres.ddl import _LOCK_NAMESPACE, LOCK_KEY_MISMATCH
from coworker.audit.verify import verify_chain


def entry(i: int) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "create", "i": i}


def _oid(conn: Any, schema: str) -> int:
    row = conn.execute("SELECT %s::regclass::oid::int", (f'"{schema}".records',)).fetchone()
    return int(row[0])


@pytest.mark.postgres
def test_a_call_with_another_chains_lock_key_is_refused_before_any_lock(pg: Any) -> None:
    """append() and lock_head() called with chain b's key on chain a (a hand-written call, a
    misconfigured writer) raise CWLCK while b's lock is held elsewhere: no wait, no row."""
    import psycopg

    from coworker.audit.store_postgres import PostgresStore
    from coworker.audit.urls import with_chain

    url = pg.schema_url()
    a = PostgresStore(with_chain(url, "a"), spool=None)
    b = PostgresStore(with_chain(url, "b"), spool=None)
    a.append([entry(1)])
    with psycopg.connect(pg.url) as holder, psycopg.connect(pg.url, autocommit=True) as conn:
        b_key = _oid(conn, b.schema)
        conn.execute("SET lock_timeout = '10s'")  # without the check: a wait on b's lock
        holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, b_key))
        with pytest.raises(psycopg.Error) as raised:
            conn.execute(f'SELECT * FROM "{a.schema}".lock_head(%s)', (b_key,))
        assert raised.value.sqlstate == LOCK_KEY_MISMATCH
        with pytest.raises(psycopg.Error) as raised:
            conn.execute(
                f'SELECT * FROM "{a.schema}".append(%s, %s, %s, %s, NULL, NULL'
                + ", NULL" * 14
                + ")",
                (b_key, b"n" * 16, [b'{"i":2,"seq":'], [b"}"]),
            )
        assert raised.value.sqlstate == LOCK_KEY_MISMATCH
        holder.rollback()
    assert a.count() == 1 and b.count() == 0
    a.close()
    b.close()


@pytest.mark.postgres
def test_a_writer_with_a_stale_lock_key_takes_the_chains_lock_after_reconnecting(
    pg: Any,
) -> None:
    """A store whose cached key is wrong (the table re-created under its connection) no
    longer appends beside the writer holding the chain's lock: it is refused, reconnects,
    re-reads the key and waits for that lock like every writer; the chain stays one."""
    import psycopg

    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    good = PostgresStore(url, spool=None)
    good.append([entry(0)])
    stale = PostgresStore(url, spool=None)
    right = stale._oid
    stale._oid = 4_000_000  # a key no correct writer takes
    stale._append_sql = stale._lock_head = None
    done = threading.Event()
    failed: list[BaseException] = []

    def append() -> None:
        try:
            stale.append([entry(1)])
        except BaseException as exc:
            failed.append(exc)
        finally:
            done.set()

    with psycopg.connect(pg.url) as holder, psycopg.connect(pg.url, autocommit=True) as watch:
        holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, right))
        thread = threading.Thread(target=append)
        thread.start()
        waiting = False
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            row = watch.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND objid = %s",
                (right,),
            ).fetchone()
            if row is not None and row[0]:
                waiting = True
                break
            time.sleep(0.02)
        assert waiting and not done.is_set(), "the stale writer appended without the lock"
        holder.rollback()  # the correct writer's turn ends
    assert done.wait(60) and not failed, failed
    assert stale._oid == right
    report = verify_chain(good)
    assert report.ok and report.checked == 2, report
    good.close()
    stale.close()
