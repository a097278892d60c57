"""Check a store's records against signed checkpoints held outside it.

The hash chain shows that a log is internally consistent; whoever owns the database can
still rewrite it and recompute every hash. A checkpoint signed earlier (and kept by an
auditor, a witness, a WORM share) pins the tree of its first N records. This module re-hashes
the records themselves (not the tree tables, which are only a cache) in one pass and names
what happened since each checkpoint:

=============  ==============================================================================
``rewritten``  the log's first N records no longer hash to the checkpoint's root (edited,
               inserted or deleted records, every later hash recomputed)
``truncated``  the log has fewer records than a checkpoint says it had
``forked``     the log key signed two trees that cannot both be prefixes of one log: two
               checkpoints of the same size with different roots, or a checkpoint the
               current log matches while it does not match an earlier one (different
               readers were shown different logs)
=============  ==============================================================================
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from coworker.audit import merkle
from coworker.audit.checkpoint import Checkpoint
from coworker.audit.merkle import CompactRange

__all__ = ["FORKED", "OK", "REWRITTEN", "TRUNCATED", "AnchorReport", "Finding", "check_log"]

OK: Final = "ok"
REWRITTEN: Final = "rewritten"
TRUNCATED: Final = "truncated"
FORKED: Final = "forked"


@dataclass(frozen=True)
class Finding:
    """What one checkpoint says about the log."""

    label: str
    checkpoint: Checkpoint
    status: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "checkpoint": self.label,
            "tree_size": self.checkpoint.size,
            "root": base64.b64encode(self.checkpoint.root).decode(),
            "status": self.status,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class AnchorReport:
    """The result of :func:`check_log`."""

    log_size: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every checkpoint's tree is a prefix of the log."""
        return all(f.status == OK for f in self.findings)


def check_log(
    rows: Any,
    checkpoints: Sequence[tuple[str, Checkpoint]],
    progress: Callable[[int], None] | None = None,
) -> AnchorReport:
    """Re-hash the log's records and compare its tree with each (verified) checkpoint.

    Args:
        rows: iterable of ``(seq, prev_hash, hash, body)`` in seq order (``iter_chain``).
        checkpoints: ``(label, checkpoint)`` pairs whose signatures the caller verified.
        progress: called now and then with the number of records hashed.

    Returns:
        One finding per checkpoint.
    """
    wanted = {c.size for _, c in checkpoints}
    roots: dict[int, bytes] = {0: merkle.EMPTY_ROOT}
    cr = CompactRange()
    for _seq, _prev, _hash, body in rows:
        cr.append(merkle.leaf_hash(body))
        if cr.size in wanted:
            roots[cr.size] = cr.root()
        if progress is not None and cr.size % 16_384 == 0:
            progress(cr.size)
    n = cr.size
    matches = {label: (c.size <= n and roots.get(c.size) == c.root) for label, c in checkpoints}
    findings: list[Finding] = []
    for label, c in checkpoints:
        twin = next(
            (
                other
                for other_label, other in checkpoints
                if other.size == c.size and other.root != c.root and other_label != label
            ),
            None,
        )
        if twin is not None:
            findings.append(
                Finding(
                    label,
                    c,
                    FORKED,
                    f"the key signed two different trees of size {c.size}: different readers "
                    "were shown different logs",
                )
            )
        elif c.size > n:
            findings.append(
                Finding(
                    label,
                    c,
                    TRUNCATED,
                    f"the checkpoint covers {c.size} records; the log has only {n}: "
                    f"{c.size - n} record(s) were cut off",
                )
            )
        elif matches[label]:
            findings.append(Finding(label, c, OK, f"the log contains this tree of {c.size}"))
        else:
            later = [
                other_label
                for other_label, other in checkpoints
                if matches[other_label] and other.size >= c.size
            ]
            if later:
                findings.append(
                    Finding(
                        label,
                        c,
                        FORKED,
                        f"the log matches checkpoint {later[0]} but not this earlier tree of "
                        f"{c.size}: the key signed two inconsistent logs",
                    )
                )
            else:
                findings.append(
                    Finding(
                        label,
                        c,
                        REWRITTEN,
                        f"the log's first {c.size} records no longer hash to this checkpoint's "
                        "root: records were changed, inserted or removed and the chain "
                        "recomputed",
                    )
                )
    return AnchorReport(n, findings)
