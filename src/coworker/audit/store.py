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
* ``iter_from`` yields records in ``seq`` order with their bytes exactly as hashed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["AuditStore", "Head", "InMemoryStore", "StoredRecord"]


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

        return json.loads(self.body)


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

    def close(self) -> None:
        """Nothing to release."""
