"""The database owner's attacks on a real SQLite audit log, each detected and named against a
checkpoint kept outside the database: rewrite, truncation, insertion, fork, a lying store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coworker.audit.checkpoint import CheckpointError, open_checkpoint, sign_note
from coworker.audit.checkpointer import make_checkpoint
from coworker.audit.keys import Signer, generate_signer
from coworker.audit.merkle import ProofError
from coworker.audit.proof import encode_proof, parse_proof, verify_record_proof
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.tlog import LogTree, TreeError
from coworker.cli import main

from .proofs_helpers import delete_last, drop_tree_cache, entry, fill, insert_record, rewrite_record

ORIGIN = "audit.example.com/test"


@pytest.fixture
def key(tmp_path: Path) -> tuple[Signer, Path, Path]:
    """A log key written by `coworker audit keygen`: (signer, KEYFILE, KEYFILE.pub)."""
    keyfile = tmp_path / "log.key"
    assert main(["audit", "keygen", "--name", ORIGIN, "--out", str(keyfile)]) == 0
    from coworker.audit.keys import load_signer

    return load_signer(keyfile), keyfile, Path(str(keyfile) + ".pub")


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _checkpoint(path: Path, keyfile: Path, out: Path) -> Path:
    assert (
        main(["audit", "checkpoint", "--url", _url(path), "--key", str(keyfile), "--out", str(out)])
        == 0
    )
    return out


def _verify(path: Path, pub: Path, *cps: Path) -> int:
    args = ["audit", "verify", "--url", _url(path), "--key", str(pub)]
    for cp in cps:
        args += ["--checkpoint", str(cp)]
    return main(args)


def test_intact_log_verifies_against_its_checkpoint(tmp_path, key, capsys) -> None:
    """An untouched log contains the checkpoint's tree: exit 0, OK."""
    _, keyfile, pub = key
    db = tmp_path / "a.db"
    fill(db, 20)
    cp = _checkpoint(db, keyfile, tmp_path / "cp")
    fill(db, 5, start=21)
    capsys.readouterr()
    assert _verify(db, pub, cp) == 0
    assert "OK    checkpoint" in capsys.readouterr().out


def test_rewrite_with_recomputed_chain_is_named_rewritten(tmp_path, key, capsys) -> None:
    """Editing record 7 and re-hashing every later record passes the chain check but is
    named `rewritten` against the earlier checkpoint."""
    _, keyfile, pub = key
    db = tmp_path / "a.db"
    fill(db, 20)
    cp = _checkpoint(db, keyfile, tmp_path / "cp")
    rewrite_record(db, 7, user_id="mallory")
    drop_tree_cache(db)
    assert main(["audit", "verify", "--url", _url(db)]) == 0  # the chain alone: self-consistent
    capsys.readouterr()
    assert _verify(db, pub, cp) == 1
    out = capsys.readouterr().out
    assert "rewritten" in out and "chain is self-consistent" in out


def test_deleting_the_last_records_is_named_truncated(tmp_path, key, capsys) -> None:
    """Cutting off the last 3 records is named `truncated` with the count."""
    _, keyfile, pub = key
    db = tmp_path / "a.db"
    fill(db, 20)
    cp = _checkpoint(db, keyfile, tmp_path / "cp")
    delete_last(db, 3)
    capsys.readouterr()
    assert _verify(db, pub, cp) == 1
    out = capsys.readouterr().out
    assert "truncated" in out and "3 record(s) were cut off" in out


def test_inserting_a_record_mid_log_is_named_rewritten(tmp_path, key, capsys) -> None:
    """A record slipped in at seq 5 (the rest renumbered and re-hashed) is detected."""
    _, keyfile, pub = key
    db = tmp_path / "a.db"
    fill(db, 20)
    cp = _checkpoint(db, keyfile, tmp_path / "cp")
    insert_record(db, 5, entry(999, user="mallory"))
    assert main(["audit", "verify", "--url", _url(db)]) == 0
    capsys.readouterr()
    assert _verify(db, pub, cp) == 1
    assert "rewritten" in capsys.readouterr().out


def test_two_readers_shown_different_logs_are_named_forked(tmp_path, key, capsys) -> None:
    """Two copies diverging after record 10, each checkpointed with the log key: the two
    checkpoints together prove a fork, whichever copy is verified."""
    _, keyfile, pub = key
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    fill(a, 10)
    shutil.copy(a, b)
    fill(a, 5, start=11, user="alice")
    fill(b, 5, start=11, user="bob")
    cp_a = _checkpoint(a, keyfile, tmp_path / "cp_a")
    cp_b = _checkpoint(b, keyfile, tmp_path / "cp_b")
    capsys.readouterr()
    for db in (a, b):
        assert _verify(db, pub, cp_a, cp_b) == 1
        assert "forked" in capsys.readouterr().out


