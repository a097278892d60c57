"""Schema migrations of PostgresStore: stores made by older code (pg_dumps of them at versions
3, 4 and 7, tests/audit/data/pg_schema_v*.sql) are upgraded in place, records intact."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import import_psycopg

psycopg = import_psycopg()

from coworker.audit.store_postgres import SCHEMA_VERSION, PostgresStore, writer_grants  # noqa: E402
from coworker.audit.verify import verify_chain  # noqa: E402
from tests.pg import PGServer, require_server, with_user  # noqa: E402

pytestmark = pytest.mark.postgres

DUMP = Path(__file__).parent / "data" / "pg_schema_v3.sql"
V3_HEAD = "249c52ea0933a394e8da3cd5eb729ca171cea1a1bc3e973cbd4abd8199be02ab"


@pytest.fixture(scope="module")
def pg() -> Iterator[PGServer]:
    server = PGServer(require_server())
    yield server
    server.close()


def load_v3(pg: PGServer, owner: str | None = None) -> str:
    """Restore the version-3 dump into a new schema (owned by ``owner``); return its name."""
    schema = "v3_" + secrets.token_hex(4)
    pg.execute(DUMP.read_text().replace("cw_v3_fixture", schema))
    if owner is not None:
        s = f'"{schema}"'
        pg.execute(
            f"ALTER SCHEMA {s} OWNER TO {owner};"
            + "".join(
                f"ALTER TABLE {s}.{t} OWNER TO {owner};"
                for t in ("records", "payloads", "keys", "schema_version")
            )
            + "".join(
                f"ALTER FUNCTION {s}.{f} OWNER TO {owner};"
                for f in ("refuse_change()", "lock_head(integer)", "check_chain()")
            )
        )
    return schema


def versions(pg: PGServer, schema: str) -> list[int]:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        rows = conn.execute(f'SELECT version FROM "{schema}".schema_version ORDER BY 1').fetchall()
    return [r[0] for r in rows]


def test_version_3_store_is_upgraded_in_place(pg: PGServer, tmp_path: Path) -> None:
    """The owner's first open migrates 3 -> 8: the old records verify unchanged, the guards of
    version 8 are in place (no finding), and new appends chain on the old head."""
    schema = load_v3(pg)
    url = pg.schema_url(schema)
    readonly = PostgresStore(url, readonly=True)
    assert readonly._version == 3 and readonly.head().hash.hex() == V3_HEAD  # type: ignore[union-attr]
    readonly.close()
    store = PostgresStore(url, spool=None)
    assert versions(pg, schema) == list(range(1, SCHEMA_VERSION + 1)) and SCHEMA_VERSION == 8
    assert store._version == SCHEMA_VERSION
    old = list(store.iter_from())
    assert [r.seq for r in old] == [1, 2, 3] and old[-1].hash.hex() == V3_HEAD
    assert json.loads(old[1].body)["user_id"] == "björn ☃ 😀"
    new = store.append([{"kind": "outcome", "i": 4}, {"kind": "outcome", "i": 5}])
    assert [r.seq for r in new] == [4, 5] and new[0].prev_hash == old[-1].hash
    report = verify_chain(store)
    assert report.ok and report.checked == 5 and not report.problems, report
    store.close()


def test_writer_on_a_version_3_store_keeps_appending(pg: PGServer, tmp_path: Path) -> None:
    """A writer role cannot migrate: it appends on the old path at version 3 (one WARNING);
    the owner's next open upgrades, and both paths make one chain."""
    owner, writer = pg.create_role("v3_owner"), pg.create_role("v3_writer")
    pg.execute(f'GRANT CREATE ON DATABASE "{pg.dbname}" TO "{owner}"')
    schema = load_v3(pg, owner)
    for statement in writer_grants(writer, schema):
        pg.execute(statement)
    url = pg.schema_url(schema)
    w = PostgresStore(with_user(url, writer), spool=None)
    assert w._version == 3
    assert [r.seq for r in w.append([{"kind": "outcome", "i": 4}])] == [4]
    PostgresStore(with_user(url, owner), spool=None).close()  # the upgrade
    assert versions(pg, schema)[-1] == SCHEMA_VERSION
    w.close()
    w = PostgresStore(with_user(url, writer), spool=None)
    assert w._version == SCHEMA_VERSION
    assert [r.seq for r in w.append([{"kind": "outcome", "i": 5}])] == [5]  # server-side
    report = verify_chain(w)
    assert report.ok and report.checked == 5 and not report.problems, report
    w.close()


