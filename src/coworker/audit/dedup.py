"""Dedup keys checked against the bodies that carry them.

A dedup key (PostgreSQL's ``dedup_key`` column) makes a second delivery of the same record a
no-op: ``append_unique`` skips an entry whose key is already in the log. The key is an
unhashed column a writer role supplies, so a row inserted by hand (chained correctly) can
carry the key of a record that has not arrived yet with another body: the genuine record
would then be answered "duplicate" and never written. Every key coworker makes is derived
from the record it keys, so both sides recompute it from the body (:func:`body_key`):

* the writer, before answering "duplicate" for an entry that earns its own key (a key
  coworker derived from it), confirms that the row holding the key earns it too
  (:func:`forged`); when it does not, the genuine record is written under the key's re-key
  (:func:`rekey`), or without a key when that is held by another record too (CRITICAL log);
* ``coworker audit verify`` reports every row whose body is a record of a key form's kind
  but earns another key (:data:`~coworker.audit.store.DEDUP_MISMATCH`).

Key forms: the chain registry's (``coworker-chain[-retired]\\0<name>``, any body: the prefix is
coworker's), an ingested span's (trace id + span id + content digest, 56 bytes; 24 bytes
before the content was keyed: a body of kind ``outcome`` carrying trace and span ids), an
ingested usage record's (57 bytes ending ``U``: kind ``usage``), an ingest conflict record's
(32 bytes: category ``ingest-conflict``), the re-key of any of these (32 bytes, on the body
that earns the key it re-keys). Any other key, and a key of one of those lengths on a body
that is not of that kind (an application's own ``append_unique`` keys: a SHA-256 digest, a
uuid's hex), cannot be recomputed and is trusted as before.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

__all__ = ["body_key", "forged", "key_matches", "rekey"]

_IDS_LEN: Final = 24
_REKEY_TAG: Final = b"coworker.dedup-rekeyed\x00"


def rekey(key: bytes) -> bytes:
    """The key a record is written under when its own key is held by a forged row: 32 bytes,
    derived from the key (a resend finds it), checked by :func:`body_key` like the key."""
    return hashlib.sha256(_REKEY_TAG + key).digest()


def _ids(fields: dict[str, Any]) -> bytes | None:
    try:
        ids = bytes.fromhex(fields["trace_id"]) + bytes.fromhex(fields["span_id"])
    except (KeyError, TypeError, ValueError):
        return None
    return ids if len(ids) == _IDS_LEN else None


_UNPARSED: Final[Any] = object()


def body_key(key: bytes, body: bytes, fields: Any = _UNPARSED) -> bytes | None:
    """The key ``body`` earns in the form of ``key``: ``key`` itself when the row is the
    record the key names, another value (``b""``: none) when it is not, ``None`` when the
    key's form is not one coworker derives, or ``body`` is not a record of that form's kind
    (nothing to check: the key may be an application's own). ``fields``: ``body`` decoded
    by ``json.loads`` already (``None`` when it is not JSON), so that it is not parsed twice."""
    from coworker.audit.chain_registry import _KEY_PREFIX, _RETIRE_PREFIX, parse_registration

    registry = key.startswith(_KEY_PREFIX) or key.startswith(_RETIRE_PREFIX)
    if not registry and len(key) not in (24, 32, 56, 57):
        return None
    if fields is _UNPARSED:
        try:
            fields = json.loads(body)
        except ValueError:
            fields = None
    if not isinstance(fields, dict):
        return b"" if registry else None
    found = parse_registration(1, body) if registry or len(key) == 32 else None
    if found is not None or registry:
        from coworker.audit.chain_registry import registry_key

        if found is None:
            return b""
        own = registry_key(found.name, retire=found.operation == "retire")
        if registry:
            return own
        return key if rekey(own) == key else b""  # a registration under its re-key
    try:
        from coworker.audit.record import CATEGORY_INGEST_CONFLICT, KIND_OUTCOME
        from coworker.ingest.records import _conflict_key_of, content_digest
        from coworker.ingest.usage import KIND_USAGE, is_usage_key, usage_key
    except ImportError:  # pragma: no cover - ingest's keys need the server extra
        return None
    ids = _ids(fields)
    kind = fields.get("kind")
    if len(key) == 32:
        if fields.get("category") == CATEGORY_INGEST_CONFLICT:
            return _conflict_key_of(fields) or b""
        # The re-key of the body's own span or usage key; else an application's own key.
        if ids is not None and kind in (KIND_OUTCOME, KIND_USAGE):
            own = ids + content_digest(fields) if kind == KIND_OUTCOME else usage_key(ids, fields)
            if rekey(own) == key:
                return key
        return None
    usage = is_usage_key(key)
    if len(key) == 57 and not usage:
        return None
    if kind != (KIND_USAGE if usage else KIND_OUTCOME) or ids is None:
        return None
    if len(key) == _IDS_LEN:
        return ids
    if usage:
        return usage_key(ids, fields)
    return ids + content_digest(fields)


def key_matches(key: bytes, body: bytes, fields: Any = _UNPARSED) -> bool:
    """Whether ``key`` may stand for ``body`` (its own key, or nothing to check): verify's
    test of a row (``fields``: see :func:`body_key`)."""
    found = body_key(key, body, fields)
    return found is None or found == key


def forged(key: bytes, entry_body: bytes, held_body: bytes) -> bool:
    """Whether the row holding ``key`` (``held_body``) is not the record an entry that
    ``append_unique`` answered "duplicate" (``entry_body``, with any seq) would duplicate:
    the entry earns ``key`` itself, the held row does not. The writer's test."""
    return body_key(key, entry_body) == key and body_key(key, held_body) != key
