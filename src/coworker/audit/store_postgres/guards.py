"""The append-only guards of the PostgreSQL store: what they are, how they are checked."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import psycopg

from coworker.audit.store_postgres.ddl import (
    _DDL_V1,
    _DDL_V2,
    _DDL_V4,
    _DDL_V5,
    _DDL_V6,
    _DDL_V7,
    _DDL_V8,
    _quote_ident,
    render,
)

_log = logging.getLogger("coworker.audit")

# Our triggers, as pg_get_triggerdef prints them ({s}: the schema as quote_ident prints it).
_GUARD_TRIGGERS: Final = {
    ("records", "records_no_change"): "CREATE TRIGGER records_no_change BEFORE DELETE OR UPDATE"
    " ON {s}.records FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change()",
    ("records", "records_no_change_stmt"): "CREATE TRIGGER records_no_change_stmt BEFORE DELETE"
    " OR UPDATE OR TRUNCATE ON {s}.records FOR EACH STATEMENT EXECUTE FUNCTION"
    " {s}.refuse_change()",
    ("schema_version", "schema_version_no_change"): "CREATE TRIGGER schema_version_no_change"
    " BEFORE DELETE OR UPDATE ON {s}.schema_version FOR EACH ROW EXECUTE FUNCTION"
    " {s}.refuse_change()",
    ("schema_version", "schema_version_no_change_stmt"): "CREATE TRIGGER"
    " schema_version_no_change_stmt BEFORE DELETE OR UPDATE OR TRUNCATE ON {s}.schema_version"
    " FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change()",
}
_GUARD_CONSTRAINTS: Final = {
    "records_pkey": "PRIMARY KEY (seq)",
    "records_seq_check": "CHECK ((seq >= 1))",
    "records_prev_hash_check": "CHECK ((octet_length(prev_hash) = 32))",
    "records_hash_check": "CHECK ((octet_length(hash) = 32))",
    "records_prev_hash_key": "UNIQUE (prev_hash)",
}
_GUARDED_TABLES: Final = ("records", "payloads", "schema_version")

# Guards that came with a schema version after 1: (table, trigger) -> definition.
_GUARD_TRIGGERS_V2: Final = {
    ("records", "records_chain"): "CREATE TRIGGER records_chain AFTER INSERT ON {s}.records"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.check_chain()",
}


# Version 5: the chain check skips the rows append() inserts with its owner's rights.
_GUARD_TRIGGERS_V5: Final = {
    ("records", "records_chain"): "CREATE TRIGGER records_chain AFTER INSERT ON {s}.records"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT WHEN ((NOT {s}.owner_writes()))"
    " EXECUTE FUNCTION {s}.check_chain()",
}
# (SECURITY DEFINER, proconfig) of our functions from version 5 on; (False, None) otherwise.
_FUNCTION_SETTINGS_V5: Final[dict[str, tuple[bool, list[str] | None]]] = {
    "append": (True, ["search_path=pg_catalog, pg_temp", "plan_cache_mode=force_generic_plan"]),
    "check_chain": (False, ["search_path=pg_catalog, pg_temp"]),
}


def _guards_for(version: int) -> tuple[dict[tuple[str, str], str], list[str]]:
    """The triggers and the DDL texts (for their functions) of a schema at ``version``."""
    triggers = dict(_GUARD_TRIGGERS)
    ddls = [_DDL_V1]
    if version >= 2:
        triggers.update(_GUARD_TRIGGERS_V2)
        ddls.append(_DDL_V2)
    if version >= 4:
        ddls.append(_DDL_V4)  # the append() function (no new trigger)
    if version >= 5:
        triggers.update(_GUARD_TRIGGERS_V5)
        ddls.append(_DDL_V5)  # faster check_chain() and append() (same signatures)
    if version >= 6:
        ddls.append(_DDL_V6)  # lock_head() and append() checking their lock key
    if version >= 7:
        ddls.append(_DDL_V7)  # lock_head() and append() refusing a sealed (retired) chain
    if version >= 8:
        ddls.append(_DDL_V8)  # owner_writes() in PL/pgSQL (its plan kept per session)
    return triggers, ddls


def _function_sources(ddls: Sequence[str]) -> dict[str, str]:
    """The bodies (``prosrc``) of our PL/pgSQL functions, with ``{schema}`` still in them."""
    import re

    return {
        m.group(1): m.group(2)
        for ddl in ddls
        for m in re.finditer(
            r"CREATE (?:OR REPLACE )?FUNCTION \{schema\}\.(\w+)\(.*?\$\$(.*?)\$\$",
            ddl,
            re.DOTALL,
        )
    }


def _installed_version(cur: psycopg.Cursor[Any], qs: str) -> int:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{qs}.schema_version",))
    row = cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur.execute(f"SELECT coalesce(max(version), 0) FROM {qs}.schema_version")
    found = cur.fetchone()
    return int(found[0]) if found is not None else 0


def _guard_problems(cur: psycopg.Cursor[Any], schema: str, chain: str = "") -> list[str]:
    """What is wrong with the append-only guards of ``schema``: missing, altered, foreign."""
    cur.execute("SELECT quote_ident(%s)", (schema,))
    row = cur.fetchone()
    assert row is not None
    qs = row[0]
    guard_triggers, ddls = _guards_for(_installed_version(cur, _quote_ident(schema)))
    problems: list[str] = []
    cur.execute(
        "SELECT c.relname, t.tgname, t.tgenabled, pg_get_triggerdef(t.oid) FROM pg_trigger t"
        " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND NOT t.tgisinternal",
        (schema,),
    )
    present = {(r[0], r[1]): (r[2], r[3]) for r in cur.fetchall()}
    for key, definition in guard_triggers.items():
        found = present.get(key)
        if found is None:
            problems.append(f"trigger {key[1]} on {key[0]} is missing")
        elif found[1] != definition.format(s=qs):
            problems.append(f"trigger {key[1]} on {key[0]} is altered (not coworker's)")
        elif found[0] != "A":
            problems.append(f"trigger {key[1]} on {key[0]} is not ENABLE ALWAYS ({found[0]})")
    for table, name in sorted(set(present) - set(guard_triggers)):
        if table in _GUARDED_TABLES:
            problems.append(f"trigger {name} on {table} is not coworker's")
    version = _installed_version(cur, _quote_ident(schema))
    cur.execute(
        "SELECT p.proname, p.prosrc, p.prosecdef, p.proconfig,"
        " p.proowner = (SELECT c.relowner FROM pg_class c WHERE c.oid = to_regclass(%s)),"
        " p.proisstrict"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s",
        (f"{qs}.records", schema),
    )
    functions: dict[str, tuple[Any, ...]] = {}
    overloaded: set[str] = set()
    for r in cur.fetchall():
        if r[0] in functions:
            overloaded.add(r[0])
        functions[r[0]] = (r[1], r[2], r[3], r[4], r[5])
    for name, source in _function_sources(ddls).items():
        # The DDL ran with the schema always double-quoted (_quote_ident), not as quote_ident.
        expected = render(source, schema, chain)
        secdef, config = (
            _FUNCTION_SETTINGS_V5.get(name, (False, None))
            if version >= 5
            else (
                False,
                None,
            )
        )
        got = functions.get(name)
        if got is None:
            problems.append(f"function {name} is missing")
        elif name in overloaded:
            # One row per name is compared: another function of the same name (other
            # arguments) with our source would answer for an altered one.
            problems.append(f"function {name} is overloaded (not coworker's)")
        elif got[:3] != (expected, secdef, config):
            problems.append(f"function {name} is altered (not coworker's)")
        elif got[4]:
            # STRICT (ALTER FUNCTION, source untouched): a call with a NULL argument returns
            # NULL or no row without running, e.g. append() with no payloads inserts nothing.
            problems.append(f"function {name} is altered (STRICT; not coworker's)")
        elif secdef and not got[3]:
            # It runs with its owner's rights, and the chain check trusts the owner's rows.
            problems.append(f"function {name} is not owned by the owner of records")
    cur.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
        "to_regclass(%s)",
        (f"{qs}.records",),
    )
    constraints = dict(cur.fetchall())
    for name, definition in _GUARD_CONSTRAINTS.items():
        if constraints.get(name) != definition:
            state = "missing" if name not in constraints else "altered"
            problems.append(f"constraint {name} on records is {state}")
    cur.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"
        " AND a.attname = ANY(%s)",
        (f"{qs}.records", ["seq", "prev_hash", "hash", "body"]),
    )
    types = dict(cur.fetchall())
    for column, wanted in (("seq", "bigint"), ("prev_hash", "bytea"), ("hash", "bytea")):
        if types.get(column) != wanted:
            problems.append(f"column records.{column} is {types.get(column)}, not {wanted}")
    if types.get("body") != "bytea":
        # jsonb would reorder keys, text would re-encode: the hashed bytes are gone.
        problems.append(f"column records.body is {types.get('body')}, not bytea")
    cur.execute(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,"
        " (SELECT count(*) FROM pg_rewrite w WHERE w.ev_class = c.oid AND w.rulename <> '_RETURN')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s)",
        (schema, list(_GUARDED_TABLES)),
    )
    for table, rls, force, rules in cur.fetchall():
        if rls or force:
            problems.append(f"row-level security is on for {table} (it can hide records)")
        if rules:
            problems.append(f"{rules} rule(s) on {table} (a rule can drop or divert inserts)")
    return problems


def _restore_guards_ddl(schema: str, version: int, chain: str = "") -> str:
    """DDL that puts our functions and triggers back (the owner may run it)."""
    import re

    qs = _quote_ident(schema)
    guard_triggers, ddls = _guards_for(version)
    texts = [render(d, schema, chain) for d in ddls]
    statements = [
        m.group(0).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
        for ddl in texts
        for m in re.finditer(r"CREATE (?:OR REPLACE )?FUNCTION .*?\$\$.*?\$\$;", ddl, re.DOTALL)
    ]
    for (table, name), _ in guard_triggers.items():
        statements.append(f"DROP TRIGGER IF EXISTS {name} ON {qs}.{table};")
    triggers = [
        m.group(0)
        for ddl in texts
        for m in re.finditer(
            r"(?:CREATE TRIGGER|ALTER TABLE) .*?;", ddl.split("$$;")[-1], re.DOTALL
        )
    ]
    # A later version's definition of a trigger replaces the earlier one (records_chain);
    # every trigger is created before the ALTER TABLEs (ENABLE ALWAYS) name it.
    creates = {t.split()[2]: t for t in triggers if t.startswith("CREATE TRIGGER")}
    statements += list(creates.values())
    statements += [t for t in triggers if not t.startswith("CREATE TRIGGER")]
    return "\n".join(statements)
