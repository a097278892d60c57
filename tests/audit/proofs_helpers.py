"""Helpers for the proof tests: fill a real SQLite store, and tamper with it as its owner."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from coworker.audit import store_sqlite
from coworker.audit.chain import seal
from coworker.audit.record import format_time
from coworker.audit.store import Head
from coworker.audit.store_sqlite import SQLiteStore


def entry(i: int, *, user: str = "alice", flow: str = "f1") -> dict[str, Any]:
    """A small outcome record body."""
    return {
        "v": 1,
        "kind": "outcome",
        "name": f"op-{i}",
        "operation": "update",
        "user_id": user,
        "flow_id": flow,
        "outcome": "ok",
        "recorded_at": format_time(1_700_000_000_000_000_000 + i),
        "start": format_time(1_700_000_000_000_000_000 + i),
    }


def fill(path: Path, n: int, start: int = 1, **kw: Any) -> None:
    """Append ``n`` records to the SQLite store at ``path``."""
    store = SQLiteStore(path)
    try:
        store.append([entry(i, **kw) for i in range(start, start + n)])
    finally:
        store.close()


def _rows(conn: sqlite3.Connection) -> list[tuple[int, bytes, bytes, bytes]]:
    return conn.execute(
        "SELECT seq, prev_hash, hash, body FROM audit_records ORDER BY seq"
    ).fetchall()


def _rewrite_from(conn: sqlite3.Connection, bodies: list[dict[str, Any]], first: int) -> None:
    # Drop the guards, delete from `first` on and re-seal the given bodies with fresh hashes.
    for trigger in (
        "audit_records_no_update",
        "audit_records_no_delete",
        "audit_records_append_only",
    ):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    prev = conn.execute(
        "SELECT seq, hash FROM audit_records WHERE seq = ?", (first - 1,)
    ).fetchone()
    head = Head(prev[0], prev[1]) if prev else None
    conn.execute("DELETE FROM audit_records WHERE seq >= ?", (first,))
    entries = [{k: v for k, v in b.items() if k != "seq"} for b in bodies]
    for r, fields in zip(seal(entries, head), entries, strict=True):
        # A careful owner: the query columns match the new bodies (verify compares them).
        conn.execute(store_sqlite._INSERT, store_sqlite._row(r, fields))
    conn.commit()
    # ...and the guards are put back (verify reports missing ones): only a saved checkpoint
    # can tell this log from the original.
    SQLiteStore(conn.execute("PRAGMA database_list").fetchone()[2]).close()


def rewrite_record(path: Path, seq: int, **changes: Any) -> None:
    """Change one record's fields and recompute every later hash (a wholesale rewrite)."""
    conn = sqlite3.connect(path)
    bodies = [json.loads(r[3]) for r in _rows(conn) if r[0] >= seq]
    bodies[0].update(changes)
    _rewrite_from(conn, bodies, seq)
    conn.close()


def insert_record(path: Path, at: int, fields: dict[str, Any]) -> None:
    """Insert a record before ``at`` and renumber/re-hash the rest."""
    conn = sqlite3.connect(path)
    bodies = [json.loads(r[3]) for r in _rows(conn) if r[0] >= at]
    _rewrite_from(conn, [fields, *bodies], at)
    conn.close()


def delete_last(path: Path, n: int) -> None:
    """Cut the last ``n`` records off the log."""
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER IF EXISTS audit_records_no_delete")
    conn.execute(
        "DELETE FROM audit_records WHERE seq > (SELECT MAX(seq) FROM audit_records) - ?", (n,)
    )
    conn.commit()
    conn.close()


def drop_tree_cache(path: Path) -> None:
    """Drop the cached tree beside the store (not the stored checkpoints), as an owner
    covering their tracks would."""
    tree = Path(str(path) + ".tree")
    if not tree.exists():
        return
    conn = sqlite3.connect(tree)
    conn.execute("DROP TABLE IF EXISTS audit_tree_nodes")
    conn.execute("DROP TABLE IF EXISTS audit_tree_state")
    conn.commit()
    conn.close()
