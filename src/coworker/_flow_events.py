"""Flow lifecycle events: what a flow did, written into the audit log as records (issue 14).

The flow code (``_scope.py``, ``flow.py``, ``_run/lifecycle.py``) calls the hooks below where a
flow starts, enters or leaves a step, breaks and ends; each hook is one line there, marked
``# flow event (issue 14)``. Without an audit trail (:func:`install` not called) every hook
returns after one global read, so ``import coworker`` and unaudited runs pay nothing.

The events are ordinary audit records (category ``flow``, kind ``outcome``, ``operation`` =
the event name) and go through the configured :class:`~coworker.audit.writer.AuditWriter`:
same chain, same group commit, same failure policy. :mod:`coworker.audit.fold` folds them
(with the flow's run records) into the flow's state; docs/flows.md describes both.

Batching, and what is durable when (each flow has its own queue and write lock): no event
waits for a transaction of its own. An event is queued on its flow and written in the same
transaction as the flow's next record (usually the run record that follows). A flow that
ends (completes, fails, breaks) has no next record: its queue becomes *due*, and rides with
the next record any flow writes, or is written by a background flusher once it has waited
:data:`DUE_DELAY` seconds; the seal, which names the flow's head, is formed once the events
before it are durable and goes the same way. ``force_flush()`` and ``shutdown()`` write
everything. So an event is durable before any later record of its flow, and a crash can
only take events that were still queued: the log may then say less than happened (a step
still running, a flow still active), never more. A failed write puts the events back at the
head of the queue and raises like a run record would (``"raise"`` policy) or is retried by
the writer (``"log"`` policy): never dropped.

This module imports nothing from :mod:`coworker.audit` at import time (the SDK line); the
record fields are built here and the writer is handed in by ``configure()``.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from coworker._run.lifecycle import Run
    from coworker._scope import Scope as _Scope
    from coworker.flow import Flow

__all__ = [
    "CATEGORY_FLOW",
    "DEFAULT_TYPES",
    "EVENTS",
    "FLOW_BROKEN",
    "FLOW_COMPLETED",
    "FLOW_EVENTS_VERSION",
    "FLOW_FAILED",
    "FLOW_SEALED",
    "FLOW_STARTED",
    "STEP_COMPLETED",
    "STEP_ENTERED",
    "STEP_FAILED",
    "STEP_RETRIED",
    "install",
    "live_state",
    "parse_types",
    "uninstall",
]

FLOW_EVENTS_VERSION: Final = 1
"""Version of the flow event fields, stored in every event as ``flow_event_v``."""

CATEGORY_FLOW: Final = "flow"
"""``category`` of every flow event record."""

FLOW_STARTED: Final = "flow-started"
STEP_ENTERED: Final = "step-entered"
STEP_RETRIED: Final = "step-retried"
STEP_COMPLETED: Final = "step-completed"
STEP_FAILED: Final = "step-failed"
FLOW_BROKEN: Final = "flow-broken"
FLOW_COMPLETED: Final = "flow-completed"
FLOW_FAILED: Final = "flow-failed"
FLOW_SEALED: Final = "flow-sealed"
EVENTS: Final = (
    FLOW_STARTED,
    STEP_ENTERED,
    STEP_RETRIED,
    STEP_COMPLETED,
    STEP_FAILED,
    FLOW_BROKEN,
    FLOW_COMPLETED,
    FLOW_FAILED,
    FLOW_SEALED,
)
"""Every event name, in lifecycle order."""

DEFAULT_TYPES: Final = frozenset({"workflow"})
"""Flow types that get events unless configured otherwise (``COWORKER_FLOW_EVENTS``)."""

_ENDED_KEPT: Final = 1024
"""Live states of ended flows kept for :func:`live_state` (the oracle tests read them)."""

_STEPS_KEPT: Final = 1024
"""Completed steps a live flow remembers (for attempt numbers): a conversation whose steps
emerge turn by turn would otherwise grow one entry per step for as long as it lives. A step
re-entered after being forgotten starts again at attempt 1 (the fold follows ``attempt``)."""

Entry = tuple[Mapping[str, Any], "bytes | None"]

DUE_DELAY: Final = 0.05
"""Seconds an ended flow's queued events (and seal) wait to ride with another flow's record
before the background flusher writes them on their own."""

FAILURE_REMINDER: Final = 60.0
"""Seconds between the flusher's reminders while its writes keep failing the same way: it
logs one line when a failure starts or changes, one when it ends, and this in between (it
retries every :data:`DUE_DELAY` doubling up to :data:`_RETRY_MAX`; nothing is dropped)."""

_RETRY_MAX: Final = 1.0

_log = logging.getLogger("coworker.audit")


class _Live:
    """What the emitting process itself knows of a flow (not derived from the log)."""

    __slots__ = (
        "current_step",
        "due_at",
        "ended",
        "flow",
        "head",
        "inflight",
        "lock",
        "pending",
        "scope",
        "sealed",
        "status",
        "steps",
        "trace_id",
    )

    def __init__(self) -> None:
        # The flow's queued events; ``lock`` serialises this flow's take-and-write so that its
        # events reach the log in emission order, while different flows write concurrently
        # (and share group commits). ``inflight`` counts take-and-writes under way.
        self.pending: collections.deque[Entry] = collections.deque()
        self.lock = threading.RLock()
        self.inflight = 0
        self.status = "active"
        self.current_step: str | None = None
        self.steps: dict[str, list[Any]] = {}  # step -> [attempts, outcome]
        self.head: tuple[int, str] | None = None  # (seq, hash hex) of the latest record seen
        self.ended = False  # its end (or break) is queued: no further event is accepted
        self.sealed = False  # its seal is formed (queued or written)
        self.due_at = 0.0  # monotonic time it became due (ended, events still queued)
        self.flow: Flow | None = None  # set at its end, for the seal
        self.scope: _Scope | None = None  # the scope its end was emitted in, for the seal
        self.trace_id: str | None = None  # its end's trace (the flow's span), for the seal

    def snapshot(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "current_step": self.current_step,
            "steps": {k: {"attempts": v[0], "outcome": v[1]} for k, v in self.steps.items()},
            "head_seq": self.head[0] if self.head is not None else None,
        }


# Process-wide state. _writer is read without the lock on the hot path (one global read);
# everything else changes under _lock.
_writer: Any = None
_types: frozenset[str] | None = DEFAULT_TYPES
_lock: Final = threading.Lock()
_settled: Final = threading.Condition(_lock)
"""Notified when a write of flow events is over, seals formed (``flush`` waits on it)."""
_writing = 0  # writes of flow events under way, from taking them to forming their seals
_FLUSH_TIMEOUT: Final = 30.0
_live: dict[str, _Live] = {}  # flows with events, not yet sealed (or whose seal is queued)
_ended: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
_step_runs: dict[int, tuple[Flow, str]] = {}  # id(run) -> (flow, step) for runs that opened a step
_due: dict[str, _Live] = {}  # ended flows whose events (or seal) are not all written yet
_flusher: _Flusher | None = None
_wait_seal = False  # configure(flow_seal="wait"): a flow's end waits for its seal


def parse_types(value: str | Iterable[str] | bool | None) -> frozenset[str] | None:
    """The flow types that get events, from ``configure(flow_events=...)`` or the env var.

    Args:
        value: ``None`` → :data:`DEFAULT_TYPES`; ``True`` or ``"all"`` / ``"*"`` → every type
            (returns ``None``); ``False`` or ``"none"`` / ``""`` → none; a comma-separated
            string or an iterable of flow types → those.

    Raises:
        ConfigError: a type is not a lower-case flow type name.
    """
    from coworker.exceptions import ConfigError
    from coworker.flow import _FLOW_TYPE_RE

    if value is None:
        return DEFAULT_TYPES
    if value is True:
        return None
    if value is False:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(i).strip().lower() for i in items]
    names = [n for n in names if n]
    if names in (["all"], ["*"]):
        return None
    if names in ([], ["none"]):
        return frozenset()
    for n in names:
        if not _FLOW_TYPE_RE.match(n):
            raise ConfigError(f"flow_events: {n!r} is not a flow type (e.g. 'workflow')")
    return frozenset(names)


def install(writer: Any, types: frozenset[str] | None, *, wait_seal: bool = False) -> None:
    """Send flow events of ``types`` (``None``: all) through ``writer`` (``configure()``);
    with ``wait_seal`` a flow's end returns once its end and seal are durable."""
    global _writer, _types, _flusher, _wait_seal
    try:
        # configure() flushed already (a failure there leaves the old configuration in
        # force); this catches what was queued since. Raising now would leave it half-applied.
        flush()
    except Exception:
        with _lock:
            kept = sum(len(live.pending) for live in _live.values())
        _log.exception(
            "coworker: %d flow events go to the new audit trail: the old one failed", kept
        )
    with _lock:
        _writer = writer
        _types = types
        _wait_seal = wait_seal
        if _flusher is None:
            _flusher = _Flusher()


