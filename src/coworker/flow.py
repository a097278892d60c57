"""Flow, step, run and identity context: where a run is, and who acts.

All of coworker's context lives in one ``ContextVar`` holding an immutable :class:`_Scope`
snapshot, so a run reads everything with a single ``get()`` and every block restores exactly
the snapshot it replaced: no flow, step, run or agent outlives its block, in threads, asyncio
tasks or generators alike.

A flow is held in a :class:`_FlowCell`, a small mutable box shared by the block that started
it (and by a :class:`Conversation` across its turns): :func:`break_flow` replaces the flow in
the box, so the rest of the block, and later turns, run in the new flow, while code outside
the block never sees it.
"""

from __future__ import annotations

import contextvars
import itertools
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final

from coworker import _flow_events  # flow event (issue 14)
from coworker import attributes as attr
from coworker._state import SETTINGS
from coworker.exceptions import CoworkerError
from coworker.identity import Agent, Identity, User, text

if TYPE_CHECKING:
    from coworker._decorator import Run

__all__ = [
    "AI_CONVERSATION",
    "API_REQUEST",
    "BATCH_JOB",
    "BREAK_REASONS",
    "WORKFLOW",
    "Conversation",
    "Flow",
    "WorkflowDefinition",
    "acting_as",
    "break_flow",
    "conversation",
    "current_flow",
    "current_identity",
    "current_step",
    "flow",
    "step",
    "workflow",
]

WORKFLOW: Final = "workflow"
AI_CONVERSATION: Final = "ai-conversation"
BATCH_JOB: Final = "batch-job"
API_REQUEST: Final = "api-request"

BREAK_REASONS: Final = (
    "new-session",
    "explicit-reset",
    "topic-change",
    "task-completed",
    "timeout",
    "unrecoverable-error",
)
"""The documented reasons for :func:`break_flow`; any other string is accepted too."""

_FLOW_TYPE_RE = re.compile(r"^[a-z][a-z0-9._-]*$")
_STEP_PART_RE = re.compile(r"[^a-z0-9_.-]+")


