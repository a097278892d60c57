"""verify_chain names the first tampered record and what was done to it.

Every tampering is done with raw SQL after dropping the append-only triggers, as the owner of
the file could.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.chain import seal
from coworker.audit.record import canonical
from coworker.audit.store import Head, InMemoryStore, StoredRecord
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import (
    BAD_GENESIS,
    COLUMN_MISMATCH,
    DELETED,
    EDITED,
    GUARD,
    INSERTED,
    OUT_OF_RANGE,
    PAYLOAD_MISMATCH,
    REORDERED,
    REWRITTEN,
    TRUNCATED,
    VerifyReport,
    verify_chain,
)
from coworker.exceptions import AuditUnavailable
from tests.audit.conftest import fill, legacy_log, make_entries, raw


@pytest.fixture
def log(db_path: Path) -> Path:
    """A 20-record SQLite log, closed."""
    store = SQLiteStore(db_path)
    fill(store, 20)
    store.close()
    return db_path


@pytest.fixture
def v1log(db_path: Path) -> Path:
    """A 20-record SQLite log at schema version 1 (plain query columns), closed."""
    legacy_log(db_path)
    store = SQLiteStore(db_path, upgrade=False)
    fill(store, 20)
    store.close()
    return db_path


def _verify(path: Path, expected_head: Head | None = None) -> VerifyReport:
    store = SQLiteStore(path, readonly=True)
    try:
        return verify_chain(store, expected_head=expected_head)
    finally:
        store.close()


def rearm(path: Path) -> None:
    """Put the append-only triggers back (a read-write open does), as a careful tamperer
    would after editing: what is left to find is in the rows."""
    SQLiteStore(path, upgrade=False).close()


def _row(conn: sqlite3.Connection, seq: int) -> tuple[bytes, bytes, bytes]:
    return conn.execute(
        "SELECT prev_hash, hash, body FROM audit_records WHERE seq = ?", (seq,)
    ).fetchone()


def test_intact_log_verifies(log: Path) -> None:
    """An untouched log is ok and reports its head."""
    report = _verify(log)
    assert report.ok and report.checked == 20
    assert report.head.seq == 20
    assert report.kind is None and report.bad_seq is None


def test_empty_log_verifies(db_path: Path) -> None:
    """An empty log is intact."""
    SQLiteStore(db_path).close()
    report = _verify(db_path)
    assert report.ok and report.head is None


def test_edited_field(log: Path) -> None:
    """Changing a field of a body is named 'edited' at that seq."""
    conn = raw(log)
    body = json.loads(_row(conn, 7)[2])
    body["user_id"] = "mallory"
    conn.execute("UPDATE audit_records SET body = ? WHERE seq = 7", (canonical(body),))
    report = _verify(log)
    assert (report.ok, report.bad_seq, report.kind) == (False, 7, EDITED)
    assert report.checked == 6


def test_edited_with_recomputed_hash(log: Path) -> None:
    """A record rewritten with its own hash recomputed is still named, at its seq."""
    conn = raw(log)
    prev, _, body = _row(conn, 7)
    fields = json.loads(body)
    fields["outcome"] = "ok-forged"
    new_body = canonical(fields)
    conn.execute(
        "UPDATE audit_records SET body = ?, hash = ? WHERE seq = 7",
        (new_body, hashlib.sha256(prev + new_body).digest()),
    )
    report = _verify(log)
    assert (report.bad_seq, report.kind) == (7, EDITED)


def test_deleted_row_is_a_gap(log: Path) -> None:
    """Deleting a row is named 'deleted' at the missing seq."""
    raw(log).execute("DELETE FROM audit_records WHERE seq = 5")
    report = _verify(log)
    assert (report.bad_seq, report.kind) == (5, DELETED)


def test_deleted_and_renumbered(log: Path) -> None:
    """Deleting a row and closing the gap is still 'deleted'."""
    conn = raw(log)
    conn.execute("DELETE FROM audit_records WHERE seq = 5")
    conn.execute("UPDATE audit_records SET seq = seq - 1 WHERE seq > 5")
    report = _verify(log)
    assert (report.bad_seq, report.kind) == (5, DELETED)


def test_swapped_rows_are_reordered(log: Path) -> None:
    """Swapping two rows is named 'reordered' at the first of them."""
    conn = raw(log)
    conn.execute("UPDATE audit_records SET seq = 1000 WHERE seq = 9")
    conn.execute("UPDATE audit_records SET seq = 9 WHERE seq = 10")
    conn.execute("UPDATE audit_records SET seq = 10 WHERE seq = 1000")
    report = _verify(log)
    assert (report.bad_seq, report.kind) == (9, REORDERED)


def test_inserted_forged_row(log: Path) -> None:
    """A forged, correctly linked row inserted in the middle is named 'inserted'."""
    conn = raw(log)
    prev_hash = _row(conn, 11)[1]
    forged_fields, _ = make_entries(1, **{"user.id": "mallory"})[0]
    (forged,) = seal([forged_fields], Head(11, prev_hash))
    conn.execute("UPDATE audit_records SET seq = seq + 1000 WHERE seq >= 12")
    conn.execute("UPDATE audit_records SET seq = seq - 999 WHERE seq > 1000")
    conn.execute(
        "INSERT INTO audit_records (seq, prev_hash, hash, body) VALUES (?, ?, ?, ?)",
        (12, forged.prev_hash, forged.hash, forged.body),
    )
    report = _verify(log)
    assert (report.bad_seq, report.kind) == (12, INSERTED)


def test_changed_genesis(log: Path) -> None:
    """A first record that does not start from the genesis hash is 'bad-genesis'."""
    conn = raw(log)
    _, _, body = _row(conn, 1)
    other = b"\x01" * 32
    conn.execute(
        "UPDATE audit_records SET prev_hash = ?, hash = ? WHERE seq = 1",
        (other, hashlib.sha256(other + body).digest()),
    )
    report = _verify(log)
    assert (report.bad_seq, report.kind) == (1, BAD_GENESIS)


def test_tail_rewritten_with_recomputed_chain(log: Path) -> None:
    """A tail rewritten with a valid recomputed chain verifies alone, but not against the
    saved head."""
    saved = _verify(log).head
    conn = raw(log)
    prev = _row(conn, 15)[1]
    for seq in range(16, 21):
        fields = json.loads(_row(conn, seq)[2])
        fields["doctype"] = "Forged"
        body = canonical(fields)
        digest = hashlib.sha256(prev + body).digest()
        conn.execute(
            "UPDATE audit_records SET prev_hash = ?, hash = ?, body = ? WHERE seq = ?",
            (prev, digest, body, seq),
        )
        prev = digest
    rearm(log)  # a careful owner puts the triggers back
    assert _verify(log).ok
    report = _verify(log, expected_head=saved)
    assert (report.ok, report.bad_seq, report.kind) == (False, 20, REWRITTEN)


def test_truncated_tail_against_saved_head(log: Path) -> None:
    """Cutting records off the end is 'truncated' against a saved head."""
    saved = _verify(log).head
    raw(log).execute("DELETE FROM audit_records WHERE seq > 17")
    rearm(log)
    assert _verify(log).ok
    report = _verify(log, expected_head=saved)
    assert (report.bad_seq, report.kind) == (18, TRUNCATED)


def test_saved_head_still_matches_after_appends(log: Path) -> None:
    """A saved head stays valid while the log grows."""
    saved = _verify(log).head
    store = SQLiteStore(log)
    fill(store, 3)
    store.close()
    report = _verify(log, expected_head=saved)
    assert report.ok and report.head.seq == 23


def test_progress_is_reported(db_path: Path) -> None:
    """The progress callback sees the count grow to the total."""
    store = SQLiteStore(db_path)
    entries = make_entries(1)
    for _ in range(4):
        store.append([entries[0][0]] * 10_000)
    seen: list[int] = []
    report = verify_chain(store, progress=seen.append)
    store.close()
    assert report.ok and seen[-1] == 40_000
    assert len(seen) >= 3 and seen == sorted(seen)


def test_in_memory_store_verifies_and_detects() -> None:
    """The generic path (iter_from) verifies too."""
    store = InMemoryStore()
    fill(store, 5)
    assert verify_chain(store).ok
    rec = store._records[2]  # the in-memory store has no triggers: tamper in place
    store._records[2] = type(rec)(rec.seq, rec.prev_hash, rec.hash, rec.body + b" ")
    report = verify_chain(store)
    assert (report.bad_seq, report.kind) == (3, EDITED)


_PARALLEL_CHILD = """
import json, sys
from coworker.audit import _verify_parallel as par
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain
par.MIN_RECORDS, par.CHUNK = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000, 700
store = SQLiteStore(sys.argv[1], readonly=True)
seen = []
report = verify_chain(store, progress=seen.append)
print(json.dumps({"parallel": par.can_fork(), "progress": seen, **report.to_dict()}))
"""


def _verify_in_child(path: Path, min_records: int = 1_000) -> dict[str, Any]:
    # A fresh single-threaded process: the parallel path only forks when that is safe.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", _PARALLEL_CHILD, str(path), str(min_records)],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    ).stdout  # fmt: skip
    return json.loads(out)


def test_parallel_verify_large_log(db_path: Path) -> None:
    """Large logs are re-hashed on several cores; a problem still gets named exactly."""
    store = SQLiteStore(db_path)
    entries = make_entries(1)
    store.append([entries[0][0]] * 3_000)
    head = store.head()
    store.close()
    result = _verify_in_child(db_path)
    if not result["parallel"]:
        pytest.skip("parallel verify needs fork and several cores")
    assert result["ok"] and result["checked"] == 3_000 and result["progress"][-1] == 3_000
    assert len(result["progress"]) > 3  # one step per chunk: the parallel path ran
    assert head is not None and result["head"] == {"seq": 3_000, "hash": head.hash_hex}
    conn = raw(db_path)
    conn.execute("UPDATE audit_records SET body = CAST(body || ' ' AS BLOB) WHERE seq = 2222")
    conn.close()
    result = _verify_in_child(db_path)
    assert (result["ok"], result["bad_seq"], result["kind"]) == (False, 2_222, EDITED)


@pytest.mark.parametrize("edit", ["relinked", "body-as-text", "hash-as-text", "head-as-text"])
def test_parallel_verify_checks_links_and_types_as_the_serial_loop_does(
    db_path: Path, edit: str
) -> None:
    """The parallel workers' batch checks (no Python loop per row) miss nothing the serial
    loop sees: a record given another prev_hash with a recomputed hash (self-consistent but
    not linked), a body or hash rewritten as TEXT with the same bytes."""
    store = SQLiteStore(db_path)
    store.append([make_entries(1)[0][0]] * 3_000)
    store.close()
    conn = raw(db_path)
    if edit == "relinked":
        body = _row(conn, 2222)[2]
        prev = hashlib.sha256(b"elsewhere").digest()
        conn.execute(
            "UPDATE audit_records SET prev_hash = ?, hash = ? WHERE seq = 2222",
            (prev, hashlib.sha256(prev + body).digest()),
        )
    elif edit == "body-as-text":
        conn.execute("UPDATE audit_records SET body = CAST(body AS TEXT) WHERE seq = 2222")
    else:
        seq = 3000 if edit == "head-as-text" else 2222
        conn.execute(f"UPDATE audit_records SET hash = CAST(hash AS TEXT) WHERE seq = {seq}")
    conn.close()
    result = _verify_in_child(db_path)
    serial = _verify_in_child(db_path, min_records=10**9)
    assert not result["ok"] and result["bad_seq"] in (2221, 2222, 3000)
    assert (result["kind"], result["bad_seq"]) == (serial["kind"], serial["bad_seq"])


@pytest.mark.parametrize("version", [1, 2])
def test_parallel_verify_reports_the_serial_findings_in_order(db_path: Path, version: int) -> None:
    """The parallel pass reports what the serial verifier does, in the same order: in a
    version 1 file (rows selected in its hashing scan) edited columns (on records with and
    without a payload), an edited time and a payload deleted by hand; in a version 2 file,
    where no column can be edited, the payload deleted by hand."""
    if version == 1:
        legacy_log(db_path)
    store = SQLiteStore(db_path, upgrade=False)
    assert store.schema_version == version
    plain = make_entries(1)[0][0]
    captured, payload = make_entries(1, **{"coworker.input": '{"n": 1}'})[0]
    assert payload is not None
    for _ in range(6):
        store.append([plain] * 499 + [captured], [None] * 499 + [payload])
    store.close()
    conn = raw(db_path)
    if version == 1:
        conn.execute("UPDATE audit_records SET user_id = 'mallory' WHERE seq = 2100")
        conn.execute("UPDATE audit_records SET flow_id = 'elsewhere' WHERE seq = 1000")
        conn.execute("UPDATE audit_records SET time = '1999-01-01' WHERE seq = 2999")
    conn.execute("DELETE FROM audit_payloads WHERE seq = 1500")
    conn.close()
    rearm(db_path)
    parallel = _verify_in_child(db_path)
    if not parallel["parallel"]:
        pytest.skip("parallel verify needs fork and several cores")
    assert len(parallel["progress"]) > 3  # one step per chunk: the parallel path ran
    serial = _verify_in_child(db_path, min_records=10**9)
    assert len(serial["progress"]) <= 2  # progress from the serial loop: at most 2 calls
    kinds = [(p["kind"], p["seq"]) for p in parallel["problems"]]
    columns = [(COLUMN_MISMATCH, 1000), (COLUMN_MISMATCH, 2100), (COLUMN_MISMATCH, 2999)]
    assert kinds == (columns if version == 1 else []) + [(PAYLOAD_MISMATCH, 1500)]
    assert parallel["problems"] == serial["problems"]
    assert parallel["head"] == serial["head"] and parallel["checked"] == 3_000


def test_text_typed_tampering_is_named(log: Path) -> None:
    """A blob rewritten as TEXT is reported as edited, not a crash."""
    conn = raw(log)
    conn.execute("UPDATE audit_records SET body = CAST(body AS TEXT) || ' ' WHERE seq = 4")
    conn.execute("UPDATE audit_records SET hash = 'not-a-blob' WHERE seq = 6")
    report = _verify(log)
    assert (report.bad_seq, report.kind) == (4, EDITED)


def test_parallel_verify_names_a_gap(db_path: Path) -> None:
    """A deleted row in a large log is found by the parallel pass and named by the serial one."""
    store = SQLiteStore(db_path)
    store.append([make_entries(1)[0][0]] * 2_000)
    store.close()
    raw(db_path).execute("DELETE FROM audit_records WHERE seq = 1500")
    result = _verify_in_child(db_path)
    assert (result["ok"], result["bad_seq"], result["kind"]) == (False, 1_500, DELETED)


# -- what the links do not cover: columns, payloads, stray rows, guards -------------------------
def test_edited_query_column_is_reported(v1log: Path) -> None:
    """In a version 1 file, editing only user_id hides a record from `query --user`: verify
    names the column."""
    from coworker.audit.query import query

    log = v1log
    conn = raw(log)
    conn.execute("UPDATE audit_records SET user_id = 'bob' WHERE seq = 5")
    conn.close()
    rearm(log)
    store = SQLiteStore(log, readonly=True)
    assert 5 not in [e.seq for e in query(store, user="alice")]  # what the edit achieves
    store.close()
    report = _verify(log)
    assert (report.ok, report.kind, report.bad_seq) == (False, COLUMN_MISMATCH, 5)
    assert "user_id='bob'" in report.detail and "'alice'" in report.detail


def test_every_indexed_column_is_checked(v1log: Path) -> None:
    """In a version 1 file, each query column (and time) differing from the body is a
    column-mismatch."""
    log = v1log
    columns = ("kind", "category", "operation", "doctype", "outcome", "flow_id", "step_id")
    columns += ("run_id", "user_id", "agent_id", "trace_id", "span_id", "time")
    conn = raw(log)
    for seq, column in enumerate(columns, start=1):
        conn.execute(f"UPDATE audit_records SET {column} = 'x' WHERE seq = ?", (seq,))
    conn.close()
    rearm(log)
    report = _verify(log)
    found = [(p.kind, p.seq) for p in report.problems]
    assert found == [(COLUMN_MISMATCH, s) for s in range(1, len(columns) + 1)]


def test_row_at_seq_zero_is_refused_by_the_schema(log: Path) -> None:
    """A new file has CHECK (seq >= 1): even without the triggers, seq 0 cannot go in."""
    conn = raw(log)
    with pytest.raises(sqlite3.IntegrityError, match="seq >= 1"):
        conn.execute(
            "INSERT INTO audit_records (seq, prev_hash, hash, body) "
            "SELECT 0, prev_hash, hash, body FROM audit_records WHERE seq = 3"
        )
    conn.close()


def _legacy_log(path: Path) -> None:
    """A file created before the CHECK (seq >= 1) existed, with 20 records."""
    legacy_log(path, check=False)
    store = SQLiteStore(path, upgrade=False)
    fill(store, 20)
    store.close()


def test_row_at_seq_zero_is_never_read_and_verify_reports_it(db_path: Path) -> None:
    """In an older file a hand-inserted seq 0 row is skipped by every read and verify fails
    (even against the saved head)."""
    from coworker.audit.query import query

    _legacy_log(db_path)
    saved = _verify(db_path).head
    conn = raw(db_path)
    conn.execute(
        "INSERT INTO audit_records (seq, prev_hash, hash, body, user_id) "
        "SELECT 0, prev_hash, hash, body, 'mallory' FROM audit_records WHERE seq = 3"
    )
    conn.close()
    rearm(db_path)
    store = SQLiteStore(db_path, readonly=True)
    assert [e.seq for e in query(store)] == list(range(1, 21))
    assert [e.seq for e in query(store, user="mallory")] == []
    assert next(r.seq for r in store.iter_from(0)) == 1
    assert store.head() == saved and store.open_intents() == []
    store.close()
    report = _verify(db_path, expected_head=saved)
    assert (report.ok, report.kind, report.bad_seq) == (False, OUT_OF_RANGE, 0)


def test_lookalike_triggers_are_reported_and_replaced_loudly(
    log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Do-nothing triggers with the right names: verify reports them (read-only), a
    read-write open logs an ERROR naming them and puts the real ones back."""
    conn = raw(log)
    for name, event in (
        ("audit_records_no_update", "UPDATE"),
        ("audit_records_no_delete", "DELETE"),
        ("audit_records_append_only", "INSERT"),
    ):
        conn.execute(f"CREATE TRIGGER {name} BEFORE {event} ON audit_records BEGIN SELECT 1; END")
    conn.execute("UPDATE audit_records SET body = body WHERE seq = 1")  # allowed now
    conn.close()
    report = _verify(log)
    assert not report.ok and {p.kind for p in report.problems} == {GUARD}
    assert "audit_records_no_update is altered" in report.detail
    with sqlite3.connect(log) as check:  # verify changed nothing
        (sql,) = check.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'audit_records_no_update'"
        ).fetchone()
        assert "SELECT 1" in sql
    with caplog.at_level("ERROR", logger="coworker.audit"):
        SQLiteStore(log).close()
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "audit_records_append_only is altered" in caplog.text
    conn = sqlite3.connect(log, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match="UPDATE is not allowed"):
        conn.execute("UPDATE audit_records SET body = x'7b7d' WHERE seq = 1")
    conn.close()
    assert _verify(log).ok


