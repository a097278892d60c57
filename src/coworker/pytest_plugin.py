"""The ``capcoworker`` pytest fixture (registered through the ``pytest11`` entry point).

See :class:`coworker.testing.CapCoworker`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coworker.testing import CapCoworker

__all__ = ["capcoworker"]


class _Clock:
    """The ``time`` module, except that ``time_ns`` is the capture's clock."""

    def __init__(self, cap: CapCoworker) -> None:
        self.time_ns = cap.time_ns

    def __getattr__(self, name: str) -> object:
        import time

        return getattr(time, name)


@pytest.fixture
def capcoworker(monkeypatch: pytest.MonkeyPatch) -> Iterator[CapCoworker]:
    """coworker configured for this test: spans, audit records and metrics in memory,
    repeatable ids, a deterministic clock; all reset after the test."""
    import importlib

    import opentelemetry.sdk.trace as sdk_trace

    from coworker.audit import record

    flow = importlib.import_module("coworker.flow")  # the module, not coworker.flow()

    cap = CapCoworker()
    # Span timestamps: the SDK reads time_ns from its module when a span starts and ends;
    # records take recorded_at from time.time_ns in coworker.audit.record.
    monkeypatch.setattr(sdk_trace, "time_ns", cap.time_ns)
    monkeypatch.setattr(record, "time", _Clock(cap))
    # Idle timeouts: a manual clock (capcoworker.advance), so no test waits for real time.
    monkeypatch.setattr(flow, "_monotonic", cap.monotonic)
    cap.configure()
    try:
        yield cap
    finally:
        cap.reset()
