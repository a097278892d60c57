"""The one ContextVar that holds all of coworker's context, and the blocks that set it.

A :class:`Scope` is a frozen snapshot (flow cell, step, run, identity, conversation turn). A
run reads everything with one ``SCOPE.get()``; every block sets a new snapshot on entry and
restores the one it replaced on exit, by the ``ContextVar`` token it got on entry: that is the
only restore mechanism, so a block always puts back exactly what was there before it, even if
something inside it (a run block left open, a block exited out of order) changed the scope
since.
"""

from __future__ import annotations

import contextvars
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from coworker import _flow_events

if TYPE_CHECKING:
    from coworker.conversations import Turn
    from coworker.flow import FlowCell
    from coworker.identity import Identity

__all__ = ["EMPTY_SCOPE", "SCOPE", "AsyncContextMixin", "Block", "Scope", "restore"]


class Scope(NamedTuple):
    """A frozen snapshot of coworker's context; every block sets a new one."""

    cell: FlowCell | None
    """The box holding the current flow (``break_flow`` swaps its content)."""
    step: str | None
    run: Any  # a coworker Run, or propagation's stand-in for a remote parent
    identity: Identity | None
    turn: Turn | None
    cache: list[Any]
    """A one-slot cell for the attributes runs in this scope share (flow, step, identity),
    merged once per scope and flow instead of per call (``coworker._run.lifecycle``). Each
    block makes a new cell; a run's own scope shares its parent's when its step is the
    same."""


EMPTY_SCOPE: Final = Scope(None, None, None, None, None, [None])
SCOPE: Final[contextvars.ContextVar[Scope]] = contextvars.ContextVar(
    "coworker.scope", default=EMPTY_SCOPE
)

_MISSING: Final = contextvars.Token.MISSING


def restore(token: contextvars.Token[Scope]) -> None:
    """Put back the scope ``token`` replaced.

    A token used in another context than the one it was made in (a block spanning a
    generator's ``yield`` that the consumer resumed elsewhere) cannot be reset; the value it
    replaced is set instead, rather than leaving the block's scope behind.
    """
    try:
        SCOPE.reset(token)
    except ValueError:
        old = token.old_value
        SCOPE.set(EMPTY_SCOPE if old is _MISSING else old)


class AsyncContextMixin:
    """``async with`` for a synchronous context manager: entering and leaving a coworker
    block never awaits, so the async form just calls the sync one."""

    __slots__ = ()

    def __enter__(self) -> Any:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class Block(AsyncContextMixin):
    """Base of coworker's context managers: set a new scope on entry, reset its token on exit.

    One block object may be entered again, nested, or shared by concurrent tasks and threads
    (a module-level ``SYSTEM = coworker.acting_as("system")``): it keeps the token of every
    entry not exited yet, and an exit resets the newest one that belongs to the current
    context (a token of another context refuses the reset).
    """

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: list[contextvars.Token[Scope]] = []

    def scope(self, current: Scope) -> Scope:
        """The scope this block sets, given the current one."""
        raise NotImplementedError

    def value(self) -> Any:
        """What ``with block as x`` gives."""
        return None

    def __enter__(self) -> Any:
        new = self.scope(SCOPE.get())
        self._tokens.append(SCOPE.set(new))
        _flow_events.block_entered(self, new)  # flow event (issue 14)
        return self.value()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tokens = self._tokens
        if not tokens:
            return  # exited more often than entered: nothing of ours to restore
        scope = SCOPE.get()  # what the block is leaving (flow events end its step or flow)
        self._reset(tokens)
        _flow_events.block_exited(self, scope, exc)  # flow event (issue 14)

    @staticmethod
    def _reset(tokens: list[contextvars.Token[Scope]]) -> None:
        for token in tokens[::-1]:  # a copy: other threads may remove theirs meanwhile
            try:
                SCOPE.reset(token)
            except (ValueError, RuntimeError):
                continue  # another context's entry (a concurrent task sharing this block)
            tokens.remove(token)
            return
        # Entered in a context that is gone (the consumer resumed a generator elsewhere).
        restore(tokens.pop())
