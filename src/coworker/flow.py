"""Flow, step, run and identity context: where a run is, and who acts.

All of coworker's context lives in one ``ContextVar`` (:mod:`coworker._scope`) holding a
frozen snapshot, so a run reads everything with a single ``get()`` and every block restores
exactly the snapshot it replaced: no flow, step, run or agent outlives its block, in threads,
asyncio tasks or generators alike.

A flow is held in a :class:`FlowCell`, a small mutable box shared by the block that started
it (and by a :class:`Conversation` across its turns): :func:`break_flow` replaces the flow in
the box, so the rest of the block, and later turns, run in the new flow, while code outside
the block never sees it. A flow's own state (runs in flight, last activity, session) changes
only through its methods, which the run lifecycle calls.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final

from coworker import _flow_events, _flow_spans
from coworker import attributes as attr
from coworker._ids import uuid4
from coworker._scope import SCOPE, Block, Scope
from coworker._state import SETTINGS
from coworker.exceptions import CoworkerError
from coworker.identity import Identity, IdentityBlock, acting_as, current_identity, text

if TYPE_CHECKING:
    from coworker.conversations import Turn

__all__ = [
    "AI_CONVERSATION",
    "API_REQUEST",
    "BATCH_JOB",
    "BREAK_REASONS",
    "WORKFLOW",
    "Flow",
    "FlowBlock",
    "IdentityBlock",
    "StepBlock",
    "WorkflowDefinition",
    "acting_as",
    "break_flow",
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
        "spans",
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
        self.id = id if id is not None else uuid4()
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
        # What the flow's spans need across blocks and breaks (coworker._flow_spans).
        self.spans: _flow_spans.FlowSpanState | None = None
        # Step counters of runs outside any turn (turn 0), by operation. A turn keeps its own
        # (Turn.counters), so counters live exactly as long as their turn: a long
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

    def step(self, step_id: str) -> StepBlock:
        """Enter step ``step_id`` of this flow (context manager).

        Raises:
            ValueError: at once, when the flow has a definition that lacks ``step_id``.
        """
        return StepBlock(self.check_step(step_id))

    def check_step(self, step_id: str) -> str:
        """``step_id`` as a valid step of this flow.

        Raises:
            ValueError: not a valid id, or the flow's workflow definition lacks it.
        """
        step_id = text(step_id, "step id")
        d = self.definition
        if d is not None and step_id not in d.steps:
            raise ValueError(
                f"step {step_id!r} is not in workflow {d.id!r}; its steps are {list(d.steps)}"
            )
        return step_id

    def assign_step(self, turn: Turn | None, operation: str) -> str:
        """The step id of a run without one in an ``ai-conversation`` flow."""
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

    def run_started(self, run: object) -> None:
        """A run of this flow started: the flow is not idle while it goes on."""
        self._running.add(run)  # set.add/discard are atomic

    def run_ended(self, run: object) -> None:
        """A run of this flow ended: idle time counts from now."""
        self._last_active = _monotonic()
        self._running.discard(run)

    def arrive(self, session: str | None, root: bool) -> str | None:
        """A run arrives: return why it must break this flow (:meth:`break_due`), or mark
        the flow active (:meth:`mark_active`) and return ``None``."""
        now = _monotonic()
        if self.idle_timeout or (session is not None and self._session != session):
            reason = self.break_due(session, root, now)
            if reason is not None:
                return reason
        if session is not None and self._session is None:
            self._session = session
        self._last_active = now
        return None

    def break_due(self, session: str | None, root: bool, now: float) -> str | None:
        """Why a run arriving now must break this flow (``timeout``, ``new-session``), or
        ``None``. Only a root run breaks for idleness: a child belongs to its parent's flow."""
        if (
            root
            and self.idle_timeout
            and self._last_active is not None
            and not self._running
            and now - self._last_active > self.idle_timeout
        ):
            return "timeout"
        if session is not None and self._session is not None and self._session != session:
            return "new-session"
        return None

    def mark_active(self, session: str | None, now: float, new_session: bool = False) -> None:
        """A run arrived at ``now``: remember the session (its first, or a new one after a
        break) and the time."""
        if session is not None and (new_session or self._session is None):
            self._session = session
        self._last_active = now

    def _successor(self, reason: str, type: str | None) -> Flow:
        new_type = type or self.type
        same = new_type == self.type
        new = Flow(
            new_type,
            definition=self.definition if same else None,
            previous_id=self.id,
            break_reason=reason,
            metadata=self.metadata,
            idle_timeout=self.idle_timeout if same else None,
            conversation_id=self.conversation_id,
        )
        new._session = self._session
        return new

    def __repr__(self) -> str:
        extra = f", previous_id={self.previous_id!r}, reason={self.break_reason!r}"
        return f"Flow(type={self.type!r}, id={self.id!r}" + (
            extra + ")" if self.previous_id else ")"
        )


