"""The server-side append of PostgresStore (schema versions 4 and 5): the database seals exactly the
bytes coworker.audit.chain hashes, and an append whose answer was lost is found, not repeated."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pg import import_psycopg

psycopg = import_psycopg()

from coworker.audit.chain import GENESIS_PREV_HASH, Prepared, link  # noqa: E402
from coworker.audit.record import canonical  # noqa: E402
from coworker.audit.spool import Spool  # noqa: E402
from coworker.audit.store_postgres import PostgresStore  # noqa: E402
from coworker.audit.store_postgres._wire import (  # noqa: E402
    _ByteaArray,
    _column_arrays,
    _column_values,
    _TextArray,
)
from coworker.audit.store_postgres.writes import _APPEND_TYPES  # noqa: E402
from coworker.audit.verify import verify_chain  # noqa: E402
from tests.pg import PGServer, require_server, with_user  # noqa: E402

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


def entry(i: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "create", "i": i, **extra}


HOSTILE: list[dict[str, Any]] = [
    entry(1, user_id="björn ☃ \U0001f600", note='\u2028\u2029 "quoted" \\ back\\slash'),
    entry(2, text="x" * 200_000, ctrl="\x01\x07\x1f\x7f", tab="a\tb\nc\rd"),
    entry(3, big=2**53 - 1, neg=-(2**53 - 1), zero=0, t=True, f=False, n=None),
    entry(4, floats=None, f1=1.5e-7, f2=1e21, f3=-0.0, f4=0.1, f5=123456.789),
    entry(5, nested={"b": [1, "two", {"z": None, "a": 1.0}], "a": "é"}, k="\u00e9\u0301"),
    entry(6, nul="before\x00after", surrogate_free="\ud7ff\ue000\uffff"),
    {"seq_like": '"seq":0', "kind": "outcome", "s": 'x"seq":5'},
    {"\u00e9key": 1, "kind": "outcome", "a\u0000b": "key with NUL"},
]


def test_database_seals_the_bytes_chain_py_hashes(store: PostgresStore) -> None:
    """Hostile values (unicode, 200 kB strings, big ints, floats, nested, NUL escapes, keys
    that look like the seq): the stored body is canonical() of the entry with its seq, and the
    hash is chain.link over it, byte for byte."""
    assert store._version >= 4
    written = store.append(HOSTILE[:3]) + store.append(HOSTILE[3:])
    stored = list(store.iter_from())
    assert stored == written
    prev = GENESIS_PREV_HASH
    for fields, rec in zip(HOSTILE, stored, strict=True):
        assert rec.body == canonical({**fields, "seq": rec.seq})
        assert rec.prev_hash == prev
        assert rec.hash == link(prev, rec.body)
        prev = rec.hash
    assert verify_chain(store).ok


def test_seq_digits_grow_across_batches(store: PostgresStore) -> None:
    """Seqs 9 -> 10 and 99 -> 100 inside one server-side batch: the spliced digits match."""
    store.append([entry(i) for i in range(8)])
    store.append([entry(i) for i in range(8, 105)])
    for rec in store.iter_from():
        assert rec.body == canonical({**entry(json.loads(rec.body)["i"]), "seq": rec.seq})
    report = verify_chain(store)
    assert report.ok and report.checked == 105, report


def _call_append(store: PostgresStore, nonce: bytes, entries: list[dict[str, Any]]) -> None:
    """What a _write_fast call sends, with a nonce we choose; its answer is thrown away."""
    halves = [Prepared(e).halves for e in entries]
    plain = [_column_values(e) for e in entries]
    params: list[Any] = [
        nonce,
        _ByteaArray.of([h[0] for h in halves]),
        _ByteaArray.of([h[1] for h in halves]),
        None,
        None,
        *[_TextArray.of([row[c] for row in plain]) for c in range(len(plain[0]))],
    ]
    _exec_append(store, params)


def _exec_append(store: PostgresStore, params: list[Any]) -> None:
    """Run the store's append() statement with these parameters (binary), answer unread."""
    with store._lock:
        conn = store._connection()
        res = conn.pgconn.exec_params(
            store._append_statement(),
            [p if p is None or isinstance(p, bytes) else p.data for p in params],
            list(_APPEND_TYPES),
            [1] * len(params),
        )
        assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message


def test_lost_answer_of_a_server_side_append_is_not_shipped_twice(
    store: PostgresStore, tmp_path: Path
) -> None:
    """An append() that committed but whose answer never came back (its spool entries carry
    the call's nonce): shipping finds its rows and appends only what did not commit."""
    store.append([entry(0)])
    floor = store.head().seq  # type: ignore[union-attr]
    nonce = b"\x42" * 16
    _call_append(store, nonce, [entry(1), entry(2)])
    mark = (-floor - 1, nonce + bytes(16))  # as the spool keeps it (32 bytes)
    spool = Spool(tmp_path / "spool.db")
    spool.put([entry(1), entry(2)], attempted=[(mark,), (mark,)])
    spool.put([entry(3)], attempted=[((-floor - 1, b"\x43" * 32),)])  # never committed
    spool.close()
    shipper = PostgresStore(store.url, spool=tmp_path / "spool.db")  # finds the spool
    assert shipper.ship() == 0
    shipper.close()
    assert [json.loads(r.body)["i"] for r in store.iter_from()] == [0, 1, 2, 3]
    assert verify_chain(store).ok