class Flow:
    """One flow: a user intent. Read-only for users; created by :func:`flow`,
    :meth:`WorkflowDefinition.start`, :func:`conversation` turns and :func:`break_flow`.

    Attributes:
        type: ``workflow``, ``ai-conversation``, ``batch-job``, ``api-request`` or any
            lower-case name.
        id: the flow id (a UUID4 string unless given).
        definition: the :class:`WorkflowDefinition` it was started from, if any.
        previous_id: the id of the flow this one broke from.
        break_reason: why that flow was broken.
        metadata: the ``**metadata`` given at start (emitted as ``flow.metadata.<key>``).
    """

    __slots__ = (
        "_counters",
        "_last_active",
        "_running",
        "_session",
        "break_reason",
        "definition",
        "id",
        "idle_timeout",
        "metadata",
        "previous_id",
        "span_attributes",
        "type",
    )

    def __init__(
        self,
        type: str,
        id: str | None = None,
        *,
        definition: WorkflowDefinition | None = None,
        previous_id: str | None = None,
        break_reason: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idle_timeout: float | None = None,
        conversation_id: str | None = None,
    ) -> None:
        if not isinstance(type, str) or not _FLOW_TYPE_RE.match(type):
            raise ValueError(
                f"flow type must be a lower-case name like 'workflow' or 'batch-job', got {type!r}"
            )
        if id is not None:
            id = text(id, "flow id")
        if conversation_id is not None:
            conversation_id = text(conversation_id, "conversation id")
        self.type = str.__str__(type)
        self.id = id if id is not None else str(uuid.uuid4())
        self.definition = definition
        self.previous_id = previous_id
        self.break_reason = break_reason
        self.metadata: Mapping[str, Any] = MappingProxyType(dict(metadata or {}))
        if idle_timeout is not None and (
            not isinstance(idle_timeout, int | float) or idle_timeout < 0
        ):
            raise ValueError(f"idle_timeout must be a number of seconds >= 0, got {idle_timeout!r}")
        if idle_timeout is None and type == AI_CONVERSATION:
            idle_timeout = SETTINGS.flow_idle_timeout or None
        self.idle_timeout = idle_timeout
        self._last_active: float | None = None
        # Runs in flight (set.add/discard are atomic): a flow with a run still going is not
        # idle, however long ago that run started.
        self._running: set[Any] = set()
        self._session: str | None = None
        # Step counters of runs outside any turn (turn 0), by operation. A turn keeps its own
        # (_Turn.counters), so counters live exactly as long as their turn: a long
        # conversation does not keep one per past turn.
        self._counters: dict[str, itertools.count[int]] = {}
        attrs: dict[str, Any] = {attr.FLOW_TYPE: self.type, attr.FLOW_ID: self.id}
        if definition is not None:
            attrs[attr.FLOW_DEFINITION_ID] = definition.id
        if previous_id is not None:
            attrs[attr.FLOW_PREVIOUS_ID] = previous_id
        if break_reason is not None:
            attrs[attr.FLOW_BREAK_REASON] = break_reason
        if conversation_id is not None:
            attrs[attr.CONVERSATION_ID] = conversation_id
        for key, value in self.metadata.items():
            if isinstance(value, str | bool | int | float):
                attrs[attr.FLOW_METADATA_PREFIX + key] = value
            else:
                attrs[attr.FLOW_METADATA_PREFIX + key] = str(value)
        self.span_attributes: Mapping[str, Any] = MappingProxyType(attrs)

    @property
    def conversation_id(self) -> str | None:
        """The ``gen_ai.conversation.id`` of a conversation flow, else ``None``."""
        return self.span_attributes.get(attr.CONVERSATION_ID)

    def step(self, step_id: str) -> _StepBlock:
        """Enter step ``step_id`` of this flow (context manager).

        Raises:
            ValueError: at once, when the flow has a definition that lacks ``step_id``.
        """
        return _StepBlock(self._check_step(step_id))

    def _check_step(self, step_id: str) -> str:
        step_id = text(step_id, "step id")
        d = self.definition
        if d is not None and step_id not in d.steps:
            raise ValueError(
                f"step {step_id!r} is not in workflow {d.id!r}; its steps are {list(d.steps)}"
            )
        return step_id

    def _assign_step(self, turn: _Turn | None, operation: str) -> str:
        # "turn-3-select-1": unique within the flow because the counter is per (turn, op) and
        # turn numbers are unique per conversation. setdefault and next() on an
        # itertools.count are atomic in CPython, so threads in the same turn never get the
        # same step id.
        if turn is None:
            counter = self._counters.setdefault(operation, itertools.count(1))
        else:  # per flow too: a flow broken mid-turn numbers its own steps from 1
            counter = turn.counters.setdefault((self.id, operation), itertools.count(1))
        number = 0 if turn is None else turn.number
        return f"turn-{number}-{operation}-{next(counter)}"

    def __repr__(self) -> str:
        extra = f", previous_id={self.previous_id!r}, reason={self.break_reason!r}"
        return f"Flow(type={self.type!r}, id={self.id!r}" + (
            extra + ")" if self.previous_id else ")"
        )


class _FlowCell:
    """The box a block's current flow lives in; :func:`break_flow` swaps its content."""

    __slots__ = ("flow",)

    def __init__(self, flow: Flow) -> None:
        self.flow = flow


class _Turn:
    __slots__ = ("counters", "message_id", "number")

    def __init__(self, number: int, message_id: str | None) -> None:
        self.number = number
        self.message_id = message_id
        # Step counters of the runs in this turn, by (flow id, operation).
        self.counters: dict[tuple[str, str], itertools.count[int]] = {}


