"""``coworker.run``: one object, three forms (``@run``, ``@run(...)``, ``with run(...)``).

Everything that can be computed once per decorated callable (span name, static attributes,
signature, callable kind) is computed at decoration time in :class:`_Spec`; a call merges
ready-made attribute dicts (flow, identity) and opens one span.

Generators and async generators are wrapped in objects that run each step of the original in a
private ``contextvars.Context`` captured at call time: the span is current exactly while the
generator body runs, never in the consumer's code between items (where every peer SDK leaks
it), and ends on exhaustion, ``close()``, an early ``break`` or garbage collection.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import pickle
import random
import sys
import time
import traceback
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeVar, overload

import wrapt
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from coworker import _flow_events  # flow event (issue 14)
from coworker import attributes as attr
from coworker._capture import capture
from coworker._state import SETTINGS
from coworker.exceptions import PermissionDenied, RateLimited, ValidationError
from coworker.flow import (
    AI_CONVERSATION,
    SCOPE,
    AsyncContextMixin,
    Flow,
    _restore,
    _Scope,
    touch,
)
from coworker.identity import text

__all__ = ["Run", "current_run", "run"]

_log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Run ids and (via coworker._sdk) span/trace ids come from a private generator, never from the
# application's global ``random`` state: a program seeded with random.seed must behave the same
# with and without coworker. Reseeded in forked children so siblings don't repeat ids.
_RNG: Final = random.Random()
os.register_at_fork(after_in_child=_RNG.seed)
_getrandbits = _RNG.getrandbits

_TRACER: trace.Tracer | None = None
_VERSION = "0.1.0"


def new_id() -> str:
    """A new 64-bit run id as 16 lower-case hex digits (private RNG)."""
    return f"{_getrandbits(64):016x}"


def _resolve_tracer() -> trace.Tracer | None:
    """The tracer of the global SDK provider, or ``None`` while there is none."""
    global _TRACER
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):
        # No SDK yet: nothing is cached, so runs pick up a provider the app sets later.
        return None
    tracer = provider.get_tracer("coworker", _VERSION)
    gen = getattr(tracer, "id_generator", None)
    if gen is not None and type(gen).__name__ == "RandomIdGenerator":
        from coworker._sdk import PrivateRandomIdGenerator

        # Only our own tracer's generator: the application's tracers are left alone.
        tracer.id_generator = PrivateRandomIdGenerator()
    if getattr(tracer, "sampler", None) is not None:
        from coworker._sdk import wrap_sampler

        # The audit trail must not depend on the sampler: see coworker._sdk.AuditSampler.
        wrap_sampler(tracer)
    _TRACER = tracer
    return tracer


def reset_tracer() -> None:
    """Forget the cached tracer (after the global provider changed)."""
    global _TRACER
    _TRACER = None


RESERVED_ATTRIBUTES: Final = frozenset(
    {
        attr.USER_ID,
        attr.SESSION_ID,
        attr.AGENT_ID,
        attr.AGENT_NAME,
        attr.CONVERSATION_ID,
        attr.FLOW_TYPE,
        attr.FLOW_ID,
        attr.FLOW_DEFINITION_ID,
        attr.FLOW_PREVIOUS_ID,
        attr.FLOW_BREAK_REASON,
        attr.STEP_ID,
        attr.RUN_ID,
        attr.RUN_PARENT_ID,
        attr.CHAIN_ID,
        attr.AUDIT,
        attr.AUDIT_CATEGORY,
        attr.AUDIT_INTENT_SEQ,
        attr.ERROR_TYPE,
        attr.INPUT,
        attr.OUTPUT,
    }
)
"""Keys that ``attributes=`` cannot set: who acts, where in the flow, which run, whether it
is audited. They come from coworker's context (``acting_as``, ``flow``, ...) only."""

SEALED_ATTRIBUTES: Final = (RESERVED_ATTRIBUTES - {attr.OUTPUT, attr.ERROR_TYPE}) | {
    attr.OPERATION,
    attr.DOCTYPE,
}
"""Keys whose start values an audited run's record keeps, whatever the body sets on its span
(``trace.get_current_span().set_attribute("coworker.audit", False)`` must not hide a record,
nor ``user.id`` forge one). ``coworker.output`` (``Run.set_output``) and ``error.type`` are the
body's to report."""

_ABSENT: Final = object()

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


def _is_failure(exc: BaseException) -> bool:
    # StopIteration out of a plain function is a bug there (a failure); the generator proxies
    # treat their own exhaustion separately (_StepRunner._finish).
    if isinstance(exc, GeneratorExit):
        return False
    return not (isinstance(exc, SystemExit) and exc.code in (0, None))


def _record_failure(span: Span, exc: BaseException) -> None:
    etype = error_type(exc)
    attrs: dict[str, Any] = {attr.ERROR_TYPE: etype}
    if isinstance(exc, PermissionDenied):
        attrs[attr.AUDIT] = True
        attrs[attr.AUDIT_CATEGORY] = (
            attr.CATEGORY_POLICY_VIOLATION
            if isinstance(exc, RateLimited)
            else attr.CATEGORY_AUTHORIZATION_FAILURE
        )
    elif isinstance(exc, ValidationError):
        attrs[attr.AUDIT] = True
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


