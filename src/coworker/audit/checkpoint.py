"""C2SP signed notes and tlog checkpoints: make, sign, parse and verify.

Specs followed, to the letter (so that Go's ``golang.org/x/mod/sumdb/note`` and every other
C2SP verifier accept what we write, and we accept what they write):

* signed-note v1.0.0 (https://c2sp.org/signed-note): a UTF-8 text with no control character
  but newline, ending in a newline; a blank line; one or more lines
  ``— <name> <base64(4-byte key id || signature)>``. Unknown keys are ignored; a known key
  whose signature fails rejects the whole note, and so does a known key signing twice; no
  verified known signature rejects it; at most 100 signatures are parsed (as Go's
  ``note.Open``).
* tlog-checkpoint v1.0.0 (https://c2sp.org/tlog-checkpoint): note text ``<origin>\\n<tree
  size, decimal, no leading zero>\\n<base64 RFC 6962 root>\\n`` plus optional non-empty
  extension lines. Our key name is the origin.
* tlog-cosignature v1.0.0 (https://c2sp.org/tlog-cosignature): witness cosignatures are
  signature type 0x04 over ``cosignature/v1\\ntime <t>\\n<checkpoint text>``, encoded as key id ||
  8-byte big-endian timestamp || Ed25519 signature (:func:`verify_cosignature`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from coworker.audit.keys import Signer, Verifier, is_valid_name

__all__ = [
    "ALG_COSIGNATURE",
    "Checkpoint",
    "CheckpointError",
    "Note",
    "NoteSignature",
    "chain_origin",
    "chain_signer",
    "chain_verifier",
    "cosignature_key_id",
    "heads_note",
    "open_checkpoint",
    "open_heads",
    "open_note",
    "parse_checkpoint",
    "parse_note",
    "sign_checkpoint",
    "sign_note",
    "verify_cosignature",
]

_SIG_PREFIX: Final = "\u2014 "  # em dash, space
_MAX_SIGNATURES: Final = 100
_MAX_SIZE: Final = 2**64 - 1
ALG_COSIGNATURE: Final = 0x04
"""Signature type byte of timestamped Ed25519 checkpoint cosignatures (tlog-cosignature)."""


class CheckpointError(ValueError):
    """A note or checkpoint is malformed, unsigned, badly signed, or for another origin."""


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, key id and the signature bytes after the key id."""

    name: str
    key_id: int
    signature: bytes

    @property
    def line(self) -> str:
        """The encoded line (with its newline)."""
        blob = struct.pack(">I", self.key_id) + self.signature
        return f"{_SIG_PREFIX}{self.name} {base64.b64encode(blob).decode()}\n"