class _Scope:
    """An immutable snapshot of coworker's context; every block sets a new one."""

    __slots__ = ("cell", "identity", "prev", "run", "step", "turn")

    def __init__(
        self,
        cell: _FlowCell | None,
        step: str | None,
        run: Run | None,
        identity: Identity | None,
        turn: _Turn | None,
        prev: _Scope | None = None,
    ) -> None:
        self.cell = cell
        self.step = step
        self.run = run
        self.identity = identity
        self.turn = turn
        self.prev = prev  # set by blocks: the scope to go back to when the block ends


EMPTY_SCOPE: Final = _Scope(None, None, None, None, None)
SCOPE: Final[contextvars.ContextVar[_Scope]] = contextvars.ContextVar(
    "coworker.scope", default=EMPTY_SCOPE
)


_BREAK_LOCK: Final = threading.Lock()


def touch(cell: _FlowCell, identity: Identity | None, root: bool = True) -> Flow:
    """Apply the automatic breaks (idle timeout, new session) and mark the flow active.

    Called by every run in a flow; returns the flow the run belongs to. Only a root run can
    break a flow for idleness: a child run belongs to its parent's flow however long the
    parent has been running. Runs also mark the flow active when they end, so idle time counts
    from the end of the last run.
    """
    f = cell.flow
    now = time.monotonic()
    session = identity.session if identity is not None else None
    idle = (
        root
        and f.idle_timeout
        and f._last_active is not None
        and not f._running
        and now - f._last_active > f.idle_timeout
    )
    if idle or (session is not None and f._session is not None and f._session != session):
        with _BREAK_LOCK:
            # Concurrent runs that all find the flow idle break it once and share the result.
            if cell.flow is f:
                f = _break(cell, "timeout" if idle else "new-session", None)
            else:
                f = cell.flow
        if session is not None:
            f._session = session
    elif session is not None and f._session is None:
        f._session = session
    f._last_active = now
    return f


def _break(cell: _FlowCell, reason: str, type: str | None) -> Flow:
    old = cell.flow
    new_type = type or old.type
    new = Flow(
        new_type,
        definition=old.definition if new_type == old.type else None,
        previous_id=old.id,
        break_reason=reason,
        metadata=old.metadata,
        idle_timeout=old.idle_timeout if new_type == old.type else None,
        conversation_id=old.conversation_id,
    )
    new._session = old._session
    cell.flow = new
    _flow_events.flow_broken(old, new)  # flow event (issue 14)
    return new


class AsyncContextMixin:
    """``async with`` for a synchronous context manager: entering and leaving a coworker
    block never awaits, so the async form just calls the sync one."""

    __slots__ = ()

    async def __aenter__(self) -> Any:
        return self.__enter__()  # type: ignore[attr-defined]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)  # type: ignore[attr-defined]


class _Block(AsyncContextMixin):
    """Base of the context managers: set a new scope on enter, restore the old on exit.

    Usable with ``with`` and ``async with``. A block object keeps no per-entry state (the
    scope it set remembers the one it replaced), so one object may be entered again, nested,
    or shared by concurrent tasks and threads.
    """

    __slots__ = ()

    def _scope(self, current: _Scope) -> _Scope:
        raise NotImplementedError

    def _value(self) -> Any:
        return None

    def __enter__(self) -> Any:
        current = SCOPE.get()
        new = self._scope(current)
        new.prev = current
        SCOPE.set(new)
        _flow_events.block_entered(self, new)  # flow event (issue 14)
        return self._value()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope = SCOPE.get()  # flow event (issue 14): was `prev = SCOPE.get().prev`
        prev = scope.prev
        SCOPE.set(prev if prev is not None else EMPTY_SCOPE)
        _flow_events.block_exited(self, scope, exc)  # flow event (issue 14)


def _restore(token: contextvars.Token[_Scope]) -> None:
    try:
        SCOPE.reset(token)
    except ValueError:
        # Exited in another context (e.g. a block spanning a generator's yield that the
        # consumer resumed elsewhere): restore the value rather than leak the block's scope.
        old = token.old_value
        SCOPE.set(EMPTY_SCOPE if old is contextvars.Token.MISSING else old)


