"""Rate-limit counters: the :class:`RateLimiter` interface and the in-process
:class:`InMemoryRateLimiter` (sliding window)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

if TYPE_CHECKING:
    pass

__all__ = ["InMemoryRateLimiter", "RateLimiter"]


# -- rate limiting ---------------------------------------------------------------------------


@runtime_checkable
class RateLimiter(Protocol):
    """Where rate-limit counts live; in-process by default, pluggable for a shared backend."""

    def hit(self, key: str, limit: int, window: float) -> float:
        """Count one run under ``key`` if it fits in the limit.

        Guarantee: a run is counted (and ``0.0`` returned) only when fewer than ``limit`` runs
        were counted under ``key`` in the last ``window`` seconds; the check and the count are
        atomic with respect to other callers of the same backend (threads, and processes for
        a shared backend). Otherwise nothing is counted and the result is the number of
        seconds (> 0) until a run would fit.

        Args:
            key: opaque, stable string naming the limit and its subject.
            limit: runs allowed per window (≥ 1).
            window: window length in seconds (> 0).
        """
        ...


class InMemoryRateLimiter:
    """A sliding-window log per key, guarded by one lock: exact and thread-safe, per process.

    Args:
        clock: monotonic seconds; injectable for tests.
    """

    _SWEEP_EVERY: Final = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._log: dict[str, deque[float]] = {}
        self._windows: dict[str, float] = {}
        self._hits = 0

    def hit(self, key: str, limit: int, window: float) -> float:
        """See :meth:`RateLimiter.hit`."""
        with self._lock:
            now = self._clock()
            log = self._log.get(key)
            if log is None:
                log = self._log[key] = deque()
                self._windows[key] = window
            horizon = now - window
            while log and log[0] <= horizon:
                log.popleft()
            if len(log) >= limit:
                return max(log[len(log) - limit] + window - now, 1e-9)
            log.append(now)
            self._hits += 1
            if self._hits % self._SWEEP_EVERY == 0:
                self._sweep(now)
            return 0.0

    def _sweep(self, now: float) -> None:
        # Drop keys whose whole log has expired, so idle users do not accumulate.
        stale = [k for k, log in self._log.items() if not log or log[-1] <= now - self._windows[k]]
        for k in stale:
            del self._log[k]
            del self._windows[k]

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._log.clear()
            self._windows.clear()
