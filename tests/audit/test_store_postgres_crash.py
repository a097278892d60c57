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
