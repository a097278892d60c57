"""PostgresStore against the real PostgreSQL server: schema, append-only enforcement, roles,
fork refusal, concurrency across processes, outages and the spool."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pg import import_psycopg

psycopg = import_psycopg()

from coworker.audit.chain import GENESIS_PREV_HASH, link  # noqa: E402
from coworker.audit.spool import Spool  # noqa: E402
from coworker.audit.store import Head  # noqa: E402
from coworker.audit.store_postgres import (  # noqa: E402
    SCHEMA_VERSION,
    PostgresStore,
    default_spool_path,
    writer_grants,
)
from coworker.audit.store_postgres.writes import _APPEND_TYPES  # noqa: E402
from coworker.exceptions import AuditUnavailable, ConfigError  # noqa: E402
from tests.pg import (  # noqa: E402
    PGServer,
    proxy_to,
    require_server,
    with_hostport,
    with_user,
)

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg() -> Iterator[PGServer]:
    server = PGServer(require_server())
    yield server
    server.close()


@pytest.fixture
def url(pg: PGServer) -> str:
    return pg.schema_url()


@pytest.fixture
def store(url: str, tmp_path: Path) -> Iterator[PostgresStore]:
    s = PostgresStore(url, spool=tmp_path / "spool.db", ship_interval=0.1)
    yield s
    s.close()


def entry(i: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "create", "i": i, **extra}


def check_chain(store: PostgresStore) -> list[dict[str, Any]]:
    """Re-hash the log (our own loop and the audit verify_chain); return the decoded bodies."""
    prev, expected, bodies = GENESIS_PREV_HASH, 1, []
    for rec in store.iter_from():
        assert rec.seq == expected, f"gap or reorder at {expected}: found {rec.seq}"
        assert rec.prev_hash == prev
        assert rec.hash == link(prev, rec.body)
        assert json.loads(rec.body)["seq"] == rec.seq
        prev, expected = rec.hash, expected + 1
        bodies.append(json.loads(rec.body))
    try:
        from coworker.audit.verify import verify_chain
    except ImportError:  # pragma: no cover - the audit issue's verify not there yet
        return bodies
    report = verify_chain(store)
    assert report.ok, report
    return bodies


def sql_rows(url_or_pg: PGServer, query: str, *, user: str | None = None) -> list[Any]:
    target = url_or_pg.url if user is None else with_user(url_or_pg.url, user)
    with psycopg.connect(target, autocommit=True) as conn:
        return conn.execute(query.encode()).fetchall()


def schema_of(url: str) -> str:
    return url.split("schema=")[1].split("&")[0]


# -- schema ------------------------------------------------------------------------------------
def test_schema_is_created_on_first_use_once_and_versioned(pg: PGServer, url: str) -> None:
    """The first store creates the schema; later and concurrent opens reuse it unchanged."""
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(PostgresStore(url, spool=None))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    schema = schema_of(url)
    versions = sql_rows(pg, f'SELECT version FROM "{schema}".schema_version ORDER BY version')
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]  # each migration once
    types = dict(
        sql_rows(
            pg,
            "SELECT column_name, data_type FROM information_schema.columns "
            f"WHERE table_schema = '{schema}' AND table_name = 'records'",
        )
    )
    assert types["body"] == types["hash"] == types["prev_hash"] == "bytea"
    for s in stores:
        s.close()


def test_concurrent_first_opens_never_run_the_ddl_twice(pg: PGServer) -> None:
    """10 rounds of 8 stores opening a new schema at once: one creates it, the others wait
    for its lock and then see it (none fails with "relation already exists")."""
    for _ in range(10):
        url = pg.schema_url()
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []
        opened: list[PostgresStore] = []

        def open_one(
            url: str = url,
            barrier: threading.Barrier = barrier,
            opened: list[PostgresStore] = opened,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                opened.append(PostgresStore(url, spool=None))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in opened:
            s.close()
        assert not errors, errors


def test_newer_schema_version_is_refused(pg: PGServer, url: str) -> None:
    """A schema written by a newer coworker is not used."""
    PostgresStore(url, spool=None).close()
    pg.execute(f'INSERT INTO "{schema_of(url)}".schema_version (version) VALUES (99)')
    with pytest.raises(ConfigError, match="schema version 99"):
        PostgresStore(url, spool=None)


# -- the store contract ------------------------------------------------------------------------
def test_append_head_iter_close(store: PostgresStore) -> None:
    """append seals in order from seq 1, head follows, iter_from reads the bytes as hashed."""
    assert store.head() is None
    assert store.append([]) == []
    first = store.append([entry(1), entry(2)], [b"payload", None])
    assert [r.seq for r in first] == [1, 2]
    assert first[0].prev_hash == GENESIS_PREV_HASH
    second = store.append([entry(3)])
    assert second[0].prev_hash == first[1].hash
    assert store.head() == Head(3, second[0].hash)
    got = list(store.iter_from())
    assert got == first + second
    assert got[0].payload == b"payload"
    assert [r.seq for r in store.iter_from(2)] == [2, 3]
    check_chain(store)
    store.close()
    store.close()
    with pytest.raises(AuditUnavailable):
        store.append([entry(4)])


def test_bytes_are_stored_exactly_as_hashed(pg: PGServer, store: PostgresStore, url: str) -> None:
    """The body column holds the canonical bytes; sha256(prev_hash || body) is the hash column."""
    store.append([entry(1, user_id="ünï", note="a\u2028b")])
    ((body, prev, digest),) = sql_rows(
        pg, f'SELECT body, prev_hash, hash FROM "{schema_of(url)}".records'
    )
    assert hashlib.sha256(bytes(prev) + bytes(body)).digest() == bytes(digest)
    assert json.loads(bytes(body))["user_id"] == "ünï"


def test_values_postgres_text_cannot_hold_still_append(store: PostgresStore) -> None:
    """NUL and lone surrogates in a field: the body keeps them, the append does not fail."""
    store.append([entry(1, flow_id="a\x00b", user_id="x\ud800y")])
    (rec,) = store.iter_from()
    assert json.loads(rec.body)["flow_id"] == "a\x00b"
    assert [r.seq for r in store.search({"flow_id": "a\ufffdb"})] == [1]


def test_search_filters_use_the_plain_columns(store: PostgresStore) -> None:
    """search() filters on the columns derived from the body, like the SQLite store."""
    store.append(
        [
            entry(1, flow_id="f1", user_id="alice", start="2026-01-01T00:00:00.000000000Z"),
            entry(2, flow_id="f2", user_id="bob", start="2026-01-02T00:00:00.000000000Z"),
            entry(3, flow_id="f1", user_id="bob", start="2026-01-03T00:00:00.000000000Z"),
        ]
    )
    assert [r.seq for r in store.search({"flow_id": "f1"})] == [1, 3]
    assert [r.seq for r in store.search({"flow_id": "f1", "user": "bob"})] == [3]
    assert [r.seq for r in store.search({}, since="2026-01-02T00:00:00.000000000Z")] == [2, 3]
    assert [r.seq for r in store.search({}, until="2026-01-02T00:00:00.000000000Z")] == [1]
    assert [r.seq for r in store.search({}, limit=2)] == [1, 2]
    with pytest.raises(ConfigError):
        list(store.search({"nope": "x"}))


def test_open_intents_are_intents_without_a_later_outcome(store: PostgresStore) -> None:
    """open_intents() (the in-doubt fast path) matches intents and outcomes by span."""
    store.append(
        [
            entry(1, kind="intent", trace_id="t1", span_id="s1"),
            entry(2, kind="intent", trace_id="t1", span_id="s2"),
            entry(3, kind="outcome", trace_id="t1", span_id="s1"),
            entry(4, kind="outcome", trace_id="t2", span_id="s2"),
        ]
    )
    assert store.open_intents() == [2]


def test_append_unique_records_a_key_once(store: PostgresStore) -> None:
    """A dedup key already in the log (or twice in one batch) is skipped, not re-recorded."""
    r1 = store.append_unique([entry(1), entry(2), entry(3)], None, [b"a", b"b", b"a"])
    assert [r.seq for r in r1.records] == [1, 2] and r1.duplicates == [2]
    r2 = store.append_unique([entry(4), entry(5)], None, [b"b", b"c"])
    assert [r.seq for r in r2.records] == [3] and r2.duplicates == [0]
    check_chain(store)


# -- append-only in the database -----------------------------------------------------------------
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {t} SET body = 'x' WHERE seq = 1",
        "UPDATE {t} SET kind = 'x' WHERE false",
        "DELETE FROM {t} WHERE seq = 2",
        "DELETE FROM {t}",
        "TRUNCATE {t}",
        "TRUNCATE {t} CASCADE",
        "INSERT INTO {t} (seq, prev_hash, hash, body) SELECT seq, prev_hash, hash, body FROM {t}"
        " WHERE seq = 1 ON CONFLICT (seq) DO UPDATE SET body = 'x'",
    ],
)
def test_update_delete_truncate_are_refused(
    pg: PGServer, store: PostgresStore, url: str, statement: str
) -> None:
    """Even the owner cannot change or remove a record; nothing changes."""
    store.append([entry(1), entry(2)])
    table = f'"{schema_of(url)}".records'
    with pytest.raises(psycopg.Error, match="append-only"):
        pg.execute(statement.format(t=table))
    check_chain(store)
    assert store.head() is not None and store.head().seq == 2  # type: ignore[union-attr]


def test_triggers_fire_even_in_replica_mode(pg: PGServer, store: PostgresStore, url: str) -> None:
    """ENABLE ALWAYS: session_replication_role=replica (replication apply) does not skip them."""
    store.append([entry(1)])
    table = f'"{schema_of(url)}".records'
    for statement in (f"DELETE FROM {table}", f"TRUNCATE {table}", f"UPDATE {table} SET kind='x'"):
        with pytest.raises(psycopg.Error, match="append-only"):
            pg.execute(f"SET session_replication_role = replica; {statement}")
    (mode,) = sql_rows(
        pg,
        "SELECT DISTINCT tgenabled FROM pg_trigger WHERE NOT tgisinternal"
        f" AND tgrelid = '{table}'::regclass",
    )
    assert mode == ("A",)


def test_least_privilege_writer_role(pg: PGServer, tmp_path: Path) -> None:
    """Owner owns the schema; the writer appends with INSERT+SELECT only and can change nothing."""
    owner = pg.create_role("cw_owner")
    writer = pg.create_role("cw_writer")
    schema = "roles_" + owner.rsplit("_", 1)[1]
    pg.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{owner}"')
    base = pg.schema_url(schema)
    # The writer cannot create the tables (no rights on the schema yet).
    with pytest.raises(AuditUnavailable):
        PostgresStore(with_user(base, writer), spool=None)
    PostgresStore(with_user(base, owner), spool=None).close()  # the owner creates them
    for grant in writer_grants(writer, schema):
        pg.execute(grant, user=owner)

    w = PostgresStore(with_user(base, writer), spool=tmp_path / "spool.db")
    assert [r.seq for r in w.append([entry(1), entry(2)], [b"p", None])] == [1, 2]
    assert [r.seq for r in w.append_unique([entry(3)], None, [b"k"]).records] == [3]
    check_chain(w)
    table = f'"{schema}".records'
    for statement in (
        f"UPDATE {table} SET kind = 'x'",
        f"DELETE FROM {table}",
        f"TRUNCATE {table}",
        f"ALTER TABLE {table} DISABLE TRIGGER ALL",
        f"DROP TRIGGER records_no_change ON {table}",
        f'INSERT INTO "{schema}".schema_version (version) VALUES (2)',
        f'CREATE TABLE "{schema}".other (x int)',
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pg.execute(statement, user=writer)
    # Refused for what it is, not spooled as if the server were down.
    with pytest.raises(AuditUnavailable):
        PostgresStore(with_user(base, writer), schema=schema + "_new", spool=None)
    w.close()
    assert Spool(tmp_path / "spool.db").depth() == 0


# -- the fork backstop ---------------------------------------------------------------------------
def test_fork_attempt_is_refused_by_the_database(
    pg: PGServer, store: PostgresStore, url: str
) -> None:
    """Two writers sealing onto the same stale head (REPEATABLE READ): the second is refused."""
    store.append([entry(1)])
    table = f'"{schema_of(url)}".records'
    from coworker.audit.chain import seal

    with psycopg.connect(pg.url) as stale:
        stale.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        seq, digest = stale.execute(
            f"SELECT seq, hash FROM {table} ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        store.append([entry(2)])  # commits seq 2 after the stale snapshot was taken
        (forked,) = seal([entry(99)], Head(seq, bytes(digest)))
        with pytest.raises(psycopg.errors.UniqueViolation):
            stale.execute(
                f"INSERT INTO {table} (seq, prev_hash, hash, body) VALUES (%s, %s, %s, %s)",
                (forked.seq, forked.prev_hash, forked.hash, forked.body),
            )
    # A branch at a fresh seq that reuses a prev_hash is refused by UNIQUE(prev_hash) too.
    (branch,) = seal([entry(100)], Head(1, store.append([entry(3)])[0].prev_hash))
    with pytest.raises(psycopg.errors.UniqueViolation, match="prev_hash"):
        pg.execute(
            f"INSERT INTO {table} (seq, prev_hash, hash, body) "
            f"VALUES (1000, '\\x{branch.prev_hash.hex()}', '\\x{branch.hash.hex()}', 'x')"
        )
    assert [b["i"] for b in check_chain(store)] == [1, 2, 3]


def test_repeatable_read_default_does_not_fork(pg: PGServer, tmp_path: Path) -> None:
    """A server/role default of REPEATABLE READ is overridden: concurrent appends stay linear."""
    url = pg.schema_url(options="-c%20default_transaction_isolation%3Drepeatable%5C%20read")
    stores = [PostgresStore(url, spool=None) for _ in range(4)]
    libpq_url = stores[0]._conninfo
    with psycopg.connect(libpq_url, autocommit=True) as raw:  # the option does take effect
        (level,) = raw.execute("SHOW default_transaction_isolation").fetchone()
    assert level == "repeatable read"

    def work(s: PostgresStore, n: int) -> None:
        for i in range(50):
            s.append([entry(n * 1000 + i)])

    threads = [threading.Thread(target=work, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(check_chain(stores[0])) == 200
    for s in stores:
        s.close()


def test_server_side_append_refuses_repeatable_read(pg: PGServer, store: PostgresStore) -> None:
    """append() called under REPEATABLE READ (a stale head) raises instead of forking."""
    store.append([entry(1)])
    with psycopg.connect(store._conninfo) as raw:
        raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        res = raw.pgconn.exec_params(
            store._append_statement(), [b"n" * 16] + [None] * 18, list(_APPEND_TYPES), [1] * 19
        )
        assert res.status == psycopg.pq.ExecStatus.FATAL_ERROR
        assert b"needs READ COMMITTED" in (res.error_message or b"")
    assert [r.seq for r in store.iter_from()] == [1]


# -- many processes ----------------------------------------------------------------------------
_WORKER = r"""
import json, sys, faulthandler; faulthandler.dump_traceback_later(150, exit=True)
from coworker.audit.store_postgres import PostgresStore
url, spool = sys.argv[1], sys.argv[2]
proc, n, batch, pause_at = (int(x) for x in sys.argv[3:7])
store = PostgresStore(url, spool=None if spool == "-" else spool, ship_interval=0.1)
print("ready", flush=True)
sys.stdin.readline()
direct = spooled = 0
for start in range(0, n, batch):
    if start == pause_at:  # the test changes the world here, then lets us go on
        print("paused", flush=True)
        sys.stdin.readline()
    entries = [{"kind": "outcome", "flow_id": f"p{proc}", "proc": proc, "i": i}
               for i in range(start, min(n, start + batch))]
    got = store.append(entries)
    if got:
        assert len(got) == len(entries)
        direct += len(got)
    else:
        spooled += len(entries)