def test_a_lost_answer_with_two_identical_entries_reports_both_rows(
    store: PostgresStore,
) -> None:
    """Two byte-identical entries in one lost append() call are two rows: the retry that finds
    them reports each row once (it gave the first row twice and never the second)."""
    from coworker.audit.store_postgres._wire import _Item

    store.append([entry(0)])
    floor = store.head().seq  # type: ignore[union-attr]
    nonce = b"\x44" * 16
    _call_append(store, nonce, [entry(1), entry(1)])
    mark = (-floor - 1, nonce + bytes(16))
    items = [_Item(entry(1), None, None, (mark,)), _Item(entry(1), None, None, (mark,))]
    with store._lock:
        result = store._write_with_retry(items)
    assert [r.seq for r in result.records] == [floor + 1, floor + 2]
    assert [json.loads(r.body)["i"] for r in store.iter_from()] == [0, 1, 1]


def test_same_bytes_from_another_call_are_not_taken_for_ours(
    store: PostgresStore, tmp_path: Path
) -> None:
    """Byte-identical entries appended by another call (another nonce) do not count as the lost
    attempt: the entry is appended, nothing is silently dropped."""
    floor = 0
    _call_append(store, b"\x01" * 16, [entry(7)])  # someone else's identical entry
    spool = Spool(tmp_path / "spool.db")
    spool.put([entry(7)], attempted=[((-floor - 1, b"\x02" * 32),)])
    spool.close()
    shipper = PostgresStore(store.url, spool=tmp_path / "spool.db")
    assert shipper.ship() == 0
    shipper.close()
    assert [json.loads(r.body)["i"] for r in store.iter_from()] == [7, 7]


def test_rows_carry_the_nonce_of_their_call(pg: PGServer, store: PostgresStore) -> None:
    """Every row of one append() call carries the same nonce; another call, another nonce."""
    store.append([entry(1), entry(2)])
    store.append([entry(3)])
    rows = pg_rows(pg, store, "SELECT seq, attempt FROM {s}.records ORDER BY seq")
    assert rows[0][1] == rows[1][1] != rows[2][1]
    assert all(len(bytes(r[1])) == 16 for r in rows)


def pg_rows(pg: PGServer, store: PostgresStore, query: str) -> list[Any]:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        return conn.execute(query.format(s=f'"{store.schema}"').encode()).fetchall()


def test_chain_check_refuses_a_bad_row_inside_a_multi_row_insert(
    pg: PGServer, store: PostgresStore
) -> None:
    """The database's chain check refuses a writer role's raw multi-row INSERT whose second
    row skips a seq or does not link to the first, or whose rows come in descending order
    (version 5 reads them in insertion order), and accepts a correct one."""
    from coworker.audit.chain import seal
    from coworker.audit.store import Head
    from coworker.audit.store_postgres import writer_grants

    writer = pg.create_role("mr_writer")
    for grant in writer_grants(writer, store.schema):
        pg.execute(grant)
    (first,) = store.append([entry(0)])
    head = Head(first.seq, first.hash)
    plain = [{"n": 1}, {"n": 2}]  # no query columns: the raw rows need none
    good = seal(plain, head)
    skip = [good[0], seal(plain[1:], Head(good[0].seq + 1, good[0].hash))[0]]  # 2, then 4
    unlinked = [good[0], seal(plain[1:], Head(good[0].seq, b"\x07" * 32))[0]]
    table = f'"{store.schema}".records'
    with psycopg.connect(with_user(pg.url, writer), autocommit=True) as conn:
        for rows in (skip, unlinked, good[::-1]):
            with pytest.raises(psycopg.errors.IntegrityConstraintViolation):
                conn.execute(
                    f"INSERT INTO {table} (seq, prev_hash, hash, body) VALUES "
                    "(%s, %s, %s, %s), (%s, %s, %s, %s)",
                    [v for r in rows for v in (r.seq, r.prev_hash, r.hash, r.body)],
                )
        conn.execute(
            f"INSERT INTO {table} (seq, prev_hash, hash, body) VALUES "
            "(%s, %s, %s, %s), (%s, %s, %s, %s)",
            [v for r in good for v in (r.seq, r.prev_hash, r.hash, r.body)],
        )
    assert [r.seq for r in store.iter_from()] == [1, 2, 3]
    assert verify_chain(store).ok