def _classify(op_key: str | None, doctype: str | None, forced: bool | None) -> str | None:
    if forced:
        return attr.CATEGORY_STATE_CHANGE
    if op_key is None:
        return None
    s = SETTINGS
    if forced is None and op_key in s.state_changing:
        return attr.CATEGORY_STATE_CHANGE
    if doctype is not None and op_key in s.read_operations and doctype in s.sensitive_doctypes:
        return attr.CATEGORY_SENSITIVE_READ
    return None


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

    def set_attribute(self, key: str, value: Any) -> None:
        """Set an attribute on the run's span.

        Raises:
            ValueError: ``key`` is one coworker sets itself (identity, flow, run, audit,
                operation, doctype, captured input/output): those come from ``acting_as``,
                ``flow``, ``coworker.run``'s options and :meth:`set_output` only.
        """
        if key in SEALED_ATTRIBUTES or key in RESERVED_ATTRIBUTES:
            raise ValueError(
                f"{key!r} is reserved: coworker sets it from acting_as(), flow() and "
                "coworker.run's options; a run cannot change it on itself"
            )
        self.span.set_attribute(key, value)

    def set_output(self, value: Any) -> None:
        """Record ``value`` as the run's captured output (redacted, size-limited)."""
        self.span.set_attribute(
            attr.OUTPUT, capture(value, SETTINGS.redact, SETTINGS.capture_limit)
        )

    def __repr__(self) -> str:
        return f"Run(name={self.name!r}, id={self.id!r}, parent_id={self.parent_id!r})"


def current_run() -> Run | None:
    """The innermost active run of the current context, or ``None``.

    Inside ``coworker.extract(...)`` before any local run this is ``None``: the caller's run
    (in another process) is only a parent id here.
    """
    r = SCOPE.get().run
    return r if type(r) is Run else None


class _Spec:
    """What one decorated callable (or one ``with run(...)``) needs per call, precomputed."""

    __slots__ = (
        "attributes_fn",
        "capture_input",
        "capture_output",
        "doctype",
        "explicit_name",
        "forced",
        "op_key",
        "operation",
        "prebound",
        "short",
        "sig",
        "sig_bound",
        "span_name",
        "static_attrs",
        "step",
        "target",
    )

    def __init__(self, options: RunOptions, target: Any, qualname: str) -> None:
        self.operation = options.operation
        self.op_key = options.operation.lower() if options.operation else None
        self.doctype = options.doctype
        self.step = options.step
        self.forced = options.state_changing
        self.capture_input = options.capture_input
        self.capture_output = options.capture_output
        self.target = target
        # A bound method given directly (coworker.run(obj.method)): its signature already
        # lacks self, unlike a function that wrapt binds at attribute access.
        self.prebound = inspect.ismethod(target)
        self.sig: _Binder | None = None
        self.sig_bound: _Binder | None = None
        static: dict[str, Any] = {}
        self.attributes_fn: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
        if callable(options.attributes):
            self.attributes_fn = options.attributes
        elif options.attributes:
            static.update(options.attributes)
        if options.operation:
            static[attr.OPERATION] = options.operation
        if options.doctype:
            static[attr.DOCTYPE] = options.doctype
        if target is not None:
            module = getattr(target, "__module__", None)
            static[attr.CODE_FUNCTION] = f"{module}.{qualname}" if module else qualname
        self.static_attrs = static
        self.explicit_name = options.name is not None
        self.span_name = options.name or _span_name(options.operation, options.doctype, qualname)
        self.short = _slug(options.operation or qualname.rsplit(".", 1)[-1])


def _span_name(operation: str | None, doctype: str | None, qualname: str) -> str:
    if operation and doctype:
        return f"{operation} {doctype}"
    return qualname


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "_." else "-" for c in text.lower()).strip("-")
    return out or "run"


class _Binder:
    """Binds call arguments to parameter names; ~10x cheaper than ``Signature.bind`` for the
    common case (no positional-only, ``*args`` or ``**kwargs`` parameters), which policy
    conditions and ``attributes=`` callables hit on every call."""

    __slots__ = ("_positional", "defaults", "names", "signature", "simple")

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        params = list(signature.parameters.values())
        self.names = tuple(p.name for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not p.empty}
        self.simple = all(
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params
        ) and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[: _n_positional(params)])
        self._positional = _n_positional(params)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if self.simple and len(args) <= self._positional:
            names = self.names
            if not kwargs and len(args) == len(names):
                return dict(zip(names, args, strict=True))  # the common all-positional call
            out = dict(zip(names, args, strict=False))
            for key, value in kwargs.items():
                if key in out or (key not in self.defaults and key not in names):
                    break  # duplicate or unknown: let Signature.bind explain
                out[key] = value
            else:
                if len(out) < len(names):
                    for key, value in self.defaults.items():
                        out.setdefault(key, value)
                if len(out) == len(names):
                    return {n: out[n] for n in names}
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)


def _n_positional(params: list[inspect.Parameter]) -> int:
    return sum(1 for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)