def uninstall() -> None:
    """Write what is queued and stop emitting (``shutdown()`` / a new ``configure()``)."""
    global _writer, _flusher
    try:
        flush()
    except Exception:
        with _lock:
            lost = sum(len(live.pending) for live in _live.values())
        _log.exception("coworker: %d flow events could not be written at shutdown: lost", lost)
    finally:
        with _lock:
            _writer = None
            _live.clear()
            _step_runs.clear()
            _due.clear()
            flusher, _flusher = _flusher, None
        if flusher is not None:
            flusher.stop()


def live_state(flow_id: str) -> dict[str, Any] | None:
    """What this process recorded of flow ``flow_id`` as it ran (status, current step, steps
    with attempts and outcome, head seq), or ``None`` for a flow it has no events of.

    Kept for live flows and the last 1,024 ended ones; the tests compare it with the fold.
    """
    with _lock:
        live = _live.get(flow_id)
        if live is not None:
            return live.snapshot()
        return _ended.get(flow_id)


# -- hooks called by the flow code ------------------------------------------------------------


def block_entered(block: Any, scope: _Scope) -> None:
    """A ``flow`` / workflow start, ``step`` or conversation turn block was entered."""
    if _writer is None:
        return
    cell = scope.cell
    if cell is None:
        return
    kind = type(block).__name__
    f = cell.flow
    if kind in ("FlowBlock", "TurnBlock"):
        _ensure_started(f, scope)
    elif kind == "StepBlock" and _enabled(f):
        _ensure_started(f, scope)
        _step_entered(f, scope.step, scope)


