"""Carrying flow, step, run and identity into threads and other processes.

* asyncio tasks copy the context by themselves: nothing to do.
* Threads and thread pools: :func:`propagate` wraps a callable so that it runs in a copy of
  the caller's context (``pool.submit(coworker.propagate(fn), x)``).
* Processes: :func:`inject` writes W3C ``traceparent`` and ``baggage`` headers into a carrier;
  :func:`extract` turns them back into a context manager on the other side. Identity that
  arrives in baggage is caller-controlled, so it is ignored unless trusted by configuration.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import Callable, MutableMapping
from types import TracebackType
from typing import Any, TypeVar

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from coworker import attributes as attr
from coworker._scope import SCOPE, AsyncContextMixin, Scope, restore
from coworker._state import SETTINGS
from coworker.flow import Flow, FlowCell
from coworker.identity import Agent, Identity, User

__all__ = ["extract", "inject", "propagate"]

_log = logging.getLogger(__name__)
_TRACE = TraceContextTextMapPropagator()
_BAGGAGE = W3CBaggagePropagator()

T = TypeVar("T")

_FLOW_KEYS = (
    attr.FLOW_TYPE,
    attr.FLOW_ID,
    attr.FLOW_DEFINITION_ID,
    attr.FLOW_PREVIOUS_ID,
    attr.FLOW_BREAK_REASON,
    attr.CONVERSATION_ID,
)
_IDENTITY_KEYS = (attr.USER_ID, attr.AGENT_ID, attr.AGENT_NAME, attr.SESSION_ID)


def propagate(fn: Callable[..., T]) -> Callable[..., T]:
    """Return ``fn`` bound to a copy of the current context (flow, step, identity, span).

    Use it to hand work to threads: ``executor.submit(coworker.propagate(work), item)``.
    Each call runs in its own copy, so the wrapper may be called concurrently. For a
    coroutine function the returned coroutine runs in that copy too (as an asyncio task with
    ``context=``), so ``asyncio.run(coworker.propagate(handler)(x))`` in a thread keeps it.
    """
    ctx = contextvars.copy_context()

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def bound_async(*args: Any, **kwargs: Any) -> Any:
            import asyncio

            coro = fn(*args, **kwargs)
            return await asyncio.get_running_loop().create_task(coro, context=ctx.copy())

        return bound_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def bound(*args: Any, **kwargs: Any) -> T:
        return ctx.copy().run(fn, *args, **kwargs)

    return bound


def inject(carrier: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Write the current trace context and coworker context into ``carrier`` (e.g. headers).

    Adds ``traceparent`` (W3C Trace Context) and ``baggage`` entries
    ``coworker.flow.id``, ``coworker.step.id``, ``coworker.user.id``, ... next to the
    application's own baggage.

    Returns:
        The same carrier.
    """
    scope = SCOPE.get()
    ctx = otel_context.get_current()
    entries: dict[str, str] = {}
    if scope.cell is not None:
        for key, value in scope.cell.flow.span_attributes.items():
            if key in _FLOW_KEYS:
                entries[key] = str(value)
    if scope.step is not None:
        entries[attr.STEP_ID] = scope.step
    if scope.run is not None:
        entries[attr.RUN_ID] = scope.run.id
        entries[attr.CHAIN_ID] = scope.run.chain_id
    if scope.identity is not None:
        entries.update(scope.identity.span_attributes)
    for key, value in entries.items():
        ctx = otel_baggage.set_baggage(attr.BAGGAGE_PREFIX + key, value, ctx)
    _TRACE.inject(carrier, context=ctx)
    _BAGGAGE.inject(carrier, context=ctx)
    return carrier


class _RemoteParent:
    """Stands in for the caller's run on the receiving side (its id and chain id)."""

    __slots__ = ("chain_id", "id")
    _spec = None

    def __init__(self, run_id: str, chain_id: str) -> None:
        self.id = run_id
        self.chain_id = chain_id


class Extracted(AsyncContextMixin):
    """A context manager that continues a trace and flow received from another process."""

    __slots__ = ("_otel_ctx", "_otel_token", "_scope", "_scope_token", "identity_claimed")

    def __init__(
        self, otel_ctx: otel_context.Context, scope: Scope, identity_claimed: Identity | None
    ) -> None:
        self._otel_ctx = otel_ctx
        self._scope = scope
        self.identity_claimed = identity_claimed
        """The identity the baggage claimed, trusted or not (for logging, never for ACL)."""

    @property
    def flow(self) -> Flow | None:
        """The continued flow, if the carrier had one."""
        return self._scope.cell.flow if self._scope.cell is not None else None

    def __enter__(self) -> Extracted:
        self._otel_token = otel_context.attach(self._otel_ctx)
        self._scope_token = SCOPE.set(self._scope)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        restore(self._scope_token)
        otel_context.detach(self._otel_token)


