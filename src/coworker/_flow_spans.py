"""Flow, step and turn spans: a workflow is one trace, a conversation turn is one trace.

The blocks of :mod:`coworker.flow` and :mod:`coworker.conversations` call :func:`enter` and
:func:`leave` (``with flow(...)``, a workflow start, ``with step(...)``, ``with chat.turn()``);
:func:`flow_broken` is called where a flow breaks; the run lifecycle asks
:func:`parent_for_run` for a root run's parent; :func:`add_usage` rolls token usage up. Without
an SDK provider, or with ``configure(flow_spans=False)``, nothing here creates a span and every
run keeps the pre-issue-13 shape (each top-level run its own trace).

Model: each block entry is a :class:`Holder`; its span is the holder's current
:class:`Segment`. The segment sits in the OTel context (under :data:`KEY`, next to the span),
so every run, user span and thread that inherits the context nests under it, and usage
recorded anywhere below finds it. A holder's segment is *replaced* in two cases, with the same
mechanism (:func:`_replace`):

* a flow break (``break_flow()``, an idle timeout, a new session): the flow's span (and the
  spans of steps open in it, marked ``interrupted``) end; the new flow's first span starts,
  with a link to the old flow's last span carrying the break reason;
* the bound (``configure(flow_span_max_duration=...)``): a flow or turn span open longer than
  the bound ends (``coworker.span.continued``) and a *continuation* span of the same flow
  starts, linked to it, with the open step spans continued under it; so a trace viewer gets a
  complete trace per window instead of children orphaned under a parent that is never
  exported.

The context where that happens gets the new segment attached at once; other contexts (a
thread that inherited the old one) find their segment stale at their next root run or step
and are redirected to the live one (:func:`_live`). Each span ends exactly once (a flag set
under the lock), whichever way its block exits: normally, by an exception, ``GeneratorExit``
or a cancelled task.

These spans are not audit records: they never carry ``coworker.audited`` (it is removed if
application code set it on them), so the audit processor skips them; the flow's lifecycle is
in the audit log as flow events (:mod:`coworker._flow_events`).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode

from coworker import attributes as attr
from coworker._scope import SCOPE
from coworker._state import SETTINGS, TRACER

if TYPE_CHECKING:
    from coworker.conversations import Turn
    from coworker.flow import Flow, FlowCell
    from coworker.identity import Identity
    from coworker.pricing import Cost, TokenCounts

__all__ = [
    "FLOW",
    "KEY",
    "STEP",
    "TURN",
    "FlowSpanState",
    "Holder",
    "Segment",
    "add_usage",
    "enter",
    "flow_broken",
    "leave",
    "parent_for_run",
]

_log = logging.getLogger(__name__)

KEY: Final = otel_context.create_key("coworker.flow-span")
"""The OTel context key of the innermost flow/step/turn :class:`Segment`."""

FLOW: Final = 1
TURN: Final = 2
STEP: Final = 3

clock: Callable[[], float] = time.monotonic
"""The clock of the bound (seconds); tests replace it to drive the bound without sleeping."""

_lock: Final = threading.RLock()
_STEPS_KEPT: Final = 1024  # attempt counters a flow remembers (like the flow events)
_INF: Final = float("inf")


class FlowSpanState:
    """What a :class:`~coworker.flow.Flow` keeps for its spans (``Flow.spans``)."""

    __slots__ = ("attempts", "last", "link", "previous_session")

    def __init__(self) -> None:
        self.last: SpanContext | None = None
        """The flow's latest ended flow/turn span (what a successor links to)."""
        self.link: Link | None = None
        """The break link the flow's first span gets (consumed by that span)."""
        self.previous_session: str | None = None
        self.attempts: dict[str, list[Any]] = {}  # step id -> [attempts, last outcome]


def _state(f: Flow) -> FlowSpanState:
    state = f.spans
    if state is None:
        state = f.spans = FlowSpanState()
    return state