def test_foreign_trigger_that_drops_rows_fails_the_append(log: Path) -> None:
    """A BEFORE INSERT trigger doing RAISE(IGNORE) would drop records silently: the append
    raises AuditUnavailable instead, and verify names the trigger."""
    conn = sqlite3.connect(log, isolation_level=None)
    conn.execute(
        "CREATE TRIGGER swallow BEFORE INSERT ON audit_records BEGIN SELECT RAISE(IGNORE); END"
    )
    conn.close()
    report = _verify(log)
    assert report.kind == GUARD and "swallow on audit_records is not coworker's" in report.detail
    store = SQLiteStore(log)
    with pytest.raises(AuditUnavailable, match="only 0 of 1"):
        fill(store, 1)
    assert store.head().seq == 20  # type: ignore[union-attr]
    store.close()


def test_edited_payload_is_reported(db_path: Path) -> None:
    """A stored payload edited by hand no longer matches the digest in its record; one
    deleted by hand (no erasure record) is reported too."""
    store = SQLiteStore(db_path)
    fill(store, 3, **{"coworker.input": '{"amount": 10}'})
    store.close()
    conn = sqlite3.connect(db_path, isolation_level=None)
    assert conn.execute("SELECT count(*) FROM audit_payloads").fetchone() == (3,)
    conn.execute("UPDATE audit_payloads SET payload = NULL WHERE seq = 1")  # no erase record
    conn.execute("UPDATE audit_payloads SET payload = '{\"amount\": 10000}' WHERE seq = 2")
    conn.execute("INSERT INTO audit_payloads (seq, payload) VALUES (99, x'00')")
    conn.close()
    report = _verify(db_path)
    found = [(p.kind, p.seq) for p in report.problems]
    assert found == [(PAYLOAD_MISMATCH, 99), (PAYLOAD_MISMATCH, 1), (PAYLOAD_MISMATCH, 2)]
    assert "payload deleted" in report.problems[1].detail
    assert "payload edited" in report.problems[2].detail


