"""Reading the audit trail: filtered queries, in-doubt intents, and the execution tree of a flow.

Filters use the store's indexed columns when it has them (``search``), and every record is
re-checked against its decoded body, which is what the chain protects.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from coworker._text import printable
from coworker.attributes import AUDIT_CATEGORIES, CATEGORY_USAGE
from coworker.audit.record import (
    CATEGORY_FLOW,
    CATEGORY_INGEST_CONFLICT,
    KIND_CORRECTION,
    KIND_INTENT,
    KIND_OUTCOME,
    OUTCOME_OK,
    QUERY_FILTERS,
)
from coworker.audit.record import format_time as _format_ns
from coworker.audit.store import AuditStore, StoredRecord
from coworker.exceptions import ConfigError

__all__ = [
    "CATEGORIES",
    "IN_DOUBT",
    "AuditEntry",
    "FlowTree",
    "RunNode",
    "StepNode",
    "build_tree",
    "in_doubt",
    "parse_time",
    "query",
    "render_tree",
    "resolve_flow_id",
    "tree_to_dict",
]

IN_DOUBT: Final = "in-doubt"
"""Status of an intent record with no outcome: the run may or may not have happened."""

_FILTERS: Final = QUERY_FILTERS

CATEGORIES: Final = (
    *AUDIT_CATEGORIES,
    CATEGORY_INGEST_CONFLICT,
    CATEGORY_FLOW,
    CATEGORY_USAGE,  # usage (issue 16): the usage ledger's records
)
"""Every category a record can have: a ``category`` filter outside these is an error, not a
query that silently matches nothing."""

# Matched on the decoded body, case-insensitively like the policy (``UPDATE`` is ``update``):
# never handed to the store's exact column match.
_FOLDED: Final = frozenset({"operation"})

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class AuditEntry:
    """One decoded record.

    Attributes:
        seq: its seq.
        fields: the decoded body.
        payload: the separate payload bytes (captured input/output), decrypted; ``None``
            when none was captured or it was erased.
        status: ``outcome`` for outcomes (``ok`` or the error type), ``in-doubt`` for an
            intent without an outcome, ``intent`` for one that has it, ``correction of #N``.
    """

    seq: int
    fields: dict[str, Any]
    payload: bytes | None
    status: str

    @property
    def failed(self) -> bool:
        """``True`` for an outcome that is not ``ok``."""
        return self.fields.get("kind") == KIND_OUTCOME and self.status != OUTCOME_OK


def parse_time(value: str, *, now: float | None = None) -> str:
    """Parse a ``--since`` / ``--until`` value into the stores' RFC 3339 form.

    Args:
        value: an ISO 8601 date or date-time (naive means UTC), or a duration ago such as
            ``30m``, ``2h``, ``7d``.
        now: the current Unix time (for tests).

    Returns:
        A fixed-width RFC 3339 UTC string with nanoseconds.

    Raises:
        ConfigError: the value is neither.
    """
    match = _RELATIVE.match(value)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        current = time.time() if now is None else now
        return _rfc3339(int((current - seconds) * 1_000_000_000))
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{value!r} is not a time: use ISO 8601 (2026-01-31, 2026-01-31T12:00:00Z) "
            "or a duration ago (30m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    ns = (delta // timedelta(microseconds=1)) * 1000
    return _rfc3339(ns)


def _rfc3339(ns: int) -> str:
    text = _format_ns(ns)
    assert text is not None  # only None for None
    return text


def _record_time(fields: Mapping[str, Any]) -> str | None:
    return fields.get("start") or fields.get("recorded_at")


def _candidates(
    store: AuditStore,
    filters: Mapping[str, str | None],
    since: str | None,
    until: str | None,
) -> Iterator[StoredRecord]:
    search = getattr(store, "search", None)
    if search is not None:
        exact = {k: v for k, v in filters.items() if k not in _FOLDED}
        return search(exact, since=since, until=until)  # type: ignore[no-any-return]
    return store.iter_from(1)


def _matches(
    fields: Mapping[str, Any],
    filters: Mapping[str, str | None],
    since: str | None,
    until: str | None,
) -> bool:
    for key, value in filters.items():
        if value is None:
            continue
        got = fields.get(_FILTERS[key])
        if key in _FOLDED:
            # The policy's own normalisation (acl: operation.strip().lower()).
            if not isinstance(got, str) or got.strip().lower() != value.strip().lower():
                return False
        elif got != value:
            return False
    if since is not None or until is not None:
        moment = _record_time(fields)
        if moment is None:
            return False
        if since is not None and moment < since:
            return False
        if until is not None and moment >= until:
            return False
    return True


def _status(fields: Mapping[str, Any], seq: int, doubt: set[int]) -> str:
    kind = fields.get("kind")
    if kind == KIND_INTENT:
        return IN_DOUBT if seq in doubt else "intent"
    if kind == KIND_CORRECTION:
        return f"correction of #{fields.get('corrects')}"
    return str(fields.get("outcome") or "")


def query(
    store: AuditStore,
    *,
    flow_id: str | None = None,
    user: str | None = None,
    agent: str | None = None,
    doctype: str | None = None,
    operation: str | None = None,
    category: str | None = None,
    kind: str | None = None,
    run_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
) -> Iterator[AuditEntry]:
    """Records matching every given filter, in seq order.

    Args:
        store: the store to read.
        flow_id: ``flow.id``.
        user: ``user.id``.
        agent: ``gen_ai.agent.id``.
        doctype: ``coworker.doctype``.
        operation: ``coworker.operation``, matched case-insensitively (as the policy does).
        category: ``coworker.audit.category``; one of :data:`CATEGORIES`.
        kind: ``outcome``, ``intent`` or ``correction``.
        run_id: ``coworker.run.id``.
        since: records at or after this time (see :func:`parse_time`).
        until: records before this time.
        limit: at most this many entries.

    Yields:
        :class:`AuditEntry` objects.

    Raises:
        ConfigError: an unknown category, or a bad time.
    """
    if category is not None and category not in CATEGORIES:
        raise ConfigError(f"unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
    return _query(
        store,
        {
            "flow_id": flow_id,
            "user": user,
            "agent": agent,
            "doctype": doctype,
            "operation": operation,
            "category": category,
            "kind": kind,
            "run_id": run_id,
        },
        parse_time(since) if since is not None else None,
        parse_time(until) if until is not None else None,
        limit,
    )


def _query(
    store: AuditStore,
    filters: Mapping[str, str | None],
    lo: str | None,
    hi: str | None,
    limit: int | None,
) -> Iterator[AuditEntry]:
    # A generator of its own, so that query() checks its arguments when called, not at the
    # first next().
    doubt: set[int] | None = None
    count = 0
    # Encrypted payloads (issue 15) are handed out readable: decrypted while the subject's
    # key exists, None once it was erased.
    readable = getattr(store, "plaintext", None)
    for record in _candidates(store, filters, lo, hi):
        fields = record.fields()
        if not _matches(fields, filters, lo, hi):
            continue
        if doubt is None and fields.get("kind") == KIND_INTENT:
            doubt = set(in_doubt(store))
        payload = readable(record) if readable is not None else record.payload
        yield AuditEntry(record.seq, fields, payload, _status(fields, record.seq, doubt or set()))
        count += 1
        if limit is not None and count >= limit:
            return


def in_doubt(store: AuditStore) -> list[int]:
    """Seqs of intent records that no later outcome record of the same span closes.

    An intent is written before a state-changing run in fail-closed mode; if the process died
    before the outcome was written, nobody knows whether the change happened.
    """
    fast = getattr(store, "open_intents", None)
    if fast is not None:
        return list(fast())
    open_intents: dict[tuple[Any, Any], int] = {}
    for record in store.iter_from(1):
        fields = record.fields()
        key = (fields.get("trace_id"), fields.get("span_id"))
        if fields.get("kind") == KIND_INTENT:
            open_intents[key] = record.seq
        elif fields.get("kind") == KIND_OUTCOME:
            open_intents.pop(key, None)
    return sorted(open_intents.values())


# -- the execution tree of a flow -------------------------------------------------------------
_AMBIGUOUS_SHOWN: Final = 5


def resolve_flow_id(store: AuditStore, text: str) -> str:
    """The flow id that ``text`` names: itself when a record has it, else the one flow id it
    is a prefix of (the demo and the docs print short ids).

    Args:
        store: the store to read.
        text: a flow id or a unique prefix of one.

    Returns:
        The full flow id.

    Raises:
        ConfigError: the prefix is empty or matches more than one flow (they are listed).
        LookupError: no flow id starts with it.
    """
    if not text:
        raise ConfigError("the flow id must not be empty")
    if next(iter(query(store, flow_id=text, limit=1)), None) is not None:
        return text
    # No index answers a prefix: scan the bodies, skipping most without decoding them.
    needle = b'"flow_id":"' + json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8")
    found: dict[str, None] = {}
    for body in _bodies(store):
        if needle not in body:
            continue
        flow_id = json.loads(body).get("flow_id")
        if isinstance(flow_id, str) and flow_id.startswith(text):
            found[flow_id] = None
    if not found:
        raise LookupError(f"no audit records for flow {text!r} (nor a flow id starting so)")
    if len(found) > 1:
        shown = ", ".join(printable(f) for f in list(found)[:_AMBIGUOUS_SHOWN])
        more = f" and {len(found) - _AMBIGUOUS_SHOWN} more" if len(found) > _AMBIGUOUS_SHOWN else ""
        raise ConfigError(
            f"flow id prefix {text!r} is ambiguous: {len(found)} flows match ({shown}{more}); "
            "give more characters"
        )
    return next(iter(found))


def _bodies(store: AuditStore) -> Iterator[bytes]:
    chain = getattr(store, "iter_chain", None)
    if chain is not None:
        for row in chain(1):
            yield row[3]
        return
    for record in store.iter_from(1):
        yield record.body


@dataclass
class RunNode:
    """One run in the tree: its outcome record (or its intent if it never finished).

    Attributes:
        entry: the record shown for this run.
        children: nested runs, in start order.
        corrections: correction records that point at this run's records.
        subtree_failed: this run or one of its descendants failed.
    """

    entry: AuditEntry
    children: list[RunNode] = field(default_factory=list)
    corrections: list[AuditEntry] = field(default_factory=list)
    subtree_failed: bool = False

    @property
    def failed(self) -> bool:
        """This run failed (or is in doubt)."""
        return self.entry.failed or self.entry.status == IN_DOUBT


@dataclass
class StepNode:
    """The runs of one step of the flow."""

    step_id: str | None
    runs: list[RunNode] = field(default_factory=list)
    failed: bool = False


@dataclass
class FlowTree:
    """A flow rebuilt from its audit records.

    Attributes:
        flow_id: the flow.
        flow_type: its ``flow.type`` (from the first record that has it).
        steps: in order of their first record.
        first_failure: the earliest run that failed without a failing child: where it failed.
        records: how many records the flow has.
    """

    flow_id: str
    flow_type: str | None
    steps: list[StepNode]
    first_failure: RunNode | None
    records: int


def build_tree(entries: Iterable[AuditEntry], flow_id: str) -> FlowTree:
    """Rebuild flow → step → run → child runs from the records of one flow.

    Runs whose parent run is not in the audit trail (an ordinary read, say) hang directly
    under their step. An intent and the outcome of the same run are one node.

    Args:
        entries: the flow's records (e.g. ``query(store, flow_id=...)``).
        flow_id: the flow id (for the title).

    Returns:
        The tree.
    """
    nodes: dict[str, RunNode] = {}
    order: list[str] = []
    by_seq: dict[int, str] = {}
    corrections: list[AuditEntry] = []
    flow_type: str | None = None
    count = 0
    for entry in entries:
        count += 1
        f = entry.fields
        flow_type = flow_type or f.get("flow_type")
        if f.get("kind") == KIND_CORRECTION:
            corrections.append(entry)
            continue
        if f.get("category") == CATEGORY_FLOW:  # flow events are not runs (coworker audit flow)
            continue
        if f.get("category") == CATEGORY_USAGE:  # usage (issue 16): not runs (usage report)
            continue
        key = f.get("run_id") or f.get("span_id") or f"#{entry.seq}"
        by_seq[entry.seq] = key
        existing = nodes.get(key)
        if existing is None:
            nodes[key] = RunNode(entry)
            order.append(key)
        elif f.get("kind") == KIND_OUTCOME:
            existing.entry = entry  # the outcome supersedes the intent
    for c in corrections:
        target = by_seq.get(c.fields.get("corrects"))  # type: ignore[arg-type]
        if target is not None:
            nodes[target].corrections.append(c)

    def start(key: str) -> str:
        return nodes[key].entry.fields.get("start") or ""

    roots: list[str] = []
    for key in sorted(order, key=lambda k: (start(k), nodes[k].entry.seq)):
        parent = nodes[key].entry.fields.get("parent_run_id")
        if parent is not None and parent in nodes and parent != key:
            nodes[parent].children.append(nodes[key])
        else:
            roots.append(key)

    def mark(node: RunNode) -> bool:
        failed_child = False
        for child in node.children:
            failed_child = mark(child) or failed_child
        node.subtree_failed = node.failed or failed_child
        return node.subtree_failed

    steps: dict[str | None, StepNode] = {}
    for key in roots:
        node = nodes[key]
        step_id = node.entry.fields.get("step_id")
        step = steps.setdefault(step_id, StepNode(step_id))
        step.runs.append(node)
        if mark(node):
            step.failed = True

    def first_leaf_failure(candidates: list[RunNode]) -> RunNode | None:
        for node in candidates:
            if not node.subtree_failed:
                continue
            deeper = first_leaf_failure(node.children)
            return deeper or node
        return None

    first = None
    for step in steps.values():
        first = first_leaf_failure(step.runs)
        if first is not None:
            break
    return FlowTree(flow_id, flow_type, list(steps.values()), first, count)


def _describe(node: RunNode) -> str:
    # Every stored value goes through printable(): a user id with a newline or an ANSI escape
    # must not draw tree lines of its own.
    f = node.entry.fields
    what = " ".join(str(x) for x in (f.get("operation"), f.get("doctype")) if x) or f.get("name")
    who = str(f.get("user_id") or "-")
    if f.get("agent_id"):
        who += f" via {f.get('agent_id')}"
    mark = "✗ " if node.failed else "✓ "
    return (
        f"{mark}run {printable(f.get('run_id') or f.get('span_id'))}  {printable(what)}  "
        f"[{printable(node.entry.status)}]  {printable(who)}  {printable(f.get('category'))}  "
        f"#{node.entry.seq}"
    )


def _what(node: RunNode) -> tuple[Any, ...]:
    f = node.entry.fields
    return (f.get("operation"), f.get("doctype"), f.get("name"))


def _step_state(step: StepNode) -> str:
    # A failed run followed later in the same step by a successful run of the same operation
    # on the same doctype was retried successfully: say so rather than "FAILED".
    if not step.failed:
        return "ok"
    failures = 0
    for i, run in enumerate(step.runs):
        if not run.subtree_failed:
            continue
        failures += 1
        retried = run.failed and any(
            not later.subtree_failed and _what(later) == _what(run) for later in step.runs[i + 1 :]
        )
        if not retried:
            return "✗ FAILED"
    return f"✗ failed {failures}x, then retried ok"


def render_tree(tree: FlowTree) -> str:
    """The tree as indented text, failing steps and runs marked with ✗ and the first failure
    pointed at."""
    title = f"flow {printable(tree.flow_id)}"
    if tree.flow_type:
        title += f" ({printable(tree.flow_type)})"
    title += f"  {tree.records} record(s)"
    if any(_step_state(step) == "✗ FAILED" for step in tree.steps):
        title += "  FAILED"
    elif tree.first_failure is not None:
        title += "  ok after retries"
    lines = [title]

    def walk(node: RunNode, prefix: str, last: bool) -> None:
        branch = "└─ " if last else "├─ "
        text = _describe(node)
        if node is tree.first_failure:
            text += "   ◀ failed here"
        lines.append(prefix + branch + text)
        inner = prefix + ("   " if last else "│  ")
        for c in node.corrections:
            by = c.fields.get("corrected_by")
            lines.append(
                inner
                + f"  corrected by #{c.seq}"
                + (f" ({printable(by)})" if by is not None else "")
                + f": {printable(c.fields.get('reason'))} {printable(c.fields.get('fields'))}"
            )
        for i, child in enumerate(node.children):
            walk(child, inner, i == len(node.children) - 1)

    for i, step in enumerate(tree.steps):
        last_step = i == len(tree.steps) - 1
        name = printable(step.step_id) if step.step_id is not None else "(no step)"
        status = _step_state(step)
        lines.append(("└─ " if last_step else "├─ ") + f"step {name}  {status}")
        prefix = "   " if last_step else "│  "
        for j, run in enumerate(step.runs):
            walk(run, prefix, j == len(step.runs) - 1)
    if not tree.steps:
        lines.append("   (no run records for this flow; its flow events: coworker audit flow)")
    return "\n".join(lines)


def tree_to_dict(tree: FlowTree) -> dict[str, Any]:
    """The tree as plain JSON-able data (``coworker audit tree --json``): every record's
    decoded body as stored, plus its seq, status and whether it failed."""

    def run(node: RunNode) -> dict[str, Any]:
        return {
            "seq": node.entry.seq,
            "status": node.entry.status,
            "failed": node.failed,
            "subtree_failed": node.subtree_failed,
            "first_failure": node is tree.first_failure,
            "record": node.entry.fields,
            "corrections": [{"seq": c.seq, "record": c.fields} for c in node.corrections],
            "children": [run(child) for child in node.children],
        }

    return {
        "flow_id": tree.flow_id,
        "flow_type": tree.flow_type,
        "records": tree.records,
        "first_failure_seq": tree.first_failure.entry.seq if tree.first_failure else None,
        "steps": [
            {
                "step_id": step.step_id,
                "state": _step_state(step),
                "failed": step.failed,
                "runs": [run(r) for r in step.runs],
            }
            for step in tree.steps
        ],
    }
