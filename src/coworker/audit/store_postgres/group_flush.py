"""Group commit of the PostgreSQL store: appends commit asynchronously on the store's
connection, and one durable flush on a connection of its own covers every append whose
answer came in before it was sent.

Why a flush covers an append: the append committed with ``synchronous_commit=off``, so its
commit record is in the WAL (visible, not yet fsync'd) once its answer is in. A flush sent
after that writes a commit record further on and commits synchronously: PostgreSQL returns
once the WAL is flushed up to *its* commit record, so up to the append's too
(:meth:`~coworker.audit.store_postgres.writes._Writes._flush`). Meanwhile the store's
connection is free for the next append: while one request waits for the WAL fsync, the next
one's append runs; and one fsync answers every request that waited for it.

Why a flush covers only the appends of its own connection: a server crash loses the WAL
that was not flushed, asynchronously committed appends with it, and kills every backend.
A flush on a connection made *after* the crash would succeed and prove nothing about an
append answered before it. So each connection of the flusher has a number, an append takes
the number of the connection that is up before it is sent (:meth:`GroupFlush.connection`),
and only a flush on that very connection, still unbroken, can cover it: the connection
survived, so the server did not crash between the append's commit and the flush. When that
connection breaks (a terminated backend, a crash, a flush that failed), every append it had
not covered is :class:`FlushLost`: whether it is durable is unknown, and the store finds out
the way it does for any lost answer (it looks for the append's rows by their nonce,
re-appends what is missing, and flushes on its own connection).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from coworker.audit import _fork
from coworker.audit.store_postgres._wire import AppendResult, _close_owned

_log = logging.getLogger("coworker.audit")


class FlushLost(Exception):
    """The flush connection broke before a flush covered the append: it may not be durable."""


@dataclass(frozen=True, slots=True)
class FlushTicket:
    """An append waiting for its flush.

    Attributes:
        connection: the number of the flush connection that was up before the append was
            sent: the only one whose flush can cover it.
        number: the order in which appends' answers came in (a flush covers every number up
            to the last one handed out before it was sent).
    """

    connection: int
    number: int


class GroupFlush:
    """One flusher connection shared by every appending thread of a store; the thread that
    finds no flush running sends one (the leader), the others wait for its answer.

    Args:
        connect: opens a new flusher connection (raises when the server is unreachable).
        flush: one durable flush on the given connection (raises on any failure).
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        flush: Callable[[psycopg.Connection[Any]], None],
    ) -> None:
        self._connect = connect
        self._flush = flush
        self._cond = threading.Condition()
        self._connect_lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = -1
        self._number = 0  # of the current connection (0: none yet)
        self._issued = 0  # tickets handed out
        self._covered = 0  # every ticket up to this one on the current connection is durable
        self._flushing = False
        self._closed = False
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        # The tickets and the flush in progress are the parent's threads'; the child flushes
        # on a connection of its own (_up() is pid-checked).
        self._cond = threading.Condition()
        self._connect_lock = threading.Lock()
        self._flushing = False

    def _up(self) -> bool:
        # A connection must not cross a fork: a child never uses its parent's socket.
        conn = self._conn
        return conn is not None and self._pid == os.getpid() and not conn.closed

    def connection(self) -> int:
        """The number of the flusher connection, connecting first when none is up: take it
        before sending an append.

        Raises:
            Whatever ``connect`` raises.
        """
        with self._cond:
            if self._up():
                return self._number
        with self._connect_lock:  # one connect at a time; the others wait for it
            with self._cond:
                if self._up():
                    return self._number
            conn = self._connect()
            with self._cond:
                if self._closed:
                    conn.close()
                    raise FlushLost("the store is closed")
                self._conn, self._pid = conn, os.getpid()
                self._number += 1
                return self._number

    def ticket(self, connection: int) -> FlushTicket:
        """A ticket for an append whose answer is in, sent while ``connection`` was up."""
        with self._cond:
            self._issued += 1
            return FlushTicket(connection, self._issued)

    def wait(self, ticket: FlushTicket) -> None:
        """Return once a flush covers ``ticket``'s append: it is durable.

        Raises:
            FlushLost: the ticket's connection broke first (or another one replaced it).
        """
        with self._cond:
            while True:
                if ticket.connection != self._number or not self._up():
                    raise FlushLost("the flush connection was lost before a flush covered it")
                if self._covered >= ticket.number:
                    return
                if self._flushing:
                    self._cond.wait()
                    continue
                # The leader: a flush sent now covers every ticket handed out so far.
                self._flushing = True
                target, conn = self._issued, self._conn
                assert conn is not None
                error: BaseException | None = None
                self._cond.release()
                try:
                    self._flush(conn)
                except BaseException as exc:  # the others must hear of it, whatever it is
                    error = exc
                self._cond.acquire()
                self._flushing = False
                if error is None:
                    self._covered = max(self._covered, target)
                if error is not None or self._closed:
                    self._drop()
                self._cond.notify_all()
                if isinstance(error, Exception):
                    raise FlushLost(f"the flush failed: {error}") from error
                if error is not None:
                    raise error

    def _drop(self) -> None:
        # Called with the condition held: every ticket of this connection not covered yet
        # is lost from now on (its number is never current again).
        conn, self._conn = self._conn, None
        _close_owned(conn, self._pid)

    def close(self) -> None:
        """Close the flusher connection; appends still waiting get :class:`FlushLost`."""
        with self._cond:
            self._closed = True
            if not self._flushing:
                self._drop()
            self._cond.notify_all()


class PendingAppend:
    """An append committed and not yet known durable
    (:meth:`~coworker.audit.store_postgres.PostgresStore.submit_unique`); :meth:`wait` says
    when it is.

    Not to be shared between threads: one caller waits for it.
    """

    __slots__ = ("_flusher", "_recover", "_result", "_ticket")

    def __init__(
        self,
        result: AppendResult,
        flusher: GroupFlush | None = None,
        ticket: FlushTicket | None = None,
        recover: Callable[[], AppendResult] | None = None,
    ) -> None:
        self._result = result
        self._flusher = flusher
        self._ticket = ticket
        self._recover = recover

    def wait(self) -> AppendResult:
        """Return what was appended once it is durable (a flush covered it).

        When the flush was lost (its connection broke: a terminated backend, a server
        crash), the entries are sent again the way an append whose answer was lost is: what
        was committed is found by its nonce, what was not is appended, and that is flushed;
        the result then says what is in the log now.

        Raises:
            AuditUnavailable: that second attempt failed too: the entries may or may not be
                in the log (a retry with the same dedup keys is a no-op for those that are).
        """
        ticket, flusher = self._ticket, self._flusher
        if ticket is not None and flusher is not None:
            try:
                flusher.wait(ticket)
            except FlushLost as exc:
                assert self._recover is not None
                _log.warning("audit store: %s; appending again to find out", exc)
                self._result = self._recover()
            self._ticket = None
        return self._result