store.close()
print(json.dumps({"direct": direct, "spooled": spooled}), flush=True)
"""


def run_writers(
    url: str,
    procs: int,
    n: int,
    spool: str = "-",
    batch: int = 1,
    during: Any = None,
    pause_at: int = -1,
) -> list[dict[str, int]]:
    """Start ``procs`` writer processes, release them together, wait; ``during`` runs meanwhile.

    With ``pause_at``, each writer stops before its append number ``pause_at`` and prints
    ``paused``; ``during`` then decides when they go on (see :func:`release`).
    """
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, spool, str(p), str(n), str(batch), str(pause_at)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in range(procs)
    ]
    for c in children:
        assert c.stdout is not None and c.stdout.readline().strip() == "ready"
    for c in children:
        assert c.stdin is not None
        c.stdin.write("go\n")
        c.stdin.flush()
    if during is not None:
        during(children)
    results = []
    for c in children:
        out, _ = c.communicate(timeout=180)
        assert c.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def wait_paused(children: list[subprocess.Popen[str]]) -> None:
    """Block until every writer has printed ``paused`` (see ``run_writers(pause_at=...)``)."""
    for c in children:
        assert c.stdout is not None and c.stdout.readline().strip() == "paused"


def release(children: list[subprocess.Popen[str]]) -> None:
    """Let paused writers go on."""
    for c in children:
        assert c.stdin is not None
        c.stdin.write("go\n")
        c.stdin.flush()


def spool_depth(path: str) -> int:
    """Entries waiting in a spool file, read without opening it for writing."""
    if not Path(path).exists():
        return 0
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM spool").fetchone()[0])
    except sqlite3.OperationalError:  # created, tables not yet there
        return 0
    finally:
        conn.close()


def wait_for(condition: Any, timeout: float = 120.0, what: str = "condition") -> None:
    """Poll ``condition()`` until true; fail after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_each_once(bodies: list[dict[str, Any]], procs: int, n: int) -> None:
    seen = [(b["proc"], b["i"]) for b in bodies]
    assert len(seen) == len(set(seen)) == procs * n
    for p in range(procs):  # each process's records are in its own order
        mine = [b["i"] for b in bodies if b["proc"] == p]
        assert mine == list(range(n))


