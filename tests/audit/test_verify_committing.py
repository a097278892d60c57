"""Verify finds every record that commits to a payload that is not stored through the byte
search of the bodies (``_verify_parallel.committing``) that replaced SQLite's JSON parse of
every body: in the parallel workers' hashing scan and in the serial path alike, with the
committed-records index edited, for bodies crafted so that a substring test or SQLite's JSON
functions would not see the commitment (escaped keys, duplicate keys), in version 1 and 2
files; and the workers' selection is never taken for the column check's."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coworker.audit._verify_parallel import committing
from coworker.audit.store import PAYLOAD_MISMATCH
from coworker.audit.store_sqlite import SQLiteStore
from tests.audit.conftest import make_entries
from tests.audit.test_sqlite_index_tamper import _swap_in
from tests.audit.test_verify import _verify_in_child

DIGEST = hashlib.sha256(b"a payload nobody stored").hexdigest()


def _commits(body: bytes) -> bool:
    """What the integrity check decides for a body it is given: Python's decoding."""
    try:
        fields = json.loads(body)
    except (ValueError, TypeError):
        return False
    return isinstance(fields, dict) and fields.get("payload_digest") is not None


def _escaped(key: str, at: int) -> str:
    """``key`` as a JSON string with its character ``at`` written as a ``\\u`` escape."""
    return '"' + key[:at] + f"\\u{ord(key[at]):04x}" + key[at + 1 :] + '"'


def test_coworkers_own_bodies_pass_and_captured_ones_are_selected() -> None:
    """The honest case costs nothing: bodies without a payload are not selected, a body with
    one is, at its position in the batch."""
    plain = [fields for fields, _ in make_entries(5)]
    captured, payload = make_entries(1, **{"coworker.input": '{"n": 1}'})[0]
    assert payload is not None
    from coworker.audit.record import canonical

    bodies = [canonical({**f, "seq": i + 1}) for i, f in enumerate(plain)]
    assert committing(bodies) == []
    bodies.insert(3, canonical({**captured, "seq": 4}))
    assert committing(bodies) == [3]


NULL = '"payload_digest":null'
HOSTILE = {
    # A key spelt with an escape: no substring "payload_digest" at all.
    "escaped key": lambda b: b.replace(NULL, _escaped("payload_digest", 0) + f':"{DIGEST}"'),
    # Two keys: SQLite's JSON functions take the first, Python's decoder the last.
    "duplicate key": lambda b: b[:-1] + f',"payload_digest":"{DIGEST}"}}',
    "space before the colon": lambda b: b.replace(NULL, f'"payload_digest" :"{DIGEST}"'),
    # The honest form kept in a nested object, the commitment escaped at the top.
    "nested decoy": lambda b: b.replace(
        NULL,
        '"x":{"payload_digest":null},' + _escaped("payload_digest", 13) + f':"{DIGEST}"',
    ),
}  # fmt: skip


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
def test_committing_selects_hostile_bodies(hostile: str) -> None:
    """Each crafted body commits (as Python reads it) and is selected, alone or in a batch of
    honest bodies."""
    from coworker.audit.record import canonical

    fields = [f for f, _ in make_entries(3)]
    honest = [canonical({**f, "seq": i + 1}) for i, f in enumerate(fields)]
    body = HOSTILE[hostile](honest[1].decode()).encode()
    assert _commits(body)
    assert committing([body]) == [0]
    assert committing([honest[0], body, honest[2]]) == [1]


_KEYS = st.sampled_from(["payload_digest", "payload_digest ", "xpayload_digest", "seq", "a"])
_LEAVES = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(
    pairs=st.lists(st.tuples(_KEYS, _VALUES), max_size=5),
    ensure_ascii=st.booleans(),
    spaced=st.booleans(),
    escape=st.none() | st.integers(min_value=0, max_value=13),
)
def test_every_body_python_reads_as_committing_is_selected(
    pairs: list[tuple[str, Any]], ensure_ascii: bool, spaced: bool, escape: int | None
) -> None:
    """Property: whatever the JSON spelling (duplicate keys, nesting, spaces, escaped
    characters), a body Python decodes as committing to a payload is always selected."""
    separators = (", ", ": ") if spaced else (",", ":")
    parts = []
    for key, value in pairs:
        name = json.dumps(key)
        if escape is not None and key.startswith("payload_digest"):
            name = _escaped(key, escape)
        parts.append(name + separators[1] + json.dumps(value, ensure_ascii=ensure_ascii))
    body = ("{" + separators[0].join(parts) + "}").encode()
    if _commits(body):
        assert committing([body]) == [0]
        assert committing([b'{"payload_digest":null}', body]) == [1]


