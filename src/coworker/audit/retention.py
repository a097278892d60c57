"""Retention floors and ``coworker audit purge`` (issue 15, docs/privacy.md).

A *floor* is the minimum time a payload of a category must be kept (``state-change: 7y``,
``authorization-failure: 6y``, everything else ``6mo``: the EU AI Act's six months for logs).
:func:`purge` deletes the payloads recorded before a date, only when every one of them is past
its floor, skips those under legal hold, and appends a purge record naming them first. Chained
records are never deleted; ``verify`` then reports the payloads as ``purged (seq N, ...)``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from coworker.audit import erasure
from coworker.audit.record import SCHEMA_VERSION, format_time
from coworker.exceptions import ConfigError

__all__ = [
    "CATEGORY_RETENTION",
    "DEFAULT_FLOORS",
    "KIND_PURGE",
    "PurgeRefused",
    "Purged",
    "parse_floors",
    "purge",
]

KIND_PURGE: Final = "purge"
"""Record kind of a purge: payloads past their retention floor were deleted."""
CATEGORY_RETENTION: Final = "retention"
"""Category of purge records."""

DEFAULT_FLOORS: Final[Mapping[str, str]] = {
    "state-change": "7y",
    "authorization-failure": "6y",
    "default": "6mo",
}
"""Floors used when none are given (``default`` covers every other category)."""

_DURATION: Final = re.compile(r"^\s*(\d+)\s*(y|mo|w|d)\s*$")
_SECONDS: Final = {"y": 365 * 86400, "mo": 30 * 86400, "w": 7 * 86400, "d": 86400}


class PurgeRefused(erasure.ErasureRefused):
    """A purge that would delete a payload younger than its floor; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Purged:
    """The result of :func:`purge`.

    Attributes:
        record: the purge record (``None`` when there was nothing to purge).
        seqs: the records whose payloads were deleted.
        held: the records whose payloads were kept because a legal hold covers them.
    """

    record: Any
    seqs: tuple[int, ...]
    held: tuple[int, ...]


def duration_seconds(text: str) -> int:
    """``7y``, ``6mo``, ``2w``, ``30d`` in seconds (a year is 365 days, a month 30)."""
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"retention floor {text!r}: use a number and y, mo, w or d (6mo, 7y)")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def parse_floors(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Floors from ``"state-change=7y,default=6mo"`` (or a mapping); unnamed ones default.

    Raises:
        ConfigError: a malformed entry or duration.
    """
    floors = dict(DEFAULT_FLOORS)
    if spec is None:
        return floors
    items = spec.items() if isinstance(spec, Mapping) else _pairs(spec)
    for category, value in items:
        duration_seconds(value)  # validate now, not halfway through a purge
        floors[category] = value
    return floors


def _pairs(spec: str) -> list[tuple[str, str]]:
    out = []
    for part in spec.split(","):
        if not part.strip():
            continue
        category, sep, value = part.partition("=")
        if not sep:
            category, sep, value = part.partition(":")
        if not sep or not category.strip():
            raise ConfigError(f"retention policy entry {part!r}: use CATEGORY=DURATION")
        out.append((category.strip(), value.strip()))
    return out


def _time_of(fields: Mapping[str, Any]) -> str:
    value = fields.get("start") or fields.get("recorded_at")
    return value if isinstance(value, str) else ""


def purge(
    store: Any,
    before: str,
    floors: Mapping[str, str] | None = None,
    *,
    by: str | None = None,
    now: float | None = None,
) -> Purged:
    """Delete the payloads recorded before ``before`` that are past their floor.

    Args:
        store: a store with ``delete_payloads`` (SQLite, PostgreSQL).
        before: RFC 3339 UTC (see :func:`coworker.audit.query.parse_time`).
        floors: category -> duration; ``default`` for the rest (:data:`DEFAULT_FLOORS`).
        by: who purges (kept in the record).
        now: the current Unix time (tests).

    Raises:
        PurgeRefused: a payload before ``before`` is younger than its category's floor.
    """
    policy = parse_floors(floors)
    current = time.time() if now is None else now
    cutoffs = {
        c: format_time(int((current - duration_seconds(v)) * 1_000_000_000)) or ""
        for c, v in policy.items()
    }
    candidates: list[tuple[int, Mapping[str, Any]]] = []
    too_young: dict[str, int] = {}
    for record in store.iter_from(1):
        if record.payload is None:
            continue
        fields = record.fields()
        at = _time_of(fields)
        if not at or at >= before:
            continue
        category = str(fields.get("category") or "")
        cutoff = cutoffs.get(category, cutoffs["default"])
        if at >= cutoff:
            too_young[category] = too_young.get(category, 0) + 1
        candidates.append((record.seq, fields))
    if too_young:
        named = ", ".join(
            f"{n} {c or '(no category)'} payload(s) (floor {policy.get(c, policy['default'])})"
            for c, n in sorted(too_young.items())
        )
        raise PurgeRefused(
            f"purge before {before} refused: {named} are younger than their retention floor; "
            "nothing was deleted"
        )
    holds = erasure.store_holds(store)
    flow_cache: dict[str, set[str]] = {}

    def flow_subjects(flow: str) -> set[str]:
        if flow not in flow_cache:
            flow_cache[flow] = {
                str(v)
                for r in store.iter_from(1)
                if (f := r.fields()).get("flow_id") == flow
                for v in (f.get("user_id"), f.get("payload_subject"))
                if isinstance(v, str)
            }
        return flow_cache[flow]

    seqs: list[int] = []
    held: list[int] = []
    for seq, fields in candidates:
        subjects = {
            v for v in (fields.get("user_id"), fields.get("payload_subject")) if isinstance(v, str)
        }
        flow = fields.get("flow_id")
        # Held: the record's flow is held, or one of its subjects is (directly or by a flow).
        on_hold = (
            flow is not None and any(h.get("hold_flow_id") == flow for h in holds.values())
        ) or any(erasure.covering_hold(holds, s, flow_subjects) for s in subjects)
        (held if on_hold else seqs).append(seq)
    if not seqs:
        return Purged(None, (), tuple(held))
    record = erasure.append_now(store, purge_entry(seqs, before=before, floors=policy, by=by))
    store.delete_payloads(seqs)
    return Purged(record, tuple(seqs), tuple(held))


def purge_entry(
    seqs: list[int], *, before: str, floors: Mapping[str, str], by: str | None
) -> dict[str, Any]:
    """The record fields (without ``seq``) of a purge."""
    now = format_time(time.time_ns())
    return {
        "v": SCHEMA_VERSION,
        "kind": KIND_PURGE,
        "category": CATEGORY_RETENTION,
        "operation": "purge",
        "recorded_at": now,
        "start": now,
        "purged_seqs": sorted(seqs),
        "purged_before": before,
        "reason": f"retention, before {before}",
        "retention_floors": dict(sorted(floors.items())),
        "purged_by": by,
        "user_id": None,
        "payload_digest": None,
    }
