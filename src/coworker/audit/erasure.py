"""Erasable payloads: per-subject encryption, salted digests, erasure records (issue 15).

The captured input/output of a run never sits in the chained record body (see
:mod:`coworker.audit.record`). With encryption on, a store keeps it as an *envelope*::

    b"cwe1" || salt (16 bytes) || nonce (12 bytes) || AES-256-GCM(key, nonce, payload, aad)

where ``key`` is the data key of the payload's *subject* (the record's ``user_id`` unless the
store is told otherwise) and ``aad = b"cwe1" || salt || subject``. The chained body holds
``payload_digest = SHA-256(salt || payload)`` and ``payload_subject``: the salt lives with the
ciphertext, so a short value (a yes/no, a card number) cannot be guessed from the digest by
hashing candidates, and once the envelope is gone nobody can match a value against it.

Erasing a subject destroys its data key and deletes its envelopes in one transaction, and
appends an erasure record (``kind = "erasure"``) naming the subject, the reason, who erased
and the seqs concerned. The chain, checkpoints and inclusion proofs only ever covered the
bodies, so they verify unchanged; :func:`payload_states` names the erased (and purged)
payloads: ``erased (seq N, reason)``.

``cryptography`` (the ``proofs`` extra) is imported only when a payload is sealed or opened.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast, runtime_checkable

from coworker.audit.record import SCHEMA_VERSION, format_time

__all__ = [
    "CATEGORY_ERASURE",
    "CATEGORY_LEGAL_HOLD",
    "KIND_ERASURE",
    "KIND_HOLD",
    "KIND_RELEASE",
    "MAGIC",
    "Erased",
    "ErasureRefused",
    "KeyStore",
    "PayloadState",
    "append_now",
    "erased_payloads",
    "erasure_entry",
    "hold_entry",
    "is_envelope",
    "open_envelope",
    "payload_states",
    "plaintext",
    "release_entry",
    "seal_payload",
    "searched_erasures",
    "store_holds",
]

MAGIC: Final = b"cwe1"
"""First bytes of an encrypted payload envelope."""
KIND_HOLD: Final = "hold"
"""Record kind of a legal hold: a subject's or a flow's payloads must not be erased."""
KIND_RELEASE: Final = "release"
"""Record kind of the release of one or more holds (``released_seqs``)."""
CATEGORY_LEGAL_HOLD: Final = "legal-hold"
"""Category of hold and release records."""
KIND_ERASURE: Final = "erasure"
"""Record kind of an erasure: the subject's key and payloads were destroyed."""
CATEGORY_ERASURE: Final = "erasure"
"""Category of erasure records (so ``query --category erasure`` lists them)."""
NO_SUBJECT: Final = "(none)"
"""Subject of payloads whose record has no subject value (one shared, erasable key)."""

_SALT: Final = 16
_NONCE: Final = 12
_HEADER: Final = len(MAGIC) + _SALT + _NONCE


class ErasureRefused(Exception):
    """An erase that a legal hold (or a retention floor) forbids; nothing was changed."""


class MissingCryptography(ImportError):
    """``cryptography`` is needed to encrypt or decrypt payloads."""


@runtime_checkable
class KeyStore(Protocol):
    """Where per-subject data keys live; a KMS can implement this instead of the store table.

    Keys must be destroyable: :meth:`destroy` makes every payload sealed under the key
    unreadable for good.
    """

    def get_key(self, subject: str) -> bytes | None:
        """The subject's 32-byte data key, or ``None`` when it has none (or it was destroyed)."""
        ...

    def get_or_create_key(self, subject: str) -> bytes:
        """The subject's data key, created (and durably kept) if it has none."""
        ...

    def destroy_key(self, subject: str) -> bool:
        """Destroy the subject's key; ``True`` when there was one."""
        ...


def _aesgcm() -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:  # pragma: no cover - dev installs have it
        raise MissingCryptography(
            "encrypted audit payloads need the 'cryptography' package: "
            "pip install 'coworker-otel[proofs]'"
        ) from exc
    return AESGCM