class Holder:
    """One entry of a flow, step or turn block: the span(s) it has had."""

    __slots__ = (
        "attrs",
        "base",
        "cell",
        "current",
        "done",
        "kind",
        "name",
        "parent",
        "step",
        "token",
        "top",
        "turn",
    )

    def __init__(
        self,
        kind: int,
        cell: FlowCell | None,
        base: otel_context.Context,
        parent: Holder | None,
        step: str | None,
        turn: Turn | None,
    ) -> None:
        self.kind = kind
        self.cell = cell
        self.base = base  # the context at entry: a flow/turn span's parent (an incoming request)
        self.parent = parent  # the enclosing block's holder
        self.step = step
        self.turn = turn
        self.done = False
        self.token: Any = None
        self.name = ""  # the span name and start attributes (continuations reuse them)
        self.attrs: Mapping[str, Any] = {}
        self.current: Segment = None  # type: ignore[assignment]  # set right after
        top: Holder | None = self
        while top is not None and top.kind == STEP:
            top = top.parent
        self.top = top  # the flow/turn holder above a step (None for a step outside one)


class Segment:
    """One span of a holder, and the usage rolled up into it."""

    __slots__ = (
        "costs",
        "ctx",
        "deadline",
        "ended",
        "flow",
        "holder",
        "number",
        "parent",
        "sources",
        "span",
        "tokens",
        "unpriced",
    )

    def __init__(
        self, holder: Holder, span: Span, base: otel_context.Context, flow: Flow | None, n: int
    ) -> None:
        self.holder = holder
        self.span = span
        self.flow = flow
        self.number = n
        self.ended = False
        self.parent: Segment | None = base.get(KEY)  # type: ignore[assignment]
        self.ctx = otel_context.set_value(KEY, self, trace.set_span_in_context(span, base))
        bound = SETTINGS.flow_span_max_duration
        self.deadline = clock() + bound if bound and holder.kind != STEP else _INF
        self.tokens: list[int] | None = None
        self.costs: dict[str, Decimal] = {}
        self.sources: set[str] = set()
        self.unpriced = 0


# -- the OTel current context, swapped at ContextVar cost when possible ------------------------

_var: contextvars.ContextVar[Any] | None = None
_resolved = False
_get_current: Callable[[], otel_context.Context] | None = None
"""The current-context getter, set at the first flow span (before it, no context can hold a
segment, so :func:`parent_for_run` returns at once)."""


def _runtime_var() -> contextvars.ContextVar[Any] | None:
    global _var, _resolved, _get_current
    if not _resolved:
        # Imported here, not at the top: coworker._run imports coworker.flow, which imports
        # this module.
        from coworker._run import otelctx

        _var = otelctx._VAR
        _get_current = _var.get if _var is not None else otel_context.get_current
        _resolved = True
    return _var


def _current() -> otel_context.Context:
    var = _runtime_var()
    return var.get() if var is not None else otel_context.get_current()


def _attach(ctx: otel_context.Context) -> Any:
    var = _runtime_var()
    return var.set(ctx) if var is not None else otel_context.attach(ctx)


def _reset(token: Any) -> None:
    """Reset ``token``; raises ``ValueError`` / ``RuntimeError`` for one of another context
    (or used), so that :func:`leave` can pick the entry of this context."""
    var = _runtime_var()
    if var is not None:
        var.reset(token)
    else:  # pragma: no cover - a custom OTEL_PYTHON_CONTEXT
        otel_context.detach(token)


# -- names and attributes -----------------------------------------------------------------------


def _top_span_shape(
    kind: int, f: Flow, identity: Identity | None, turn: Turn | None
) -> tuple[str, dict[str, Any]]:
    """Name and start attributes of a flow or turn span (GenAI and OpenInference
    conventions: docs/observability.md, "Trace shape")."""
    attrs: dict[str, Any] = dict(f.span_attributes)
    agent = None
    if identity is not None:
        attrs.update(identity.span_attributes)
        agent = identity.agent
    attrs[attr.SPAN_TYPE] = "turn" if kind == TURN else "flow"
    if kind == TURN:
        if turn is not None:
            attrs[attr.TURN_NUMBER] = turn.number
            if turn.message_id is not None:
                attrs[attr.TURN_MESSAGE_ID] = turn.message_id
        if agent is not None:
            attrs[attr.GEN_AI_OPERATION_NAME] = attr.GEN_AI_OP_INVOKE_AGENT
            attrs[attr.OPENINFERENCE_SPAN_KIND] = attr.OPENINFERENCE_AGENT
            name = f"invoke_agent {agent.name}" if agent.name else "invoke_agent"
        else:
            attrs[attr.OPENINFERENCE_SPAN_KIND] = attr.OPENINFERENCE_CHAIN
            name = "conversation turn"
        return name, attrs
    attrs[attr.OPENINFERENCE_SPAN_KIND] = attr.OPENINFERENCE_CHAIN
    if f.type == "workflow":
        attrs[attr.GEN_AI_OPERATION_NAME] = attr.GEN_AI_OP_INVOKE_WORKFLOW
        d = f.definition
        if d is None:
            return "invoke_workflow", attrs
        attrs[attr.GEN_AI_WORKFLOW_NAME] = d.id
        return f"invoke_workflow {d.id}", attrs
    # Not a GenAI workflow (the spec: invoke_workflow only where one is known to be one).
    return f"flow {f.type}", attrs


