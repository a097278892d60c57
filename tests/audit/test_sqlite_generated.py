"""Schema version 2: the query columns are generated from the hashed body, so an owner of the
file cannot make one differ from its body by editing rows, and rewriting the schema to get
there is reported by verify (read-only) as not coworker's definition."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from coworker.audit import sqlite_schema
from coworker.audit.query import query
from coworker.audit.store import COLUMN_MISMATCH, GUARD, MALFORMED, PAYLOAD_MISMATCH
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import VerifyReport, verify_chain
from tests.audit.conftest import fill, raw


@pytest.fixture
def log(db_path: Path) -> Path:
    """A 20-record version 2 log, closed."""
    store = SQLiteStore(db_path)
    assert store.schema_version == 2
    fill(store, 20)
    store.close()
    return db_path


def _verify(path: Path) -> VerifyReport:
    store = SQLiteStore(path, readonly=True)
    try:
        return verify_chain(store)
    finally:
        store.close()


def _kinds(report: VerifyReport) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in report.problems]


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_records SET user_id = 'bob' WHERE seq = 5",
        "UPDATE audit_records SET time = '1999-01-01' WHERE seq = 5",
        "INSERT INTO audit_records (seq, prev_hash, hash, body, user_id) "
        "SELECT 21, prev_hash, hash, body, 'bob' FROM audit_records WHERE seq = 5",
    ],
    ids=["update-column", "update-time", "insert-column"],
)
def test_a_query_column_cannot_be_written(log: Path, sql: str) -> None:
    """Even with the append-only triggers dropped, SQLite refuses to write a generated
    column: there is no row whose column differs from its body."""
    conn = raw(log)
    with pytest.raises(sqlite3.OperationalError, match="generated column"):
        conn.execute(sql)
    conn.close()


def test_columns_follow_the_body_and_are_indexed(log: Path) -> None:
    """Each column is the body's field (time: ``start``), as a version 1 writer copied it;
    the four fields no index uses are read from the body; the query indexes are used."""
    conn = sqlite3.connect(log)
    fields_sql = [sqlite_schema.column_sql(c, 2) for c in (*sqlite_schema._COLUMNS, "time")]
    rows = conn.execute(
        "SELECT r.body, " + ", ".join(fields_sql) + " FROM audit_records r"
    ).fetchall()
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT seq FROM audit_records WHERE user_id = 'alice'"
    ).fetchall()
    conn.close()
    import json

    from coworker.audit.store import StoredRecord

    for row in rows:
        fields = json.loads(row[0])
        record = StoredRecord(fields["seq"], b"", b"", row[0])
        assert row[1:] == sqlite_schema._row_v1(record, fields)[4:]
    assert "audit_records_user" in str(plan)


def _rewrite_table(path: Path, sql: str) -> None:
    """Replace the table's definition in sqlite_master, as PRAGMA writable_schema allows
    (the indexes are dropped first and re-created after: entries computed under one
    definition would be corrupt under the other, and SQLite would refuse the edits)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_records'"
    ).fetchall():
        conn.execute(f"DROP INDEX {name}")
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute(
        "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'audit_records'", (sql,)
    )
    conn.execute("PRAGMA writable_schema = OFF")
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in sqlite_schema._split_ddl(sqlite_schema._INDEXES + sqlite_schema._INDEXES_V2):
        conn.execute(statement)
    conn.close()


_PLAIN = sqlite_schema._TABLE_V1.replace(" IF NOT EXISTS", "").rstrip(";")
_OURS = sqlite_schema._TABLE_V2.replace(" IF NOT EXISTS", "").rstrip(";")


def make_plain_and_edit(path: Path, seq: int) -> None:
    """Tamper as a careful owner would: the table's definition rewritten with plain columns,
    the ``user_id`` of ``seq`` set by hand, the append-only triggers put back."""
    _rewrite_table(path, _PLAIN)
    conn = raw(path)
    conn.execute("UPDATE audit_records SET user_id = 'mallory' WHERE seq = ?", (seq,))
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in sqlite_schema._split_ddl(sqlite_schema._GUARDS):
        conn.execute(statement)
    conn.close()


def test_writable_schema_making_the_columns_plain_is_reported(log: Path) -> None:
    """The table's definition rewritten with plain columns, then a column set by hand: verify
    reports the table as not coworker's, and the column as differing from its body."""
    make_plain_and_edit(log, 5)
    report = _verify(log)
    assert not report.ok and report.kind == GUARD
    assert "table audit_records is altered" in report.detail
    assert (COLUMN_MISMATCH, 5) in _kinds(report)


