"""A flow's state as a fold over its records in the audit log (issue 14, docs/flows.md).

The log is the only authority: a flow's status, current step, per-step outcomes and attempts,
transitions and participants are never stored as a mutable row, they are computed here from
the flow's records (its flow events, category ``flow``, and its run records) in ``seq`` order.
The functions are pure: the same records give the same :class:`FlowState`, and folding a
prefix of the records gives exactly what :func:`replay` returns as of that point.

The fold has a version (:data:`FOLD_VERSION`). A flow's seal records the version of the fold
that the writing process used and the status it saw; replaying a flow sealed under an older
fold with this one must be asked for (``newer_fold=True``, ``--newer-fold``), so that a
changed rule never silently re-labels history. Under the same version, the fold's status must
equal the sealed one (:attr:`Seal.status_matches`): the "fold == stored" oracle.

Reading: :func:`replay` reads only the records of one flow through the stores' ``flow_id``
index (SQLite ``audit_records_flow``, PostgreSQL ``records_flow``, both on
``(flow_id, seq)``); :func:`list_flows` reads only flow events (``category = 'flow'``:
SQLite's ``audit_records_category`` index; on PostgreSQL :func:`ensure_indexes` adds
``records_category`` with ``CREATE INDEX IF NOT EXISTS``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from coworker._flow_events import (
    CATEGORY_FLOW,
    FLOW_BROKEN,
    FLOW_COMPLETED,
    FLOW_EVENTS_VERSION,
    FLOW_FAILED,
    FLOW_SEALED,
    FLOW_STARTED,
    STEP_COMPLETED,
    STEP_ENTERED,
    STEP_FAILED,
    STEP_RETRIED,
)
from coworker.audit.store import AuditStore, StoredRecord
from coworker.exceptions import CoworkerError

__all__ = [
    "FOLD_VERSION",
    "STATUSES",
    "FlowHead",
    "FlowState",
    "FlowSummary",
    "FoldVersionError",
    "Seal",
    "StepState",
    "Transition",
    "ensure_indexes",
    "fold",
    "list_flows",
    "replay",
]

_log = logging.getLogger("coworker.audit")

FOLD_VERSION: Final = 1
"""Version of the folding rules below; recorded in every :class:`FlowState` and seal."""

ACTIVE: Final = "active"
BLOCKED: Final = "blocked"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
BROKEN: Final = "broken"
STATUSES: Final = (ACTIVE, BLOCKED, COMPLETED, FAILED, BROKEN)
"""``active``: started, not ended, no step waiting on a failure. ``blocked``: the latest step
outcome is a failure (a failed or denied step) and nothing has run since. ``completed`` /
``failed``: the flow's block ended normally / with an exception. ``broken``: the flow was
replaced by a new one (``next_flow_id``) for the reason given."""


class FoldVersionError(CoworkerError):
    """The records were written under another fold (or event) version than this one."""


@dataclass(frozen=True, slots=True)
class StepState:
    """One step of a flow, folded.

    Attributes:
        step_id: the step.
        attempts: how many times it was entered.
        outcome: ``running``, ``completed``, ``failed`` or ``interrupted`` (the flow broke
            while it ran).
        error_type: the error of the latest failed attempt, if any.
        first_seq: seq of the event that first entered it.
        last_seq: seq of its latest event.
        runs: audited run records with this step (a retry inside one attempt shows here).
        failed_runs: those whose outcome is not ``ok``.
    """

    step_id: str
    attempts: int
    outcome: str
    error_type: str | None
    first_seq: int
    last_seq: int
    runs: int = 0
    failed_runs: int = 0


@dataclass(frozen=True, slots=True)
class Transition:
    """One flow event and what it changed.

    Attributes:
        seq: the event's seq.
        at: its ``recorded_at``.
        event: the event name (``step-failed`` ...).
        step_id: the step it concerns, if any.
        status_from: the status before (``None`` before ``flow-started``).
        status_to: the status after.
    """

    seq: int
    at: str | None
    event: str
    step_id: str | None
    status_from: str | None
    status_to: str


@dataclass(frozen=True, slots=True)
class FlowHead:
    """The latest record of a flow: its seq and hash (hex)."""

    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class Seal:
    """The seal record of a flow.

    Attributes:
        seq: the seal record's own seq (``coworker audit prove SEQ`` proves it is in the log).
        head_seq: the flow's head when it was sealed (``None``: the writer could not know
            it, e.g. the records were spooled during a PostgreSQL outage).
        head_hash: that head's hash (hex).
        head_matches: the record at ``head_seq`` belongs to the flow and has that hash
            (``None`` when the seal names no head).
        flow_status: the status the writing process saw.
        status_matches: the fold's status at the seal equals ``flow_status`` (``None`` when
            replayed with a newer fold).
        fold_version: the fold version of the writing process.
    """

    seq: int
    head_seq: int | None
    head_hash: str | None
    head_matches: bool | None
    flow_status: str | None
    status_matches: bool | None
    fold_version: int | None


@dataclass(frozen=True, slots=True)
class FlowState:
    """A flow as folded from its records (what :func:`replay` returns).

    Attributes:
        flow_id: the flow.
        flow_type: ``workflow``, ``ai-conversation`` ... (``None`` with no record saying).
        status: one of :data:`STATUSES`.
        current_step: the latest step entered, or ``None``.
        steps: every step entered, in order of first entry.
        transitions: every flow event, in order, with the status change it made.
        users: distinct ``user.id`` of all its records, sorted.
        agents: distinct ``gen_ai.agent.id`` of all its records, sorted.
        definition_id: the workflow definition it was started from.
        definition_steps: that definition's steps.
        previous_flow_id: the flow this one broke from.
        break_reason: why that flow broke.
        next_flow_id: the flow this one broke into (status ``broken``).
        next_break_reason: why this one broke.
        error_type: the error a ``failed`` flow ended with.
        started_at: ``recorded_at`` of ``flow-started``.
        ended_at: of the event that ended it (completed, failed, broken).
        head: the latest record folded (``None``: no record).
        seal: the seal, once sealed.
        records: records folded (events and runs).
        events: flow events folded.
        runs: run records folded.
        failed_runs: run records whose outcome is not ``ok``.
        after_seal: records of the flow written after its seal (late writers).
        as_of: the ``as_of`` the fold stopped at (a seq, an RFC 3339 time, or ``None``).
        fold_version: :data:`FOLD_VERSION` of the fold that computed this.
    """

    flow_id: str
    flow_type: str | None
    status: str
    current_step: str | None
    steps: tuple[StepState, ...]
    transitions: tuple[Transition, ...]
    users: tuple[str, ...]
    agents: tuple[str, ...]
    definition_id: str | None
    definition_steps: tuple[str, ...]
    previous_flow_id: str | None
    break_reason: str | None
    next_flow_id: str | None
    next_break_reason: str | None
    error_type: str | None
    started_at: str | None
    ended_at: str | None
    head: FlowHead | None
    seal: Seal | None
    records: int
    events: int
    runs: int
    failed_runs: int
    after_seal: int
    as_of: int | str | None
    fold_version: int = FOLD_VERSION

    def step(self, step_id: str) -> StepState | None:
        """The state of ``step_id``, or ``None`` if it was never entered."""
        for s in self.steps:
            if s.step_id == step_id:
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what ``coworker audit flow --json`` prints)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class FlowSummary:
    """One line of :func:`list_flows`: a flow folded from its flow events only.

    Attributes:
        flow_id, flow_type, status, current_step, started_at, ended_at: as in
            :class:`FlowState` (identical: they depend on flow events only).
        previous_flow_id: the flow it broke from.
        sealed: a seal event exists.
        events: flow events folded.
    """

    flow_id: str
    flow_type: str | None
    status: str
    current_step: str | None
    started_at: str | None
    ended_at: str | None
    previous_flow_id: str | None
    sealed: bool
    events: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


@dataclass
class _Folder:
    """The mutable accumulator behind :func:`fold`; fed one record at a time, in seq order."""

    flow_id: str
    newer_fold: bool = False
    light: bool = False  # list_flows: no hashes, no transitions (100,000s of flows in memory)
    flow_type: str | None = None
    status: str | None = None
    current_step: str | None = None
    steps: dict[str, list[Any]] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    agents: set[str] = field(default_factory=set)
    definition_id: str | None = None
    definition_steps: tuple[str, ...] = ()
    previous_flow_id: str | None = None
    break_reason: str | None = None
    next_flow_id: str | None = None
    next_break_reason: str | None = None
    error_type: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    head: FlowHead | None = None
    hashes: dict[int, str] = field(default_factory=dict)
    seal: Seal | None = None
    records: int = 0
    events: int = 0
    runs: int = 0
    failed_runs: int = 0
    after_seal: int = 0
    ended: bool = False

    def feed(self, seq: int, hash_hex: str, f: dict[str, Any]) -> None:
        self.records += 1
        if not self.light:
            self.head = FlowHead(seq, hash_hex)
            self.hashes[seq] = hash_hex
        if self.seal is not None:
            self.after_seal += 1
        user, agent = f.get("user_id"), f.get("agent_id")
        if isinstance(user, str):
            self.users.add(user)
        if isinstance(agent, str):
            self.agents.add(agent)
        if self.flow_type is None and isinstance(f.get("flow_type"), str):
            self.flow_type = f["flow_type"]
        if f.get("category") != CATEGORY_FLOW or f.get("kind") != "outcome":
            if f.get("kind") == "outcome":
                failed = f.get("outcome") != "ok"
                self.runs += 1
                self.failed_runs += failed
                state = self.steps.get(f.get("step_id"))  # type: ignore[arg-type]
                if state is not None:
                    state[5] += 1
                    state[6] += failed
            return
        self.event(seq, f)

    def event(self, seq: int, f: dict[str, Any]) -> None:
        version = f.get("flow_event_v")
        if type(version) is int and version > FLOW_EVENTS_VERSION:
            raise FoldVersionError(
                f"record {seq} is a flow event of version {version}; this coworker folds "
                f"version {FLOW_EVENTS_VERSION}: upgrade coworker to read it"
            )
        self.events += 1
        name = f.get("operation")
        step = f.get("step_id") if isinstance(f.get("step_id"), str) else None
        at = f.get("recorded_at")
        before = self.status
        status = before or ACTIVE
        if name == FLOW_STARTED:
            status = ACTIVE
            self.started_at = at
            self.flow_type = f.get("flow_type") or self.flow_type
            self.definition_id = f.get("definition_id")
            raw_steps = f.get("definition_steps")
            self.definition_steps = tuple(raw_steps.split(",")) if raw_steps else ()
            self.previous_flow_id = f.get("previous_flow_id")
            self.break_reason = f.get("break_reason")
        elif name in (STEP_ENTERED, STEP_RETRIED) and step is not None and not self.ended:
            state = self.steps.setdefault(step, [0, "running", None, seq, seq, 0, 0])
            attempt = f.get("attempt")
            state[0] = attempt if type(attempt) is int else state[0] + 1
            state[1] = "running"
            state[4] = seq
            self.current_step = step
            status = ACTIVE
        elif name in (STEP_COMPLETED, STEP_FAILED) and step is not None and not self.ended:
            state = self.steps.setdefault(step, [0, "running", None, seq, seq, 0, 0])
            state[4] = seq
            if name == STEP_FAILED:
                state[1] = "failed"
                state[2] = f.get("error_type") or f.get("outcome")
                status = BLOCKED
            else:
                state[1] = "completed"
                status = ACTIVE
        elif name == FLOW_BROKEN and not self.ended:
            for state in self.steps.values():
                if state[1] == "running":
                    state[1] = "interrupted"
            status = BROKEN
            self.ended = True
            self.ended_at = at
            self.next_flow_id = f.get("next_flow_id")
            self.next_break_reason = f.get("break_reason")
        elif name in (FLOW_COMPLETED, FLOW_FAILED) and not self.ended:
            status = COMPLETED if name == FLOW_COMPLETED else FAILED
            self.ended = True
            self.ended_at = at
            if name == FLOW_FAILED:
                self.error_type = f.get("error_type") or f.get("outcome")
        elif name == FLOW_SEALED and self.seal is None:
            self.seal = self._seal(seq, f, status)
        self.status = status
        if not self.light:
            self.transitions.append(Transition(seq, at, str(name), step, before, status))

    def _seal(self, seq: int, f: dict[str, Any], status: str) -> Seal:
        version = f.get("fold_version")
        version = version if type(version) is int else None
        if version is not None and version > FOLD_VERSION:
            raise FoldVersionError(
                f"flow {self.flow_id!r} was sealed under fold version {version}; this coworker "
                f"folds version {FOLD_VERSION}: upgrade coworker to replay it"
            )
        if version != FOLD_VERSION and not self.newer_fold:
            raise FoldVersionError(
                f"flow {self.flow_id!r} was sealed under fold version {version}; replaying it "
                f"with fold version {FOLD_VERSION} must be asked for (newer_fold=True, "
                "coworker audit flow --newer-fold)"
            )
        head_seq = f.get("head_seq") if type(f.get("head_seq")) is int else None
        head_hash = f.get("head_hash") if isinstance(f.get("head_hash"), str) else None
        matches = None if head_seq is None else self.hashes.get(head_seq) == head_hash
        sealed_status = f.get("flow_status")
        return Seal(
            seq=seq,
            head_seq=head_seq,
            head_hash=head_hash,
            head_matches=matches,
            flow_status=sealed_status,
            status_matches=None if version != FOLD_VERSION else sealed_status == status,
            fold_version=version,
        )

    def state(self, as_of: int | str | None) -> FlowState:
        steps = sorted(self.steps.items(), key=lambda kv: kv[1][3])
        return FlowState(
            flow_id=self.flow_id,
            flow_type=self.flow_type,
            status=self.status or ACTIVE,
            current_step=self.current_step,
            steps=tuple(StepState(k, *v) for k, v in steps),
            transitions=tuple(self.transitions),
            users=tuple(sorted(self.users)),
            agents=tuple(sorted(self.agents)),
            definition_id=self.definition_id,
            definition_steps=self.definition_steps,
            previous_flow_id=self.previous_flow_id,
            break_reason=self.break_reason,
            next_flow_id=self.next_flow_id,
            next_break_reason=self.next_break_reason,
            error_type=self.error_type,
            started_at=self.started_at,
            ended_at=self.ended_at,
            head=self.head,
            seal=self.seal,
            records=self.records,
            events=self.events,
            runs=self.runs,
            failed_runs=self.failed_runs,
            after_seal=self.after_seal,
            as_of=as_of,
        )


def _as_of_bound(as_of: int | datetime | str | None) -> tuple[int | None, str | None]:
    if as_of is None:
        return None, None
    if isinstance(as_of, bool):
        raise TypeError("as_of must be a seq (int), a datetime or an RFC 3339 string")
    if isinstance(as_of, int):
        return as_of, None
    if isinstance(as_of, datetime):
        if as_of.tzinfo is None:
            raise ValueError("as_of datetime must be timezone-aware (e.g. tzinfo=timezone.utc)")
        from coworker.audit.record import format_time

        # Exact integer microseconds (timestamp() is a float and rounds).
        micros = (as_of - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        ns = micros * 1000 + 999  # inclusive: every record within that microsecond
        return None, format_time(ns)
    if isinstance(as_of, str):
        return None, as_of
    raise TypeError("as_of must be a seq (int), a datetime or an RFC 3339 string")


def fold(
    records: Iterable[StoredRecord],
    flow_id: str,
    *,
    as_of: int | datetime | str | None = None,
    newer_fold: bool = False,
) -> FlowState:
    """Fold records (in seq order) into the state of flow ``flow_id``; pure.

    Records of other flows are skipped (so a caller may pass a superset); the body is what
    is read, never an index column.

    Args:
        records: stored records in ascending seq order.
        flow_id: the flow to fold.
        as_of: stop at this seq (inclusive), or at this time (records whose ``recorded_at``
            is at or before it: a timezone-aware ``datetime`` or an RFC 3339 UTC string).
        newer_fold: accept a seal written under an older :data:`FOLD_VERSION`.

    Returns:
        The :class:`FlowState`.

    Raises:
        FoldVersionError: a record is from a newer coworker, or the flow was sealed under
            another fold version and ``newer_fold`` is false.
    """
    max_seq, max_time = _as_of_bound(as_of)
    folder = _Folder(flow_id, newer_fold=newer_fold)
    for rec in records:
        if max_seq is not None and rec.seq > max_seq:
            break
        f = json.loads(rec.body)
        if f.get("flow_id") != flow_id:
            continue
        if max_time is not None:
            at = f.get("recorded_at")
            if not isinstance(at, str) or at > max_time:
                continue
        folder.feed(rec.seq, rec.hash.hex(), f)
    bound: int | str | None = max_seq if max_seq is not None else max_time
    return folder.state(bound)


def _search(store: AuditStore, filters: dict[str, str]) -> Iterator[StoredRecord]:
    search = getattr(store, "search", None)
    if search is not None:
        return search(filters)  # type: ignore[no-any-return]
    key, value = next(iter(filters.items()))
    column = {"flow_id": "flow_id", "category": "category"}[key]
    return (r for r in store.iter_from(1) if r.fields().get(column) == value)


def replay(
    store: AuditStore,
    flow_id: str,
    as_of: int | datetime | str | None = None,
    *,
    newer_fold: bool = False,
) -> FlowState:
    """The state of flow ``flow_id`` folded from ``store``, as of now or an earlier point.

    Reads only that flow's records, through the store's ``flow_id`` index.

    Args:
        store: an audit store (SQLite, PostgreSQL, in-memory).
        flow_id: the full flow id (``coworker.audit.query.resolve_flow_id`` turns a prefix
            into one).
        as_of: a seq (inclusive) or a time (timezone-aware ``datetime`` or RFC 3339 UTC).
        newer_fold: accept a seal written under an older fold version.

    Returns:
        The frozen :class:`FlowState`.

    Raises:
        LookupError: the store holds no record of the flow (as of that point).
        FoldVersionError: see :func:`fold`.
    """
    state = fold(_search(store, {"flow_id": flow_id}), flow_id, as_of=as_of, newer_fold=newer_fold)
    if state.records == 0:
        when = " as of that point" if as_of is not None else ""
        raise LookupError(f"no audit records for flow {flow_id!r}{when}")
    return state


def ensure_indexes(store: AuditStore) -> bool:
    """Make sure listing flows reads flow events through an index.

    SQLite stores have ``audit_records_category`` already. A PostgreSQL store gets
    ``records_category ON records (category, seq)`` (``CREATE INDEX IF NOT EXISTS``; a role
    that may not create it just scans, with a warning).

    Returns:
        ``True`` when an index serves ``category = 'flow'``.
    """
    if type(store).__name__ != "PostgresStore":
        return True
    from psycopg import sql

    table = store._table  # type: ignore[attr-defined]
    ddl = sql.SQL("CREATE INDEX IF NOT EXISTS records_category ON {} (category, seq)").format(table)
    try:
        with store._lock:  # type: ignore[attr-defined]
            conn = store._connection()  # type: ignore[attr-defined]
            try:
                with conn.cursor() as cur:
                    cur.execute(ddl)
                conn.commit()
            except Exception:
                conn.rollback()
                raise
    except Exception as exc:
        _log.warning("coworker: cannot create the flow listing index (%s); scanning", exc)
        return False
    return True


def list_flows(
    store: AuditStore,
    *,
    status: str | None = None,
    flow_type: str | None = None,
    since: str | None = None,
) -> list[FlowSummary]:
    """Every flow that has flow events, with its folded status, oldest first.

    Reads only flow events (index on ``category``); statuses equal :func:`replay`'s.

    Args:
        store: the audit store.
        status: keep flows with this status (one of :data:`STATUSES`).
        flow_type: keep flows of this type.
        since: keep flows started at or after this RFC 3339 UTC time.

    Raises:
        ValueError: an unknown ``status``.
        FoldVersionError: a record from a newer coworker.
    """
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    ensure_indexes(store)
    folders: dict[str, _Folder] = {}
    for rec in _search(store, {"category": CATEGORY_FLOW}):
        f = json.loads(rec.body)
        flow_id = f.get("flow_id")
        if f.get("category") != CATEGORY_FLOW or not isinstance(flow_id, str):
            continue
        folder = folders.get(flow_id)
        if folder is None:
            # A summary needs no seal check: status comes from the events alone.
            folder = folders[flow_id] = _Folder(flow_id, newer_fold=True, light=True)
        folder.feed(rec.seq, "", f)
    out: list[FlowSummary] = []
    for flow_id, fd in folders.items():
        s = FlowSummary(
            flow_id=flow_id,
            flow_type=fd.flow_type,
            status=fd.status or ACTIVE,
            current_step=fd.current_step,
            started_at=fd.started_at,
            ended_at=fd.ended_at,
            previous_flow_id=fd.previous_flow_id,
            sealed=fd.seal is not None,
            events=fd.events,
        )
        if status is not None and s.status != status:
            continue
        if flow_type is not None and s.flow_type != flow_type:
            continue
        if since is not None and (s.started_at is None or s.started_at < since):
            continue
        out.append(s)
    return out
