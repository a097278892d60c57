"""A process that forks while another of its threads is appending: the child's audit trail works.

The child of a fork gets copies of the locks the appending thread held and of the group commit it
led, without the thread; before the fix its first audited call waited forever, and a record in
the parent's retry queue was written by both processes. ``coworker.audit._fork`` makes the fork
wait for a SQLite append in flight and gives the child fresh locks and an empty queue.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.group_commit import GroupCommit, Turn
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain
from coworker.audit.writer import ON_FAILURE_LOG, AuditWriter

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

_CHILD_DEADLINE = 60.0  # only bounds a hang: the child exits 3 if its call never returns


def _entry(n: str) -> tuple[dict[str, Any], None]:
    fields = {
        "kind": "run",
        "category": "state-change",
        "operation": "update",
        "run_id": n,
        "recorded_at": "2026-12-02T00:00:00.000000Z",
    }
    return fields, None


def _run_ids(path: Path) -> list[str]:
    store = SQLiteStore(path, readonly=True)
    try:
        assert verify_chain(store).ok
        return [json.loads(r.body)["run_id"] for r in store.iter_from(1)]
    finally:
        store.close()


@contextmanager
def _writer_blocked_elsewhere(path: Path) -> Iterator[Callable[[], None]]:
    """Another process holds the file's write lock until the returned function is called."""
    code = (
        "import sqlite3, sys\n"
        f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
        "c.execute('ROLLBACK')\n"
    )
    blocker = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert blocker.stdout is not None and blocker.stdin is not None
    assert blocker.stdout.readline().strip() == "held"
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            assert blocker.stdin is not None
            blocker.stdin.write("go\n")
            blocker.stdin.flush()

    try:
        yield release
    finally:
        release()
        blocker.wait(timeout=30)


def _in_child(call: Callable[[], bool], then: Callable[[], None] = lambda: None) -> int:
    """Fork; in the child run ``call`` in a thread and exit 0 if it returned True, 3 if it
    never returned, 4 if it returned False or raised; in the parent run ``then``. Returns
    the child's exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        outcome: list[bool] = []

        def run() -> None:
            try:
                outcome.append(call())
            except BaseException:
                outcome.append(False)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(_CHILD_DEADLINE)
        os._exit(3 if not outcome else 0 if outcome[0] else 4)
    then()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.001)


def test_a_child_forked_while_an_append_waits_writes_its_own_records(db_path: Path) -> None:
    """Forked while a thread's append waits for the file's write lock: the fork waits for it,
    the child's audited call returns its record, and the log holds each record once."""
    store = SQLiteStore(db_path)
    writer = AuditWriter(store)
    writer.write([_entry("before")])
    with _writer_blocked_elsewhere(db_path) as release:
        parent_call = threading.Thread(target=writer.write, args=([_entry("parent")],))
        parent_call.start()
        _wait_until(store._lock.locked)  # the parent's append is inside the store, waiting

        # Released once the fork has begun (this hook runs before coworker's), by another
        # thread: the fork must then wait for the parent's append, not copy it half done.
        forking = threading.Event()
        threading.Thread(target=lambda: (forking.wait(), release()), daemon=True).start()
        os.register_at_fork(before=forking.set)
        code = _in_child(lambda: len(writer.write([_entry("child")])) == 1)
        parent_call.join(timeout=30)
    writer.close()
    store.close()
    assert code == 0, "the child's audited call did not return its record"
    assert sorted(_run_ids(db_path)) == ["before", "child", "parent"]


def test_a_group_commit_forked_mid_commit_is_free_in_the_child() -> None:
    """The child of a fork made while a leader commits leads its own commit at once."""
    inside, finish = threading.Event(), threading.Event()
    committed: list[list[Turn]] = []

    def commit(batch: list[Turn]) -> None:
        committed.append(batch)
        if len(committed) == 1:  # the parent's first commit stays open until told
            inside.set()
            finish.wait(30)

    group: GroupCommit[Turn, None] = GroupCommit(commit)
    leader = threading.Thread(target=group.submit, args=(Turn(),))
    leader.start()
    inside.wait(30)
    follower = threading.Thread(target=group.submit, args=(Turn(),))
    follower.start()
    _wait_until(lambda: bool(group._queue))  # queued behind the open commit

    def child() -> bool:
        mine = Turn()
        group.submit(mine)
        # The child commits its own ticket alone: the parent's queued one is the parent's.
        return mine.done and len(committed) == 2 and committed[1] == [mine]

    code = _in_child(child)
    finish.set()
    leader.join(30)
    follower.join(30)
    assert code == 0, "the child's submit did not return (or committed the parent's ticket)"
    assert len(committed) == 2 and len(committed[1]) == 1  # the parent's follower, alone