DUMP_V4 = Path(__file__).parent / "data" / "pg_schema_v4.sql"
V4_HEAD = "99e55cc1f33e2d3198cb5be6dfd22599c4d5676aabc9cb58da1f709fb1277b25"
V4_FUNCTIONS = (
    "refuse_change()",
    "lock_head(integer)",
    "check_chain()",
    "append(integer, bytea, bytea[], bytea[], bytea[], bytea[], text[], text[], text[], text[],"
    " text[], text[], text[], text[], text[], text[], text[], text[], text[], text[])",
)


def load_dump(
    pg: PGServer, dump: Path, version: int, functions: tuple[str, ...], owner: str | None = None
) -> str:
    """Restore a version-``version`` dump into a new schema (owned by ``owner``, with its
    tables and ``functions``, when given); return its name."""
    schema = f"v{version}_" + secrets.token_hex(4)
    pg.execute(dump.read_text().replace(f"cw_v{version}_fixture", schema))
    if owner is not None:
        s = f'"{schema}"'
        pg.execute(
            f"ALTER SCHEMA {s} OWNER TO {owner};"
            + "".join(
                f"ALTER TABLE {s}.{t} OWNER TO {owner};"
                for t in ("records", "payloads", "keys", "schema_version")
            )
            + "".join(f"ALTER FUNCTION {s}.{f} OWNER TO {owner};" for f in functions)
        )
    return schema


def load_v4(pg: PGServer, owner: str | None = None) -> str:
    """Restore the version-4 dump (made before version 5) into a new schema; return its name."""
    return load_dump(pg, DUMP_V4, 4, V4_FUNCTIONS, owner)


def test_version_4_store_is_upgraded_to_5(pg: PGServer) -> None:
    """The owner's first open migrates 4 -> 5 (the cheaper append() and chain check): the old
    records verify unchanged, no guard is reported, dedup keys from before still count, and
    new appends chain on the old head through the new append()."""
    schema = load_v4(pg)
    url = pg.schema_url(schema)
    readonly = PostgresStore(url, readonly=True)
    assert readonly._version == 4 and readonly.head().hash.hex() == V4_HEAD  # type: ignore[union-attr]
    readonly.close()
    store = PostgresStore(url, spool=None)
    assert versions(pg, schema) == [1, 2, 3, 4, 5, 6, 7, 8] and store._version == SCHEMA_VERSION
    with psycopg.connect(pg.url, autocommit=True) as conn:
        source = conn.execute(
            "SELECT prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s AND p.proname = 'append'",
            (schema,),
        ).fetchone()
    assert source is not None and "pos integer[]" in source[0]  # version 5's append()
    old = list(store.iter_from())
    assert [r.seq for r in old] == [1, 2, 3] and old[-1].hash.hex() == V4_HEAD
    assert json.loads(old[0].body)["user_id"] == "björn ☃ 😀"
    result = store.append_unique(
        [{"kind": "outcome", "i": 4}, {"kind": "outcome", "i": 5}], None, [b"k2", b"k5"]
    )
    assert result.duplicates == [0] and [r.seq for r in result.records] == [4]
    assert result.records[0].prev_hash == old[-1].hash
    report = verify_chain(store)
    assert report.ok and report.checked == 4 and not report.problems, report
    store.close()


