"""The stored tree (SQLite and the real PostgreSQL server), export bundles verified offline,
and automatic checkpoints published to a directory."""

from __future__ import annotations

import json
import logging
import tarfile
import threading
from pathlib import Path

import pytest

from coworker.audit import merkle
from coworker.audit.bundle import read_bundle, verify_bundle
from coworker.audit.checkpoint import open_checkpoint
from coworker.audit.checkpointer import Checkpointer, DirectoryPublisher, make_checkpoint
from coworker.audit.keys import generate_signer, write_signer
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.tlog import STORED_LEVEL, LogTree
from coworker.cli import main
from tests.deps import require

from .proofs_helpers import entry, fill

ORIGIN = "audit.example.com/bundle"


def _reference(store: SQLiteStore) -> list[bytes]:
    return [merkle.leaf_hash(r.body) for r in store.iter_from(1)]


def test_stored_tree_matches_the_reference_at_every_size(tmp_path: Path) -> None:
    """Synced in uneven steps, the stored tree gives the reference root and proofs at every
    size, across the stored/re-hashed level boundary."""
    store = SQLiteStore(tmp_path / "a.db")
    tree = LogTree(store)
    for step in (1, 2, 13, 16, 17, 31, 50):
        store.append([entry(i) for i in range(step)])
        tree.sync()
    leaves = _reference(store)
    assert tree.size == len(leaves) == 130
    for size in (1, 15, 16, 17, 64, 129, 130):
        assert tree.root(size) == merkle.root_from_leaves(leaves[:size])
        for index in {0, size // 2, size - 1}:
            merkle.verify_inclusion(
                index, size, leaves[index], tree.inclusion(index, size), tree.root(size)
            )
        merkle.verify_consistency(
            max(size // 3, 1), size, tree.root(max(size // 3, 1)), tree.root(size),
            tree.consistency(max(size // 3, 1), size),
        )  # fmt: skip
    tree.close()
    # The stored rows are the subtrees of 2**STORED_LEVEL leaves and up only.
    import sqlite3

    with sqlite3.connect(tmp_path / "a.db.tree") as conn:
        levels = {r[0] for r in conn.execute("SELECT DISTINCT level FROM audit_tree_nodes")}
    assert min(levels) == STORED_LEVEL
    store.close()


def test_two_trees_syncing_one_file_concurrently_agree(tmp_path: Path) -> None:
    """Two LogTrees (as two processes) syncing the same file: one wins each step, the other
    retries; the result equals the reference."""
    path = tmp_path / "a.db"
    fill(path, 300)
    stores = [SQLiteStore(path), SQLiteStore(path)]
    trees = [LogTree(s) for s in stores]
    go = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(t: LogTree) -> None:
        go.wait()
        try:
            t.sync()  # the loser of a step starts again from the winner's state
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in trees]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert trees[0].size == trees[1].size == 300
    assert trees[0].root() == merkle.root_from_leaves(_reference(stores[0]))
    for t, s in zip(trees, stores, strict=True):
        t.close()
        s.close()


def _key(tmp_path: Path) -> tuple[Path, Path]:
    keyfile = tmp_path / "log.key"
    assert main(["audit", "keygen", "--name", ORIGIN, "--out", str(keyfile)]) == 0
    return keyfile, Path(str(keyfile) + ".pub")


@pytest.mark.parametrize("suffix", ["", ".tar"])
def test_export_bundle_verifies_offline_and_names_each_failure(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """export --user writes records + tlog-proofs + checkpoint; verify-bundle passes it with
    no database, and names a tampered record, a missing proof and another key."""
    keyfile, pub = _key(tmp_path)
    db = tmp_path / "a.db"
    fill(db, 30, user="alice")
    fill(db, 10, start=31, user="bob")
    url = f"sqlite:///{db}"
    assert main(["audit", "checkpoint", "--url", url, "--key", str(keyfile)]) == 0
    bundle = tmp_path / f"bundle{suffix}"
    assert (
        main(
            [
                "audit",
                "export",
                "--out",
                str(bundle),
                "--url",
                url,
                "--key",
                str(pub),
                "--user",
                "bob",
            ]
        )
        == 0
    )
    db.unlink()  # no database from here on
    capsys.readouterr()
    assert main(["audit", "verify-bundle", str(bundle), "--key", str(pub)]) == 0
    assert "OK  10 records" in capsys.readouterr().out
    files = read_bundle(bundle)
    manifest = json.loads(files["manifest.json"])
    assert [e["seq"] for e in manifest["records"]] == list(range(31, 41))
    from coworker.audit.keys import load_verifier

    v = load_verifier(pub)
    tampered = dict(files)
    name = manifest["records"][3]["record"]
    tampered[name] = files[name].replace(b'"bob"', b'"eve"')
    del tampered[manifest["records"][5]["proof"]]
    report = verify_bundle(tampered, v)
    assert not report.ok
    assert any("record 34" in f and "root" in f for f in report.failures)
    assert any("record 36" in f and "missing" in f for f in report.failures)
    assert not verify_bundle(files, generate_signer(ORIGIN).verifier).ok
    if suffix == ".tar":
        with tarfile.open(bundle, "a") as tar:
            info = tarfile.TarInfo("records/000000000099.json")
            info.size = 2
            import io

            tar.addfile(info, io.BytesIO(b"{}"))
        capsys.readouterr()
        assert main(["audit", "verify-bundle", str(bundle), "--key", str(pub)]) == 1
        assert "not listed in the manifest" in capsys.readouterr().out


def test_background_checkpointer_signs_publishes_and_never_blocks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every N records a checkpoint is signed and published; a failing publisher is logged
    and retried while appends go on; one more checkpoint at close."""
    signer = generate_signer(ORIGIN)
    store = SQLiteStore(tmp_path / "a.db")
    published = tmp_path / "worm"
    attempts: list[int] = []
    fail_until = threading.Event()

    def flaky(checkpoint, note) -> None:  # type: ignore[no-untyped-def]
        attempts.append(checkpoint.size)
        if not fail_until.is_set():
            raise OSError("bucket unreachable")

    cpr = Checkpointer(
        store, signer, every_records=50, every_seconds=None,
        publishers=[DirectoryPublisher(published), flaky], poll=0.05,
    )  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="coworker.audit"):
        for i in range(4):
            store.append([entry(j) for j in range(i * 50, i * 50 + 50)])
            assert cpr.wait_for((i + 1) * 50)
        assert any("bucket unreachable" in r.getMessage() for r in caplog.records)
    assert cpr.unpublished > 0
    fail_until.set()
    store.append([entry(999)])
    cpr.close()
    assert cpr.unpublished == 0
    folder = published / ORIGIN.replace("/", "_")
    latest, _ = open_checkpoint((folder / "latest.checkpoint").read_bytes(), signer.verifier)
    assert latest.size == 201
    assert (folder / "50.checkpoint").exists()
    assert 201 in attempts
    store.close()


def test_checkpoint_and_verify_on_the_real_postgresql_server(tmp_path: Path) -> None:
    """On PostgreSQL: tree and checkpoints live in the store's schema; verify --checkpoint
    passes, and names a cut tail after the owner deletes rows."""
    from tests import pg

    admin = pg.require_server()
    server = pg.PGServer(admin)
    try:
        url = server.schema_url(spool="off")
        from coworker.audit.urls import open_store

        store = open_store(url)
        store.append([entry(i) for i in range(40)])
        signer = generate_signer(ORIGIN)
        write_signer(tmp_path / "k", signer)
        tree = LogTree(store)
        _, note = make_checkpoint(tree, signer)
        assert tree.table.checkpoints(ORIGIN)[-1].note == note
        assert tree.inclusion(7, 40)
        tree.close()
        cp = tmp_path / "cp"
        cp.write_bytes(note)
        pub = str(tmp_path / "k.pub")
        assert main(["audit", "verify", "--url", url, "--key", pub, "--checkpoint", str(cp)]) == 0
        schema = store.schema
        store.close()
        server.execute(f'ALTER TABLE "{schema}".records DISABLE TRIGGER ALL')
        server.execute(f'DELETE FROM "{schema}".records WHERE seq > 35')
        assert main(["audit", "verify", "--url", url, "--key", pub, "--checkpoint", str(cp)]) == 1
    finally:
        server.close()


def test_configure_checkpoint_key_signs_during_and_at_shutdown(tmp_path: Path) -> None:
    """configure(checkpoint_key=..., checkpoint_every=3, checkpoint_publish=dir): real runs
    are checkpointed while they happen and once more at shutdown, covering every record."""
    import coworker

    signer = generate_signer(ORIGIN)
    write_signer(tmp_path / "k", signer)
    db = tmp_path / "a.db"
    worm = tmp_path / "worm"
    coworker.configure(
        audit=f"sqlite:///{db}",
        checkpoint_key=tmp_path / "k",
        checkpoint_every=3,
        checkpoint_publish=worm,
        metrics=False,
    )

    @coworker.run(operation="update", doctype="Invoice")
    def update(i: int) -> int:
        return i

    try:
        with coworker.acting_as("alice"):
            for i in range(7):
                update(i)
    finally:
        coworker.shutdown()
    folder = worm / ORIGIN.replace("/", "_")
    latest, _ = open_checkpoint((folder / "latest.checkpoint").read_bytes(), signer.verifier)
    assert latest.size == 7
    store = SQLiteStore(db, readonly=True)
    assert latest.root == merkle.root_from_leaves(_reference(store))
    store.close()


def test_configure_rejects_a_checkpoint_key_without_an_audit_store(tmp_path: Path) -> None:
    """checkpoint_key without audit= is a ConfigError; a bad key file fails at configure."""
    import coworker
    from coworker.exceptions import ConfigError

    with pytest.raises(ConfigError, match="needs an audit store"):
        coworker.configure(audit=False, checkpoint_key=tmp_path / "missing", metrics=False)
    with pytest.raises(ConfigError, match="cannot read key file"):
        coworker.configure(
            audit=f"sqlite:///{tmp_path / 'a.db'}", checkpoint_key=tmp_path / "missing",
            metrics=False,
        )  # fmt: skip
    coworker.shutdown()


def test_s3_publisher_writes_object_locked_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against moto's S3 server on loopback (an S3-compatible HTTP server; no MinIO here):
    each checkpoint lands under Object Lock COMPLIANCE and cannot be deleted."""
    boto3 = require("boto3", "the s3 extra")
    ClientError = require("botocore.exceptions", "the s3 extra").ClientError
    ThreadedMotoServer = require("moto.server", "moto[server], the dev extra").ThreadedMotoServer
    from coworker.audit.checkpointer import publisher_for

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="worm", ObjectLockEnabledForBucket=True)
        signer = generate_signer(ORIGIN)
        store = SQLiteStore(tmp_path / "a.db")
        publish = publisher_for(f"s3://worm/cp/?retain_days=30&endpoint={endpoint}")
        cpr = Checkpointer(
            store, signer, every_records=4, every_seconds=None, publishers=[publish], poll=0.05
        )
        store.append([entry(i) for i in range(4)])
        assert cpr.wait_for(4)
        cpr.close()
        key = f"cp/{ORIGIN}/4.checkpoint"
        obj = s3.get_object(Bucket="worm", Key=key)
        assert obj["ObjectLockMode"] == "COMPLIANCE"
        cp, _ = open_checkpoint(obj["Body"].read(), signer.verifier)
        assert cp.size == 4
        with pytest.raises(ClientError):
            s3.delete_object(Bucket="worm", Key=key, VersionId=obj["VersionId"])
        latest = s3.get_object(Bucket="worm", Key=f"cp/{ORIGIN}/latest.checkpoint")["Body"].read()
        assert open_checkpoint(latest, signer.verifier)[0].size == 4
        store.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "manifest",
    [b"[]", b'{"format": "coworker-audit-bundle/v1", "records": 5}', b"not json",
     b'{"format": "coworker-audit-bundle/v1", "records": ["x"]}'],
)  # fmt: skip
def test_hostile_manifests_are_named_not_crashes(tmp_path: Path, manifest: bytes) -> None:
    """A manifest that is not the expected shape is a named failure, never an exception."""
    signer = generate_signer(ORIGIN)
    from coworker.audit.checkpoint import Checkpoint, sign_checkpoint

    files = {
        "manifest.json": manifest,
        "checkpoint": sign_checkpoint(Checkpoint(ORIGIN, 0, merkle.EMPTY_ROOT), signer),
    }
    report = verify_bundle(files, signer.verifier)
    assert not report.ok and report.failures


def test_verify_bundle_on_a_file_that_is_no_bundle_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A random file given as BUNDLE is a clear error (exit 2), not a traceback."""
    _, pub = _key(tmp_path)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    assert main(["audit", "verify-bundle", str(junk), "--key", str(pub)]) == 2
    assert "neither a bundle directory nor a tar" in capsys.readouterr().err
