"""Content-addressed dedup of ingested records and the server's conflict records: a span
delivered twice is recorded once, two different spans with one id are both kept and named."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from coworker.audit.chain import Prepared
from coworker.audit.record import (
    CATEGORY_INGEST_CONFLICT,
    KIND_OUTCOME,
    SCHEMA_VERSION,
    canonical,
    canonical_pair,
    format_time,
)
from coworker.audit.store import AuditStore
from coworker.ingest.tokens import INGEST_TOKEN_FIELD
from coworker.ingest.usage import (
    _USAGE_MARK,
    KIND_USAGE,
    USAGE_KEY_LEN,
    is_usage_key,
    usage_key,
)

_log = logging.getLogger("coworker.ingest")

# -- records made by the decoding workers ---------------------------------------------------------
QUERY_FIELDS: Final = (
    "kind", "category", "operation", "doctype", "outcome", "flow_id", "step_id", "run_id",
    "user_id", "agent_id", "trace_id", "span_id", "start", "recorded_at", "service",
    "payload_digest", INGEST_TOKEN_FIELD,
)  # fmt: skip
"""The fields a :class:`PreparedRecord` carries besides its body: what the stores copy into
query columns (and ``seal_all`` looks at), and what a token's limits are checked against."""
_QUERY_INDEX: Final = {name: i for i, name in enumerate(QUERY_FIELDS)}
_SEQ_MARK: Final = b'"seq":0'


class PreparedRecord(Prepared, Mapping[str, Any]):
    """A record canonicalised where it was decoded: its body with a hole for the ``seq``, and
    the values of :data:`QUERY_FIELDS`.

    A decoding worker sends these few bytes and strings instead of the record's fields, so
    the one process that appends neither canonicalises nor unpickles a dict per span: a store
    takes it as an already :class:`~coworker.audit.chain.Prepared` entry and splices in the
    seq. It is also the record's ``Mapping``: the query fields are at hand, any other field
    (a spool, payload encryption) is read from the body itself, which is what is chained.

    Args:
        before: the canonical bytes before the seq's digits.
        after: the canonical bytes after them.
        values: the values of :data:`QUERY_FIELDS`, in that order.
    """

    __slots__ = ("_full", "_values")

    def __init__(self, before: bytes, after: bytes, values: tuple[Any, ...]) -> None:
        self._before = before
        self._after = after
        self._values = values
        self._full: dict[str, Any] | None = None

    @classmethod
    def of(cls, fields: Mapping[str, Any]) -> PreparedRecord:
        """Canonicalise ``fields`` (a record without ``seq``, holding every query field).

        Raises:
            ValueError: a query field is missing, or a value has no canonical form.
        """
        return cls.with_digest(fields)[0]

    @classmethod
    def with_digest(cls, fields: Mapping[str, Any]) -> tuple[PreparedRecord, bytes]:
        """:meth:`of` and :func:`content_digest` of ``fields``, canonicalised once."""
        missing = [name for name in QUERY_FIELDS if name not in fields]
        if missing or "seq" in fields:
            raise ValueError(f"record without {', '.join(missing)}" if missing else "has a seq")
        body, content = canonical_pair({**fields, "seq": 0}, _NOT_CONTENT)
        at = body.find(_SEQ_MARK)
        if at < 0:  # pragma: no cover - canonical_pair always writes the key
            raise ValueError("canonical record without a seq key")
        before, after = body[: at + len(_SEQ_MARK) - 1], body[at + len(_SEQ_MARK) :]
        values = tuple(map(fields.get, QUERY_FIELDS))
        return cls(before, after, values), hashlib.sha256(content).digest()

    @property
    def parts(self) -> tuple[bytes, bytes, tuple[Any, ...]]:
        """``(before, after, values)``: what :class:`PreparedRecord` is made of again."""
        return self._before, self._after, self._values

    @property
    def fields(self) -> Mapping[str, Any]:
        """The record's fields (this mapping)."""
        return self

    @fields.setter
    def fields(self, value: Mapping[str, Any]) -> None:
        raise AttributeError("a PreparedRecord's fields are its body")

    def _parsed(self) -> dict[str, Any]:
        full = self._full
        if full is None:
            full = json.loads(self.body(0))
            del full["seq"]
            self._full = full
        return full

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (a query field without parsing the body)."""
        i = _QUERY_INDEX.get(key)
        if i is not None:
            return self._values[i]
        return self._parsed().get(key, default)

    def __getitem__(self, key: str) -> Any:
        i = _QUERY_INDEX.get(key)
        if i is not None:
            return self._values[i]
        return self._parsed()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())


# -- content-addressed dedup -----------------------------------------------------------------------
_NOT_CONTENT: Final = frozenset({"seq", "recorded_at", INGEST_TOKEN_FIELD})
_IDS_LEN: Final = 24
_KEY_LEN: Final = _IDS_LEN + 32
_CONFLICT_TAG: Final = b"coworker.ingest-conflict\x00"


def content_digest(fields: Mapping[str, Any]) -> bytes:
    """SHA-256 of a record's content: its canonical body without ``seq``, ``recorded_at`` and
    ``ingest_token`` (what differs between two deliveries of the same span)."""
    return hashlib.sha256(
        canonical({k: v for k, v in fields.items() if k not in _NOT_CONTENT})
    ).digest()


def dedup_key(ids: bytes, fields: Mapping[str, Any]) -> bytes:
    """The dedup key of an ingested record: trace id (16) + span id (8) + content digest (32).

    A resend of the same span has the same key (a duplicate); another span with the same
    ids has another key, so both are kept, and the shared 24-byte prefix finds the conflict.
    """
    return ids + content_digest(fields)


def _conflict_key(ids: bytes, digest: bytes) -> bytes:
    # One conflict record per version after the first, keyed on that version: recorded once
    # however often it is resent, and N forged versions make N records, not N^2 digests.
    # 32 bytes: never the length of a span key (24 legacy, 56 now), so a range scan over a
    # span's ids cannot return a conflict record.
    return hashlib.sha256(_CONFLICT_TAG + ids + digest).digest()


def _conflicts(
    ids: bytes, members: Mapping[bytes, int | None], token: str | None, only: Iterable[bytes]
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``(key, record)`` of the conflict records of one trace + span id for the versions in
    ``only`` (those of the request at hand): each later version named with the first one (the
    earliest seq). Versions of earlier requests got theirs then: a client sending version
    after version of one span costs one conflict record each, not a rescan of all of them.
    """
    if len(members) < 2:
        return
    first_digest, first_seq = min(members.items(), key=lambda m: (m[1] is None, m[1] or 0, m[0]))
    for digest in dict.fromkeys(only):
        if digest == first_digest or digest not in members:
            continue
        yield (
            _conflict_key(ids, digest),
            _conflict_entry(
                ids, [(first_digest, first_seq), (digest, members[digest])], len(members), token
            ),
        )


