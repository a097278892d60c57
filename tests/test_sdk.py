"""CoworkerProcessor: the composite reaches every member against one deadline."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.trace import SpanProcessor

from coworker._sdk import CoworkerProcessor


class _Member(SpanProcessor):
    def __init__(self, flush_ok: bool = True, shutdown_error: Exception | None = None) -> None:
        self.flush_ok = flush_ok
        self.shutdown_error = shutdown_error
        self.flush_timeouts: list[int] = []
        self.shut_down = False

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.flush_timeouts.append(timeout_millis)
        return self.flush_ok

    def shutdown(self) -> None:
        self.shut_down = True
        if self.shutdown_error is not None:
            raise self.shutdown_error


def test_force_flush_reaches_every_member_after_a_failure() -> None:
    """A member that returns False does not keep the next one from being flushed."""
    first, second = _Member(flush_ok=False), _Member()
    composite = CoworkerProcessor()
    composite.replace([first, second])
    assert composite.force_flush(5_000) is False
    assert first.flush_timeouts and second.flush_timeouts


def test_force_flush_shares_one_deadline() -> None:
    """Time a member spends is taken off the next member's timeout (one deadline)."""

    class _Slow(_Member):
        def force_flush(self, timeout_millis: int = 30000) -> bool:
            time.sleep(0.05)  # at least 50 ms pass: a lower bound, not a guess
            return super().force_flush(timeout_millis)

    slow, after = _Slow(), _Member()
    composite = CoworkerProcessor()
    composite.replace([slow, after])
    assert composite.force_flush(1_000) is True
    assert slow.flush_timeouts[0] <= 1_000
    assert 0 <= after.flush_timeouts[0] <= 950


def test_shutdown_reaches_every_member_when_one_raises() -> None:
    """shutdown() shuts every member down and then raises the first member's error."""
    first, second = _Member(shutdown_error=RuntimeError("boom")), _Member()
    composite = CoworkerProcessor()
    composite.replace([first, second])
    with pytest.raises(RuntimeError, match="boom"):
        composite.shutdown()
    assert first.shut_down and second.shut_down
    assert composite.members == ()
