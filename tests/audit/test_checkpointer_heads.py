"""Heads notes over every chain of a store, written by the background checkpointer and by
``coworker audit heads``, checked by ``verify --heads`` (real SQLite files, the real
PostgreSQL server)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coworker.audit import merkle
from coworker.audit.checkpoint import (
    Checkpoint,
    chain_origin,
    chain_verifier,
    open_checkpoint,
    open_heads,
)
from coworker.audit.checkpointer import Checkpointer, DirectoryPublisher
from coworker.audit.keys import Signer, generate_signer, write_signer
from coworker.audit.store_sqlite import chain_file
from coworker.audit.urls import open_store, with_chain
from coworker.cli import main
from tests.deps import require

from .proofs_helpers import entry

ORIGIN = "audit.example.com/heads"
CHAINS = ("", "billing", "eu")


def _until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _fill_chains(url: str, sizes: dict[str, int]) -> dict[str, tuple[int, bytes]]:
    """Append to each chain; return each chain's (size, RFC 6962 root) from the records."""
    for name, n in sizes.items():
        s = open_store(with_chain(url, name))
        s.append([entry(i) for i in range(n)])
        s.close()
    # Trees once every chain exists: a named chain's registry record is in the default chain.
    heads = {}
    for name in sizes:
        s = open_store(with_chain(url, name))
        cr = merkle.CompactRange()
        for r in s.iter_from():
            cr.append(merkle.leaf_hash(r.body))
        heads[name] = (cr.size, cr.root())
        s.close()
    return heads


def _delete_sqlite_chain(path: Path, name: str) -> None:
    billing = Path(chain_file(str(path), name))
    for leftover in billing.parent.glob(f"{name}.db*"):
        leftover.unlink()


class FlakyPublisher:
    """A publisher whose heads-note publication fails until ``ok`` is set."""

    def __init__(self) -> None:
        self.ok = threading.Event()
        self.checkpoints: list[Checkpoint] = []
        self.heads: list[bytes] = []
        self.heads_attempts = 0

    def __call__(self, checkpoint: Checkpoint, note: bytes) -> None:
        self.checkpoints.append(checkpoint)

    def publish_heads(self, origin: str, note: bytes) -> None:
        self.heads_attempts += 1
        if not self.ok.is_set():
            raise OSError("share unreachable")
        self.heads.append(note)


def _verify_heads(url: str, note: Path, signer: Signer) -> list[str]:
    return ["audit", "verify", "--url", url, "--heads", str(note), "--key", signer.verifier.text]


def test_a_checkpointer_round_signs_every_chain_and_a_heads_note_that_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One round: a checkpoint of each chain under its own origin, published, and a heads note
    listing every chain's tree from the records, published as latest.heads; verify accepts it."""
    path = tmp_path / "a.db"
    url = f"sqlite:///{path}"
    expected = _fill_chains(url, {"": 3, "billing": 5, "eu": 2})
    signer = generate_signer(ORIGIN)
    worm = tmp_path / "worm"
    store = open_store(url)
    cpr = Checkpointer(
        store, signer, every_records=1, every_seconds=None,
        publishers=[DirectoryPublisher(worm)], poll=0.02,
    )  # fmt: skip
    latest = worm / ORIGIN.replace("/", "_") / "latest.heads"
    try:
        assert _until(latest.exists), "no heads note published"
        assert open_heads(latest.read_bytes(), signer.verifier) == expected
        assert cpr.heads == latest.read_bytes()
        for name in ("billing", "eu"):
            folder = worm / chain_origin(ORIGIN, name).replace("/", "_")
            cp, _ = open_checkpoint(
                (folder / "latest.checkpoint").read_bytes(), chain_verifier(signer.verifier, name)
            )
            assert (cp.size, cp.root) == expected[name]
        assert len(list((latest.parent / "heads").glob("*.heads"))) == 1
    finally:
        cpr.close()
        store.close()
    assert main(_verify_heads(url, latest, signer)) == 0
    out = capsys.readouterr().out
    assert "heads note: chain billing (tree 5): ok" in out
    # 3 records + the registry records of billing and eu
    assert "heads note: chain (default) (tree 5): ok" in out


