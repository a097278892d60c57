"""PostgresStore against a private PostgreSQL cluster that the tests crash and restart.

``pg_ctl stop -m immediate`` is a server crash as far as the WAL is concerned: whatever the
server had not flushed is gone after recovery. A record whose ``append`` returned must not be.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.pg import import_psycopg

import_psycopg()

from coworker.audit.store_postgres import PostgresStore  # noqa: E402
from coworker.audit.verify import verify_chain  # noqa: E402
from tests.pg import PrivateCluster, private_cluster  # noqa: E402

pytestmark = pytest.mark.postgres

TRIALS = 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    # The default wal_writer_delay (200 ms): an asynchronously committed record stays in
    # the server's memory long enough for an immediate stop to lose it, as in the field.
    with private_cluster() as c:
        yield c


def entry(i: int) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "update", "i": i}


def test_returned_appends_survive_a_server_crash(cluster: PrivateCluster) -> None:
    """Two appends return, the server crashes at once (20 trials): both are in the log after."""
    url = cluster.url + "?schema=crash"
    returned: list[int] = []
    lost: list[int] = []
    for trial in range(TRIALS):
        store = PostgresStore(url, spool=None)
        for i in (2 * trial, 2 * trial + 1):
            assert len(store.append([entry(i)])) == 1
            returned.append(i)
        cluster.crash()
        store.close()
        cluster.start()
        check = PostgresStore(url, spool=None)
        present = {json.loads(r.body)["i"] for r in check.iter_from()}
        lost += [i for i in returned if i not in present]
        returned = [i for i in returned if i in present]  # count each loss once
        check.close()
    assert not lost, f"{len(lost)} returned record(s) lost over {TRIALS} crashes: {lost}"
    final = PostgresStore(url, spool=None)
    report = verify_chain(final)
    assert report.ok and report.checked == 2 * TRIALS, report
    final.close()


def test_a_server_without_fsync_is_one_warning() -> None:
    """fsync=off on the server: the store says once that returned records are not safe
    from an OS crash."""
    import logging

    with private_cluster({"fsync": "off"}) as c:
        logger = logging.getLogger("coworker.audit")
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
        logger.addHandler(handler)
        try:
            store = PostgresStore(c.url + "?schema=nofsync", spool=None)
            store.append([entry(1)])
            store.close()
        finally:
            logger.removeHandler(handler)
    assert len([m for m in seen if "fsync=off" in m]) == 1, seen


def test_a_duplicate_found_on_retry_is_durable_before_it_is_answered() -> None:
    """Writer A commits an entry asynchronously (``submit_unique``, its flush not yet sent);
    writer B's retry of the same entry (its first attempt's connection was lost) finds A's
    row by the dedup key and answers "duplicate"; the server crashes: the record B was told
    is stored is in the log after recovery, because B's retry flushed before it answered.

    ``wal_writer_delay`` = 10 s (the most PostgreSQL allows): A's commit record stays in the
    server's WAL buffers, not even written to the OS, until a synchronous commit flushes it.
    """
    with private_cluster({"wal_writer_delay": "10s"}) as c:
        url = c.url + "?schema=dup"
        first = {"kind": "span", "category": "state-change", "operation": "update", "i": 1}
        key = b"trace-and-span-id-1".ljust(24, b".")
        a = PostgresStore(url, spool=None)
        b = PostgresStore(url, spool=None)
        psycopg = import_psycopg()
        try:
            pending = a.submit_unique([first], None, [key])
            assert pending._ticket is not None  # committed asynchronously, flush still owed
            conn = b._conn
            assert conn is not None
            with psycopg.connect(c.url, autocommit=True) as admin:
                # B's connection dies (the backend gone, not just signalled) before it sends:
                # its first attempt is lost, the retry takes the locked path (_write).
                (gone,) = admin.execute(
                    "SELECT pg_terminate_backend(%s, 10000)", (conn.info.backend_pid,)
                ).fetchone()
            assert gone
            result = b.append_unique([first], None, [key])
            assert result.records == [] and result.duplicates == [0]  # answered: stored
            assert b._conn is not conn  # the answer came from the retry's connection
            c.crash()  # before A's flush (A never waits)
        finally:
            a.close()
            b.close()
        c.start()
        check = PostgresStore(url, spool=None)
        try:
            assert [json.loads(r.body)["i"] for r in check.iter_from()] == [1]
            assert verify_chain(check).ok
        finally:
            check.close()