@functools.lru_cache(maxsize=256)
def _cipher(key: bytes) -> Any:
    # Keyed by the key bytes (never by subject): a destroyed key is simply never asked for
    # again, while building the AES key schedule once per key saves most of the per-record
    # cost. The cache lives in this process's memory only.
    return _aesgcm()(key)


def forget_keys() -> None:
    """Drop the ciphers cached in this process (an erase calls it: no destroyed key stays)."""
    _cipher.cache_clear()


def new_key() -> bytes:
    """A fresh random 256-bit data key."""
    return os.urandom(32)


def seal_payload(
    fields: Mapping[str, Any], payload: bytes, subject: str, key: bytes
) -> tuple[dict[str, Any], bytes]:
    """Encrypt ``payload`` under ``key`` and commit the record to its salted digest.

    Returns:
        ``(fields, envelope)``: a copy of ``fields`` with ``payload_digest`` (salted) and
        ``payload_subject`` set, and the envelope bytes to store beside the record.
    """
    salt = os.urandom(_SALT)
    nonce = os.urandom(_NONCE)
    aad = MAGIC + salt + subject.encode("utf-8", "surrogatepass")
    ciphertext = _cipher(key).encrypt(nonce, payload, aad)
    out = dict(fields)
    out["payload_digest"] = hashlib.sha256(salt + payload).hexdigest()
    out["payload_subject"] = subject
    return out, MAGIC + salt + nonce + ciphertext


def is_envelope(payload: object) -> bool:
    """``True`` for stored payload bytes that are an encrypted envelope."""
    return isinstance(payload, bytes) and payload[:4] == MAGIC and len(payload) > _HEADER


def open_envelope(envelope: bytes, subject: str, key: bytes, digest: object) -> bytes | None:
    """Decrypt an envelope and check it against the record's salted ``digest``.

    Returns:
        The plaintext payload, or ``None`` when the envelope was altered, belongs to another
        subject or record, or does not match ``digest``.
    """
    from cryptography.exceptions import InvalidTag

    salt = envelope[len(MAGIC) : len(MAGIC) + _SALT]
    nonce = envelope[len(MAGIC) + _SALT : _HEADER]
    aad = MAGIC + salt + subject.encode("utf-8", "surrogatepass")
    try:
        plain: bytes = _cipher(key).decrypt(nonce, envelope[_HEADER:], aad)
    except (InvalidTag, ValueError):
        return None
    if hashlib.sha256(salt + plain).hexdigest() != digest:
        return None
    return plain


def subject_of(fields: Mapping[str, Any], subject_field: str) -> str:
    """The data-key subject of a record: its ``subject_field`` value, or :data:`NO_SUBJECT`."""
    value = fields.get(subject_field)
    return value if isinstance(value, str) and value else NO_SUBJECT


def seal_all(
    entries: Sequence[Mapping[str, Any]],
    payloads: Sequence[bytes | None],
    keys: Callable[[str], bytes],
    subject_field: str,
) -> tuple[list[Mapping[str, Any]], list[bytes | None]]:
    """:func:`seal_payload` every entry that has a payload; ``keys`` gives (or makes) keys."""
    out_entries: list[Mapping[str, Any]] = []
    out_payloads: list[bytes | None] = []
    cache: dict[str, bytes] = {}
    for fields, payload in zip(entries, payloads, strict=True):
        if payload is None or fields.get("payload_digest") is None:
            out_entries.append(fields)
            out_payloads.append(payload)
            continue
        subject = subject_of(fields, subject_field)
        key = cache.get(subject)
        if key is None:
            key = cache[subject] = keys(subject)
        sealed, envelope = seal_payload(fields, payload, subject, key)
        out_entries.append(sealed)
        out_payloads.append(envelope)
    return out_entries, out_payloads


