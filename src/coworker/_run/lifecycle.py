"""The one run lifecycle: :func:`begin` opens a run, :meth:`Run` ends it; every wrapper kind
(function, coroutine, generator, async generator, ``with run(...)``) goes through these.

:func:`begin`:

1. reads the scope; without an SDK provider it only enforces the policy (the span would be a
   no-op anyway);
2. builds the attributes: static ones, the scope's flow, step and identity, a new run id,
   parent and chain ids, the audit classification, and (only when asked for) the bound
   arguments for ``attributes=`` or ``capture_input``;
3. starts the span with them, makes it current and sets the run's scope;
4. asks the policy and, for a state change in fail-closed mode, the audit gate; a refusal
   ends the run as an error and raises before the body runs;
5. with an audit trail, seals the attributes the record is built from, so that ending puts
   them back whatever the body set.
"""

from __future__ import annotations

import contextvars
import logging
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.trace import Span, Status, StatusCode

from coworker import _flow_events, _flow_spans
from coworker import attributes as attr
from coworker._capture import TRUNCATED, capture
from coworker._ids import getrandbits
from coworker._run import otelctx
from coworker._run.spec import (
    Spec,
    bind,
    classify,
    derive_attributes,
    openinference_kind,
    slug,
)
from coworker._scope import SCOPE, Scope, restore
from coworker._state import SETTINGS, TRACER, api_tracer
from coworker.exceptions import PermissionDenied, RateLimited, ValidationError
from coworker.flow import AI_CONVERSATION

if TYPE_CHECKING:
    from coworker.flow import Flow
    from coworker.identity import Identity

__all__ = ["Run", "begin", "current_run", "error_type", "is_failure"]

_log = logging.getLogger(__name__)

_ABSENT: Final = object()
_scope_reset: Final = SCOPE.reset
_new_scope: Final = tuple.__new__
_SEALED: Final = attr.SEALED_ATTRIBUTES
_RESERVED: Final = attr.RESERVED_ATTRIBUTES

USAGE_CLOSED: Final[list[Any]] = []
"""``Run.usage`` once the run ended (never appended to): record_usage's calls after that are
on no span (:func:`coworker.usage.finish` took the run's list)."""


def _usage_finish(r: Run, calls: list[Any]) -> None:
    # An import statement in the run's end costs ~8,000 instructions each time (callgrind):
    # import once, then the end calls coworker.usage.finish directly.
    global _usage_finish
    from coworker.usage import finish

    _usage_finish = finish
    finish(r, calls)


Call = tuple[Any, tuple[Any, ...], dict[str, Any]]
"""``(instance, args, kwargs)`` of one call, as wrapt hands them over."""

_NO_CALL: Final[Call] = (None, (), {})