def block_exited(block: Any, scope: _Scope, exc: BaseException | None) -> None:
    """A block is being left (``exc``: what it raised); ends steps and flows."""
    if _writer is None:
        return
    cell = scope.cell
    if cell is None:
        return
    kind = type(block).__name__
    f = cell.flow
    if kind == "StepBlock":
        if scope.step is not None and _running(f, scope.step):
            _step_ended(f, scope.step, scope, exc)
    elif kind == "FlowBlock" and _enabled(f):
        _end_flow(f, scope, exc)


def flow_broken(old: Flow, new: Flow) -> None:
    """``old`` was broken and replaced by ``new`` (``break_flow`` or an automatic break)."""
    if _writer is None:
        return
    from coworker._scope import SCOPE

    scope = SCOPE.get()
    if _enabled(old) and _known(old):
        with _lock:
            live = _live.get(old.id)
            if live is not None:
                for state in live.steps.values():
                    if state[1] == "running":
                        state[1] = "interrupted"
                live.status = "broken"
        _end(
            old,
            scope,
            _entry(
                FLOW_BROKEN,
                old,
                scope,
                step=None,
                extra={"next_flow_id": new.id, "break_reason": new.break_reason},
            ),
        )
    if _enabled(new):
        _ensure_started(new, scope)


def run_started(r: Run, scope: _Scope) -> None:
    """A run began; one that opens a step of its own (``step=`` or a conversation's assigned
    step, not its enclosing step) enters that step."""
    if _writer is None:
        return
    f = r.flow
    if f is None or r.step is None or r.step == scope.step or not _enabled(f):
        return
    _ensure_started(f, scope)
    with _lock:
        _step_runs[id(r)] = (f, r.step)
    _step_entered(f, r.step, scope)


