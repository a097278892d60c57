"""Getting records into a store without losing one: group commit, failure policy, retry queue.

:class:`AuditWriter` sits between the span processor / exporter and an
:class:`~coworker.audit.store.AuditStore`:

* **Synchronous**: :meth:`AuditWriter.write` returns only once the records are durable (or
  the failure policy has taken over), so a state-changing call's record is in the store when
  the call returns.
* **Group commit** (leader/follower, :mod:`coworker.audit.group_commit`): callers that arrive
  while an append is in progress queue their records; when it is over, the first of them
  appends everybody's records in one transaction, and each caller returns as soon as its own
  records are durable, without waiting for a later commit. One fsync covers many concurrent
  calls.
* **Failure policy**: ``"raise"`` propagates :class:`~coworker.AuditUnavailable` to the caller;
  ``"log"`` logs an error per record and keeps the record in a bounded in-memory retry queue,
  retried before the next append and on :meth:`flush`; a record pushed out of a full queue is
  logged as lost, loudly. Never silent.
* **Isolation**: a record whose content no store can hold (a lone surrogate, a NaN, an
  integer beyond 2^53) is made storable before it joins a batch
  (:func:`~coworker.audit.record.storable`) and named in one CRITICAL log line; it is written
  like any other, so it can neither be lost nor block the records behind it in the retry queue.
* Store writes run with OpenTelemetry instrumentation suppressed, so that an instrumented DB
  driver does not trace (and audit) the audit trail's own writes.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry.context.context import Context
from opentelemetry.instrumentation.utils import suppress_instrumentation

from coworker.audit import _fork
from coworker.audit.group_commit import GroupCommit, Turn
from coworker.audit.record import storable
from coworker.audit.store import AuditStore, StoredRecord
from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = ["ON_FAILURE_LOG", "ON_FAILURE_RAISE", "AuditWriter", "suppressed"]

_log = logging.getLogger("coworker.audit")

ON_FAILURE_RAISE: Final = "raise"
"""Failure policy: :class:`~coworker.AuditUnavailable` propagates to the caller."""
ON_FAILURE_LOG: Final = "log"
"""Failure policy: log an error per record and keep it in the retry queue."""

Entry = tuple[Mapping[str, Any], "bytes | None"]


def _suppress_keys() -> dict[Any, bool] | None:
    # The keys suppress_instrumentation() sets; None when this instrumentation version does
    # not have them where we look (then the public context manager is used).
    from opentelemetry.instrumentation import utils

    keys = [
        getattr(utils, "_SUPPRESS_INSTRUMENTATION_KEY", None),
        getattr(utils, "_SUPPRESS_INSTRUMENTATION_KEY_PLAIN", None),
    ]
    if any(k is None for k in keys):
        return None
    return dict.fromkeys(keys, True)


_SUPPRESS: Final = _suppress_keys()


class _Suppressed:
    """``suppress_instrumentation()`` as one context copy and one attach: the writer enters
    it once per group commit, and the generator-based original costs three context copies
    and two generator frames each time."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        assert _SUPPRESS is not None
        self._token = otel_context.attach(Context({**otel_context.get_current(), **_SUPPRESS}))

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)


def suppressed() -> AbstractContextManager[None]:
    """Run the block with OpenTelemetry instrumentation suppressed (so database
    instrumentation does not trace coworker's own writes)."""
    if _SUPPRESS is None:  # pragma: no cover - an instrumentation package without the keys
        return suppress_instrumentation()
    return _Suppressed()


def _metrics_hook() -> Callable[..., None] | None:
    from coworker.metrics import audit_append  # lazy: metrics loads the OTel metrics API

    return audit_append


class _Ticket(Turn):
    __slots__ = ("deferred", "entries", "error", "failed", "records")

    def __init__(self, entries: Sequence[Entry]) -> None:
        super().__init__()
        self.entries = entries
        self.records: list[StoredRecord] = []
        self.error: BaseException | None = None
        self.failed: list[Entry] = []  # the entries that are not durable (when error is set)
        self.deferred = False


_DEFERRED: Final = object()
"""An entry the store made durable without sealing it yet (a spooling store)."""

_MAX_STUB_TEXT: Final = 256
"""A failure record keeps strings up to this length; longer ones become a digest note."""