def test_a_plain_table_under_the_same_name_is_reported(log: Path) -> None:
    """The real table renamed away and a plain-column copy with an edited column put in its
    place (with coworker's triggers and indexes): verify reports the table, and the column,
    whether the file still says version 2 or was set back to version 1."""
    conn = sqlite3.connect(log, isolation_level=None)
    conn.execute("ALTER TABLE audit_records RENAME TO kept")
    for statement in sqlite_schema._split_ddl(sqlite_schema._DDL_V1):
        conn.execute(statement)
    values = [
        f"CASE WHEN seq = 5 THEN 'mallory' ELSE {sqlite_schema.column_sql(c, 2, 'kept')} END"
        if c == "user_id"
        else sqlite_schema.column_sql(c, 2, "kept")
        for c in sqlite_schema._COLUMNS
    ]
    conn.execute(
        "INSERT INTO audit_records SELECT seq, prev_hash, hash, body, "
        + ", ".join(values)
        + ", time FROM kept"
    )
    conn.execute("DROP TABLE kept")  # and its indexes and triggers: put them back
    for statement in sqlite_schema._split_ddl(sqlite_schema._DDL):
        if "TABLE" not in statement.split("(")[0]:
            conn.execute(statement)
    conn.close()
    assert [e.seq for e in query(SQLiteStore(log, readonly=True), user="alice")] == [
        s for s in range(1, 21) if s != 5
    ]
    report = _verify(log)
    assert report.kind == GUARD and "table audit_records is altered" in report.detail
    assert _kinds(report) == [(GUARD, None), (COLUMN_MISMATCH, 5)]
    conn = sqlite3.connect(log, isolation_level=None)
    conn.execute("UPDATE audit_meta SET value = '1' WHERE key = 'schema_version'")
    conn.execute("DROP TRIGGER audit_records_append_only")  # and version 1's guards
    for statement in sqlite_schema._split_ddl(sqlite_schema._GUARDS_V1):
        conn.execute(statement)
    conn.close()
    assert _kinds(_verify(log)) == [(COLUMN_MISMATCH, 5)]


def test_a_round_trip_through_plain_columns_leaves_no_edited_column(log: Path) -> None:
    """Rewriting the definition to plain columns, editing, and rewriting it back leaves the
    table exact (a VIRTUAL column is computed from the body on every read; a STORED one would
    keep the edit under coworker's definition). What is left is index entries written while
    the definition was not ours: SQLite's ``PRAGMA integrity_check`` finds them (verify does
    not read index contents; see docs/audit.md)."""
    _rewrite_table(log, _PLAIN)
    conn = raw(log)
    conn.execute("UPDATE audit_records SET user_id = 'mallory' WHERE seq = 5")
    conn.close()
    conn = sqlite3.connect(log, isolation_level=None)
    conn.execute("PRAGMA writable_schema = ON")  # back to ours, keeping the indexes as built
    conn.execute(
        "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'audit_records'",
        (_OURS,),
    )
    conn.execute("PRAGMA writable_schema = OFF")
    conn.close()
    conn = sqlite3.connect(log)
    assert conn.execute(
        "SELECT user_id FROM audit_records NOT INDEXED WHERE seq = 5"
    ).fetchone() == ("alice",)
    check = conn.execute("PRAGMA integrity_check(audit_records)").fetchall()
    conn.close()
    assert any("audit_records_user" in r[0] for r in check), check


@pytest.mark.parametrize(
    "index", ["audit_records_malformed", "audit_records_committed", "audit_records_user"]
)
def test_a_dropped_or_altered_index_is_reported_and_rebuilt(log: Path, index: str) -> None:
    """The partial indexes verify reads (and the query indexes) must be coworker's: one
    dropped, or re-created with a condition that keeps nothing, is a guard finding; a
    read-write open rebuilds it from the table."""
    conn = raw(log)
    conn.execute(f"DROP INDEX {index}")
    conn.close()
    report = _verify(log)
    assert _kinds(report) == [(GUARD, None)] * 4  # the index and the three triggers
    assert f"index {index} is missing" in str(report.problems)
    SQLiteStore(log).close()
    assert _verify(log).ok
    conn = sqlite3.connect(log, isolation_level=None)
    conn.execute(f"DROP INDEX {index}")
    conn.execute(f"CREATE INDEX {index} ON audit_records(seq) WHERE 0")
    conn.close()
    report = _verify(log)
    assert _kinds(report) == [(GUARD, None)]
    assert f"index {index} is altered" in report.detail
    SQLiteStore(log).close()
    assert _verify(log).ok


def test_a_malformed_row_hidden_by_an_altered_index_is_still_found(log: Path) -> None:
    """With the malformed-rows index replaced by one that keeps nothing, verify does not
    trust it: it scans every body for the rows the index should hold."""
    from coworker.audit.chain import link

    conn = sqlite3.connect(log, isolation_level=None)
    conn.execute("DROP INDEX audit_records_malformed")
    conn.execute("CREATE INDEX audit_records_malformed ON audit_records(seq) WHERE 0")
    (prev,) = conn.execute("SELECT hash FROM audit_records WHERE seq = 20").fetchone()
    body = b'{"seq":99,"x":1}'
    conn.execute(
        "INSERT INTO audit_records (seq, prev_hash, hash, body) VALUES (21, ?, ?, ?)",
        (prev, link(prev, body), body),
    )
    conn.close()
    report = _verify(log)
    assert _kinds(report) == [(GUARD, None), (MALFORMED, 21)]


def test_a_payload_deleted_by_hand_is_found_through_the_committed_index(db_path: Path) -> None:
    """A record that commits to a payload whose row was deleted (no erasure record) is
    reported, found by the partial index of committing records, not a parse of every row."""
    store = SQLiteStore(db_path)
    fill(store, 4)
    fill(store, 3, **{"coworker.input": '{"amount": 10}'})
    store.close()
    conn = sqlite3.connect(db_path)
    committed = conn.execute(
        "SELECT seq FROM audit_records INDEXED BY audit_records_committed "
        f"WHERE {sqlite_schema._COMMITTED} ORDER BY seq"
    ).fetchall()
    assert committed == [(5,), (6,), (7,)]
    conn.execute("DELETE FROM audit_payloads WHERE seq = 6")
    conn.commit()
    conn.close()
    assert _kinds(_verify(db_path)) == [(PAYLOAD_MISMATCH, 6)]
