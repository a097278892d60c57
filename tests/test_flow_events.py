"""Flow lifecycle events (coworker._flow_events): configuration, what is written, and that
events never pose as runs."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import coworker
from coworker import _flow_events
from coworker.audit.fold import replay
from coworker.audit.query import build_tree, in_doubt, query
from coworker.audit.store_sqlite import SQLiteStore

FLOW = coworker.workflow("w", steps=["one", "two"])


@coworker.run(operation="create", doctype="Doc")
def create() -> None:
    """An audited state change."""


def _events(store: SQLiteStore) -> list[str]:
    return [e.fields["operation"] for e in query(store, category="flow")]


def test_flow_events_setting_parses_types_all_and_none() -> None:
    """`flow_events=` takes type names, all/none, booleans; a bad name is a ConfigError."""
    assert _flow_events.parse_types(None) == frozenset({"workflow"})
    assert _flow_events.parse_types("workflow, batch-job") == {"workflow", "batch-job"}
    assert _flow_events.parse_types("all") is None and _flow_events.parse_types(True) is None
    assert _flow_events.parse_types("none") == frozenset() == _flow_events.parse_types(False)
    with pytest.raises(coworker.ConfigError, match="flow_events"):
        _flow_events.parse_types("Work Flow")


def test_env_var_selects_flow_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COWORKER_FLOW_EVENTS=none turns workflow events off; batch-job turns that type on."""
    db = tmp_path / "a.db"
    monkeypatch.setenv("COWORKER_FLOW_EVENTS", "none")
    coworker.configure(audit=f"sqlite:///{db}")
    with FLOW.start(), coworker.step("one"):
        create()
    monkeypatch.setenv("COWORKER_FLOW_EVENTS", "batch-job")
    coworker.configure(audit=f"sqlite:///{db}")
    with coworker.flow("batch-job") as job:
        create()
    coworker.shutdown()
    store = SQLiteStore(db)
    assert {e.fields["flow_id"] for e in query(store, category="flow")} == {job.id}
    store.close()


def test_no_audit_trail_no_events_and_nothing_queued() -> None:
    """Without an audit trail the hooks do nothing (and keep nothing)."""
    with FLOW.start() as f, f.step("one"):
        create()
    assert _flow_events.live_state(f.id) is None and not _flow_events._live


def test_flow_events_are_not_runs_in_the_tree_nor_close_intents(tmp_path: Path) -> None:
    """A step event carries no run or span id: `audit tree` shows only runs, and a
    fail-closed intent is never closed by the step outcome of its run."""
    db = tmp_path / "a.db"
    coworker.configure(audit=f"sqlite:///{db}", fail_closed=True)

    @coworker.run(operation="submit", doctype="Doc", step="two")
    def submit() -> None:
        create()

    with FLOW.start() as f:
        submit()
    store = SQLiteStore(db)
    events = [e for e in query(store, flow_id=f.id) if e.fields["category"] == "flow"]
    assert events and all(e.fields["span_id"] is None for e in events)
    assert all(e.fields["run_id"] is None for e in events)
    tree = build_tree(query(store, flow_id=f.id), f.id)
    assert [r.entry.fields["operation"] for s in tree.steps for r in s.runs] == ["submit"]
    assert in_doubt(store) == []
    store.close()


def test_generator_run_opens_and_closes_its_step(tmp_path: Path) -> None:
    """A decorated generator with step= enters the step at its first next() and completes
    it when exhausted."""
    db = tmp_path / "a.db"
    coworker.configure(audit=f"sqlite:///{db}")

    @coworker.run(operation="import", doctype="Doc", step="one")
    def rows() -> object:
        yield 1
        yield 2

    with FLOW.start() as f:
        assert list(rows()) == [1, 2]  # type: ignore[call-overload]
    coworker.force_flush()
    store = SQLiteStore(db)
    state = replay(store, f.id)
    assert [(s.step_id, s.outcome) for s in state.steps] == [("one", "completed")]
    assert _events(store)[-2:] == ["flow-completed", "flow-sealed"]
    store.close()