class Run:
    """A running ``coworker.run``: what ``with coworker.run(...) as r`` gives and
    :func:`current_run` returns.

    Attributes:
        id: ``coworker.run.id``.
        parent_id: the enclosing run's id, or ``None`` for a root run.
        chain_id: the root run's id (``coworker.chain.id``).
        name: the span name.
        operation: ``coworker.operation``, if any.
        doctype: ``coworker.doctype``, if any.
        step: ``step.id``, if any.
        flow: the :class:`~coworker.Flow` the run belongs to, if any.
        category: the audit category assigned at start, or ``None``.
        span: the OpenTelemetry span.

    :meth:`end`, :meth:`end_detached` and :meth:`opened_by` belong to the run lifecycle: the
    decorator and the ``with coworker.run(...)`` block call them; application code uses
    :meth:`set_attribute` and :meth:`set_output`.
    """

    __slots__ = (
        "_otel_token",
        "_scope_token",
        "_sealed",
        "_spec",
        "category",
        "chain_id",
        "doctype",
        "flow",
        "id",
        "name",
        "operation",
        "parent_id",
        "span",
        "step",
        "usage",
    )

    id: str
    parent_id: str | None
    chain_id: str
    name: str
    operation: str | None
    doctype: str | None
    step: str | None
    flow: Flow | None
    category: str | None
    span: Span
    usage: list[Any]  # usage (issue 16): record_usage's calls; USAGE_CLOSED once ended
    _spec: Spec
    _sealed: dict[str, Any] | None
    _otel_token: Any
    _scope_token: contextvars.Token[Scope] | None

    def set_attribute(self, key: str, value: Any) -> None:
        """Set an attribute on the run's span.

        Raises:
            ValueError: ``key`` is one coworker sets itself (identity, flow, run, audit,
                operation, doctype, captured input/output): those come from ``acting_as``,
                ``flow``, ``coworker.run``'s options and :meth:`set_output` only.
        """
        if key in _SEALED or key in _RESERVED:
            raise ValueError(
                f"{key!r} is reserved: coworker sets it from acting_as(), flow() and "
                "coworker.run's options; a run cannot change it on itself"
            )
        self.span.set_attribute(key, value)

    def set_output(self, value: Any) -> None:
        """Record ``value`` as the run's captured output (redacted, size-limited)."""
        captured = capture(value, SETTINGS.redact, SETTINGS.capture_limit)
        self.span.set_attributes(
            {
                attr.OUTPUT: captured,
                attr.OUTPUT_VALUE: captured,
                attr.OUTPUT_MIME_TYPE: mime_type(captured),
            }
        )

    def opened_by(self, spec: Spec) -> bool:
        """This run was started from ``spec`` (a ``with run(...)`` block's own run)."""
        return self._spec is spec

    def end(self, exc: BaseException | None = None) -> None:
        """End the run: record ``exc`` as its failure, restore the context, end the span.

        Ending may append the audit record; a failure there (``AuditUnavailable`` under the
        ``raise`` policy) surfaces from here.
        """
        calls = self.usage  # usage (issue 16): before the flow's spans can end
        self.usage = USAGE_CLOSED
        if calls:
            _usage_finish(self, calls)
        if self.flow is not None:
            self.flow.run_ended(self)
        if self._sealed is not None:
            self._reseal()
        if exc is not None and is_failure(exc):
            record_failure(self.span, exc)
        token = self._scope_token
        assert token is not None  # end() and end_detached() are never both called
        try:
            _scope_reset(token)
        except ValueError:  # ended in another context than it began in
            restore(token)
        otelctx.detach(self._otel_token)
        _flow_events.run_ended(self, exc)  # flow event (issue 14)
        self.span.end()

    def end_detached(self, exc: BaseException | None = None) -> None:
        """End the run's span without touching the context (it belongs to others now: a
        generator's step, or a block exited out of order)."""
        # Its tokens are never used now; a generator's run made them in the body's own
        # context, which holds the run: dropping them breaks that reference cycle.
        self._scope_token = self._otel_token = None
        calls = self.usage  # usage (issue 16): before the flow's spans can end
        self.usage = USAGE_CLOSED
        if calls:
            _usage_finish(self, calls)
        if self.flow is not None:
            self.flow.run_ended(self)
        if self._sealed is not None:
            self._reseal()
        if exc is not None and is_failure(exc):
            record_failure(self.span, exc)
        _flow_events.run_ended(self, exc)  # flow event (issue 14)
        self.span.end()

    def _reseal(self) -> None:
        """Put back the start values of the sealed attributes and the name, if the body
        changed them on its span; the audit record is built from what coworker checked, not
        from what the body wrote."""
        sealed = self._sealed
        if sealed is None:
            return
        span: Any = self.span
        current = attribute_dict(span)
        for key, want in sealed.items():
            have = current.get(key, _ABSENT)
            # Exact types: the body setting coworker.audited to 1 must not pass for True.
            if have is not want and (type(have) is not type(want) or have != want):
                span.set_attribute(key, want)
        if len(current) > len(sealed):
            for key in _SEALED.intersection(current).difference(sealed):
                _drop_attribute(span, key)  # a sealed key the run did not start with
        if span.name != self.name:
            span.update_name(self.name)

    def __repr__(self) -> str:
        return f"Run(name={self.name!r}, id={self.id!r}, parent_id={self.parent_id!r})"


