"""What verify checks in a SQLite store besides the hash links: query columns against the
hashed bodies, payloads against their digests, rows outside ``1..head``, the append-only
guards (:meth:`~coworker.audit.store_sqlite.SQLiteStore.integrity_findings`).

In a schema version 2 file the query columns are generated from the body, so there is no
column to compare: the table's definition is (with the guards). The bodies that are not a
record at their seq are read from the partial index SQLite keeps of them; those that commit to
a payload that is not stored, by a byte search of every body (an index's contents are not
hashed), done in the parallel verifier's hashing scan when it runs, each body it selects then
decoded in Python.
A version 1 file, or a version 2 file whose definitions are not ours, gets the exact check:
one JSON parse of every row by SQLite, every candidate checked in Python."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Final

from coworker.audit._verify_parallel import BATCH, committing
from coworker.audit.sqlite_schema import _COLUMNS, _MALFORMED, _guard_problems, _row_v1
from coworker.audit.store import (
    COLUMN_MISMATCH,
    GUARD,
    MAX_FINDINGS,
    OUT_OF_RANGE,
    PAYLOAD_MISMATCH,
    Finding,
    Head,
    StoredRecord,
    erased_seqs,
    malformed_finding,
    payload_finding,
)
from coworker.exceptions import AuditUnavailable

if TYPE_CHECKING:
    from coworker.audit.store_sqlite import SQLiteStore

__all__ = ["CANDIDATE_FLAG", "integrity_findings", "storage_findings"]

# Rows whose columns or payload may not match their body (see SQLiteStore.integrity_findings),
# with one JSON parse per row: a multi-path json_extract yields the body's values as one JSON
# array, compared as one text with the same values taken from the columns. A row is clean
# when the two are equal: every column equals its body field, ``time`` equals a non-empty
# ``start`` (the writer's rule), and, for a row without a stored payload, the body commits to
# no payload (``payload_digest`` null). Anything else is a candidate, which Python checks
# exactly as the writer derived the columns (``_row``) and as ``payload_finding`` judges
# payloads: the SQL can over-report (a value that is not a string in the body never compares
# equal here, a record whose ``start`` is empty always differs), never hide a mismatch. A
# body that is not JSON makes SQLite raise; the caller then checks every row in Python.
# The body's own seq is compared too: a body whose seq is not its position (or that has none)
# is a candidate, and a MALFORMED finding.
_BODY_PATHS: Final = ", ".join(f"'$.{c}'" for c in ("seq", *_COLUMNS, "start"))
_COLUMN_VALUES: Final = ", ".join(f"r.{c}" for c in ("seq", *_COLUMNS, "time"))
CANDIDATE_FLAG: Final = (
    "r.time IS NULL OR r.time = '' OR CASE WHEN p.payload IS NULL"
    f" THEN json_extract(CAST(r.body AS TEXT), {_BODY_PATHS}, '$.payload_digest')"
    f" IS NOT json_array({_COLUMN_VALUES}, NULL)"
    f" ELSE json_extract(CAST(r.body AS TEXT), {_BODY_PATHS}) IS NOT json_array({_COLUMN_VALUES})"
    " END"
)
"""The SQL expression that is true for a candidate row of ``audit_records r LEFT JOIN
audit_payloads p`` (the parallel verifier computes it in the same scan as the hashes)."""
_CANDIDATES: Final = (
    "SELECT r.seq FROM audit_records r LEFT JOIN audit_payloads p ON p.seq = r.seq"
    f" WHERE r.seq BETWEEN 1 AND ? AND ({CANDIDATE_FLAG}) ORDER BY r.seq"
)
_ALL_ROWS: Final = "SELECT seq FROM audit_records WHERE seq BETWEEN 1 AND ? ORDER BY seq"

# Stored payloads with their record (the digest is read from the body in Python: a body
# that is not JSON must not abort the scan). CROSS JOIN keeps the payloads as the outer loop:
# left to itself, the planner walks every record to look up its (usually absent) payload.
_PAYLOAD_ROWS: Final = (
    "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload"
    " FROM audit_payloads p CROSS JOIN audit_records r ON r.seq = p.seq"
    " WHERE p.payload IS NOT NULL AND r.seq BETWEEN 1 AND ? ORDER BY r.seq"
)

# Version 2: the rows SQLite keeps in the malformed-rows index (``NOT INDEXED``: the same rows
# by a full scan, when the indexes are not ours).
_MALFORMED_ROWS: Final = (
    "SELECT seq FROM audit_records {how} WHERE " + _MALFORMED + " AND seq BETWEEN 1 AND ?"
    " ORDER BY seq"
)
# Records committing to a payload that is not stored: always by a scan of the bodies, never
# read from audit_records_committed. An index's *contents* are b-tree pages that nothing
# hashes: the owner of the file can cut one entry out of it (a page edit, or a rebuilt b-tree
# swapped in under PRAGMA writable_schema) with its definition left exactly ours, and a
# payload deleted by hand would then go unreported. The malformed index is trusted (a record
# is in it only if its own body is not coworker's, i.e. the owner chained it: hiding it hides
# nothing the owner could not append anyway). The scan is a byte search of every body
# (_verify_parallel.committing: no JSON parse), done by the parallel verifier's workers in
# their hashing scan, here otherwise; each body it selects is then decoded in Python.
_BODIES: Final = "SELECT seq, body FROM audit_records WHERE seq BETWEEN 1 AND ? ORDER BY seq"

_CANDIDATE_ROW_V2: Final = (
    "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload"
    " FROM audit_records r LEFT JOIN audit_payloads p ON p.seq = r.seq WHERE r.seq = ?"
)

# One candidate with everything its checks need.
_CANDIDATE_ROW: Final = (
    "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload, "
    + ", ".join(f"r.{c}" for c in (*_COLUMNS, "time"))
    + " FROM audit_records r LEFT JOIN audit_payloads p ON p.seq = r.seq WHERE r.seq = ?"
)


def integrity_findings(
    store: SQLiteStore,
    head: Head | None,
    candidates: Sequence[int] | None,
    committed: Sequence[int] | None = None,
) -> list[Finding]:
    """:meth:`SQLiteStore.integrity_findings`: columns against bodies, payloads against
    digests, rows outside ``1..head``, the triggers' definitions (read only)."""
    findings: list[Finding] = []
    last = head.seq if head is not None else 0
    with store._lock:
        conn = store._connection()
        try:
            problems = _guard_problems(conn, store.schema_version)
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"audit store {store.path!r}: {exc}") from exc
    findings += [Finding(GUARD, None, p) for p in problems]
    # Only below 1: the head is the highest seq, and a row above it was appended after
    # the head was read (verify may run while the application writes).
    stray = list(store._read("SELECT seq FROM audit_records WHERE seq < 1 ORDER BY seq", ()))
    findings += _capped(
        Finding(OUT_OF_RANGE, r[0], f"seq {r[0]}: a row outside 1..{last} (never appended)")
        for r in stray
    )
    # A payload and its record commit together: one without the other was added by hand.
    orphans = store._read(
        "SELECT p.seq FROM audit_payloads p WHERE p.payload IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM audit_records r WHERE r.seq = p.seq) ORDER BY p.seq",
        (),
    )
    findings += _capped(
        Finding(PAYLOAD_MISMATCH, r[0], f"seq {r[0]}: a payload with no record") for r in orphans
    )
    structural = store.schema_version >= 2 and not problems
    stored = [
        StoredRecord(r[0], r[1], r[2], r[3], r[4])
        for r in store._read(_PAYLOAD_ROWS, (last,), mmap=True)
    ]
    if store.schema_version >= 2 and not any(p.startswith("table ") for p in problems):
        # The columns are the body's by definition: only the malformed rows (read by a full
        # scan when an index is not ours) and the unstored payloads are looked at.
        try:
            how = "INDEXED BY audit_records_malformed" if structural else "NOT INDEXED"
            malformed_rows = [r[0] for r in store._read(_MALFORMED_ROWS.format(how=how), (last,))]
        except AuditUnavailable:
            if structural:
                raise
            # A body that is not JSON (only possible with the definitions not ours).
            malformed_rows = [r[0] for r in store._read(_ALL_ROWS, (last,))]
        candidates = malformed_rows
        check_columns = False
    else:
        # The caller's candidates are the flag's of a version 1 file: a version 2 file (its
        # table not ours) has none, and gets the full scan.
        candidates = _v1_candidates(store, last, candidates if store.schema_version < 2 else None)
        check_columns = True
    # The bodies that may commit to a payload, minus those whose payload is stored (the
    # payload scan below checks them): in every version, not SQLite's json_extract, which
    # reads an escaped or duplicated key otherwise than Python does.
    if committed is None:
        committed = _committing(store, last)
    stored_seqs = {r.seq for r in stored}
    unstored = [seq for seq in committed if seq not in stored_seqs]
    columns: list[Finding] = []
    malformed: list[Finding] = []
    missing: list[StoredRecord] = []  # no payload stored: a finding if the body has a digest
    names = [*_COLUMNS, "time"]
    for seq in sorted({*candidates, *unstored}):
        try:
            rows = list(store._read(_CANDIDATE_ROW if check_columns else _CANDIDATE_ROW_V2, (seq,)))
        except AuditUnavailable:
            if not check_columns:
                raise
            # A table rewritten without the query columns: the guard finding says so.
            check_columns = False
            rows = list(store._read(_CANDIDATE_ROW_V2, (seq,)))
        if not rows:
            continue
        (row,) = rows
        record = StoredRecord(row[0], row[1], row[2], row[3], row[4])
        try:
            fields = json.loads(record.body)
        except (ValueError, TypeError):
            fields = None
        # The hash links hold for any bytes the writer hashed: a crafted INSERT can chain a
        # body that is no record at all.
        bad = malformed_finding(record.seq, fields)
        if bad is not None:
            malformed.append(bad)
        if not isinstance(fields, dict):
            continue
        if record.payload is None and fields.get("payload_digest") is not None:
            missing.append(record)
        expected = _row_v1(record, fields)[4:]
        if check_columns and tuple(row[5:]) != expected:
            wrong = [
                f"{n}={got!r} (body: {want!r})"
                for n, got, want in zip(names, row[5:], expected, strict=True)
                if got != want
            ]
            columns.append(
                Finding(
                    COLUMN_MISMATCH,
                    record.seq,
                    f"seq {record.seq}: query column(s) differ from the record: "
                    + ", ".join(wrong),
                )
            )
    payloads: list[Finding] = []
    erased = erased_seqs(store)
    for record in [*stored, *missing]:
        try:
            fields = json.loads(record.body)
        except (ValueError, TypeError):
            continue  # the chain check already failed on it
        found = (
            payload_finding(record, fields, store.key_for, erased)
            if isinstance(fields, dict)
            else None
        )
        if found is not None:
            payloads.append(found)
    payloads.sort(key=lambda f: f.seq or 0)
    return findings + _capped(iter(malformed)) + _capped(iter(columns)) + _capped(iter(payloads))


