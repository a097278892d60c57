"""The group commit: a caller whose records are durable returns without waiting for a later
commit, and an interrupted caller neither loses its ticket nor strands the others."""

from __future__ import annotations

import inspect
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.group_commit import GroupCommit, Turn
from coworker.audit.store import StoredRecord
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain
from coworker.audit.writer import AuditWriter
from tests.audit.conftest import make_entries

_WAIT = 30.0  # seconds an event may take on a loaded machine; only a broken build waits it out


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(_WAIT):
        raise AssertionError(f"timed out waiting for {what}")


class _HeldStore(SQLiteStore):
    """A real SQLite store that runs ``hold(span_ids)`` before each append."""

    def __init__(self, path: Path, hold: Callable[[set[str]], None]) -> None:
        super().__init__(path)
        self._hold = hold

    def append(
        self,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None = None,
    ) -> list[StoredRecord]:
        self._hold({str(e["span_id"]) for e in entries})
        return super().append(entries, payloads)


def _queued(writer: AuditWriter, n: int) -> None:
    # Until n tickets wait in the writer's group commit (they queue before they block).
    done = threading.Event()
    while not done.wait(0.001):
        with writer._group._lock:
            if len(writer._group._queue) >= n:
                return


def test_a_done_caller_does_not_wait_for_the_next_commit(db_path: Path) -> None:
    # X and Y are committed together; whichever led calls again at once and its next commit
    # is held until both first calls have returned. With one shared write lock the caller
    # whose record was already durable had to take that lock again, and the returning leader
    # took it first (it holds the GIL): the follower sat behind a whole later commit.
    entries = make_entries(5)
    w0, a_x, a_y, b_x, b_y = entries
    first = {str(w0[0]["span_id"])}
    seconds = {str(b_x[0]["span_id"]), str(b_y[0]["span_id"])}
    in_first, both_returned = threading.Event(), threading.Event()
    returned: list[str] = []
    timed_out: list[str] = []
    writer: AuditWriter

    def hold(span_ids: set[str]) -> None:
        if span_ids == first:
            in_first.set()
            _queued(writer, 2)  # X and Y wait behind this commit
        elif span_ids & seconds and not both_returned.wait(_WAIT):
            timed_out.append("a caller whose record was durable did not return")

    writer = AuditWriter(_HeldStore(db_path, hold))
    lock = threading.Lock()

    def caller(name: str, a: Any, b: Any) -> None:
        assert len(writer.write([a])) == 1
        with lock:
            returned.append(name)
            if len(returned) == 2:
                both_returned.set()
        assert len(writer.write([b])) == 1

    leader = threading.Thread(target=writer.write, args=([w0],))
    leader.start()
    _wait(in_first, "the first commit")
    threads = [
        threading.Thread(target=caller, args=("x", a_x, b_x)),
        threading.Thread(target=caller, args=("y", a_y, b_y)),
    ]
    for th in threads:
        th.start()
    for th in (leader, *threads):
        th.join()
    assert timed_out == []
    assert sorted(returned) == ["x", "y"]
    writer.store.close()
    store = SQLiteStore(db_path, readonly=True)
    assert verify_chain(store).ok
    assert store.count() == 5
    store.close()


def test_the_returning_leader_never_overtakes_its_followers(db_path: Path) -> None:
    # The same race many times over (whoever leads, whoever is woken first): every round, a
    # caller that shared a commit returns while the next commit is held for it.
    for round_ in range(20):
        test_a_done_caller_does_not_wait_for_the_next_commit(db_path.with_name(f"r{round_}.db"))


class _Call(Turn):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class _Recorder:
    """A commit callback that records its batches; ``gate`` holds the first one."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.raise_first: BaseException | None = None

    def __call__(self, batch: list[_Call]) -> int:
        self.batches.append([t.name for t in batch])
        if len(self.batches) == 1:
            self.entered.set()
            _wait(self.gate, "the test to open the first commit")
            if self.raise_first is not None:
                raise self.raise_first
        return len(batch)


def _submit_in_thread(
    group: GroupCommit[_Call, int], ticket: _Call, out: dict[str, Any]
) -> threading.Thread:
    def run() -> None:
        try:
            out[ticket.name] = group.submit(ticket)
        except BaseException as exc:  # the test reads what each caller saw
            out[ticket.name] = exc
        finally:
            out[ticket.name + ".done"] = ticket.done

    th = threading.Thread(target=run)
    th.start()
    return th


def _queue_len(group: GroupCommit[_Call, int], n: int) -> None:
    done = threading.Event()
    while not done.wait(0.001):
        with group._lock:
            if len(group._queue) >= n:
                return


_ACQUIRE_LINE = (
    next(
        i
        for i, line in enumerate(inspect.getsourcelines(GroupCommit.submit)[0])
        if "wake.acquire()  # released" in line
    )
    + inspect.getsourcelines(GroupCommit.submit)[1]
)


def _interrupt_main_when_waiting(on_signal: Callable[[], None]) -> threading.Thread:
    """Send SIGINT to the main thread once it waits in ``submit``; ``on_signal`` runs in the
    main thread's handler before it raises KeyboardInterrupt."""
    main = threading.main_thread().ident
    assert main is not None

    def handler(signum: int, frame: Any) -> None:
        on_signal()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)

    def send() -> None:
        done = threading.Event()
        while not done.wait(0.001):
            frame = sys._current_frames().get(main)
            if (
                frame is not None
                and frame.f_code is GroupCommit.submit.__code__
                and frame.f_lineno == _ACQUIRE_LINE
            ):
                signal.pthread_kill(main, signal.SIGINT)
                return

    th = threading.Thread(target=send)
    th.start()
    return th


