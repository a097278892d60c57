"""What ``coworker audit verify`` finds for each chain of the registry
(:mod:`coworker.audit.chain_registry`): every registered chain present and still holding the
head it was adopted or retired with, every present chain registered."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coworker.audit.chain_registry import Registration, case_conflict
from coworker.audit.store import Head

__all__ = ["ChainCheck", "check_registry"]


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """What :func:`check_registry` found for one chain.

    Attributes:
        name: the chain.
        status: ``registered`` (there, and anchored), ``vanished`` (registered, its file or
            schema gone), ``unregistered`` (there with records the registry does not name),
            ``unregistered-empty`` (there, no records: an interrupted creation),
            ``truncated`` / ``rewritten`` (no longer holds the head it was adopted with),
            ``case-conflict`` (another chain has the same name up to case), ``retired``
            (retired on purpose; there or removed), ``sealed`` (sealed, its retirement not
            recorded: interrupted), ``written-after-retire`` (records after the retired head).
        ok: whether it passes (``registered``, ``unregistered-empty``, ``retired``).
        detail: one line for a person.
        seq: the registry record, when there is one.
    """

    name: str
    status: str
    ok: bool
    detail: str
    seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The check as JSON-able fields."""
        return {
            "chain": self.name,
            "status": self.status,
            "ok": self.ok,
            "detail": self.detail,
            "seq": self.seq,
        }


def check_registry(
    registered: Mapping[str, Registration],
    present: Iterable[str],
    head_at: Callable[[str, int], Head | None],
    count: Callable[[str], int],
    sealed: Callable[[str], Head | None] | None = None,
) -> list[ChainCheck]:
    """Every registered chain must be present (else ``vanished``) and still hold the head it
    was adopted with; every present named chain should be registered; a chain sealed but not
    retired in the registry is an interrupted retirement (``sealed``).

    Args:
        registered: :func:`registrations` of the default chain.
        present: the chains the store holds (``store.chains()``).
        head_at: ``(chain, seq)`` -> the ``(seq, hash)`` of that record of the chain, or
            ``None`` when the chain has no such record.
        count: ``chain`` -> its number of records.
        sealed: ``chain`` -> its head when that is a seal (:mod:`coworker.audit.chain_seal`),
            else ``None``.

    Returns:
        One check per chain, by name.
    """
    there = {n for n in present if n}
    out: list[ChainCheck] = []
    for name in sorted(there | set(registered)):
        reg = registered.get(name)
        other = case_conflict(name, there | set(registered))
        if other is not None:
            out.append(
                ChainCheck(
                    name,
                    "case-conflict",
                    False,
                    f"chain {other!r} has the same name up to case (one file on a "
                    "case-insensitive file system)",
                    reg.seq if reg else None,
                )
            )
            continue
        if reg is None:
            records = count(name)
            if records == 0:
                out.append(
                    ChainCheck(
                        name,
                        "unregistered-empty",
                        True,
                        "no records and not in the chain registry (an interrupted creation; "
                        "the next writer registers it)",
                    )
                )
            else:
                out.append(
                    ChainCheck(
                        name,
                        "unregistered",
                        False,
                        f"{records} records, not named in the default chain's registry "
                        "(made before the registry, or not by coworker): run `coworker audit "
                        "adopt-chains` once it is known to be genuine",
                    )
                )
            continue
        if reg.retired is not None:
            flaw = _retired_flaw(name, reg, name in there, head_at)
            if flaw is not None:
                out.append(ChainCheck(name, flaw[0], False, flaw[1], reg.seq))
                continue
            if name in there:
                out.append(
                    ChainCheck(
                        name,
                        "retired",
                        True,
                        f"retired on purpose (registry seq {reg.retired.seq}); its file or "
                        "schema may be removed",
                        reg.seq,
                    )
                )
            else:
                out.append(
                    ChainCheck(
                        name,
                        "retired",
                        True,
                        f"retired on purpose (registry seq {reg.retired.seq}) and removed",
                        reg.seq,
                    )
                )
            continue
        if name not in there:
            out.append(
                ChainCheck(
                    name,
                    "vanished",
                    False,
                    f"registered in the default chain at seq {reg.seq} ({reg.operation}), but "
                    "the store has no such chain: its file or schema is gone",
                    reg.seq,
                )
            )
            continue
        if reg.head is not None:
            found = head_at(name, reg.head.seq)
            if found is None or found.seq != reg.head.seq:
                out.append(
                    ChainCheck(
                        name,
                        "truncated",
                        False,
                        f"adopted at head {reg.head.seq} (registry seq {reg.seq}), but the "
                        "chain no longer reaches it",
                        reg.seq,
                    )
                )
                continue
            if found.hash != reg.head.hash:
                out.append(
                    ChainCheck(
                        name,
                        "rewritten",
                        False,
                        f"record {reg.head.seq} is not the one the chain was adopted with "
                        f"(registry seq {reg.seq})",
                        reg.seq,
                    )
                )
                continue
        seal = sealed(name) if sealed is not None else None
        if seal is not None:
            out.append(
                ChainCheck(
                    name,
                    "sealed",
                    False,
                    f"sealed at seq {seal.seq} but not retired in the registry (registry seq "
                    f"{reg.seq}): its retirement was interrupted; nothing can be written to it. "
                    "Run `coworker audit retire-chain` on it again to complete it before "
                    "removing it (removed now, it is vanished)",
                    reg.seq,
                )
            )
            continue
        out.append(
            ChainCheck(
                name, "registered", True, f"registry seq {reg.seq} ({reg.operation})", reg.seq
            )
        )
    return out