def test_rewrite_then_a_new_checkpoint_is_named_forked(tmp_path, key, capsys) -> None:
    """A log rewritten and checkpointed again (the key signed both) is a fork: the new
    checkpoint matches, the old one no longer does."""
    signer, keyfile, pub = key
    db = tmp_path / "a.db"
    fill(db, 12)
    old = _checkpoint(db, keyfile, tmp_path / "old")
    rewrite_record(db, 3, user_id="mallory")
    drop_tree_cache(db)
    store = SQLiteStore(db)
    tree = LogTree(store)
    # The table of stored checkpoints still holds the old one: the signer refuses.
    with pytest.raises(TreeError, match="rewritten"):
        make_checkpoint(tree, signer)
    tree.close()
    store.close()
    # An owner who also holds the key and clears the table can sign; the fork is then named.
    import sqlite3

    with sqlite3.connect(str(db) + ".tree") as conn:
        conn.execute("DELETE FROM audit_checkpoints")
    new = _checkpoint(db, keyfile, tmp_path / "new")
    capsys.readouterr()
    assert _verify(db, pub, old, new) == 1
    assert "forked" in capsys.readouterr().out


def test_checkpoint_by_another_key_or_origin_is_refused(tmp_path, key, capsys) -> None:
    """verify refuses (exit 2) a checkpoint that the given key did not sign."""
    _, keyfile, _ = key
    db = tmp_path / "a.db"
    fill(db, 4)
    cp = _checkpoint(db, keyfile, tmp_path / "cp")
    other = tmp_path / "other.key"
    assert main(["audit", "keygen", "--name", "other.example/log", "--out", str(other)]) == 0
    assert _verify(db, Path(str(other) + ".pub"), cp) == 2
    same_name = tmp_path / "same.key"
    assert main(["audit", "keygen", "--name", ORIGIN, "--out", str(same_name)]) == 0
    capsys.readouterr()
    assert _verify(db, Path(str(same_name) + ".pub"), cp) == 2
    assert "no verifiable signature" in capsys.readouterr().err


def _prove(db: Path, seq: int, out: Path, *extra: str) -> int:
    return main(["audit", "prove", str(seq), "--url", _url(db), "--out", str(out), *extra])


def test_prove_writes_a_tlog_proof_that_verifies_offline(tmp_path, key) -> None:
    """`prove SEQ` writes a c2sp.org/tlog-proof@v1 that verifies with only the record bytes
    and the verifier key."""
    signer, keyfile, pub = key
    db = tmp_path / "a.db"
    fill(db, 33)
    _checkpoint(db, keyfile, tmp_path / "cp")
    out = tmp_path / "p.tlog-proof"
    assert _prove(db, 17, out, "--key", str(pub)) == 0
    data = out.read_bytes()
    assert data.startswith(b"c2sp.org/tlog-proof@v1\nindex 16\n")
    body = next(SQLiteStore(db).iter_from(17)).body
    cp, _ = verify_record_proof(body, data, signer.verifier, seq=17)
    assert cp.size == 33