class _FlowBlock(_Block):
    __slots__ = ("_cell", "_flow")

    def __init__(self, f: Flow) -> None:
        self._flow = f
        self._cell = _FlowCell(f)

    def _scope(self, current: _Scope) -> _Scope:
        return _Scope(self._cell, None, current.run, current.identity, None)

    def _value(self) -> Flow:
        return self._flow


class _StepBlock(_Block):
    __slots__ = ("_step",)

    def __init__(self, step_id: str) -> None:
        self._step = step_id

    def _scope(self, current: _Scope) -> _Scope:
        return _Scope(current.cell, self._step, current.run, current.identity, current.turn)

    def _value(self) -> str:
        return self._step


class _IdentityBlock(_Block):
    __slots__ = ("_identity",)

    def __init__(self, identity: Identity) -> None:
        self._identity = identity

    def _scope(self, current: _Scope) -> _Scope:
        return _Scope(current.cell, current.step, current.run, self._identity, current.turn)

    def _value(self) -> Identity:
        return self._identity


def flow(
    type: str, id: str | None = None, *, idle_timeout: float | None = None, **metadata: Any
) -> _FlowBlock:
    """Start a flow for the duration of a ``with`` / ``async with`` block.

    Every run inside carries ``flow.type`` and ``flow.id``.

    Args:
        type: ``workflow``, ``ai-conversation``, ``batch-job``, ``api-request`` or any
            lower-case name.
        id: the flow id; a new UUID4 when omitted.
        idle_timeout: seconds of inactivity after which the next run breaks the flow with
            reason ``timeout`` (``ai-conversation`` flows default to the configured
            ``flow_idle_timeout``; others have none).
        **metadata: extra facts, emitted as ``flow.metadata.<key>``.

    Returns:
        A context manager whose ``as`` target is the :class:`Flow`.
    """
    return _FlowBlock(Flow(type, id, metadata=metadata, idle_timeout=idle_timeout))


def current_flow() -> Flow | None:
    """The flow of the current context (after any breaks), or ``None``."""
    cell = SCOPE.get().cell
    return cell.flow if cell is not None else None


def current_step() -> str | None:
    """The step id of the current context, or ``None``."""
    return SCOPE.get().step


def current_identity() -> Identity | None:
    """The identity set by the innermost :func:`acting_as`, or ``None``."""
    return SCOPE.get().identity


def break_flow(reason: str, *, type: str | None = None) -> Flow:
    """End the current flow and continue in a new one linked to it.

    The new flow has a new ``flow.id``, ``flow.previous.id`` = the old id and
    ``flow.break.reason`` = ``reason``. It replaces the old one for the rest of the enclosing
    flow block (and, in a conversation, for the following turns).

    Args:
        reason: one of :data:`BREAK_REASONS` or any string.
        type: the new flow's type (default: the same type).

    Returns:
        The new :class:`Flow`.

    Raises:
        CoworkerError: there is no current flow to break.
        ValueError: ``reason`` is empty or ``type`` is not a lower-case name.
    """
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"break reason must be a non-empty string, got {reason!r}")
    cell = SCOPE.get().cell
    if cell is None:
        raise CoworkerError(
            "break_flow() needs a current flow: call it inside 'with coworker.flow(...)', "
            "a workflow start or a conversation turn"
        )
    return _break(cell, reason, type)


def step(step_id: str) -> _StepBlock:
    """Enter a step of the current flow (context manager, sync and async).

    ``@coworker.run(step=...)`` is the shorthand for one run.

    Raises:
        ValueError: at once, when the current flow comes from a workflow definition that
            does not list ``step_id``.
    """
    f = current_flow()
    return _StepBlock(f._check_step(step_id) if f is not None else text(step_id, "step id"))