@pytest.mark.slow
def test_eight_processes_times_500_appends(url: str) -> None:
    """8 processes x 500 concurrent appends -> 4000 records, gapless, the chain verifies."""
    PostgresStore(url, spool=None).close()
    run_writers(url, 8, 500)
    store = PostgresStore(url, spool=None)
    bodies = check_chain(store)
    assert_each_once(bodies, 8, 500)
    store.close()


@pytest.mark.slow
def test_backends_terminated_mid_load_lose_nothing(pg: PGServer, url: str, tmp_path: Path) -> None:
    """pg_terminate_backend on the writers again and again: every record arrives exactly once."""
    PostgresStore(url, spool=None).close()
    spool = str(tmp_path / "shared-spool.db")
    kills = 0

    def killer(children: list[subprocess.Popen[str]]) -> None:
        nonlocal kills
        with psycopg.connect(pg.url, autocommit=True) as admin:
            while any(c.poll() is None for c in children):
                (n,) = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'coworker-audit' AND datname = current_database()"
                ).fetchone()
                kills += n
                time.sleep(0.05)

    run_writers(url, 3, 300, spool=spool, during=killer)
    assert kills > 5
    store = PostgresStore(url, spool=spool)
    assert store.ship() == 0
    bodies = check_chain(store)
    assert_each_once(bodies, 3, 300)
    store.close()