def mime_type(captured: str) -> str:
    """``application/json``, or ``text/plain`` for a capture the size limit cut off."""
    return attr.MIME_TEXT if captured.endswith(TRUNCATED) else attr.MIME_JSON


def current_run() -> Run | None:
    """The innermost active run of the current context, or ``None``.

    Inside ``coworker.extract(...)`` before any local run this is ``None``: the caller's run
    (in another process) is only a parent id here.
    """
    r = SCOPE.get().run
    return r if type(r) is Run else None


def attribute_dict(span: Any) -> Mapping[str, Any]:
    # The SDK's live span keeps a BoundedAttributes around a plain dict; reading that dict
    # costs a few dict lookups, where the public mapping copies under a lock and raises
    # KeyError (slowly) for each missing key. Read-only here, and only in the span's own run.
    inner = getattr(getattr(span, "_attributes", None), "_dict", None)
    return inner if type(inner) is dict else dict(span.attributes)


def _drop_attribute(span: Any, key: str) -> None:
    # The SDK has no public way to remove an attribute; its live span keeps a mutable
    # BoundedAttributes. Without it, the record is refused loudly rather than forged.
    attributes: Any = getattr(span, "_attributes", None)
    try:
        del attributes[key]
    except Exception:
        _log.error("coworker: cannot remove %r that a run set on its own span", key)
        span.set_attribute(attr.AUDITED, True)
        span.set_attribute(key, "<forged by the run>")


_ERROR_TYPES: dict[type, str] = {}


def error_type(exc: BaseException) -> str:
    """The OTel ``error.type`` of an exception: its fully qualified class name."""
    cls = type(exc)
    name = _ERROR_TYPES.get(cls)
    if name is None:
        mod = cls.__module__
        name = cls.__qualname__ if mod == "builtins" else f"{mod}.{cls.__qualname__}"
        _ERROR_TYPES[cls] = name
    return name


def is_failure(exc: BaseException) -> bool:
    """``exc`` ending a run makes it a failure (not ``GeneratorExit``, not a clean exit)."""
    # StopIteration out of a plain function is a bug there (a failure); the generator
    # drivers treat their own exhaustion separately.
    if isinstance(exc, GeneratorExit):
        return False
    return not (isinstance(exc, SystemExit) and exc.code in (0, None))


def record_failure(span: Span, exc: BaseException) -> None:
    """Status ERROR, ``error.type``, an ``exception`` event; denials reclassify the span."""
    etype = error_type(exc)
    attrs: dict[str, Any] = {attr.ERROR_TYPE: etype}
    if isinstance(exc, PermissionDenied):
        attrs[attr.AUDITED] = True
        attrs[attr.AUDIT_CATEGORY] = (
            attr.CATEGORY_POLICY_VIOLATION
            if isinstance(exc, RateLimited)
            else attr.CATEGORY_AUTHORIZATION_FAILURE
        )
    elif isinstance(exc, ValidationError):
        attrs[attr.AUDITED] = True
        attrs[attr.AUDIT_CATEGORY] = attr.CATEGORY_VALIDATION_VIOLATION
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {etype}>"
    span.set_attributes(attrs)
    event = {attr.EXCEPTION_TYPE: etype, attr.EXCEPTION_MESSAGE: message}
    if SETTINGS.debug:
        event[attr.EXCEPTION_STACKTRACE] = "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)
        )
    span.add_event(attr.EXCEPTION_EVENT, event)
    span.set_status(Status(StatusCode.ERROR, f"{etype}: {message}"))