class WorkflowDefinition:
    """A workflow template: an id and the steps it may contain.

    Attributes:
        id: the definition id (``flow.definition.id``).
        steps: the allowed step ids, in order.
    """

    __slots__ = ("id", "steps")

    def __init__(self, definition_id: str, steps: Iterable[str]) -> None:
        if not isinstance(definition_id, str) or not definition_id:
            raise ValueError(f"definition id must be a non-empty string, got {definition_id!r}")
        steps = tuple(steps)
        if not steps:
            raise ValueError(f"workflow {definition_id!r} needs at least one step")
        for s in steps:
            if not isinstance(s, str) or not s:
                raise ValueError(f"workflow {definition_id!r}: step ids must be strings, got {s!r}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"workflow {definition_id!r} lists a step twice: {list(steps)}")
        self.id = definition_id
        self.steps = steps

    def start(self, id: str | None = None, **metadata: Any) -> _FlowBlock:
        """Start a ``workflow`` flow from this definition (context manager → :class:`Flow`)."""
        return _FlowBlock(Flow(WORKFLOW, id, definition=self, metadata=metadata))

    def __repr__(self) -> str:
        return f"WorkflowDefinition({self.id!r}, steps={list(self.steps)!r})"


def workflow(definition_id: str, steps: Iterable[str]) -> WorkflowDefinition:
    """Define a workflow whose steps are known up front.

    Example::

        orders = coworker.workflow("order-processing", steps=["validate", "payment", "ship"])
        with orders.start() as f:
            with f.step("payment"):
                charge(order)
    """
    return WorkflowDefinition(definition_id, steps)


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
        self._cell = _FlowCell(
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

    def turn(self, message_id: str | None = None) -> _TurnBlock:
        """Start the next turn (one user message) as a context manager.

        Args:
            message_id: the id of the user message, if the application has one.
        """
        if message_id is not None:
            message_id = text(message_id, "message id")
        with self._lock:
            self.turns += 1
            number = self.turns
        return _TurnBlock(self._cell, _Turn(number, message_id))

    def break_flow(self, reason: str, *, type: str | None = None) -> Flow:
        """Break the conversation's flow from outside a turn (e.g. a new session)."""
        return _break(self._cell, reason, type)

    def __repr__(self) -> str:
        return f"Conversation({self.id!r}, flow={self.flow!r}, turns={self.turns})"


class _TurnBlock(_Block):
    __slots__ = ("_cell", "_turn")

    def __init__(self, cell: _FlowCell, turn: _Turn) -> None:
        self._cell = cell
        self._turn = turn

    def _scope(self, current: _Scope) -> _Scope:
        return _Scope(self._cell, None, current.run, current.identity, self._turn)

    def _value(self) -> Flow:
        return self._cell.flow


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


def acting_as(
    user: User | str | None,
    agent: Agent | str | None = None,
    *,
    agent_name: str | None = None,
    session: str | None = None,
    cost_center: str | None = None,  # usage (issue 16)
) -> _IdentityBlock:
    """Run the block on behalf of ``user``, optionally through an AI ``agent``.

    Every run inside carries ``user.id``, ``gen_ai.agent.id``, ``gen_ai.agent.name`` and
    ``session.id``. A change of ``session`` within a flow breaks the flow (``new-session``).

    Args:
        user: a :class:`User` or a user id (``None`` for an anonymous block).
        agent: an :class:`Agent` or an agent id.
        agent_name: the agent's name when ``agent`` is given as an id.
        session: the session id.
        cost_center: who pays for the user's model usage (``docs/usage.md``); kept in
            ``User.attributes["cost_center"]``.
    """
    if isinstance(user, str):
        user = User(user)
    elif user is not None and not isinstance(user, User):
        raise TypeError(f"user must be a User, a user id or None, got {type(user).__name__}")
    if isinstance(agent, str):
        agent = Agent(agent, agent_name)
    elif agent is not None and not isinstance(agent, Agent):
        raise TypeError(f"agent must be an Agent, an agent id or None, got {type(agent).__name__}")
    elif agent is not None and agent_name is not None and agent.name is None:
        agent = Agent(agent.id, agent_name)
    if cost_center is not None:  # usage (issue 16)
        from coworker.usage_policy import with_cost_center

        user = with_cost_center(user, cost_center)
    return _IdentityBlock(Identity(user, agent, session))