class FlowCell:
    """The box a block's current flow lives in; :func:`break_flow` swaps its content."""

    __slots__ = ("flow",)

    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    def touch(self, identity: Identity | None, root: bool = True) -> Flow:
        """Apply the automatic breaks (idle timeout, new session) and mark the flow active.

        Called by every run in a flow; returns the flow the run belongs to. Only a root run
        can break a flow for idleness: a child run belongs to its parent's flow however long
        the parent has been running. Runs also mark the flow active when they end
        (:meth:`Flow.run_ended`), so idle time counts from the end of the last run.
        """
        f = self.flow
        session = identity.session if identity is not None else None
        reason = f.arrive(session, root)
        if reason is None:
            return f
        with _BREAK_LOCK:
            # Concurrent runs that all find the flow idle break it once and share it.
            f = self.break_flow(reason, None) if self.flow is f else self.flow
        f.mark_active(session, _monotonic(), True)
        return f

    def break_flow(self, reason: str, type: str | None) -> Flow:
        """Replace the flow by its successor (linked by ``previous_id``); return it."""
        old = self.flow
        new = old._successor(reason, type)
        self.flow = new
        _flow_events.flow_broken(old, new)  # flow event (issue 14)
        _flow_spans.flow_broken(self, old, new)  # flow spans (issue 13)
        return new


_BREAK_LOCK: Final = threading.Lock()
_monotonic = time.monotonic
"""The clock of idle timeouts (``capcoworker`` replaces it with a manual one)."""


class SpanBlock(Block):
    """A block that also has a span of its own (flow, step, turn: coworker._flow_spans).

    The span starts before the scope is set (so the flow events of the block carry its trace
    id) and ends after the block's own exit work, exactly once, however the block exits.
    """

    __slots__ = ("_spans",)

    def __init__(self) -> None:
        super().__init__()
        self._spans: list[_flow_spans.Holder] = []

    def _open_span(self) -> bool:
        """Start this entry's span; ``False`` when none is made (no SDK provider)."""
        raise NotImplementedError

    def __enter__(self) -> Any:
        opened = SETTINGS.flow_spans and self._open_span()
        try:
            return super().__enter__()
        except BaseException as exc:
            if opened:
                _flow_spans.leave(self._spans, exc)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            if self._spans:
                _flow_spans.leave(self._spans, exc)


class FlowBlock(SpanBlock):
    """What :func:`flow` and :meth:`WorkflowDefinition.start` return: a (sync or async)
    context manager whose ``as`` target is the :class:`Flow`.

    Attributes:
        flow: the flow the block starts (its current one after :func:`break_flow` is
            ``current_flow()`` inside the block).
    """

    __slots__ = ("_cell", "flow")

    def __init__(self, f: Flow) -> None:
        super().__init__()
        self.flow = f
        self._cell = FlowCell(f)

    def _open_span(self) -> bool:
        return _flow_spans.enter(self._spans, _flow_spans.FLOW, self._cell) is not None

    def scope(self, current: Scope) -> Scope:
        """The scope with this block's flow, no step and no turn."""
        return Scope(self._cell, None, current.run, current.identity, None, [None])

    def value(self) -> Flow:
        """The :class:`Flow`."""
        return self.flow

    def __enter__(self) -> Flow:
        return super().__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> Flow:
        return self.__enter__()


class StepBlock(SpanBlock):
    """What :func:`step` and :meth:`Flow.step` return: a (sync or async) context manager
    whose ``as`` target is the step id.

    Attributes:
        step: the step id.
    """

    __slots__ = ("step",)

    def __init__(self, step_id: str) -> None:
        super().__init__()
        self.step = step_id

    def _open_span(self) -> bool:
        cell = SCOPE.get().cell
        return _flow_spans.enter(self._spans, _flow_spans.STEP, cell, self.step) is not None

    def scope(self, current: Scope) -> Scope:
        """The current scope with this step."""
        return Scope(current.cell, self.step, current.run, current.identity, current.turn, [None])

    def value(self) -> str:
        """The step id."""
        return self.step

    def __enter__(self) -> str:
        return super().__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> str:
        return self.__enter__()


def flow(
    type: str, id: str | None = None, *, idle_timeout: float | None = None, **metadata: Any
) -> FlowBlock:
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
        A :class:`FlowBlock`, whose ``as`` target is the :class:`Flow`.
    """
    return FlowBlock(Flow(type, id, metadata=metadata, idle_timeout=idle_timeout))


def current_flow() -> Flow | None:
    """The flow of the current context (after any breaks), or ``None``."""
    cell = SCOPE.get().cell
    return cell.flow if cell is not None else None


def current_step() -> str | None:
    """The step id of the current context, or ``None``."""
    return SCOPE.get().step


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
    return cell.break_flow(reason, type)


def step(step_id: str) -> StepBlock:
    """Enter a step of the current flow (context manager, sync and async).

    ``@coworker.run(step=...)`` is the shorthand for one run.

    Raises:
        ValueError: at once, when the current flow comes from a workflow definition that
            does not list ``step_id``.
    """
    f = current_flow()
    return StepBlock(f.check_step(step_id) if f is not None else text(step_id, "step id"))


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

    def start(self, id: str | None = None, **metadata: Any) -> FlowBlock:
        """Start a ``workflow`` flow from this definition (context manager → :class:`Flow`)."""
        return FlowBlock(Flow(WORKFLOW, id, definition=self, metadata=metadata))

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


def __getattr__(name: str) -> Any:
    # coworker.flow.Conversation & co. live in coworker.conversations (which imports this
    # module); resolved on access so that the old import paths keep working without a cycle.
    if name in ("Conversation", "TurnBlock", "conversation"):
        from coworker import conversations as _conversations

        return getattr(_conversations, name)
    raise AttributeError(f"module 'coworker.flow' has no attribute {name!r}")
