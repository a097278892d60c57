"""Dedup keys checked against the bodies that carry them.

A dedup key (PostgreSQL's ``dedup_key`` column) makes a second delivery of the same record a
no-op: ``append_unique`` skips an entry whose key is already in the log. The key is an
unhashed column a writer role supplies, so a row inserted by hand (chained correctly) can
carry the key of a record that has not arrived yet with another body: the genuine record
would then be answered "duplicate" and never written. Every key coworker makes is derived
from the record it keys, so both sides recompute it from the body (:func:`body_key`):

* the writer, before answering "duplicate", confirms that the row holding the key is that
  record; when it is not, the genuine record is written without the key (CRITICAL log line);
* ``coworker audit verify`` reports every row whose key is not its body's
  (:data:`~coworker.audit.store.DEDUP_MISMATCH`).

Key forms: the chain registry's (``coworker-chain[-retired]\\0<name>``), an ingested span's
(trace id + span id + content digest, 56 bytes; 24 bytes before the content was keyed), an
ingested usage record's (57 bytes), an ingest conflict record's (32 bytes). Any other key
(an application's own ``append_unique`` keys) cannot be recomputed and is trusted as before.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

__all__ = ["body_key", "key_matches", "rekey"]

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


def body_key(key: bytes, body: bytes) -> bytes | None:
    """The key ``body`` earns in the form of ``key``: ``key`` itself when the row is the
    record the key names, another value (``b""``: none) when it is not, ``None`` when the
    form is not one coworker derives from a body (nothing to check)."""
    from coworker.audit.chain_registry import _KEY_PREFIX, _RETIRE_PREFIX, parse_registration

    registry = key.startswith(_KEY_PREFIX) or key.startswith(_RETIRE_PREFIX)
    if not registry and len(key) not in (24, 32, 56, 57):
        return None
    try:
        fields = json.loads(body)
    except ValueError:
        return b""
    if not isinstance(fields, dict):
        return b""
    found = parse_registration(1, body) if registry or len(key) == 32 else None
    if registry:
        from coworker.audit.chain_registry import registry_key

        if found is None:
            return b""
        return registry_key(found.name, retire=found.operation == "retire")
    if found is not None:  # a registration under its re-key
        from coworker.audit.chain_registry import registry_key

        own = registry_key(found.name, retire=found.operation == "retire")
        return key if rekey(own) == key else b""
    try:
        from coworker.ingest.records import _conflict_key_of, content_digest
        from coworker.ingest.usage import is_usage_key, usage_key
    except ImportError:  # pragma: no cover - ingest's keys need the server extra
        return None
    ids = _ids(fields)
    if len(key) == 32:
        # A conflict record's key, or the re-key of the body's own span or usage key.
        conflict = _conflict_key_of(fields)
        if conflict == key:
            return key
        if ids is not None:
            keys = (ids + content_digest(fields), usage_key(ids, fields))
            if key in {rekey(k) for k in keys}:
                return key
        return conflict or b""
    if ids is None:
        return b""
    if len(key) == _IDS_LEN:
        return ids
    if is_usage_key(key):
        return usage_key(ids, fields)
    if len(key) == 56:
        return ids + content_digest(fields)
    return None


def key_matches(key: bytes, body: bytes) -> bool:
    """Whether ``key`` may stand for ``body`` (its own key, or a form nothing can check)."""
    found = body_key(key, body)
    return found is None or found == key