def erasure_entry(
    subject: str, reason: str, *, by: str | None, seqs: Iterable[int]
) -> dict[str, Any]:
    """The record fields (without ``seq``) of the erasure of ``subject``'s payloads."""
    now = format_time(__import__("time").time_ns())
    return {
        "v": SCHEMA_VERSION,
        "kind": KIND_ERASURE,
        "category": CATEGORY_ERASURE,
        "operation": "erase",
        "recorded_at": now,
        "start": now,
        "erased_subject": subject,
        "reason": reason,
        "erased_by": by,
        "erased_seqs": sorted(set(seqs)),
        "user_id": None,
        "payload_digest": None,
    }


@dataclass(frozen=True, slots=True)
class Erased:
    """The result of a store's ``erase``.

    Attributes:
        record: the erasure record appended.
        seqs: the records whose payloads were destroyed.
        wal_truncated: ``False`` when another reader kept the SQLite WAL from being
            truncated (old pages may linger in ``-wal`` until the next checkpoint).
    """

    record: Any
    seqs: tuple[int, ...]
    wal_truncated: bool = True


@dataclass(frozen=True, slots=True)
class PayloadState:
    """What happened to the payload of one record.

    Attributes:
        seq: the record.
        state: ``"erased"``.
        by_seq: the erasure record's seq.
        reason: its reason.
    """

    seq: int
    state: str
    by_seq: int
    reason: str

    def describe(self) -> str:
        """``erased (seq N, reason)``."""
        return f"{self.state} (seq {self.by_seq}, {self.reason})"


def plaintext(record: Any, key_for: Callable[[str], bytes | None]) -> bytes | None:
    """The readable payload of a stored record: decrypted with its subject's key from
    ``key_for``, as stored when it is no envelope, ``None`` when erased or unreadable."""
    if record.payload is None or not is_envelope(record.payload):
        return cast("bytes | None", record.payload)
    fields = record.fields()
    subject = fields.get("payload_subject")
    key = key_for(subject) if isinstance(subject, str) else None
    if key is None:
        return None
    return open_envelope(record.payload, str(subject), key, fields.get("payload_digest"))


def erased_payloads(store: Any) -> dict[int, PayloadState]:
    """Erased payloads of ``store`` by record seq: its own
    :meth:`~coworker.audit.store.AuditStore.erased_payloads` (SQLite and PostgreSQL find the
    erasure records with an indexed ``kind`` search); a store without one is read whole."""
    own = getattr(store, "erased_payloads", None)
    if own is not None:
        found: dict[int, PayloadState] = own()
        return found
    return payload_states(store.iter_from(1))


def searched_erasures(search: Any) -> dict[int, PayloadState]:
    """Erased payloads from a store's ``search`` (the erasure and purge records only)."""
    records = sorted(
        [*search({"kind": KIND_ERASURE}), *search({"kind": "purge"})], key=lambda r: r.seq
    )
    return payload_states(records)


def payload_states(records: Iterable[Any]) -> dict[int, PayloadState]:
    """Erased payloads, by record seq, from the erasure records among ``records``.

    Args:
        records: :class:`~coworker.audit.store.StoredRecord` objects in seq order.
    """
    out: dict[int, PayloadState] = {}
    for record in records:
        if b'"erasure"' not in record.body and b'"purge"' not in record.body:
            continue  # a cheap pre-filter before decoding
        fields = record.fields()
        kind = fields.get("kind")
        if kind == KIND_ERASURE:
            state, listed = "erased", fields.get("erased_seqs")
        elif kind == "purge":  # coworker.audit.retention.KIND_PURGE
            state, listed = "purged", fields.get("purged_seqs")
        else:
            continue
        reason = str(fields.get("reason") or "")
        for seq in listed or ():
            if isinstance(seq, int):
                out.setdefault(seq, PayloadState(seq, state, record.seq, reason))
    return out


