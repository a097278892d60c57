"""Several independent chains in one store (``?chain=NAME``), SQLite and PostgreSQL: each with
its own seq, head and lock, bound to its name through its genesis, verified one by one."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.chain import GENESIS_PREV_HASH, genesis, link
from coworker.audit.query import query
from coworker.audit.store_sqlite import SQLiteStore, chain_file
from coworker.audit.tlog import LogTree
from coworker.audit.urls import open_store, with_chain
from coworker.audit.verify import BAD_GENESIS, verify_chain
from coworker.cli import main
from coworker.exceptions import ConfigError
from tests.audit.conftest import fill, make_entries


def entry(i: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "create", "i": i, **extra}


def test_genesis_binds_the_chain_name() -> None:
    """The default chain keeps 32 zero bytes; a named chain starts from SHA-256 of its name."""
    assert genesis("") == GENESIS_PREV_HASH == bytes(32)
    assert genesis("tenant-a") != genesis("tenant-b") != GENESIS_PREV_HASH
    for bad in ("", " a", "a/b", "x" * 49, "é", "-lead"):
        if bad:
            with pytest.raises(ValueError):
                genesis(bad)


def test_sqlite_chains_are_independent(tmp_path: Path) -> None:
    """Each chain counts from 1 in a file of its own; the default chain's bytes are unchanged."""
    base = tmp_path / "audit.db"
    default = open_store(f"sqlite:///{base}")
    (d1,) = default.append([entry(1)])
    a = open_store(f"sqlite:///{base}?chain=a")  # registered in the default chain (seq 2)
    b = open_store(f"sqlite:///{base}?chain=b")
    a1, a2 = a.append([entry(1), entry(2)])
    (b1,) = b.append([entry(1)])
    assert d1.prev_hash == GENESIS_PREV_HASH and d1.hash == link(GENESIS_PREV_HASH, d1.body)
    assert a1.prev_hash == genesis("a") and b1.prev_hash == genesis("b")
    assert (d1.seq, a2.seq, b1.seq) == (1, 2, 1)
    assert d1.body == a1.body == b1.body  # same bytes; the genesis tells the chains apart
    assert default.chains() == ["", "a", "b"]  # type: ignore[attr-defined]
    assert Path(chain_file(str(base), "a")).exists()
    for s in (default, a, b):
        assert verify_chain(s).ok
        s.close()


def test_a_chain_copied_under_another_name_is_detected(tmp_path: Path) -> None:
    """Chain a's file put in place of chain b: b's verify reports bad-genesis naming b."""
    base = tmp_path / "audit.db"
    for name in ("a", "b"):
        s = SQLiteStore(base, chain=name)
        fill(s, 3)
        s.close()
    shutil.copy(chain_file(str(base), "a"), chain_file(str(base), "b"))
    report = verify_chain(SQLiteStore(base, chain="b", readonly=True))
    assert not report.ok and report.kind == BAD_GENESIS and "'b'" in report.detail


def test_cli_verify_checks_every_chain_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify checks the default chain and every named one, naming the chain in a finding;
    --chain checks one."""
    base = tmp_path / "audit.db"
    url = f"sqlite:///{base}"
    for name in ("", "good", "bad"):
        s = SQLiteStore(base, chain=name)
        fill(s, 2)
        s.close()
    shutil.copy(chain_file(str(base), "good"), chain_file(str(base), "bad"))
    assert main(["audit", "verify", "--url", url]) == 1
    out = capsys.readouterr().out
    assert "OK  2 records intact" in out and "chain  good" in out
    assert "FAIL  chain bad seq 1: bad-genesis" in out
    assert main(["audit", "verify", "--url", url, "--chain", "good"]) == 0
    assert main(["audit", "verify", "--url", url, "--chain", "bad", "--json"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["chain"] == "bad"


def test_query_and_tree_work_on_a_named_chain(tmp_path: Path) -> None:
    """search (query/fold/usage read through it) and the Merkle tree take a chain's store."""
    base = tmp_path / "audit.db"
    s = SQLiteStore(base, chain="billing")
    for fields, payload in make_entries(3):
        s.append([fields], [payload])
    assert len(list(query(s, kind="outcome"))) == 3
    assert LogTree(s).sync() == 3
    s.close()


