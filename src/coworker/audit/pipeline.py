"""What ``coworker.configure(audit=...)`` installs: the synchronous audit span processor, the
fail-closed gate, and the store they share.

* :class:`AuditSpanProcessor` writes each audit span's record in ``on_end``, before
  ``span.end()`` returns, so a state-changing call's record is durable when the call returns.
  Unlike the SDK's ``BatchSpanProcessor`` it has no queue to overflow: concurrent callers are
  batched by group commit (:class:`~coworker.audit.writer.AuditWriter`) and wait for it.
* :class:`AuditGate` is ``SETTINGS.audit_gate`` in fail-closed mode: the decorator calls
  :meth:`AuditGate.intent` before a state-changing body runs; it appends an *intent* record or
  raises :class:`~coworker.AuditUnavailable`, and then the body never runs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from coworker import attributes as attr
from coworker._flow_events import write_with_events
from coworker.audit.exporter import AuditSpanExporter, is_audit_span
from coworker.audit.record import entry_from_span, intent_from_span
from coworker.audit.store import AuditStore
from coworker.audit.writer import ON_FAILURE_RAISE
from coworker.exceptions import AuditUnavailable

__all__ = [
    "AuditGate",
    "AuditPipeline",
    "AuditSpanProcessor",
    "active_pipeline",
    "build_pipeline",
]

_log = logging.getLogger("coworker.audit")

_active: AuditPipeline | None = None
_active_lock = threading.Lock()


class AuditSpanProcessor(SpanProcessor):
    """Write the record of every ended audit span synchronously, through an exporter.

    With the ``"raise"`` policy :class:`~coworker.AuditUnavailable` propagates out of
    ``span.end()``; add this processor *after* the operational (OTLP) processor so that the
    span still reaches the operational trail when the audit write fails.

    Args:
        exporter: the exporter (and through it the writer and store) to use.
    """

    def __init__(self, exporter: AuditSpanExporter) -> None:
        self.exporter = exporter

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do when a span starts (the gate handles fail-closed intents)."""

    def on_end(self, span: ReadableSpan) -> None:
        """Append the span's record if it is an audit span; durable before this returns.

        Raises:
            AuditUnavailable: the store failed and the failure policy is ``"raise"``.
        """
        if not is_audit_span(span):
            return
        write_with_events(self.exporter.writer, entry_from_span(span))  # flow event (issue 14)

    def shutdown(self) -> None:
        """Flush queued records and close the exporter (and its store if it owns it)."""
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Retry queued records; ``True`` when none is left."""
        return self.exporter.force_flush(timeout_millis)


class AuditGate:
    """The fail-closed hook: an intent record before each state-changing run.

    Args:
        exporter: the exporter whose writer appends the intents (so intents and outcomes are
            group-committed and ordered together).
    """

    def __init__(self, exporter: AuditSpanExporter) -> None:
        self.exporter = exporter

    def intent(self, span: Any) -> int | None:
        """Durably append the intent record of a live span that is about to run.

        Sets ``coworker.audit.intent_seq`` on the span, so that the outcome record points at
        the intent.

        Args:
            span: the live SDK span, with its start attributes set.

        Returns:
            The intent's seq, or ``None`` when the store accepted it durably without a seq
            yet (a PostgreSQL store spooling locally during an outage: the spool ships it in
            order later, and the outcome is paired with it by run id).

        Raises:
            AuditUnavailable: the intent could not be made durable; the run must not execute.
        """
        try:
            fields = intent_from_span(span)
        except Exception as exc:
            raise AuditUnavailable(f"cannot build the audit intent record: {exc}") from exc
        records = self.exporter.writer.write([(fields, None)], policy=ON_FAILURE_RAISE)
        if not records:
            return None
        seq = records[0].seq
        span.set_attribute(attr.AUDIT_INTENT_SEQ, seq)
        return seq


@dataclass
class AuditPipeline:
    """What :func:`build_pipeline` returns to ``coworker.configure``.

    Attributes:
        processor: add it to the ``TracerProvider`` (after the operational processors).
        gate: set it as ``SETTINGS.audit_gate`` (``None`` unless fail-closed).
        store: the store records go to.
        exporter: the exporter the processor feeds.
    """

    processor: AuditSpanProcessor
    gate: AuditGate | None
    store: AuditStore
    exporter: AuditSpanExporter

    def shutdown(self) -> None:
        """Flush and close; the pipeline stops being the one :func:`coworker.audit.correct`
        uses. Idempotent."""
        global _active
        with _active_lock:
            if _active is self:
                _active = None
        self.processor.shutdown()


def build_pipeline(
    target: str | AuditStore | bool | None,
    *,
    fail_closed: bool = False,
    on_failure: str = ON_FAILURE_RAISE,
    retry_limit: int = 10_000,
) -> AuditPipeline:
    """Open the store and build the processor (and gate) for ``coworker.configure``.

    Args:
        target: a store URL, an open store, or ``True`` / ``None`` for ``COWORKER_AUDIT_URL``
            or the default ``sqlite:///.coworker/audit.db``. A store passed in is not closed
            by :meth:`AuditPipeline.shutdown`; one opened from a URL is.
        fail_closed: build an :class:`AuditGate`.
        on_failure: ``"raise"`` (default) or ``"log"``; see :mod:`coworker.audit.writer`.
        retry_limit: capacity of the retry queue of the ``"log"`` policy.

    Returns:
        The pipeline; it also becomes the one :func:`coworker.audit.correct` uses by default.

    Raises:
        ConfigError: bad URL or option.
        AuditUnavailable: the store cannot be opened.
    """
    global _active
    store_arg: AuditStore | str | None
    if target is True or target is None:
        store_arg = None
    elif target is False:
        from coworker.exceptions import ConfigError

        raise ConfigError("audit=False: there is no audit pipeline to build")
    else:
        store_arg = target
    exporter = AuditSpanExporter(store_arg, on_failure=on_failure, retry_limit=retry_limit)
    pipeline = AuditPipeline(
        processor=AuditSpanProcessor(exporter),
        gate=AuditGate(exporter) if fail_closed else None,
        store=exporter.store,
        exporter=exporter,
    )
    with _active_lock:
        _active = pipeline
    return pipeline


def active_pipeline() -> AuditPipeline | None:
    """The pipeline most recently built and not shut down, if any."""
    return _active