def storage_findings(store: SQLiteStore) -> list[Finding]:
    """:meth:`SQLiteStore.storage_findings`: ``PRAGMA integrity_check`` of the records and
    payloads tables with their indexes, each line of its answer a finding.

    The hash chain covers the rows, never the index b-trees a query reads: the owner of the
    file can remove the entry of an honest record from ``audit_records_user`` (its definition
    left exactly ours) and ``query(user=...)`` no longer finds it. SQLite's check recomputes
    every index entry from its row (each generated column from the body), which costs a few
    times the rest of verify: hence opt-in.
    """
    lines: list[str] = []
    for table in ("audit_records", "audit_payloads"):
        lines += [
            f"{table}: {r[0]}"
            for r in store._read(f"PRAGMA integrity_check({table})", ())
            if r[0] != "ok"
        ]
    return _capped(
        Finding(COLUMN_MISMATCH, None, f"SQLite integrity_check: {line}") for line in lines
    )


def _committing(store: SQLiteStore, last: int) -> list[int]:
    """The seqs ``1..last`` whose body may commit to a payload (the parallel verifier's test,
    :func:`~coworker.audit._verify_parallel.committing`, over every body)."""
    seqs: list[int] = []
    rows = store._read(_BODIES, (last,), mmap=True)
    while batch := list(islice(rows, BATCH)):
        numbers, bodies = zip(*batch, strict=True)
        seqs += [numbers[i] for i in committing(bodies)]
    return seqs


def _v1_candidates(store: SQLiteStore, last: int, candidates: Sequence[int] | None) -> list[int]:
    # SQLite's own JSON parser picks the candidate rows (~10x faster than decoding every
    # body in Python), one parse per row for the columns and the payload commitment; each
    # candidate is then checked exactly. Values that are not strings are always
    # candidates, so that the SQL comparison can only over-report, never hide a mismatch.
    if candidates is not None:
        return list(candidates)
    try:
        return [r[0] for r in store._read(_CANDIDATES, (last,), mmap=True)]
    except AuditUnavailable:  # a body is not JSON (or a column is missing): decode them all
        return [r[0] for r in store._read(_ALL_ROWS, (last,))]


def _capped(findings: Iterator[Finding]) -> list[Finding]:
    out: list[Finding] = []
    extra = 0
    for f in findings:
        if len(out) < MAX_FINDINGS:
            out.append(f)
        else:
            extra += 1
    if extra:
        last = out[-1]
        out[-1] = Finding(last.kind, last.seq, f"{last.detail} (and {extra} more like it)")
    return out
