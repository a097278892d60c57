"""The SQLite store's erasure transactions: one write transaction that overwrites what it
deletes, data keys created inside the append that seals payloads under them, and the subjects
of a flow (for legal holds)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from coworker.audit import erasure
from coworker.audit.store import StoredRecord

_T = TypeVar("_T")


def _shredding(
    conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]
) -> tuple[_T, bool]:
    """Run ``work`` in one write transaction that overwrites what it deletes
    (``PRAGMA secure_delete``), then copy the pages back and truncate the WAL, so deleted
    bytes stay neither in the file nor in its ``-wal`` (erase and purge).

    Returns:
        ``work``'s result, and ``False`` when another reader kept the WAL from being truncated.
    """
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    conn.execute("PRAGMA secure_delete = OFF")
    return result, not busy


def _key_in_txn(conn: sqlite3.Connection, subject: str) -> bytes:
    # Inside the append's transaction: the key row commits with the payloads sealed under it.
    row = conn.execute("SELECT key FROM audit_keys WHERE subject = ?", (subject,)).fetchone()
    if row is not None:
        return bytes(row[0])
    key = erasure.new_key()
    conn.execute(
        "INSERT INTO audit_keys (subject, key, created) VALUES (?, ?, datetime('now'))",
        (subject, key),
    )
    return key


def _flow_subjects(conn: sqlite3.Connection, flow_id: str) -> set[str]:
    rows = conn.execute(
        "SELECT DISTINCT user_id, json_extract(CAST(body AS TEXT), '$.payload_subject') "
        "FROM audit_records WHERE flow_id = ?",
        (flow_id,),
    )
    return {v for row in rows for v in row if isinstance(v, str)}


def _erase_in_txn(
    conn: sqlite3.Connection,
    subject: str,
    reason: str,
    by: str | None,
    by_subject: str,
    append_in_txn: Callable[..., list[StoredRecord]],
) -> tuple[StoredRecord, list[int]]:
    """Inside the erase's write transaction: refuse under a legal hold, append the erasure
    record, delete the subject's payload rows and its key row; ``(record, erased seqs)``."""
    # Under the write lock: a hold appended concurrently is seen, or comes after.
    holds = erasure.active_holds(
        StoredRecord(r[0], b"", b"", r[1])
        for r in conn.execute(
            "SELECT seq, body FROM audit_records WHERE kind IN ('hold', 'release') ORDER BY seq"
        )
    )
    erasure.refuse_if_held(holds, subject, lambda flow: _flow_subjects(conn, flow))
    seqs = [
        r[0]
        for r in conn.execute(
            "SELECT p.seq FROM audit_payloads p JOIN audit_records r "
            "ON r.seq = p.seq WHERE json_extract(CAST(r.body AS TEXT), "
            f"'$.payload_subject') = ? OR {by_subject} ORDER BY p.seq",
            (subject, subject),
        )
    ]
    entry = erasure.erasure_entry(subject, reason, by=by, seqs=seqs)
    (record,) = append_in_txn(conn, [entry], None)
    conn.executemany("DELETE FROM audit_payloads WHERE seq = ?", [(s,) for s in seqs])
    conn.execute("DELETE FROM audit_keys WHERE subject = ?", (subject,))
    return record, seqs
