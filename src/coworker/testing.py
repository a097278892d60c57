"""Test helpers for applications that use coworker (and for coworker's own tests).

The pytest plugin (:mod:`coworker.pytest_plugin`, registered through the ``pytest11`` entry
point) gives every test a ``capcoworker`` fixture, a :class:`CapCoworker`: coworker configured
with an in-memory span exporter, an in-memory audit store wired like a real one, and a metric
reader, with repeatable ids and a deterministic clock; everything is reset after the test::

    def test_invoice_update(capcoworker):
        with coworker.acting_as("u1"):
            update_invoice("INV-1", 10)
        assert capcoworker.tree() == [("update Invoice", [])]
        (record,) = capcoworker.audit_records()
        assert record["user_id"] == "u1"

Without pytest: :func:`span_exporter` installs one process-wide ``InMemorySpanExporter``
behind a ``SimpleSpanProcessor`` on the global SDK tracer provider (installing that provider
when none is set: OTel allows only one per process); :func:`capture` clears it around a block.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from coworker.audit.store import InMemoryStore

__all__ = ["CapCoworker", "InMemoryStore", "capture", "span_exporter", "span_tree"]

_lock = threading.Lock()
_exporter: Any = None


def span_exporter() -> Any:
    """The process-wide in-memory exporter (an SDK ``InMemorySpanExporter``)."""
    global _exporter
    with _lock:
        if _exporter is None:
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )

            from coworker._sdk import PrivateRandomIdGenerator
            from coworker._state import TRACER

            provider = trace.get_tracer_provider()
            if isinstance(provider, trace.ProxyTracerProvider):
                provider = TracerProvider(id_generator=PrivateRandomIdGenerator())
                trace.set_tracer_provider(provider)
                provider = trace.get_tracer_provider()
            exporter = InMemorySpanExporter()
            provider.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
            TRACER.reset()
            _exporter = exporter
        return _exporter


@contextmanager
def capture() -> Iterator[Any]:
    """Clear the in-memory exporter, yield it, and leave the spans there after the block."""
    exporter = span_exporter()
    exporter.clear()
    yield exporter


def span_tree(spans: Any) -> list[tuple[int, str]]:
    """``(depth, name)`` pairs of finished spans in start order, children under parents."""
    by_parent: dict[Any, list[Any]] = {}
    ids = {s.context.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.start_time):
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(s)
    out: list[tuple[int, str]] = []

    def walk(parent: Any, depth: int) -> None:
        for s in by_parent.get(parent, []):
            out.append((depth, s.name))
            walk(s.context.span_id, depth + 1)

    walk(None, 0)
    return out


SpanTree = list[tuple[str, "SpanTree"]]
"""``[(name, children), ...]``: finished spans in start order, children under parents."""

CLOCK_START_NS = 1_700_000_000_000_000_000
"""Where :class:`CapCoworker`'s clock starts (ns since the epoch); each reading adds 1 ms."""


class CapCoworker:
    """coworker configured for one test: spans, audit records and metrics, in memory.

    Made by the ``capcoworker`` fixture, which calls :meth:`configure` before the test and
    :meth:`reset` after it. Ids (span, trace, run and flow ids) come from coworker's private
    generator seeded with 0, and span timestamps from a clock that starts at
    :data:`CLOCK_START_NS` and advances 1 ms per reading, so the same test produces the same
    ids and times on every run.

    Attributes:
        exporter: the SDK ``InMemorySpanExporter`` the finished spans go to.
        store: the :class:`~coworker.audit.store.InMemoryStore` the audit trail writes to,
            through the same pipeline (processor, writer, chain) as a real store.
        metric_reader: the SDK ``InMemoryMetricReader`` of coworker's run metrics.
    """

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        self.store = InMemoryStore()
        self.metric_reader = InMemoryMetricReader()
        self._meter_provider = MeterProvider(metric_readers=[self.metric_reader])
        self._now = CLOCK_START_NS
        self._idle_clock = 0.0

    def time_ns(self) -> int:
        """The deterministic clock: each call returns the next millisecond."""
        self._now += 1_000_000
        return self._now

    def monotonic(self) -> float:
        """The clock flows measure idle timeouts with (seconds): it stands still until
        :meth:`advance` moves it, so a test decides exactly how long a flow was idle."""
        return self._idle_clock

    def advance(self, seconds: float) -> None:
        """Move the idle-timeout clock forward by ``seconds`` (e.g. inside a run's body to
        make it a long run, or between two runs to make the flow idle)."""
        if seconds < 0:
            raise ValueError(f"the clock only moves forward, got {seconds!r}")
        self._idle_clock += seconds

    def configure(self, **options: Any) -> None:
        """``coworker.configure`` with this capture wired in; ``options`` are passed on
        (``policy=``, ``fail_closed=``, ``sensitive_doctypes=``, ...), except the exporter,
        audit and metrics settings, which are the capture's own."""
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        import coworker
        from coworker import _ids

        for own in ("exporter", "audit", "metrics"):
            if own in options:
                raise TypeError(f"capcoworker.configure() sets {own}= itself")
        _ids.seed(0)
        coworker.configure(
            options.pop("service_name", None),
            exporter=[SimpleSpanProcessor(self.exporter), _metrics_processor(self)],
            audit=self.store,
            metrics=False,
            **options,
        )

    def reset(self) -> None:
        """Shut the configuration down and forget everything captured."""
        import coworker
        from coworker import _state

        coworker.shutdown()
        _state.reset()
        self.exporter.clear()
        self.store = InMemoryStore()
        self._now = CLOCK_START_NS
        self._idle_clock = 0.0

    def spans(self) -> list[Any]:
        """The finished spans (SDK ``ReadableSpan``), in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def tree(self) -> SpanTree:
        """The finished spans as ``[(name, children), ...]`` in start order."""
        spans = self.spans()
        ids = {s.context.span_id for s in spans}
        by_parent: dict[Any, list[Any]] = {}
        for s in sorted(spans, key=lambda s: s.start_time):
            parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
            by_parent.setdefault(parent, []).append(s)

        def build(parent: Any) -> SpanTree:
            return [(s.name, build(s.context.span_id)) for s in by_parent.get(parent, [])]

        return build(None)

    def audit_records(self) -> list[dict[str, Any]]:
        """The audit records written so far, decoded (``seq``, ``user_id``, ``outcome``...)."""
        return [record.fields() for record in self.store.iter_from(1)]

    def metrics(self) -> dict[str, list[tuple[Mapping[str, Any], Any]]]:
        """coworker's run metrics: ``{name: [(attributes, value), ...]}`` (a counter's
        value is its sum, a histogram's its count)."""
        data = self.metric_reader.get_metrics_data()
        out: dict[str, list[tuple[Mapping[str, Any], Any]]] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points = out.setdefault(metric.name, [])
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = getattr(point, "count", None)
                        points.append((dict(point.attributes or {}), value))
        return out


def _metrics_processor(cap: CapCoworker) -> Any:
    from opentelemetry.sdk.trace import SpanProcessor

    from coworker.metrics import RunMetricsProcessor

    class _Metrics(SpanProcessor):
        """coworker's run metrics, recorded with the capture's meter provider."""

        def __init__(self) -> None:
            self._inner = RunMetricsProcessor(meter_provider=cap._meter_provider)

        def on_end(self, span: Any) -> None:
            self._inner.on_end(span)

    return _Metrics()
