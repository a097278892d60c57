"""The chain registry: every named chain is registered in the default chain before its first
record, so that a chain deleted whole (file, schema, version table) is named ``vanished`` by
a plain ``coworker audit verify``; names equal up to case are refused (real SQLite files, the
real PostgreSQL server, real processes)."""

from __future__ import annotations

import multiprocessing
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.chain import genesis
from coworker.audit.chain_registry import (
    CATEGORY_CHAIN_REGISTRY,
    KIND_CHAIN,
    registrations,
)
from coworker.audit.store_sqlite import SQLiteStore, chain_file
from coworker.audit.urls import with_chain
from coworker.cli import main
from coworker.exceptions import AuditUnavailable, ConfigError


def entry(i: int) -> dict[str, Any]:
    return {"kind": "outcome", "category": "state-change", "operation": "create", "i": i}


def _registry_records(store: Any) -> list[Any]:
    return list(store.search({"kind": KIND_CHAIN, "category": CATEGORY_CHAIN_REGISTRY}))


def _delete(path: Path, name: str) -> None:
    target = Path(chain_file(str(path), name))
    for leftover in target.parent.glob(f"{name}.db*"):
        leftover.unlink()


def _make_chains(path: Path, sizes: dict[str, int]) -> None:
    for name, n in sizes.items():
        s = SQLiteStore(path, chain=name)
        if n:
            s.append([entry(i) for i in range(n)])
        s.close()


