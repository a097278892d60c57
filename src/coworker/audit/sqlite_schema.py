"""The SQLite audit store's schema: tables, indexes, the append-only triggers and how a file's
guards are compared with them, and the row a record becomes.

Schema version 2 (current): the query columns are ``GENERATED ALWAYS AS (...) VIRTUAL`` from the
hashed body, so that no row can hold a column that differs from its body: SQLite computes the
value from the body on every read, and an index entry when the row is inserted. Whether a
column equals its body is then a property of the table's definition, which
:func:`_guard_problems` compares with ours, instead of one JSON parse per row at verify time.
Two partial indexes keep, for verify, the rows whose body is not a record at its own seq
(``audit_records_malformed``, normally empty) and the rows whose body commits to a payload
(``audit_records_committed``): SQLite maintains both on every insert, whatever triggers say.
Verify reads the first; the second it does not trust for a missing payload (an index's
contents are unhashed pages the file's owner can edit), it scans the bodies for those.

Version 1 (files written before) has plain columns copied by the writer; such a file is read
and verified as it is (verify then compares every column with its body) and is migrated to
version 2 on its first read-write open (:mod:`coworker.audit.sqlite_migrate`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any, Final

from coworker.audit.store import StoredRecord

SCHEMA_VERSION: Final = 2
"""Version of the table layout, kept in ``audit_meta``: what a new file gets."""

SCHEMA_VERSIONS: Final = frozenset({1, 2})
"""The versions this coworker reads, verifies and appends to."""

GENERATED_MIN_SQLITE: Final = (3, 38, 0)
"""The oldest SQLite library that makes version 2 files (its ``->`` operator): with an older
one, new files are version 1 and version 1 files stay as they are."""

_TRIGGERS: Final = (
    "audit_records_no_update",
    "audit_records_no_delete",
    "audit_records_append_only",
)


# Body fields kept as query columns (column name = body key) in version 1, besides time.
_COLUMNS: Final = (
    "kind", "category", "operation", "doctype", "outcome", "flow_id", "step_id", "run_id",
    "user_id", "agent_id", "trace_id", "span_id",
)  # fmt: skip

# Version 2's generated columns: the ones an index or a partial index's condition uses.
# SQLite computes every generated column of a row on insert, VIRTUAL or not, so a column
# nothing indexes would cost its JSON lookup on every append and save nothing on a read
# (a VIRTUAL column is computed from the body when read, exactly as ``json_extract`` in the
# query is): the other four (never indexed) are read from the body (:func:`column_sql`).
_GENERATED: Final = (
    "kind", "category", "operation", "doctype", "flow_id", "user_id", "agent_id", "span_id",
)  # fmt: skip

# CAST: a BLOB given to SQLite's JSON functions is read as JSONB from SQLite 3.45 on; the
# body is text JSON kept as a BLOB (the exact hashed bytes).
_BODY: Final = "CAST(body AS TEXT)"


def _field(key: str) -> str:
    return f"json_extract({_BODY}, '$.{key}')"


# The writer's rule for time: ``start``, or ``recorded_at`` when there is no (non-empty) start.
_TIME: Final = f"COALESCE(NULLIF({_field('start')}, ''), {_field('recorded_at')})"

_TABLE_V1: Final = f"""CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY CHECK (seq >= 1),
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    {", ".join(f"{c} TEXT" for c in _COLUMNS)},
    time TEXT
);"""

_TABLE_V2: Final = f"""CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY CHECK (seq >= 1),
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    {", ".join(f"{c} TEXT GENERATED ALWAYS AS ({_field(c)}) VIRTUAL" for c in _GENERATED)},
    time TEXT GENERATED ALWAYS AS ({_TIME}) VIRTUAL
);"""

# The body's own seq as JSON text: exactly the decimal digits of the row's seq for a record
# (Python's rule in ``malformed_finding``: an int equal to the position; a string "21", 21.0,
# true, a missing seq or a body that is no object all differ). Rows where it differs are in the
# partial index audit_records_malformed, which is empty in an honest log.
_MALFORMED: Final = f"({_BODY} -> '$.seq') IS NOT CAST(seq AS TEXT)"
_COMMITTED: Final = f"{_field('payload_digest')} IS NOT NULL"

_INDEXES: Final = """
CREATE INDEX IF NOT EXISTS audit_records_flow ON audit_records(flow_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_user ON audit_records(user_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_agent ON audit_records(agent_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_doctype ON audit_records(doctype, seq);
CREATE INDEX IF NOT EXISTS audit_records_operation ON audit_records(operation, seq);
CREATE INDEX IF NOT EXISTS audit_records_category ON audit_records(category, seq);
CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records(time);
CREATE INDEX IF NOT EXISTS audit_records_span ON audit_records(span_id);
CREATE INDEX IF NOT EXISTS audit_records_intent ON audit_records(seq) WHERE kind = 'intent';"""

# The erasure and purge records (coworker.audit.erasure): verify and every payload read look
# them up; without this index that is a JSON parse of every body.
_ERASURE_KINDS: Final = "kind IN ('erasure', 'purge')"

_INDEXES_V2: Final = f"""
CREATE INDEX IF NOT EXISTS audit_records_malformed ON audit_records(seq) WHERE {_MALFORMED};
CREATE INDEX IF NOT EXISTS audit_records_committed ON audit_records(seq) WHERE {_COMMITTED};
CREATE INDEX IF NOT EXISTS audit_records_erasures ON audit_records(seq) WHERE {_ERASURE_KINDS};"""

_GUARDS_V1: Final = """
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

# Version 2 checks an insert AFTER it: SQLite computes every generated column of NEW before a
# BEFORE INSERT trigger runs (and again for the row), which would double the JSON work of an
# append. After the insert, a row that is not the head (a REPLACE of an earlier seq, a seq
# below the head) or does not link to the row before it (a gap, or a REPLACE of the head that
# is not its successor) is refused, and the whole statement with its REPLACE is undone.
_GUARDS: Final = (
    _GUARDS_V1.split("CREATE TRIGGER IF NOT EXISTS audit_records_append_only")[0]
    + """CREATE TRIGGER IF NOT EXISTS audit_records_append_only AFTER INSERT ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit_records is append-only: seq exists (INSERT OR REPLACE refused)')
    WHERE NEW.seq <> (SELECT MAX(seq) FROM audit_records);
    SELECT RAISE(ABORT, 'audit_records is append-only: seq must be the head seq + 1')
    WHERE NEW.seq > 1
    AND NEW.prev_hash IS NOT (SELECT hash FROM audit_records WHERE seq = NEW.seq - 1);
END;
"""
)

_META: Final = """
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"""
_PAYLOADS: Final = """
CREATE TABLE IF NOT EXISTS audit_payloads (seq INTEGER PRIMARY KEY, payload BLOB);"""

_DDL_V1: Final = _META + "\n" + _TABLE_V1 + _PAYLOADS + _INDEXES + "\n" + _GUARDS_V1
_DDL: Final = _META + "\n" + _TABLE_V2 + _PAYLOADS + _INDEXES + _INDEXES_V2 + "\n" + _GUARDS
"""Every statement of a version 2 store (``_DDL_V1``: version 1)."""


def ddl(version: int) -> str:
    """The schema statements of ``version``."""
    return _DDL if version == 2 else _DDL_V1


def column_sql(name: str, version: int, alias: str = "r") -> str:
    """SQL for the query field ``name`` of row ``alias`` in a ``version`` file: its column,
    or (version 2, a field no index uses) the body's field as a generated column would
    compute it."""
    if version < 2 or name in _GENERATED or name == "time":
        return f"{alias}.{name}"
    return f"json_extract(CAST({alias}.body AS TEXT), '$.{name}')"


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


def _expected_triggers(version: int = SCHEMA_VERSION) -> dict[str, str]:
    out: dict[str, str] = {}
    for statement in _split_ddl(_GUARDS if version >= 2 else _GUARDS_V1):
        if statement.lstrip().startswith("CREATE TRIGGER"):
            name = statement.split()[5]
            out[name] = _normalise(statement)
    return out


_HEAD: Final = "SELECT seq, hash FROM audit_records WHERE seq >= 1 ORDER BY seq DESC LIMIT 1"

# The append's head read: its hash is NULL when the head's body begins like a seal
# (coworker.audit.chain_seal.SEAL_PREFIX; two memcmp in SQL: no third column, no bytes object;
# aliased: Python's sqlite3 decodes every result column's name on every execute).
_HEAD_SEAL: Final = (
    "SELECT seq, CASE WHEN body >= X'7b2263617465676f7279223a22636861696e2d7365616c222c'"
    " AND body < X'7b2263617465676f7279223a22636861696e2d7365616c222d' THEN NULL ELSE hash END"
    " AS hash FROM audit_records WHERE seq >= 1 ORDER BY seq DESC LIMIT 1"
)

_INSERT: Final = "INSERT INTO audit_records (seq, prev_hash, hash, body) VALUES (?, ?, ?, ?)"
"""A version 2 insert: the chained values only, SQLite derives the rest."""

_INSERT_V1: Final = (
    f"INSERT INTO audit_records (seq, prev_hash, hash, body, {', '.join(_COLUMNS)}, time) "
    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 5))})"
)