def _bind(spec: _Spec, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name (without ``self``/``cls``)."""
    if spec.target is None:
        return {}
    try:
        if spec.sig is None:
            sig = inspect.signature(spec.target)
            params = list(sig.parameters.values())
            spec.sig_bound = _Binder(sig.replace(parameters=params[1:]) if params else sig)
            spec.sig = _Binder(sig)
        # wrapt passes the instance (or class) separately, and the arguments without it, for
        # obj.method(...), Class.method(obj, ...) and classmethods alike; staticmethods and
        # plain functions get instance=None.
        bound_now = not spec.prebound and instance is not None
        binder = spec.sig_bound if bound_now else spec.sig
        assert binder is not None
        return binder.bind(args, kwargs)
    except (TypeError, ValueError):
        # Unbindable (the call itself will raise) or no signature (some builtins).
        return {"args": args, "kwargs": kwargs}


def _begin(
    spec: _Spec, wrapped: Any, instance: Any, args: tuple, kwargs: dict, force: bool = False
) -> Run | None:
    """Open the run's span and scope; enforce policy and the fail-closed gate.

    On a denial the span is ended as an error and the scope restored before raising.
    Returns ``None`` (the caller just calls the function) when no SDK provider is set and
    ``force`` is false: then nobody can see a span, and only the policy is enforced.
    """
    scope = SCOPE.get()
    settings = SETTINGS
    tracer = _TRACER
    if tracer is None:
        tracer = _resolve_tracer()
        if tracer is None:
            if not force:
                if settings.policy is not None:
                    _enforce_only(spec, scope, wrapped, instance, args, kwargs)
                return None
            tracer = trace.get_tracer("coworker", _VERSION)
    attrs = spec.static_attrs.copy()
    op = spec.operation
    op_key = spec.op_key
    doctype = spec.doctype
    name = spec.span_name
    bound: dict[str, Any] | None = None
    refused: PermissionDenied | None = None
    if spec.attributes_fn is not None or spec.capture_input:
        bound = _bind(spec, wrapped, instance, args, kwargs)
        if spec.attributes_fn is not None:
            try:
                op, doctype, name = _dynamic_attributes(
                    spec, bound, attrs, op, doctype, name, scope.identity
                )
            except PermissionDenied as exc:
                # Fail closed, but through the span: the refusal is audited like a denial.
                refused = exc
                attrs = spec.static_attrs.copy()
            op_key = op.lower() if op else None
        if spec.capture_input:
            attrs[attr.INPUT] = capture(bound, settings.redact, settings.capture_limit)
    cell = scope.cell
    identity = scope.identity
    flow = None
    if cell is not None:
        flow = touch(cell, identity, scope.run is None)
        attrs.update(flow.span_attributes)
    step = spec.step
    if step is not None:
        if flow is not None and flow.definition is not None:
            flow._check_step(step)
    else:
        step = scope.step
        if step is None and flow is not None and flow.type == AI_CONVERSATION:
            step = flow._assign_step(scope.turn, _slug(op) if op else spec.short)
    if step is not None:
        attrs[attr.STEP_ID] = step
    if identity is not None:
        attrs.update(identity.span_attributes)
        if identity.agent is not None and attr.GEN_AI_OPERATION_NAME not in attrs:
            attrs[attr.GEN_AI_OPERATION_NAME] = attr.GEN_AI_OP_EXECUTE_TOOL
            attrs[attr.GEN_AI_TOOL_NAME] = name
    parent = scope.run
    run_id = f"{_getrandbits(64):016x}"
    attrs[attr.RUN_ID] = run_id
    if parent is not None:
        attrs[attr.RUN_PARENT_ID] = parent.id
        chain_id = parent.chain_id
    else:
        chain_id = run_id
    attrs[attr.CHAIN_ID] = chain_id
    category = _classify(op_key, doctype, spec.forced)
    if category is not None:
        attrs[attr.AUDIT] = True
        attrs[attr.AUDIT_CATEGORY] = category
    else:
        attrs[attr.AUDIT] = False

    span = tracer.start_span(name, attributes=attrs)
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
    r._spec = spec
    r._sealed = None
    r._otel_token = otel_context.attach(trace.set_span_in_context(span))
    r._scope_token = SCOPE.set(_Scope(cell, step, r, identity, scope.turn))
    if flow is not None:
        flow._running.add(r)
        _flow_events.run_started(r, scope)  # flow event (issue 14)
    policy = settings.policy
    gate = settings.audit_gate
    if (
        policy is not None
        or refused is not None
        or (gate is not None and category == attr.CATEGORY_STATE_CHANGE)
    ):
        try:
            if refused is not None:
                raise refused
            if policy is not None:
                arguments = _lazy_arguments(spec, wrapped, instance, args, kwargs, bound)
                policy.enforce(identity, op, doctype, arguments)
            if gate is not None and category == attr.CATEGORY_STATE_CHANGE:
                seq = gate.intent(span)
                if seq is not None:
                    attrs[attr.AUDIT_INTENT_SEQ] = seq
        except BaseException as exc:
            _end(r, exc)
            raise
    if settings.audit_records and span.is_recording():
        r._sealed = {k: v for k, v in attrs.items() if k in SEALED_ATTRIBUTES}
    return r


def _reseal(r: Run) -> None:
    """Put back the start values of the sealed attributes and the name, if the body changed
    them on its span; called before the span ends, so the audit record is built from what
    coworker checked, not from what the body wrote."""
    sealed = r._sealed
    if sealed is None:
        return
    span: Any = r.span
    current = _attribute_dict(span)
    for key, want in sealed.items():
        have = current.get(key, _ABSENT)
        # Exact types: the body setting coworker.audit to 1 must not pass for True.
        if have is not want and (type(have) is not type(want) or have != want):
            span.set_attribute(key, want)
    if len(current) > len(sealed):
        for key in SEALED_ATTRIBUTES.intersection(current).difference(sealed):
            _drop_attribute(span, key)  # a sealed key the run did not start with
    if span.name != r.name:
        span.update_name(r.name)


def _attribute_dict(span: Any) -> Mapping[str, Any]:
    # The SDK's live span keeps a BoundedAttributes around a plain dict; reading that dict
    # costs a few dict lookups, where the public mapping copies under a lock and raises
    # KeyError (slowly) for each missing key. Read-only here, and only in the span's own run.
    inner = getattr(getattr(span, "_attributes", None), "_dict", None)
    return inner if type(inner) is dict else dict(span.attributes)


def _drop_attribute(span: Any, key: str) -> None:
    # The SDK has no public way to remove an attribute; its live span keeps a mutable
    # BoundedAttributes. Without it, the record is refused loudly rather than forged.
    attributes = getattr(span, "_attributes", None)
    try:
        del attributes[key]  # type: ignore[index]
    except Exception:
        _log.error("coworker: cannot remove %r that a run set on its own span", key)
        span.set_attribute(attr.AUDIT, True)
        span.set_attribute(key, "<forged by the run>")


def _lazy_arguments(
    spec: _Spec,
    wrapped: Any,
    instance: Any,
    args: tuple,
    kwargs: dict,
    bound: dict[str, Any] | None,
) -> Callable[[], Mapping[str, Any]]:
    """The policy's view of the call's arguments: bound once, and only if a condition asks."""
    cache = bound

    def arguments() -> Mapping[str, Any]:
        nonlocal cache
        if cache is None:
            cache = _bind(spec, wrapped, instance, args, kwargs)
        return cache

    return arguments


def _enforce_only(
    spec: _Spec, scope: _Scope, wrapped: Any, instance: Any, args: tuple, kwargs: dict
) -> None:
    """The no-SDK path: no span, but the policy still decides (ACL never depends on OTel)."""
    op, doctype = spec.operation, spec.doctype
    bound: dict[str, Any] | None = None
    if spec.attributes_fn is not None:
        bound = _bind(spec, wrapped, instance, args, kwargs)
        op, doctype, _ = _dynamic_attributes(
            spec, bound, {}, op, doctype, spec.span_name, scope.identity
        )

    arguments = _lazy_arguments(spec, wrapped, instance, args, kwargs, bound)
    SETTINGS.policy.enforce(scope.identity, op, doctype, arguments)


def _dynamic_attributes(
    spec: _Spec,
    bound: Mapping[str, Any],
    attrs: dict[str, Any],
    op: str | None,
    doctype: str | None,
    name: str,
    identity: Any = None,
) -> tuple[str | None, str | None, str]:
    """Apply what the ``attributes=`` callable returns for this call.

    While a policy or an audit trail is configured, the callable decides what they act on
    (the operation and doctype, hence the permission check and the audit classification), so
    any error in it refuses the run: :class:`~coworker.PermissionDenied` chained to the
    cause. Going ahead without them would fail open (an unchecked delete, a run that should
    be audited and is not). With neither, the callable only decorates a trace: its errors
    are logged and the run goes ahead.

    Raises:
        PermissionDenied: the callable raised, returned something other than a mapping, or
            a value no audit record can hold, while a policy or audit trail is configured.
    """
    assert spec.attributes_fn is not None
    try:
        # A read-only view: the same bound arguments are what the policy conditions check.
        extra = spec.attributes_fn(MappingProxyType(bound))
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(f"it returned a {type(extra).__name__}, not a mapping")
        derived: list[tuple[str, Any]] = []
        for key, value in (extra or {}).items():
            if value is None:
                continue  # e.g. an optional argument: no attribute rather than "None"
            key = text(key, "attribute name")
            if key in ("operation", attr.OPERATION, "doctype", attr.DOCTYPE):
                value = text(value if isinstance(value, str) else str(value), key)
            elif isinstance(value, str):
                value = _attribute_text(value, key)
            elif not isinstance(value, bool | int | float):
                value = _attribute_text(str(value), key)
            derived.append((key, value))
    except Exception as exc:
        settings = SETTINGS
        if settings.policy is None and not settings.audit_records:
            # Tracing only: the callable is the app's code, and a bug there must not break
            # the call it merely observes.
            _log.exception("coworker.run attributes callable of %r failed; ignored", spec.span_name)
            return op, doctype, name
        user = identity.user_id if identity is not None else None
        agent = identity.agent_id if identity is not None else None
        raise PermissionDenied(
            f"{spec.span_name}: refused because its attributes= callable failed "
            f"({type(exc).__name__}: {exc}); the policy and the audit trail cannot decide "
            "without what it derives",
            user=user,
            agent=agent,
            operation=op,
            doctype=doctype,
            rule="attributes= callable failed (fail closed)",
        ) from exc
    for key, value in derived:
        if key in ("operation", attr.OPERATION):
            op = value
            attrs[attr.OPERATION] = op
        elif key in ("doctype", attr.DOCTYPE):
            doctype = value
            attrs[attr.DOCTYPE] = doctype
        elif key in RESERVED_ATTRIBUTES:
            # Identity, flow, run and audit keys come from coworker's own context only: an
            # attributes callable is often fed by call arguments, which must not forge them.
            _log.warning(
                "coworker.run attributes of %r may not set %r; ignored", spec.span_name, key
            )
        else:
            attrs[key] = value
    if op and doctype and not spec.explicit_name:
        name = f"{op} {doctype}"
    return op, doctype, name


def _attribute_text(value: str, key: str) -> str:
    """An attribute's text value, exact ``str`` and UTF-8 (empty is allowed)."""
    return text(value, f"attribute {key!r}", None) if value else ""


def _discard(runs: list[Run], r: Run) -> bool:
    try:
        runs.remove(r)
    except ValueError:
        return False
    return True


def _end_detached(r: Run, exc: BaseException | None) -> None:
    """End a run's span without touching the context (which belongs to other runs now)."""
    if r.flow is not None:
        r.flow._last_active = time.monotonic()
        r.flow._running.discard(r)
    _reseal(r)
    if exc is not None and _is_failure(exc):
        _record_failure(r.span, exc)
    _flow_events.run_ended(r, exc)  # flow event (issue 14)
    r.span.end()


def _end(r: Run, exc: BaseException | None) -> None:
    if r.flow is not None:
        r.flow._last_active = time.monotonic()  # idle time counts from the end of a run
        r.flow._running.discard(r)
    span = r.span
    _reseal(r)
    if exc is not None and _is_failure(exc):
        _record_failure(span, exc)
    _restore(r._scope_token)
    otel_context.detach(r._otel_token)
    _flow_events.run_ended(r, exc)  # flow event (issue 14)
    # Ending may append an audit record; a failure there (AuditUnavailable) surfaces here.
    span.end()


class RunOptions(AsyncContextMixin):
    """The options of one ``coworker.run(...)`` call; a decorator and a context manager.

    Not created directly: see :func:`run`.
    """

    __slots__ = (
        "_open",
        "attributes",
        "capture_input",
        "capture_output",
        "doctype",
        "name",
        "operation",
        "spec",
        "state_changing",
        "step",
    )

    def __init__(
        self,
        name: str | None,
        operation: str | None,
        doctype: str | None,
        step: str | None,
        state_changing: bool | None,
        capture_input: bool,
        capture_output: bool,
        attributes: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]] | None,
    ) -> None:
        for label, value in (
            ("name", name),
            ("operation", operation),
            ("doctype", doctype),
            ("step", step),
        ):
            if value is not None:
                text(value, f"coworker.run {label}=")
        if (
            attributes is not None
            and not callable(attributes)
            and not isinstance(attributes, Mapping)
        ):
            raise TypeError("coworker.run attributes= must be a dict or a callable")
        if isinstance(attributes, Mapping):
            reserved = sorted(RESERVED_ATTRIBUTES.intersection(attributes))
            if reserved:
                raise ValueError(
                    f"coworker.run attributes= may not set {reserved}: identity, flow, run and "
                    "audit keys come from acting_as(), flow() and coworker itself"
                )
            # Checked here, at decoration: a value no audit record can hold fails at once.
            attributes = {
                text(k, "coworker.run attribute name"): (
                    _attribute_text(v, k) if isinstance(v, str) else v
                )
                for k, v in attributes.items()
            }
        self.name = None if name is None else str.__str__(name)
        self.operation = None if operation is None else str.__str__(operation)
        self.doctype = None if doctype is None else str.__str__(doctype)
        self.step = None if step is None else str.__str__(step)
        self.state_changing = state_changing
        self.capture_input = capture_input
        self.capture_output = capture_output
        self.attributes = attributes
        self.spec: _Spec | None = None
        self._open: list[Run] = []  # runs entered as a block and not exited yet

    def __call__(self, fn: F) -> F:
        return _decorate(fn, self)

    def _context_spec(self) -> _Spec:
        spec = self.spec
        if spec is None:
            spec = self.spec = _Spec(self, None, self.name or "run")
            spec.span_name = self.name or _span_name(self.operation, self.doctype, "run")
        return spec

    def __enter__(self) -> Run:
        r = _begin(self._context_spec(), None, None, (), {}, force=True)
        assert r is not None
        self._open.append(r)
        return r

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        r = SCOPE.get().run
        if r is not None and r._spec is self.spec and _discard(self._open, r):
            _end(r, exc)
            return
        # Exited out of order (blocks interleaved by hand, or across a generator's yield):
        # the context cannot be restored cleanly, but the run's span must still end, or its
        # audit record would never be written.
        mine = self._open.pop() if self._open else None
        _log.error(
            "coworker.run block %r exited out of order; %s",
            self.spec.span_name if self.spec else self.name,
            "its span is ended, the context left as it is" if mine else "no open run of it",
        )
        if mine is not None:
            _end_detached(mine, exc)


