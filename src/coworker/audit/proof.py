"""C2SP ``tlog-proof@v1`` files (https://c2sp.org/tlog-proof) for audit records, and their
verification with nothing but the record bytes, the proof and the log's verifier key.

A proof file::

    c2sp.org/tlog-proof@v1
    index <zero-based leaf index = seq - 1>
    <base64 inclusion proof hash, the leaf's sibling first>
    ...
    <blank line>
    <the signed checkpoint, verbatim>

:func:`verify_record_proof` is deliberately small and depends on no store: an auditor can
read it, and it is what ``coworker audit verify-bundle`` runs for every record.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from coworker.audit.checkpoint import Checkpoint, CheckpointError, Note, open_checkpoint
from coworker.audit.keys import Verifier
from coworker.audit.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion

__all__ = [
    "HEADER",
    "TlogProof",
    "encode_consistency",
    "encode_proof",
    "parse_proof",
    "verify_checkpoint_consistency",
    "verify_record_proof",
]

HEADER: Final = "c2sp.org/tlog-proof@v1"


@dataclass(frozen=True)
class TlogProof:
    """A parsed tlog-proof: leaf index, inclusion proof, the signed checkpoint, extra data."""

    index: int
    hashes: tuple[bytes, ...]
    checkpoint: bytes
    extra: bytes | None = None


def encode_proof(
    index: int, hashes: Sequence[bytes], checkpoint: bytes, extra: bytes | None = None
) -> bytes:
    """The ``.tlog-proof`` bytes."""
    lines = [HEADER]
    if extra is not None:
        lines.append("extra " + base64.b64encode(extra).decode())
    lines.append(f"index {index}")
    lines += [base64.b64encode(h).decode() for h in hashes]
    return ("\n".join(lines) + "\n\n").encode() + checkpoint


def _b64_hash(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProofError(f"{what} is not base64") from None
    if len(raw) != 32 or base64.b64encode(raw).decode() != text:
        raise ProofError(f"{what} is not the base64 of a 32-byte hash")
    return raw


def parse_proof(data: bytes) -> TlogProof:
    """Parse a ``tlog-proof@v1`` file strictly (nothing before the header, no stray lines).

    Raises:
        ProofError: not a tlog-proof.
    """
    head, sep, checkpoint = data.partition(b"\n\n")
    if not sep:
        raise ProofError("tlog-proof: no blank line before the checkpoint")
    try:
        lines = head.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise ProofError("tlog-proof: non-ASCII bytes before the checkpoint") from None
    if lines[0] != HEADER:
        raise ProofError(f"tlog-proof: first line is {lines[0][:40]!r}, not {HEADER!r}")
    at = 1
    extra = None
    if at < len(lines) and lines[at].startswith("extra "):
        try:
            extra = base64.b64decode(lines[at][6:], validate=True)
        except (binascii.Error, ValueError):
            raise ProofError("tlog-proof: the extra line is not base64") from None
        at += 1
    if at >= len(lines) or not lines[at].startswith("index "):
        raise ProofError("tlog-proof: no index line")
    digits = lines[at][6:]
    if (
        not digits.isascii()
        or not digits.isdigit()
        or (digits != "0" and digits.startswith("0"))
        or len(digits) > 20
        or int(digits) >= 2**64
    ):
        raise ProofError(
            f"tlog-proof: index {digits[:24]!r} is not a uint64 decimal without leading zeros"
        )
    hashes = tuple(
        _b64_hash(line, f"tlog-proof hash {i}") for i, line in enumerate(lines[at + 1 :])
    )
    return TlogProof(int(digits), hashes, checkpoint, extra)


def verify_record_proof(
    record: bytes, proof: bytes, verifier: Verifier, *, seq: int | None = None
) -> tuple[Checkpoint, Note]:
    """Check that ``record`` (its canonical bytes) is in the log ``verifier`` signs for.

    Steps (tlog-proof "Verifying"): the leaf hash is ``SHA-256(0x00 || record)``; the
    checkpoint must be signed by ``verifier`` for its own origin; the inclusion proof must
    lead from the leaf at the proof's index to the checkpoint's root.

    Args:
        record: the record's canonical bytes (exactly as hashed into the log).
        proof: the ``.tlog-proof`` file bytes.
        verifier: the log's verifier key, obtained by the auditor out of band.
        seq: the record's seq, when known: the proof must be for index ``seq - 1``.

    Returns:
        The verified checkpoint and its note (for witness cosignatures).

    Raises:
        ProofError: the proof does not hold (a message naming what fails).
    """
    parsed = parse_proof(proof)
    if seq is not None and parsed.index != seq - 1:
        raise ProofError(f"proof is for index {parsed.index}, not record {seq} (index {seq - 1})")
    try:
        checkpoint, note = open_checkpoint(parsed.checkpoint, verifier)
    except CheckpointError as exc:
        raise ProofError(f"checkpoint: {exc}") from None
    verify_inclusion(
        parsed.index, checkpoint.size, leaf_hash(record), parsed.hashes, checkpoint.root
    )
    return checkpoint, note


def encode_consistency(old: Checkpoint, new: Checkpoint, hashes: Sequence[bytes]) -> str:
    """A consistency proof as text: ``old <size> <root>``, ``new <size> <root>``, hashes."""
    lines = [
        f"old {old.size} {base64.b64encode(old.root).decode()}",
        f"new {new.size} {base64.b64encode(new.root).decode()}",
        *(base64.b64encode(h).decode() for h in hashes),
    ]
    return "\n".join(lines) + "\n"


def verify_checkpoint_consistency(
    old: Checkpoint, new: Checkpoint, hashes: Sequence[bytes]
) -> None:
    """Check that checkpoint ``new`` extends ``old`` (RFC 9162 consistency proof).

    Raises:
        ProofError: it does not: a fork, or a rewritten or truncated log.
    """
    if old.origin != new.origin:
        raise ProofError(f"checkpoints of two logs ({old.origin!r}, {new.origin!r})")
    if old.size == 0:
        return
    if new.size < old.size:
        raise ProofError(f"tree size {new.size} is smaller than the earlier {old.size}")
    verify_consistency(old.size, new.size, old.root, new.root, hashes)
