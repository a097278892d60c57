"""Witness cosignatures against a real third-party witness: litewitness from
filippo.io/torchwood (built from its Go module into a temp dir, key in a dedicated
ssh-agent, listening on loopback), plus tlog-policy parsing and k-of-n quorums.

Without ``go``, the module proxy or ``ssh-agent`` the litewitness tests skip, except under
``CI`` where they fail."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coworker.audit.checkpoint import open_checkpoint
from coworker.audit.checkpointer import Checkpointer, cosign, make_checkpoint
from coworker.audit.keys import generate_signer, write_signer
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.tlog import LogTree
from coworker.audit.witness import (
    PolicyError,
    WitnessClient,
    WitnessRefused,
    parse_policy,
    parse_witness_key,
)
from coworker.cli import main

from .proofs_helpers import entry, fill

TORCHWOOD: str = "filippo.io/torchwood@v0.6.1"  # the newest release that builds with Go 1.26
ORIGIN = "audit.example.com/witnessed"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the witness tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def litewitness_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """litewitness and witnessctl, built with `go install` into a temp dir."""
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if go is None or shutil.which("ssh-agent") is None or shutil.which("ssh-keygen") is None:
        _unavailable("go, ssh-agent or ssh-keygen is not installed")
    out = tmp_path_factory.mktemp("lwbin")
    cache = Path(tempfile.gettempdir()) / "coworker-go-cache"
    env = {
        **os.environ, "GOBIN": str(out), "GOCACHE": str(cache / "build"),
        "GOMODCACHE": str(cache / "mod"), "GOTOOLCHAIN": "local", "CGO_ENABLED": "0",
    }  # fmt: skip
    module, version = TORCHWOOD.split("@")
    cmd = [
        go,
        "install",
        f"{module}/cmd/litewitness@{version}",
        f"{module}/cmd/witnessctl@{version}",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        _unavailable(f"go install litewitness failed: {result.stderr.strip()[-400:]}")
    return out


@dataclass
class Witness:
    """A running litewitness."""

    url: str
    vkey: str
    db: Path
    ctl: Path

    def add_log(self, origin: str, vkey: str) -> None:
        for args in (["add-log", "-origin", origin], ["add-key", "-origin", origin, "-key", vkey]):
            subprocess.run(
                [str(self.ctl), args[0], "-db", str(self.db), *args[1:]],
                check=True,
                capture_output=True,
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_witness(bin_dir: Path, name: str) -> Iterator[Witness]:
    work = Path(tempfile.mkdtemp(prefix="lw", dir="/tmp"))  # short: unix socket path limit
    sock = work / "s"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(work / "key")],
        check=True,
    )
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    lw = None
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline:
                raise AssertionError("ssh-agent did not create its socket")
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(
            ["ssh-add", "-q", str(work / "key")], env=env, check=True, capture_output=True
        )
        fp = subprocess.run(
            ["ssh-keygen", "-lf", str(work / "key.pub")], check=True, capture_output=True, text=True
        ).stdout.split()[1]
        port = _free_port()
        log = open(work / "lw.log", "w")  # noqa: SIM115 - closed below
        lw = subprocess.Popen(
            [str(bin_dir / "litewitness"), "-db", str(work / "w.db"), "-name", name, "-key", fp,
             "-ssh-agent", str(sock), "-listen", f"127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        vkey = None
        while vkey is None or "listening" not in (work / "lw.log").read_text():
            if time.monotonic() > deadline or lw.poll() is not None:
                raise AssertionError(f"litewitness did not start: {(work / 'lw.log').read_text()}")
            m = re.search(r"vkey=(\S+)", (work / "lw.log").read_text())
            vkey = m.group(1) if m else None
            time.sleep(0.05)
        yield Witness(f"http://127.0.0.1:{port}", vkey, work / "w.db", bin_dir / "witnessctl")
        log.close()
    finally:
        for proc in (lw, agent):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def witness(litewitness_bin: Path) -> Iterator[Witness]:
    """One litewitness on loopback."""
    yield from _start_witness(litewitness_bin, "witness.example/w1")


@pytest.fixture
def witness2(litewitness_bin: Path) -> Iterator[Witness]:
    """A second, independent litewitness."""
    yield from _start_witness(litewitness_bin, "witness.example/w2")


def test_litewitness_cosigns_our_checkpoints_and_the_policy_verifies(
    tmp_path: Path, witness: Witness, witness2: Witness
) -> None:
    """litewitness accepts our checkpoints and consistency proofs; its cosignature verifies
    with its vkey; a 2-of-2 policy passes, and fails when one witness is missing."""
    signer = generate_signer(ORIGIN)
    for w in (witness, witness2):
        w.add_log(ORIGIN, signer.verifier.text)
    db = tmp_path / "a.db"
    fill(db, 9)
    store = SQLiteStore(db)
    tree = LogTree(store)
    clients = [WitnessClient(witness.url), WitnessClient(witness2.url)]
    cp, note = make_checkpoint(tree, signer)
    cosigned = cosign(tree, cp, note, clients)
    store.append([entry(i) for i in range(10, 40)])
    cp2, note2 = make_checkpoint(tree, signer)
    cosigned2 = cosign(tree, cp2, note2, clients)  # needs a consistency proof 9 -> 39
    w1, w2 = parse_witness_key(witness.vkey), parse_witness_key(witness2.vkey)
    policy_text = (
        f"log {signer.verifier.text}\nwitness W1 {witness.vkey}\nwitness W2 {witness2.vkey}\n"
        "group both all W1 W2\nquorum both\n"
    )
    policy = parse_policy(policy_text)
    for got, size in ((cosigned, 9), (cosigned2, 39)):
        checkpoint, _ = policy.check(got)
        assert checkpoint.size == size
    one_only = cosign(tree, cp2, note2, [])  # not cosigned at all
    with pytest.raises(PolicyError, match="quorum"):
        policy.check(one_only)
    assert parse_policy(policy_text.replace("all W1 W2", "1 W1 W2")).check(cosigned2)
    assert w1.name == "witness.example/w1" and w2.name == "witness.example/w2"
    # The stored latest checkpoint carries the cosignatures.
    assert tree.table.latest(ORIGIN).note == cosigned2
    tree.close()
    store.close()


def test_witness_refuses_a_rewritten_log_with_a_named_conflict(
    tmp_path: Path, witness: Witness
) -> None:
    """A fork shown to the witness: after it cosigned tree A (size 12), a checkpoint of a
    different log B of size 15 with a proof from 12 is refused (422: proof does not verify);
    a shorter tree gets the 409 conflict naming the size it holds."""
    signer = generate_signer(ORIGIN)
    witness.add_log(ORIGIN, signer.verifier.text)
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    fill(a, 12, user="alice")
    fill(b, 15, user="bob")
    client = WitnessClient(witness.url)
    sa, sb = SQLiteStore(a), SQLiteStore(b)
    ta, tb = LogTree(sa), LogTree(sb)
    cpa, notea = make_checkpoint(ta, signer)
    client.add_checkpoint(notea, cpa, lambda old: ta.consistency(old, cpa.size))
    cpb, noteb = make_checkpoint(tb, signer)
    with pytest.raises(WitnessRefused) as refused:
        client.add_checkpoint(noteb, cpb, lambda old: tb.consistency(old, cpb.size))
    assert refused.value.status == 422
    short = tmp_path / "c.db"
    fill(short, 5, user="carol")
    sc = SQLiteStore(short)
    tc = LogTree(sc)
    cpc, notec = make_checkpoint(tc, signer)
    fresh = WitnessClient(witness.url)  # knows nothing: starts at old 0, learns 12 from 409
    with pytest.raises(WitnessRefused, match="different") as conflict:
        fresh.add_checkpoint(notec, cpc, lambda old: tc.consistency(old, cpc.size))
    assert conflict.value.status == 409
    for t, s in ((ta, sa), (tb, sb), (tc, sc)):
        t.close()
        s.close()


def test_background_checkpointer_and_cli_get_cosignatures(tmp_path: Path, witness: Witness) -> None:
    """configure-style Checkpointer(witnesses=...) and `checkpoint --witness URL` both store
    cosigned checkpoints; verify-bundle --policy demands the witness."""
    signer = generate_signer(ORIGIN)
    write_signer(tmp_path / "k", signer)
    witness.add_log(ORIGIN, signer.verifier.text)
    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    cpr = Checkpointer(
        store,
        signer,
        every_records=5,
        every_seconds=None,
        witnesses=[WitnessClient(witness.url)],
        poll=0.05,
    )
    store.append([entry(i) for i in range(5)])
    assert cpr.wait_for(5)
    cpr.close()
    w = parse_witness_key(witness.vkey)
    policy = tmp_path / "policy"
    policy.write_text(f"log {signer.verifier.text}\nwitness W {witness.vkey}\nquorum W\n")
    from coworker.audit.checkpoint import verify_cosignature

    _, note = open_checkpoint(LogTree(store).table.latest(ORIGIN).note, signer.verifier)
    assert verify_cosignature(note, w) is not None
    store.append([entry(i) for i in range(5, 9)])
    store.close()
    url = f"sqlite:///{db}"
    out = tmp_path / "cp"
    assert (
        main(
            [
                "audit",
                "checkpoint",
                "--url",
                url,
                "--key",
                str(tmp_path / "k"),
                "--witness",
                witness.url,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    pub = str(tmp_path / "k.pub")
    assert (
        main(
            [
                "audit",
                "verify",
                "--url",
                url,
                "--key",
                pub,
                "--checkpoint",
                str(out),
                "--policy",
                str(policy),
            ]
        )
        == 0
    )
    bundle = tmp_path / "bundle"
    assert main(["audit", "export", "--out", str(bundle), "--url", url, "--key", pub]) == 0
    assert main(["audit", "verify-bundle", str(bundle), "--policy", str(policy)]) == 0
    strict = tmp_path / "strict"
    other = generate_signer("witness.example/other")
    import base64

    other_vkey = (
        f"{other.name}+{0:08x}+" + base64.b64encode(b"\x04" + other.verifier.public).decode()
    )
    from coworker.audit.checkpoint import cosignature_key_id

    kid = cosignature_key_id(other.name, other.verifier.public)
    other_vkey = other_vkey.replace("+00000000+", f"+{kid:08x}+")
    strict.write_text(
        f"log {signer.verifier.text}\nwitness W {witness.vkey}\nwitness X {other_vkey}\n"
        "group g all W X\nquorum g\n"
    )
    assert main(["audit", "verify-bundle", str(bundle), "--policy", str(strict)]) == 1


@pytest.mark.parametrize(
    "text",
    [
        "quorum none\nquorum none\n",
        "witness A nokey\nquorum A\n",
        "group g 1 A\nquorum g\n",
        "quorum A\n",
        "log x\nquorum none\n",
        "",
    ],
)
def test_malformed_policies_are_refused(text: str) -> None:
    """Two quorums, bad keys, undefined names and a missing quorum are PolicyErrors."""
    with pytest.raises(PolicyError):
        parse_policy(text)
