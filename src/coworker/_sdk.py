"""The parts of coworker that need the OpenTelemetry SDK; imported only by ``configure``.

* :class:`PrivateRandomIdGenerator`: span/trace ids from a private RNG (the SDK's default
  draws from the global ``random`` state, so a seeded program would change once traced).
* :class:`CoworkerProcessor`: the one span processor coworker adds to a provider. The
  processors that ``configure`` sets up live inside it, so that a later ``configure`` can
  replace them without touching the application's own processors.
* :class:`AuditSampler`: wraps the provider's sampler on coworker's own tracer only, so that
  a sampled-out run is still *recorded* (``RECORD_ONLY``) while an audit trail is configured:
  the audit processor writes its record, and the SDK's export processors, which skip spans
  without the sampled flag, still export exactly what the configured sampler chose.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import INVALID_SPAN_ID, INVALID_TRACE_ID, Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from coworker._ids import getrandbits as _getrandbits
from coworker._state import SETTINGS
from coworker.attributes import RUN_ID as _RUN_ID

__all__ = ["AuditSampler", "CoworkerProcessor", "PrivateRandomIdGenerator", "wrap_sampler"]

_log = logging.getLogger(__name__)


class PrivateRandomIdGenerator(RandomIdGenerator):
    """Random ids from coworker's private ``random.Random`` (reseeded after fork)."""

    def generate_span_id(self) -> int:
        span_id = _getrandbits(64)
        while span_id == INVALID_SPAN_ID:
            span_id = _getrandbits(64)
        return span_id

    def generate_trace_id(self) -> int:
        trace_id = _getrandbits(128)
        while trace_id == INVALID_TRACE_ID:
            trace_id = _getrandbits(128)
        return trace_id


class CoworkerProcessor(SpanProcessor):
    """A composite processor whose members ``configure`` replaces atomically.

    Members are called in order; ``on_end`` lets an exception of a member (the audit
    processor's ``AuditUnavailable`` under the ``raise`` policy) propagate after the other
    members have seen the span.
    """

    def __init__(self) -> None:
        self._members: tuple[SpanProcessor, ...] = ()
        self._lock = threading.Lock()

    @property
    def members(self) -> tuple[SpanProcessor, ...]:
        """The current member processors."""
        return self._members

    def replace(self, members: Sequence[SpanProcessor]) -> tuple[SpanProcessor, ...]:
        """Install ``members``; return the previous ones (the caller shuts them down)."""
        with self._lock:
            old, self._members = self._members, tuple(members)
        return old

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        for member in self._members:
            member.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        error: BaseException | None = None
        for member in self._members:
            try:
                member.on_end(span)
            except BaseException as exc:  # keep feeding the others, then surface it
                error = error or exc
        if error is not None:
            raise error

    def shutdown(self) -> None:
        """Shut every member down, even when one raises; then raise the first error."""
        error: BaseException | None = None
        for member in self.replace(()):
            try:
                member.shutdown()
            except BaseException as exc:  # the others still get shut down (and flushed)
                error = error or exc
        if error is not None:
            raise error

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush every member against one shared deadline; True only if all succeeded.

        Unlike stopping at the first ``False``, a member that fails or times out never keeps
        the later ones (the audit processor among them) from being flushed; each member gets
        what is left of the one deadline, as ``SynchronousMultiSpanProcessor`` does.
        """
        deadline = time.monotonic_ns() + timeout_millis * 1_000_000
        ok = True
        for member in self._members:
            remaining_ms = max(0, (deadline - time.monotonic_ns()) // 1_000_000)
            try:
                ok = member.force_flush(int(remaining_ms)) and ok
            except Exception:
                _log.exception("force_flush of %r failed", member)
                ok = False
        return ok


class AuditSampler(Sampler):
    """The provider's sampler, except that coworker's runs are never dropped while an audit
    trail is configured: a ``DROP`` becomes ``RECORD_ONLY``.

    A recorded but unsampled span is a real SDK span: processors see it, so the audit
    processor writes its record (with its trace id), while the SDK's ``BatchSpanProcessor``
    and ``SimpleSpanProcessor`` skip it because its sampled flag is off. The operational
    trail, and the ``traceparent`` that goes downstream, stay exactly as the configured
    sampler decided. Every run counts, not only the ones marked ``coworker.audited`` at start:
    a denial or a ``ValidationError`` makes a run audited only when it ends. Flow, step and
    turn spans (no ``coworker.run.id``) keep the delegate's decision: they are never audit
    records, and a dropped one still gives its runs a valid parent (trace id and span id), so
    their records name the trace.

    Installed only on coworker's own tracer (:func:`wrap_sampler`); the application's other
    tracers keep the provider's sampler untouched.

    Args:
        delegate: the sampler the provider was configured with.
    """

    def __init__(self, delegate: Sampler) -> None:
        self.delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """The delegate's decision, raised from ``DROP`` to ``RECORD_ONLY`` when audited."""
        result = self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if (
            result.decision is Decision.DROP
            and SETTINGS.audit_records
            and attributes is not None
            and _RUN_ID in attributes
        ):
            # Runs only: a flow, step or turn span is no audit record (flow events are), so
            # the sampler's DROP stands for it; its runs below are still recorded.
            # The SDK builds a recording span from the result's attributes, and a DROP result
            # carries none: hand the run's own attributes back.
            return SamplingResult(Decision.RECORD_ONLY, attributes, result.trace_state)
        return result

    def get_description(self) -> str:
        """Names the delegate, as the SDK's composite samplers do."""
        return f"CoworkerAudit{{{self.delegate.get_description()}}}"


def wrap_sampler(tracer: object) -> None:
    """Give coworker's SDK tracer an :class:`AuditSampler` around its sampler (once)."""
    sampler = getattr(tracer, "sampler", None)
    if isinstance(sampler, Sampler) and not isinstance(sampler, AuditSampler):
        tracer.sampler = AuditSampler(sampler)  # type: ignore[attr-defined]