def _text_headers(carrier: Any) -> dict[str, Any]:
    # ASGI scopes and Kafka give bytes; the W3C propagators expect str keys and str (or, in
    # OTel's own carrier format, list of str) values.
    def text(v: Any) -> Any:
        return bytes(v).decode("latin-1") if isinstance(v, bytes | bytearray) else v

    out: dict[str, Any] = {}
    items = carrier.items() if hasattr(carrier, "items") else carrier
    for key, value in items:
        key = text(key)
        if not isinstance(key, str):
            continue
        if isinstance(value, list | tuple):
            values = [text(v) for v in value]
            if all(isinstance(v, str) for v in values):
                out[key.lower()] = values
        else:
            value = text(value)
            if isinstance(value, str):
                out[key.lower()] = value
    return out


def _parent_context(headers: dict[str, Any], current: otel_context.Context) -> otel_context.Context:
    """``current`` with the span the extracted runs nest under (see :func:`extract`)."""
    local = trace.get_current_span(current)
    here = local.get_span_context()
    if here.is_valid and not here.is_remote:
        carried = trace.get_current_span(_TRACE.extract(headers)).get_span_context()
        if carried.is_valid and carried.trace_id != here.trace_id:
            # Not a parent (this process's span already has one, or chose to start a trace):
            # a link keeps the way back to the caller, as for a message consumer.
            local.add_link(carried)
        return current
    # A missing or malformed traceparent leaves ``current`` as it is.
    return _TRACE.extract(headers, context=current)


def extract(
    carrier: MutableMapping[str, str] | dict[str, str], *, trust_identity: bool | None = None
) -> Extracted:
    """Read what :func:`inject` wrote; use the result as a (sync or async) context manager.

    Runs inside continue the caller's flow and step, record the caller's run as their parent
    (``coworker.run.parent_id``) and continue its trace. The caller's identity is applied
    only when ``trust_identity`` (default: ``configure(trust_baggage_identity=...)``) is true;
    otherwise the receiving side must set it with :func:`coworker.acting_as` from its own
    authentication.

    Which span the runs nest under (docs/observability.md, "Inside a web framework"):

    * a span of this process is current (the server span of an instrumented web framework,
      which already continues the request's ``traceparent`` or started the request's trace
      when there was none): that span stays the parent, and ``extract`` only adds what the
      baggage carries. If the carrier names another trace than that span's (a message whose
      headers travelled in its body, or a server that does not trust incoming trace context),
      the local span still wins, and gets a span link to the carrier's span;
    * no span, or only a remote one (an enclosing ``extract``), is current: the carrier's
      ``traceparent`` becomes the parent; without one the runs keep the current context.

    The rest of the current OpenTelemetry context (the application's own baggage,
    instrumentation flags) is kept; the carrier's baggage is added to it.

    Args:
        carrier: the headers (or any str→str mapping) from the other process.
        trust_identity: accept ``user.id`` / agent from baggage.
    """
    current = otel_context.get_current()
    try:
        headers = _text_headers(carrier)
        ctx = _parent_context(headers, current)
        ctx = _BAGGAGE.extract(headers, context=ctx)
        # coworker's entries come from this carrier only, not from baggage already current.
        carried = otel_baggage.get_all(_BAGGAGE.extract(headers))
    except Exception as exc:  # headers come from outside: never break the request on them
        _log.warning("coworker.extract: ignoring unreadable propagation headers: %r", exc)
        return Extracted(current, SCOPE.get(), None)
    values = {
        key[len(attr.BAGGAGE_PREFIX) :]: str(value)
        for key, value in carried.items()
        if key.startswith(attr.BAGGAGE_PREFIX)
    }
    cell = None
    flow_type, flow_id = values.get(attr.FLOW_TYPE), values.get(attr.FLOW_ID)
    if flow_type and flow_id:
        try:
            remote = Flow(
                flow_type,
                flow_id,
                previous_id=values.get(attr.FLOW_PREVIOUS_ID),
                break_reason=values.get(attr.FLOW_BREAK_REASON),
                conversation_id=values.get(attr.CONVERSATION_ID),
            )
            cell = FlowCell(remote)
        except ValueError:
            _log.warning("coworker.extract: ignoring a malformed flow in baggage: %r", flow_type)
    parent = None
    if values.get(attr.RUN_ID):
        parent = _RemoteParent(
            values[attr.RUN_ID], values.get(attr.CHAIN_ID) or values[attr.RUN_ID]
        )
    claimed = None
    if values.get(attr.USER_ID) or values.get(attr.AGENT_ID):
        try:
            claimed = Identity(
                User(values[attr.USER_ID]) if values.get(attr.USER_ID) else None,
                Agent(values[attr.AGENT_ID], values.get(attr.AGENT_NAME))
                if values.get(attr.AGENT_ID)
                else None,
                values.get(attr.SESSION_ID),
            )
        except ValueError:
            claimed = None
    trusted = SETTINGS.trust_baggage_identity if trust_identity is None else trust_identity
    scope_now = SCOPE.get()
    identity = claimed if trusted and claimed is not None else scope_now.identity
    scope = Scope(
        cell or scope_now.cell,
        values.get(attr.STEP_ID) or scope_now.step,
        parent or scope_now.run,
        identity,
        None,
        [None],
    )
    return Extracted(ctx, scope, claimed)