@pytest.mark.parametrize(
    ("before", "after"),
    [(b'{"seq":99,"x":', b"}"), (b'{"note":"', b'"}'), (b"not json ", b"")],
    ids=["wrong-seq", "no-seq", "not-json"],
)
def test_append_called_with_crafted_halves_is_found_malformed(
    store: PostgresStore, before: bytes, after: bytes
) -> None:
    """A writer role calling append() itself can chain any bytes around the seq (the links and
    the database's chain check hold): verify names the row ``malformed``."""
    from coworker.audit.store import MALFORMED
    from coworker.audit.store_postgres._wire import _COLUMNS

    store.append([entry(0)])
    params: list[Any] = [b"\x07" * 16, _ByteaArray.of([before]), _ByteaArray.of([after])]
    params += [None, None, *[_TextArray.of([None]) for _ in range(len(_COLUMNS) + 1)]]
    with store._lock:
        _exec_append(store, params)
    report = verify_chain(store)
    assert not report.ok
    assert [(p.kind, p.seq) for p in report.problems] == [(MALFORMED, 2)], report.problems


def test_column_arrays_are_the_row_by_row_arrays() -> None:
    """The query-column arrays built column by column are byte for byte the arrays of
    _column_values row by row, on hostile values (NUL, lone surrogates, numbers, objects,
    missing fields, the time from start or recorded_at)."""
    rows: list[dict[str, Any]] = [
        entry(0, user_id="a\x00b", flow_id="\ud800x", start="2026-01-01T00:00:00Z"),
        {"kind": 7, "category": {"x": [1, 2]}, "recorded_at": "2026-01-02T00:00:00Z"},
        {},
        entry(3, operation="☃" * 1000, run_id=None, doctype=1.5, outcome=True),
    ]
    plain = [_column_values(r) for r in rows]
    expected = [_TextArray.of([row[c] for row in plain]).data for c in range(len(plain[0]))]
    assert [a.data for a in _column_arrays(rows)] == expected
    assert [a.data for a in _column_arrays([])] == [_TextArray.of([]).data] * len(expected)


def test_append_after_a_failed_first_append_on_a_connection(
    pg: PGServer, store: PostgresStore
) -> None:
    """The first append on a connection prepares its statements in the same round trip; when
    that append then fails (here: REPEATABLE READ), the statements stay prepared and the next
    append uses them (it does not prepare them twice and fail)."""
    with store._lock:
        conn = store._connection()
        conn.execute("SET default_transaction_isolation = 'repeatable read'")
    from coworker.exceptions import AuditUnavailable

    with pytest.raises(AuditUnavailable, match="needs READ COMMITTED"):
        store.append([entry(1)])
    with store._lock:
        assert store._connection() is conn  # the same session, statements prepared
        conn.execute("SET default_transaction_isolation = 'read committed'")
    assert [r.seq for r in store.append([entry(2)])] == [1]
    assert verify_chain(store).ok


def test_append_with_another_owner_or_rights_is_a_guard_finding(
    pg: PGServer, store: PostgresStore
) -> None:
    """append() runs with its owner's rights and the chain check trusts the owner's rows: an
    append() owned by another role, or no longer SECURITY DEFINER, is reported by verify."""
    from coworker.audit.verify import GUARD

    store.append([entry(1)])
    other = pg.create_role("fn_owner")
    s = f'"{store.schema}"'
    signature = f"{s}.append(integer, bytea, bytea[], bytea[], bytea[], bytea[]{', text[]' * 14})"
    pg.execute(f'ALTER FUNCTION {signature} OWNER TO "{other}"')
    reader = PostgresStore(store.url, readonly=True)
    report = verify_chain(reader)
    assert any(
        p.kind == GUARD and "append is not owned by the owner of records" in p.detail
        for p in report.problems
    ), report
    pg.execute(f"ALTER FUNCTION {signature} OWNER TO CURRENT_USER")
    pg.execute(f"ALTER FUNCTION {signature} SECURITY INVOKER")
    report = verify_chain(reader)
    assert any(p.kind == GUARD and "append is altered" in p.detail for p in report.problems)
    reader.close()


def test_a_role_that_may_not_insert_cannot_append_through_append(
    pg: PGServer, store: PostgresStore
) -> None:
    """append() inserts with its owner's rights (version 5): an auditor role with USAGE and
    SELECT only that calls it is refused (insufficient privilege), and nothing is appended."""
    from coworker.audit.store_postgres._wire import _COLUMNS

    store.append([entry(0)])
    auditor = pg.create_role("auditor")
    pg.execute(f'GRANT USAGE ON SCHEMA "{store.schema}" TO "{auditor}"')
    pg.execute(f'GRANT SELECT ON "{store.schema}".records TO "{auditor}"')
    before, after = Prepared(entry(1)).halves
    params = [b"\x09" * 16, _ByteaArray.of([before]).data, _ByteaArray.of([after]).data]
    params += [None, None, *[_TextArray.of([None]).data for _ in range(len(_COLUMNS) + 1)]]
    with psycopg.connect(with_user(store._conninfo, auditor), autocommit=True) as conn:
        res = conn.pgconn.exec_params(
            store._append_statement(), params, list(_APPEND_TYPES), [1] * len(params)
        )
    assert res.status == psycopg.pq.ExecStatus.FATAL_ERROR
    assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42501"
    assert b"may not insert" in (res.error_message or b"")
    assert [r.seq for r in store.iter_from()] == [1]