class AuditWriter:
    """Append records to a store synchronously, with group commit and a failure policy.

    Args:
        store: where records go.
        on_failure: ``"raise"`` or ``"log"`` (see the module docstring).
        retry_limit: most records the ``"log"`` policy keeps for retry; beyond it the oldest
            is discarded with an error log naming it.

    Raises:
        ConfigError: a bad ``on_failure`` or ``retry_limit``.
    """

    def __init__(
        self, store: AuditStore, *, on_failure: str = ON_FAILURE_RAISE, retry_limit: int = 10_000
    ) -> None:
        if on_failure not in (ON_FAILURE_RAISE, ON_FAILURE_LOG):
            raise ConfigError(f"audit_failure={on_failure!r} must be 'raise' or 'log'")
        if retry_limit < 0:
            raise ConfigError(f"retry_limit={retry_limit!r} must not be negative")
        self.store = store
        self.on_failure = on_failure
        self.retry_limit = retry_limit
        self._write_lock = threading.Lock()  # the store and the retry queue
        self._group: GroupCommit[_Ticket, tuple[Sequence[Entry], str, float]] = GroupCommit(
            self._lead
        )
        self._retry: collections.deque[Entry] = collections.deque()
        self.lost = 0
        """Records discarded from a full retry queue (each was logged)."""
        self._metric = _metrics_hook()
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        # Another thread of the parent may have held the lock through a commit at the fork.
        self._write_lock = threading.Lock()
        if self._retry:
            # The parent still holds these and retries them: written here too, they would be
            # in the log twice.
            _log.warning(
                "audit: %d record(s) queued for retry in the parent process (pid %d) are left "
                "to it; this process (pid %d) starts with an empty retry queue",
                len(self._retry),
                os.getppid(),
                os.getpid(),
            )
            self._retry.clear()

    @property
    def retry_depth(self) -> int:
        """Records waiting in the retry queue."""
        return len(self._retry)

    def write(self, entries: Sequence[Entry], *, policy: str | None = None) -> list[StoredRecord]:
        """Append ``entries`` and return their sealed records once durable.

        Args:
            entries: ``(fields, payload)`` pairs, as built by :mod:`coworker.audit.record`.
            policy: override the writer's failure policy for this call (the fail-closed gate
                always uses ``"raise"``).

        Returns:
            The sealed records; ``[]`` when the ``"log"`` policy queued them for retry, or
            when the store made them durable but seals them later (a spooling store).

        Raises:
            AuditUnavailable: the store failed and the policy is ``"raise"``.
        """
        if not entries:
            return []
        ticket = _Ticket([_isolate(entry) for entry in entries])
        measured = self._group.submit(ticket)
        if measured is not None:
            # After the hand-over: the next leader's commit (its fsync) runs meanwhile.
            self._record_metrics(*measured)
        if ticket.error is None and (ticket.deferred or len(ticket.records) == len(entries)):
            return ticket.records
        if ticket.error is None:  # pragma: no cover - a store that returned too few records
            ticket.error = AuditUnavailable("audit store returned fewer records than appended")
        return self._fail(ticket, policy or self.on_failure)

    def _lead(self, batch: list[_Ticket]) -> tuple[Sequence[Entry], str, float]:
        # The group commit's leader: append every queued ticket (ours included) at once,
        # behind the records waiting for retry (so those keep their order). Returns what
        # the metrics need, for the caller to record once the leadership is handed over.
        with self._write_lock:
            return self._commit(batch)

    def _commit(self, batch: list[_Ticket]) -> tuple[Sequence[Entry], str, float]:
        # With the write lock (the retry queue is settled here too).
        entries = [e for t in batch for e in t.entries]
        retried = len(self._retry)
        started = time.perf_counter()
        try:
            with suppressed():
                results = self._append([*self._retry, *entries])
        except BaseException as exc:
            # Every ticket of the batch must carry the error, or its caller would return
            # without its record; a KeyboardInterrupt in the leader fails the followers too.
            error = exc if isinstance(exc, AuditUnavailable) else _wrap(exc)
            for t in batch:
                t.error = error
                t.failed = list(t.entries)
            if not isinstance(exc, Exception):
                self._record_metrics(entries, _error_type(exc), time.perf_counter() - started)
                raise
            return entries, _error_type(exc), time.perf_counter() - started
        seconds = time.perf_counter() - started
        failures = [r for r in results if isinstance(r, BaseException)]
        outcome = _error_type(failures[0]) if failures else "ok"
        if retried:
            self._settle_retry(results[:retried])
        # Deferred (spooled) entries are durable: never a failure, never appended twice.
        deferred = any(r is _DEFERRED for r in results)
        i = retried
        for t in batch:
            mine = results[i : i + len(t.entries)]
            i += len(t.entries)
            if not failures and not deferred:  # the common batch: every result a record
                t.records = mine
                continue
            errors = [r for r in mine if isinstance(r, BaseException)]
            if errors:
                t.error = errors[0] if isinstance(errors[0], AuditUnavailable) else _wrap(errors[0])
                t.failed = [
                    e for e, r in zip(t.entries, mine, strict=True) if isinstance(r, BaseException)
                ]
            t.records = [r for r in mine if isinstance(r, StoredRecord)]
            t.deferred = deferred and any(r is _DEFERRED for r in mine)
        return entries, outcome, seconds

    def _settle_retry(self, results: Sequence[Any]) -> None:
        # The queue's head entries were appended first; drop the ones now durable, keep the
        # others in order.
        if not results:
            return
        entries = [self._retry.popleft() for _ in results]
        still = [e for e, r in zip(entries, results, strict=True) if isinstance(r, BaseException)]
        self._retry.extendleft(reversed(still))
        if len(still) < len(entries):
            _log.warning(
                "audit store recovered: %d queued record(s) appended", len(entries) - len(still)
            )

    def _append(self, entries: Sequence[Entry]) -> list[Any]:
        """Append ``entries`` in order; one result per entry: its record, ``_DEFERRED``, or
        the exception that kept it from the store.

        One append for all, normally. When that fails, the writer tells a store that is down
        from an entry the store rejects for its content (a PostgreSQL index limit on a huge
        user id, a trigger): entries go one by one, and two failures in a row mean the store
        (the rest fail without more attempts). An entry that fails alone is retried as a
        *failure record* with its long values shortened (:meth:`_failure_record`); if the
        store takes that, the entry is isolated and named in one CRITICAL line. So one bad
        record never fails, or blocks behind it in the retry queue, the others.

        Raises:
            Exception: a single entry could not be appended (the store's error).
        """
        if not entries:
            return []
        try:
            return self._store_append(entries)
        except Exception as exc:
            if len(entries) == 1:
                isolated = self._failure_record(entries[0], exc)
                if isolated is None:
                    raise
                return [isolated]
        results: list[Any] = []
        failed_before = False
        for i, entry in enumerate(entries):
            try:
                results.extend(self._store_append([entry]))
                failed_before = False
                continue
            except Exception as exc:
                error = exc
            isolated = self._failure_record(entry, error)
            if isolated is not None:
                results.append(isolated)
                failed_before = False
            elif failed_before:  # twice in a row: the store, not one record
                results.extend([error] * (len(entries) - i))
                return results
            else:
                results.append(error)
                failed_before = True
        return results

    def _store_append(self, entries: Sequence[Entry]) -> list[Any]:
        fields, payloads = zip(*entries, strict=True)  # entries is never empty here
        records = self.store.append(fields, payloads)
        if not records:
            # The store made the entries durable but seals them later (a PostgreSQL store
            # spooling locally during an outage): done, with no seq to hand back yet.
            return [_DEFERRED] * len(entries)
        return list(records)

    def _failure_record(self, entry: Entry, error: BaseException) -> Any:
        """Append a shortened copy of an entry the store refused; ``None`` if there is nothing
        to shorten or the store refuses that too (then it is the store, not the entry)."""
        fields, payload = entry
        long = [k for k, v in fields.items() if isinstance(v, str) and len(v) > _MAX_STUB_TEXT]
        if not long:
            return None
        stub = {k: _shorten(v) if k in long else v for k, v in fields.items()}
        try:
            result = self._store_append([(stub, payload)])[0]
        except Exception:
            return None
        _log.critical(
            "AUDIT RECORD REJECTED by the store (%s); written as a failure record with "
            "field(s) %s replaced by their length and SHA-256: %s %s run=%s span=%s trace=%s",
            error,
            ", ".join(long),
            fields.get("category"),
            fields.get("operation"),
            _shorten_log(fields.get("run_id")),
            _shorten_log(fields.get("span_id")),
            _shorten_log(fields.get("trace_id")),
        )
        return result

    def _drain_retry(self) -> None:
        # Retried records go first, so they keep their relative order; an entry the store
        # rejects for its content is isolated, so it cannot block the queue.
        if not self._retry:
            return
        results = self._append(list(self._retry))
        self._settle_retry(results)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]

    def _fail(self, ticket: _Ticket, policy: str) -> list[StoredRecord]:
        error = ticket.error
        assert error is not None
        if policy == ON_FAILURE_RAISE:
            # A fresh exception per caller: the batch's error is shared between threads.
            raise AuditUnavailable(str(error)) from error
        with self._write_lock:
            for fields, payload in ticket.failed or ticket.entries:
                _log.error(
                    "audit record not yet durable (%s); queued for retry: %s %s run=%s span=%s",
                    error,
                    fields.get("category"),
                    fields.get("operation"),
                    fields.get("run_id"),
                    fields.get("span_id"),
                )
                self._retry.append((fields, payload))
                while len(self._retry) > self.retry_limit:
                    lost_fields, _ = self._retry.popleft()
                    self.lost += 1
                    _log.critical(
                        "AUDIT RECORD LOST: retry queue full (%d); discarded %s %s run=%s "
                        "span=%s trace=%s",
                        self.retry_limit,
                        lost_fields.get("category"),
                        lost_fields.get("operation"),
                        lost_fields.get("run_id"),
                        lost_fields.get("span_id"),
                        lost_fields.get("trace_id"),
                    )
        return []

    def flush(self) -> bool:
        """Retry the queued records now.

        Returns:
            ``True`` when the retry queue is empty afterwards.
        """
        # First the tickets of callers interrupted while they waited (nobody leads them).
        measured = self._group.drain()
        if measured is not None:
            self._record_metrics(*measured)
        with self._write_lock:
            if not self._retry:
                return True
            try:
                with suppressed():
                    self._drain_retry()
            except Exception as exc:
                _log.error(
                    "audit store still failing (%s); %d record(s) remain queued",
                    exc,
                    len(self._retry),
                )
                return False
            return True

    def close(self) -> None:
        """Flush; records that still cannot be written are logged as lost, one by one."""
        if self.flush():
            return
        with self._write_lock:
            while self._retry:
                fields, _ = self._retry.popleft()
                self.lost += 1
                _log.critical(
                    "AUDIT RECORD LOST at shutdown: store unavailable; %s %s run=%s span=%s "
                    "trace=%s",
                    fields.get("category"),
                    fields.get("operation"),
                    fields.get("run_id"),
                    fields.get("span_id"),
                    fields.get("trace_id"),
                )

    def _record_metrics(self, entries: Sequence[Entry], outcome: str, seconds: float) -> None:
        # One observation per category of the append (an SDK instrument call costs ~8 us:
        # per record, that was the writer's largest cost), the counter by its record count.
        if self._metric is None or not entries:
            return
        try:
            if len(entries) == 1:  # the one caller's append: no Counter to build
                self._metric(str(entries[0][0].get("category")), outcome, seconds, count=1)
                return
            counts = collections.Counter(str(fields.get("category")) for fields, _ in entries)
            for category, count in counts.items():
                self._metric(category, outcome, seconds, count=count)
        except Exception:  # metrics must never break the audit path
            _log.debug("audit metrics failed", exc_info=True)