def test_bad_chain_names_are_config_errors(tmp_path: Path) -> None:
    """A chain name that could escape its file or schema is refused before anything opens."""
    with pytest.raises(ConfigError):
        open_store(f"sqlite:///{tmp_path / 'a.db'}?chain=../x")
    with pytest.raises(ConfigError):
        with_chain("sqlite:///a.db", "a b")


@pytest.mark.parametrize("query", ["chain=", "chain=a&chain=b", "chain=a&chain=a"])
def test_a_url_with_an_empty_or_repeated_chain_is_a_config_error(
    tmp_path: Path, query: str
) -> None:
    """``?chain=`` (a template whose variable was empty) and ``chain`` given twice are refused:
    neither silently opens the default chain or the last name, and no file is made."""
    path = tmp_path / "a.db"
    with pytest.raises(ConfigError, match="chain"):
        open_store(f"sqlite:///{path}?{query}")
    assert not path.exists() and not (tmp_path / "a.db.chains").exists()
    from coworker.audit.store_postgres._wire import url_chain

    with pytest.raises(ConfigError, match="chain"):
        url_chain(f"postgresql://u@127.0.0.1/db?{query}")


def test_cli_verify_with_a_heads_note_names_a_chain_that_vanished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A named chain whose file was deleted whole leaves the per-chain checks nothing to find;
    ``verify --heads NOTE --key PUB`` names it (and a chain cut below its listed tree), exit 1."""
    from coworker.audit import merkle
    from coworker.audit.checkpoint import heads_note
    from coworker.audit.keys import generate_signer

    path = tmp_path / "a.db"
    url = f"sqlite:///{path}"
    heads: dict[str, tuple[int, bytes]] = {}
    for name in ("", "billing", "eu"):
        s = open_store(with_chain(url, name))
        s.append([entry(i) for i in range(5)])
        cr = merkle.CompactRange()
        for r in s.iter_from():
            cr.append(merkle.leaf_hash(r.body))
        heads[name] = (cr.size, cr.root())
        s.close()
    signer = generate_signer("audit.example.com/prod")
    note = tmp_path / "heads.note"
    note.write_bytes(heads_note(signer, heads))
    args = ["audit", "verify", "--url", url, "--heads", str(note), "--key", signer.verifier.text]
    assert main(args) == 0, capsys.readouterr().out
    assert "heads note: chain billing (tree 5): ok" in capsys.readouterr().out
    billing = Path(chain_file(str(path), "billing"))
    for leftover in billing.parent.glob("billing.db*"):
        leftover.unlink()
    # Without the note too: the chain registry (in the default chain) names it.
    assert main(["audit", "verify", "--url", url]) == 1
    assert "FAIL  chain billing: vanished" in capsys.readouterr().out
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL  heads note: chain billing (tree 5): vanished" in out
    assert "heads note: chain eu (tree 5): ok" in out


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_chains_have_their_own_schema_lock_and_head(pg: Any) -> None:
    """Four chains written by four threads each at once: every chain gapless from 1 and
    linked from its own genesis; chains() lists them; verify passes chain by chain."""
    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    names = ["", "t1", "t2", "t3"]
    stores = [PostgresStore(with_chain(url, n), spool=None) for n in names for _ in range(2)]

    def work(s: PostgresStore) -> None:
        for i in range(40):
            s.append([entry(i)])

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[0].chains() == names
    for n, s in zip(names, stores[::2], strict=True):
        assert s.schema == (s.base_schema if not n else f"{s.base_schema}:{n}")
        records = list(s.iter_from())
        # The default chain also holds the registry records of t1, t2, t3 (chain_registry).
        extra = 0 if n else 3
        assert [r.seq for r in records] == list(range(1, 81 + extra))
        assert records[0].prev_hash == genesis(n)
        report = verify_chain(s)
        assert report.ok and report.checked == 80 + extra and not report.problems, report
    for s in stores:
        s.close()


@pytest.mark.postgres
def test_postgres_database_refuses_a_record_from_another_chain(pg: Any) -> None:
    """A writer role's raw INSERT of chain a's first record into chain b is refused by b's own
    chain check (its genesis is b's), and verify of b stays clean. (The owner's own inserts
    skip the check since schema 5: append() computes the chain itself; the owner could drop
    the trigger anyway.)"""
    import psycopg

    from coworker.audit.store_postgres import PostgresStore, writer_grants
    from tests.pg import with_user

    url = pg.schema_url()
    a = PostgresStore(with_chain(url, "a"), spool=None)
    b = PostgresStore(with_chain(url, "b"), spool=None)
    (rec,) = a.append([entry(1)])
    writer = pg.create_role("chain_writer")
    for grant in writer_grants(writer, b.schema):
        pg.execute(grant)
    with psycopg.connect(with_user(pg.url, writer), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation):
            conn.execute(
                f'INSERT INTO "{b.schema}".records (seq, prev_hash, hash, body) '
                "VALUES (%s, %s, %s, %s)",
                (rec.seq, rec.prev_hash, rec.hash, rec.body),
            )
    assert verify_chain(b).ok
    a.close()
    b.close()


@pytest.mark.postgres
def test_postgres_cli_verify_walks_every_chain(pg: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`coworker audit verify URL` on PostgreSQL verifies the default and each named chain."""
    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    for n in ("", "x", "y"):
        s = PostgresStore(with_chain(url, n), spool=None)
        s.append([entry(1), entry(2)])
        s.close()
    assert main(["audit", "verify", "--url", url]) == 0
    out = capsys.readouterr().out
    assert out.count("OK  2 records intact") == 2 and "chain  x" in out and "chain  y" in out
    assert "OK  4 records intact" in out  # the default chain: 2 + the registry records of x, y
    assert "OK  chain registry: 2 named chain(s) registered, all present" in out