# -- SQLite ------------------------------------------------------------------------------------
def test_a_deleted_chain_file_is_named_vanished_by_verify_without_a_heads_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chain's files deleted whole: verify (no --heads) says vanished, exit 1; the other
    chains still verify."""
    path = tmp_path / "a.db"
    _make_chains(path, {"": 2, "billing": 3, "eu": 1})
    url = f"sqlite:///{path}"
    assert main(["audit", "verify", "--url", url]) == 0
    assert "OK  chain registry: 2 named chain(s) registered, all present" in capsys.readouterr().out
    _delete(path, "billing")
    assert main(["audit", "verify", "--url", url]) == 1
    out = capsys.readouterr().out
    assert "FAIL  chain billing: vanished" in out and "chain  eu" in out
    assert main(["audit", "verify", "--url", url, "--chain", "billing"]) == 1
    assert "FAIL  chain billing: vanished" in capsys.readouterr().out
    assert main(["audit", "verify", "--url", url, "--json"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if '"registry"' in x)
    assert '"status": "vanished"' in line


def test_a_renamed_chain_file_is_named_vanished_and_unregistered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """billing.db renamed to other.db: billing vanished, other unregistered (and its genesis
    is billing's): exit 1."""
    path = tmp_path / "a.db"
    _make_chains(path, {"": 1, "billing": 3})
    billing = Path(chain_file(str(path), "billing"))
    billing.rename(billing.with_name("other.db"))
    assert main(["audit", "verify", "--url", f"sqlite:///{path}"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  chain billing: vanished" in out
    assert "FAIL  chain other: unregistered" in out


def test_a_writer_does_not_start_a_vanished_chain_again_empty(tmp_path: Path) -> None:
    """A registered chain whose file is gone is refused by a writer's open: it would verify
    as a new, intact, empty chain."""
    path = tmp_path / "a.db"
    _make_chains(path, {"billing": 3})
    _delete(path, "billing")
    with pytest.raises(AuditUnavailable, match="vanished"):
        SQLiteStore(path, chain="billing")
    assert not Path(chain_file(str(path), "billing")).exists()


def test_the_registry_record_comes_first_and_a_chain_without_records_is_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Opening a new chain registers it (kind chain, its name and genesis) in the default
    chain before anything is written to it; a crash before its first record leaves an empty,
    registered chain that verify reports as empty, not vanished."""
    path = tmp_path / "a.db"
    s = SQLiteStore(path, chain="x")  # the open registered it; no record yet ("crash" here)
    default = SQLiteStore(path, readonly=True)
    (record,) = _registry_records(default)
    assert record.seq == 1
    fields = __import__("json").loads(record.body)
    assert fields["chain_name"] == "x" and fields["chain_genesis"] == genesis("x").hex()
    assert fields["operation"] == "create" and s.head() is None
    s.close()
    assert main(["audit", "verify", "--url", f"sqlite:///{path}"]) == 0
    out = capsys.readouterr().out
    assert "OK  empty log" in out and "vanished" not in out
    assert registrations(default)["x"].seq == 1
    default.close()


def test_an_unregistered_chain_is_reported_and_adopt_chains_anchors_it_at_its_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chain made before the registry (its file placed by hand here): verify says
    unregistered (exit 1); adopt-chains registers it with its head; a later cut below that
    head is named truncated."""
    path, old = tmp_path / "a.db", tmp_path / "old.db"
    _make_chains(path, {"": 1})
    _make_chains(old, {"legacy": 2})
    shorter = tmp_path / "legacy-2.db"
    shutil.copy(chain_file(str(old), "legacy"), shorter)
    s = SQLiteStore(old, chain="legacy")
    s.append([entry(3)])
    s.close()
    Path(chain_file(str(path), "legacy")).parent.mkdir(exist_ok=True)
    shutil.copy(chain_file(str(old), "legacy"), chain_file(str(path), "legacy"))
    url = f"sqlite:///{path}"
    assert main(["audit", "verify", "--url", url]) == 1
    assert "FAIL  chain legacy: unregistered" in capsys.readouterr().out
    assert main(["audit", "adopt-chains", "--url", url]) == 0
    assert "adopted  chain legacy (head 3)" in capsys.readouterr().out
    assert main(["audit", "verify", "--url", url]) == 0
    capsys.readouterr()
    assert main(["audit", "adopt-chains", "--url", url]) == 0  # idempotent
    assert "every named chain is registered" in capsys.readouterr().out
    shutil.copy(shorter, chain_file(str(path), "legacy"))  # cut to 2 records, still linked
    assert main(["audit", "verify", "--url", url]) == 1
    assert "FAIL  chain legacy: truncated" in capsys.readouterr().out


def test_an_empty_unregistered_chain_passes_and_its_next_writer_registers_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash after the chain's empty file was made and before its registry record: verify
    notes it (exit 0: nothing was written to it); the next writer's open registers it."""
    path, other = tmp_path / "a.db", tmp_path / "b.db"
    _make_chains(path, {"": 1})
    _make_chains(other, {"x": 0})
    Path(chain_file(str(path), "x")).parent.mkdir(exist_ok=True)
    shutil.copy(chain_file(str(other), "x"), chain_file(str(path), "x"))
    url = f"sqlite:///{path}"
    assert main(["audit", "verify", "--url", url]) == 0
    assert "OK    chain x: unregistered-empty" in capsys.readouterr().out
    SQLiteStore(path, chain="x").close()
    default = SQLiteStore(path, readonly=True)
    assert registrations(default)["x"].operation == "create"
    default.close()


def _create_in_process(path: str, go: Any, name: str) -> None:
    go.wait(30)
    s = SQLiteStore(path, chain=name)
    s.append([entry(1)])
    s.close()


def test_processes_creating_one_chain_at_once_register_it_once(tmp_path: Path) -> None:
    """Four processes open the same new chain at the same moment: one registry record, every
    record in the one chain, verify clean."""
    path = tmp_path / "a.db"
    _make_chains(path, {"": 1})
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_create_in_process, args=(str(path), go, "x")) for _ in range(4)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    default = SQLiteStore(path, readonly=True)
    assert [r.seq for r in _registry_records(default)] == [2]
    default.close()
    x = SQLiteStore(path, chain="x", readonly=True)
    assert x.count() == 4
    x.close()
    assert main(["audit", "verify", "--url", f"sqlite:///{path}"]) == 0


def test_chain_names_equal_up_to_case_are_refused(tmp_path: Path) -> None:
    """Billing exists: billing is refused before any file is made (on a case-insensitive file
    system both would be one file), also when the two are created at the same moment."""
    path = tmp_path / "a.db"
    _make_chains(path, {"Billing": 1})
    with pytest.raises(ConfigError, match="only by case"):
        SQLiteStore(path, chain="billing")
    assert sorted(p.name for p in Path(chain_file(str(path), "x")).parent.glob("*.db")) == [
        "Billing.db"
    ]
    race = tmp_path / "race.db"
    barrier = threading.Barrier(2)
    results: dict[str, str] = {}

    def create(name: str) -> None:
        barrier.wait()
        try:
            SQLiteStore(race, chain=name).close()
            results[name] = "ok"
        except ConfigError:
            results[name] = "refused"

    threads = [threading.Thread(target=create, args=(n,)) for n in ("Eu", "eu")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["ok", "refused"]
    default = SQLiteStore(race, readonly=True)
    assert list(registrations(default)) == [n for n, r in results.items() if r == "ok"]
    default.close()


# -- PostgreSQL --------------------------------------------------------------------------------


def _pg_chains(url: str, sizes: dict[str, int]) -> None:
    from coworker.audit.store_postgres import PostgresStore

    for name, n in sizes.items():
        s = PostgresStore(with_chain(url, name), spool=None)
        if n:
            s.append([entry(i) for i in range(n)])
        s.close()


@pytest.mark.postgres
@pytest.mark.parametrize(
    "how",
    ['DROP SCHEMA "{s}" CASCADE', 'DROP TABLE "{s}".schema_version CASCADE'],
    ids=["schema", "version-table"],
)
def test_postgres_a_dropped_chain_is_named_vanished(
    pg: Any, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chain's schema (or its version table, by which chains are listed) dropped: verify
    says vanished, exit 1, and a writer does not start it again."""
    import psycopg

    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    _pg_chains(url, {"": 1, "billing": 3})
    assert main(["audit", "verify", "--url", url]) == 0
    capsys.readouterr()
    s = PostgresStore(with_chain(url, "billing"), spool=None)
    schema = s.schema
    s.close()
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(how.format(s=schema))
    assert main(["audit", "verify", "--url", url]) == 1
    assert "FAIL  chain billing: vanished" in capsys.readouterr().out
    with pytest.raises(AuditUnavailable, match="vanished"):
        PostgresStore(with_chain(url, "billing"), spool=None)


@pytest.mark.postgres
def test_postgres_racing_creators_register_a_chain_once_and_refuse_a_case_twin(pg: Any) -> None:
    """Six threads open the new chain x at once: one registry record. Opening X afterwards
    is refused: a name equal up to case."""
    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    _pg_chains(url, {"": 1})
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            s = PostgresStore(with_chain(url, "x"), spool=None)
            s.append([entry(1)])
            s.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    default = PostgresStore(url, spool=None, readonly=True)
    assert len(_registry_records(default)) == 1
    assert list(registrations(default)) == ["x"]
    default.close()
    with pytest.raises(ConfigError, match="only by case"):
        PostgresStore(with_chain(url, "X"), spool=None)
    assert main(["audit", "verify", "--url", url]) == 0


@pytest.mark.postgres
def test_postgres_an_unregistered_chain_is_adopted_by_its_next_writer(
    pg: Any, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Chain schemas with records the registry does not name (a store made before it; here
    the default schema is made again without their registry records): verify says
    unregistered; a writer's open adopts one at its head, adopt-chains the other."""
    import psycopg

    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    _pg_chains(url, {"": 1, "old": 2, "old2": 2})
    s = PostgresStore(with_chain(url, "old"), spool=None)
    base = s.base_schema
    s.close()
    # Forget the registration: a fresh default schema without it (the registry's record
    # cannot be deleted: the log is append-only).
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{base}" CASCADE')
    _pg_chains(url, {"": 1})
    assert main(["audit", "verify", "--url", url]) == 1
    assert "FAIL  chain old: unregistered" in capsys.readouterr().out
    with caplog.at_level("WARNING", logger="coworker.audit"):
        PostgresStore(with_chain(url, "old"), spool=None).close()
    assert any("adopted at head 2" in r.getMessage() for r in caplog.records)
    assert main(["audit", "verify", "--url", url]) == 1  # old2 still unregistered
    assert "FAIL  chain old2: unregistered" in capsys.readouterr().out
    assert main(["audit", "adopt-chains", "--url", url]) == 0
    assert "adopted  chain old2 (head 2)" in capsys.readouterr().out
    assert main(["audit", "verify", "--url", url]) == 0


def test_an_open_that_may_not_create_never_registers_a_chain(tmp_path: Path) -> None:
    """create=False (the checkpointer reading a chain's tree, `correct`) opens an
    unregistered chain as it is: adopting what is there is for a writer or adopt-chains."""
    path, old = tmp_path / "a.db", tmp_path / "old.db"
    _make_chains(path, {"": 1})
    _make_chains(old, {"legacy": 2})
    Path(chain_file(str(path), "legacy")).parent.mkdir(exist_ok=True)
    shutil.copy(chain_file(str(old), "legacy"), chain_file(str(path), "legacy"))
    SQLiteStore(path, chain="legacy", create=False).close()
    default = SQLiteStore(path, readonly=True)
    assert registrations(default) == {}
    default.close()


def test_a_forked_child_does_not_make_a_deleted_chain_again(tmp_path: Path) -> None:
    """The chain's file deleted under an open store: a forked child (which reconnects) gets
    AuditUnavailable instead of starting a new, empty, intact-looking chain in its place."""
    import os

    path = tmp_path / "a.db"
    _make_chains(path, {"x": 0})
    s = SQLiteStore(path, chain="x")  # registered already: the open takes the short path
    s.append([entry(1)])
    _delete(path, "x")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            s.append([entry(2)])
            code = 1
        except AuditUnavailable:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not Path(chain_file(str(path), "x")).exists()
    s.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_retired_chain_may_be_removed_and_is_never_written_again(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    """retire-chain records the chain's last head: removed afterwards, verify says retired
    (exit 0) and heads notes may leave it out (even after a stored note listed it, with the
    records it was retired holding); no writer opens it again; retiring twice is refused."""
    from coworker.audit.keys import generate_signer, write_signer

    if backend == "sqlite":
        path = tmp_path / "a.db"
        url = f"sqlite:///{path}"
        _make_chains(path, {"": 1, "billing": 2, "eu": 1})
    else:
        pg = request.getfixturevalue("pg")
        url = pg.schema_url()
        _pg_chains(url, {"": 1, "billing": 2, "eu": 1})
    keyfile = tmp_path / "log.key"
    write_signer(keyfile, generate_signer("audit.example.com/retire"))
    assert main(["audit", "heads", "--url", url, "--key", str(keyfile)]) == 0  # lists billing
    assert "\nbilling 2 " in capsys.readouterr().out
    assert main(["audit", "retire-chain", "billing", "--reason", "tenant left", "--url", url]) == 0
    assert "retired  chain billing: sealed at seq 3" in capsys.readouterr().out
    assert main(["audit", "retire-chain", "billing", "--reason", "again", "--url", url]) == 2
    assert "retired already" in capsys.readouterr().err
    if backend == "sqlite":
        _delete(path, "billing")
        with pytest.raises(AuditUnavailable, match="retired"):
            SQLiteStore(path, chain="billing")
    else:
        import psycopg

        from coworker.audit.store_postgres import PostgresStore

        s = PostgresStore(with_chain(url, "billing"), spool=None, readonly=True)
        schema = s.schema
        s.close()
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        with pytest.raises(AuditUnavailable, match="retired"):
            PostgresStore(with_chain(url, "billing"), spool=None)
    assert main(["audit", "verify", "--url", url]) == 0
    assert "OK    chain billing: retired" in capsys.readouterr().out
    # The stored note listed billing with all 2 records, which it was retired holding.
    assert main(["audit", "heads", "--url", url, "--key", str(keyfile)]) == 0
    note = capsys.readouterr().out
    assert "\neu 1 " in note and "billing" not in note


def test_a_chain_cut_below_its_adopted_head_then_retired_is_still_named_truncated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Adopted at head 3, cut to 2 records, then retired (at head 2) and removed: verify still
    fails (truncated); retiring must not launder a cut made before it."""
    path, old = tmp_path / "a.db", tmp_path / "old.db"
    _make_chains(path, {"": 1})
    _make_chains(old, {"legacy": 2})
    shorter = tmp_path / "legacy-2.db"
    shutil.copy(chain_file(str(old), "legacy"), shorter)
    s = SQLiteStore(old, chain="legacy")
    s.append([entry(3)])
    s.close()
    Path(chain_file(str(path), "legacy")).parent.mkdir(exist_ok=True)
    shutil.copy(chain_file(str(old), "legacy"), chain_file(str(path), "legacy"))
    url = f"sqlite:///{path}"
    assert main(["audit", "adopt-chains", "--url", url]) == 0
    shutil.copy(shorter, chain_file(str(path), "legacy"))  # cut to 2 records, still linked
    assert main(["audit", "retire-chain", "legacy", "--reason", "gone", "--url", url]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", "--url", url]) == 1
    assert "FAIL  chain legacy: truncated" in capsys.readouterr().out
    _delete(path, "legacy")
    assert main(["audit", "verify", "--url", url]) == 1
    assert "FAIL  chain legacy: truncated" in capsys.readouterr().out


def test_records_inserted_after_a_chain_was_retired_fail_verify_while_it_is_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer that had the chain open when it was retired is refused (the seal); a row the
    file's owner inserts by hand after the seal, chained correctly, makes verify fail
    (written-after-retire) instead of saying retired, may be removed."""
    import sqlite3

    from coworker.audit.chain import link
    from coworker.audit.record import canonical

    path = tmp_path / "a.db"
    _make_chains(path, {"": 1})
    writer = SQLiteStore(path, chain="billing")
    writer.append([entry(1), entry(2)])
    url = f"sqlite:///{path}"
    assert main(["audit", "retire-chain", "billing", "--reason", "tenant left", "--url", url]) == 0
    with pytest.raises(AuditUnavailable, match="retired"):
        writer.append([entry(3)])  # the long-lived writer never re-reads the registry
    head = writer.head()
    writer.close()
    assert head is not None and head.seq == 3  # 2 records and the seal
    body = canonical({**entry(4), "seq": 4})
    conn = sqlite3.connect(chain_file(str(path), "billing"))
    with conn:
        conn.execute(
            "INSERT INTO audit_records (seq, prev_hash, hash, body) VALUES (4, ?, ?, ?)",
            (head.hash, link(head.hash, body), body),
        )
    conn.close()
    capsys.readouterr()
    assert main(["audit", "verify", "--url", url]) == 1
    assert "FAIL  chain billing: written-after-retire" in capsys.readouterr().out