def begin(spec: Spec, call: Call = _NO_CALL, force: bool = False) -> Run | None:
    """Open a run: its span, its scope; enforce the policy and the fail-closed gate.

    On a denial the run is ended as an error (its context restored) before raising.

    Args:
        spec: the decorated callable's spec.
        call: ``(instance, args, kwargs)`` of the call.
        force: open a span even without an SDK provider (``with run(...)`` hands out a
            :class:`Run` in every case).

    Returns:
        The run, or ``None`` (the caller just calls the function) when no SDK provider is
        set and ``force`` is false: then nobody can see a span, and only the policy applies.
    """
    scope = SCOPE.get()
    settings = SETTINGS
    tracer = TRACER.tracer
    if tracer is None:
        tracer = TRACER.resolve()
        if tracer is None:
            if not force:
                if settings.policy is not None:
                    _enforce_only(spec, scope, call)
                return None
            tracer = api_tracer()
    op = spec.operation
    doctype = spec.doctype
    name = spec.span_name
    own_attrs = spec.static_attrs
    own_gen_ai_op = spec.own_gen_ai_op
    bound: dict[str, Any] | None = None
    refused: PermissionDenied | None = None
    if spec.attributes_fn is not None or spec.capture_input:
        own_attrs = own_attrs.copy()
        bound = bind(spec, *call)
        if spec.attributes_fn is not None:
            try:
                op, doctype, name = derive_attributes(
                    spec, bound, own_attrs, op, doctype, name, scope.identity
                )
            except PermissionDenied as exc:
                # Fail closed, but through the span: the refusal is audited like a denial.
                refused = exc
                own_attrs = spec.static_attrs.copy()
            own_gen_ai_op = attr.GEN_AI_OPERATION_NAME in own_attrs
            if own_gen_ai_op:
                openinference_kind(own_attrs)
        if spec.capture_input:
            captured = capture(bound, settings.redact, settings.capture_limit)
            # The same string under OpenInference's key, for Phoenix's input pane.
            own_attrs[attr.INPUT] = own_attrs[attr.INPUT_VALUE] = captured
            own_attrs[attr.INPUT_MIME_TYPE] = mime_type(captured)
    op_key = spec.op_key if op is spec.operation else (op.lower() if op else None)
    identity = scope.identity
    parent = scope.run
    cell = scope.cell
    flow = cell.touch(identity, parent is None) if cell is not None else None
    # Flow, step and identity attributes: merged once per scope (and flow), not per call.
    entry = scope.cache[0]
    if entry is None or entry[0] is not flow:
        entry = scope.cache[0] = (flow, _scope_attributes(scope, flow))
    attrs = entry[1].copy()
    attrs.update(own_attrs)
    step = scope.step if spec.step is None else None
    if step is None and (spec.step is not None or flow is not None):
        step = _step(spec, scope, flow, op)
        if step is not None:
            attrs[attr.STEP_ID] = step
    if identity is not None and identity.agent is not None and not own_gen_ai_op:
        attrs[attr.GEN_AI_TOOL_NAME] = name
    # 16 lowercase hex digits; to_bytes().hex() costs ~1,300 instructions less than "016x".
    run_id = getrandbits(64).to_bytes(8).hex()
    attrs[attr.RUN_ID] = run_id
    if parent is not None:
        attrs[attr.RUN_PARENT_ID] = parent.id
        chain_id = parent.chain_id
    else:
        chain_id = run_id
    attrs[attr.CHAIN_ID] = chain_id
    category = classify(op_key, doctype, spec.forced)
    if category is not None:
        attrs[attr.AUDITED] = True
        attrs[attr.AUDIT_CATEGORY] = category
    else:
        attrs[attr.AUDITED] = False

    # A root run in a flow nests under the flow's current span; only a span replaced in
    # another context (a break, the bound) needs another parent (flow spans, issue 13).
    parent_ctx = (
        _flow_spans.parent_for_run()
        if flow is not None and parent is None and settings.flow_spans
        else None
    )
    span = tracer.start_span(name, context=parent_ctx, attributes=attrs)
    r = Run()
    r.id = run_id
    r.parent_id = parent.id if parent is not None else None
    r.chain_id = chain_id
    r.name = name
    r.operation = op
    r.doctype = doctype
    r.step = step
    r.flow = flow
    r.category = category
    r.span = span
    r.usage = []  # usage (issue 16): a list per run, so that record_usage needs no lock
    r._spec = spec
    r._sealed = None
    r._otel_token = otelctx.attach(otelctx.with_span(span, parent_ctx))
    # The body's scope shares the cache of the scope it runs in when its step is the same.
    cache = scope.cache if step is scope.step else [None]
    # tuple.__new__ directly: a NamedTuple's own __new__ is a Python-level call per run.
    r._scope_token = SCOPE.set(_new_scope(Scope, (cell, step, r, identity, scope.turn, cache)))
    if flow is not None:
        flow.run_started(r)
        _flow_events.run_started(r, scope)  # flow event (issue 14)
    gate = settings.audit_gate
    if (
        settings.policy is not None
        or refused is not None
        or (gate is not None and category == attr.CATEGORY_STATE_CHANGE)
    ):
        try:
            _check(spec, r, identity, call, bound, refused, attrs)
        except BaseException as exc:
            r.end(exc)
            raise
    if settings.audit_records and span.is_recording():
        r._sealed = {k: v for k, v in attrs.items() if k in _SEALED}
    return r


