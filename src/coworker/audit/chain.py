"""The hash chain: pure functions, no I/O, no clock.

``hash(n) = SHA-256(prev_hash(n) || body(n))`` where ``body(n)`` is the RFC 8785 canonical JSON
of record *n* (which includes its own ``seq``) and ``prev_hash(1)`` is the chain's genesis value:
:data:`GENESIS_PREV_HASH` (32 zero bytes) for the default chain, ``SHA-256("coworker-audit-chain"
|| 0x00 || name)`` for a named chain (:func:`genesis`), so that a named chain's records, linked
from its genesis, cannot pass for another chain's. Every store keeps ``seq``, ``prev_hash``,
``hash`` and ``body`` exactly as hashed, so that anyone can re-run :func:`link` over the log
without trusting the store.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from coworker.audit.record import canonical
from coworker.audit.store import Head, StoredRecord

__all__ = [
    "DEFAULT_CHAIN",
    "GENESIS_PREV_HASH",
    "Prepared",
    "chain_from_query",
    "check_chain_name",
    "genesis",
    "link",
    "prepare",
    "seal",
    "seal_after",
]

GENESIS_PREV_HASH: bytes = bytes(32)
"""The ``prev_hash`` of record 1 of the default chain: 32 zero bytes (hex ``00…00``)."""

DEFAULT_CHAIN: Final = ""
"""The name of the default chain: every store's chain unless its URL says ``?chain=``."""

_CHAIN_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")
_GENESIS_TAG: Final = b"coworker-audit-chain\x00"


def check_chain_name(name: str) -> str:
    """Return ``name`` if it is a valid chain name, else raise ``ValueError``.

    A chain name is 1 to 48 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or a
    digit: it becomes part of a file or schema name and of a checkpoint origin line.
    """
    if name != DEFAULT_CHAIN and not _CHAIN_NAME.fullmatch(name):
        raise ValueError(
            f"chain name {name!r}: use 1-48 characters of A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit"
        )
    return name


def chain_from_query(values: Sequence[str]) -> str:
    """The chain a store URL names, from every value of its ``chain`` query parameter.

    No ``chain`` parameter is the default chain. ``chain=`` with nothing after it (most often
    a URL template whose variable was empty) and ``chain`` given twice raise ``ValueError``:
    either would otherwise route records silently to the default chain or to the last name.
    """
    if not values:
        return DEFAULT_CHAIN
    if len(values) > 1:
        raise ValueError(f"chain given {len(values)} times ({', '.join(map(repr, values))})")
    if not values[0]:
        raise ValueError(
            "chain= is empty; omit the parameter for the default chain, or name the chain"
        )
    return check_chain_name(values[0])


def genesis(chain: str = DEFAULT_CHAIN) -> bytes:
    """The ``prev_hash`` of record 1 of ``chain``.

    The default chain keeps :data:`GENESIS_PREV_HASH` (existing logs and the Go interop
    vectors are unchanged); a named chain starts from ``SHA-256("coworker-audit-chain" || 0x00
    || name)``. Every later record hashes its predecessor, so the whole chain is bound to its
    name: records moved into another chain break its links, a whole chain renamed breaks its
    genesis (``bad-genesis``).
    """
    if chain == DEFAULT_CHAIN:
        return GENESIS_PREV_HASH
    return hashlib.sha256(_GENESIS_TAG + check_chain_name(chain).encode("ascii")).digest()


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


_SEQ_MARK = b'"seq":0'


class Prepared:
    """An entry canonicalised ahead of time, with a hole where its ``seq`` goes.

    Stores prepare entries *before* taking their append lock, so that the serialized section
    only splices in the seq and hashes. The bytes are identical to ``canonical({**fields,
    "seq": seq})``: in RFC 8785 output an integer is its decimal digits, and the key
    ``"seq":`` can only appear once outside a string (quotes inside strings are escaped).

    Attributes:
        fields: the entry's fields (without ``seq``).
    """

    __slots__ = ("_after", "_before", "fields")

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.fields = fields
        template = canonical({**fields, "seq": 0})
        at = template.find(_SEQ_MARK)
        if at < 0:  # pragma: no cover - canonical() always writes the key
            raise ValueError("canonical record without a seq key")
        self._before = template[: at + len(_SEQ_MARK) - 1]
        self._after = template[at + len(_SEQ_MARK) :]

    def body(self, seq: int) -> bytes:
        """The canonical bytes of the entry with this ``seq``."""
        return b"%b%d%b" % (self._before, seq, self._after)

    @property
    def halves(self) -> tuple[bytes, bytes]:
        """The bytes before and after the seq's digits: ``body(seq) == before + digits +
        after``. A store that seals in its database (PostgreSQL's ``append()``) sends these and
        splices the seq in the same way."""
        return self._before, self._after


def prepare(entries: Iterable[Mapping[str, Any]]) -> list[Prepared]:
    """Canonicalise entries ahead of :func:`seal` (outside a store's lock)."""
    return [e if isinstance(e, Prepared) else Prepared(e) for e in entries]


def seal(
    entries: Iterable[Mapping[str, Any] | Prepared],
    head: Head | None,
    payloads: Sequence[bytes | None] | None = None,
    *,
    first_prev: bytes = GENESIS_PREV_HASH,
) -> list[StoredRecord]:
    """Give each entry the next ``seq``, canonicalise it and chain it onto ``head``.

    Stores call this while they hold their append lock, with the head they just read.

    Args:
        entries: record fields without ``seq`` (see :mod:`coworker.audit.record`), or
            :class:`Prepared` entries (canonicalised already: much less work under a lock).
        head: the current head of the log, or ``None`` when it is empty.
        payloads: the separate (erasable) payload bytes for each entry, or ``None``.
        first_prev: the chain's genesis value (:func:`genesis`), used when ``head`` is
            ``None``.

    Returns:
        The sealed records, in order, ready to be written.
    """
    if head is None:
        return seal_after(entries, 0, first_prev, payloads)
    return seal_after(entries, head.seq, head.hash, payloads)


def seal_after(
    entries: Iterable[Mapping[str, Any] | Prepared],
    seq: int,
    prev: bytes,
    payloads: Sequence[bytes | None] | None = None,
) -> list[StoredRecord]:
    """:func:`seal` onto the record ``seq`` whose hash is ``prev`` (``0`` and the genesis
    value for an empty log): for a store that has the head as a row of its own query, so
    that it builds no :class:`~coworker.audit.store.Head` per append."""
    out: list[StoredRecord] = []
    for i, fields in enumerate(entries):
        seq += 1
        if isinstance(fields, Prepared):
            body = fields.body(seq)
        else:
            body = canonical({**fields, "seq": seq})
        digest = link(prev, body)
        payload = payloads[i] if payloads is not None else None
        # Positional: the dataclass's keyword parsing costs ~2,300 instructions a record.
        out.append(StoredRecord(seq, prev, digest, body, payload))
        prev = digest
    return out