def test_after_a_chain_is_deleted_the_checkpointers_note_names_it_vanished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A chain deleted whole: verify --heads with the note the checkpointer published says
    'vanished' (exit 1), and the checkpointer logs it and signs no heads note without it."""
    path = tmp_path / "a.db"
    url = f"sqlite:///{path}"
    _fill_chains(url, {"": 2, "billing": 4, "eu": 1})
    signer = generate_signer(ORIGIN)
    worm = tmp_path / "worm"
    store = open_store(url)
    cpr = Checkpointer(
        store, signer, every_records=None, every_seconds=0.05,
        publishers=[DirectoryPublisher(worm)], poll=0.02,
    )  # fmt: skip
    latest = worm / ORIGIN.replace("/", "_") / "latest.heads"
    try:
        assert _until(latest.exists)
        kept = tmp_path / "kept.heads"
        kept.write_bytes(latest.read_bytes())
        with caplog.at_level(logging.ERROR, logger="coworker.audit"):
            _delete_sqlite_chain(path, "billing")
            store.append([entry(99)])  # the default chain moves on: a new note would differ
            assert _until(lambda: any("vanished" in r.getMessage() for r in caplog.records)), (
                "the checkpointer did not report the vanished chain"
            )
        assert "'billing'" in next(
            r.getMessage() for r in caplog.records if "vanished" in r.getMessage()
        )
        # The own chain is still signed: 2 records, 2 registry records, entry(99).
        assert cpr.last is not None and cpr.last[0].size == 5
        assert latest.read_bytes() == kept.read_bytes()  # no note leaving billing out
    finally:
        cpr.close()
        store.close()
    # Without the note too: the chain registry names it.
    assert main(["audit", "verify", "--url", url]) == 1
    assert "FAIL  chain billing: vanished" in capsys.readouterr().out
    assert main(_verify_heads(url, kept, signer)) == 1
    out = capsys.readouterr().out
    assert "FAIL  heads note: chain billing (tree 4): vanished" in out
    assert "heads note: chain eu (tree 1): ok" in out


def test_a_failing_heads_publish_is_logged_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A heads note whose publication fails is logged at ERROR naming it, stays queued, and
    is published by a later attempt once the target is back."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    _fill_chains(url, {"": 2, "billing": 3})
    signer = generate_signer(ORIGIN)
    flaky = FlakyPublisher()
    store = open_store(url)
    with caplog.at_level(logging.ERROR, logger="coworker.audit"):
        cpr = Checkpointer(
            store, signer, every_records=1, every_seconds=None, publishers=[flaky], poll=0.02
        )
        try:
            assert _until(lambda: flaky.heads_attempts >= 1)
            assert _until(lambda: any("heads note" in r.getMessage() for r in caplog.records))
            message = next(r.getMessage() for r in caplog.records if "heads note" in r.getMessage())
            assert "share unreachable" in message and "retry" in message
            assert cpr.unpublished >= 1 and not flaky.heads
            flaky.ok.set()
            assert _until(lambda: bool(flaky.heads)), "the heads note was never retried"
            assert flaky.heads_attempts >= 2
            assert open_heads(flaky.heads[-1], signer.verifier)["billing"][0] == 3
            assert {cp.origin for cp in flaky.checkpoints} == {ORIGIN, f"{ORIGIN}/chain/billing"}
        finally:
            cpr.close()
            store.close()
    assert cpr.unpublished == 0


def test_cli_heads_writes_a_note_verify_accepts_and_refuses_one_without_a_vanished_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coworker audit heads --key KEYFILE --out FILE` signs every chain and a heads note that
    verify --heads accepts; after a chain is deleted, verify names it and a new `heads` run
    refuses (exit 1) to sign a note leaving it out; `prove` still finds a checkpoint."""
    path = tmp_path / "a.db"
    url = f"sqlite:///{path}"
    expected = _fill_chains(url, {"": 4, "billing": 2, "eu": 6})
    signer = generate_signer(ORIGIN)
    keyfile = tmp_path / "log.key"
    pub = write_signer(keyfile, signer)
    note = tmp_path / "h.note"
    assert main(["audit", "heads", "--url", url, "--key", str(keyfile), "--out", str(note)]) == 0
    assert capsys.readouterr().out.encode() == note.read_bytes()
    assert open_heads(note.read_bytes(), signer.verifier) == expected
    assert main(["audit", "prove", "2", "--url", url, "--key", str(pub)]) == 0
    capsys.readouterr()
    assert main(_verify_heads(url, note, signer)) == 0
    capsys.readouterr()
    _delete_sqlite_chain(path, "eu")
    assert main(_verify_heads(url, note, signer)) == 1
    assert "FAIL  heads note: chain eu (tree 6): vanished" in capsys.readouterr().out
    assert main(["audit", "heads", "--url", url, "--key", str(keyfile)]) == 1
    err = capsys.readouterr().err
    assert "'eu'" in err and "vanished" in err