def test_opening_events_share_the_run_records_transaction(tmp_path: Path) -> None:
    """flow-started and step-entered are not written on their own: they land together with
    the first run record (seqs 1, 2, 3 committed at once); the step's outcome rides with the
    next step's run record."""
    db = tmp_path / "a.db"
    coworker.configure(audit=f"sqlite:///{db}")
    store = SQLiteStore(db)
    with FLOW.start() as f:
        with f.step("one"):
            assert store.head() is None  # nothing written yet: the events are queued
            create()
            head = store.head()
            assert head is not None and head.seq == 3
        assert store.head() == head  # the outcome is queued: no transaction of its own
        with f.step("two"):
            create()
        assert _events(store) == ["flow-started", "step-entered", "step-completed", "step-entered"]
        assert [e.seq for e in query(store, flow_id=f.id)] == [1, 2, 3, 4, 5, 6]
    coworker.force_flush()
    assert _events(store)[-3:] == ["step-completed", "flow-completed", "flow-sealed"]
    store.close()


def test_flow_end_rides_with_the_next_record_of_another_flow(tmp_path: Path) -> None:
    """A flow's end costs no transaction: it is written with the next run record of the
    next flow, in order before it, and its seal with the one after."""
    db = tmp_path / "a.db"
    coworker.configure(audit=f"sqlite:///{db}")
    store = SQLiteStore(db)
    with FLOW.start() as first, first.step("one"):
        create()
    head = store.head()
    with FLOW.start() as second, second.step("one"):
        assert store.head() == head  # nothing written at the first flow's exit
        create()
        create()
    coworker.force_flush()
    by_seq = {e.seq: (e.fields["flow_id"], e.fields["operation"]) for e in query(store)}
    assert head is not None
    assert [by_seq[head.seq + i] for i in (1, 2)] == [
        (first.id, "step-completed"),
        (first.id, "flow-completed"),
    ]
    state = replay(store, first.id)
    assert state.status == "completed" and state.seal is not None and state.seal.head_matches
    store.close()


def test_ended_flow_is_sealed_by_the_flusher_when_nothing_else_writes(tmp_path: Path) -> None:
    """With no other record to ride with, the background flusher writes a flow's end and
    seal on its own, without force_flush()."""
    db = tmp_path / "a.db"
    coworker.configure(audit=f"sqlite:///{db}")
    with FLOW.start() as f, f.step("one"):
        create()
    store = SQLiteStore(db)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if replay(store, f.id).seal is not None:
            break
        time.sleep(0.01)
    state = replay(store, f.id)
    assert state.status == "completed" and state.seal is not None and state.seal.status_matches
    store.close()


def test_flow_seal_wait_makes_the_end_durable_before_the_block_exits(tmp_path: Path) -> None:
    """configure(flow_seal="wait"): the flow's end and seal are in the log when its block
    exits; a bad value is a ConfigError."""
    with pytest.raises(coworker.ConfigError, match="flow_seal"):
        coworker.configure(audit=f"sqlite:///{tmp_path / 'x.db'}", flow_seal="later")
    db = tmp_path / "a.db"
    coworker.configure(audit=f"sqlite:///{db}", flow_seal="wait")
    with FLOW.start() as f, f.step("one"):
        create()
    store = SQLiteStore(db)
    state = replay(store, f.id)
    assert state.status == "completed" and state.seal is not None and state.seal.head_matches
    assert state.seal.head_seq == state.seal.seq - 1
    store.close()