def test_in_memory_store_checks_payload_digests() -> None:
    """The in-memory store re-hashes payloads too."""
    store = InMemoryStore()
    fields, payload = make_entries(1, **{"coworker.input": '{"a": 1}'})[0]
    (rec,) = store.append([fields], [payload])
    assert verify_chain(store).ok
    store._records[0] = StoredRecord(rec.seq, rec.prev_hash, rec.hash, rec.body, b"{}")
    report = verify_chain(store)
    assert (report.ok, report.kind) == (False, PAYLOAD_MISMATCH)


def test_verify_while_appending_reports_nothing_false(db_path: Path) -> None:
    """verify runs while another thread keeps appending (with payloads): every report is ok;
    records added after the head was read are not 'out-of-range' nor orphan payloads."""
    import threading

    writer = SQLiteStore(db_path)
    fill(writer, 5, **{"coworker.input": '{"a": 1}'})
    entries = make_entries(50, **{"coworker.input": '{"b": 2}'})
    stop = threading.Event()
    appended = [0]

    def append() -> None:
        while not stop.is_set():
            for fields, payload in entries:
                writer.append([fields], [payload])
                appended[0] += 1

    thread = threading.Thread(target=append)
    thread.start()
    try:
        reports = []
        for _ in range(20):
            start = appended[0]
            reports.append(_verify(db_path))
            while appended[0] == start:  # make sure appends interleave with the next verify
                stop.wait(0.001)
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert all(r.ok for r in reports), [r for r in reports if not r.ok][:1]


