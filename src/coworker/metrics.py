"""coworker's own metrics, recorded through the OpenTelemetry metrics API only.

Users without the Collector's span-metrics connector still get run and audit metrics:

- ``coworker.runs`` (counter, ``{run}``) and ``coworker.run.duration`` (histogram, ``s``), by
  ``flow.type``, ``coworker.operation`` and ``outcome``; recorded by :class:`RunMetricsProcessor`.
- ``coworker.audit.appends`` (counter, ``{record}``) and ``coworker.audit.append.duration``
  (histogram, ``s``), by ``coworker.audit.category`` and ``outcome``; see :func:`audit_append`.
- ``coworker.audit.spool.depth`` (observable gauge, ``{record}``); see
  :func:`register_spool_depth`.

``outcome`` is ``"ok"`` or the ``error.type`` of the failure. The names live in
:mod:`coworker.attributes`. This module imports ``opentelemetry.metrics`` (the API) and nothing
from the SDK: without a ``MeterProvider`` every call goes to the API's no-op (or proxy) meter and
costs a dictionary lookup. Instruments are created on first use, not at import.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics as _metrics
from opentelemetry.trace import StatusCode

from coworker import attributes as _a
from coworker._version import __version__

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, MeterProvider
    from opentelemetry.sdk.trace import ReadableSpan, Span

__all__ = [
    "OUTCOME_OK",
    "RunMetricsProcessor",
    "audit_append",
    "register_spool_depth",
    "unregister_spool_depth",
]

_log = logging.getLogger(__name__)

OUTCOME_OK = "ok"
"""Value of the ``outcome`` metric attribute for a run or append that succeeded."""

_OUTCOME_OTHER = "_OTHER"
# Semconv fallback for error.type when a span is an error but names no type
# (https://opentelemetry.io/docs/specs/semconv/attributes-registry/error/).

_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
# The semconv advisory boundaries for request durations in seconds, plus 30 s and 60 s because a
# run may be a whole agent turn or a batch step.

_NS_PER_S = 1e9


def _meter(meter_provider: MeterProvider | None) -> Meter:
    # With meter_provider=None this is the global API meter: a proxy that starts forwarding once
    # the application sets a MeterProvider, so creating instruments before that is safe.
    return _metrics.get_meter("coworker", __version__, meter_provider=meter_provider)


class _RunInstruments:
    __slots__ = ("duration", "runs")

    def __init__(self, meter: Meter) -> None:
        self.runs: Counter = meter.create_counter(
            _a.METRIC_RUNS, unit="{run}", description="Finished coworker runs."
        )
        self.duration: Histogram = meter.create_histogram(
            _a.METRIC_RUN_DURATION,
            unit="s",
            description="Duration of coworker runs.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )


class _AuditInstruments:
    __slots__ = ("appends", "duration")

    def __init__(self, meter: Meter) -> None:
        self.appends: Counter = meter.create_counter(
            _a.METRIC_AUDIT_APPENDS,
            unit="{record}",
            description="Audit records appended (or refused) by the audit store.",
        )
        self.duration: Histogram = meter.create_histogram(
            _a.METRIC_AUDIT_APPEND_DURATION,
            unit="s",
            description="Latency of one audit store append.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )


class _SpoolGauge:
    """One observable gauge per meter provider, fed by every registered callback."""

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[tuple[Callable[[], int], Mapping[str, Any] | None]] = []
        meter.create_observable_gauge(
            _a.METRIC_AUDIT_SPOOL_DEPTH,
            callbacks=[self._observe],
            unit="{record}",
            description="Audit records waiting in the local spool for the shared store.",
        )

    def add(self, callback: Callable[[], int], attributes: Mapping[str, Any] | None) -> None:
        with self._lock:
            self._callbacks.append((callback, attributes))

    def remove(self, callback: Callable[[], int]) -> bool:
        with self._lock:
            before = len(self._callbacks)
            self._callbacks = [(cb, at) for cb, at in self._callbacks if cb is not callback]
            return len(self._callbacks) != before

    def _observe(self, _options: CallbackOptions) -> Iterable[_metrics.Observation]:
        with self._lock:
            registered = list(self._callbacks)
        observations = []
        for callback, attributes in registered:
            try:
                observations.append(_metrics.Observation(int(callback()), attributes))
            except Exception:
                # A closed store must not break the collection of every other metric.
                _log.debug("spool depth callback %r failed", callback, exc_info=True)
        return observations


class _PerProvider:
    """Lazily built instrument sets, one per meter provider (``None`` = the global one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._global: dict[type, Any] = {}
        self._explicit: weakref.WeakKeyDictionary[Any, dict[type, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, kind: type, meter_provider: MeterProvider | None) -> Any:
        table = self._global if meter_provider is None else self._explicit.get(meter_provider)
        if table is not None:
            found = table.get(kind)
            if found is not None:
                return found
        with self._lock:
            if meter_provider is None:
                table = self._global
            else:
                table = self._explicit.setdefault(meter_provider, {})
            found = table.get(kind)
            if found is None:
                found = table[kind] = kind(_meter(meter_provider))
            return found


_instruments = _PerProvider()


def audit_append(
    category: str,
    outcome: str,
    seconds: float,
    *,
    count: int = 1,
    meter_provider: MeterProvider | None = None,
) -> None:
    """Record one audit store append of ``count`` records of one category.

    Called by the audit writer after each append attempt, successful or not: once per
    category of a group commit, so the counter counts records and the histogram appends.

    Args:
        category: The record's ``coworker.audit.category`` (``state-change``, ...).
        outcome: ``"ok"`` (:data:`OUTCOME_OK`) or the error type of the failed append.
        seconds: Wall-clock duration of the append, in seconds.
        count: How many records of this category the append carried.
        meter_provider: Record with this provider instead of the global one (tests).
    """
    if meter_provider is None and _no_meter_provider():
        return  # the API's proxy instruments would drop the points anyway: save the work
    instruments: _AuditInstruments = _instruments.get(_AuditInstruments, meter_provider)
    attributes = {_a.AUDIT_CATEGORY: category, _a.METRIC_ATTR_OUTCOME: outcome}
    instruments.appends.add(count, attributes)
    instruments.duration.record(seconds, attributes)


def register_spool_depth(
    callback: Callable[[], int],
    *,
    attributes: Mapping[str, Any] | None = None,
    meter_provider: MeterProvider | None = None,
) -> None:
    """Report the local audit spool's depth as the ``coworker.audit.spool.depth`` gauge.

    The callback runs on the metric reader's collection thread, so it must be thread-safe and
    quick. An exception in it is logged at debug level and that one observation is skipped.

    Args:
        callback: Returns the number of records waiting in the spool.
        attributes: Attributes for this callback's observation; give distinct ones when a
            process has more than one spool (otherwise their observations collide).
        meter_provider: Register with this provider instead of the global one (tests).
    """
    gauge: _SpoolGauge = _instruments.get(_SpoolGauge, meter_provider)
    gauge.add(callback, attributes)


def unregister_spool_depth(
    callback: Callable[[], int], *, meter_provider: MeterProvider | None = None
) -> bool:
    """Stop reporting a callback given to :func:`register_spool_depth` (e.g. on store close).

    Args:
        callback: The callable that was registered (compared by identity).
        meter_provider: The provider it was registered with.

    Returns:
        ``True`` if the callback was registered.
    """
    gauge: _SpoolGauge = _instruments.get(_SpoolGauge, meter_provider)
    return gauge.remove(callback)


_proxy_provider: Any = None


def _no_meter_provider() -> bool:
    # The API hands out a proxy until the application sets a MeterProvider; measurements on
    # proxy instruments are dropped, so there is nothing to record yet. Looking the provider
    # up costs an environment read per call, so the proxy is kept and asked instead (it learns
    # of the real provider through on_set_meter_provider).
    global _proxy_provider
    proxy = _proxy_provider
    if proxy is None:
        provider = _metrics.get_meter_provider()
        if type(provider).__name__ != "_ProxyMeterProvider":
            return False
        proxy = _proxy_provider = provider
    return getattr(proxy, "_real_meter_provider", True) is None


class RunMetricsProcessor:
    """A span processor that turns finished coworker runs into ``coworker.runs`` metrics.

    It duck-types ``opentelemetry.sdk.trace.SpanProcessor`` so that importing this module never
    imports the SDK; register it with ``TracerProvider.add_span_processor``. Only spans carrying
    ``coworker.run.id`` are counted. ``on_end`` reads four attributes and records two
    measurements; it never raises into the application.

    Args:
        meter_provider: Record with this provider instead of the global one.
    """

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        self._meter_provider = meter_provider
        self._instruments: _RunInstruments | None = None

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Do nothing: runs are measured when they end."""

    def _on_ending(self, span: Span) -> None:
        # Called by SDK >= 1.28 before the span becomes read-only; nothing to do.
        pass

    def on_end(self, span: ReadableSpan) -> None:
        """Record the run's count and duration if ``span`` is a coworker run.

        Args:
            span: The finished span.
        """
        if self._meter_provider is None and _no_meter_provider():
            return  # the API's proxy instruments would drop the points anyway: save the work
        try:
            attrs = span.attributes
            if not attrs or _a.RUN_ID not in attrs:
                return
            start, end = span.start_time, span.end_time
            instruments = self._instruments
            if instruments is None:
                instruments = self._instruments = _instruments.get(
                    _RunInstruments, self._meter_provider
                )
            error_type = attrs.get(_a.ERROR_TYPE)
            if error_type is not None:
                outcome = str(error_type)
            elif span.status.status_code is StatusCode.ERROR:
                outcome = _OUTCOME_OTHER
            else:
                outcome = OUTCOME_OK
            metric_attrs: dict[str, Any] = {_a.METRIC_ATTR_OUTCOME: outcome}
            flow_type = attrs.get(_a.FLOW_TYPE)
            if flow_type is not None:
                metric_attrs[_a.FLOW_TYPE] = flow_type
            operation = attrs.get(_a.OPERATION)
            if operation is not None:
                metric_attrs[_a.OPERATION] = operation
            instruments.runs.add(1, metric_attrs)
            if start is not None and end is not None:
                instruments.duration.record((end - start) / _NS_PER_S, metric_attrs)
        except Exception:
            _log.debug("coworker run metrics failed for a span", exc_info=True)

    def shutdown(self) -> None:
        """Do nothing: the meter provider owns the instruments' lifecycle."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Return ``True``: nothing is buffered here.

        Args:
            timeout_millis: Ignored.

        Returns:
            Always ``True``.
        """
        return True


METRIC_INGEST_SPANS = "coworker.ingest.spans"
"""Counter of audit spans handled by ``coworker audit serve``, by ``result``: ``appended``,
``duplicate`` (a resend), ``rejected`` (invalid or not allowed for the token) and ``conflict``
(a conflict record written: two different spans with the same trace and span id)."""


class _IngestInstruments:
    __slots__ = ("spans",)

    def __init__(self, meter: Meter) -> None:
        self.spans: Counter = meter.create_counter(
            METRIC_INGEST_SPANS,
            unit="{span}",
            description="Audit spans received by the OTLP ingest endpoint, by result.",
        )


def ingest_spans(result: str, count: int, *, meter_provider: MeterProvider | None = None) -> None:
    """Count audit spans handled by the ingest endpoint.

    Args:
        result: ``appended``, ``duplicate``, ``rejected`` or ``conflict``.
        count: how many.
        meter_provider: Record with this provider instead of the global one (tests).
    """
    instruments: _IngestInstruments = _instruments.get(_IngestInstruments, meter_provider)
    instruments.spans.add(count, {"result": result})
