"""Corrections: the audit trail is never edited, a mistake is corrected by a new record that
points at the original (which stays, and still verifies)."""

from __future__ import annotations

from typing import Any, Final

from coworker.audit.record import FIELDS, correction_entry
from coworker.audit.store import AuditStore, StoredRecord
from coworker.audit.writer import suppressed
from coworker.exceptions import ConfigError

__all__ = ["CORRECTABLE_FIELDS", "correct"]

CORRECTABLE_FIELDS: Final = frozenset(FIELDS) - {
    "v", "seq", "kind", "recorded_at", "payload_digest", "intent_seq",
}  # fmt: skip
"""Record fields a correction may give a new value for."""


def _resolve_store(store: AuditStore | str | None) -> tuple[AuditStore, bool]:
    if store is None:
        from coworker.audit.pipeline import active_pipeline

        pipeline = active_pipeline()
        if pipeline is None:
            raise ConfigError(
                "store: no audit store configured; pass store=... or call "
                "coworker.configure(audit=...) first"
            )
        return pipeline.store, False
    if isinstance(store, str):
        from coworker.audit.urls import open_store

        return open_store(store), True
    return store, False


def _check_encodable(name: str, value: Any) -> None:
    # A lone surrogate (e.g. a shell argument that was not UTF-8) has no UTF-8 form, so no
    # store can hold it: a bad argument, said as one, not "audit store unavailable".
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(
                f"{name}: {value[: exc.start]!r}... holds a character that is not UTF-8 "
                f"(a lone surrogate at position {exc.start})"
            ) from None


def correct(
    seq: int,
    reason: str,
    *,
    store: AuditStore | str | None = None,
    by: str | None = None,
    **fields: Any,
) -> StoredRecord:
    """Append a correction of the record at ``seq``; the original stays untouched.

    Args:
        seq: the record being corrected.
        reason: why (required; shown by ``coworker audit query`` and ``tree``).
        store: the store, a store URL, or ``None`` for the store of the pipeline that
            ``coworker.configure(audit=...)`` installed.
        by: the user id making the correction, kept in the record's ``corrected_by``; the
            correction keeps the original's ``user_id`` and ``agent_id`` so that it shows up
            under the same ``query --user`` as the record it corrects.
        **fields: corrected values of record fields (e.g. ``doctype="Invoice"``), see
            :data:`CORRECTABLE_FIELDS`.

    Returns:
        The sealed correction record.

    Raises:
        ConfigError: no store, an empty reason, a field that cannot be corrected, or a value
            that is not valid Unicode text (a lone surrogate).
        LookupError: there is no record ``seq``.
        AuditUnavailable: the correction could not be made durable.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError("reason: a correction must say why")
    if by is not None and (not isinstance(by, str) or not by.strip()):
        raise ConfigError("by: the corrector must be a non-empty user id (or None)")
    for name, value in (("reason", reason), ("by", by), *fields.items()):
        _check_encodable(name, value)
    unknown = sorted(set(fields) - CORRECTABLE_FIELDS)
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: not correctable record field(s); "
            f"use {', '.join(sorted(CORRECTABLE_FIELDS))}"
        )
    resolved, owned = _resolve_store(store)
    try:
        original = next(iter(resolved.iter_from(seq)), None)
        if seq < 1 or original is None or original.seq != seq:
            raise LookupError(f"no audit record with seq {seq}")
        entry = correction_entry(original.fields(), seq, reason, fields, by=by)
        with suppressed():
            return resolved.append([entry])[0]
    finally:
        if owned:
            resolved.close()
