"""Schema version 1 files (plain query columns) keep verifying, and a read-write open migrates
them to version 2 (query columns generated from the body): every record byte-identical, the
chain intact, one transaction (a process killed mid-migration leaves version 1 as it was), and
never when the migration would change what a query finds."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coworker.audit import sqlite_schema
from coworker.audit.query import query
from coworker.audit.store import COLUMN_MISMATCH, OUT_OF_RANGE
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain
from tests.audit.conftest import fill, legacy_log, make_entries, raw


def _snapshot(path: Path) -> list[tuple[Any, ...]]:
    """Every record's chained bytes and payload, as stored."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM audit_records r "
            "LEFT JOIN audit_payloads p ON p.seq = r.seq ORDER BY r.seq"
        ).fetchall()
    finally:
        conn.close()


_SCHEMA = "SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'audit_records%' ORDER BY name"


def _version(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (value,) = conn.execute(
            "SELECT value FROM audit_meta WHERE key = 'schema_version'"
        ).fetchone()
        return int(value)
    finally:
        conn.close()


def _v1(path: Path, n: int = 30) -> None:
    """A version 1 file with ``n`` records, every third with a payload."""
    legacy_log(path)
    store = SQLiteStore(path, upgrade=False)
    plain = make_entries(n)
    captured = make_entries(n, **{"coworker.input": '{"amount": 10}'})
    for i in range(n):
        fields, payload = captured[i] if i % 3 == 0 else plain[i]
        store.append([fields], [payload])
    assert store.schema_version == 1
    store.close()


def _verify(path: Path) -> Any:
    store = SQLiteStore(path, readonly=True)
    try:
        return verify_chain(store)
    finally:
        store.close()


def test_a_version_1_file_verifies_read_only_and_stays_version_1(db_path: Path) -> None:
    """verify (read-only) of a version 1 file checks its copied columns and changes nothing."""
    _v1(db_path)
    before = _snapshot(db_path)
    report = _verify(db_path)
    assert report.ok and report.checked == 30
    assert _version(db_path) == 1 and _snapshot(db_path) == before


def test_a_read_write_open_migrates_with_every_record_byte_identical(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first read-write open rebuilds the table as version 2: the chained bytes and the
    payloads are the same, the head is the same, queries find the same records, and the
    table, indexes and triggers are exactly a new file's."""
    _v1(db_path)
    before = _snapshot(db_path)
    head = _verify(db_path).head
    old = SQLiteStore(db_path, readonly=True)
    found = {u: [r.seq for r in query(old, user=u)] for u in ("alice", "bob", "nobody")}
    old.close()
    with caplog.at_level("INFO", logger="coworker.audit"):
        store = SQLiteStore(db_path)
    assert store.schema_version == 2 and "migrated to schema version 2" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert store.head() == head
    assert {u: [r.seq for r in query(store, user=u)] for u in found} == found
    fill(store, 2)  # appends go on at version 2
    store.close()
    assert _version(db_path) == 2 and _snapshot(db_path)[:30] == before
    report = _verify(db_path)
    assert report.ok and report.checked == 32
    conn = sqlite3.connect(db_path)
    schema = conn.execute(_SCHEMA).fetchall()
    conn.close()
    fresh = SQLiteStore(db_path.with_name("fresh.db"))
    fresh.close()
    conn = sqlite3.connect(db_path.with_name("fresh.db"))
    assert schema == conn.execute(_SCHEMA).fetchall()
    conn.close()


def test_upgrade_false_keeps_a_version_1_file(db_path: Path) -> None:
    """``upgrade=False`` appends to a version 1 file as version 1 (for older readers)."""
    _v1(db_path, 3)
    store = SQLiteStore(db_path, upgrade=False)
    fill(store, 2)
    store.close()
    assert _version(db_path) == 1 and _verify(db_path).ok


def test_an_edited_column_is_not_migrated_away(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version 1 column edited to hide a record stays as it is, and so does the file: a
    migration would silently 'repair' the evidence; the ERROR says why, verify names it."""
    _v1(db_path)
    conn = raw(db_path)
    conn.execute("UPDATE audit_records SET user_id = 'mallory' WHERE seq = 7")
    conn.close()
    SQLiteStore(db_path, upgrade=False).close()  # the tamperer puts the triggers back
    before = _snapshot(db_path)
    with caplog.at_level("ERROR", logger="coworker.audit"):
        store = SQLiteStore(db_path)
    assert store.schema_version == 1
    fill(store, 1)  # the application keeps writing, at version 1
    store.close()
    assert "not migrated to schema version 2" in caplog.text and "first: seq 7" in caplog.text
    assert _version(db_path) == 1 and _snapshot(db_path)[:30] == before
    report = _verify(db_path)
    assert [(p.kind, p.seq) for p in report.problems] == [(COLUMN_MISMATCH, 7)]


def test_a_row_outside_the_chain_is_not_migrated_away(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file from before CHECK (seq >= 1) with a hand-inserted seq 0 row: the new table
    refuses the row, so the file stays at version 1 and verify still reports it."""
    legacy_log(db_path, check=False)
    store = SQLiteStore(db_path, upgrade=False)
    fill(store, 5)
    store.close()
    conn = raw(db_path)
    conn.execute(
        "INSERT INTO audit_records (seq, prev_hash, hash, body, user_id) "
        "SELECT 0, prev_hash, hash, body, user_id FROM audit_records WHERE seq = 3"
    )
    conn.close()
    SQLiteStore(db_path, upgrade=False).close()
    with caplog.at_level("ERROR", logger="coworker.audit"):
        SQLiteStore(db_path).close()
    assert "not migrated" in caplog.text and "CHECK constraint failed" in caplog.text
    assert _version(db_path) == 1
    assert [(p.kind, p.seq) for p in _verify(db_path).problems] == [(OUT_OF_RANGE, 0)]


def test_tampered_guards_block_the_migration(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A foreign trigger on a version 1 table would be dropped with it: no migration while
    verify has something to report about the guards."""
    _v1(db_path, 3)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("CREATE TRIGGER spy AFTER INSERT ON audit_records BEGIN SELECT 1; END")
    conn.close()
    with caplog.at_level("ERROR", logger="coworker.audit"):
        SQLiteStore(db_path).close()
    assert "guards are not coworker's" in caplog.text and _version(db_path) == 1


def test_a_writer_opened_before_the_migration_keeps_appending(db_path: Path) -> None:
    """A store that opened the file at version 1 appends after another process (here:
    another connection) migrated it: it takes the file's version and loses nothing."""
    _v1(db_path, 3)
    old = SQLiteStore(db_path, upgrade=False)
    fill(old, 1)
    SQLiteStore(db_path).close()  # migrates
    assert _version(db_path) == 2
    fill(old, 2)
    assert old.schema_version == 2 and old.head().seq == 6  # type: ignore[union-attr]
    old.close()
    assert _verify(db_path).ok


_MIGRATE = """
import logging, sys
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
from coworker.audit.store_sqlite import SQLiteStore
SQLiteStore(sys.argv[1], synchronous="NORMAL").close()
print("done", flush=True)
"""


def test_a_process_killed_mid_migration_leaves_version_1_intact(db_path: Path) -> None:
    """SIGKILL while the rebuild is being written (its rows already in the WAL): the file is
    still the version 1 log, byte for byte, and verifies; the next open migrates it."""
    legacy_log(db_path)
    store = SQLiteStore(db_path, synchronous="NORMAL", upgrade=False)
    fields = make_entries(1)[0][0]
    for _ in range(6):
        store.append([fields] * 10_000)
    store.close()
    before = _snapshot(db_path)
    wal = Path(str(db_path) + "-wal")
    wal_before = wal.stat().st_size if wal.exists() else 0
    child = subprocess.Popen(
        [sys.executable, "-c", _MIGRATE, str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stderr is not None
    started = threading.Event()

    def watch() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            if "migrating 60000 record(s)" in line:
                started.set()

    threading.Thread(target=watch, daemon=True).start()
    assert started.wait(60), "the child never started migrating"
    # Kill once the rebuild is under way: its pages are going into the WAL.
    deadline = time.monotonic() + 60
    while wal.stat().st_size <= wal_before + (4 << 20) and child.poll() is None:
        assert time.monotonic() < deadline, "the WAL never grew"
        time.sleep(0.005)
    if child.poll() is not None:
        pytest.fail("the migration finished before it could be killed; use more records")
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert _version(db_path) == 1 and _snapshot(db_path) == before
    report = _verify(db_path)
    assert report.ok and report.checked == 60_000
    store = SQLiteStore(db_path)
    assert store.schema_version == 2
    store.close()
    assert _snapshot(db_path) == before and _verify(db_path).ok


def test_new_files_without_generated_column_support_are_version_1(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a SQLite library older than the ``->`` operator, new files are version 1 and
    version 1 files are not migrated (the definition would not parse)."""
    from coworker.audit import sqlite_open

    monkeypatch.setattr(sqlite_open, "GENERATED_MIN_SQLITE", (99, 0, 0))
    store = SQLiteStore(db_path)
    fill(store, 2)
    store.close()
    assert _version(db_path) == 1 and _verify(db_path).ok
    assert sqlite_schema.SCHEMA_VERSION == 2
