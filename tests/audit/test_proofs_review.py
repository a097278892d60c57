"""Attacks on the proofs found in review (duplicate signatures, hostile bundles, an edited tree
file): each test failed before its fix."""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import tarfile
import threading
from pathlib import Path

import pytest

from coworker.audit import merkle
from coworker.audit.bundle import read_bundle, verify_bundle
from coworker.audit.checkpoint import CheckpointError, open_checkpoint, parse_note
from coworker.audit.checkpointer import make_checkpoint
from coworker.audit.keys import Signer, generate_signer, load_verifier
from coworker.audit.record import format_time
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.tlog import TREE_SUFFIX, LogTree, TreeError
from coworker.cli import main

from .proofs_helpers import entry, fill

ORIGIN = "audit.example.com/review"


@pytest.fixture
def signer() -> Signer:
    """A fresh log key."""
    return generate_signer(ORIGIN)


def _bundle(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """A directory bundle of alice's 5 records (of 12) and the verifier key file."""
    keyfile = tmp_path / "log.key"
    assert main(["audit", "keygen", "--name", ORIGIN, "--out", str(keyfile)]) == 0
    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    bodies = [entry(i, user="alice" if i <= 5 else "bob") for i in range(1, 13)]
    for i, body in enumerate(bodies, 1):  # one record a second from 2023-11-14T22:13:21Z
        body["start"] = body["recorded_at"] = format_time((1_700_000_000 + i) * 10**9)
    store.append(bodies)
    store.close()
    url = f"sqlite:///{db}"
    assert main(["audit", "checkpoint", "--url", url, "--key", str(keyfile)]) == 0
    out = tmp_path / "bundle"
    pub = Path(f"{keyfile}.pub")
    args = ["audit", "export", "--out", str(out), "--url", url, "--key", str(pub), *extra]
    assert main(args) == 0
    return out, pub


# -- signed notes ----------------------------------------------------------------------------
def test_a_second_signature_of_the_same_key_is_malformed_not_skipped(signer: Signer) -> None:
    """A note carrying the log key's signature twice is rejected as Go's note.Open does
    (errMalformedNote), so a bit flip in the second copy cannot pass unverified."""
    from coworker.audit.checkpoint import Checkpoint, sign_checkpoint

    note = sign_checkpoint(Checkpoint(ORIGIN, 3, bytes(32)), signer)
    line = note.decode().split("\n\n", 1)[1]
    prefix, encoded = line.rstrip("\n").rsplit(" ", 1)
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 0x01  # the same key id, another (invalid) signature
    flipped = f"{prefix} {base64.b64encode(raw).decode()}\n".encode()
    for second in (line.encode(), flipped):
        doubled = note + second
        assert len(parse_note(doubled).signatures) == 2
        with pytest.raises(CheckpointError, match="malformed"):
            open_checkpoint(doubled, signer.verifier)


# -- bundles ---------------------------------------------------------------------------------
def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_a_tar_bundle_naming_a_file_twice_is_refused(tmp_path: Path) -> None:
    """Two tar members of one name (verify-bundle read the last, `tar -xO` and other tools the
    first) make the bundle ambiguous: refused with the name, exit 2."""
    out, pub = _bundle(tmp_path, "--user", "alice")
    files = read_bundle(out)
    name = "records/000000000002.json"
    forged = files[name].replace(b'"alice"', b'"mallory"')
    members = [_regular(name, forged)] + [_regular(n, d) for n, d in sorted(files.items())]
    tar = tmp_path / "dup.tar"
    _tar(tar, members)
    with pytest.raises(ValueError, match="twice"):
        read_bundle(tar)
    assert main(["audit", "verify-bundle", str(tar), "--key", str(pub)]) == 2


@pytest.mark.parametrize(
    "member",
    ["../records/000000000001.json", "/records/000000000001.json", "records/../x.json"],
)
def test_a_tar_bundle_with_an_unsafe_member_name_is_refused(tmp_path: Path, member: str) -> None:
    """Absolute names and `..` components are refused: extracting such a bundle for archiving
    would write outside it."""
    out, _ = _bundle(tmp_path, "--user", "alice")
    files = read_bundle(out)
    tar = tmp_path / "unsafe.tar"
    _tar(tar, [_regular(n, d) for n, d in sorted(files.items())] + [_regular(member, b"{}")])
    with pytest.raises(ValueError, match=r"unsafe|outside"):
        read_bundle(tar)


def test_links_in_a_bundle_are_refused(tmp_path: Path) -> None:
    """A symlink in a bundle directory (its content can change after verification and is not
    archived with the bundle) and a symlink or hard link member in a tar are refused."""
    out, pub = _bundle(tmp_path, "--user", "alice")
    target = out / "records" / "000000000003.json"
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    os.symlink(outside, target)
    with pytest.raises(ValueError, match="link"):
        read_bundle(out)
    assert main(["audit", "verify-bundle", str(out), "--key", str(pub)]) == 2
    link = tarfile.TarInfo("records/000000000009.json")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    tar = tmp_path / "link.tar"
    _tar(tar, [_regular("manifest.json", b"{}"), (link, None)])
    with pytest.raises(ValueError, match="link"):
        read_bundle(tar)


def test_a_manifest_listing_one_record_twice_counts_it_once(tmp_path: Path) -> None:
    """A record listed twice in the manifest does not make two proven records."""
    out, pub = _bundle(tmp_path, "--user", "alice")
    files = read_bundle(out)
    manifest = json.loads(files["manifest.json"])
    manifest["records"].append(dict(manifest["records"][0]))
    files["manifest.json"] = json.dumps(manifest).encode()
    report = verify_bundle(files, load_verifier(pub))
    assert not report.ok
    assert any("twice" in f for f in report.failures)


def test_a_manifest_that_misstates_the_checkpoint_or_the_selection_fails(tmp_path: Path) -> None:
    """The manifest's origin and tree size must be the checkpoint's, and every record must
    match the selection the manifest states (a bob record in a --user alice bundle)."""
    out, pub = _bundle(tmp_path, "--user", "alice")
    verifier = load_verifier(pub)
    files = read_bundle(out)
    assert verify_bundle(files, verifier).ok
    for key, value in (("origin", "audit.example.com/other"), ("tree_size", 999)):
        manifest = json.loads(files["manifest.json"])
        manifest[key] = value
        report = verify_bundle({**files, "manifest.json": json.dumps(manifest).encode()}, verifier)
        assert not report.ok and any(key in f for f in report.failures), report.failures
    # A bundle of bob's records relabelled as alice's.
    (tmp_path / "b").mkdir()
    bob, _ = _bundle(tmp_path / "b", "--user", "bob")
    bob_files = read_bundle(bob)
    manifest = json.loads(bob_files["manifest.json"])
    manifest["filters"] = {"user": "alice"}
    bob_files["manifest.json"] = json.dumps(manifest).encode()
    report = verify_bundle(bob_files, load_verifier(tmp_path / "b" / "log.key.pub"))
    assert not report.ok
    assert any("selection" in f and "user" in f for f in report.failures), report.failures


def test_a_time_selection_is_stated_in_absolute_times_and_checked(tmp_path: Path) -> None:
    """export --since keeps an absolute time in the manifest (a relative '4000d' is resolved at
    export), and a record outside the stated times fails verify-bundle."""
    out, pub = _bundle(tmp_path, "--since", "2023-11-14T22:13:23Z")
    files = read_bundle(out)
    manifest = json.loads(files["manifest.json"])
    assert manifest["filters"] == {"since": "2023-11-14T22:13:23.000000000Z"}
    assert [e["seq"] for e in manifest["records"]] == list(range(3, 13))
    verifier = load_verifier(pub)
    assert verify_bundle(files, verifier).ok
    manifest["filters"]["since"] = "2023-11-14T22:13:25.000000000Z"
    report = verify_bundle({**files, "manifest.json": json.dumps(manifest).encode()}, verifier)
    assert not report.ok
    assert {f.split(":")[0] for f in report.failures} == {"record 3", "record 4"}
    (tmp_path / "r").mkdir()
    relative, _ = _bundle(tmp_path / "r", "--since", "4000d")
    stated = json.loads(read_bundle(relative)["manifest.json"])["filters"]["since"]
    assert stated.endswith("Z") and stated[:4].isdigit()


# -- the tree side file ----------------------------------------------------------------------
def _edit_node(db: Path, level: int, idx: int) -> None:
    """As the owner of ``<db>.tree``: replace one stored subtree hash."""
    with sqlite3.connect(f"{db}{TREE_SUFFIX}") as conn:
        changed = conn.execute(
            "UPDATE audit_tree_nodes SET hash = ? WHERE level = ? AND idx = ?",
            (bytes(range(32)), level, idx),
        ).rowcount
    assert changed == 1


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_an_edited_tree_file_is_never_signed(
    tmp_path: Path, signer: Signer, with_checkpoint: bool
) -> None:
    """The owner edits a stored subtree of ``<db>.tree`` beyond the last checkpoint (or with
    none): a new process refuses to sign its root (which is not the records'), instead of
    signing a checkpoint the honest log then fails against."""
    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    store.append([entry(i) for i in range(20)])
    tree = LogTree(store)
    if with_checkpoint:
        make_checkpoint(tree, signer)  # tree of 20: stored subtree (4, 0) plus 4 leaves
    store.append([entry(i) for i in range(20, 40)])
    assert tree.sync() == 40  # stores (4, 1) and (5, 0)
    tree.close()
    _edit_node(db, 5, 0)  # the root of 40 folds (5, 0) with the last 8 records
    fresh = LogTree(store)
    with pytest.raises(TreeError, match="does not match the records"):
        make_checkpoint(fresh, signer)
    kept = fresh.table.checkpoints(ORIGIN)
    assert [c.size for c in kept] == ([20] if with_checkpoint else [])
    fresh.close()
    # Rebuilt from the records, the tree is signed again, and its root is the records' root.
    os.unlink(f"{db}{TREE_SUFFIX}")
    rebuilt = LogTree(store)
    checkpoint, _ = make_checkpoint(rebuilt, signer)
    leaves = [merkle.leaf_hash(r.body) for r in store.iter_from(1)]
    assert checkpoint.root == merkle.root_from_leaves(leaves)
    rebuilt.close()
    store.close()


def test_a_running_checkpointer_signs_from_its_own_hashes_not_the_file(
    tmp_path: Path, signer: Signer
) -> None:
    """A process that hashed the records itself signs their root even when the tree file is
    edited under it; a fresh process with a rebuilt tree signs the records' root too."""
    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    store.append([entry(i) for i in range(40)])
    tree = LogTree(store)
    first, _ = make_checkpoint(tree, signer)
    store.append([entry(i) for i in range(40, 80)])
    second, _ = make_checkpoint(tree, signer)
    assert (first.size, second.size) == (40, 80)
    _edit_node(db, 6, 0)  # under the running process, in the part both checkpoints cover
    store.append([entry(i) for i in range(80, 90)])
    third, _ = make_checkpoint(tree, signer)
    leaves = [merkle.leaf_hash(r.body) for r in store.iter_from(1)]
    assert third.size == 90 and third.root == merkle.root_from_leaves(leaves)
    tree.close()
    os.unlink(f"{db}{TREE_SUFFIX}")
    store.append([entry(i) for i in range(90, 100)])
    fresh = LogTree(store)
    fourth, _ = make_checkpoint(fresh, signer)
    leaves = [merkle.leaf_hash(r.body) for r in store.iter_from(1)]
    assert fourth.size == 100 and fourth.root == merkle.root_from_leaves(leaves)
    fresh.close()
    store.close()


# -- hostile witnesses -----------------------------------------------------------------------
class _HostileWitness:
    """A loopback HTTP server answering every add-checkpoint with one fixed reply."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        import http.server

        reply = (status, content_type, body)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                code, ctype, data = reply
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _own_signature_forged(signer: Signer) -> bytes:
    """A 'cosignature' line under the log's own name and key id, with a wrong signature."""
    blob = signer.key_id.to_bytes(4, "big") + bytes(64)
    return f"\u2014 {signer.name} {base64.b64encode(blob).decode()}\n".encode()


@pytest.mark.parametrize(
    "reply",
    [
        "own-key",  # a line under the log key's name and id: it replaced the log's signature
        "garbage",  # not signature lines a note can hold: cosign raised, nothing was published
        "huge-size",  # a 409 with a 5,000-digit size: int() raised ValueError
    ],
)
def test_a_hostile_witness_cannot_spoil_or_block_a_checkpoint(
    tmp_path: Path, signer: Signer, reply: str
) -> None:
    """Whatever a witness answers, the checkpoint is stored and published with a valid log
    signature; the witness's answer is refused and logged."""
    from coworker.audit.checkpointer import Checkpointer, DirectoryPublisher
    from coworker.audit.witness import WitnessClient

    answers = {
        "own-key": (200, "text/plain", _own_signature_forged(signer)),
        "garbage": (200, "text/plain", "\u2014 w !!!notbase64\n".encode()),
        "huge-size": (409, "text/x.tlog.size", b"9" * 5000 + b"\n"),
    }
    witness = _HostileWitness(*answers[reply])
    store = SQLiteStore(tmp_path / "a.db")
    store.append([entry(i) for i in range(5)])
    worm = tmp_path / "worm"
    cpr = Checkpointer(
        store, signer, every_records=None, every_seconds=None,
        publishers=[DirectoryPublisher(worm)], witnesses=[WitnessClient(witness.url)],
        poll=60,
    )  # fmt: skip
    try:
        checkpoint, note = cpr.checkpoint_now()
        assert checkpoint.size == 5
        open_checkpoint(note, signer.verifier)
        published = (worm / ORIGIN.replace("/", "_") / "5.checkpoint").read_bytes()
        assert open_checkpoint(published, signer.verifier)[0] == checkpoint
        stored = cpr.tree.table.latest(ORIGIN)
        assert stored is not None
        open_checkpoint(stored.note, signer.verifier)
        store.append([entry(5)])
        assert cpr.checkpoint_now()[0].size == 6  # checkpointing goes on
    finally:
        cpr.close(final=False)
        witness.close()
        store.close()


def test_a_tree_size_or_index_beyond_uint64_is_a_clean_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint file whose size has 5,000 digits (or 2**64) and a tlog-proof whose index
    does are refused with a reason (prove exits 1 naming it); they crashed `prove` with
    int()'s ValueError traceback."""
    from coworker.audit.checkpoint import parse_checkpoint
    from coworker.audit.merkle import ProofError
    from coworker.audit.proof import parse_proof

    root = base64.b64encode(bytes(32)).decode()
    for size in ("9" * 5000, str(2**64)):
        with pytest.raises(CheckpointError, match="2\\*\\*64"):
            parse_checkpoint(f"{ORIGIN}\n{size}\n{root}\n")
        with pytest.raises(ProofError, match="uint64"):
            parse_proof(f"c2sp.org/tlog-proof@v1\nindex {size}\n\n".encode())
    assert parse_checkpoint(f"{ORIGIN}\n{2**64 - 1}\n{root}\n").size == 2**64 - 1
    keyfile = tmp_path / "log.key"
    assert main(["audit", "keygen", "--name", ORIGIN, "--out", str(keyfile)]) == 0
    db = tmp_path / "a.db"
    fill(db, 4)
    url = f"sqlite:///{db}"
    good = tmp_path / "good.txt"
    assert (
        main(["audit", "checkpoint", "--url", url, "--key", str(keyfile), "--out", str(good)]) == 0
    )
    lines = good.read_text().split("\n")
    lines[1] = "9" * 5000
    huge = tmp_path / "huge.txt"
    huge.write_text("\n".join(lines))
    capsys.readouterr()
    assert main(["audit", "prove", "--url", url, "--consistency", str(huge), str(good)]) == 1
    assert main(["audit", "prove", "2", "--url", url, "--checkpoint", str(huge)]) == 1
    assert capsys.readouterr().err.count("larger than 2**64 - 1") == 2


def test_the_directory_publisher_never_replaces_a_published_checkpoint(
    tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    """A second, different checkpoint of one size (the key signed a rewritten log) is
    written beside the first and logged as a fork; the first stays (it was overwritten,
    erasing the evidence). The same note published twice writes nothing new."""
    import logging

    from coworker.audit.checkpoint import Checkpoint, sign_checkpoint
    from coworker.audit.checkpointer import DirectoryPublisher

    publish = DirectoryPublisher(tmp_path / "worm")
    first = Checkpoint(ORIGIN, 5, bytes(32))
    fork = Checkpoint(ORIGIN, 5, bytes([1]) * 32)
    a, b = sign_checkpoint(first, signer), sign_checkpoint(fork, signer)
    publish(first, a)
    publish(first, a)
    folder = tmp_path / "worm" / ORIGIN.replace("/", "_")
    assert sorted(p.name for p in folder.iterdir()) == ["5.checkpoint", "latest.checkpoint"]
    with caplog.at_level(logging.ERROR, logger="coworker.audit"):
        publish(fork, b)
    assert (folder / "5.checkpoint").read_bytes() == a
    assert (folder / "latest.checkpoint").read_bytes() == b
    others = [p for p in folder.iterdir() if p.name.startswith("5-")]
    assert len(others) == 1 and others[0].read_bytes() == b
    assert any("fork" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_signed_by_another_process_meanwhile_is_no_truncation(
    tmp_path: Path, signer: Signer
) -> None:
    """Process A syncs its tree; before it reads the last stored checkpoint, process B appends
    and signs a bigger one. A signs the grown log instead of refusing with 'truncated?'
    (a false alarm at ERROR in every application running a checkpointer beside the CLI)."""
    from coworker.audit.tlog import SQLiteTable

    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    store.append([entry(i) for i in range(10)])

    class Racing(SQLiteTable):
        raced = False

        def latest(self, origin: str):  # type: ignore[no-untyped-def]
            if not self.raced:  # B's whole checkpoint happens between A's sync and this read
                self.raced = True
                store.append([entry(i) for i in range(10, 20)])
                other = LogTree(store)
                assert make_checkpoint(other, signer)[0].size == 20
                other.close()
            return super().latest(origin)

    tree = LogTree(store, Racing(f"{db}{TREE_SUFFIX}"))
    checkpoint, _ = make_checkpoint(tree, signer)
    assert checkpoint.size == 20
    tree.close()
    store.close()