def run_ended(r: Run, exc: BaseException | None) -> None:
    """A run is ending (before its span ends and its record is written)."""
    if _writer is None or not _step_runs:
        return
    with _lock:
        opened = _step_runs.pop(id(r), None)
    if opened is None:
        return
    f, step = opened
    if not _running(f, step):
        return
    from coworker._scope import SCOPE

    # Queued: an audited run's record, written as its span ends, carries it; any other run's
    # outcome goes with the flow's next record (or its end).
    _step_ended(f, step, SCOPE.get(), exc)


# -- writing ---------------------------------------------------------------------------------


def flush() -> None:
    """Write every queued event now, seals included (``force_flush``, ``shutdown``).

    Also waits for writes of flow events other threads (the flusher) have under way: their
    events are no longer queued, yet not durable, and their seals are formed only after.

    Raises:
        AuditUnavailable: a write failed, or events were still queued or being written
            after ``_FLUSH_TIMEOUT`` seconds (they stay queued).
    """
    deadline = time.monotonic() + _FLUSH_TIMEOUT
    while True:
        with _lock:
            lives = [live for live in _live.values() if live.pending]
        for live in lives:
            _write(live, [])
        with _settled:
            remaining = deadline - time.monotonic()
            if not _settled.wait_for(lambda: _writing == 0, timeout=max(remaining, 0.0)):
                # Returning would let the caller act as if they were durable: configure()
                # would swap the trail under a write still under way (its events then land
                # in the new store), shutdown would drop them.
                raise _not_flushed("still being written")
            if not any(live.pending for live in _live.values()):
                return  # nothing queued, nothing in flight: every seal is formed and written
        if time.monotonic() >= deadline:
            raise _not_flushed("still queued")


def _not_flushed(state: str) -> Exception:
    from coworker.exceptions import AuditUnavailable

    return AuditUnavailable(
        f"coworker: flush: flow events {state} after {_FLUSH_TIMEOUT}s "
        "(the audit store is not taking them; they stay queued)"
    )


def write_with_events(writer: Any, entry: Entry) -> list[Any]:
    """Write a run record, preceded in the same transaction by its flow's queued events and
    by the queued events of flows that ended (due).

    The audit span processor's one write call (``pipeline.py``).
    """
    live = _live.get(entry[0].get("flow_id") or "") if _live else None
    if live is None or (not live.pending and not live.inflight):
        # Nothing queued for its flow and no flush of it under way: a plain write (the
        # common case). Otherwise the record waits for that flush, so that it never lands
        # before an event of its flow emitted earlier.
        if not _due:
            records = writer.write([entry])
            if live is not None:
                _observe([entry], records)
            return list(records)
        return _write_due(writer, [entry])
    return _write(live, [entry], writer)


def _write(live: _Live, tail: Sequence[Entry], writer: Any = None) -> list[Any]:
    global _writing
    with live.lock:
        with _lock:
            taken = list(live.pending)
            live.pending.clear()
            live.inflight += 1
            _writing += 1  # with the take: flush() never sees them neither queued nor in flight
        try:
            return _write_taken(writer, taken + list(tail), [(live, taken)])
        finally:
            _written()


def _write_due(
    writer: Any,
    tail: Sequence[Entry],
    taken: list[tuple[_Live, list[Entry]]] | None = None,
) -> list[Any]:
    """Write ``tail`` behind the events of every due flow, in one transaction; put back what
    was taken if the write fails. Returns the records of ``tail``.

    ``taken``: flows whose events are in ``tail`` and whose ``inflight`` the caller raised;
    this lowers it again, as it does for every due flow it takes.
    """
    global _writing
    # Counted from taking the events to forming their seals: until then flush() waits.
    with _lock:
        _writing += 1
    try:
        return _write_taken(writer, tail, taken)
    finally:
        _written()


def _written() -> None:
    global _writing
    with _settled:
        _writing -= 1
        _settled.notify_all()


