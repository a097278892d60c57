"""The AuditStore contract, run against every backend.

Backends are fixtures named ``<kind>_store``; :data:`STORE_KINDS` lists them. A backend adds
itself by defining its fixture in this module and appending its kind (issue 5 adds
``postgres``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.chain import GENESIS_PREV_HASH, link
from coworker.audit.store import AuditStore, InMemoryStore
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain
from tests.audit.conftest import make_entries

STORE_KINDS = ["memory", "sqlite", "postgres"]


@pytest.fixture
def memory_store() -> Iterator[AuditStore]:
    """The in-memory store."""
    store = InMemoryStore()
    yield store
    store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[AuditStore]:
    """A SQLite store on a real file."""
    store = SQLiteStore(tmp_path / "contract.db")
    yield store
    store.close()


@pytest.fixture(scope="module")
def pg_database() -> Iterator[Any]:
    """A fresh database on the real PostgreSQL server (skips, or fails under CI, without it)."""
    from tests.pg import PGServer, require_server  # skips, or fails under CI, without psycopg

    server = PGServer(require_server())
    yield server
    server.close()


@pytest.fixture
def postgres_store(pg_database: Any, tmp_path: Path) -> Iterator[AuditStore]:
    """A PostgresStore in a fresh schema, with its spool in tmp_path."""
    from coworker.audit.store_postgres import PostgresStore

    store = PostgresStore(pg_database.schema_url(), spool=tmp_path / "spool.db")
    yield store
    store.close()


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest) -> Any:
    """Each backend in turn."""
    return request.getfixturevalue(f"{request.param}_store")


def test_is_an_audit_store(store: AuditStore) -> None:
    """Every backend satisfies the runtime-checkable protocol."""
    assert isinstance(store, AuditStore)


def test_empty_log(store: AuditStore) -> None:
    """An empty log has no head and yields nothing."""
    assert store.head() is None
    assert list(store.iter_from(1)) == []
    assert store.append([]) == []


def test_append_seals_from_genesis(store: AuditStore) -> None:
    """The first append starts at seq 1 from the genesis hash; head follows."""
    (fields, payload), (f2, p2) = make_entries(2)
    first = store.append([fields], [payload])
    assert [r.seq for r in first] == [1]
    assert first[0].prev_hash == GENESIS_PREV_HASH
    second = store.append([f2], [p2])
    assert second[0].seq == 2 and second[0].prev_hash == first[0].hash
    head = store.head()
    assert head is not None and (head.seq, head.hash) == (2, second[0].hash)


def test_iter_from_returns_bytes_as_hashed(store: AuditStore) -> None:
    """Stored records come back byte-identical and in seq order, from any seq."""
    entries = make_entries(5)
    sealed = store.append([e[0] for e in entries], [e[1] for e in entries])
    got = list(store.iter_from(1))
    assert [(r.seq, r.prev_hash, r.hash, r.body) for r in got] == [
        (r.seq, r.prev_hash, r.hash, r.body) for r in sealed
    ]
    for r in got:
        assert link(r.prev_hash, r.body) == r.hash
    assert [r.seq for r in store.iter_from(4)] == [4, 5]
    assert list(store.iter_from(6)) == []


def test_payload_round_trip(store: AuditStore) -> None:
    """Payloads are stored beside the record and returned with it."""
    fields, _ = make_entries(1)[0]
    store.append([fields, fields], [b'{"input":"x"}', None])
    got = list(store.iter_from(1))
    assert got[0].payload == b'{"input":"x"}'
    assert got[1].payload is None


def test_fields_decode(store: AuditStore) -> None:
    """A stored body decodes to the fields plus its seq."""
    fields, _ = make_entries(1)[0]
    (rec,) = store.append([fields])
    assert rec.fields() == {**fields, "seq": 1}


def test_concurrent_appends_are_gapless(store: AuditStore) -> None:
    """Appends from many threads never fork the chain or skip a seq."""
    entries = make_entries(4)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(25):
                store.append([e[0] for e in entries])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.seq for r in store.iter_from(1)] == list(range(1, 401))
    assert verify_chain(store).ok


def test_close_is_idempotent(store: AuditStore) -> None:
    """close() may be called twice."""
    store.close()
    store.close()