def test_checkpoint_of_a_named_chain_is_signed_under_the_chains_origin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coworker audit checkpoint --url ...?chain=billing` signs under <origin>/chain/billing
    (it used to sign the chain's tree under the store's origin: two trees, one origin)."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    expected = _fill_chains(url, {"": 1, "billing": 3})
    signer = generate_signer(ORIGIN)
    keyfile = tmp_path / "log.key"
    write_signer(keyfile, signer)
    assert (
        main(["audit", "checkpoint", "--url", with_chain(url, "billing"), "--key", str(keyfile)])
        == 0
    )
    note = capsys.readouterr().out.encode()
    cp, _ = open_checkpoint(note, chain_verifier(signer.verifier, "billing"))
    assert cp.origin == f"{ORIGIN}/chain/billing" and (cp.size, cp.root) == expected["billing"]
    # The auditor holds the store's key only: prove, export, verify-bundle and verify
    # --checkpoint of the chain derive the chain's key from it.
    chain_url = with_chain(url, "billing")
    key = signer.verifier.text
    cp_file = tmp_path / "billing.cp"
    cp_file.write_bytes(note)
    assert main(["audit", "prove", "2", "--url", chain_url, "--key", key]) == 0
    bundle = tmp_path / "b.tar"
    assert main(["audit", "export", "--url", chain_url, "--key", key, "--out", str(bundle)]) == 0
    assert main(["audit", "verify-bundle", str(bundle), "--key", key]) == 0
    assert "OK  3 records proven" in capsys.readouterr().out
    verify = ["audit", "verify", "--url", url, "--chain", "billing"]
    assert main([*verify, "--checkpoint", str(cp_file), "--key", key]) == 0


def test_s3_publisher_writes_object_locked_heads_notes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against moto's S3 server on loopback: each heads note lands under Object Lock
    (cannot be deleted) and as latest.heads, beside the chains' checkpoints."""
    import hashlib

    boto3 = require("boto3", "the s3 extra")
    ClientError = require("botocore.exceptions", "the s3 extra").ClientError
    ThreadedMotoServer = require("moto.server", "moto[server], the dev extra").ThreadedMotoServer
    from coworker.audit.checkpointer import publisher_for

    url = f"sqlite:///{tmp_path / 'a.db'}"
    expected = _fill_chains(url, {"": 2, "billing": 3})
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
        store = open_store(url)
        publish = publisher_for(f"s3://worm/cp/?retain_days=30&endpoint={endpoint}")
        cpr = Checkpointer(
            store, signer, every_records=1, every_seconds=None, publishers=[publish], poll=0.02
        )
        try:
            assert _until(lambda: cpr.heads is not None and cpr.unpublished == 0)
        finally:
            cpr.close()
            store.close()
        assert cpr.heads is not None
        key = f"cp/{ORIGIN}/heads/{hashlib.sha256(cpr.heads).hexdigest()}.heads"
        obj = s3.get_object(Bucket="worm", Key=key)
        assert obj["ObjectLockMode"] == "COMPLIANCE"
        assert open_heads(obj["Body"].read(), signer.verifier) == expected
        with pytest.raises(ClientError):
            s3.delete_object(Bucket="worm", Key=key, VersionId=obj["VersionId"])
        latest = s3.get_object(Bucket="worm", Key=f"cp/{ORIGIN}/latest.heads")["Body"].read()
        assert latest == cpr.heads
        billing = s3.get_object(Bucket="worm", Key=f"cp/{ORIGIN}/chain/billing/3.checkpoint")
        assert billing["ObjectLockMode"] == "COMPLIANCE"
    finally:
        server.stop()


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_checkpointer_heads_note_names_a_dropped_chain_schema(
    pg: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On PostgreSQL: the checkpointer (configured on a named chain) signs every chain's schema
    and a heads note that verifies; after one chain's schema is dropped, verify --heads with
    that note says 'vanished'."""
    from coworker.audit.checkpointer import start_from_config
    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    expected = _fill_chains(url, {"": 2, "t1": 3, "t2": 1})
    signer = generate_signer(ORIGIN)
    keyfile = tmp_path / "log.key"
    write_signer(keyfile, signer)
    worm = tmp_path / "worm"
    app = PostgresStore(with_chain(url, "t1"), spool=None)
    cpr = start_from_config(app, keyfile, every=1, publish=str(worm))
    latest = worm / ORIGIN.replace("/", "_") / "latest.heads"
    try:
        assert _until(latest.exists), "no heads note published"
        assert open_heads(latest.read_bytes(), signer.verifier) == expected
    finally:
        cpr.close()
        app.close()
    assert main(_verify_heads(url, latest, signer)) == 0
    capsys.readouterr()
    schema = f"{app.base_schema}:t2"
    pg.execute(f'DROP SCHEMA "{schema}" CASCADE')
    assert main(_verify_heads(url, latest, signer)) == 1
    out = capsys.readouterr().out
    assert "FAIL  heads note: chain t2 (tree 1): vanished" in out
    assert "heads note: chain t1 (tree 3): ok" in out


def test_a_registered_chain_gone_before_any_heads_note_blocks_the_first_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chain deleted before any heads note was signed: the chain registry names it, so the
    checkpointer's first round logs it as vanished and signs no note leaving it out (the own
    chain's checkpoint is still signed); `coworker audit heads` exits 1."""
    path = tmp_path / "a.db"
    url = f"sqlite:///{path}"
    _fill_chains(url, {"": 2, "billing": 4, "eu": 1})
    _delete_sqlite_chain(path, "billing")
    signer = generate_signer(ORIGIN)
    worm = tmp_path / "worm"
    store = open_store(url)
    with caplog.at_level(logging.ERROR, logger="coworker.audit"):
        cpr = Checkpointer(
            store, signer, every_records=1, every_seconds=None,
            publishers=[DirectoryPublisher(worm)], poll=0.02,
        )  # fmt: skip
        try:
            assert _until(lambda: any("vanished" in r.getMessage() for r in caplog.records))
            assert cpr.last is not None  # the own chain is signed all the same
            assert cpr.heads is None
            assert not (worm / ORIGIN.replace("/", "_") / "latest.heads").exists()
        finally:
            cpr.close()
            store.close()
    assert "'billing'" in next(
        r.getMessage() for r in caplog.records if "vanished" in r.getMessage()
    )
    keyfile = tmp_path / "log.key"
    write_signer(keyfile, signer)
    assert main(["audit", "heads", "--url", url, "--key", str(keyfile)]) == 1  # the CLI too
