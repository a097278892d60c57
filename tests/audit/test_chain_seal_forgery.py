"""What may pass for a seal on PostgreSQL: exactly what :func:`coworker.audit.chain_seal.is_seal`
calls one. A record a writer (or an ingest client, through a span's audit category) chose to
file under the seal's category must neither seal the chain behind verify's back nor make
every later append fail (the real PostgreSQL server, the real ingest endpoint)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from coworker.audit.chain import genesis
from coworker.audit.chain_seal import ChainSealed, sealed_head
from coworker.audit.urls import open_store, with_chain

pytestmark = pytest.mark.postgres

TOKEN = "test-token-0123456789abcdef"


def lock_head(pg: Any, store: Any) -> Any:
    """The head lock_head() (the path of a writer retrying an attempt) returns, as the
    store's connection role would see it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg.url) as conn:
        query = sql.SQL("SELECT * FROM {}(%s)").format(sql.Identifier(store.schema, "lock_head"))
        return conn.execute(query, (store._oid,)).fetchone()


def entry(i: int) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "create", "i": i}


def _seal_like(**fields: Any) -> dict[str, Any]:
    return {
        "category": "chain-seal",
        "kind": "chain",
        "operation": "seal",
        "chain_name": "billing",
        "chain_genesis": genesis("billing").hex(),
        **fields,
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"category": "chain-seal", "kind": "chain", "operation": "seal"},
        _seal_like(chain_name="payroll"),
        _seal_like(chain_genesis=genesis("payroll").hex()),
        _seal_like(a_key_before_category=1),
        {"category": "chain-seal", "kind": "outcome", "name": "a\x00b"},
    ],
    ids=["no-chain-name", "another-chain", "another-genesis", "not-its-prefix", "nul-in-body"],
)
def test_a_record_that_is_not_the_chains_seal_seals_nothing_on_postgres(
    pg: Any, fields: dict[str, Any]
) -> None:
    """append() refused every later append after a record of the category chain-seal with
    kind chain and operation seal, whatever chain it named (and verify, whose is_seal did not
    call it a seal, said the chain was fine), or failed every later append with jsonb's
    error when the head's body held a \\u0000: the chain could never be written again."""
    url = with_chain(pg.schema_url(spool="off"), "billing")
    store = open_store(url)
    try:
        store.append([entry(0), fields])
        assert sealed_head(store) is None
        assert lock_head(pg, store)[0] == 2
        (record,) = store.append([entry(1)])
        assert record.seq == 3
    finally:
        store.close()


def test_the_real_seal_still_seals_on_postgres(pg: Any) -> None:
    """The seal's own bytes (retire-chain's) still refuse: both the server-side append() and
    the lock_head() path of a writer retrying an attempt."""
    from coworker.audit.chain_seal import seal

    url = with_chain(pg.schema_url(spool="off"), "billing")
    store = open_store(url)
    try:
        store.append([entry(0)])
        head = seal(store, "tenant left")
        assert sealed_head(store) == head
        with pytest.raises(ChainSealed, match="sealed at seq 2"):
            store.append([entry(1)])
        import psycopg

        with pytest.raises(psycopg.Error, match="sealed at seq 2") as refused:
            lock_head(pg, store)
        assert refused.value.sqlstate == "CWSEA"
    finally:
        store.close()


def test_an_ingest_client_cannot_make_the_log_unwritable_with_the_seal_category(pg: Any) -> None:
    """A client with a token sent a span filed under coworker.audit.category "chain-seal"
    whose name held a NUL: it was recorded, and from then on append() failed on every
    request (jsonb cannot read \\u0000): every later span was answered 503, for good."""
    from tests.deps import require

    require("starlette", "the server extra")
    require("uvicorn", "the server extra")
    import httpx

    from coworker.audit.store_postgres import PostgresStore
    from coworker.ingest import IngestServer

    def span(span_id: str, name: str, category: str) -> dict[str, Any]:
        return {
            "traceId": "0af7651916cd43dd8448eb211c80319c",
            "spanId": span_id,
            "name": name,
            "startTimeUnixNano": "1700000000000000000",
            "endTimeUnixNano": "1700000000000000001",
            "attributes": [
                {"key": "coworker.audit", "value": {"boolValue": True}},
                {"key": "coworker.audit.category", "value": {"stringValue": category}},
            ],
        }

    def post(server: Any, one: dict[str, Any]) -> int:
        body = {
            "resourceSpans": [
                {
                    "resource": {"attributes": []},
                    "scopeSpans": [{"scope": {"name": "t"}, "spans": [one]}],
                }
            ]
        }
        r = httpx.post(
            server.endpoint,
            content=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        return r.status_code

    store = PostgresStore(pg.schema_url(), spool=None)
    try:
        with IngestServer(store, token=TOKEN) as server:
            assert post(server, span("b7ad6b7169203331", "a\x00b", "chain-seal")) == 200
            assert post(server, span("b7ad6b7169203332", "update", "state-change")) == 200
        assert [r.fields()["name"] for r in store.iter_from(1)] == ["a\x00b", "update"]
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_reason_jsonb_cannot_read_is_refused_before_anything_is_written(
    backend: str, pg: Any, tmp_path: Any
) -> None:
    """A seal whose reason held a NUL was no seal to PostgreSQL's append() (jsonb cannot
    read \\u0000) while is_seal called it one: writers kept appending after a chain the
    registry called retired. The reason is refused with a clear error, nothing written."""
    from coworker.audit.chain_seal import retire
    from coworker.exceptions import ConfigError

    base = f"sqlite:///{tmp_path / 'a.db'}" if backend == "sqlite" else pg.schema_url(spool="off")
    default = open_store(base)
    default.append([entry(0)])
    default.close()
    store = open_store(with_chain(base, "billing"))
    try:
        store.append([entry(1)])
        with pytest.raises(ConfigError, match="NUL"):
            retire(store, "tenant\x00left")
        (record,) = store.append([entry(2)])
        assert record.seq == 2 and sealed_head(store) is None
    finally:
        store.close()