def _qualname(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str):
        return name
    if isinstance(fn, functools.partial):
        return _qualname(fn.func)
    return type(fn).__qualname__


def _decorate(fn: Any, options: RunOptions) -> Any:
    target = fn.__func__ if isinstance(fn, classmethod | staticmethod) else fn
    if not callable(target):
        raise TypeError(f"coworker.run can only decorate callables, got {type(fn).__name__}")
    spec = _Spec(options, target, _qualname(target))
    probe = target
    if not (
        inspect.isfunction(target)
        or inspect.ismethod(target)
        or isinstance(target, functools.partial)
    ) and callable(type(target)):
        probe = type(target).__call__
    if inspect.isasyncgenfunction(probe):
        return _agen_wrapper(spec)(fn)
    if inspect.iscoroutinefunction(probe):
        return _async_wrapper(spec)(fn)
    if inspect.isgeneratorfunction(probe):
        return _gen_wrapper(spec)(fn)
    return _sync_wrapper(spec)(fn)


class _BoundWrapper(wrapt.BoundFunctionWrapper):  # type: ignore[misc]
    """wrapt's bound wrapper (``obj.method``) that never hands out the undecorated function.

    * ``__func__`` is the decorated function, not the original: code that rebinds methods
      (``types.MethodType(obj.m.__func__, other)``) keeps the policy check and the audit.
    * It pickles like a bound method, as ``getattr(obj, name)`` (so ``pool.submit(obj.m)``
      works), with ``name`` the attribute under which the class holds the decorated function.
    """

    @property
    def __func__(self) -> Any:
        return self._self_parent

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any, ...]]:
        owner = self._self_instance
        if owner is None:  # Class.method: the function itself
            return self._self_parent.__reduce_ex__(protocol)
        classes = owner.__mro__ if isinstance(owner, type) else type(owner).__mro__
        for cls in classes:
            for key, value in vars(cls).items():
                if _holds(value, self._self_parent):
                    return getattr, (owner, key)
        raise pickle.PicklingError(
            f"cannot pickle {self._self_parent.__qualname__!r} bound to {owner!r}: its class "
            "does not hold this coworker.run function under any name"
        )