def _write_taken(
    writer: Any, tail: Sequence[Entry], taken: list[tuple[_Live, list[Entry]]] | None
) -> list[Any]:
    taken = taken or []
    due_entries: list[Entry] = []
    try:
        with _lock:
            for live in list(_due.values()):
                if live.pending and not live.inflight:  # not being written by another thread
                    mine = list(live.pending)
                    live.pending.clear()
                    live.inflight += 1
                    taken.append((live, mine))
                    due_entries.extend(mine)
        entries = due_entries + list(tail)
        if not entries:
            return []
        w = writer if writer is not None else _writer
        if w is None:  # uninstalled meanwhile: keep them for the next writer
            _put_back(taken)
            return []
        try:
            records = w.write(entries)
        except BaseException:
            _put_back(taken)  # not durable: back, in order, ahead of anything queued since
            raise
        _observe(entries, records)
    finally:
        with _lock:
            for live, _ in taken:
                live.inflight -= 1
    _settle([live for live, _ in taken])
    return list(records)[len(due_entries) :]


def _put_back(taken: Sequence[tuple[_Live, list[Entry]]]) -> None:
    with _lock:
        for live, entries in taken:
            live.pending.extendleft(reversed(entries))


def _settle(lives: Sequence[_Live]) -> None:
    """After a durable write: seal the ended flows whose events are now all written (the
    seal names the head they reached), retire the sealed ones."""
    from coworker._scope import EMPTY_SCOPE

    with _lock:
        todo = [live for live in lives if live.ended and not live.pending]
    for live in todo:
        with _lock:
            # Another thread writing this flow's events right now settles it after them.
            if live.pending or live.inflight or live.flow is None:
                continue
            if live.sealed:
                _retire(live.flow.id)
                continue
            live.sealed = True
            head, status, f = live.head, live.status, live.flow
        extra: dict[str, Any] = {
            "head_seq": head[0] if head is not None else None,
            "head_hash": head[1] if head is not None else None,
            "flow_status": status,
            "fold_version": _fold_version(),
        }
        seal = _entry(FLOW_SEALED, f, live.scope or EMPTY_SCOPE, step=None, extra=extra)
        # Formed later, maybe in the flusher's thread: it names the trace its end was in.
        seal[0]["trace_id"] = live.trace_id  # type: ignore[index]
        with _lock:
            live.pending.append(seal)
            live.due_at = time.monotonic()
            _due[f.id] = live
        if _flusher is not None:
            _flusher.wake()


def _observe(entries: Sequence[Entry], records: Sequence[Any]) -> None:
    """Move the heads of live flows to the records just written."""
    if len(records) != len(entries):
        # Durable but not sealed yet (a spooling store) or kept for retry: the flows of these
        # entries have a head this process cannot know; their seal says so (head null).
        with _lock:
            for fields, _ in entries:
                live = _live.get(fields.get("flow_id") or "")
                if live is not None:
                    live.head = None
        return
    with _lock:
        for (fields, _), rec in zip(entries, records, strict=True):
            live = _live.get(fields.get("flow_id") or "")
            if live is not None and (live.head is None or rec.seq > live.head[0]):
                live.head = (rec.seq, rec.hash.hex())


def _emit(entry: Entry) -> None:
    with _lock:
        live = _live.get(entry[0]["flow_id"])
        if live is None or live.ended:  # sealed meanwhile (a late step of a broken flow)
            return
        live.pending.append(entry)