def _step_span_shape(
    f: Flow | None, step: str, identity: Identity | None, attempt: int
) -> tuple[str, dict[str, Any]]:
    attrs: dict[str, Any] = {}
    if f is not None:
        fa = f.span_attributes
        attrs[attr.FLOW_TYPE] = fa[attr.FLOW_TYPE]
        attrs[attr.FLOW_ID] = fa[attr.FLOW_ID]
        if attr.CONVERSATION_ID in fa:
            attrs[attr.CONVERSATION_ID] = fa[attr.CONVERSATION_ID]
    if identity is not None:
        attrs.update(identity.span_attributes)
    attrs[attr.SPAN_TYPE] = "step"
    attrs[attr.STEP_ID] = step
    attrs[attr.STEP_ATTEMPT] = attempt
    attrs[attr.OPENINFERENCE_SPAN_KIND] = attr.OPENINFERENCE_CHAIN
    return f"step {step}", attrs


def _identity() -> Identity | None:
    return SCOPE.get().identity


def _tracer() -> trace.Tracer | None:
    tracer = TRACER.tracer
    if tracer is None:
        tracer = TRACER.resolve()
    return tracer


# -- blocks --------------------------------------------------------------------------------------


def enter(
    holders: list[Holder],
    kind: int,
    cell: FlowCell | None,
    step: str | None = None,
    turn: Turn | None = None,
) -> Holder | None:
    """A flow, step or turn block is entered: start its span and make it current.

    Returns the holder (also appended to ``holders``, the block's entries), or ``None`` when
    no span is made (no SDK provider, or a step outside any flow).
    """
    tracer = _tracer()
    if tracer is None:
        return None
    f = cell.flow if cell is not None else None
    if kind == STEP and f is None:
        return None  # a step outside a flow is an attribute of its runs only
    base = _current()
    outer: Segment | None = base.get(KEY)  # type: ignore[assignment]
    if outer is not None:
        # The enclosing span was replaced elsewhere (a break, the bound) or is due: use the
        # live one, as a root run would (parent_for_run).
        ctx = _parent(base, outer, check_bound=True)
        if ctx is not None:
            base = ctx
            outer = base.get(KEY)  # type: ignore[assignment]
    identity = _identity()
    parent_holder = outer.holder if outer is not None else None
    h = Holder(kind, cell, base, parent_holder, step, turn)
    if kind == STEP:
        assert f is not None and step is not None
        with _lock:
            counts = _state(f).attempts
            entry = counts.pop(step, None) or [0, None]
            counts[step] = entry  # most recent last (the oldest is forgotten first)
            entry[0] += 1
            if len(counts) > _STEPS_KEPT:
                counts.pop(next(iter(counts)))
            attempt = entry[0]
        name, attrs = _step_span_shape(f, step, identity, attempt)
        links: list[Link] | None = None
    else:
        assert f is not None
        name, attrs = _top_span_shape(kind, f, identity, turn)
        links = _first_span_links(f, attrs)
    h.name, h.attrs = name, dict(attrs)
    span = tracer.start_span(name, context=base, attributes=attrs, links=links)
    h.current = Segment(h, span, base, f, 1)
    h.token = _attach(h.current.ctx)
    holders.append(h)
    return h