class _Wrapper(wrapt.FunctionWrapper):  # type: ignore[misc]
    """wrapt's transparent proxy, plus pickling by reference like a plain function (so a
    decorated module-level function can still go to a ProcessPoolExecutor).

    A plain function pickles by its ``__qualname__``; for a decorated one that name may lead
    to the *undecorated* original (``audited = coworker.run(...)(raw)`` keeps ``raw``'s
    qualname), which would silently drop the policy and the audit in the child process. So
    the wrapper pickles by the name under which its module (or class) really holds *this*
    wrapper, and unpickling checks that it gets a coworker wrapper back.
    """

    __bound_function_wrapper__ = _BoundWrapper

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[str, str]]:
        return _import_wrapper, (self.__module__, _binding_name(self))

    def __copy__(self) -> _Wrapper:
        return self  # functions copy as themselves

    def __deepcopy__(self, memo: Any) -> _Wrapper:
        return self


def _holds(value: Any, wrapper: Any) -> bool:
    """``value`` is ``wrapper``, or a classmethod/staticmethod around it (exact types: a
    wrapt proxy passes ``isinstance`` checks for what it wraps)."""
    return value is wrapper or (
        type(value) in (classmethod, staticmethod) and value.__func__ is wrapper
    )


def _binding_name(wrapper: _Wrapper) -> str:
    """The dotted name under which ``wrapper``'s module holds exactly this wrapper."""
    module = sys.modules.get(wrapper.__module__)
    qualname = wrapper.__qualname__
    parent_path, _, leaf = qualname.rpartition(".")
    holder: Any = module
    if module is not None and parent_path and "<locals>" not in parent_path:
        for part in parent_path.split("."):
            holder = getattr(holder, part, None)
    candidates = [leaf] if holder is not None else []
    if holder is not None:
        candidates += [k for k in vars(holder) if k != leaf]
    for key in candidates:
        if _holds(vars(holder).get(key), wrapper):
            return f"{parent_path}.{key}" if holder is not module else key
    raise pickle.PicklingError(
        f"cannot pickle the coworker.run function {wrapper.__module__}.{qualname}: "
        "its module does not hold this decorated function under any name (pickling it by its "
        "qualified name would unpickle the undecorated original, without policy and audit)"
    )


