"""The SQLite store: WAL, durability setting, append-only triggers, failure modes."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.urls import open_store
from coworker.audit.verify import verify_chain
from coworker.exceptions import AuditUnavailable, ConfigError
from tests.audit.conftest import fill, make_entries, raw


def test_wal_and_synchronous_full(sqlite_file_store: SQLiteStore, db_path: Path) -> None:
    """The file is in WAL mode and the store commits with synchronous=FULL."""
    fill(sqlite_file_store, 1)
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sqlite_file_store.synchronous == "FULL"
    conn.close()


def test_url_options(tmp_path: Path) -> None:
    """sqlite URLs: relative/absolute paths and options; bad ones fail fast."""
    store = open_store(f"sqlite:///{tmp_path}/a.db?synchronous=normal&busy_timeout=2")
    assert isinstance(store, SQLiteStore)
    assert store.path == f"{tmp_path}/a.db" and store.synchronous == "NORMAL"
    assert store.busy_timeout == 2.0
    store.close()
    with pytest.raises(ConfigError, match="synchronous"):
        open_store(f"sqlite:///{tmp_path}/b.db?synchronous=sometimes")
    with pytest.raises(ConfigError, match="unknown option"):
        open_store(f"sqlite:///{tmp_path}/b.db?journal=off")
    with pytest.raises(ConfigError, match="not an audit store URL"):
        open_store("audit.db")


def test_relative_url_is_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite:///rel/a.db is relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///rel/a.db")
    fill(store, 1)
    store.close()
    assert (tmp_path / "rel" / "a.db").exists()


def test_body_kept_exactly_as_hashed(sqlite_file_store: SQLiteStore, db_path: Path) -> None:
    """The body column holds the canonical bytes exactly; payload is in its own table."""
    fields, _ = make_entries(1)[0]
    (rec,) = sqlite_file_store.append([fields], [b"captured"])
    conn = sqlite3.connect(db_path)
    row = conn.execute("SELECT seq, prev_hash, hash, body FROM audit_records").fetchone()
    assert row == (1, rec.prev_hash, rec.hash, rec.body)
    assert b"captured" not in row[3]
    assert conn.execute("SELECT payload FROM audit_payloads WHERE seq = 1").fetchone() == (
        b"captured",
    )
    conn.close()


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE audit_records SET body = x'7b7d' WHERE seq = 2", "UPDATE is not allowed"),
        ("DELETE FROM audit_records WHERE seq = 2", "DELETE is not allowed"),
        (
            "INSERT OR REPLACE INTO audit_records (seq, prev_hash, hash, body) "
            "VALUES (2, x'00', x'00', x'7b7d')",
            "INSERT OR REPLACE refused",
        ),
        (
            "INSERT INTO audit_records (seq, prev_hash, hash, body) VALUES (2, x'00', x'00', "
            "x'7b7d') ON CONFLICT(seq) DO UPDATE SET body = excluded.body",
            "append-only",
        ),
        (
            "INSERT INTO audit_records (seq, prev_hash, hash, body) "
            "VALUES (9, x'00', x'00', x'7b7d')",
            "head seq \\+ 1",
        ),
    ],
)
def test_triggers_refuse_rewrites(
    sqlite_file_store: SQLiteStore, db_path: Path, sql: str, message: str
) -> None:
    """UPDATE, DELETE, INSERT OR REPLACE, upserts and out-of-order inserts are refused."""
    fill(sqlite_file_store, 3)
    before = [(r.seq, r.hash, r.body) for r in sqlite_file_store.iter_from(1)]
    conn = sqlite3.connect(db_path, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match=message):
        conn.execute(sql)
    conn.close()
    assert [(r.seq, r.hash, r.body) for r in sqlite_file_store.iter_from(1)] == before


def test_payload_deleted_by_hand_is_reported_not_taken_for_erased(
    sqlite_file_store: SQLiteStore, db_path: Path
) -> None:
    """A payload set to NULL by the database owner, with no erasure record, is a finding
    (only `coworker audit erase` / `purge` may take a payload away; tests/audit/test_erasure.py
    shows that chain and verify stay intact after a real erase)."""
    fields, payload = make_entries(1, **{"coworker.input": '{"ssn": "[REDACTED]"}'})[0]
    sqlite_file_store.append([fields], [payload])
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("UPDATE audit_payloads SET payload = NULL WHERE seq = 1")
    conn.close()
    assert next(sqlite_file_store.iter_from(1)).payload is None
    report = verify_chain(sqlite_file_store)
    assert not report.ok
    assert [(p.kind, p.seq) for p in report.problems] == [("payload-mismatch", 1)]
    assert "no erasure or purge record" in report.problems[0].detail


def test_reopen_keeps_records(db_path: Path) -> None:
    """Records survive closing and reopening; appends continue the chain."""
    store = SQLiteStore(db_path)
    fill(store, 3)
    store.close()
    again = SQLiteStore(db_path)
    fill(again, 2)
    assert [r.seq for r in again.iter_from(1)] == [1, 2, 3, 4, 5]
    assert verify_chain(again).ok
    again.close()


def test_two_store_objects_share_one_chain(db_path: Path) -> None:
    """Two connections on one file (like two processes) interleave without forking."""
    one, two = SQLiteStore(db_path), SQLiteStore(db_path)
    entries = make_entries(1)

    def work(store: SQLiteStore) -> None:
        for _ in range(50):
            store.append([entries[0][0]])

    threads = [threading.Thread(target=work, args=(s,)) for s in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.seq for r in one.iter_from(1)] == list(range(1, 101))
    assert verify_chain(two).ok
    one.close()
    two.close()


def test_locked_too_long_is_audit_unavailable(db_path: Path) -> None:
    """A writer that cannot get the lock within busy_timeout fails loudly, writes nothing."""
    store = SQLiteStore(db_path, busy_timeout=0.2)
    fill(store, 1)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(AuditUnavailable, match="locked"):
            fill(store, 1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    head = store.head()
    assert head is not None and head.seq == 1
    store.close()


def test_read_only_store_refuses_appends(db_path: Path) -> None:
    """A read-only store raises AuditUnavailable on append and keeps what it had."""
    store = SQLiteStore(db_path)
    fill(store, 2)
    store.close()
    ro = open_store(f"sqlite:///{db_path}?mode=ro")
    with pytest.raises(AuditUnavailable, match="readonly"):
        fill(ro, 1)
    assert [r.seq for r in ro.iter_from(1)] == [1, 2]
    assert verify_chain(ro).ok
    ro.close()


def test_full_database_is_audit_unavailable(db_path: Path) -> None:
    """A full database (max_page_count) fails the append atomically: no partial batch."""
    store = SQLiteStore(db_path)
    fill(store, 1)
    pages = sqlite3.connect(db_path).execute("PRAGMA page_count").fetchone()[0]
    store.close()
    full = SQLiteStore(db_path, max_page_count=pages)
    entries = make_entries(200)
    with pytest.raises(AuditUnavailable, match="full"):
        full.append([e[0] for e in entries], [e[1] for e in entries])
    head = full.head()
    assert head is not None and head.seq == 1
    assert verify_chain(full).ok
    full.close()


def test_missing_read_only_file_is_audit_unavailable(tmp_path: Path) -> None:
    """Opening a missing store read-only fails with AuditUnavailable, creating nothing."""
    with pytest.raises(AuditUnavailable):
        SQLiteStore(tmp_path / "nope.db", readonly=True)
    assert not (tmp_path / "nope.db").exists()


def test_schema_version_mismatch_refused(db_path: Path) -> None:
    """A file written by another schema version is not silently appended to."""
    SQLiteStore(db_path).close()
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("UPDATE audit_meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(AuditUnavailable, match="schema version 99"):
        SQLiteStore(db_path)


def test_filters_use_indexes(sqlite_file_store: SQLiteStore, db_path: Path) -> None:
    """Query filters hit an index (no full table scan)."""
    fill(sqlite_file_store, 2)
    conn = sqlite3.connect(db_path)
    for column in ("flow_id", "user_id", "agent_id", "doctype", "operation", "category", "time"):
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                f"EXPLAIN QUERY PLAN SELECT seq FROM audit_records WHERE {column} = 'x'"
            )
        )
        assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, (column, plan)
    conn.close()


def test_search_and_columns(sqlite_file_store: SQLiteStore) -> None:
    """search() filters on the derived columns."""
    fill(sqlite_file_store, 2)
    for fields, payload in make_entries(1, **{"user.id": "bob", "coworker.doctype": "Payment"}):
        sqlite_file_store.append([fields], [payload])
    got = list(sqlite_file_store.search({"user": "bob"}))
    assert [r.seq for r in got] == [3]
    assert [r.seq for r in sqlite_file_store.search({"doctype": "Invoice", "user": "alice"})] == [
        1,
        2,
    ]
    with pytest.raises(ConfigError):
        list(sqlite_file_store.search({"colour": "red"}))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_file_permissions(db_path: Path) -> None:
    """A file the process may not write fails appends with AuditUnavailable."""
    store = SQLiteStore(db_path)
    fill(store, 1)
    store.close()
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db_path) + suffix)
        if p.exists():
            p.chmod(0o444)
    try:
        with pytest.raises(AuditUnavailable):
            ro = SQLiteStore(db_path)
            fill(ro, 1)
    finally:
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(db_path) + suffix)
            if p.exists():
                p.chmod(0o644)


def test_dropped_triggers_are_recreated_loudly(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening a file whose triggers were dropped re-arms them and logs a warning."""
    SQLiteStore(db_path).close()
    raw(db_path).close()  # drops the three triggers
    with caplog.at_level("WARNING", logger="coworker.audit"):
        store = SQLiteStore(db_path)
    assert "audit_records_no_delete is missing" in caplog.text
    fill(store, 1)
    conn = sqlite3.connect(db_path, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match="DELETE is not allowed"):
        conn.execute("DELETE FROM audit_records")
    conn.close()
    store.close()


