"""Signed notes, keys and checkpoints against the published vectors of C2SP signed-note and
golang.org/x/mod/sumdb/note (note_test.go, commit fe2ec04f7c3c), and every mangling rejected."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from coworker.audit import keys
from coworker.audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    open_checkpoint,
    open_note,
    parse_checkpoint,
    parse_note,
    sign_checkpoint,
    sign_note,
)
from coworker.audit.keys import KeyFormatError

# golang.org/x/mod/sumdb/note note_test.go
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqf"
    "qdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTG"
    "wnWLox33WWd1RvMc+QQ=\n"
)
# C2SP signed-note.md "Example"
C2SP_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
C2SP_NOTE = (
    "This is an example message.\n\n\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfX"
    "ppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)


def test_go_signer_key_signs_exactly_the_go_signature() -> None:
    """Our Ed25519 signing with Go's fixed signer key yields Go's published note bytes."""
    signer = keys.parse_signer(PETER_SKEY)
    assert signer.text == PETER_SKEY
    assert signer.verifier.text == PETER_VKEY
    assert sign_note(TEXT, [signer]).decode() == TEXT + "\n" + PETER_SIG


def test_c2sp_example_note_verifies() -> None:
    """The signed-note spec's example note opens with its example verifier key."""
    note, good = open_note(C2SP_NOTE.encode(), [keys.parse_verifier(C2SP_VKEY)])
    assert note.text == "This is an example message.\n"
    assert [v.name for v in good] == ["example.com/foo"]


def test_unknown_signatures_are_ignored_known_ones_verified() -> None:
    """Go's TestOpen cases: one of two keys known, both known, none known."""
    peter, enoch = keys.parse_verifier(PETER_VKEY), keys.parse_verifier(ENOCH_VKEY)
    msg = (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    assert open_note(msg, [peter])[1] == [peter]
    assert open_note(msg, [peter, enoch])[1] == [peter, enoch]
    with pytest.raises(CheckpointError, match="no verifiable signature"):
        open_note(msg, [])


def test_a_known_keys_bad_signature_rejects_the_note() -> None:
    """A corrupted signature of a known key is an error, not an ignored line."""
    bad = TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(CheckpointError, match="invalid signature"):
        open_note(bad.encode(), [keys.parse_verifier(PETER_VKEY)])


@pytest.mark.parametrize(
    "msg",
    [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT + "\n" + "\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2"
        "pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG * 101,
    ],
)
def test_malformed_notes_are_rejected(msg: str) -> None:
    """Go's "malformed note" inputs are malformed here too."""
    with pytest.raises(CheckpointError):
        open_note(msg.encode(), [keys.parse_verifier(PETER_VKEY)])


def test_invalid_utf8_is_malformed() -> None:
    """A note that is not UTF-8 is rejected."""
    with pytest.raises(CheckpointError, match="UTF-8"):
        parse_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode())


def test_every_substring_and_byte_change_of_a_verifier_key_is_rejected() -> None:
    """As Go's TestNewVerifier: proper substrings and +1 on any byte never parse."""
    b = PETER_VKEY
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(KeyFormatError):
                    keys.parse_verifier(b[i:j])
    for i in range(len(b)):
        mangled = b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :]
        with pytest.raises(KeyFormatError):
            keys.parse_verifier(mangled)


def test_every_byte_change_of_a_signer_key_is_rejected() -> None:
    """As Go's TestNewSigner: +1 on any byte never parses."""
    b = PETER_SKEY
    for i in range(len(b)):
        mangled = b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :]
        with pytest.raises(KeyFormatError):
            keys.parse_signer(mangled)


def test_key_id_is_sha256_of_name_newline_type_key() -> None:
    """The key id is the first 4 bytes of SHA-256(name || 0x0A || 0x01 || pubkey)."""
    v = keys.parse_verifier(PETER_VKEY)
    assert keys.key_id(v.name, 1, v.public) == 0xC74F20A3


def test_keygen_file_is_0600_and_roundtrips(tmp_path: Path) -> None:
    """write_signer makes a 0600 file, a .pub beside it, and refuses to overwrite."""
    signer = keys.generate_signer("audit.example.com/log")
    pub = keys.write_signer(tmp_path / "k", signer)
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
    assert keys.load_signer(tmp_path / "k") == signer
    assert keys.load_verifier(pub).text == signer.verifier.text
    assert keys.load_verifier(signer.verifier.text) == signer.verifier
    with pytest.raises(KeyFormatError, match="exists"):
        keys.write_signer(tmp_path / "k", signer)
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(KeyFormatError, match="readable by others"):
        keys.load_signer(tmp_path / "k")


def test_checkpoint_roundtrip_and_spec_example_shape() -> None:
    """A signed checkpoint opens with its key and has the tlog-checkpoint layout."""
    signer = keys.generate_signer("example.com/behind-the-sofa")
    cp = Checkpoint("example.com/behind-the-sofa", 20852163, bytes(range(32)))
    msg = sign_checkpoint(cp, signer)
    lines = msg.decode().split("\n")
    assert lines[:3] == [
        "example.com/behind-the-sofa",
        "20852163",
        base64.b64encode(cp.root).decode(),
    ]
    assert lines[3] == "" and lines[4].startswith("\u2014 example.com/behind-the-sofa ")
    assert open_checkpoint(msg, signer.verifier)[0] == cp


def test_checkpoint_signed_by_another_key_or_for_another_origin_is_rejected() -> None:
    """Another key with the same name, and a key for another origin, both reject it."""
    signer = keys.generate_signer("log.example")
    msg = sign_checkpoint(Checkpoint("log.example", 3, bytes(32)), signer)
    impostor = keys.generate_signer("log.example")
    with pytest.raises(CheckpointError, match="no verifiable signature"):
        open_checkpoint(msg, impostor.verifier)
    # A key named for another origin that (hypothetically) signed this text: origin mismatch.
    other = keys.generate_signer("other.example")
    forged = sign_note(Checkpoint("log.example", 3, bytes(32)).text, [other])
    with pytest.raises(CheckpointError, match="origin"):
        open_checkpoint(forged, other.verifier)


@pytest.mark.parametrize(
    "text",
    [
        "log\n01\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "log\n-1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "log\n1\nAAAA\n",
        "log\n1\n",
        "log\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "log\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\nx\n",
        "log\n\u0661\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    ],
)
def test_malformed_checkpoint_text_is_rejected(text: str) -> None:
    """Leading zeros, negative or non-ASCII sizes, short roots, missing lines are refused."""
    with pytest.raises(CheckpointError):
        parse_checkpoint(text)


def test_a_signature_in_non_canonical_base64_is_rejected() -> None:
    """Changing the unused low bits of the last base64 digit keeps the bytes but not the
    text: refused, so every bit flip of a note is detected."""
    last = PETER_SIG.rstrip("\n")[-2]  # the digit before "="
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]
    mangled = PETER_SIG.rstrip("\n")[:-2] + twin + "=\n"
    with pytest.raises(CheckpointError, match="canonical"):
        open_note((TEXT + "\n" + mangled).encode(), [keys.parse_verifier(PETER_VKEY)])
