"""The hash chain: pure functions, no I/O, no clock.

``hash(n) = SHA-256(prev_hash(n) || body(n))`` where ``body(n)`` is the RFC 8785 canonical JSON
of record *n* (which includes its own ``seq``) and ``prev_hash(1)`` is :data:`GENESIS_PREV_HASH`,
32 zero bytes. Every store keeps ``seq``, ``prev_hash``, ``hash`` and ``body`` exactly as hashed,
so that anyone can re-run :func:`link` over the log without trusting the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from coworker.audit.record import canonical
from coworker.audit.store import Head, StoredRecord

__all__ = ["GENESIS_PREV_HASH", "link", "seal"]

GENESIS_PREV_HASH: bytes = bytes(32)
"""The ``prev_hash`` of record 1: 32 zero bytes (hex ``00…00``)."""


def link(prev_hash: bytes, body: bytes) -> bytes:
    """Return ``SHA-256(prev_hash || body)``, the hash of one record.

    Args:
        prev_hash: the hash of the previous record, or :data:`GENESIS_PREV_HASH` for seq 1.
        body: the canonical bytes of the record.

    Returns:
        The 32-byte digest.
    """
    h = hashlib.sha256(prev_hash)
    h.update(body)
    return h.digest()


def seal(
    entries: Iterable[Mapping[str, Any]],
    head: Head | None,
    payloads: Sequence[bytes | None] | None = None,
) -> list[StoredRecord]:
    """Give each entry the next ``seq``, canonicalise it and chain it onto ``head``.

    Stores call this while they hold their append lock, with the head they just read.

    Args:
        entries: record fields without ``seq`` (see :mod:`coworker.audit.record`).
        head: the current head of the log, or ``None`` when it is empty.
        payloads: the separate (erasable) payload bytes for each entry, or ``None``.

    Returns:
        The sealed records, in order, ready to be written.
    """
    seq = head.seq if head is not None else 0
    prev = head.hash if head is not None else GENESIS_PREV_HASH
    out: list[StoredRecord] = []
    for i, fields in enumerate(entries):
        seq += 1
        body = canonical({**fields, "seq": seq})
        digest = link(prev, body)
        payload = payloads[i] if payloads is not None else None
        out.append(StoredRecord(seq=seq, prev_hash=prev, hash=digest, body=body, payload=payload))
        prev = digest
    return out