_APPENDER = r"""
import sys
from coworker.audit.store_sqlite import SQLiteStore
from tests.audit.conftest import make_entries
store = SQLiteStore(sys.argv[1])
entries = make_entries(20)
while True:
    batch = entries[: 1 + store.head().seq % 20] if store.head() else entries[:1]
    records = store.append([e[0] for e in batch], [e[1] for e in batch])
    print(records[-1].seq, flush=True)  # only after append returned
"""


def test_kill_9_mid_append_loses_nothing_returned(db_path: Path) -> None:
    """A writer killed with SIGKILL mid-stream (5 times): every append it saw return is in
    the file, no batch is half-written, and the chain verifies."""
    import signal
    import subprocess
    import sys

    SQLiteStore(db_path).close()
    for round_ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", _APPENDER, str(db_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert child.stdout is not None
        returned = 0
        for _ in range(20 + 7 * round_):  # decided by the appends it reports, not by time
            returned = int(child.stdout.readline())
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        store = SQLiteStore(db_path, readonly=True)
        report = verify_chain(store)
        assert report.ok, report
        assert report.head is not None and report.head.seq >= returned
        # All-or-nothing: the writer's batch sizes follow from the head (1 + head % 20), so
        # only whole batches give a head on this path; half a batch would fall off it.
        head, heads = 0, {0}
        while head < report.head.seq:
            head += 1 + head % 20
            heads.add(head)
        assert report.head.seq in heads, report.head
        store.close()