@pytest.mark.slow
def test_outage_mid_load_spools_and_ships(pg: PGServer, url: str, tmp_path: Path) -> None:
    """The network cut after 150 appends per writer, restored once 30 entries are spooled:
    writers spool, ship after, the chain is intact (decided by events, not by the clock)."""
    PostgresStore(url, spool=None).close()
    spool = str(tmp_path / "shared-spool.db")
    with proxy_to(pg.url) as proxy:
        proxied = with_hostport(url, "127.0.0.1", proxy.port)

        def outage(children: list[subprocess.Popen[str]]) -> None:
            wait_paused(children)
            proxy.cut()
            release(children)
            wait_for(lambda: spool_depth(spool) >= 30, what="30 spooled entries")
            proxy.restore()

        results = run_writers(proxied, 4, 300, spool=spool, batch=3, during=outage, pause_at=150)
    assert sum(r["spooled"] for r in results) >= 30, results
    store = PostgresStore(url, spool=spool)
    assert store.ship() == 0
    bodies = check_chain(store)
    assert_each_once(bodies, 4, 300)
    store.close()


# -- outage, spool, status -----------------------------------------------------------------------
def test_outage_spools_in_order_and_ships_when_back(pg: PGServer, url: str, tmp_path: Path) -> None:
    """While the server is unreachable appends go to the spool; they ship in order afterwards."""
    PostgresStore(url, spool=None).close()
    spool_path = tmp_path / "spool.db"
    with proxy_to(pg.url) as proxy:
        store = PostgresStore(
            with_hostport(url, "127.0.0.1", proxy.port), spool=spool_path, ship_interval=0.1
        )
        assert len(store.append([entry(i) for i in range(5)])) == 5
        proxy.cut()
        for i in range(5, 15):
            assert store.append([entry(i)], [b"p%d" % i]) == []
        status = store.spool_status()
        assert status is not None and status.depth == 10 and status.oldest_spooled_at
        with pytest.raises(AuditUnavailable):
            store.head()
        proxy.restore()
        deadline = time.monotonic() + 10
        while store.spool_status().depth and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        assert store.spool_status().depth == 0  # type: ignore[union-attr]
        assert store.spool_status().last_shipped_at is not None  # type: ignore[union-attr]
        assert len(store.append([entry(15)])) == 1
        bodies = check_chain(store)
        assert [b["i"] for b in bodies] == list(range(16))
        assert [r.payload for r in store.iter_from(6)][:2] == [b"p5", b"p6"]
        store.close()


def test_spool_survives_the_process_and_ships_on_next_open(
    pg: PGServer, url: str, tmp_path: Path
) -> None:
    """Entries spooled by a process that then exits are shipped by the next store to open."""
    PostgresStore(url, spool=None).close()
    spool_path = tmp_path / "spool.db"
    with proxy_to(pg.url) as proxy:
        proxy.cut()
        store = PostgresStore(with_hostport(url, "127.0.0.1", proxy.port), spool=spool_path)
        assert store.append([entry(1), entry(2)]) == []
        store.close()  # cannot ship: stays in the spool
    assert Spool(spool_path).depth() == 2
    again = PostgresStore(url, spool=spool_path, ship_interval=0.05)
    assert again.ship() == 0
    assert [b["i"] for b in check_chain(again)] == [1, 2]
    again.close()