def test_every_mutation_of_a_tlog_proof_is_rejected(tmp_path, key) -> None:
    """Every bit flip, index +-1, tree size x2 and /2, garbage before/after, another key."""
    signer, keyfile, _ = key
    db = tmp_path / "a.db"
    fill(db, 21)
    _checkpoint(db, keyfile, tmp_path / "cp")
    out = tmp_path / "p"
    assert _prove(db, 6, out) == 0
    data = out.read_bytes()
    body = next(SQLiteStore(db).iter_from(6)).body
    v = signer.verifier
    verify_record_proof(body, data, v, seq=6)

    def rejected(proof: bytes, record: bytes = body, verifier=v, seq: int | None = None) -> None:
        with pytest.raises(ProofError):
            verify_record_proof(record, proof, verifier, seq=seq)

    for i in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[i] ^= 1 << bit
            try:
                verify_record_proof(body, bytes(mutated), v)
            except (ProofError, CheckpointError, ValueError):
                continue
            raise AssertionError(f"bit {bit} of byte {i} flipped and the proof still verified")
    parsed = parse_proof(data)
    for index in (parsed.index - 1, parsed.index + 1):
        rejected(encode_proof(index, parsed.hashes, parsed.checkpoint))
    rejected(data, seq=7)
    cp, note = open_checkpoint(parsed.checkpoint, v)
    for size in (cp.size * 2, cp.size // 2):
        text = note.text.replace(f"\n{cp.size}\n", f"\n{size}\n", 1)
        resigned = sign_note(text, [signer])  # even correctly signed, the tree is wrong
        rejected(encode_proof(parsed.index, parsed.hashes, resigned))
    rejected(b"garbage\n" + data)
    rejected(data + b"garbage\n")
    rejected(data + b"\n")
    rejected(data, record=body + b" ")
    rejected(data, verifier=generate_signer(ORIGIN).verifier)
    rejected(data, verifier=generate_signer("other.example/log").verifier)


class LyingStore:
    """A store that serves a rewritten record 5 (and the tree over it) but cannot sign."""

    def __init__(self, real: SQLiteStore) -> None:
        self.real = real

    def iter_from(self, seq: int = 1):  # type: ignore[no-untyped-def]
        from dataclasses import replace

        for r in self.real.iter_from(seq):
            yield replace(r, body=r.body.replace(b'"alice"', b'"mallory"')) if r.seq == 5 else r

    def head(self):  # type: ignore[no-untyped-def]
        return self.real.head()


def test_a_store_proving_a_tree_it_does_not_hold_is_rejected(tmp_path, key) -> None:
    """GHSA-672p-m5jq-mrh8: a server that proves inclusion in its own (unsigned) tree. The
    client only trusts roots from checkpoints verified with the log key, so the proof fails."""
    from coworker.audit import merkle
    from coworker.audit.tlog import MemoryTable

    signer, keyfile, _ = key
    db = tmp_path / "a.db"
    fill(db, 16)
    cp_path = _checkpoint(db, keyfile, tmp_path / "cp")
    note = cp_path.read_bytes()
    liar = LogTree(LyingStore(SQLiteStore(db)), MemoryTable())
    # The liar's own chain breaks at 5 (its body no longer hashes): it refuses to build a tree.
    with pytest.raises(TreeError):
        liar.sync()
    # So it builds one from the lying bodies directly and proves the forged record in it.
    bodies = [r.body for r in LyingStore(SQLiteStore(db)).iter_from(1)]
    leaves = [merkle.leaf_hash(b) for b in bodies]
    nodes = {}
    cr = merkle.CompactRange()
    for leaf in leaves:
        nodes.update(cr.append(leaf))
    proof = merkle.inclusion_proof(4, 16, lambda ks: {k: nodes[k] for k in ks})
    forged = encode_proof(4, proof, note)
    with pytest.raises(ProofError, match="does not lead to the root"):
        verify_record_proof(bodies[4], forged, signer.verifier, seq=5)
    # And its own checkpoint is unsigned by the log key.
    fake_note = sign_note(
        note.decode().split("\n\n")[0].rsplit("\n", 2)[0] + "\n16\n"
        + __import__("base64").b64encode(cr.root()).decode() + "\n",
        [generate_signer(ORIGIN)],
    )  # fmt: skip
    with pytest.raises(ProofError, match="checkpoint"):
        verify_record_proof(bodies[4], encode_proof(4, proof, fake_note), signer.verifier)


def test_consistency_proof_between_two_checkpoints(tmp_path, key, capsys) -> None:
    """`prove --consistency OLD NEW` prints an RFC 9162 proof that verifies; refuses when the
    log no longer holds OLD."""
    from coworker.audit.checkpoint import parse_checkpoint, parse_note
    from coworker.audit.merkle import verify_consistency

    _, keyfile, pub = key
    db = tmp_path / "a.db"
    fill(db, 10)
    old = _checkpoint(db, keyfile, tmp_path / "old")
    fill(db, 13, start=11)
    new = _checkpoint(db, keyfile, tmp_path / "new")
    capsys.readouterr()
    args = [
        "audit",
        "prove",
        "--url",
        _url(db),
        "--key",
        str(pub),
        "--consistency",
        str(old),
        str(new),
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    import base64

    o = parse_checkpoint(parse_note(old.read_bytes()).text)
    n = parse_checkpoint(parse_note(new.read_bytes()).text)
    verify_consistency(10, 23, o.root, n.root, [base64.b64decode(x) for x in lines[2:]])
    rewrite_record(db, 2, user_id="mallory")
    drop_tree_cache(db)
    assert main(args) == 1


def _wait_error(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in r.getMessage() for r in caplog.records):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("attack", ["truncate", "rewrite", "rewrite-and-drop-tree"])
def test_running_checkpointer_notices_the_owner_and_signs_nothing_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, attack: str
) -> None:
    """While the app runs, the owner cuts the tail, rewrites a record (recomputing the chain),
    or also replaces the tree file: the idle heartbeat logs it and no new checkpoint is
    signed over the changed log."""
    import logging

    from coworker.audit.checkpointer import Checkpointer

    signer = generate_signer(ORIGIN)
    db = tmp_path / "a.db"
    fill(db, 10)
    store = SQLiteStore(db)
    cpr = Checkpointer(store, signer, every_records=5, every_seconds=0.1, poll=0.05)
    assert cpr.wait_for(10)
    signed = cpr.last
    with caplog.at_level(logging.ERROR, logger="coworker.audit"):
        if attack == "truncate":
            delete_last(db, 2)
            expected = "truncated"
        else:
            rewrite_record(db, 4, user_id="mallory")
            if attack == "rewrite-and-drop-tree":
                import sqlite3

                with sqlite3.connect(str(db) + ".tree") as conn:  # roll the tree back to 0
                    conn.execute("DELETE FROM audit_tree_state")
                expected = "replaced or rolled back"
            else:
                expected = "rewritten"
        assert _wait_error(caplog, expected)
    cpr.close(final=True)
    assert cpr.last == signed
    store.close()