def _first_span_links(f: Flow, attrs: dict[str, Any]) -> list[Link] | None:
    """The break link of a flow's first span (consumed), and ``session.previous_id``."""
    state = f.spans
    if state is None or state.link is None:
        return None
    link, state.link = state.link, None
    if state.previous_session is not None:
        attrs[attr.SESSION_PREVIOUS_ID] = state.previous_session
    return [link]


def leave(holders: list[Holder], exc: BaseException | None) -> None:
    """A flow, step or turn block is left (``exc``: what it raised): end its current span
    once, and restore the OTel context it replaced."""
    if not holders:
        return
    h: Holder | None = None
    for candidate in holders[::-1]:  # a copy: concurrent entries of a shared block
        try:
            _reset(candidate.token)
        except (ValueError, RuntimeError):
            continue  # another context's entry
        h = candidate
        holders.remove(candidate)
        break
    if h is None:
        # Entered in a context that is gone (a block spanning a generator's yield).
        h = holders.pop()
        old = h.token.old_value
        _attach(otel_context.Context() if old is contextvars.Token.MISSING else old)
    with _lock:
        h.done = True
        seg = h.current
    _end(seg, exc)
    if h.kind == STEP:
        # The context the step restored may hold a segment replaced meanwhile (the bound):
        # the rest of the enclosing block continues in the live one.
        ctx = _current()
        s: Segment | None = ctx.get(KEY)  # type: ignore[assignment]
        if s is not None and (s.ended or s.holder.current is not s):
            live = _live(s)
            if live is not None and trace.get_current_span(ctx) is s.span:
                _attach(live.ctx)


def _end(
    seg: Segment,
    exc: BaseException | None,
    extra: Mapping[str, Any] | None = None,
    outcome: str | None = None,
) -> None:
    """End a segment's span exactly once, with its roll-ups and outcome."""
    with _lock:
        if seg.ended:
            return
        seg.ended = True
        usage = _usage_attributes(seg)
    span = seg.span
    try:
        if usage:
            span.set_attributes(usage)
        if extra:
            span.set_attributes(extra)
        failed = exc is not None and _is_failure(exc)
        if failed:
            assert exc is not None
            _record_failure(span, exc)
        if seg.holder.kind == STEP:
            outcome = outcome or ("failed" if failed else "completed")
            span.set_attribute(attr.STEP_OUTCOME, outcome)
            f = seg.flow
            if f is not None and f.spans is not None:
                with _lock:
                    entry = f.spans.attempts.get(seg.holder.step or "")
                    if entry is not None:
                        entry[1] = outcome
        _strip_audit(span)
    finally:
        span.end()
    if seg.holder.kind != STEP and seg.flow is not None:
        _state(seg.flow).last = span.get_span_context()


def _strip_audit(span: Span) -> None:
    """A flow/step/turn span is never an audit record: drop the audit flag (and its 0.1.0
    name, which ``coworker audit serve`` and the collector configs still accept) if
    application code set it on the current (flow) span; the flow's lifecycle is audited by
    its events."""
    if not span.is_recording():
        return
    from coworker._run.lifecycle import attribute_dict

    for key in (attr.AUDITED, attr.AUDITED_LEGACY):
        if key in attribute_dict(span):
            try:
                del span._attributes[key]  # type: ignore[attr-defined]
            except Exception:  # no mutable SDK attributes: a False flag is no audit span
                span.set_attribute(key, False)


def _is_failure(exc: BaseException) -> bool:
    from coworker._run.lifecycle import is_failure

    return is_failure(exc)


def _record_failure(span: Span, exc: BaseException) -> None:
    """Status ERROR, ``error.type`` and an ``exception`` event; unlike a run's failure, a
    denial does not make the span an audit record."""
    from coworker._run.lifecycle import error_type

    etype = error_type(exc)
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {etype}>"
    span.set_attribute(attr.ERROR_TYPE, etype)
    span.add_event(
        attr.EXCEPTION_EVENT, {attr.EXCEPTION_TYPE: etype, attr.EXCEPTION_MESSAGE: message}
    )
    span.set_status(Status(StatusCode.ERROR, f"{etype}: {message}"))


# -- runs -----------------------------------------------------------------------------------------