def _retired_flaw(
    name: str,
    reg: Registration,
    present: bool,
    head_at: Callable[[str, int], Head | None],
) -> tuple[str, str] | None:
    """Why a retired chain fails, or ``None``. A retire record anchors the head the chain was
    retired at; it must not stand below the head the chain was adopted with (a cut made before
    retiring would otherwise turn ``truncated`` into ``retired``, exit 0) and, while the file or
    schema is still there, the chain must end at exactly that head (records after it were
    written by a writer that had the chain open when it was retired: deleting the chain would
    lose them silently)."""
    assert reg.retired is not None
    at = reg.retired.head
    retired_seq = at.seq if at is not None else 0
    # A sealed retirement's head is the seal: the records it was retired holding end before it
    # (a chain cut to 2 records and sealed at 3 must not pass for one adopted at 3).
    held = retired_seq - 1 if reg.retired.sealed else retired_seq
    if reg.head is not None and held < reg.head.seq:
        return (
            "truncated",
            f"adopted at head {reg.head.seq} (registry seq {reg.seq}) but retired holding "
            f"{held} records (registry seq {reg.retired.seq}): records were cut before retiring",
        )
    if not present:
        return None
    if reg.head is not None:
        adopted = head_at(name, reg.head.seq)
        if adopted is None or adopted.seq != reg.head.seq or adopted.hash != reg.head.hash:
            return (
                "rewritten" if adopted is not None and adopted.seq == reg.head.seq else "truncated",
                f"adopted at head {reg.head.seq} (registry seq {reg.seq}), but the chain no "
                "longer holds that record",
            )
    if at is not None:
        found = head_at(name, at.seq)
        if found is None or found.seq != at.seq or found.hash != at.hash:
            return (
                "rewritten" if found is not None and found.seq == at.seq else "truncated",
                f"retired at head {at.seq} (registry seq {reg.retired.seq}), but the chain no "
                "longer holds that record",
            )
    if head_at(name, retired_seq + 1) is not None:
        return (
            "written-after-retire",
            f"retired at head {retired_seq} (registry seq {reg.retired.seq}), but holds records "
            "after it (a writer had it open when it was retired): removing it would lose them",
        )
    return None