@dataclass(frozen=True)
class Note:
    """A parsed signed note: its text (ending in a newline) and its signature lines."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def encode(self) -> bytes:
        """The note as bytes: text, blank line, signature lines."""
        return (self.text + "\n" + "".join(s.line for s in self.signatures)).encode()


def _b64(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise CheckpointError(f"not valid base64: {text[:40]!r}") from None
    if base64.b64encode(raw).decode() != text:
        # Non-zero padding bits: the same bytes under another spelling. Go tolerates it; we
        # refuse, so that no bit of a note or proof can change without it being rejected.
        raise CheckpointError(f"not canonical base64: {text[:40]!r}")
    return raw


def parse_note(message: bytes) -> Note:
    """Split a signed note into text and signatures without verifying anything.

    Raises:
        CheckpointError: the note is malformed (``note.Open``'s "malformed note").
    """
    try:
        decoded = message.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("malformed note: not UTF-8") from None
    if any(c < " " and c != "\n" for c in decoded):
        raise CheckpointError("malformed note: a control character other than newline")
    split = decoded.rfind("\n\n")
    if split < 0:
        raise CheckpointError("malformed note: no blank line before the signatures")
    text, block = decoded[: split + 1], decoded[split + 2 :]
    if not block or not block.endswith("\n"):
        raise CheckpointError("malformed note: no signature lines, or no final newline")
    sigs: list[NoteSignature] = []
    for line in block[:-1].split("\n"):
        if not line.startswith(_SIG_PREFIX):
            raise CheckpointError(f"malformed note: {line[:40]!r} is not a signature line")
        name, _, encoded = line[len(_SIG_PREFIX) :].partition(" ")
        raw = _b64(encoded) if encoded else b""
        if not is_valid_name(name) or len(raw) < 5:
            raise CheckpointError(f"malformed note: bad signature line {line[:60]!r}")
        if len(sigs) == _MAX_SIGNATURES:
            raise CheckpointError(f"malformed note: more than {_MAX_SIGNATURES} signatures")
        sigs.append(NoteSignature(name, struct.unpack(">I", raw[:4])[0], raw[4:]))
    return Note(text, tuple(sigs))


def sign_note(text: str, signers: Sequence[Signer], keep: Iterable[NoteSignature] = ()) -> bytes:
    """Sign ``text`` (which must end in a newline) with each signer.

    Args:
        text: the note text.
        signers: Ed25519 signers.
        keep: existing signatures to keep (those of the same keys are replaced).

    Returns:
        The encoded note.
    """
    if not text.endswith("\n") or "\n\n" in "\n" + text:
        # Go refuses text without a final newline; a blank line inside it would make the
        # signature block ambiguous for our own checkpoints (they never contain one).
        raise CheckpointError("note text must end in a newline and contain no blank line")
    mine = {(s.name, s.key_id) for s in signers}
    sigs = [s for s in keep if (s.name, s.key_id) not in mine]
    body = text.encode()
    sigs += [NoteSignature(s.name, s.key_id, s.sign(body)) for s in signers]
    return Note(text, tuple(sigs)).encode()


def open_note(message: bytes, verifiers: Sequence[Verifier]) -> tuple[Note, list[Verifier]]:
    """Parse a note and verify it as ``note.Open`` does.

    Returns:
        The note and the verifiers whose signatures verified (at least one).

    Raises:
        CheckpointError: malformed, a known key's signature fails, or no known key signed.
    """
    note = parse_note(message)
    known = {(v.name, v.key_id): v for v in verifiers}
    body = note.text.encode()
    good: list[Verifier] = []
    seen: set[tuple[str, int]] = set()
    for sig in note.signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            continue  # unknown keys are ignored (witnesses, rotated keys)
        if (sig.name, sig.key_id) in seen:
            # As note.Open (errMalformedNote): a second signature of a known key would
            # otherwise pass unverified, so a bit flip in it would not be noticed.
            raise CheckpointError(f"malformed note: key {sig.name}+{sig.key_id:08x} signs twice")
        seen.add((sig.name, sig.key_id))
        if len(sig.signature) != 64 or not verifier.verify(body, sig.signature):
            raise CheckpointError(f"invalid signature for key {sig.name}+{sig.key_id:08x}")
        good.append(verifier)
    if not good:
        names = ", ".join(f"{v.name}+{v.key_id:08x}" for v in verifiers) or "none given"
        raise CheckpointError(f"note has no verifiable signature (known keys: {names})")
    return note, good


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: origin, tree size, root hash (and rarely extension lines).

    Attributes:
        origin: the log's identity (our key name).
        size: number of leaves (records).
        root: the 32-byte RFC 6962 root hash.
        extensions: optional extra lines (not used by coworker; kept when parsed).
    """

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The checkpoint note text."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        return "\n".join([*lines, *self.extensions]) + "\n"


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse checkpoint note text (not the signatures).

    Raises:
        CheckpointError: not a tlog-checkpoint body.
    """
    if not text.endswith("\n"):
        raise CheckpointError("checkpoint text must end in a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or any(not line for line in lines):
        raise CheckpointError("a checkpoint has at least three non-empty lines")
    origin, size_text, root_text = lines[:3]
    if (
        not size_text.isascii()
        or not size_text.isdigit()
        or (size_text != "0" and size_text.startswith("0"))
    ):
        raise CheckpointError(f"tree size {size_text!r} is not a decimal without leading zeros")
    if len(size_text) > 20 or int(size_text) > _MAX_SIZE:
        # A uint64, as Go's tlog parses it; a 5,000-digit size made int() raise ValueError.
        raise CheckpointError(f"tree size {size_text[:24]}... is larger than 2**64 - 1")
    root = _b64(root_text)
    if len(root) != 32 or base64.b64encode(root).decode() != root_text:
        raise CheckpointError("the root hash is not the base64 of 32 bytes")
    return Checkpoint(origin, int(size_text), root, tuple(lines[3:]))


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> bytes:
    """The signed note of ``checkpoint``; the signer's name must be its origin."""
    if signer.name != checkpoint.origin:
        raise CheckpointError(
            f"key {signer.name!r} cannot sign a checkpoint of origin {checkpoint.origin!r}"
        )
    return sign_note(checkpoint.text, [signer])


def open_checkpoint(
    message: bytes, verifier: Verifier, *, origin: str | None = None
) -> tuple[Checkpoint, Note]:
    """Verify a signed checkpoint with the log's key and parse it.

    Args:
        message: the signed note bytes.
        verifier: the log's verifier key; its name must be the checkpoint's origin.
        origin: the origin expected (default: the key's name).

    Returns:
        The checkpoint and the note (whose other signatures may be witness cosignatures).

    Raises:
        CheckpointError: malformed, not signed by ``verifier``, or for another origin.
    """
    note, _ = open_note(message, [verifier])
    checkpoint = parse_checkpoint(note.text)
    expected = origin if origin is not None else verifier.name
    if checkpoint.origin != expected:
        raise CheckpointError(f"checkpoint is for origin {checkpoint.origin!r}, not {expected!r}")
    return checkpoint, note


def cosignature_key_id(name: str, public: bytes) -> int:
    """Key id of a tlog-cosignature Ed25519 key: ``SHA-256(name || 0x0A || 0x04 || key)[:4]``."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ALG_COSIGNATURE]) + public).digest()
    return int.from_bytes(digest[:4], "big")


def cosigned_message(checkpoint_text: str, timestamp: int) -> bytes:
    """The bytes a witness signs (tlog-cosignature v1): header, time line, checkpoint text."""
    return f"cosignature/v1\ntime {timestamp}\n{checkpoint_text}".encode()


def verify_cosignature(note: Note, witness: Verifier) -> int | None:
    """The timestamp of ``witness``'s valid cosignature on the checkpoint in ``note``.

    ``witness`` carries the witness's name and Ed25519 public key; its key id is recomputed
    for signature type 0x04.

    Returns:
        The cosignature's timestamp (seconds since the epoch), or ``None`` when the witness
        did not cosign.

    Raises:
        CheckpointError: the witness's cosignature is present but does not verify.
    """
    kid = cosignature_key_id(witness.name, witness.public)
    for sig in note.signatures:
        if sig.name != witness.name or sig.key_id != kid:
            continue
        if len(sig.signature) != 72:
            raise CheckpointError(f"cosignature of {witness.name} is not 8 + 64 bytes")
        (timestamp,) = struct.unpack(">Q", sig.signature[:8])
        if not witness.verify(cosigned_message(note.text, timestamp), sig.signature[8:]):
            raise CheckpointError(f"invalid cosignature for witness {witness.name}")
        return int(timestamp)
    return None


# -- several chains (docs/proofs.md "Checkpoints over several chains") ----------------------

HEADS_HEADER: Final = "coworker-audit-heads/v1"
"""Second line of a heads note: never a tree size, so a heads note is never a checkpoint."""


def chain_origin(origin: str, chain: str) -> str:
    """The origin of ``chain``'s checkpoints: ``origin`` for the default chain, else
    ``<origin>/chain/<chain>`` (a C2SP origin names exactly one tree)."""
    from coworker.audit.chain import check_chain_name

    return origin if not chain else f"{origin}/chain/{check_chain_name(chain)}"


def chain_signer(signer: Signer, chain: str) -> Signer:
    """``signer``'s Ed25519 key under ``chain``'s origin (same key, the name and id differ)."""
    from coworker.audit.keys import ALG_ED25519, key_id

    name = chain_origin(signer.name, chain)
    if name == signer.name:
        return signer
    public = signer.verifier.public
    return Signer(name, key_id(name, ALG_ED25519, public), signer.seed)


def chain_verifier(verifier: Verifier, chain: str) -> Verifier:
    """The verifier key of ``chain``'s checkpoints, derived from the store's verifier key."""
    from coworker.audit.keys import ALG_ED25519, key_id

    name = chain_origin(verifier.name, chain)
    if name == verifier.name:
        return verifier
    return Verifier(name, key_id(name, ALG_ED25519, verifier.public), verifier.public)


def heads_note(signer: Signer, heads: Mapping[str, tuple[int, bytes]]) -> bytes:
    """A signed note listing every chain's tree: ``chain -> (size, root)``.

    Text: ``<origin>``, ``coworker-audit-heads/v1``, then one line per chain by name (the
    default chain as ``-``): ``<chain> <size> <base64 root>``. Signed under the store's origin.
    """
    from coworker.audit.chain import check_chain_name

    lines = [signer.name, HEADS_HEADER]
    for chain in sorted(heads, key=lambda c: (c != "", c)):
        size, root = heads[chain]
        if size < 0 or len(root) != 32:
            raise CheckpointError(f"chain {chain!r}: bad tree ({size}, {len(root)}-byte root)")
        lines.append(f"{check_chain_name(chain) or '-'} {size} {base64.b64encode(root).decode()}")
    return sign_note("\n".join(lines) + "\n", [signer])


def open_heads(message: bytes, verifier: Verifier) -> dict[str, tuple[int, bytes]]:
    """Verify a heads note signed by ``verifier`` and return ``chain -> (size, root)``.

    Raises:
        CheckpointError: malformed, badly signed, for another origin, or a chain listed twice.
    """
    from coworker.audit.chain import check_chain_name

    note, _ = open_note(message, [verifier])
    lines = note.text.rstrip("\n").split("\n")
    if len(lines) < 2 or lines[0] != verifier.name or lines[1] != HEADS_HEADER:
        raise CheckpointError(f"not a heads note of {verifier.name!r}")
    heads: dict[str, tuple[int, bytes]] = {}
    for line in lines[2:]:
        parts = line.split(" ")
        if len(parts) != 3 or not parts[1].isdigit() or (parts[1] != "0" and parts[1][0] == "0"):
            raise CheckpointError(f"malformed heads line {line[:60]!r}")
        chain = "" if parts[0] == "-" else parts[0]
        try:
            check_chain_name(chain)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        root = _b64(parts[2])
        if chain in heads or len(root) != 32:
            raise CheckpointError(f"malformed heads line {line[:60]!r}")
        heads[chain] = (int(parts[1]), root)
    return heads