def _scope_attributes(scope: Scope, flow: Flow | None) -> dict[str, Any]:
    """The attributes every run in ``scope`` gets from it: the flow's, the step, the
    identity's (and ``gen_ai.operation.name`` when an agent acts)."""
    attrs: dict[str, Any] = {}
    if flow is not None:
        attrs.update(flow.span_attributes)
    if scope.step is not None:
        attrs[attr.STEP_ID] = scope.step
    identity = scope.identity
    if identity is not None:
        attrs.update(identity.span_attributes)
    if identity is not None and identity.agent is not None:
        # A run an agent performs is a tool execution (OTel GenAI, OpenInference); its span
        # keeps its own name (docs/observability.md, "Conventions").
        attrs[attr.GEN_AI_OPERATION_NAME] = attr.GEN_AI_OP_EXECUTE_TOOL
        attrs[attr.OPENINFERENCE_SPAN_KIND] = attr.OPENINFERENCE_TOOL
    else:
        attrs[attr.OPENINFERENCE_SPAN_KIND] = attr.OPENINFERENCE_CHAIN
    return attrs


def _step(spec: Spec, scope: Scope, flow: Flow | None, op: str | None) -> str | None:
    """The run's step: its own ``step=``, the scope's, or one assigned in a conversation."""
    step = spec.step
    if step is not None:
        if flow is not None and flow.definition is not None:
            flow.check_step(step)
        return step
    step = scope.step
    if step is None and flow is not None and flow.type == AI_CONVERSATION:
        step = flow.assign_step(scope.turn, slug(op) if op else spec.short)
    return step


def _check(
    spec: Spec,
    r: Run,
    identity: Identity | None,
    call: Call,
    bound: dict[str, Any] | None,
    refused: PermissionDenied | None,
    attrs: dict[str, Any],
) -> None:
    """The policy decision and the fail-closed intent record, in the run's span."""
    if refused is not None:
        raise refused
    policy = SETTINGS.policy
    if policy is not None:
        policy.enforce(identity, r.operation, r.doctype, _lazy_arguments(spec, call, bound))
    gate = SETTINGS.audit_gate
    if gate is not None and r.category == attr.CATEGORY_STATE_CHANGE:
        seq = gate.intent(r.span)
        if seq is not None:
            attrs[attr.AUDIT_INTENT_SEQ] = seq


def _lazy_arguments(
    spec: Spec, call: Call, bound: dict[str, Any] | None
) -> Callable[[], Mapping[str, Any]]:
    """The policy's view of the call's arguments: bound once, and only if a condition asks."""
    cache = bound

    def arguments() -> Mapping[str, Any]:
        nonlocal cache
        if cache is None:
            cache = bind(spec, *call)
        return cache

    return arguments


def _enforce_only(spec: Spec, scope: Scope, call: Call) -> None:
    """The no-SDK path: no span, but the policy still decides (ACL never depends on OTel)."""
    op, doctype = spec.operation, spec.doctype
    bound: dict[str, Any] | None = None
    if spec.attributes_fn is not None:
        bound = bind(spec, *call)
        op, doctype, _ = derive_attributes(
            spec, bound, {}, op, doctype, spec.span_name, scope.identity
        )
    SETTINGS.policy.enforce(scope.identity, op, doctype, _lazy_arguments(spec, call, bound))
