"""Leader/follower group commit in which a caller returns as soon as its own commit is done.

Callers queue a ticket; one of them, the *leader*, takes every queued ticket and commits them
in one go (one fsync for all); the others wait, each on a lock of its own. When the commit
is over the leader wakes the callers it committed for (they return at once) and hands the
leadership to the first caller that queued meanwhile, whose commit starts while the leader
is still on its way out.

The simpler scheme, every caller taking one shared write lock and finding its ticket done or
committing the queue itself, makes a caller whose record is already durable wait for the
write lock again, and a caller arriving at the free lock (the old leader calling again, say)
takes it first and holds it for a whole commit: measured under load, callers waited p90
10-12 ms after their commit was done. Here a done caller never waits for a later commit.

:class:`coworker.audit.writer.AuditWriter` commits through this class, and so does the raw
SQLite baseline of ``benchmarks/audit_append.py``, so that the two are the same mechanism.

Interrupts: a waiting caller interrupted (``KeyboardInterrupt`` in the main thread) leaves
its ticket queued, so the next commit still writes it, and passes on the leadership if it
had just been given it; nobody is left waiting for a leader that never comes. Tickets left
queued with nobody to lead them are committed by the next :meth:`GroupCommit.submit` or by
:meth:`GroupCommit.drain` (the writer's flush and close call it).

Fork: the child of a process that forked while a commit was in progress starts with a free
group commit and an empty queue (:mod:`coworker.audit._fork`); the queued tickets are the
parent's callers', and the parent commits them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from coworker.audit import _fork

__all__ = ["GroupCommit", "Turn"]


class Turn:
    """A caller's place in the queue; subclass it to carry what the commit needs."""

    __slots__ = ("_abandoned", "_lead", "_wake", "done")

    def __init__(self) -> None:
        self.done = False
        """Set (by :class:`GroupCommit`) once a commit has taken this ticket, ok or not."""
        self._lead = False
        self._abandoned = False
        self._wake: threading.Lock | None = None


T = TypeVar("T", bound=Turn)
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Commit queued tickets in batches, one leader at a time.

    Args:
        commit: called by the leader with the batch (queue order); it records each ticket's
            outcome on the ticket. Its return value goes back to the leader's caller only
            (the writer's metrics, recorded once the next commit has started). If it raises,
            every ticket of the batch is still marked done and woken; the error propagates
            to the leader, and the callback must have told the other tickets.
    """

    def __init__(self, commit: Callable[[list[T]], R]) -> None:
        self._commit = commit
        self._lock = threading.Lock()  # guards the queue, the leadership and the wake locks
        self._queue: list[T] = []
        self._leading = False
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        # The leader and the waiters were the parent's threads: none of them is here.
        self._lock = threading.Lock()
        self._queue = []
        self._leading = False

    def submit(self, ticket: T) -> R | None:
        """Queue ``ticket`` and return once a commit has taken it (``ticket.done``).

        Returns:
            What ``commit`` returned, when this caller led the commit; else ``None``.
        """
        with self._lock:
            if not self._leading:  # nobody commits: lead at once, with what is queued
                self._leading = True
                batch, self._queue = self._queue, []
                batch.append(ticket)
                wake = None
            else:
                self._queue.append(ticket)
                wake = ticket._wake = threading.Lock()
                wake.acquire()
        if wake is None:
            return self._lead(batch)
        try:
            wake.acquire()  # released when the ticket is done or is to lead
        except BaseException:
            self._abandon(ticket)
            raise
        if ticket.done:
            return None
        with self._lock:
            batch, self._queue = self._queue, []
        return self._lead(batch)

    def drain(self) -> R | None:
        """Commit the tickets left queued with no leader (their callers were interrupted).

        Returns:
            What ``commit`` returned, or ``None`` when there was nothing to do or another
            caller leads (it commits them).
        """
        with self._lock:
            if self._leading or not self._queue:
                return None
            self._leading = True
            batch, self._queue = self._queue, []
        return self._lead(batch)

    def _lead(self, batch: list[T]) -> R:
        try:
            return self._commit(batch)
        finally:
            with self._lock:
                for t in batch:
                    t.done = True
                    if t._wake is not None:
                        t._wake.release()
                        t._wake = None
                if self._queue:
                    self._hand_over()
                else:
                    self._leading = False

    def _hand_over(self) -> None:
        # With self._lock: the first caller still waiting leads next; with none, the next
        # submit leads (tickets of interrupted callers wait in the queue for it or drain).
        for t in self._queue:
            if not t._abandoned:
                t._lead = True
                assert t._wake is not None
                t._wake.release()
                t._wake = None
                return
        self._leading = False

    def _abandon(self, ticket: T) -> None:
        # The caller stopped waiting. Its ticket stays queued (the next commit writes it); if
        # it had just been given the leadership (or is given it now), pass that on.
        with self._lock:
            ticket._abandoned = True
            if ticket._wake is not None:
                ticket._wake = None  # nobody waits on it now; never released again
                return  # still queued behind a leader, which will hand over to another
            if ticket._lead and not ticket.done:
                self._hand_over()
