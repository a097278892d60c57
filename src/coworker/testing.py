"""Test helpers for applications that use coworker (and for coworker's own tests).

:func:`span_exporter` installs one process-wide ``InMemorySpanExporter`` behind a
``SimpleSpanProcessor`` on the global SDK tracer provider (installing that provider when none
is set: OTel allows only one per process). :func:`capture` clears it around a block.

Example (pytest)::

    from coworker.testing import capture

    def test_invoice_update():
        with capture() as spans:
            update_invoice("INV-1", 10)
        (span,) = spans.get_finished_spans()
        assert span.attributes["coworker.operation"] == "update"
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from coworker.audit.store import InMemoryStore

__all__ = ["InMemoryStore", "capture", "span_exporter", "span_tree"]

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