def test_ambiguous_commit_is_not_shipped_twice(url: str, tmp_path: Path) -> None:
    """A spooled entry whose earlier attempt did commit (answer lost) is not appended again."""
    spool_path = tmp_path / "spool.db"
    store = PostgresStore(url, spool=spool_path)
    (committed,) = store.append([entry(1)])
    spool = Spool(spool_path)
    spool.put([entry(1)], attempted=[((committed.seq, committed.hash),)])
    spool.put([entry(2)], attempted=[((2, b"\x01" * 32),)])
    spool.close()
    store.close()
    store = PostgresStore(url, spool=spool_path)
    assert store.ship() == 0
    assert [b["i"] for b in check_chain(store)] == [1, 2]
    store.close()


def test_without_spool_an_outage_raises_and_writes_nothing(pg: PGServer, url: str) -> None:
    """spool=None: AuditUnavailable, nothing written (OTLP ingest relies on this for 503)."""
    PostgresStore(url, spool=None).close()
    with proxy_to(pg.url) as proxy:
        store = PostgresStore(with_hostport(url, "127.0.0.1", proxy.port), spool=None)
        store.append([entry(1)])
        proxy.cut()
        with pytest.raises(AuditUnavailable, match="unreachable"):
            store.append([entry(2)])
        proxy.restore()
        time.sleep(1.1)  # the reconnect back-off
        store.append([entry(3)])
        assert [b["i"] for b in check_chain(store)] == [1, 3]
        store.close()


def test_url_options_and_default_spool_path(url: str) -> None:
    """schema= and spool= are coworker's; the default spool path ignores the password."""
    a = default_spool_path("postgresql://u:secret@db.example:5433/audit?schema=s")
    b = default_spool_path("postgresql://u:other@db.example:5433/audit?schema=s")
    c = default_spool_path("postgresql://u@db.example:5433/audit?schema=t")
    assert a == b != c and a.parts[:2] == (".coworker", "spool")
    store = PostgresStore(url + "&spool=off")
    assert store.spool_path is None and store.spool_status() is None
    store.close()
    # trust auth ignores the password: the store connects, and never shows it.
    secret = url.replace("postgres@", "postgres:s3cr3t@", 1)
    store = PostgresStore(secret, spool=None)
    assert store.head() is None
    assert "s3cr3t" not in repr(store) and ":***@" in repr(store)
    store.close()
    with pytest.raises(ConfigError):
        PostgresStore("mysql://x/y")


