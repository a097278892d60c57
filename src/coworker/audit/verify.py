"""Re-hash an audit log and name the first record that is not what was written.

:func:`verify_chain` walks the log in seq order and checks, for record *n*, that its seq is
*n*, that its ``prev_hash`` is the hash of record *n-1* (:data:`~coworker.audit.chain.
GENESIS_PREV_HASH` for *n* = 1) and that ``hash = SHA-256(prev_hash || body)``. The fast path
does only that, on raw tuples; when a check fails it decodes the neighbouring bodies to say
*what* happened:

=================  ==========================================================================
``edited``         a record's bytes no longer hash to its stored hash, or a record was
                   rewritten with a recomputed hash (its successor's ``prev_hash`` disagrees)
``deleted``        a seq is missing (a gap), or the records after a removal were renumbered
``reordered``      records are out of their original order (a body's seq is not its position
                   and the record that belongs there comes later)
``inserted``       a record that was never appended sits in the log (the records after it
                   are shifted by one)
``bad-genesis``    record 1 does not start from the genesis hash
``truncated``      the log ends before a saved head (needs ``expected_head``)
``rewritten``      the log disagrees with a saved head at its seq: the tail was replaced with
                   a recomputed chain (needs ``expected_head``)
=================  ==========================================================================

Then, for a store that keeps more than the chained bytes
(:class:`~coworker.audit.store.IntegrityChecked`), what the links do not cover:

=====================  ======================================================================
``column-mismatch``    a query column (``user_id``, ``flow_id``...) differs from the hashed
                       body, so ``coworker audit query`` would hide or misattribute the record
``malformed``          a chained body that is not a JSON object carrying its own position as
                       ``seq`` (the links hold for any bytes hashed: a writer's crafted row)
``payload-mismatch``   a stored payload does not hash to its record's ``payload_digest``
``out-of-range``       a row at a seq outside ``1..head`` (seq 0 or below), which no read
                       returns but which is not a record
``guard``              an append-only trigger or constraint is missing, altered or foreign
=====================  ======================================================================

Every problem found is in :attr:`VerifyReport.problems`; ``kind``/``bad_seq``/``detail``
describe the first one.

A cut-off or recomputed tail is invisible from the log alone: keep the head printed by
``coworker audit verify`` (or a signed checkpoint) and pass it back as ``expected_head``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from coworker.audit.store import (
    COLUMN_MISMATCH,
    GUARD,
    MALFORMED,
    OUT_OF_RANGE,
    PAYLOAD_MISMATCH,
    AuditStore,
    Finding,
    Head,
    IntegrityChecked,
    first_prev,
    store_chain,
)

__all__ = [
    "BAD_GENESIS",
    "COLUMN_MISMATCH",
    "DELETED",
    "EDITED",
    "GUARD",
    "INSERTED",
    "MALFORMED",
    "OUT_OF_RANGE",
    "PAYLOAD_MISMATCH",
    "REORDERED",
    "REWRITTEN",
    "TRUNCATED",
    "Finding",
    "VerifyReport",
    "verify_chain",
]

EDITED: Final = "edited"
DELETED: Final = "deleted"
REORDERED: Final = "reordered"
INSERTED: Final = "inserted"
BAD_GENESIS: Final = "bad-genesis"
TRUNCATED: Final = "truncated"
REWRITTEN: Final = "rewritten"

_PROGRESS_EVERY: Final = 16_384
_WINDOW: Final = 4_096  # records decoded after a failure to classify it

Row = tuple[int, bytes, bytes, bytes]


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_chain`.

    Attributes:
        ok: ``True`` when every check passed.
        checked: records whose links were verified before the first problem (all of them
            when ``ok``).
        head: the last verified record (``None`` for an empty log or a failure at seq 1).
        bad_seq: the first seq that is wrong, or ``None``.
        kind: what is wrong (:data:`EDITED`, :data:`DELETED`, ...), or ``None``.
        detail: one human-readable sentence.
        in_doubt: seqs of intent records with no outcome (informational; see
            :func:`coworker.audit.query.in_doubt`).
        problems: every problem found, the chain's first (if any) then the store's
            findings; empty when ``ok``.
    """

    ok: bool
    checked: int
    head: Head | None
    bad_seq: int | None = None
    kind: str | None = None
    detail: str = ""
    in_doubt: tuple[int, ...] = field(default=())
    problems: tuple[Finding, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (hashes as hex)."""
        return {
            "ok": self.ok,
            "checked": self.checked,
            "head": None
            if self.head is None
            else {"seq": self.head.seq, "hash": self.head.hash_hex},
            "bad_seq": self.bad_seq,
            "kind": self.kind,
            "detail": self.detail,
            "in_doubt": list(self.in_doubt),
            "problems": [{"kind": p.kind, "seq": p.seq, "detail": p.detail} for p in self.problems],
        }


def _rows(store: AuditStore, start: int = 1) -> Iterator[Row]:
    fast = getattr(store, "iter_chain", None)
    if fast is not None:
        return fast(start)  # type: ignore[no-any-return]
    return ((r.seq, r.prev_hash, r.hash, r.body) for r in store.iter_from(start))


def verify_chain(
    store: AuditStore,
    *,
    expected_head: Head | None = None,
    progress: Callable[[int], None] | None = None,
    check_in_doubt: bool = True,
    deep: bool = False,
) -> VerifyReport:
    """Re-hash the whole log and report the first problem.

    Args:
        store: the store to verify (read only).
        expected_head: a head saved earlier; the log must still contain it unchanged.
        progress: called with the number of records checked so far, every few thousand
            records and once at the end.
        check_in_doubt: also list intents without an outcome.
        deep: also check the storage beneath the rows where the store can (SQLite: ``PRAGMA
            integrity_check``, so that an index edited to hide a record from queries is
            found; several times slower).

    Returns:
        The report; a tampered log is a report with ``ok=False``, not an exception.

    Raises:
        AuditUnavailable: the store cannot be read.
    """
    fast = _try_parallel(store, expected_head, progress)
    if fast is not None:
        last, candidates, committed = fast
        problem = None
        if expected_head is not None:
            problem = _against_saved(store, last, expected_head)
        # The workers selected the rows to look at in their hashing scan.
        found = store.integrity_findings(  # type: ignore[attr-defined]
            last, candidates=candidates, committed=committed
        )
        return _report(store, last.seq, last, problem, check_in_doubt, found, deep)
    # The checks beyond the links run beside the serial hash loop: SQLite and libpq release
    # the GIL while they scan, so the two overlap on two cores.
    beyond = _Beside(store)
    try:
        checked, head, problem = _serial(store, expected_head, progress)
    finally:
        findings = beyond.result()
    return _report(store, checked, head, problem, check_in_doubt, findings, deep)


def _serial(
    store: AuditStore, expected_head: Head | None, progress: Callable[[int], None] | None
) -> tuple[int, Head | None, tuple[str, int, str] | None]:
    """The hash loop: ``(checked, head, first problem)``."""
    sha256 = hashlib.sha256
    prev = first_prev(store)
    expected = 1
    rows = _rows(store)
    bad: Row | None = None
    next_report = _PROGRESS_EVERY
    for row in rows:
        seq, prev_hash, digest, body = row
        try:
            intact = seq == expected and prev_hash == prev
            intact = intact and sha256(prev_hash + body).digest() == digest
        except TypeError:  # a column rewritten with another type (TEXT, NULL...)
            intact = False
        if not intact:
            bad = (seq, _b(prev_hash), _b(digest), _b(body))
            break
        prev = digest
        expected += 1
        if progress is not None and expected > next_report:
            progress(expected - 1)
            next_report += _PROGRESS_EVERY
    checked = expected - 1
    head = Head(checked, prev) if checked else None
    if progress is not None:
        progress(checked)
    problem = None
    if bad is not None:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
        problem = _classify(store, expected, prev, bad)
    elif expected_head is not None:
        problem = _against_saved(store, head, expected_head)
    return checked, head, problem


class _Beside:
    """``store.integrity_findings`` in a thread of its own; :meth:`result` joins it."""

    def __init__(self, store: AuditStore) -> None:
        self._findings: list[Finding] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if isinstance(store, IntegrityChecked):
            self._thread = threading.Thread(
                target=self._run, args=(store,), name="coworker-verify", daemon=True
            )
            self._thread.start()

    def _run(self, store: IntegrityChecked) -> None:
        try:
            self._findings = store.integrity_findings(store.head())  # type: ignore[attr-defined]
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc

    def result(self) -> list[Finding] | None:
        """The findings (``None`` for a store without the capability); re-raises its error."""
        if self._thread is None:
            return None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._findings


def _report(
    store: AuditStore,
    checked: int,
    head: Head | None,
    problem: tuple[str, int, str] | None,
    check_in_doubt: bool,
    findings: list[Finding] | None = None,
    deep: bool = False,
) -> VerifyReport:
    """The report: the chain's first problem, then what the store finds beyond the links."""
    problems: list[Finding] = []
    if problem is not None:
        problems.append(Finding(problem[0], problem[1], problem[2]))
    if findings is not None:
        problems += findings
    elif isinstance(store, IntegrityChecked):
        # Over every row up to the store's own head, not only the verified prefix: a column
        # edited after a broken link is still a record hidden from a query.
        problems += store.integrity_findings(store.head())
    storage = getattr(store, "storage_findings", None)
    if deep and storage is not None:
        problems += storage()
    if problems:
        first = problems[0]
        return VerifyReport(
            False, checked, head, first.seq, first.kind, first.detail, problems=tuple(problems)
        )
    doubt = _in_doubt(store, check_in_doubt)
    return VerifyReport(True, checked, head, in_doubt=doubt, detail=_ok_detail(head))


def _in_doubt(store: AuditStore, check: bool) -> tuple[int, ...]:
    if not check:
        return ()
    from coworker.audit.query import in_doubt

    return tuple(in_doubt(store))


def _try_parallel(
    store: AuditStore, expected_head: Head | None, progress: Callable[[int], None] | None
) -> tuple[Head, list[int] | None, list[int]] | None:
    # Large SQLite logs are re-hashed on every core (see _verify_parallel), the rows the
    # store's integrity check must look at selected in the same scan; anything unexpected,
    # including a problem in the log, falls back to the serial path, which is the one that
    # names the first bad record.
    from coworker.audit import _verify_parallel as par

    path = getattr(store, "path", None)
    if path is None or not hasattr(store, "iter_chain") or not par.can_fork():
        return None
    head = store.head()
    if head is None or head.seq < par.MIN_RECORDS:
        return None
    flag = getattr(store, "CANDIDATE_FLAG", None)
    try:
        found = par.verify_parallel(
            os.path.abspath(path), head.seq, first_prev(store), progress, flag
        )
    except Exception:
        return None
    if found is None or found[0] != head.hash:
        return None
    return head, found[1], found[2]


def _ok_detail(head: Head | None) -> str:
    if head is None:
        return "empty log"
    return f"{head.seq} record(s) intact; head seq {head.seq} hash {head.hash_hex}"


def _b(value: object) -> bytes:
    # Tampering can leave TEXT, NULL or numbers where blobs belong.
    if isinstance(value, bytes):
        return value
    if value is None:
        return b""
    return str(value).encode("utf-8", "replace")


def _body_seq(body: bytes) -> int | None:
    try:
        value = json.loads(body).get("seq")
    except (ValueError, AttributeError):
        return None
    return value if type(value) is int else None


def _classify(store: AuditStore, expected: int, prev: bytes, bad: Row) -> tuple[str, int, str]:
    """Say what broke at position ``expected`` (slow path, runs once)."""
    seq, prev_hash, digest, body = bad
    if seq > expected:
        missing = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
        return DELETED, expected, f"seq {missing} missing: record(s) deleted (gap before {seq})"
    if seq < expected:  # only a store that does not order by seq can yield this
        return REORDERED, seq, f"seq {seq} appears after seq {expected - 1}"
    own_seq = _body_seq(body)
    start = first_prev(store)
    if seq == 1 and own_seq in (1, None) and prev_hash != start:
        chain = store_chain(store)
        return (
            BAD_GENESIS,
            1,
            f"seq 1: prev_hash is {prev_hash.hex()}, not the genesis value {start.hex()}"
            + (f" of chain {chain!r}" if chain else "")
            + " (a chain renamed or moved?)",
        )
    self_consistent = hashlib.sha256(prev_hash + body).digest() == digest
    if not self_consistent:
        if own_seq is not None and own_seq != seq and prev_hash != prev:
            return _moved(store, seq, own_seq)
        return EDITED, seq, f"seq {seq}: its bytes do not hash to its stored hash (edited)"
    # The record hashes correctly but does not link to its predecessor.
    if own_seq is not None and own_seq != seq:
        return _moved(store, seq, own_seq)
    return (
        EDITED,
        seq - 1,
        f"seq {seq - 1}: rewritten with a recomputed hash (seq {seq} links to a different "
        f"record {prev_hash.hex()[:16]}...)",
    )


def _moved(store: AuditStore, position: int, own_seq: int) -> tuple[str, int, str]:
    if own_seq > position:
        # A later record sits here: either the record(s) before it were deleted and the rest
        # renumbered, or two records were swapped. Look for the record that belongs here.
        for row in _window(store, position + 1):
            if _body_seq(row[3]) == position:
                return (
                    REORDERED,
                    position,
                    f"seq {position} holds record {own_seq}; record {position} is at seq "
                    f"{row[0]} (reordered)",
                )
        return (
            DELETED,
            position,
            f"seq {position} holds record {own_seq}: record(s) {position}..{own_seq - 1} were "
            "deleted and the rest renumbered",
        )
    # An earlier record sits here: something was inserted before it and the rest shifted.
    return (
        INSERTED,
        own_seq,
        f"seq {position} holds record {own_seq}: a forged record was inserted at seq "
        f"{own_seq} and the rest shifted",
    )


def _window(store: AuditStore, start: int) -> Iterator[Row]:
    rows = _rows(store, start)
    for i, row in enumerate(rows):
        if i >= _WINDOW:
            break
        yield row
    close = getattr(rows, "close", None)
    if close is not None:
        close()


def _against_saved(
    store: AuditStore, head: Head | None, saved: Head
) -> tuple[str, int, str] | None:
    if head is None or head.seq < saved.seq:
        have = 0 if head is None else head.seq
        return (
            TRUNCATED,
            have + 1,
            f"the log ends at seq {have} but the saved head is seq {saved.seq}: "
            f"record(s) {have + 1}..{saved.seq} were cut off",
        )
    for row in _rows(store, saved.seq):
        if row[2] != saved.hash:
            return (
                REWRITTEN,
                saved.seq,
                f"seq {saved.seq} hashes to {row[2].hex()[:16]}..., the saved head says "
                f"{saved.hash_hex[:16]}...: the log up to seq {saved.seq} was rewritten with "
                "a recomputed chain",
            )
        break
    return None