_RACER = r"""
import sys
from coworker.audit.store_sqlite import SQLiteStore
from tests.audit.conftest import make_entries
store = SQLiteStore(sys.argv[1])
entries = make_entries(3, start=int(sys.argv[2]) * 1000)
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[3])):
    batch = entries[: 1 + i % 3]  # groups of 1, 2 and 3, like a group commit
    records = store.append([e[0] for e in batch], [e[1] for e in batch])
    print(" ".join(str(r.seq) for r in records), flush=True)
store.close()
"""


def test_processes_racing_on_one_file_never_fork_the_chain(db_path: Path) -> None:
    """Three processes appending to one file at once, released together: every seq is handed
    out exactly once, in one gapless chain that verifies (the fast append path reads the head
    under the write lock, whatever another process committed meanwhile)."""
    import subprocess
    import sys

    SQLiteStore(db_path).close()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(db_path), str(p), "150"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for p in range(3)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0, 0]
    returned = [int(s) for out in outputs for s in out.split()]
    per_process = 50 * (1 + 2 + 3)
    assert sorted(returned) == list(range(1, 3 * per_process + 1))
    store = SQLiteStore(db_path, readonly=True)
    report = verify_chain(store)
    assert report.ok and report.checked == 3 * per_process
    assert [r.seq for r in store.iter_from(1)] == list(range(1, 3 * per_process + 1))
    store.close()


