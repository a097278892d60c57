"""What a forked child must not inherit from its parent's audit path: held locks, work in flight.

A process that forks while another of its threads is appending (pre-fork web servers,
``multiprocessing``'s ``fork`` start method, a job runner forking per task) gives the child
copies of the locks that thread held and of the group commit it was leading, though the thread
itself does not exist in the child: the child's first audited call would wait forever for a
lock nobody releases or a leader that never comes. Two mechanisms, run by
``os.register_at_fork``:

* **Held across the fork** (:func:`hold_across_fork`): a SQLite connection's state lives partly
  in process memory that a child inherits (SQLite's per-file lock bookkeeping, the mapped
  ``-shm``), so a child must not be made while one of its transactions is open: before the fork
  the forking thread takes the store's lock, so the fork waits for the append in flight (at
  most the store's busy timeout; after :data:`WAIT` seconds it forks anyway and logs why), and
  both processes release it after.
* **Reset in the child** (:func:`register`): each object's ``_after_fork_in_child()`` gives it
  fresh locks and nothing in flight. What was queued belongs to the parent, which still commits
  it. The parent's connections are never used or closed in the child (:func:`orphan`): closing
  the child's copy would end the parent's session on the shared socket (PostgreSQL), or drop
  the child's own new locks on the file (SQLite: closing any descriptor of a file releases the
  process's POSIX locks on it); the child opens its own.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Final, Protocol

__all__ = ["WAIT", "hold_across_fork", "orphan", "register"]

_log = logging.getLogger("coworker.audit")

WAIT: Final = 30.0
"""Seconds a fork waits for an append in flight before it goes ahead without it."""


class _ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


class _Holder(Protocol):
    def _fork_lock(self) -> Any: ...


_objects: weakref.WeakSet[Any] = weakref.WeakSet()
_holders: weakref.WeakSet[Any] = weakref.WeakSet()
_held: list[Any] = []  # the locks the forking thread took, released on both sides
_orphans: list[Any] = []


def register(obj: _ForkAware) -> None:
    """Call ``obj._after_fork_in_child()`` in the child of every later fork (while ``obj``
    lives)."""
    _objects.add(obj)


def hold_across_fork(obj: _Holder) -> None:
    """Take ``obj._fork_lock()`` before every later fork (while ``obj`` lives): no fork
    happens while another thread holds it."""
    _holders.add(obj)


def orphan(resource: Any) -> None:
    """Keep the child's copy of a parent's connection referenced, so that it is never closed
    (by the garbage collector) in the child."""
    if resource is not None:
        _orphans.append(resource)


def _before() -> None:
    for obj in list(_holders):
        lock = obj._fork_lock()
        if lock.acquire(timeout=WAIT):
            _held.append(lock)
        else:  # pragma: no cover - an append stuck for longer than WAIT seconds
            _log.warning(
                "audit: forking while %r is still appending (waited %gs); the child opens "
                "its own connection",
                obj,
                WAIT,
            )


def _release() -> None:
    while _held:
        _held.pop().release()


def _after_in_child() -> None:
    _release()
    for obj in list(_objects):
        obj._after_fork_in_child()


os.register_at_fork(before=_before, after_in_parent=_release, after_in_child=_after_in_child)