def _chain_raw(path: Path, body: bytes) -> int:
    """Append ``body`` at the head with a plain INSERT the append-only triggers accept (the
    owner of the file chaining a body of its own); its seq."""
    from coworker.audit import sqlite_schema
    from coworker.audit.store import StoredRecord

    conn = sqlite3.connect(path, isolation_level=None)
    seq, prev = conn.execute(
        "SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    record = StoredRecord(seq + 1, prev, hashlib.sha256(prev + body).digest(), body)
    (version,) = conn.execute(
        "SELECT value FROM audit_meta WHERE key = 'schema_version'"
    ).fetchone()
    if version == "1":  # the query columns as the writer copies them
        conn.execute(sqlite_schema._INSERT_V1, sqlite_schema._row_v1(record, json.loads(body)))
    else:
        conn.execute(sqlite_schema._INSERT, sqlite_schema._row(record, {}))
    conn.close()
    return int(seq) + 1


def _both(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reports of the parallel and the serial verifier (both in fresh processes)."""
    parallel = _verify_in_child(path)
    if not parallel["parallel"]:
        pytest.skip("parallel verify needs fork and several cores")
    assert len(parallel["progress"]) > 3  # one step per chunk: the parallel path ran
    serial = _verify_in_child(path, min_records=10**9)
    assert len(serial["progress"]) <= 2  # the serial loop's progress
    return parallel, serial


def test_a_deleted_payload_cut_from_the_index_is_found_by_the_parallel_verifier(
    db_path: Path,
) -> None:
    """A payload deleted by hand, its record's entry cut from audit_records_committed (the
    definition left ours), in a log large enough for the parallel path: found by the workers'
    byte search as by the serial one."""
    store = SQLiteStore(db_path)
    plain = make_entries(1)[0][0]
    captured, payload = make_entries(1, **{"coworker.input": '{"n": 1}'})[0]
    for _ in range(6):
        store.append([plain] * 499 + [captured], [None] * 499 + [payload])
    store.close()
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("DELETE FROM audit_payloads WHERE seq = 1500")
    conn.close()
    _swap_in(db_path, "audit_records_committed", "seq <> 1500")
    parallel, serial = _both(db_path)
    assert [(p["kind"], p["seq"]) for p in parallel["problems"]] == [(PAYLOAD_MISMATCH, 1500)]
    assert "payload deleted" in parallel["detail"]
    assert parallel["problems"] == serial["problems"] and parallel["checked"] == 3_000


@pytest.mark.parametrize("version", [1, 2])
def test_hostile_bodies_committing_to_no_stored_payload_are_reported(
    db_path: Path, version: int
) -> None:
    """Bodies chained by the owner that commit to a payload never stored, spelt to slip past
    a substring test or SQLite's JSON functions: each is reported, by the parallel workers
    (one per work item, so that both the batch test and the body-by-body one run) and by the
    serial verifier, and nothing else is; in a version 1 file too (its per-row flag is
    SQLite's json_extract)."""
    from coworker.audit.record import canonical
    from tests.audit.conftest import legacy_log

    if version == 1:
        legacy_log(db_path)
    store = SQLiteStore(db_path, upgrade=False)
    assert store.schema_version == version
    plain = make_entries(1)[0][0]
    store.append([plain] * 1_000)
    store.close()
    seqs = []
    for name in sorted(HOSTILE):
        seq = 1_000 + len(seqs) * 700 + 1
        honest = canonical({**plain, "seq": seq}).decode()
        seqs.append(_chain_raw(db_path, HOSTILE[name](honest).encode()))
        assert seqs[-1] == seq
        store = SQLiteStore(db_path, upgrade=False)
        store.append([plain] * 699)
        store.close()
    parallel, serial = _both(db_path)
    assert [(p["kind"], p["seq"]) for p in parallel["problems"]] == [
        (PAYLOAD_MISMATCH, s) for s in seqs
    ]
    assert all("payload deleted" in p["detail"] for p in parallel["problems"])
    assert parallel["problems"] == serial["problems"]


def test_a_version_2_table_made_plain_is_column_checked_by_the_parallel_verifier(
    db_path: Path,
) -> None:
    """A version 2 table rewritten with plain columns (PRAGMA writable_schema) and a column set
    by hand, in a log large enough for the parallel path: the workers' selection (bodies that
    may commit to a payload) is not the column check's, which then runs over every row as in
    the serial path."""
    from coworker.audit.store import COLUMN_MISMATCH, GUARD
    from tests.audit.test_sqlite_generated import make_plain_and_edit

    store = SQLiteStore(db_path)
    store.append([make_entries(1)[0][0]] * 3_000)
    store.close()
    make_plain_and_edit(db_path, 2222)
    parallel, serial = _both(db_path)
    # Every row differs (the plain columns hold nothing the body has): capped, in seq order.
    kinds = [p["kind"] for p in serial["problems"]]
    assert kinds[0] == GUARD and kinds[1:] == [COLUMN_MISMATCH] * (len(kinds) - 1)
    assert "more like it" in serial["problems"][-1]["detail"]
    assert parallel["problems"] == serial["problems"]
