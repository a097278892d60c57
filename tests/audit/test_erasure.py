"""Erasable payloads (issue 15): encrypted capture, crypto-shredding, verify after erase."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import coworker
from coworker.audit.erasure import MAGIC
from coworker.audit.store_sqlite import SQLiteStore
from coworker.cli import main

SECRET_ALICE = "alice-card-4111111111111111-zq"
SECRET_BOB = "bob-note-hush-hush-qx"


def _file_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


def _write_runs(db: Path) -> None:
    coworker.configure(audit=f"sqlite:///{db}")

    @coworker.run(operation="update", doctype="Note", capture_input=True)
    def update_note(text: str) -> str:
        return "done"

    with coworker.acting_as("alice"):
        update_note(SECRET_ALICE)
        update_note(SECRET_ALICE + "-2")
    with coworker.acting_as("bob"):
        update_note(SECRET_BOB)
    coworker.shutdown()


def _payload_records(db: Path) -> list[tuple[int, dict[str, Any], bytes | None]]:
    store = SQLiteStore(db, readonly=True)
    try:
        return [
            (r.seq, r.fields(), r.payload)
            for r in store.iter_from(1)
            if r.fields().get("payload_digest") is not None
        ]
    finally:
        store.close()


def _alice_key(db: Path) -> bytes:
    conn = sqlite3.connect(db)
    try:
        (key,) = conn.execute("SELECT key FROM audit_keys WHERE subject = 'alice'").fetchone()
    finally:
        conn.close()
    return bytes(key)


def test_captured_input_is_stored_encrypted_under_a_salted_digest(tmp_path: Path) -> None:
    """The store file never holds the captured plaintext; the body holds a salted digest."""
    db = tmp_path / "a.db"
    _write_runs(db)
    raw = _file_bytes(db)
    assert SECRET_ALICE.encode() not in raw and SECRET_BOB.encode() not in raw
    records = _payload_records(db)
    assert len(records) == 3
    for _seq, fields, payload in records:
        assert payload is not None and payload.startswith(MAGIC)
        assert fields["payload_subject"] == fields["user_id"]
    # Salted: the same input twice gives two different digests.
    store = SQLiteStore(db, readonly=True)
    try:
        plain = [store.plaintext(r) for r in store.iter_from(1) if r.payload is not None]
    finally:
        store.close()
    assert any(p is not None and SECRET_ALICE.encode() in p for p in plain)


def test_erase_shreds_the_key_and_ciphertext_and_the_chain_still_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """erase destroys alice's key and envelopes (absent from the file and -wal); verify,
    verify --checkpoint and query report her payloads as erased; bob's stay readable."""
    db = tmp_path / "a.db"
    url = f"sqlite:///{db}"
    _write_runs(db)
    key = _alice_key(db)
    alice = [(s, p) for s, f, p in _payload_records(db) if f["user_id"] == "alice"]
    assert len(alice) == 2 and key in _file_bytes(db)
    capsys.readouterr()

    # A separate process erases (a restart between the steps).
    done = subprocess.run(
        [sys.executable, "-m", "coworker", "audit", "erase", "--url", url,
         "--subject", "alice", "--reason", "GDPR Art. 17 request #12", "--by", "dpo"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "erased  2 payload(s)" in done.stdout

    raw = _file_bytes(db)
    assert key not in raw
    for _seq, envelope in alice:
        assert envelope is not None and envelope[4:40] not in raw  # salt+nonce+ciphertext
    assert SECRET_ALICE.encode() not in raw

    assert main(["audit", "verify", "--url", url]) == 0
    out = capsys.readouterr().out
    erasure_seq = max(s for s, _f, _p in _payload_records(db)) + 1
    for seq, _ in alice:
        assert f"payload  #{seq}: erased (seq {erasure_seq}, GDPR Art. 17 request #12)" in out
    assert "OK  " in out

    assert main(["audit", "query", "--url", url, "--json", "--user", "alice"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["payload"] for line in lines if line["kind"] == "outcome"] == [
        f"erased (seq {erasure_seq}, GDPR Art. 17 request #12)"
    ] * 2
    assert main(["audit", "query", "--url", url, "--json", "--user", "bob"]) == 0
    bob = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any(SECRET_BOB in (line["payload"] or "") for line in bob)

    store = SQLiteStore(db, readonly=True)
    try:
        (erasure,) = [r.fields() for r in store.iter_from(1) if r.fields()["kind"] == "erasure"]
    finally:
        store.close()
    assert erasure["erased_subject"] == "alice" and erasure["erased_by"] == "dpo"
    assert erasure["erased_seqs"] == [s for s, _ in alice]


def test_verify_checkpoint_passes_after_erase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint signed before an erasure still verifies the log after it."""
    db = tmp_path / "a.db"
    url = f"sqlite:///{db}"
    _write_runs(db)
    keyfile = tmp_path / "log.key"
    assert main(["audit", "keygen", "--name", "example.org/log", "--out", str(keyfile)]) == 0
    cp = tmp_path / "cp.txt"
    assert main(["audit", "checkpoint", "--url", url, "--key", str(keyfile), "--out", str(cp)]) == 0
    assert main(["audit", "erase", "--url", url, "--subject", "alice", "--reason", "r"]) == 0
    pub = f"{keyfile}.pub"
    assert main(["audit", "verify", "--url", url, "--key", pub, "--checkpoint", str(cp)]) == 0
    capsys.readouterr()


def test_an_edited_or_swapped_envelope_is_a_payload_mismatch(tmp_path: Path) -> None:
    """verify opens each envelope: a flipped byte or two envelopes swapped is reported."""
    db = tmp_path / "a.db"
    _write_runs(db)
    (s1, _, p1), (s2, _, p2), _bob = _payload_records(db)
    assert p1 is not None and p2 is not None
    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit_payloads SET payload = ? WHERE seq = ?", (p2, s1))
    conn.execute("UPDATE audit_payloads SET payload = ? WHERE seq = ?", (p1, s2))
    conn.commit()
    conn.close()
    assert main(["audit", "verify", "--url", f"sqlite:///{db}"]) == 1
    conn = sqlite3.connect(db)
    flipped = p1[:-1] + bytes([p1[-1] ^ 1])
    conn.execute("UPDATE audit_payloads SET payload = ? WHERE seq = ?", (p2, s2))
    conn.execute("UPDATE audit_payloads SET payload = ? WHERE seq = ?", (flipped, s1))
    conn.commit()
    conn.close()
    store = SQLiteStore(db, readonly=True)
    try:
        found = store.integrity_findings(store.head())
    finally:
        store.close()
    assert [(f.kind, f.seq) for f in found] == [("payload-mismatch", s1)]


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Any:
    from tests.pg import PGServer, import_psycopg, require_server

    import_psycopg()
    server = PGServer(require_server())
    yield server
    server.close()


@pytest.mark.postgres
def test_postgres_payloads_are_encrypted_and_erase_destroys_the_key(
    pg: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On PostgreSQL: payloads are stored encrypted with keys in the schema's key table;
    erase (after a reopen) deletes the key and payloads; verify passes and says erased."""
    from coworker.audit.record import canonical, payload_digest
    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    plain = canonical({"input": SECRET_ALICE, "output": None})
    base = {"v": 1, "kind": "outcome", "start": "2026-01-01T00:00:00.000000000Z"}
    store = PostgresStore(url, spool=None)
    store.append(
        [{**base, "user_id": u, "payload_digest": payload_digest(plain)} for u in ("alice", "bob")],
        [plain, plain],
    )
    stored = [(r.seq, r.payload) for r in store.iter_from(1)]
    assert all(p is not None and p.startswith(MAGIC) for _, p in stored)
    assert all(store.plaintext(r) == plain for r in store.iter_from(1))
    assert store.key_for("alice") is not None
    store.close()

    erase = ["audit", "erase", "--url", url, "--subject", "alice", "--reason", "Art. 17"]
    assert main(["audit", "hold", "--url", url, "--subject", "alice", "--reason", "case"]) == 0
    assert main(erase) == 1  # held
    assert main(["audit", "release", "--url", url, "--subject", "alice", "--reason", "x"]) == 0
    assert main(erase) == 0
    capsys.readouterr()
    reader = PostgresStore(url, readonly=True)
    try:
        assert reader.key_for("alice") is None and reader.key_for("bob") is not None
        records = list(reader.iter_from(1))
        assert records[0].payload is None and records[1].payload is not None
        assert reader.plaintext(records[1]) == plain
    finally:
        reader.close()
    assert main(["audit", "verify", "--url", url]) == 0
    assert "payload  #1: erased (seq 5, Art. 17)" in capsys.readouterr().out


def test_legal_hold_on_subject_or_flow_blocks_erase_until_released(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hold on alice, or on a flow alice appears in, makes erase exit 1 with the hold named
    and nothing changed; after release (each step a fresh open) erase succeeds."""
    db = tmp_path / "a.db"
    url = f"sqlite:///{db}"
    coworker.configure(audit=url)

    @coworker.run(operation="update", doctype="Note", capture_input=True)
    def update_note(text: str) -> str:
        return "done"

    with coworker.acting_as("alice"), coworker.flow("case", "case-7"):
        update_note(SECRET_ALICE)
    coworker.shutdown()
    key = _alice_key(db)

    def erase() -> int:
        return main(["audit", "erase", "--url", url, "--subject", "alice", "--reason", "r"])

    assert main(["audit", "hold", "--url", url, "--subject", "alice", "--reason", "lawsuit"]) == 0
    assert erase() == 1
    err = capsys.readouterr().err
    assert "refused: legal hold seq" in err and "lawsuit" in err
    assert _alice_key(db) == key  # nothing changed
    assert main(["audit", "release", "--url", url, "--subject", "alice", "--reason", "done"]) == 0
    assert main(["audit", "hold", "--url", url, "--flow-id", "case-7", "--reason", "audit"]) == 0
    assert erase() == 1
    assert "flow 'case-7', in which 'alice' appears" in capsys.readouterr().err
    assert main(["audit", "release", "--url", url, "--flow-id", "case-7", "--reason", "ok"]) == 0
    assert main(["audit", "release", "--url", url, "--flow-id", "case-7", "--reason", "ok"]) == 1
    assert erase() == 0
    assert main(["audit", "verify", "--url", url]) == 0
    store = SQLiteStore(db, readonly=True)
    try:
        kinds = [r.fields()["kind"] for r in store.iter_from(1)]
    finally:
        store.close()
    assert [k for k in kinds if k in ("hold", "release", "erasure")] == [
        "hold", "release", "hold", "release", "erasure",
    ]  # fmt: skip


# -- retention -------------------------------------------------------------------------------


def _ago(days: float) -> str:
    import time

    from coworker.audit.record import format_time

    return format_time(int((time.time() - days * 86400) * 1_000_000_000))


def test_purge_respects_floors_and_holds_and_never_deletes_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """purge refuses a date that reaches payloads younger than their category's floor (state-
    change 7y), deletes those past it except under hold, appends a purge record; verify
    reports them purged and the chain is whole (each step a fresh open)."""
    from coworker.audit.record import canonical, payload_digest

    db = tmp_path / "a.db"
    url = f"sqlite:///{db}"
    plain = canonical({"input": SECRET_ALICE, "output": None})

    def rec(days: float, category: str, user: str) -> dict[str, Any]:
        t = _ago(days)
        return {
            "v": 1, "kind": "outcome", "category": category, "user_id": user,
            "start": t, "recorded_at": t, "payload_digest": payload_digest(plain),
        }  # fmt: skip

    rows = [
        rec(9 * 365, "state-change", "alice"),  # 1: past the 7y floor
        rec(9 * 365, "state-change", "bob"),  # 2: past it, but bob is held
        rec(6 * 365, "state-change", "alice"),  # 3: 6 years: inside the 7y floor
        rec(300, "validation-violation", "alice"),  # 4: past the default 6mo
        rec(30, "validation-violation", "alice"),  # 5: young
    ]
    store = SQLiteStore(db)
    store.append(rows, [plain] * len(rows))
    store.close()
    assert main(["audit", "hold", "--url", url, "--subject", "bob", "--reason", "case"]) == 0

    def purge(before: str) -> int:
        return main(["audit", "purge", "--url", url, "--before", before, "--by", "ops"])

    assert purge(_ago(5 * 365)[:10]) == 1  # reaches seq 3 (state-change, 6y < 7y)
    assert "1 state-change payload(s) (floor 7y)" in capsys.readouterr().err
    assert purge("60d") == 1  # reaches seq 3 and seq 4... and seq 3 again: refused
    capsys.readouterr()
    assert all(p is not None for _, _, p in _payload_records(db))  # nothing deleted
    assert purge(_ago(8 * 365)[:10]) == 0
    assert "purged  1 payload(s)" in capsys.readouterr().out
    payloads = {s: p for s, _, p in _payload_records(db)}
    assert payloads[1] is None and all(payloads[s] is not None for s in (2, 3, 4, 5))
    assert main(["audit", "verify", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "payload  #1: purged (seq 7, retention, before " in out and "OK  7 records" in out
    store = SQLiteStore(db, readonly=True)
    try:
        purge_record = store.iter_from(7).__next__().fields()
    finally:
        store.close()
    assert purge_record["kind"] == "purge" and purge_record["purged_seqs"] == [1]
    assert purge_record["retention_floors"]["state-change"] == "7y"


def test_purge_policy_rejects_a_malformed_floor(capsys: pytest.CaptureFixture[str]) -> None:
    """A floor that is not a number and a unit is exit 2, naming it."""
    assert main(["audit", "purge", "--before", "2020-01-01", "--policy", "default=soon"]) == 2
    assert "'soon'" in capsys.readouterr().err


# -- bundles ---------------------------------------------------------------------------------


def test_bundle_carries_erased_payloads_as_erased_with_the_erasure_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """export --user alice after her erase: the manifest marks her payloads erased by seq N,
    holds record N (related, proven), verify-bundle passes; dropping N fails it."""
    db = tmp_path / "a.db"
    url = f"sqlite:///{db}"
    _write_runs(db)
    assert main(["audit", "erase", "--url", url, "--subject", "alice", "--reason", "Art. 17"]) == 0
    keyfile = tmp_path / "log.key"
    assert main(["audit", "keygen", "--name", "example.org/log", "--out", str(keyfile)]) == 0
    assert main(["audit", "checkpoint", "--url", url, "--key", str(keyfile)]) == 0
    pub = f"{keyfile}.pub"
    bundle = tmp_path / "bundle"
    export = ["audit", "export", "--out", str(bundle), "--url", url, "--key", pub]
    assert main([*export, "--user", "alice"]) == 0
    capsys.readouterr()
    manifest = json.loads((bundle / "manifest.json").read_text())
    entries = {e["seq"]: e for e in manifest["records"]}
    (erasure_seq,) = [s for s, e in entries.items() if e.get("related")]
    alice = [e for e in entries.values() if "payload" in e]
    assert len(alice) == 2
    assert {e["payload"] for e in alice} == {f"erased (seq {erasure_seq}, Art. 17)"}
    body = json.loads((bundle / entries[erasure_seq]["record"]).read_text())
    assert body["kind"] == "erasure" and body["erased_subject"] == "alice"
    assert main(["audit", "verify-bundle", str(bundle), "--key", pub]) == 0

    manifest["records"] = [e for e in manifest["records"] if not e.get("related")]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / entries[erasure_seq]["record"]).unlink()
    (bundle / entries[erasure_seq]["proof"]).unlink()
    capsys.readouterr()
    assert main(["audit", "verify-bundle", str(bundle), "--key", pub]) == 1
    assert "said to be erased by seq" in capsys.readouterr().out