def _import_wrapper(module: str, name: str) -> Any:
    """Unpickle a decorated function; refuse anything that is not a coworker wrapper."""
    obj = _import_by_name(module, name)
    if not isinstance(obj, _Wrapper | _BoundWrapper):
        raise pickle.UnpicklingError(
            f"{module}.{name} is not a coworker.run function in this process (a "
            f"{type(obj).__name__}); refusing to unpickle it without its policy and audit"
        )
    return obj


def _import_by_name(module: str, qualname: str) -> Any:
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _sync_wrapper(spec: _Spec) -> Callable[[Any], Any]:
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        r = _begin(spec, wrapped, instance, args, kwargs)
        if r is None:
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            _end(r, exc)
            raise
        if spec.capture_output:
            r.set_output(result)
        _end(r, None)
        return result

    return lambda fn: _Wrapper(fn, wrapper)


def _async_wrapper(spec: _Spec) -> Callable[[Any], Any]:
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        # Wrong arguments raise TypeError here, at the call site, as they always did; the
        # original's coroutine is created only when awaited, so a coroutine that is closed or
        # cancelled before it starts leaves no "never awaited" warning behind.
        _check_arguments(spec, wrapped, instance, args, kwargs)
        return _run_coroutine(spec, wrapped, instance, args, kwargs)

    # wrapt proxies __code__, so inspect.iscoroutinefunction() is still True.
    return lambda fn: _Wrapper(fn, wrapper)