@pytest.mark.parametrize(
    ("body", "version"),
    [
        (b'{"seq":99,"x":1}', 2),
        (b'{"x":1}', 2),
        (b'{"seq":"21","x":1}', 2),
        (b'{"seq":21.0,"x":1}', 2),
        (b'{"seq":true,"x":1}', 2),
        (b"[21]", 2),
        (b'"21"', 2),
        (b"not json", 1),
        (b'{"seq":99,"x":1}', 1),
    ],
    ids=[
        "wrong-seq",
        "no-seq",
        "seq-a-string",
        "seq-a-float",
        "seq-true",
        "not-an-object",
        "a-string",
        "not-json-v1",
        "wrong-seq-v1",
    ],
)
def test_a_chained_body_that_is_not_a_record_at_its_seq_is_malformed(
    db_path: Path, body: bytes, version: int
) -> None:
    """A row appended with correct links (hash = SHA-256(prev || body)) whose body is not a
    JSON object carrying its own seq as an integer is named ``malformed``: the links alone
    passed it (version 2 finds it in the partial index SQLite keeps of such rows)."""
    from coworker.audit.chain import link
    from coworker.audit.store import MALFORMED

    if version == 1:
        legacy_log(db_path)
    store = SQLiteStore(db_path, upgrade=False)
    fill(store, 20)
    store.close()
    log = db_path
    conn = sqlite3.connect(log, isolation_level=None)  # an INSERT: the triggers allow it
    (prev,) = conn.execute("SELECT hash FROM audit_records WHERE seq = 20").fetchone()
    conn.execute(
        "INSERT INTO audit_records (seq, prev_hash, hash, body) VALUES (21, ?, ?, ?)",
        (prev, link(prev, body), body),
    )
    conn.close()
    report = _verify(log)
    assert not report.ok
    assert [(p.kind, p.seq) for p in report.problems] == [(MALFORMED, 21)], report.problems


def test_a_body_that_is_not_json_cannot_be_appended_to_a_version_2_file(log: Path) -> None:
    """The generated columns are computed from the body on insert: SQLite refuses a body that
    is not JSON, even with the triggers dropped; nothing is inserted."""
    from coworker.audit.chain import link

    conn = raw(log)
    (prev,) = conn.execute("SELECT hash FROM audit_records WHERE seq = 20").fetchone()
    with pytest.raises(sqlite3.OperationalError, match="malformed JSON"):
        conn.execute(
            "INSERT INTO audit_records (seq, prev_hash, hash, body) VALUES (21, ?, ?, ?)",
            (prev, link(prev, b"not json"), b"not json"),
        )
    assert conn.execute("SELECT max(seq) FROM audit_records").fetchone() == (20,)
    conn.close()
    rearm(log)
    assert _verify(log).ok