def _conflict_entry(
    ids: bytes, pair: list[tuple[bytes, int | None]], versions: int, token: str | None
) -> dict[str, Any]:
    now = format_time(time.time_ns())
    return {
        "v": SCHEMA_VERSION,
        "kind": KIND_OUTCOME,
        "recorded_at": now,
        "category": CATEGORY_INGEST_CONFLICT,
        "operation": None,
        "doctype": None,
        "name": "ingest conflict: different spans with the same trace and span id",
        "outcome": "conflict",
        "error_type": None,
        "run_id": None,
        "parent_run_id": None,
        "chain_id": None,
        "flow_type": None,
        "flow_id": None,
        "step_id": None,
        "user_id": None,
        "agent_id": None,
        "agent_name": None,
        "session_id": None,
        "conversation_id": None,
        "service": None,
        "trace_id": ids[:16].hex(),
        "span_id": ids[16:].hex(),
        "parent_span_id": None,
        "start": now,
        "end": now,
        "intent_seq": None,
        "payload_digest": None,
        # The first version and this one (seq null: not known, e.g. a spooled append).
        "conflict_seqs": [seq for _, seq in pair],
        "conflict_digests": [digest.hex() for digest, _ in pair],
        "conflict_versions": versions,
        INGEST_TOKEN_FIELD: token,
    }