def test_writer_on_a_version_4_store_appends_until_upgraded(pg: PGServer) -> None:
    """A writer role cannot migrate 4 -> 5: it keeps appending through version 4's append();
    after the owner's open it appends through version 5's, one chain throughout."""
    owner, writer = pg.create_role("v4_owner"), pg.create_role("v4_writer")
    pg.execute(f'GRANT CREATE ON DATABASE "{pg.dbname}" TO "{owner}"')
    schema = load_v4(pg, owner)
    for statement in writer_grants(writer, schema):
        pg.execute(statement)
    url = pg.schema_url(schema)
    w = PostgresStore(with_user(url, writer), spool=None)
    assert w._version == 4
    assert [r.seq for r in w.append([{"kind": "outcome", "i": 4}])] == [4]
    PostgresStore(with_user(url, owner), spool=None).close()  # the upgrade
    assert versions(pg, schema)[-1] == SCHEMA_VERSION
    w.close()
    w = PostgresStore(with_user(url, writer), spool=None)
    assert w._version == SCHEMA_VERSION
    assert [r.seq for r in w.append([{"kind": "outcome", "i": 5}])] == [5]
    report = verify_chain(w)
    assert report.ok and report.checked == 5 and not report.problems, report
    w.close()


DUMP_V7 = Path(__file__).parent / "data" / "pg_schema_v7.sql"
V7_FUNCTIONS = (*V4_FUNCTIONS, "owner_writes()")


def _owner_writes_language(pg: PGServer, schema: str) -> str:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT l.lanname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " JOIN pg_language l ON l.oid = p.prolang"
            " WHERE n.nspname = %s AND p.proname = 'owner_writes'",
            (schema,),
        ).fetchone()
    assert row is not None
    return str(row[0])


def test_version_7_store_is_upgraded_to_8(pg: PGServer, caplog: pytest.LogCaptureFixture) -> None:
    """The owner's first open migrates 7 -> 8 (owner_writes() in PL/pgSQL): no guard is
    reported, a writer's append() still skips the chain check while its raw INSERT that does
    not chain is still refused, dedup keys from before count, and the chain verifies."""
    owner, writer = pg.create_role("v7_owner"), pg.create_role("v7_writer")
    pg.execute(f'GRANT CREATE ON DATABASE "{pg.dbname}" TO "{owner}"')
    schema = load_dump(pg, DUMP_V7, 7, V7_FUNCTIONS, owner)
    s = f'"{schema}"'
    for statement in writer_grants(writer, schema):
        pg.execute(statement)
    assert versions(pg, schema) == [1, 2, 3, 4, 5, 6, 7]
    assert _owner_writes_language(pg, schema) == "sql"
    url = pg.schema_url(schema)
    with caplog.at_level("WARNING", logger="coworker.audit"):
        PostgresStore(with_user(url, owner), spool=None).close()  # the upgrade
        w = PostgresStore(with_user(url, writer), spool=None)
    assert not caplog.records, caplog.text  # no guard missing or altered, no warning
    assert versions(pg, schema) == [1, 2, 3, 4, 5, 6, 7, 8] and w._version == SCHEMA_VERSION
    assert _owner_writes_language(pg, schema) == "plpgsql"
    try:
        result = w.append_unique(
            [{"kind": "outcome", "i": 3}, {"kind": "outcome", "i": 4}], None, [b"k3", b"k4"]
        )
        assert result.duplicates == [0] and [r.seq for r in result.records] == [4]
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="does not chain"):
            pg.execute(
                f"INSERT INTO {s}.records (seq, prev_hash, hash, body) VALUES (5, "
                f"'\\x{'ee' * 32}', '\\x{'00' * 32}', 'x')",
                user=writer,
            )
        report = verify_chain(w)
        assert report.ok and report.checked == 4 and not report.problems, report
    finally:
        w.close()