def test_cli_verify_query_and_status(store: PostgresStore, url: str, capsys: Any) -> None:
    """coworker audit verify|query|status work unchanged with a postgresql:// URL."""
    from coworker.cli import main

    store.append([entry(1, flow_id="f1", user_id="alice"), entry(2, flow_id="f2")])
    assert main(["audit", "verify", "--url", url + "&spool=off"]) == 0
    assert "2 record" in capsys.readouterr().out
    assert main(["audit", "query", "--url", url + "&spool=off", "--flow-id", "f1", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1
    assert main(["audit", "status", "--url", url + "&spool=off", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["head"]["seq"] == 2 and status["reachable"] is True


# -- an unreachable server: one shipper, bounded, every append completes -------------------------
_BEFORE: set[threading.Thread] = set()


def coworker_threads() -> list[threading.Thread]:
    """The store's own background threads (the spool shipper, the I/O watchdog) started
    since the test began (see the ``_thread_baseline`` fixture)."""
    return [
        t for t in threading.enumerate() if t.name.startswith("coworker-audit") and t not in _BEFORE
    ]


@pytest.fixture(autouse=True)
def _thread_baseline() -> Iterator[None]:
    _BEFORE.clear()
    _BEFORE.update(threading.enumerate())
    yield


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def appends_in_thread(store: PostgresStore, n: int, *, at: int = -1, hook: Any = None) -> Any:
    """Run ``n`` single appends in a thread; ``hook()`` runs before append number ``at``.

    Returns ``(done, results, peak)``: an Event set when the loop ends, the append results
    (or the exception), and the peak number of coworker threads seen during the loop.
    """
    done = threading.Event()
    results: list[Any] = []
    peak = [0]

    def loop() -> None:
        try:
            for i in range(n):
                if i == at:
                    hook()
                try:
                    results.append(store.append([entry(i)]))
                except AuditUnavailable as exc:
                    results.append(exc)
                peak[0] = max(peak[0], len(coworker_threads()))
        finally:
            done.set()

    threading.Thread(target=loop, daemon=True).start()
    return done, results, peak


def test_refused_port_at_start_spools_with_one_shipper(url: str, tmp_path: Path) -> None:
    """Nothing listens: 2,000 appends all spool, with one shipper thread, not one per call."""
    dead = with_hostport(url, "127.0.0.1", free_port())
    store = PostgresStore(dead, spool=tmp_path / "spool.db", ship_interval=0.05)
    done, results, peak = appends_in_thread(store, 2000)
    assert done.wait(300), f"the loop hung after {len(results)} appends"
    assert results == [[]] * 2000
    assert peak[0] <= 2, peak  # the shipper (+ at most the watchdog)
    assert store.spool_status().depth == 2000  # type: ignore[union-attr]
    store.close()
    assert coworker_threads() == []


def test_refused_port_without_spool_fails_fast_every_time(url: str) -> None:
    """Fail closed (no spool): each of 2,000 appends raises AuditUnavailable; no thread."""
    store = PostgresStore(with_hostport(url, "127.0.0.1", free_port()), spool=None)
    done, results, peak = appends_in_thread(store, 2000)
    assert done.wait(300), f"the loop hung after {len(results)} appends"
    assert len(results) == 2000 and all(isinstance(r, AuditUnavailable) for r in results)
    assert peak[0] == 0
    store.close()


@pytest.mark.parametrize("failure", ["unresponsive-at-start", "cut-mid-load", "hung-mid-load"])
def test_server_outage_is_bounded_and_ships_after(
    pg: PGServer, url: str, tmp_path: Path, failure: str
) -> None:
    """The server refuses, hangs or goes away (at start or after 100 appends): 1,000 appends
    complete with at most one shipper, then everything ships in order."""
    PostgresStore(url, spool=None).close()
    with proxy_to(pg.url) as proxy:
        if failure == "unresponsive-at-start":
            proxy.blackhole()
        store = PostgresStore(
            with_hostport(url, "127.0.0.1", proxy.port),
            spool=tmp_path / "spool.db",
            ship_interval=0.05,
            connect_timeout=1,
            io_timeout=1,
        )
        hook = proxy.cut if failure == "cut-mid-load" else proxy.blackhole
        done, results, peak = appends_in_thread(store, 1000, at=100, hook=hook)
        assert done.wait(300), f"the loop hung after {len(results)} appends"
        assert not [r for r in results if isinstance(r, Exception)]
        assert peak[0] <= 2, peak
        spooled = sum(1 for r in results if r == [])
        assert spooled >= 900, spooled
        proxy.restore()
        wait_for(lambda: store.spool_status().depth == 0, what="the spool to ship")  # type: ignore[union-attr]
        assert [b["i"] for b in check_chain(store)] == list(range(1000))
        store.close()
    assert coworker_threads() == []


# -- the database owner: what verify and a read-write open find ----------------------------------
def as_owner(pg: PGServer, url: str, *statements: str) -> None:
    """Run statements as the owner with the triggers off, then put them back as they were."""
    t = f'"{schema_of(url)}".records'
    on = ", ".join(
        f"ENABLE ALWAYS TRIGGER {n}"
        for n in ("records_no_change", "records_no_change_stmt", "records_chain")
    )
    pg.execute(f"ALTER TABLE {t} DISABLE TRIGGER ALL; {' '.join(statements)} ALTER TABLE {t} {on};")


def verify(url: str) -> Any:
    from coworker.audit.verify import verify_chain

    store = PostgresStore(url, readonly=True)
    try:
        return verify_chain(store)
    finally:
        store.close()


def with_payload(i: int, payload: bytes) -> dict[str, Any]:
    return entry(i, payload_digest=hashlib.sha256(payload).hexdigest())


def test_fresh_store_has_no_findings(store: PostgresStore, url: str) -> None:
    """Guards as created, columns as written: verify finds nothing."""
    store.append([with_payload(1, b"p"), entry(2, user_id="x\ud800")], [b"p", None])
    report = verify(url)
    assert report.ok and report.problems == (), report


def test_owner_editing_a_query_column_is_reported(
    pg: PGServer, store: PostgresStore, url: str
) -> None:
    """The owner edits only user_id (triggers off, then on again): the record vanishes from
    search(user=alice) and verify names the column."""
    from coworker.audit.verify import COLUMN_MISMATCH

    store.append([entry(i, user_id="alice") for i in range(3)])
    as_owner(pg, url, f"UPDATE \"{schema_of(url)}\".records SET user_id = 'bob' WHERE seq = 2;")
    assert [r.seq for r in store.search({"user": "alice"})] == [1, 3]
    report = verify(url)
    assert (report.ok, report.kind, report.bad_seq) == (False, COLUMN_MISMATCH, 2), report
    assert "user_id='bob'" in report.detail


def test_owner_row_at_seq_zero_is_never_read_and_reported(
    pg: PGServer, store: PostgresStore, url: str
) -> None:
    """Without the CHECK, a row at seq 0: no read returns it; verify reports the row and the
    dropped constraint."""
    from coworker.audit.verify import GUARD, OUT_OF_RANGE

    store.append([entry(1, user_id="alice"), entry(2)])
    t = f'"{schema_of(url)}".records'
    pg.execute(f"ALTER TABLE {t} DROP CONSTRAINT records_seq_check")
    as_owner(
        pg,
        url,
        f"INSERT INTO {t} (seq, prev_hash, hash, body, user_id) SELECT 0, "
        f"'\\x{'ab' * 32}', hash, body, 'mallory' FROM {t} WHERE seq = 1;",
    )
    assert [r.seq for r in store.iter_from(0)] == [1, 2]
    assert [r.seq for r in store.search({"user": "mallory"})] == []
    assert store.head().seq == 2  # type: ignore[union-attr]
    report = verify(url)
    kinds = {(p.kind, p.seq) for p in report.problems}
    assert (GUARD, None) in kinds and (OUT_OF_RANGE, 0) in kinds, report


def test_lookalike_guard_function_is_reported_and_restored(
    pg: PGServer, store: PostgresStore, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """refuse_change() replaced by a function that lets everything through (same names):
    verify reports it read-only; a read-write open logs an ERROR and restores it."""
    from coworker.audit.verify import GUARD

    store.append([entry(1)])
    s = f'"{schema_of(url)}"'
    pg.execute(
        f"CREATE OR REPLACE FUNCTION {s}.refuse_change() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN IF TG_LEVEL = 'ROW' THEN RETURN NEW; END IF; RETURN NULL; END$$"
    )
    pg.execute(f"UPDATE {s}.records SET user_id = 'x' WHERE seq = 1")  # goes through now
    report = verify(url)
    assert not report.ok and any(
        p.kind == GUARD and "refuse_change is altered" in p.detail for p in report.problems
    ), report
    assert verify(url).problems == report.problems  # the read-only verify restored nothing
    with caplog.at_level("ERROR", logger="coworker.audit"):
        PostgresStore(url, spool=None).close()
    assert "refuse_change is altered" in caplog.text and "restored" in caplog.text
    with pytest.raises(psycopg.Error, match="append-only"):
        pg.execute(f"UPDATE {s}.records SET user_id = 'y' WHERE seq = 1")


def test_rule_that_swallows_inserts_fails_the_append(
    pg: PGServer, store: PostgresStore, url: str
) -> None:
    """An ON INSERT DO INSTEAD NOTHING rule would drop records with no error: the append
    raises AuditUnavailable, and verify names the rule."""
    store.append([entry(1)])
    pg.execute(f'CREATE RULE swallow AS ON INSERT TO "{schema_of(url)}".records DO INSTEAD NOTHING')
    fresh = PostgresStore(url, spool=None)
    with pytest.raises(AuditUnavailable, match="only 0 of 1"):
        fresh.append([entry(2)])
    fresh.close()
    report = verify(url)
    assert any("rule(s) on records" in p.detail for p in report.problems), report


def test_row_level_security_is_reported(pg: PGServer, store: PostgresStore, url: str) -> None:
    """Row-level security can hide records from the reader role: verify reports it."""
    store.append([entry(1)])
    pg.execute(f'ALTER TABLE "{schema_of(url)}".records ENABLE ROW LEVEL SECURITY')
    report = verify(url)
    assert any("row-level security" in p.detail for p in report.problems), report


def test_owner_editing_a_payload_is_reported(pg: PGServer, store: PostgresStore, url: str) -> None:
    """A payload edited in the payloads table no longer matches its record's digest."""
    from coworker.audit.verify import PAYLOAD_MISMATCH

    store.append([with_payload(1, b"a"), with_payload(2, b"b")], [b"a", b"b"])
    pg.execute(f"UPDATE \"{schema_of(url)}\".payloads SET payload = 'forged' WHERE seq = 2")
    # Set to NULL by hand, without an erasure record: a deletion, not an erasure.
    pg.execute(f'UPDATE "{schema_of(url)}".payloads SET payload = NULL WHERE seq = 1')
    report = verify(url)
    assert [(p.kind, p.seq) for p in report.problems] == [
        (PAYLOAD_MISMATCH, 1),
        (PAYLOAD_MISMATCH, 2),
    ], report
    assert "no erasure or purge record" in report.problems[0].detail


def test_read_only_open_creates_nothing(pg: PGServer, url: str, capsys: Any) -> None:
    """readonly=True on a schema that does not exist: StoreNotFound, no schema made; the CLI
    read commands exit 2."""
    from coworker.audit.store import StoreNotFound
    from coworker.cli import main

    with pytest.raises(StoreNotFound, match="no audit log in schema"):
        PostgresStore(url, readonly=True)
    for command in (["status"], ["verify"], ["query"]):
        assert main(["audit", *command, "--url", url]) == 2, command
        assert "no audit log in schema" in capsys.readouterr().err
    schema = schema_of(url)
    assert sql_rows(pg, f"SELECT 1 FROM pg_namespace WHERE nspname = '{schema}'") == []
    PostgresStore(url, spool=None).close()
    ro = PostgresStore(url, readonly=True)
    with pytest.raises(AuditUnavailable, match="read-only"):
        ro.append([entry(1)])
    assert ro.spool_path is None
    ro.close()


_SPOOLER = r"""
import sys
from coworker.audit.store_postgres import PostgresStore
url, spool, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = PostgresStore(url, spool=spool, ship_interval=0.05, connect_timeout=1)
for i in range(n):
    assert store.append([{"kind": "outcome", "proc": 0, "i": i}]) == []
print("spooled", flush=True)
sys.stdin.readline()  # the test restores the network, then kills us mid-shipment
"""


@pytest.mark.slow
def test_kill_9_while_shipping_ships_each_entry_once(
    pg: PGServer, url: str, tmp_path: Path
) -> None:
    """A process killed with SIGKILL while its shipper drains 1,500 spooled entries: the next
    store on the spool ships the rest; every entry is in the log exactly once, in order."""
    import signal

    PostgresStore(url, spool=None).close()
    spool = str(tmp_path / "spool.db")
    schema = schema_of(url)
    with proxy_to(pg.url) as proxy:
        proxy.cut()
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _SPOOLER,
                with_hostport(url, "127.0.0.1", proxy.port),
                spool,
                "1500",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "spooled"
        proxy.restore()

        def shipped() -> int:
            return int(sql_rows(pg, f'SELECT count(*) FROM "{schema}".records')[0][0])

        wait_for(lambda: shipped() > 0, what="the first shipment")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    store = PostgresStore(url, spool=spool)
    assert store.ship() == 0
    assert_each_once(check_chain(store), 1, 1500)
    store.close()


def test_close_with_a_hung_server_returns(pg: PGServer, url: str, tmp_path: Path) -> None:
    """close() makes a last shipment attempt; a server that hangs during it cannot hang
    close() (the watchdog outlives the attempt), and the entries stay spooled."""
    PostgresStore(url, spool=None).close()
    spool_path = tmp_path / "spool.db"
    left = Spool(spool_path)
    left.put([entry(1), entry(2)])  # left behind by an earlier run
    left.close()
    with proxy_to(pg.url) as proxy:
        store = PostgresStore(
            with_hostport(url, "127.0.0.1", proxy.port),
            spool=spool_path,
            ship_interval=1000,  # the shipper will not get there first
            connect_timeout=1,
            io_timeout=1,
        )
        proxy.blackhole()
        closed = threading.Event()

        def close() -> None:
            store.close()
            closed.set()

        threading.Thread(target=close, daemon=True).start()
        assert closed.wait(120), "close() hung on an unresponsive server"
        assert Spool(spool_path).depth() == 2
        proxy.restore()
    again = PostgresStore(url, spool=spool_path)
    assert again.ship() == 0
    assert [b["i"] for b in check_chain(again)] == [1, 2]
    again.close()


@pytest.mark.parametrize("new_type", ["text", "jsonb"])
def test_owner_retyping_the_body_column_is_reported(
    pg: PGServer, store: PostgresStore, url: str, new_type: str
) -> None:
    """body retyped to text or jsonb: verify gives a report (edited for jsonb, a guard
    problem for both), never a TypeError."""
    from coworker.audit.verify import EDITED, GUARD

    store.append([entry(1), entry(2)])
    t = f'"{schema_of(url)}".records'
    pg.execute(
        f"ALTER TABLE {t} ALTER COLUMN body TYPE {new_type} "
        f"USING convert_from(body, 'UTF8')::{new_type}"
    )
    report = verify(url)
    kinds = {p.kind for p in report.problems}
    assert not report.ok and GUARD in kinds, report
    assert any("records.body is" in p.detail for p in report.problems)
    if new_type == "jsonb":  # keys reordered, spaces added: the bytes no longer hash
        assert EDITED in kinds


def test_verify_while_appending_reports_nothing_false(store: PostgresStore, url: str) -> None:
    """verify runs while the store keeps appending (with payloads): every report is ok."""
    store.append([with_payload(0, b"p")], [b"p"])
    stop = threading.Event()
    appended = [0]

    def append() -> None:
        while not stop.is_set():
            i = appended[0] + 1
            store.append([with_payload(i, b"p%d" % i)], [b"p%d" % i])
            appended[0] = i

    thread = threading.Thread(target=append)
    thread.start()
    try:
        reports = []
        for _ in range(10):
            start = appended[0]
            reports.append(verify(url))
            wait_for(lambda start=start: appended[0] > start, what="an append")
    finally:
        stop.set()
        thread.join()
    assert all(r.ok for r in reports), [r for r in reports if not r.ok][:1]


# -- the database refuses what does not chain, whoever sends it --------------------------------
def _writer_store(pg: PGServer, tmp_path: Path) -> tuple[str, str, str]:
    """An owner-made schema and a writer role with writer_grants; returns (base, schema, writer)."""
    owner = pg.create_role("cw_owner")
    writer = pg.create_role("cw_writer")
    schema = "chain_" + owner.rsplit("_", 1)[1]
    pg.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{owner}"')
    base = pg.schema_url(schema)
    PostgresStore(with_user(base, owner), spool=None).close()
    for grant in writer_grants(writer, schema):
        pg.execute(grant, user=owner)
    return base, schema, writer


def test_writer_raw_inserts_that_do_not_chain_are_refused(pg: PGServer, tmp_path: Path) -> None:
    """A compromised writer (INSERT + SELECT) inserting by hand: a far-ahead seq, a forged
    hash or a wrong prev_hash is refused by the database; a correctly chained record is an
    append like any other."""
    from coworker.audit.chain import seal

    base, schema, writer = _writer_store(pg, tmp_path)
    w = PostgresStore(with_user(base, writer), spool=None)
    w.append([entry(1), entry(2)])
    head = w.head()
    assert head is not None
    t = f'"{schema}".records'
    (good,) = seal([entry(3)], head)

    def insert(seq: int, prev: bytes, digest: bytes, body: bytes) -> None:
        pg.execute(
            f"INSERT INTO {t} (seq, prev_hash, hash, body, kind, category, operation) VALUES "
            f"({seq}, '\\x{prev.hex()}', '\\x{digest.hex()}', '\\x{body.hex()}',"
            " 'outcome', 'state-change', 'create')",
            user=writer,
        )

    for seq, prev, digest in (
        (1000, good.prev_hash, good.hash),  # skips the lock and the gap
        (3, good.prev_hash, b"\x01" * 32),  # a hash that is not SHA-256(prev || body)
        (3, b"\x02" * 32, link(b"\x02" * 32, good.body)),  # self-consistent, wrong link
    ):
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="does not chain"):
            insert(seq, prev, digest, good.body)
    insert(3, good.prev_hash, good.hash, good.body)  # in its own name: allowed, and chained
    assert [r.seq for r in w.append([entry(4)])] == [4]
    assert [b["i"] for b in check_chain(w)] == [1, 2, 3, 4]
    w.close()


def test_writer_on_a_version_1_schema_keeps_writing(
    pg: PGServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A schema made by an older coworker (version 1): a writer role cannot upgrade it and
    keeps appending (one WARNING); the owner's next open upgrades it to the chain check."""
    base, schema, writer = _writer_store(pg, tmp_path)
    s = f'"{schema}"'
    pg.execute(
        f"ALTER TABLE {s}.schema_version DISABLE TRIGGER ALL;"
        f" DELETE FROM {s}.schema_version WHERE version >= 2;"
        f" ALTER TABLE {s}.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change,"
        " ENABLE ALWAYS TRIGGER schema_version_no_change_stmt;"
        f" DROP TRIGGER records_chain ON {s}.records; DROP FUNCTION {s}.check_chain();"
        f" DROP TABLE {s}.keys;"  # version 3 (issue 15)
        f" DROP FUNCTION {s}.append; ALTER TABLE {s}.records DROP COLUMN attempt;"  # version 4
    )
    from coworker.audit.store_postgres.guards import _restore_guards_ddl

    pg.execute(_restore_guards_ddl(schema, 1))  # version 5: lock_head() as version 1 made it
    with caplog.at_level("WARNING", logger="coworker.audit"):
        w = PostgresStore(with_user(base, writer), spool=None)
    assert "schema version 1" in caplog.text
    assert [r.seq for r in w.append([entry(1)])] == [1]
    assert verify(with_user(base, writer)).ok  # no guard of version 2 expected yet
    w.close()
    owner = pg.roles[-2]
    PostgresStore(with_user(base, owner), spool=None).close()
    assert sql_rows(pg, f"SELECT max(version) FROM {s}.schema_version") == [(SCHEMA_VERSION,)]
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation):
        pg.execute(
            f"INSERT INTO {s}.records (seq, prev_hash, hash, body) VALUES (9, "
            f"'\\x{'ee' * 32}', '\\x{'00' * 32}', 'x')",
            user=writer,
        )