@pytest.mark.parametrize("seal", ["deferred", "wait"])
def test_a_crash_right_after_the_flow_exits_never_claims_more(tmp_path: Path, seal: str) -> None:
    """os._exit right after a workflow block: the runs are durable; the log says the flow
    completed only if its end was written ("wait": always), never a step that did not end."""
    db = tmp_path / "a.db"
    script = textwrap.dedent(
        f"""
        import os, coworker
        coworker.configure(audit="sqlite:///{db}", flow_seal="{seal}")
        wf = coworker.workflow("w", steps=["one", "two"])
        @coworker.run(operation="create", doctype="D")
        def c(): pass
        with wf.start(id="crash-flow") as f:
            with f.step("one"):
                c()
            with f.step("two"):
                c()
        os._exit(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr
    store = SQLiteStore(db)
    state = replay(store, "crash-flow")
    assert state.runs == 2  # every run record was durable when its call returned
    steps = dict((s.step_id, s.outcome) for s in state.steps)
    if seal == "wait":
        assert state.status == "completed" and state.seal is not None
        assert steps == {"one": "completed", "two": "completed"}
    else:  # the end may not have made it: then the flow is still active, step two running
        assert state.status in ("active", "completed")
        assert steps["one"] == "completed" and steps["two"] in ("running", "completed")
        assert (state.status == "completed") == (steps["two"] == "completed")
    store.close()


def test_a_long_conversation_keeps_bounded_step_state(tmp_path: Path) -> None:
    """A conversation with events on: the live state of its flow does not grow with every
    turn's step (completed steps beyond the cap are forgotten)."""
    coworker.configure(audit=f"sqlite:///{tmp_path / 'a.db'}", flow_events="all")

    @coworker.run(operation="read", doctype="Doc")
    def look() -> None:
        pass

    chat = coworker.conversation("long")
    for _ in range(_flow_events._STEPS_KEPT + 200):
        with chat.turn():
            look()
    live = _flow_events._live[chat.flow.id]
    assert len(live.steps) <= _flow_events._STEPS_KEPT + 1
    assert live.current_step == f"turn-{chat.turns}-read-1"


def test_a_forked_child_never_writes_its_parents_queued_events(tmp_path: Path) -> None:
    """fork() while an ended flow's end and seal are still queued: the child's own flow is
    recorded, and the parent's events and seal are in the log once each (the parent's)."""
    db = tmp_path / "a.db"
    script = textwrap.dedent(
        f"""
        import os, coworker
        coworker.configure(audit="sqlite:///{db}")
        wf = coworker.workflow("w", steps=["one"])
        @coworker.run(operation="create", doctype="D")
        def c(): pass
        with wf.start(id="parent-flow"):
            with coworker.step("one"):
                c()
            with coworker.step("one"):  # a second attempt: its entry is queued at the fork
                pid = os.fork()
                if pid == 0:
                    with wf.start(id="child-flow"):
                        with coworker.step("one"):
                            c()
                    coworker.shutdown()
                    os._exit(0)
                assert os.waitpid(pid, 0)[1] == 0
                c()
        pid = os.fork()  # the parent's end and seal are queued (due) here
        if pid == 0:
            with wf.start(id="child-flow-2"):
                with coworker.step("one"):
                    c()
            coworker.shutdown()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        coworker.shutdown()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    store = SQLiteStore(db)
    events = [
        (e.fields["operation"], e.fields["step_id"], e.fields.get("attempt"))
        for e in query(store, category="flow", flow_id="parent-flow")
    ]
    assert len(events) == len(set(events)), events
    assert [e[0] for e in events].count("flow-sealed") == 1
    for flow_id in ("parent-flow", "child-flow", "child-flow-2"):
        state = replay(store, flow_id)
        assert state.status == "completed" and state.seal is not None, flow_id
        assert state.seal.head_matches, flow_id
    store.close()


def test_force_flush_waits_for_the_flushers_write_under_way(tmp_path: Path) -> None:
    """force_flush() while the background flusher is writing an ended flow's events (the
    store busy): it returns once those events and the seal are durable, not before."""
    db = tmp_path / "a.db"
    coworker.configure(audit=f"sqlite:///{db}")
    with FLOW.start() as f, f.step("one"):
        create()
    blocker = sqlite3.connect(db, isolation_level=None, timeout=30, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # the flusher's write waits for this lock
    deadline = time.monotonic() + 30
    live = _flow_events._live.get(f.id)
    while time.monotonic() < deadline and live is not None:
        if live.inflight and not live.pending:  # taken by the flusher, not durable
            break
        time.sleep(0.002)
    assert live is not None and live.inflight and not live.pending
    release = threading.Timer(0.2, blocker.execute, ("ROLLBACK",))
    release.start()
    coworker.force_flush()
    store = SQLiteStore(db)
    state = replay(store, f.id)
    assert state.status == "completed" and state.seal is not None and state.seal.head_matches
    store.close()
    release.join()
    blocker.close()


def test_configure_while_the_flushers_write_outlasts_the_flush_timeout_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher's write of an ended flow's events is stuck on a locked store past flush()'s
    deadline: configure() raises with the old trail in force (flush() used to return as if
    flushed, so the swap went on and the events landed in the new store)."""
    from coworker import _setup

    old, new = tmp_path / "old.db", tmp_path / "new.db"
    coworker.configure(audit=f"sqlite:///{old}")
    blocker = sqlite3.connect(old, isolation_level=None, timeout=30, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    with FLOW.start() as f:
        pass  # no audited run: the end and seal wait for the flusher
    deadline = time.monotonic() + 30
    while _flow_events._writing == 0:  # the flusher took them and is waiting on the lock
        assert time.monotonic() < deadline, "the flusher never started writing"
        time.sleep(0.005)
    monkeypatch.setattr(_flow_events, "_FLUSH_TIMEOUT", 0.05)
    with pytest.raises(coworker.AuditUnavailable, match="still being written"):
        coworker.configure(audit=f"sqlite:///{new}")
    store_in_force = _setup.audit_store()
    assert store_in_force is not None and Path(store_in_force.store_path) == old
    monkeypatch.undo()
    blocker.execute("ROLLBACK")
    blocker.close()
    coworker.force_flush()
    store = SQLiteStore(old)
    state = replay(store, f.id)
    assert state.status == "completed" and state.seal is not None
    store.close()
    assert not new.exists() or list(query(SQLiteStore(new), category="flow")) == []


def test_configure_that_cannot_flush_queued_events_leaves_the_old_trail(tmp_path: Path) -> None:
    """configure() again while the current store cannot take an ended flow's queued events:
    it raises with the previous audit trail still in force (not half-applied), and every
    event of the flow lands later in that one store, none in the new one."""
    from coworker import _setup

    old, new = tmp_path / "old.db", tmp_path / "new.db"
    coworker.configure(audit=f"sqlite:///{old}")
    blocker = sqlite3.connect(old, isolation_level=None, timeout=30, check_same_thread=False)
    with FLOW.start() as f:
        with f.step("one"):
            create()
        blocker.execute("BEGIN IMMEDIATE")  # the end and seal cannot be written now
    with pytest.raises(coworker.AuditUnavailable):
        coworker.configure(audit=f"sqlite:///{new}")
    store_in_force = _setup.audit_store()
    assert store_in_force is not None and Path(store_in_force.store_path) == old
    blocker.execute("ROLLBACK")
    blocker.close()
    coworker.force_flush()
    store = SQLiteStore(old)
    state = replay(store, f.id)
    assert state.status == "completed" and state.seal is not None and state.seal.head_matches
    store.close()
    if new.exists():
        other = SQLiteStore(new)
        assert list(query(other, category="flow")) == []
        other.close()


def test_a_failing_store_is_logged_once_per_failure_not_per_retry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store refuses the flusher's writes (locked, no busy wait), the flusher
    retries but says so once (and once when it works again), never once per 50 ms retry;
    no event is dropped. With the reminder interval at 0 every retry is a reminder."""
    db = tmp_path / "a.db"
    coworker.configure(audit=f"sqlite:///{db}?busy_timeout=0")
    blocker = sqlite3.connect(db, isolation_level=None, timeout=30, check_same_thread=False)

    def said(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="coworker.audit"):
        with FLOW.start() as f:
            with f.step("one"):
                create()
            blocker.execute("BEGIN IMMEDIATE")  # the end and seal cannot be written now
        flusher = _flow_events._flusher
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            attempts = getattr(getattr(flusher, "failures", None), "attempts", 0)
            if attempts >= 5 or said("not yet written") >= 3:
                break
            time.sleep(0.01)
        assert said("not yet written") == 1, [r.getMessage() for r in caplog.records]
        assert said("still not written") == 0
        monkeypatch.setattr(_flow_events, "FAILURE_REMINDER", 0.0)
        reached = flusher.failures.attempts + 2  # type: ignore[union-attr]
        while time.monotonic() < deadline and flusher.failures.attempts < reached:  # type: ignore[union-attr]
            time.sleep(0.01)
        assert said("still not written") >= 1
        blocker.execute("ROLLBACK")
        while time.monotonic() < deadline and not said("written again"):
            time.sleep(0.01)
        assert said("written again") == 1
    blocker.close()
    coworker.force_flush()
    store = SQLiteStore(db)
    state = replay(store, f.id)
    assert state.status == "completed" and state.seal is not None and state.seal.head_matches
    store.close()