def test_the_parent_retry_queue_is_not_written_by_the_child_too(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record waiting in the parent's retry queue at the fork is written once, by the parent;
    the child says it left it to the parent."""
    store = SQLiteStore(db_path, busy_timeout=0.05)
    writer = AuditWriter(store, on_failure=ON_FAILURE_LOG)
    writer.write([_entry("before")])
    with _writer_blocked_elsewhere(db_path) as release:
        assert writer.write([_entry("queued")]) == []  # the file is locked: queued for retry
        assert writer.retry_depth == 1
        read, write = os.pipe()
        with caplog.at_level(logging.WARNING, logger="coworker.audit"):

            def child() -> bool:
                os.close(read)
                os.write(write, caplog.text.encode() or b"-")
                return writer.retry_depth == 0

            code = _in_child(child)
        os.close(write)
        child_log = os.read(read, 65536).decode()
        os.close(read)
        release()
    assert code == 0, "the child kept the parent's queued record"
    assert "left to it" in child_log
    assert writer.flush()  # the parent writes it
    assert writer.retry_depth == 0
    writer.write([_entry("after")])
    writer.close()
    store.close()
    assert _run_ids(db_path) == ["before", "queued", "after"]


@pytest.mark.postgres
def test_a_child_forked_while_a_postgresql_append_waits_writes_its_own_records(pg: Any) -> None:
    """Forked while a thread's append waits on the chain's lock in the server: the child's
    audited call connects anew and returns its record; the chain holds each record once."""
    import psycopg

    from coworker.audit.store_postgres import PostgresStore
    from coworker.audit.store_postgres.ddl import _LOCK_NAMESPACE

    store = PostgresStore(pg.schema_url(), spool=None)
    writer = AuditWriter(store)
    writer.write([_entry("before")])
    with psycopg.connect(pg.url) as holder:
        (key,) = holder.execute(  # type: ignore[misc]
            "SELECT %s::regclass::oid::int", (f'"{store.schema}".records',)
        ).fetchone()
        holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, key))
        parent_call = threading.Thread(target=writer.write, args=([_entry("parent")],))
        parent_call.start()

        def waiting() -> bool:  # the parent's append() waits for the chain lock
            row = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND objid = %s",
                (key,),
            ).fetchone()
            return bool(row and row[0])

        _wait_until(waiting)
        code = _in_child(lambda: len(writer.write([_entry("child")])) == 1, then=holder.rollback)
        parent_call.join(timeout=30)
    assert code == 0, "the child's audited call did not return its record"
    assert sorted(json.loads(r.body)["run_id"] for r in store.iter_from(1)) == [
        "before",
        "child",
        "parent",
    ]
    assert verify_chain(store).ok
    writer.close()
    store.close()


def test_a_child_forked_while_a_spool_put_waits_spools_its_own_entries(tmp_path: Path) -> None:
    """Forked while a thread's spool put waits for the spool file's write lock: the fork waits
    for it and the child's put goes through a connection of its own; each entry is there once."""
    from coworker.audit.spool import Spool

    path = tmp_path / "spool.db"
    spool = Spool(path)
    spool.put([{"n": "before"}])
    with _writer_blocked_elsewhere(path) as release:
        parent_put = threading.Thread(target=spool.put, args=([{"n": "parent"}],))
        parent_put.start()
        _wait_until(lambda: _rlock_held(spool))  # the parent's put waits inside the spool
        forking = threading.Event()
        threading.Thread(target=lambda: (forking.wait(), release()), daemon=True).start()
        os.register_at_fork(before=forking.set)
        code = _in_child(lambda: (spool.put([{"n": "child"}]), True)[1])
        parent_put.join(timeout=30)
    assert code == 0, "the child's spool put did not return"
    assert sorted(e.fields["n"] for e in spool.peek()) == ["before", "child", "parent"]
    spool.close()


def _rlock_held(spool: Any) -> bool:
    # Held by the parent's put (another thread): a non-blocking acquire fails.
    lock = spool._mutex
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def test_a_child_forked_while_the_tree_is_written_reads_it_on_its_own_connection(
    tmp_path: Path,
) -> None:
    """Forked while the checkpointer's tree file write waits for its lock: the fork waits for
    it, and the child reads the tree (as its final checkpoint at exit would) on its own
    connection instead of waiting forever for the parent's thread."""
    from coworker.audit.tlog import SQLiteTable

    path = tmp_path / "audit.db.tree"
    table = SQLiteTable(str(path))
    with _writer_blocked_elsewhere(path) as release:
        parent_write = threading.Thread(
            target=table.add_checkpoint, args=("example.com/log", 1, b"note")
        )
        parent_write.start()
        _wait_until(table._lock.locked)  # the parent's write waits inside the table
        forking = threading.Event()
        threading.Thread(target=lambda: (forking.wait(), release()), daemon=True).start()
        os.register_at_fork(before=forking.set)
        code = _in_child(lambda: table.latest("example.com/log") is not None)
        parent_write.join(timeout=30)
    assert code == 0, "the child could not read the tree"
    latest = table.latest("example.com/log")
    assert latest is not None and latest.note == b"note"
    table.close()