class _Flusher:
    """A daemon thread writing the events of ended flows that no other write took along
    within :data:`DUE_DELAY` seconds (so that a quiet process still writes its seals)."""

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = False
        self.failures = _FailureLog()
        self._thread = threading.Thread(target=self._run, name="coworker-flow-events", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            while not self._stop:
                with _lock:
                    waiting = [live for live in _due.values() if live.pending]
                if not waiting:
                    break
                wait = min(live.due_at for live in waiting) + DUE_DELAY - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                    continue
                try:
                    _write_due(None, [])
                except Exception as exc:  # kept queued: force_flush/shutdown surface it
                    time.sleep(self.failures.failed(exc))
                else:
                    self.failures.succeeded()


class _FailureLog:
    """What the flusher says while its writes fail: a line when a failure starts or changes
    (its type and message, digits aside), a reminder every :data:`FAILURE_REMINDER` seconds
    while it lasts, a line when writing works again. A store that is down for an hour is
    three lines and a reminder a minute, not one line per retry (20 a second).

    Attributes:
        attempts: failed attempts since the last success.
    """

    def __init__(self) -> None:
        self.attempts = 0
        self._state: str | None = None
        self._since = 0.0
        self._said = 0.0

    def failed(self, exc: BaseException) -> float:
        """Note a failed write; return the seconds to wait before the next attempt."""
        now = time.monotonic()
        state = re.sub(r"\d+", "#", f"{type(exc).__name__}: {exc}")
        self.attempts += 1
        if state != self._state:
            self._state, self._since, self._said = state, now, now
            _log.warning(
                "coworker: flow events of ended flows not yet written (kept queued, retrying; "
                "said again every %gs while this lasts): %s",
                FAILURE_REMINDER,
                exc,
            )
        elif now - self._said >= FAILURE_REMINDER:
            self._said = now
            _log.warning(
                "coworker: flow events still not written after %d attempts over %.0fs (kept "
                "queued, retrying): %s",
                self.attempts,
                now - self._since,
                exc,
            )
        return float(min(DUE_DELAY * 2 ** min(self.attempts - 1, 16), _RETRY_MAX))

    def succeeded(self) -> None:
        """Note a successful write (says so once after failures)."""
        if self._state is not None:
            _log.warning(
                "coworker: flow events written again after %d failed attempts over %.0fs",
                self.attempts,
                time.monotonic() - self._since,
            )
        self._state = None
        self.attempts = 0


def _retire(flow_id: str) -> None:
    """Forget a sealed flow (under ``_lock``), keeping its last live state for a while."""
    _due.pop(flow_id, None)
    done = _live.pop(flow_id, None)
    if done is not None:
        _ended[flow_id] = done.snapshot()
        while len(_ended) > _ENDED_KEPT:
            _ended.popitem(last=False)


def _after_fork_in_child() -> None:
    """A forked child keeps what it knows of its parent's flows but none of their queued
    events: the parent writes those (and their seals). A child writing them too, with its
    own next record, would put each in the log twice and seal the flow twice. Locks held
    by threads the child does not have are replaced, and the flusher thread, which did not
    survive the fork, is started again."""
    global _flusher, _writing
    _lock._at_fork_reinit()  # type: ignore[attr-defined]  # held by a vanished thread?
    _writing = 0
    for flow_id, live in list(_live.items()):
        live.pending.clear()
        live.inflight = 0
        live.lock = threading.RLock()
        if live.ended:  # the parent seals it; here it is over
            _retire(flow_id)
    _due.clear()
    _step_runs.clear()  # runs the parent had open: their step outcomes are the parent's
    _flusher = _Flusher() if _flusher is not None else None


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- events ----------------------------------------------------------------------------------


def _enabled(f: Flow) -> bool:
    types = _types
    return types is None or f.type in types


def _known(f: Flow) -> bool:
    with _lock:
        return f.id in _live


def _running(f: Flow, step: str) -> bool:
    with _lock:
        live = _live.get(f.id)
        return live is not None and not live.ended and live.steps.get(step, [0, ""])[1] == "running"


def _ensure_started(f: Flow, scope: _Scope) -> None:
    if not _enabled(f):
        return
    with _lock:
        if f.id in _live or f.id in _ended:
            return
        _live[f.id] = _Live()
    extra: dict[str, Any] = {}
    if f.definition is not None:
        extra["definition_id"] = f.definition.id
        extra["definition_steps"] = ",".join(f.definition.steps)
    if f.previous_id is not None:
        extra["previous_flow_id"] = f.previous_id
        extra["break_reason"] = f.break_reason
    _emit(_entry(FLOW_STARTED, f, scope, step=None, extra=extra))


def _step_entered(f: Flow, step: str | None, scope: _Scope) -> None:
    if step is None:
        return
    with _lock:
        live = _live.get(f.id)
        if live is None or live.ended:
            return
        state = live.steps.setdefault(step, [0, "running"])
        retried = state[0] > 0 and state[1] == "failed"
        state[0] += 1
        state[1] = "running"
        attempt = state[0]
        live.current_step = step
        live.status = "active"
    event = STEP_RETRIED if retried else STEP_ENTERED
    _emit(_entry(event, f, scope, step=step, extra={"attempt": attempt}))


def _step_ended(f: Flow, step: str, scope: _Scope, exc: BaseException | None) -> None:
    # A generator run ends with StopIteration when exhausted: that is its success.
    failed = (
        exc is not None
        and not isinstance(exc, StopIteration | StopAsyncIteration)
        and _is_failure(exc)
    )
    with _lock:
        live = _live.get(f.id)
        if live is None or live.ended:
            return
        state = live.steps[step]
        state[1] = "failed" if failed else "completed"
        attempt = state[0]
        if len(live.steps) > _STEPS_KEPT:
            for key, value in live.steps.items():  # the oldest completed one
                if value[1] == "completed" and key != step:
                    del live.steps[key]
                    break
        if failed:
            live.status = "blocked"
    event = STEP_FAILED if failed else STEP_COMPLETED
    outcome = _error_type(exc) if failed and exc is not None else "ok"
    _emit(_entry(event, f, scope, step=step, extra={"attempt": attempt}, outcome=outcome))


def _end_flow(f: Flow, scope: _Scope, exc: BaseException | None) -> None:
    _ensure_started(f, scope)
    failed = exc is not None and _is_failure(exc)
    with _lock:
        live = _live.get(f.id)
        if live is None or live.ended:
            return
        live.status = "failed" if failed else "completed"
    outcome = _error_type(exc) if failed and exc is not None else "ok"
    event = FLOW_FAILED if failed else FLOW_COMPLETED
    _end(f, scope, _entry(event, f, scope, step=None, extra={}, outcome=outcome))


def _end(f: Flow, scope: _Scope, entry: Entry) -> None:
    """Queue the flow's last event and make its queue due: it rides with the next record
    any flow writes (or the flusher's write); the seal follows once it is durable."""
    with _lock:
        live = _live.get(f.id)
        if live is None or live.ended:
            return
        live.pending.append(entry)
        live.ended = True  # no event of this flow is accepted after its end
        live.flow = f
        live.scope = scope
        live.trace_id = entry[0].get("trace_id")
        live.due_at = time.monotonic()
        _due[f.id] = live
    if _wait_seal:
        # configure(flow_seal="wait"): the block exits once its end and seal are durable
        # (two transactions), raising like a run record would if they cannot be written.
        for _ in range(2):
            _write(live, [])
    elif _flusher is not None:
        _flusher.wake()


def _fold_version() -> int:
    from coworker.audit.fold import FOLD_VERSION

    return FOLD_VERSION


def _is_failure(exc: BaseException) -> bool:
    from coworker._run.lifecycle import is_failure as failure

    return failure(exc)


def _error_type(exc: BaseException) -> str:
    from coworker._run.lifecycle import error_type

    return error_type(exc)


def _entry(
    event: str,
    f: Flow,
    scope: _Scope,
    *,
    step: str | None,
    extra: Mapping[str, Any],
    outcome: str = "ok",
) -> Entry:
    from opentelemetry import trace

    from coworker.audit.record import SCHEMA_VERSION, format_time

    now = format_time(time.time_ns())
    identity = scope.identity
    user = identity.user if identity is not None else None
    agent = identity.agent if identity is not None else None
    ctx = trace.get_current_span().get_span_context()
    fields: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "kind": "outcome",
        "recorded_at": now,
        "category": CATEGORY_FLOW,
        "operation": event,
        "doctype": None,
        "name": event,
        "outcome": outcome,
        "error_type": None if outcome == "ok" else outcome,
        # No run or span id: an event is not a run's record. Sharing the run's span id would
        # let a step event close that run's fail-closed intent (in-doubt detection pairs an
        # intent with the next outcome of the same span) and would add a node to its tree.
        "run_id": None,
        "parent_run_id": None,
        "chain_id": None,
        "flow_type": f.type,
        "flow_id": f.id,
        "step_id": step,
        "user_id": user.id if user is not None else None,
        "agent_id": agent.id if agent is not None else None,
        "agent_name": agent.name if agent is not None else None,
        "session_id": identity.session if identity is not None else None,
        "conversation_id": f.conversation_id,
        "service": None,
        "trace_id": format(ctx.trace_id, "032x") if ctx.is_valid else None,  # finds the trace
        "span_id": None,
        "parent_span_id": None,
        "start": now,
        "end": now,
        "intent_seq": None,
        "payload_digest": None,
        "flow_event_v": FLOW_EVENTS_VERSION,
    }
    fields.update(extra)
    return fields, None
