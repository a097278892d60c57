"""AI conversations: a flow of type ``ai-conversation`` that lives across turns."""

from __future__ import annotations

import itertools
import threading
from typing import Any

from coworker import _flow_spans
from coworker._scope import Scope
from coworker.flow import AI_CONVERSATION, Flow, FlowCell, SpanBlock
from coworker.identity import text

__all__ = ["Conversation", "Turn", "TurnBlock", "conversation"]


class Turn:
    """One conversation turn: its number, message id and the step counters of its runs."""

    __slots__ = ("counters", "message_id", "number")

    def __init__(self, number: int, message_id: str | None) -> None:
        self.number = number
        self.message_id = message_id
        # Step counters of the runs in this turn, by (flow id, operation).
        self.counters: dict[tuple[str, str], itertools.count[int]] = {}


class Conversation:
    """An AI conversation: a flow of type ``ai-conversation`` that lives across turns.

    Each user message is a :meth:`turn`; runs inside a turn without an explicit step get a
    step id ``turn-<n>-<operation>-<k>``. :func:`break_flow` inside a turn (e.g. on a topic
    change) starts a new flow that the following turns continue.

    Attributes:
        id: the conversation id (``gen_ai.conversation.id``).
        turns: the number of turns started so far.
    """

    __slots__ = ("_cell", "_lock", "id", "turns")

    def __init__(
        self,
        conversation_id: str,
        *,
        flow_id: str | None = None,
        idle_timeout: float | None = None,
        **metadata: Any,
    ) -> None:
        conversation_id = text(conversation_id, "conversation id")
        self.id = conversation_id
        self.turns = 0
        # Two threads starting turns at once must get distinct numbers: ``self.turns += 1``
        # alone could hand both the same one, and with it the same step ids.
        self._lock = threading.Lock()
        self._cell = FlowCell(
            Flow(
                AI_CONVERSATION,
                flow_id,
                metadata=metadata,
                idle_timeout=idle_timeout,
                conversation_id=conversation_id,
            )
        )

    @property
    def flow(self) -> Flow:
        """The conversation's current flow."""
        return self._cell.flow

    def turn(self, message_id: str | None = None) -> TurnBlock:
        """Start the next turn (one user message) as a context manager.

        Args:
            message_id: the id of the user message, if the application has one.
        """
        if message_id is not None:
            message_id = text(message_id, "message id")
        with self._lock:
            self.turns += 1
            number = self.turns
        return TurnBlock(self._cell, Turn(number, message_id))

    def break_flow(self, reason: str, *, type: str | None = None) -> Flow:
        """Break the conversation's flow from outside a turn (e.g. a new session)."""
        return self._cell.break_flow(reason, type)

    def __repr__(self) -> str:
        return f"Conversation({self.id!r}, flow={self.flow!r}, turns={self.turns})"


class TurnBlock(SpanBlock):
    """What :meth:`Conversation.turn` returns: a (sync or async) context manager whose
    ``as`` target is the conversation's current :class:`Flow`."""

    __slots__ = ("_cell", "_turn")

    def __init__(self, cell: FlowCell, turn: Turn) -> None:
        super().__init__()
        self._cell = cell
        self._turn = turn

    @property
    def number(self) -> int:
        """The turn's number (1 for the first)."""
        return self._turn.number

    def _open_span(self) -> bool:
        holder = _flow_spans.enter(self._spans, _flow_spans.TURN, self._cell, turn=self._turn)
        return holder is not None

    def scope(self, current: Scope) -> Scope:
        """The scope with the conversation's flow and this turn, no step."""
        return Scope(self._cell, None, current.run, current.identity, self._turn, [None])

    def value(self) -> Flow:
        """The conversation's current flow."""
        return self._cell.flow

    def __enter__(self) -> Flow:
        return super().__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> Flow:
        return self.__enter__()


def conversation(
    conversation_id: str,
    *,
    flow_id: str | None = None,
    idle_timeout: float | None = None,
    **metadata: Any,
) -> Conversation:
    """Create an AI conversation; use ``with chat.turn():`` for each user message.

    Args:
        conversation_id: the conversation (chat) id, emitted as ``gen_ai.conversation.id``.
        flow_id: the id of the first flow (default: a new UUID4).
        idle_timeout: seconds of inactivity that break the flow with reason ``timeout``
            (default: the configured ``flow_idle_timeout``, 1800 s).
        **metadata: emitted as ``flow.metadata.<key>``.
    """
    return Conversation(conversation_id, flow_id=flow_id, idle_timeout=idle_timeout, **metadata)
