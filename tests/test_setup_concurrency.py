"""configure() from many threads at once."""

from __future__ import annotations

import threading
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import coworker
from coworker import _setup


def test_configure_from_threads_installs_one_processor(spans: Any) -> None:
    """Concurrent configure() calls leave one CoworkerProcessor and one live exporter."""
    exporters = [InMemorySpanExporter() for _ in range(8)]
    barrier = threading.Barrier(8, timeout=5)

    def configure(e: InMemorySpanExporter) -> None:
        barrier.wait()
        coworker.configure(exporter=SimpleSpanProcessor(e), metrics=False)

    threads = [threading.Thread(target=configure, args=(e,)) for e in exporters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    provider = trace.get_tracer_provider()
    ours = [
        p
        for p in provider._active_span_processor._span_processors  # type: ignore[attr-defined]
        if type(p).__name__ == "CoworkerProcessor"
    ]
    assert len(ours) == 1 and ours[0] is _setup._processor
    assert len(ours[0].members) == 1

    @coworker.run
    def f() -> None:
        pass

    f()
    assert sorted(len(e.get_finished_spans()) for e in exporters) == [0] * 7 + [1]
    assert len(spans.get_finished_spans()) == 1
    coworker.shutdown()
    coworker.shutdown()
    f()
    assert sum(len(e.get_finished_spans()) for e in exporters) == 1