@pytest.fixture
def sigint() -> Any:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the interrupt tests run in the main thread")
    saved = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, saved)


class _Interrupted:
    """A leader held in its commit and the main thread interrupted while it waits behind it
    (``on_signal`` runs in the handler, before the KeyboardInterrupt)."""

    def __init__(self, on_signal: Callable[[_Interrupted], None] | None = None) -> None:
        self.rec = _Recorder()
        self.group: GroupCommit[_Call, int] = GroupCommit(self.rec)
        self.out: dict[str, Any] = {}
        self.leader = _submit_in_thread(self.group, _Call("leader"), self.out)
        self.others: list[threading.Thread] = []
        _wait(self.rec.entered, "the first commit")
        sender = _interrupt_main_when_waiting(lambda: on_signal and on_signal(self))
        self.mine = _Call("main")
        with pytest.raises(KeyboardInterrupt):
            self.group.submit(self.mine)
        sender.join()

    def queue(self, name: str, n: int) -> None:
        self.others.append(_submit_in_thread(self.group, _Call(name), self.out))
        _queue_len(self.group, n)


def test_interrupted_waiter_keeps_its_ticket_and_the_next_caller_leads(sigint: None) -> None:
    run = _Interrupted()
    run.queue("after", 2)
    run.rec.gate.set()
    run.leader.join()
    run.others[0].join()
    # The interrupted caller's ticket went into the next commit, led by the one still waiting.
    assert run.rec.batches == [["leader"], ["main", "after"]]
    assert run.out == {"leader": 1, "leader.done": True, "after": 2, "after.done": True}
    assert run.mine.done


def test_interrupted_just_as_it_was_given_the_lead(sigint: None) -> None:
    # The handler lets the first commit finish and waits until its leader has returned, so
    # the leadership has been handed to the main thread, and only then raises: it must pass
    # the leadership on, or "after" would wait forever.
    def on_signal(run: _Interrupted) -> None:
        run.queue("after", 2)
        run.rec.gate.set()
        run.leader.join()  # it handed the leadership to the main thread on its way out

    run = _Interrupted(on_signal)
    run.others[0].join()
    assert run.rec.batches == [["leader"], ["main", "after"]]
    assert run.out["after"] == 2
    assert run.mine.done


def test_interrupted_alone_its_ticket_waits_for_drain(sigint: None) -> None:
    run = _Interrupted()
    run.rec.gate.set()
    run.leader.join()
    assert run.rec.batches == [["leader"]] and not run.mine.done
    assert run.group.drain() == 1
    assert run.rec.batches == [["leader"], ["main"]] and run.mine.done
    assert run.group.drain() is None  # nothing left


def test_a_leader_that_raises_still_wakes_its_batch_and_hands_over() -> None:
    rec = _Recorder()
    rec.raise_first = KeyboardInterrupt()
    group: GroupCommit[_Call, int] = GroupCommit(rec)
    out: dict[str, Any] = {}
    leader = _submit_in_thread(group, _Call("leader"), out)
    _wait(rec.entered, "the first commit")
    waiting = _submit_in_thread(group, _Call("next"), out)
    _queue_len(group, 1)
    rec.gate.set()
    leader.join()
    waiting.join()
    assert isinstance(out["leader"], KeyboardInterrupt) and out["leader.done"]
    assert rec.batches == [["leader"], ["next"]]
    assert out["next"] == 1


def test_writer_flush_writes_an_interrupted_callers_record(db_path: Path, sigint: None) -> None:
    entries = make_entries(2)
    in_first, gate = threading.Event(), threading.Event()
    first = {str(entries[0][0]["span_id"])}

    def hold(span_ids: set[str]) -> None:
        if span_ids == first:
            in_first.set()
            _wait(gate, "the test to open the first commit")

    writer = AuditWriter(_HeldStore(db_path, hold))
    leader = threading.Thread(target=writer.write, args=([entries[0]],))
    leader.start()
    _wait(in_first, "the first commit")
    sender = _interrupt_main_when_waiting(lambda: None)
    with pytest.raises(KeyboardInterrupt):
        writer.write([entries[1]])
    sender.join()
    gate.set()
    leader.join()
    assert writer.store.count() == 1
    assert writer.flush()
    assert writer.store.count() == 2
    assert verify_chain(writer.store).ok
    writer.store.close()