# -- checkpoints over chains ------------------------------------------------------------------


def test_chain_checkpoints_use_their_own_origin_and_derived_key(tmp_path: Path) -> None:
    """A chain's tree is signed under <origin>/chain/<name> with the store's key; the auditor
    derives the verifier from the store's verifier key; the default chain keeps <origin>."""
    from coworker.audit.checkpoint import (
        Checkpoint,
        CheckpointError,
        chain_origin,
        chain_signer,
        chain_verifier,
        open_checkpoint,
        sign_checkpoint,
    )
    from coworker.audit.keys import generate_signer

    signer = generate_signer("audit.example.com/prod")
    assert chain_origin(signer.name, "") == signer.name
    s = SQLiteStore(tmp_path / "audit.db", chain="billing")
    fill(s, 5)
    tree = LogTree(s)
    size = tree.sync()
    cp = Checkpoint(chain_origin(signer.name, "billing"), size, tree.root(size))
    note = sign_checkpoint(cp, chain_signer(signer, "billing"))
    opened, _ = open_checkpoint(note, chain_verifier(signer.verifier, "billing"))
    assert opened.origin == "audit.example.com/prod/chain/billing" and opened.size == 5
    with pytest.raises(CheckpointError):  # not valid as the default chain's checkpoint
        open_checkpoint(note, signer.verifier)
    s.close()


def test_heads_note_lists_every_chain_and_any_change_is_refused() -> None:
    """One signed note lists every chain's tree; a changed size or root, another signer or a
    duplicated chain line is refused."""
    from coworker.audit.checkpoint import CheckpointError, heads_note, open_heads
    from coworker.audit.keys import generate_signer

    signer = generate_signer("audit.example.com/prod")
    heads = {"": (120, b"\x01" * 32), "billing": (7, b"\x02" * 32), "eu": (0, b"\x03" * 32)}
    note = heads_note(signer, heads)
    assert note.decode().splitlines()[:3] == [
        "audit.example.com/prod",
        "coworker-audit-heads/v1",
        "- 120 AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
    ]
    assert open_heads(note, signer.verifier) == heads
    with pytest.raises(CheckpointError):
        open_heads(note.replace(b"billing 7 ", b"billing 6 "), signer.verifier)
    with pytest.raises(CheckpointError):
        open_heads(note, generate_signer("audit.example.com/prod").verifier)
    with pytest.raises(CheckpointError):
        open_heads(heads_note(generate_signer("other"), heads), signer.verifier)


@pytest.mark.postgres
def test_postgres_chain_schema_names_longer_than_63_bytes_are_refused(pg: Any) -> None:
    """PostgreSQL cuts identifiers at 63 *bytes*: a schema of 45 characters but 65 bytes (a
    non-ASCII store schema) is refused, never truncated onto another chain's schema."""
    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url("t_" + "\u00e9" * 26)  # 28 characters, 54 bytes
    assert with_chain(url, "abcdefghi1")  # 45 characters, 65 bytes with the ':'
    for name in ("abcdefghi1", "abcdefghi2"):
        with pytest.raises(ConfigError, match="63 bytes"):
            PostgresStore(with_chain(url, name), spool=None)