def _check_arguments(spec: _Spec, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> None:
    if spec.target is None:
        return
    if spec.sig is None:
        _bind(spec, wrapped, instance, args, kwargs)  # builds the binders
    bound_now = not spec.prebound and instance is not None
    binder = spec.sig_bound if bound_now else spec.sig
    if binder is not None:
        try:
            binder.bind(args, kwargs)
        except TypeError as exc:
            raise TypeError(f"{spec.span_name}() {exc}") from None


async def _run_coroutine(
    spec: _Spec, wrapped: Any, instance: Any, args: tuple, kwargs: dict
) -> Any:
    r = _begin(spec, wrapped, instance, args, kwargs)
    if r is None:
        return await wrapped(*args, **kwargs)
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as exc:
        _end(r, exc)
        raise
    if spec.capture_output:
        r.set_output(result)
    _end(r, None)
    return result


def _gen_wrapper(spec: _Spec) -> Callable[[Any], Any]:
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        # Calling the original creates the generator (argument errors raise here, as before);
        # its body, the policy check and the span wait for the first next().
        gen = wrapped(*args, **kwargs)
        return _GeneratorRun(gen, spec, wrapped, instance, args, kwargs)

    return lambda fn: _Wrapper(fn, wrapper)


def _agen_wrapper(spec: _Spec) -> Callable[[Any], Any]:
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        agen = wrapped(*args, **kwargs)
        return _AsyncGeneratorRun(agen, spec, wrapped, instance, args, kwargs)

    return lambda fn: _Wrapper(fn, wrapper)


def _forward(inner: str, name: str) -> property:
    """A read-only property that reads ``name`` of the wrapped original (``gi_frame``...)."""
    return property(lambda self: getattr(getattr(self, inner), name), doc=f"The original's {name}.")


class _StepRunner:
    """Shared by both generator kinds: the generator's own view of coworker's context.

    A plain generator runs in its consumer's context. The proxy keeps that (the
    application's own ContextVars are shared as before) except for two variables, coworker's
    scope and the OTel current context: those start as they were at the call site and carry
    the run's span while the body runs, and are swapped back to the consumer's values after
    every step. So the span is current exactly while the body runs.
    """

    __slots__ = (
        "__weakref__",
        "_call",
        "_done",
        "_orig",
        "_otel_state",
        "_run",
        "_scope_state",
        "_spec",
        "_started",
    )

    def __init__(
        self, orig: Any, spec: _Spec, wrapped: Any, instance: Any, args: tuple, kwargs: dict
    ) -> None:
        self._orig = orig  # the original generator or async generator
        self._spec = spec
        self._call = (wrapped, instance, args, kwargs)
        self._scope_state = SCOPE.get()
        self._otel_state = otel_context.get_current()
        self._run: Run | None = None
        self._done = False
        self._started = False

    def _swap_in(self) -> tuple[Any, Any]:
        return SCOPE.set(self._scope_state), otel_context.attach(self._otel_state)

    def _swap_out(self, tokens: tuple[Any, Any]) -> None:
        self._scope_state = SCOPE.get()
        self._otel_state = otel_context.get_current()
        otel_context.detach(tokens[1])
        _restore(tokens[0])

    def _step(self, method: Callable[..., Any], *arg: Any) -> Any:
        """Run one step of the original inside the generator's context view."""
        tokens = self._swap_in()
        try:
            if not self._started:
                self._started = True
                wrapped, instance, args, kwargs = self._call
                try:
                    self._run = _begin(self._spec, wrapped, instance, args, kwargs)
                    if self._run is not None:
                        _SUSPENDED.add(self)
                except BaseException:
                    self._done = True  # refused (policy, fail-closed): the body never runs
                    self._close_unstarted()
                    raise
            return method(*arg)
        finally:
            self._swap_out(tokens)

    def _close_unstarted(self) -> None:
        raise NotImplementedError

    def _finish(self, exc: BaseException | None) -> None:
        """End the run's span (once). The context is handled by the steps, not here."""
        if self._done:
            return
        self._done = True
        _SUSPENDED.discard(self)
        r = self._run
        if r is not None:
            if r.flow is not None:
                r.flow._last_active = time.monotonic()
                r.flow._running.discard(r)
            _reseal(r)
            if (
                exc is not None
                and not isinstance(exc, StopIteration | StopAsyncIteration)
                and _is_failure(exc)
            ):
                _record_failure(r.span, exc)
            _flow_events.run_ended(r, exc)  # flow event (issue 14)
            r.span.end()


_SUSPENDED: Final[weakref.WeakSet[_StepRunner]] = weakref.WeakSet()
"""Generator runs whose body has started and not finished (their span is open)."""


def finish_abandoned() -> int:
    """End the span of every started, unfinished decorated generator, as a failure.

    Called at interpreter exit, before the audit trail is flushed and closed: a generator
    that ran part of its body (and may have changed state) and was never exhausted or
    closed would otherwise end its span only when collected, after the audit store is gone,
    and its record would be lost. Its record says ``RuntimeError`` (abandoned).

    Returns:
        How many runs were ended.
    """
    ended = 0
    for runner in list(_SUSPENDED):
        orig = runner._orig
        if getattr(orig, "gi_running", False) or getattr(orig, "ag_running", False):
            continue  # executing right now (another thread): it will end its own span
        runner._finish(RuntimeError("generator abandoned: never finished before exit"))
        ended += 1
    return ended


class _GeneratorRun(_StepRunner, Generator[Any, Any, Any]):
    """A generator proxy whose span covers exactly the original's body."""

    __slots__ = ()

    def _close_unstarted(self) -> None:
        self._orig.close()

    def _advance(self, method: Callable[..., Any], *arg: Any) -> Any:
        if self._orig.gi_running:
            # Re-entered from its own body: what a plain generator says, before touching
            # any context (the running step owns it).
            raise ValueError("generator already executing")
        try:
            return self._step(method, *arg)
        except BaseException as exc:
            self._finish(exc)
            raise

    def __next__(self) -> Any:
        return self._advance(self._orig.send, None)

    def send(self, value: Any) -> Any:
        if value is not None and not self._started:
            # As Python says for a plain generator; it stays unstarted and usable.
            raise TypeError("can't send non-None value to a just-started generator")
        return self._advance(self._orig.send, value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._advance(self._orig.throw, typ)
        return self._advance(self._orig.throw, typ, val, tb)

    def close(self) -> None:
        if self._orig.gi_running:
            raise ValueError("generator already executing")
        if self._done or not self._started:
            # Finished, refused, or never started (the body never ran): no span to end.
            self._done = True
            self._orig.close()
            return
        try:
            self._step(self._orig.close)
        except BaseException as exc:
            self._finish(exc)
            raise
        self._finish(None)

    def __del__(self) -> None:
        if not self._done and self._run is not None:
            try:
                self.close()
            except BaseException:
                _log.debug("closing an abandoned generator raised", exc_info=True)

    def __iter__(self) -> _GeneratorRun:
        return self

    gi_frame = _forward("_orig", "gi_frame")
    gi_running = _forward("_orig", "gi_running")
    gi_suspended = _forward("_orig", "gi_suspended")
    gi_code = _forward("_orig", "gi_code")
    gi_yieldfrom = _forward("_orig", "gi_yieldfrom")

    def __repr__(self) -> str:
        return f"<coworker.run generator {self._spec.span_name!r} wrapping {self._orig!r}>"


class _AsyncGeneratorRun(_StepRunner, AsyncGenerator[Any, Any]):
    """An async generator proxy; each step of the original is driven inside the
    generator's context view, so the span is current only while the body runs."""

    __slots__ = ()

    def _close_unstarted(self) -> None:
        # A never-started async generator closes without running anything.
        closer = self._orig.aclose()
        try:
            closer.send(None)
        except StopIteration:
            pass
        finally:
            closer.close()

    def __aiter__(self) -> _AsyncGeneratorRun:
        return self

    def __anext__(self) -> Any:
        return _Drive(self, self._orig.asend, (None,))

    def asend(self, value: Any) -> Any:
        return _Drive(self, self._orig.asend, (value,))

    def athrow(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        arg = (typ,) if val is None and tb is None else (typ, val, tb)
        return _Drive(self, self._orig.athrow, arg)

    async def aclose(self) -> None:
        if self._done or not self._started:
            self._done = True
            await self._orig.aclose()
            return
        await _Drive(self, self._orig.aclose, (), closing=True)

    def __del__(self) -> None:
        if not self._done and self._run is not None:
            # Cannot await aclose() here; the event loop's asyncgen hooks finalize the
            # original. End the span so it is not lost.
            self._finish(None)

    ag_frame = _forward("_orig", "ag_frame")
    ag_running = _forward("_orig", "ag_running")
    ag_code = _forward("_orig", "ag_code")
    ag_await = _forward("_orig", "ag_await")

    def __repr__(self) -> str:
        return f"<coworker.run async generator {self._spec.span_name!r} wrapping {self._orig!r}>"


class _Drive:
    """An awaitable that steps one ``asend``/``athrow``/``aclose`` coroutine of the original
    inside the generator's context view, handing every yielded future to the event loop."""

    __slots__ = ("_args", "_closing", "_method", "_owner")

    def __init__(
        self,
        owner: _AsyncGeneratorRun,
        method: Callable[..., Any],
        args: tuple,
        closing: bool = False,
    ) -> None:
        self._owner = owner
        self._method = method
        self._args = args
        self._closing = closing

    def __await__(self) -> Generator[Any, Any, Any]:
        owner = self._owner
        if owner._orig.ag_running:
            # Another task is inside this generator: Python's own error, and the owner's
            # span is left alone.
            raise RuntimeError("anext(): asynchronous generator is already running")
        if not owner._started and self._method == owner._orig.asend and self._args[0] is not None:
            raise TypeError("can't send non-None value to a just-started async generator")
        coro: Any = None
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                if coro is None:
                    coro = owner._step(self._method, *self._args)
                    yielded = owner._step(coro.send, None)
                elif error is not None:
                    yielded = owner._step(coro.throw, error)
                else:
                    yielded = owner._step(coro.send, send)
            except StopIteration as stop:
                if self._closing:
                    owner._finish(None)
                return stop.value
            except BaseException as exc:
                owner._finish(exc)
                raise
            try:
                send = yield yielded
                error = None
            except BaseException as exc:
                error = exc
                send = None


@overload
def run(target: F, /) -> F: ...


@overload
def run(
    target: str | None = None,
    /,
    *,
    name: str | None = None,
    operation: str | None = None,
    doctype: str | None = None,
    step: str | None = None,
    state_changing: bool | None = None,
    capture_input: bool = False,
    capture_output: bool = False,
    attributes: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    usage: Callable[[Any], Any] | None = None,  # usage (issue 16)
) -> RunOptions: ...


def run(
    target: Any = None,
    /,
    *,
    name: str | None = None,
    operation: str | None = None,
    doctype: str | None = None,
    step: str | None = None,
    state_changing: bool | None = None,
    capture_input: bool = False,
    capture_output: bool = False,
    attributes: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    usage: Callable[[Any], Any] | None = None,  # usage (issue 16)
) -> Any:
    """Turn calls of a function into spans that carry flow, step, run, user and agent.

    Three forms::

        @coworker.run
        def f(): ...

        @coworker.run(operation="update", doctype="Invoice")
        def update_invoice(invoice_id, amount): ...

        with coworker.run("import batch", operation="import", doctype="Invoice") as r:
            ...

    Works on functions, coroutines, generators, async generators, methods, classmethods,
    staticmethods, ``functools.partial`` objects and other callables, and leaves their
    signature, names, docstring, arguments, return values and exceptions untouched.

    Args:
        target: the callable (bare ``@coworker.run``) or the span name (``run("name")``).
        name: span name; default ``"{operation} {doctype}"`` when both are given, else the
            callable's qualified name.
        operation: what the run does (``create``, ``update``, ``select``, ...); decides the
            audit classification together with ``doctype``.
        doctype: the kind of record it acts on (``Invoice``).
        step: the ``step.id`` of this run (shorthand for ``with coworker.step(...)``).
        state_changing: ``True`` forces the run into the audit trail as a state change;
            ``False`` keeps it out even if its operation is state-changing.
        capture_input: record the bound arguments (redacted, size-limited) as
            ``coworker.input``.
        capture_output: record the return value as ``coworker.output``.
        attributes: extra span attributes: a dict, or a callable receiving the call's bound
            arguments by name and returning a dict (keys ``operation`` / ``doctype`` set
            those of the run).
        usage: an extractor of token usage from the return value, recorded in the run
            (:func:`coworker.usage.openai_usage`, ``anthropic_usage``, ``auto_usage``, or
            any callable returning a :class:`coworker.usage.Usage`, a dict or ``None``).

    Returns:
        The wrapped callable, or an object usable as decorator and (async) context manager.

    Raises:
        coworker.PermissionDenied: at call time, when the configured policy refuses the run.
        coworker.AuditUnavailable: at call time, in fail-closed mode, when the intent record
            of a state-changing run cannot be written (the function does not run).
    """
    if target is not None and not isinstance(target, str):
        options = RunOptions(
            name,
            operation,
            doctype,
            step,
            state_changing,
            capture_input,
            capture_output,
            attributes,
        )
        return _decorate(target, options)
    if target is not None:
        if name is not None:
            raise TypeError("coworker.run got the span name twice (positional and name=)")
        name = target
    options = RunOptions(
        name, operation, doctype, step, state_changing, capture_input, capture_output, attributes
    )
    if usage is not None:  # usage (issue 16): the run's body records extractor(result)
        from coworker.usage import with_usage

        return with_usage(options, usage)
    return options