def test_opening_a_new_store_waits_for_another_writers_lock_on_the_fresh_file(
    tmp_path: Path,
) -> None:
    """Another connection holds the write lock of a file still in rollback mode (another
    process creating the same new store): the open waits for it instead of failing with
    "database is locked" (SQLite refuses the switch to WAL at once, without its busy handler;
    two processes opening a new store together lost one of the opens)."""
    path = tmp_path / "new.db"
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("CREATE TABLE unrelated (x)")
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("INSERT INTO unrelated VALUES (1)")
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            SQLiteStore(path, busy_timeout=60).close()
        except BaseException as exc:
            errors.append(exc)

    opener = threading.Thread(target=open_it)
    opener.start()
    opener.join(timeout=0.3)  # give it time to meet the lock (old code failed at once)
    blocker.execute("COMMIT")
    blocker.close()
    opener.join(timeout=120)
    assert not opener.is_alive()
    assert errors == []
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert check.execute("SELECT count(*) FROM audit_records").fetchone()[0] == 0
    check.close()


def test_an_append_after_the_file_was_deleted_fails_and_makes_no_new_chain(
    tmp_path: Path,
) -> None:
    """The store's file deleted under a live store: the append is refused (SQLite would commit
    into the unlinked inode, the records lost to the path while reported durable) and no new,
    empty chain appears at the path, also not from a reconnect."""
    path = tmp_path / "a.db"
    store = SQLiteStore(path)
    fill(store, 2)
    _delete_store_files(path)
    with pytest.raises(AuditUnavailable, match="deleted"):
        fill(store, 1)
    with pytest.raises(AuditUnavailable, match="deleted"):
        fill(store, 1)
    assert not path.exists()
    store.close()


def test_an_append_after_the_file_was_replaced_fails(tmp_path: Path) -> None:
    """The file renamed away and another store moved to its path: the append is refused
    rather than reported durable in a file that is no longer the store at this path."""
    path = tmp_path / "a.db"
    store = SQLiteStore(path)
    fill(store, 2)
    other = tmp_path / "other.db"
    SQLiteStore(other).close()
    os.rename(path, tmp_path / "moved.db")
    os.rename(other, path)
    with pytest.raises(AuditUnavailable, match="replaced"):
        fill(store, 1)
    store.close()


def test_a_forked_child_does_not_recreate_a_deleted_store(tmp_path: Path) -> None:
    """A forked child reconnecting after the file was deleted fails instead of starting a
    new, empty chain at the path."""
    import multiprocessing

    path = tmp_path / "a.db"
    store = SQLiteStore(path)
    fill(store, 1)
    _delete_store_files(path)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_append_in_child, args=(store, queue))
    child.start()
    outcome = queue.get(timeout=60)
    child.join(timeout=60)
    assert outcome.startswith("AuditUnavailable"), outcome
    assert not path.exists()
    store.close()


def _append_in_child(store: SQLiteStore, queue: Any) -> None:
    try:
        fill(store, 1)
        queue.put("appended")
    except AuditUnavailable as exc:
        queue.put(f"AuditUnavailable: {exc}")


def test_an_append_after_the_wal_file_alone_was_deleted_fails(tmp_path: Path) -> None:
    """The -wal file deleted alone under a live store: SQLite commits into the unlinked WAL,
    which no other connection sees and a crash loses; the append is refused instead."""
    path = tmp_path / "a.db"
    store = SQLiteStore(path)
    fill(store, 2)
    assert os.path.exists(f"{path}-wal")
    os.unlink(f"{path}-wal")
    with pytest.raises(AuditUnavailable, match="-wal"):
        fill(store, 1)
    store.close()


def _delete_store_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.unlink(f"{path}{suffix}")
