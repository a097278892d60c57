"""The audit store interface and the in-memory store that unit tests use.

A store is an append-only, hash-chained log of audit records. Every implementation
(:class:`InMemoryStore`, ``SQLiteStore``, ``PostgresStore``) keeps the same four guarantees:

* ``append`` is atomic: all of the entries it is given are sealed and durable, or none is and
  it raises :class:`coworker.AuditUnavailable`. A store that makes entries durable first and
  seals them later (``PostgresStore`` spooling locally during an outage) returns ``[]``: the
  entries are durable, their seq and hash come when they reach the shared log.
* ``append`` is serialized with every other ``append`` on the same log (threads, processes,
  hosts): ``seq`` is gapless from 1 and the chain never forks.
* ``head`` returns the last durable record's ``(seq, hash)``; it is atomic with respect to
  ``append``.
* ``iter_from`` yields records in ``seq`` order with their bytes exactly as hashed; no read
  ever returns a row outside ``1..head`` (a row at seq 0 that someone inserted by hand is
  not a record).

A store that keeps anything besides the chained bytes (query columns, payloads, database
guards) also implements :class:`IntegrityChecked`, which ``verify`` calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from coworker.exceptions import AuditUnavailable

__all__ = [
    "COLUMN_MISMATCH",
    "DEDUP_MISMATCH",
    "GUARD",
    "MALFORMED",
    "OUT_OF_RANGE",
    "PAYLOAD_MISMATCH",
    "AuditStore",
    "Finding",
    "Head",
    "InMemoryStore",
    "IntegrityChecked",
    "StoreNotFound",
    "StoredRecord",
]

COLUMN_MISMATCH: Final = "column-mismatch"
"""A query column (``user_id``, ``flow_id``...) differs from the hashed body: queries that
filter on it would hide or misattribute the record."""
OUT_OF_RANGE: Final = "out-of-range"
"""A row whose seq is outside ``1..head`` (seq 0 or negative): never appended by a store."""
GUARD: Final = "guard"
"""An append-only guard (trigger, constraint, lock function) is missing or altered."""
MALFORMED: Final = "malformed"
"""A chained body that is not a JSON object carrying its own position as ``seq``: the hash
links hold (the writer hashed what it inserted), but no coworker store wrote it (a writer
role's crafted INSERT or ``append()`` call)."""
DEDUP_MISMATCH: Final = "dedup-mismatch"
"""A row whose dedup key is not its own body's (:mod:`coworker.audit.dedup`): a row inserted
by hand with the key of another record, which would have that record dropped as a
duplicate."""
PAYLOAD_MISMATCH: Final = "payload-mismatch"
"""A stored payload does not hash to the ``payload_digest`` of its chained record."""

MAX_FINDINGS: Final = 100
"""Findings of one kind a store reports at most (the count of the rest is in the last one)."""


class StoreNotFound(AuditUnavailable):
    """A read-only open found no audit store where the URL points (no file, no schema).

    Read commands never create a store, so a mistyped path or schema name is this error
    (``coworker audit ...`` exits 2), not a new, empty log that verifies as intact.
    """


@dataclass(frozen=True, slots=True)
class Head:
    """The newest record of a log: compare it with a saved head to detect a cut-off tail."""

    seq: int
    hash: bytes

    @property
    def hash_hex(self) -> str:
        """The head hash as lower-case hex."""
        return self.hash.hex()


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as the store keeps it.

    Attributes:
        seq: position in the log, gapless from 1.
        prev_hash: hash of record ``seq - 1`` (32 zero bytes for seq 1).
        hash: ``SHA-256(prev_hash || body)``.
        body: the RFC 8785 canonical JSON bytes exactly as hashed.
        payload: the redacted captured input/output, kept outside the hashed body (the body
            holds its digest), so that it can be erased without breaking the chain.
    """

    seq: int
    prev_hash: bytes
    hash: bytes
    body: bytes
    payload: bytes | None = field(default=None, compare=False)

    def fields(self) -> dict[str, Any]:
        """Decode the body into a dict."""
        import json

        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem outside the hash links, found by :meth:`IntegrityChecked.integrity_findings`.

    Attributes:
        kind: :data:`COLUMN_MISMATCH`, :data:`OUT_OF_RANGE`, :data:`GUARD` or
            :data:`PAYLOAD_MISMATCH`.
        seq: the record concerned, or ``None`` (a guard).
        detail: one human-readable sentence.
    """

    kind: str
    seq: int | None
    detail: str


@runtime_checkable
class IntegrityChecked(Protocol):
    """A store that can check what the hash chain does not cover."""

    def integrity_findings(self, head: Head | None) -> list[Finding]:
        """Everything wrong besides the chain links, for records ``1..head.seq``.

        Checks that every query column equals the value in the hashed body, that every
        stored payload hashes to its record's ``payload_digest`` (an erased payload is
        fine), that no row lies outside ``1..head``, and that the append-only guards are
        present and unaltered. Reads only.

        Args:
            head: the last record whose links verified (``None``: an empty or broken log).
        """
        ...


def store_chain(store: Any) -> str:
    """The chain ``store`` holds: its ``chain`` attribute, else the default chain ``""``."""
    chain = getattr(store, "chain", "")
    return chain if isinstance(chain, str) else ""


def first_prev(store: Any) -> bytes:
    """The ``prev_hash`` of record 1 of the chain ``store`` holds (its genesis value)."""
    from coworker.audit.chain import genesis

    return genesis(store_chain(store))


def erased_seqs(store: Any) -> frozenset[int]:
    """The seqs whose payloads an erasure or purge record of ``store`` covers."""
    from coworker.audit.erasure import erased_payloads

    return frozenset(erased_payloads(store))


def payload_finding(
    record: StoredRecord,
    fields: Mapping[str, Any],
    key_for: Callable[[str], bytes | None] | None = None,
    erased: Container[int] | None = None,
) -> Finding | None:
    """The :data:`PAYLOAD_MISMATCH` of ``record``, or ``None`` when its payload is fine.

    Args:
        record: the stored record with its payload.
        fields: its decoded body.
        key_for: the store's data keys (subject -> key or ``None``), to open an encrypted
            payload (:mod:`coworker.audit.erasure`) and check it against the salted digest.
        erased: the seqs whose payloads an erasure or purge record of the log covers; when
            given, a payload (or its key) that is gone without one is a finding. A record
            with a ``payload_digest`` committed to a payload: only a recorded erasure may
            take it away, not a ``DELETE`` by whoever owns the database.
    """
    import hashlib

    if record.payload is None:
        if (
            erased is not None
            and fields.get("payload_digest") is not None
            and record.seq not in erased
        ):
            return Finding(
                PAYLOAD_MISMATCH,
                record.seq,
                f"seq {record.seq}: the record commits to a payload but none is stored, "
                "and no erasure or purge record covers it (payload deleted)",
            )
        return None  # erased (or never captured): the digest stays in the body
    from coworker.audit import erasure

    if erasure.is_envelope(record.payload):
        subject = fields.get("payload_subject")
        if not isinstance(subject, str):
            return Finding(
                PAYLOAD_MISMATCH,
                record.seq,
                f"seq {record.seq}: an encrypted payload is stored but the record was not "
                "sealed with one (payload moved or added)",
            )
        key = key_for(subject) if key_for is not None else None
        if key is None:
            if erased is not None and key_for is not None and record.seq not in erased:
                return Finding(
                    PAYLOAD_MISMATCH,
                    record.seq,
                    f"seq {record.seq}: the payload's data key is gone and no erasure record "
                    "covers it (key deleted)",
                )
            return None  # the key was destroyed (erased): nothing can be read or checked
        digest = fields.get("payload_digest")
        if erasure.open_envelope(record.payload, subject, key, digest) is not None:
            return None
        return Finding(
            PAYLOAD_MISMATCH,
            record.seq,
            f"seq {record.seq}: the encrypted payload does not open to the record's salted "
            "digest (payload edited, swapped or moved)",
        )
    if "payload_digest" not in fields:
        # Not a record format that commits to its payload (hand-made entries): nothing to
        # check it against. Every record coworker makes has the field (null: no payload).
        return None
    digest = fields["payload_digest"]
    data = record.payload
    if not isinstance(data, bytes):  # rewritten as TEXT (or a number) by hand
        data = str(data).encode("utf-8", "surrogatepass")
    actual = hashlib.sha256(data).hexdigest()
    if digest == actual:
        return None
    if digest is None:
        return Finding(
            PAYLOAD_MISMATCH,
            record.seq,
            f"seq {record.seq}: a payload is stored but the record was written without one",
        )
    return Finding(
        PAYLOAD_MISMATCH,
        record.seq,
        f"seq {record.seq}: the stored payload hashes to {actual[:16]}..., the record says "
        f"{str(digest)[:16]}... (payload edited)",
    )


@runtime_checkable
class AuditStore(Protocol):
    """What the exporter, ingest endpoint and CLI need from a backend."""

    def append(
        self,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None = None,
    ) -> list[StoredRecord]:
        """Seal and durably write entries (see the module docstring for the guarantees).

        Raises:
            coworker.AuditUnavailable: nothing was written.
        """
        ...

    def head(self) -> Head | None:
        """The last durable record, or ``None`` for an empty log."""
        ...

    def iter_from(self, seq: int = 1) -> Iterator[StoredRecord]:
        """Records with ``seq >= seq`` in order."""
        ...

    def close(self) -> None:
        """Release connections and files; idempotent."""
        ...

    def tree_table(self) -> Any:
        """Where this store's Merkle tree is kept (:class:`coworker.audit.tlog.TreeTable`):
        the proofs code (``LogTree``, checkpoints) asks the store, never guesses its type."""
        ...

    def erased_payloads(self) -> dict[int, Any]:
        """Erased payloads by record seq (:class:`coworker.audit.erasure.PayloadState`), from
        the erasure and purge records of the log."""
        ...

    def chains(self) -> list[str]:
        """The chains this store holds: the default chain ``""`` first, then named ones."""
        ...


class InMemoryStore:
    """A store in a Python list: same contract, no durability. For tests and demos."""

    def __init__(self) -> None:
        self._records: list[StoredRecord] = []
        self._lock = threading.Lock()

    def append(
        self,
        entries: Sequence[Mapping[str, Any]],
        payloads: Sequence[bytes | None] | None = None,
    ) -> list[StoredRecord]:
        """Seal and keep entries; see :class:`AuditStore`."""
        from coworker.audit.chain import seal

        with self._lock:
            sealed = seal(entries, self._head_locked(), payloads)
            self._records.extend(sealed)
            return sealed

    def _head_locked(self) -> Head | None:
        if not self._records:
            return None
        last = self._records[-1]
        return Head(last.seq, last.hash)

    def head(self) -> Head | None:
        """See :class:`AuditStore`."""
        with self._lock:
            return self._head_locked()

    def iter_from(self, seq: int = 1) -> Iterator[StoredRecord]:
        """See :class:`AuditStore`."""
        with self._lock:
            snapshot = self._records[max(seq - 1, 0) :]
        return iter(snapshot)

    def integrity_findings(self, head: Head | None) -> list[Finding]:
        """Payloads against their digests (see :class:`IntegrityChecked`)."""
        findings = []
        erased = erased_seqs(self)
        for record in self.iter_from(1):
            if head is None or record.seq > head.seq:
                break
            found = payload_finding(record, record.fields(), erased=erased)
            if found is not None:
                findings.append(found)
        return findings

    def tree_table(self) -> Any:
        """An in-memory tree table, kept as long as this store lives."""
        from coworker.audit.tlog import memory_table

        return memory_table(self)

    def erased_payloads(self) -> dict[int, Any]:
        """See :class:`AuditStore` (reads the whole log: no index)."""
        from coworker.audit.erasure import payload_states

        return payload_states(self.iter_from(1))

    def chains(self) -> list[str]:
        """One chain, the default one (an in-memory store holds no named chains)."""
        return [""]

    def close(self) -> None:
        """Nothing to release."""


def malformed_finding(seq: int, fields: Any) -> Finding | None:
    """A :data:`MALFORMED` finding when ``fields`` (a decoded body, or ``None`` when it is not
    JSON) is not an object whose ``seq`` is ``seq``, else ``None``."""
    if not isinstance(fields, dict):
        return Finding(MALFORMED, seq, f"seq {seq}: the body is not a JSON object")
    own = fields.get("seq")
    if type(own) is not int or own != seq:
        return Finding(
            MALFORMED, seq, f"seq {seq}: the body's seq is {own!r}, not its position {seq}"
        )
    return None