def parent_for_run() -> otel_context.Context | None:
    """The parent context a root run in a flow must use instead of the current one, or
    ``None`` (the current one is right: the common case, a few attribute reads).

    A segment replaced by another context (a break, the bound) is redirected to the live one;
    a flow or turn span past the bound is continued here first.
    """
    get = _get_current
    if get is None:
        return None  # no flow span was ever made in this process
    ctx = get()
    seg: Segment | None = ctx.get(KEY)  # type: ignore[assignment]
    if seg is None:
        return None
    if not seg.ended and seg.holder.current is seg:  # the fast path: nothing replaced
        top = seg.holder.top
        if top is None:
            return None
        deadline = top.current.deadline
        if deadline == _INF or deadline > clock():
            return None
    return _parent(ctx, seg, check_bound=True)


def _parent(
    ctx: otel_context.Context, seg: Segment, *, check_bound: bool
) -> otel_context.Context | None:
    if seg.ended or seg.holder.current is not seg:
        if trace.get_current_span(ctx) is not seg.span:
            return None  # something else is current (a user span): it stays the parent
        live = _live(seg)
        if live is None:
            return None
        seg, ctx, moved = live, live.ctx, True
    else:
        moved = False
    top = seg.holder.top
    if (
        check_bound
        and top is not None
        and top.current.deadline != _INF  # no bound: no clock read
        and not top.done
        and top.current.deadline <= clock()
        and trace.get_current_span(ctx) is seg.span
    ):
        new = _replace(seg, None, None)
        if new is not None:
            if not moved:
                _attach(new.ctx)  # this context continues in the continuation span
                return None
            return new.ctx
    return ctx if moved else None


def _live(seg: Segment) -> Segment | None:
    """The live segment that replaced ``seg`` (its holder's current one, or for a step
    interrupted by a break the enclosing block's), or ``None`` when its block is over."""
    h: Holder | None = seg.holder
    while h is not None:
        if h.done:
            return None
        cur = h.current
        if not cur.ended:
            return cur
        h = h.parent
    return None


# -- breaks and the bound ------------------------------------------------------------------------


def flow_broken(cell: FlowCell, old: Flow, new: Flow) -> None:
    """``old`` broke and ``new`` replaces it in ``cell`` (``FlowCell.break_flow``).

    If a block of that flow is open in this context, its span (and the spans of the steps
    open in it) end now and the new flow's first span starts, linked; otherwise the new
    flow's next span (the next turn) gets the link.
    """
    if not SETTINGS.flow_spans:
        return
    state = _state(new)
    identity = _identity()
    session = identity.session if identity is not None else None
    old_session = getattr(old, "_session", None)
    if session is not None and old_session is not None and session != old_session:
        state.previous_session = old_session
    ctx = _current()
    seg: Segment | None = ctx.get(KEY)  # type: ignore[assignment]
    live = _live(seg) if seg is not None else None
    if live is not None:
        top: Holder | None = live.holder
        while top is not None and top.kind == STEP:
            top = top.parent
        if top is not None and top.cell is cell:
            replaced = _replace(live, old, new)
            if replaced is not None:
                assert seg is not None
                if trace.get_current_span(ctx) is seg.span:
                    _attach(replaced.ctx)  # the rest of this block runs in the new flow
                return
    last = old.spans.last if old.spans is not None else None
    if last is not None:
        state.link = _break_link(last, old, new)


def _break_link(last: SpanContext, old: Flow, new: Flow) -> Link:
    return Link(
        last,
        {
            attr.LINK_TYPE: "flow-break",
            attr.FLOW_BREAK_REASON: new.break_reason or "",
            attr.FLOW_PREVIOUS_ID: old.id,
        },
    )