def _conflict_key_of(fields: Mapping[str, Any]) -> bytes | None:
    try:
        ids = bytes.fromhex(fields["trace_id"]) + bytes.fromhex(fields["span_id"])
        digest = bytes.fromhex(fields["conflict_digests"][-1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return _conflict_key(ids, digest)


def _by_ids(keys: Iterable[bytes]) -> dict[bytes, list[bytes]]:
    """Dedup keys grouped by trace + span id: ids -> the content digests, in order."""
    grouped: dict[bytes, list[bytes]] = {}
    for key in keys:
        grouped.setdefault(key[:_IDS_LEN], []).append(key[_IDS_LEN:])
    return grouped


_Slot = tuple[bytes, int | None] | dict[bytes, int | None]
"""The versions of one span id: ``(digest, seq)`` for the usual one, a dict once there are
more (a tuple is about half the memory of a dict, and almost every span has one version)."""


def _has(slot: _Slot | None, digest: bytes) -> bool:
    if slot is None:
        return False
    if isinstance(slot, tuple):
        return slot[0] == digest
    return digest in slot


def _add(index: dict[bytes, _Slot], ids: bytes, digest: bytes, seq: int | None) -> None:
    slot = index.get(ids)
    if slot is None or (isinstance(slot, tuple) and slot[0] == digest):
        index[ids] = (digest, seq)
    elif isinstance(slot, tuple):
        index[ids] = {slot[0]: slot[1], digest: seq}
    else:
        slot[digest] = seq


class _SeenSpans:
    """What the log holds per trace id + span id, for stores that cannot dedup themselves.

    ids -> the content digests (and seqs) of its records, loaded once from the log and kept up
    to date by this process (one ingest process per such store); PostgresStore checks keys in
    its append transaction instead. Also the conflicts already recorded, so none is recorded
    twice.
    """

    def __init__(self, store: AuditStore) -> None:
        self._store = store
        self._index: dict[bytes, _Slot] | None = None
        self._conflicts: set[bytes] = set()
        # Usage record keys (coworker.ingest.usage.usage_key): their own space, never part of
        # a span's versions, so a span's usage record is no conflict with its outcome record.
        self._usage: set[bytes] = set()

    def _load(self) -> dict[bytes, _Slot]:
        index: dict[bytes, _Slot] = {}
        for record in self._store.iter_from(1):
            fields = record.fields()
            if fields.get("category") == CATEGORY_INGEST_CONFLICT:
                key = _conflict_key_of(fields)
                if key is not None:
                    self._conflicts.add(key)
                continue
            kind = fields.get("kind", KIND_OUTCOME)
            if kind != KIND_OUTCOME and kind != KIND_USAGE:
                continue
            trace_id, span_id = fields.get("trace_id"), fields.get("span_id")
            if isinstance(trace_id, str) and isinstance(span_id, str):
                with contextlib.suppress(ValueError):
                    ids = bytes.fromhex(trace_id) + bytes.fromhex(span_id)
                    if kind == KIND_USAGE:
                        self._usage.add(usage_key(ids, fields))
                    else:
                        _add(index, ids, content_digest(fields), record.seq)
        return index

    def append(
        self,
        entries: list[Mapping[str, Any]],
        payloads: list[bytes | None],
        keys: list[bytes],
        token: str | None,
    ) -> tuple[int, int, int]:
        # Called with the app's append lock held.
        if self._index is None:
            self._index = self._load()
        index = self._index
        usage = self._usage
        fresh: list[int] = []
        batch: set[bytes] = set()
        # Per span of every request: the checks of is_usage_key / _has / _add inlined.
        for i, key in enumerate(keys):
            if key in batch:
                continue
            if len(key) == USAGE_KEY_LEN and key[-1:] == _USAGE_MARK:
                if key in usage:
                    continue
            else:
                slot = index.get(key[:_IDS_LEN])
                if slot is not None and _has(slot, key[_IDS_LEN:]):
                    continue
            batch.add(key)
            fresh.append(i)
        if fresh:
            written = self._store.append([entries[i] for i in fresh], [payloads[i] for i in fresh])
            seqs: list[int | None] = (
                [r.seq for r in written] if len(written) == len(fresh) else [None] * len(fresh)
            )
            for i, seq in zip(fresh, seqs, strict=True):
                key = keys[i]
                if is_usage_key(key):
                    usage.add(key)
                elif key[:_IDS_LEN] not in index:
                    index[key[:_IDS_LEN]] = (key[_IDS_LEN:], seq)
                else:
                    _add(index, key[:_IDS_LEN], key[_IDS_LEN:], seq)
        # Duplicates are checked too: a crash between a record and its conflict record is
        # repaired by the exporter's retry. Only span ids with several versions can conflict.
        several = [k for k in keys if type(index.get(k[:_IDS_LEN])) is dict and not is_usage_key(k)]
        conflicts: list[Mapping[str, Any]] = []
        new_keys: list[bytes] = []
        for ids, digests in _by_ids(several).items():
            slot = index[ids]
            assert isinstance(slot, dict)
            for ckey, entry in _conflicts(ids, slot, token, digests):
                if ckey not in self._conflicts and ckey not in new_keys:
                    conflicts.append(entry)
                    new_keys.append(ckey)
        if conflicts:
            self._store.append(conflicts, [None] * len(conflicts))
            self._conflicts.update(new_keys)
        return len(fresh), len(keys) - len(fresh), len(conflicts)