def hold_entry(
    *, subject: str | None, flow_id: str | None, reason: str, by: str | None
) -> dict[str, Any]:
    """The record fields (without ``seq``) of a legal hold on a subject or a flow."""
    if (subject is None) == (flow_id is None):
        raise ValueError("a hold covers exactly one of a subject or a flow id")
    now = format_time(__import__("time").time_ns())
    return {
        "v": SCHEMA_VERSION,
        "kind": KIND_HOLD,
        "category": CATEGORY_LEGAL_HOLD,
        "operation": "hold",
        "recorded_at": now,
        "start": now,
        "hold_subject": subject,
        "hold_flow_id": flow_id,
        "reason": reason,
        "held_by": by,
        "user_id": None,
        "payload_digest": None,
    }


def release_entry(seqs: Iterable[int], *, reason: str, by: str | None) -> dict[str, Any]:
    """The record fields (without ``seq``) releasing the holds at ``seqs``."""
    now = format_time(__import__("time").time_ns())
    return {
        "v": SCHEMA_VERSION,
        "kind": KIND_RELEASE,
        "category": CATEGORY_LEGAL_HOLD,
        "operation": "release",
        "recorded_at": now,
        "start": now,
        "released_seqs": sorted(set(seqs)),
        "reason": reason,
        "released_by": by,
        "user_id": None,
        "payload_digest": None,
    }


def active_holds(records: Iterable[Any]) -> dict[int, dict[str, Any]]:
    """Holds not released, by seq, from the hold and release records among ``records``."""
    holds: dict[int, dict[str, Any]] = {}
    released: set[int] = set()
    for record in records:
        fields = record.fields()
        if fields.get("kind") == KIND_HOLD:
            holds[record.seq] = fields
        elif fields.get("kind") == KIND_RELEASE:
            released.update(s for s in fields.get("released_seqs") or () if isinstance(s, int))
    return {seq: f for seq, f in holds.items() if seq not in released}


def store_holds(store: Any) -> dict[int, dict[str, Any]]:
    """:func:`active_holds` of a store (indexed ``kind`` search when it has one)."""
    search = getattr(store, "search", None)
    if search is None:
        return active_holds(store.iter_from(1))
    records = sorted(
        [*search({"kind": KIND_HOLD}), *search({"kind": KIND_RELEASE})], key=lambda r: r.seq
    )
    return active_holds(records)


def covering_hold(
    holds: Mapping[int, Mapping[str, Any]],
    subject: str,
    flow_subjects: Callable[[str], set[str]],
) -> tuple[int, Mapping[str, Any]] | None:
    """The first active hold that covers ``subject``: on it, or on a flow it appears in."""
    for seq, hold in sorted(holds.items()):
        if hold.get("hold_subject") == subject:
            return seq, hold
        flow = hold.get("hold_flow_id")
        if isinstance(flow, str) and subject in flow_subjects(flow):
            return seq, hold
    return None


def refuse_if_held(
    holds: Mapping[int, Mapping[str, Any]],
    subject: str,
    flow_subjects: Callable[[str], set[str]],
) -> None:
    """Raise :class:`ErasureRefused` when an active hold covers ``subject``."""
    found = covering_hold(holds, subject, flow_subjects)
    if found is None:
        return
    seq, hold = found
    what = (
        f"subject {subject!r}"
        if hold.get("hold_subject") == subject
        else f"flow {hold.get('hold_flow_id')!r}, in which {subject!r} appears"
    )
    raise ErasureRefused(
        f"erase of {subject!r} refused: legal hold seq {seq} on {what} "
        f"({hold.get('reason')}); release it first (coworker audit release)"
    )


def append_now(store: Any, entry: Mapping[str, Any]) -> Any:
    """Append one record and return it; a record that was only spooled (PostgreSQL outage)
    is an error here: an erase, hold, release or purge must be in the log before it acts.

    Raises:
        AuditUnavailable: nothing durable in the log yet (a spooled entry is shipped later).
    """
    from coworker.exceptions import AuditUnavailable

    records = store.append([entry])
    if len(records) != 1:
        raise AuditUnavailable(
            f"audit store {store}: the server is unreachable; the {entry.get('kind')} record "
            "was spooled and nothing else was done: run the command again when it is back"
        )
    return records[0]