def _replace(innermost: Segment, old: Flow | None, new: Flow | None) -> Segment | None:
    """End the segments from ``innermost`` up to its flow/turn holder and start their
    replacements: for a break (``new`` given) the new flow's first span only (the open steps
    are interrupted: they do not continue in the new flow, as in the flow events), for the
    bound a continuation of each. Returns the innermost new segment, or ``None`` when there
    is nothing to replace (another thread did it first, or the block is over)."""
    tracer = _tracer()
    if tracer is None:
        return None
    chain: list[Holder] = []
    h: Holder | None = innermost.holder
    while h is not None:
        chain.append(h)
        if h.kind != STEP:
            break
        h = h.parent
    top = chain[-1]
    if top.kind == STEP:
        return None  # steps outside a flow span: nothing to continue
    identity = _identity()
    # One lock around claim and replacement: concurrent runs that find the bound passed (or
    # a break racing the bound) replace the chain once.
    with _lock:
        if top.done or (new is None and top.current.deadline > clock()):
            return None
        olds = [x.current for x in chain]
        if new is not None:
            assert old is not None
            for s in olds[:-1]:
                _end(s, None, outcome="interrupted")
            _end(olds[-1], None, {attr.FLOW_NEXT_ID: new.id})
            _state(new).link = _break_link(olds[-1].span.get_span_context(), old, new)
            top.name, top.attrs = _top_span_shape(top.kind, new, identity, top.turn)
            attrs = dict(top.attrs)
            links = _first_span_links(new, attrs)
            span = tracer.start_span(top.name, context=top.base, attributes=attrs, links=links)
            first = Segment(top, span, top.base, new, 1)
            top.current = first
            return first
        pairs = [(x, s) for x, s in zip(chain, olds, strict=True) if not s.ended]
        for _, s in pairs:
            _end(s, None, {attr.SPAN_CONTINUED: True})
        parent_ctx = top.base
        last: Segment | None = None
        for x, s in reversed(pairs):  # the flow first, then the steps inside it
            attrs = dict(x.attrs)
            attrs[attr.SPAN_SEGMENT] = s.number + 1
            link = Link(s.span.get_span_context(), {attr.LINK_TYPE: "continuation"})
            span = tracer.start_span(x.name, context=parent_ctx, attributes=attrs, links=[link])
            last = x.current = Segment(x, span, parent_ctx, s.flow, s.number + 1)
            parent_ctx = last.ctx
        return last


# -- usage roll-ups ------------------------------------------------------------------------------

_TOKEN_KEYS: Final = (
    attr.GEN_AI_USAGE_INPUT_TOKENS,
    attr.GEN_AI_USAGE_OUTPUT_TOKENS,
    attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
)


def segment() -> Segment | None:
    """The innermost flow, step or turn segment of the current context (usage, issue 16:
    taken at a ``record_usage`` call, added to when the run ends)."""
    seg: Segment | None = _current().get(KEY)  # type: ignore[assignment]
    return seg


def add_usage(tokens: TokenCounts, cost: Cost | None, seg: Segment | None = None) -> None:
    """A run recorded usage: add it to every flow, step and turn span it is under (those of
    ``seg``, default: the current context's)."""
    if seg is None:
        seg = _current().get(KEY)  # type: ignore[assignment]
        if seg is None:
            return
    counts = tokens  # input, output, cache read, cache creation, reasoning: a tuple
    with _lock:
        while seg is not None:
            if not seg.ended:
                have = seg.tokens
                if have is None:
                    seg.tokens = list(counts)
                else:
                    for i, n in enumerate(counts):
                        have[i] += n
                if cost is None:
                    seg.unpriced += 1
                else:
                    seg.costs[cost.currency] = seg.costs.get(cost.currency, Decimal(0)) + Decimal(
                        cost.amount
                    )
                    seg.sources.add(cost.source)
            seg = seg.parent


def _usage_attributes(seg: Segment) -> dict[str, Any]:
    """The roll-up attributes of a segment (under ``_lock``)."""
    if seg.tokens is None:
        return {}
    out: dict[str, Any] = {}
    for i, (key, n) in enumerate(zip(_TOKEN_KEYS, seg.tokens, strict=True)):
        if n or i < 2:  # input and output always; the others when used (like a run span)
            out[key] = n
    if len(seg.costs) == 1:
        ((currency, amount),) = seg.costs.items()
        out[attr.GEN_AI_USAGE_COST_AMOUNT] = float(amount)
        out[attr.GEN_AI_USAGE_COST_CURRENCY] = currency
        out[attr.GEN_AI_USAGE_COST_SOURCE] = ", ".join(sorted(seg.sources))
    elif seg.costs:
        _log.warning(
            "coworker: span %r rolls up costs in several currencies (%s): no total on it; the "
            "run spans and the usage ledger have each",
            seg.span.name if hasattr(seg.span, "name") else "?",
            ", ".join(sorted(seg.costs)),
        )
    if seg.unpriced:
        out[attr.USAGE_UNPRICED] = seg.unpriced
    return out