def _shorten(value: str) -> str:
    digest = hashlib.sha256(value.encode("utf-8", "backslashreplace")).hexdigest()
    return f"<{len(value)} characters, sha256 {digest}>"


def _shorten_log(value: Any) -> Any:
    return _shorten(value) if isinstance(value, str) and len(value) > _MAX_STUB_TEXT else value


def _isolate(entry: Entry) -> Entry:
    # A record that no store could hold would fail its whole group commit and then, under
    # "log", sit at the head of the retry queue failing everything behind it for ever.
    fields, payload = entry
    fixed, altered = storable(fields)
    if not altered:
        return entry
    _log.critical(
        "AUDIT RECORD ALTERED to be storable: field(s) %s held values no store can keep "
        "(lone surrogate, NaN, integer beyond 2^53, NUL in a query field); stored escaped as "
        "text: %s %s run=%s "
        "span=%s trace=%s",
        ", ".join(altered),
        fixed.get("category"),
        fixed.get("operation"),
        fixed.get("run_id"),
        fixed.get("span_id"),
        fixed.get("trace_id"),
    )
    return fixed, payload


def _error_type(exc: BaseException) -> str:
    # The error.type convention: fully-qualified class name, builtins without a module.
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _wrap(exc: BaseException) -> AuditUnavailable:
    error = AuditUnavailable(f"audit store append failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
