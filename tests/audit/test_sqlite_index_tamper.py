"""An owner of a version 2 file editing the *contents* of an index b-tree (its definition left
exactly coworker's): verify must not take the partial index of payload-committing records on
trust, or a deleted payload of an honest record goes unreported; an index entry cut out to
hide a record from queries is found by ``verify --deep`` (SQLite's integrity_check)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from coworker.audit import sqlite_schema
from coworker.audit.query import query
from coworker.audit.store import COLUMN_MISMATCH, PAYLOAD_MISMATCH
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain
from coworker.cli import main
from tests.audit.conftest import fill


def _swap_in(path: Path, index: str, where: str) -> None:
    """Give ``index`` the b-tree of the same index built with ``where`` added (its entries
    minus the rows ``where`` leaves out), its sql untouched: what a raw page edit does."""
    conn = sqlite3.connect(path, isolation_level=None)
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (index,)).fetchone()
    cond = " AND " if " WHERE " in sql else " WHERE "
    conn.execute(sql.replace(index, "tampered", 1) + cond + where)
    roots = dict(
        conn.execute(
            "SELECT name, rootpage FROM sqlite_master WHERE name IN (?, 'tampered')", (index,)
        ).fetchall()
    )
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET rootpage = ? WHERE name = ?", (roots["tampered"], index))
    conn.execute("UPDATE sqlite_master SET rootpage = ? WHERE name = 'tampered'", (roots[index],))
    conn.execute("PRAGMA writable_schema = OFF")
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP INDEX tampered")  # frees the original b-tree: no orphaned pages
    conn.close()


def test_a_deleted_payload_hidden_from_the_committed_index_is_still_found(db_path: Path) -> None:
    """A payload deleted by hand and its record's entry cut from the committed-records
    index (definition unchanged) is still a PAYLOAD_MISMATCH: the index is not the source."""
    store = SQLiteStore(db_path)
    fill(store, 4)
    fill(store, 3, **{"coworker.input": '{"amount": 10}'})
    store.close()
    conn = sqlite3.connect(db_path)
    conn.execute("DELETE FROM audit_payloads WHERE seq = 6")
    conn.commit()
    conn.close()
    _swap_in(db_path, "audit_records_committed", "seq <> 6")
    conn = sqlite3.connect(db_path)
    assert conn.execute(
        "SELECT seq FROM audit_records INDEXED BY audit_records_committed "
        f"WHERE {sqlite_schema._COMMITTED} ORDER BY seq"
    ).fetchall() == [(5,), (7,)]
    conn.close()
    store = SQLiteStore(db_path, readonly=True)
    try:
        report = verify_chain(store)
    finally:
        store.close()
    assert [(p.kind, p.seq) for p in report.problems] == [(PAYLOAD_MISMATCH, 6)]


def test_an_index_edited_to_hide_a_record_from_queries_is_found_by_verify_deep(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An honest record cut from the user index hides it from ``query(user=...)``; the
    hash chain and the definitions cannot see it, ``verify --deep`` (SQLite's
    integrity_check, which recomputes every entry from the body) does."""
    store = SQLiteStore(db_path)
    fill(store, 8)
    store.close()
    before = [e.seq for e in query(SQLiteStore(db_path, readonly=True), user="alice")]
    assert 5 in before
    _swap_in(db_path, "audit_records_user", "seq <> 5")
    store = SQLiteStore(db_path, readonly=True)
    try:
        hidden = [e.seq for e in query(store, user="alice")]
        assert hidden == [s for s in before if s != 5]
        assert verify_chain(store).ok  # what the chain and the definitions cover
        report = verify_chain(store, deep=True)
    finally:
        store.close()
    assert not report.ok
    assert [p.kind for p in report.problems] == [COLUMN_MISMATCH] * len(report.problems)
    assert "audit_records_user" in report.detail
    url = f"sqlite:///{db_path}"
    assert main(["audit", "verify", "--url", url, "--no-progress"]) == 0
    assert main(["audit", "verify", "--url", url, "--deep", "--no-progress"]) == 1
    assert "audit_records_user" in capsys.readouterr().out