def _guard_problems(conn: sqlite3.Connection, version: int = SCHEMA_VERSION) -> list[str]:
    """What is wrong with the append-only guards of a ``version`` file: triggers missing,
    altered or foreign, the table not ours, and (version 2) its indexes missing, altered or
    foreign (they are what verify reads instead of parsing every body)."""
    expected = _expected_triggers(version)
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
    # The table itself (PRAGMA writable_schema can rewrite it, e.g. to drop the CHECK or to
    # turn a generated column into a plain one): as created now, or, in a version 1 file, as
    # created before the CHECK existed.
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'"
    ).fetchone()
    table_sql = _normalise(row[0] if row and row[0] else "")
    if table_sql not in _expected_tables(version):
        problems.append("table audit_records is altered (not coworker's definition)")
    if version >= 2:
        problems += _index_problems(conn)
    return problems


def _index_problems(conn: sqlite3.Connection) -> list[str]:
    expected = _expected_indexes()
    present = {
        r[0]: _normalise(r[1])
        for r in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
            "AND tbl_name = 'audit_records' AND sql IS NOT NULL"
        )
    }
    problems: list[str] = []
    for name, definition in expected.items():
        if name not in present:
            problems.append(f"index {name} is missing")
        elif present[name] != definition:
            problems.append(f"index {name} is altered (not coworker's definition)")
    problems += [
        f"index {name} on audit_records is not coworker's"
        for name in sorted(present)
        if name not in expected
    ]
    return problems


def _expected_indexes() -> dict[str, str]:
    return {
        statement.split()[5]: _normalise(statement)
        for statement in _split_ddl(_INDEXES + _INDEXES_V2)
    }


def _expected_tables(version: int = SCHEMA_VERSION) -> tuple[str, ...]:
    if version >= 2:
        return (_normalise(_TABLE_V2),)
    current = _normalise(_TABLE_V1)
    return current, current.replace(" CHECK (seq >= 1)", "")


def _row(record: StoredRecord, fields: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of a version 2 insert (:data:`_INSERT`)."""
    return (record.seq, record.prev_hash, record.hash, record.body)


_TEXT_TYPES: Final = frozenset({str, type(None)})


def _row_v1(record: StoredRecord, fields: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of a version 1 insert (:data:`_INSERT_V1`): the writer copies the columns."""
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
