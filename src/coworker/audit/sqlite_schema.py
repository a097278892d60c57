"""The SQLite audit store's schema: tables, indexes, the append-only triggers and how a file's
guards are compared with them, and the row a record becomes."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any, Final

from coworker.audit.store import StoredRecord

SCHEMA_VERSION: Final = 1
"""Version of the table layout, kept in ``audit_meta``."""

_TRIGGERS: Final = (
    "audit_records_no_update",
    "audit_records_no_delete",
    "audit_records_append_only",
)


# Body fields copied into plain indexed columns (column name = body key, except time).
_COLUMNS: Final = (
    "kind", "category", "operation", "doctype", "outcome", "flow_id", "step_id", "run_id",
    "user_id", "agent_id", "trace_id", "span_id",
)  # fmt: skip

_DDL: Final = f"""
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY CHECK (seq >= 1),
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    {", ".join(f"{c} TEXT" for c in _COLUMNS)},
    time TEXT
);
CREATE TABLE IF NOT EXISTS audit_payloads (seq INTEGER PRIMARY KEY, payload BLOB);
CREATE INDEX IF NOT EXISTS audit_records_flow ON audit_records(flow_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_user ON audit_records(user_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_agent ON audit_records(agent_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_doctype ON audit_records(doctype, seq);
CREATE INDEX IF NOT EXISTS audit_records_operation ON audit_records(operation, seq);
CREATE INDEX IF NOT EXISTS audit_records_category ON audit_records(category, seq);
CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records(time);
CREATE INDEX IF NOT EXISTS audit_records_span ON audit_records(span_id);
CREATE INDEX IF NOT EXISTS audit_records_intent ON audit_records(seq) WHERE kind = 'intent';
CREATE TRIGGER IF NOT EXISTS audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit_records is append-only: UPDATE is not allowed (write a correction)');
END;
CREATE TRIGGER IF NOT EXISTS audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit_records is append-only: DELETE is not allowed');
END;
CREATE TRIGGER IF NOT EXISTS audit_records_append_only BEFORE INSERT ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit_records is append-only: seq exists (INSERT OR REPLACE refused)')
    WHERE EXISTS (SELECT 1 FROM audit_records WHERE seq = NEW.seq);
    SELECT RAISE(ABORT, 'audit_records is append-only: seq must be the head seq + 1')
    WHERE NEW.seq <> COALESCE((SELECT MAX(seq) FROM audit_records), 0) + 1;
END;
"""

# Per-subject data keys of encrypted payloads (coworker.audit.erasure). Deliberately outside
# the append-only guards: erasing a subject deletes its row, and with it every payload sealed
# under the key. Created on existing stores too (it is not part of the chained schema).
_KEY_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS audit_keys "
    "(subject TEXT PRIMARY KEY, key BLOB NOT NULL, created TEXT NOT NULL)"
)

# The tables whose triggers are ours alone: any other trigger on them is reported.
_GUARDED_TABLES: Final = ("audit_records", "audit_payloads", "audit_meta")


def _normalise(statement: str) -> str:
    # SQLite keeps a CREATE statement as written, minus IF NOT EXISTS and the final ';'.
    text = " ".join(statement.split())
    return text.replace(" IF NOT EXISTS ", " ", 1).rstrip(";").strip()


def _expected_triggers() -> dict[str, str]:
    out: dict[str, str] = {}
    for statement in _split_ddl(_DDL):
        if statement.lstrip().startswith("CREATE TRIGGER"):
            name = statement.split()[5]
            out[name] = _normalise(statement)
    return out


_HEAD: Final = "SELECT seq, hash FROM audit_records WHERE seq >= 1 ORDER BY seq DESC LIMIT 1"

_INSERT: Final = (
    f"INSERT INTO audit_records (seq, prev_hash, hash, body, {', '.join(_COLUMNS)}, time) "
    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 5))})"
)


def _guard_problems(conn: sqlite3.Connection) -> list[str]:
    """What is wrong with the append-only triggers: missing, altered, or foreign ones."""
    expected = _expected_triggers()
    present = {
        r[0]: (r[1], _normalise(r[2] or ""))
        for r in conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"
        )
    }
    problems: list[str] = []
    for name, definition in expected.items():
        if name not in present:
            problems.append(f"trigger {name} is missing")
        elif present[name][1] != definition:
            problems.append(f"trigger {name} is altered (not coworker's definition)")
    for name, (table, _) in sorted(present.items()):
        if name not in expected and table in _GUARDED_TABLES:
            problems.append(f"trigger {name} on {table} is not coworker's")
    # The table itself (PRAGMA writable_schema can rewrite it, e.g. to drop the CHECK): as
    # created now, or as created before the CHECK existed.
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'"
    ).fetchone()
    table_sql = _normalise(row[0] if row and row[0] else "")
    if table_sql not in _expected_tables():
        problems.append("table audit_records is altered (not coworker's definition)")
    return problems


def _expected_tables() -> tuple[str, str]:
    (create,) = [s for s in _split_ddl(_DDL) if "TABLE IF NOT EXISTS audit_records" in s]
    current = _normalise(create)
    return current, current.replace(" CHECK (seq >= 1)", "")


_TEXT_TYPES: Final = frozenset({str, type(None)})


def _row(record: StoredRecord, fields: Mapping[str, Any]) -> tuple[Any, ...]:
    values = tuple(map(fields.get, _COLUMNS))
    if not _TEXT_TYPES.issuperset(map(type, values)):  # rare: a hand-made entry
        values = tuple(map(_column, values))
    return (
        record.seq,
        record.prev_hash,
        record.hash,
        record.body,
        *values,
        fields.get("start") or fields.get("recorded_at"),
    )


def _column(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _split_ddl(ddl: str) -> list[str]:
    # sqlite3.Connection.executescript would COMMIT our BEGIN IMMEDIATE; split instead,
    # keeping trigger bodies (which contain ';') whole.
    statements: list[str] = []
    current: list[str] = []
    in_trigger = False
    for line in ddl.strip().splitlines():
        current.append(line)
        stripped = line.strip()
        if stripped.startswith("CREATE TRIGGER"):
            in_trigger = True
        if (in_trigger and stripped == "END;") or (not in_trigger and stripped.endswith(";")):
            statements.append("\n".join(current))
            current = []
            in_trigger = False
    return statements
