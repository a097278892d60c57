"""``AuditSpanExporter``: an OpenTelemetry ``SpanExporter`` that writes audit spans to a store.

Thin: it keeps the spans whose ``coworker.audited`` attribute is ``True``, turns each into a
record (:func:`coworker.audit.record.entry_from_span`) and hands them to an
:class:`~coworker.audit.writer.AuditWriter`. Registered as the ``coworker_audit`` entry point of
``opentelemetry_traces_exporter``, so ``OTEL_TRACES_EXPORTER=coworker_audit`` finds it; note
that the SDK's auto-configuration then wraps it in a ``BatchSpanProcessor``, which drops spans
when its queue fills. For the lossless path use ``coworker.configure(audit=...)``, which feeds
this exporter from :class:`coworker.audit.pipeline.AuditSpanProcessor`, synchronously.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from coworker import attributes as attr
from coworker.audit.record import entry_from_span
from coworker.audit.store import AuditStore, StoredRecord
from coworker.audit.writer import ON_FAILURE_LOG, AuditWriter
from coworker.exceptions import AuditUnavailable

__all__ = ["AuditSpanExporter", "is_audit_span"]

_log = logging.getLogger("coworker.audit")


def is_audit_span(span: Any) -> bool:
    """``True`` when the span carries ``coworker.audited = True``."""
    # The SDK span's plain dict when it has one (its public mapping is a new proxy per read).
    inner = getattr(getattr(span, "_attributes", None), "_dict", None)
    attributes = inner if type(inner) is dict else span.attributes
    return attributes is not None and attributes.get(attr.AUDITED) is True


class AuditSpanExporter(SpanExporter):
    """Export the audit spans of each batch to an audit store.

    Args:
        store: an open store, a store URL, or ``None`` for ``COWORKER_AUDIT_URL`` or the
            default ``sqlite:///.coworker/audit.db``.
        on_failure: ``"log"`` (default: :meth:`export` never raises, as the SpanExporter
            contract asks; failed records are logged and queued for retry) or ``"raise"``
            (used by the synchronous processor).
        retry_limit: capacity of the retry queue of the ``"log"`` policy.

    Raises:
        ConfigError: a bad URL or option.
        AuditUnavailable: the store cannot be opened.
    """

    def __init__(
        self,
        store: AuditStore | str | None = None,
        *,
        on_failure: str = ON_FAILURE_LOG,
        retry_limit: int = 10_000,
    ) -> None:
        if store is None or isinstance(store, str):
            from coworker.audit.urls import open_store

            self.store: AuditStore = open_store(store)
            self._owns_store = True
        else:
            self.store = store
            self._owns_store = False
        self.writer = AuditWriter(self.store, on_failure=on_failure, retry_limit=retry_limit)
        self._shutdown = False

    def write_spans(self, spans: Sequence[ReadableSpan]) -> list[StoredRecord]:
        """Append the audit spans among ``spans`` now, under the writer's failure policy.

        Returns:
            The sealed records (empty when none was an audit span, or when the ``"log"``
            policy queued them for retry).

        Raises:
            AuditUnavailable: the store failed and the policy is ``"raise"``.
        """
        entries = [entry_from_span(s) for s in spans if is_audit_span(s)]
        if not entries:
            return []
        return self.writer.write(entries)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write the audit spans of ``spans``; never raises.

        Returns:
            ``SUCCESS`` when every audit span is durable, else ``FAILURE`` (the records were
            logged and, with the ``"log"`` policy, queued for retry).
        """
        if self._shutdown:
            _log.error("AuditSpanExporter.export after shutdown: %d span(s) refused", len(spans))
            return SpanExportResult.FAILURE
        try:
            entries = [entry_from_span(s) for s in spans if is_audit_span(s)]
            if not entries:
                return SpanExportResult.SUCCESS
            records = self.writer.write(entries)
        except AuditUnavailable as exc:
            _log.error("audit export failed: %s", exc)
            return SpanExportResult.FAILURE
        except Exception:
            _log.exception("audit export failed: %d span(s) not recorded", len(spans))
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS if records else SpanExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Retry queued records; ``True`` when none is left."""
        return self.writer.flush()

    def shutdown(self) -> None:
        """Flush (loudly logging records that still cannot be written) and close the store
        if this exporter opened it. Idempotent."""
        if self._shutdown:
            return
        self._shutdown = True
        self.writer.close()
        if self._owns_store:
            self.store.close()
