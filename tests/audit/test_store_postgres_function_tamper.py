"""An owner of the PostgreSQL audit schema altering append() in ways its source text, rights
and settings do not show: verify must report it, and an append must never be answered as done
for records the function did not insert."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pg import import_psycopg

psycopg = import_psycopg()

from coworker.audit.store import GUARD  # noqa: E402
from coworker.audit.store_postgres import PostgresStore  # noqa: E402
from coworker.audit.verify import verify_chain  # noqa: E402
from coworker.exceptions import AuditUnavailable  # noqa: E402
from tests.pg import PGServer, require_server  # noqa: E402

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg() -> Iterator[PGServer]:
    server = PGServer(require_server())
    yield server
    server.close()


@pytest.fixture
def store(pg: PGServer, tmp_path: Path) -> Iterator[PostgresStore]:
    s = PostgresStore(pg.schema_url(), spool=tmp_path / "spool.db", encrypt_payloads=False)
    yield s
    s.close()


def entry(i: int) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "create", "i": i}


def _signature(store: PostgresStore) -> str:
    s = f'"{store.schema}"'
    return f"{s}.append(integer, bytea, bytea[], bytea[], bytea[], bytea[]{', text[]' * 14})"


def _guard_details(store: PostgresStore) -> list[str]:
    reader = PostgresStore(store.url, readonly=True)
    try:
        return [p.detail for p in verify_chain(reader).problems if p.kind == GUARD]
    finally:
        reader.close()


def test_an_append_made_strict_is_reported_and_drops_nothing(
    pg: PGServer, store: PostgresStore
) -> None:
    """``ALTER FUNCTION append STRICT`` keeps its source, rights and settings, but makes it
    return no row (and insert nothing) for a call with a NULL argument, e.g. no payloads: the
    append fails loudly instead of answering done, and verify names the function."""
    store.append([entry(1)])
    pg.execute(f"ALTER FUNCTION {_signature(store)} STRICT")
    with pytest.raises(AuditUnavailable):
        result = store.append([entry(2)])
        pytest.fail(f"append answered {result!r} with nothing inserted")
    assert [r.seq for r in store.iter_from()] == [1]
    assert any("append" in d for d in _guard_details(store))


def test_an_overload_with_coworkers_source_does_not_hide_an_altered_function(
    pg: PGServer, store: PostgresStore
) -> None:
    """Functions are compared by name: ``owner_writes()`` made to answer true (a writer
    role's raw INSERTs then skip the chain check) next to an ``owner_writes(integer)`` holding
    coworker's source is reported as an overload, not taken for coworker's function."""
    store.append([entry(1)])
    s = f'"{store.schema}"'
    with psycopg.connect(pg.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s AND p.proname = 'owner_writes'",
            (store.schema,),
        ).fetchone()
        assert row is not None
        conn.execute(
            f"CREATE FUNCTION {s}.owner_writes(x integer) RETURNS boolean LANGUAGE plpgsql"
            f" STABLE AS $${row[0]}$$".encode()
        )
        conn.execute(
            f"CREATE OR REPLACE FUNCTION {s}.owner_writes() RETURNS boolean LANGUAGE sql"
            " STABLE AS $$ SELECT true $$".encode()
        )
    details = _guard_details(store)
    assert any("owner_writes is overloaded" in d for d in details), details


def test_the_durable_flush_is_pg_catalogs_whatever_the_search_path(
    pg: PGServer, tmp_path: Path
) -> None:
    """The flush after an append (the wait for the WAL) names pg_catalog's functions: a
    database owner's ``ALTER DATABASE ... SET search_path = evil, pg_catalog`` with a no-op
    ``pg_logical_emit_message`` in ``evil`` would make every append answer durable before its
    commit is on disk."""
    pg.execute("CREATE SCHEMA evil")
    pg.execute("CREATE TABLE evil.calls (n integer)")
    pg.execute("GRANT USAGE ON SCHEMA evil TO PUBLIC")
    pg.execute(
        "CREATE FUNCTION evil.pg_logical_emit_message(boolean, text, bytea) RETURNS pg_lsn"
        " LANGUAGE sql AS $$ INSERT INTO evil.calls VALUES (1) RETURNING '0/0'::pg_lsn $$"
    )
    pg.execute(f'ALTER DATABASE "{pg.dbname}" SET search_path = evil, pg_catalog, public')
    store = PostgresStore(pg.schema_url(), spool=tmp_path / "spool.db", encrypt_payloads=False)
    try:
        store.append([entry(1)])
        store.append([entry(2)])
        assert [r.seq for r in store.iter_from()] == [1, 2]
    finally:
        store.close()
        pg.execute(f'ALTER DATABASE "{pg.dbname}" RESET search_path')
    with psycopg.connect(pg.url) as conn:
        row = conn.execute("SELECT count(*) FROM evil.calls").fetchone()
    assert row == (0,)
