"""Shared fixtures: a real SDK tracer provider with an in-memory exporter, and leak checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace

import coworker
from coworker._scope import EMPTY_SCOPE, SCOPE
from coworker._state import SETTINGS
from coworker.testing import span_exporter


@pytest.fixture
def spans() -> Iterator[Any]:
    """The in-memory exporter, cleared; read it with ``spans.get_finished_spans()``."""
    exporter = span_exporter()
    exporter.clear()
    yield exporter
    exporter.clear()


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Every test starts and ends with no coworker context, no current span, defaults."""
    span_exporter()
    assert SCOPE.get() is EMPTY_SCOPE
    yield
    leaked_scope = SCOPE.get()
    leaked_span = trace.get_current_span()
    coworker.shutdown()
    SETTINGS.reset()
    assert leaked_scope is EMPTY_SCOPE, "a coworker block leaked its context"
    assert not leaked_span.get_span_context().is_valid, "a span stayed current after the test"


@pytest.fixture
def flow_spans_off() -> Iterator[None]:
    """``configure(flow_spans=False)``'s shape: no flow/step/turn spans, every top-level run its
    own trace. Tests that assert exactly the run spans of a flow use it; the flow spans
    themselves are tested in tests/test_flow_spans.py and tests/test_conversation_spans.py."""
    SETTINGS.flow_spans = False
    yield
    SETTINGS.flow_spans = True


def by_name(exporter: Any) -> dict[str, Any]:
    """Finished spans by name (the last one wins)."""
    return {s.name: s for s in exporter.get_finished_spans()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the ``stack`` tests last: CI builds the stack while the unit tests run."""
    items.sort(key=lambda item: item.get_closest_marker("stack") is not None)
