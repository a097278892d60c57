"""RFC 6962 / RFC 9162 Merkle tree hashing, inclusion and consistency proofs: pure functions.

The tree over an audit log of N records has the records' canonical bytes (exactly the bytes
the hash chain hashes, :attr:`~coworker.audit.store.StoredRecord.body`) as its leaves, in seq
order: leaf *i* (zero-based) is record ``seq = i + 1``.

* leaf hash ``SHA-256(0x00 || record bytes)``, node hash ``SHA-256(0x01 || left || right)``;
* the root of the empty tree is ``SHA-256("")``;
* a tree of ``n > 1`` leaves splits at ``k``, the largest power of two below ``n``.

Every node of such a tree covers a leaf range ``[a, b)``; its left child is always a
*perfect* subtree (``2^level`` leaves, ``a`` a multiple of it), which is why a log only has
to keep perfect subtrees (:data:`NodeKey` ``(level, index)`` covers leaves
``[index * 2^level, (index + 1) * 2^level)``): any other node is a fold of the perfect
subtrees of its range (:func:`range_keys`), at most ``log2(n)`` of them. Appending a leaf
completes at most ``log2(n)`` perfect subtrees (:class:`CompactRange`), so keeping the tree
is O(log N) per record, never a recomputation.

Verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2 to the letter and raises
:class:`ProofError`; nothing here trusts the party that made the proof.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Final

__all__ = [
    "EMPTY_ROOT",
    "CompactRange",
    "NodeKey",
    "ProofError",
    "consistency_keys",
    "consistency_proof",
    "inclusion_keys",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "range_hash",
    "range_keys",
    "root_from_leaves",
    "root_hash",
    "root_keys",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
"""Root hash of the empty tree (RFC 9162 2.1.1)."""

NodeKey = tuple[int, int]
"""``(level, index)`` of a perfect subtree: leaves ``[index << level, (index + 1) << level)``."""

Nodes = Callable[[Sequence[NodeKey]], Mapping[NodeKey, bytes]]
"""Looks up the hashes of perfect subtrees (every key asked for must be answered)."""


class ProofError(ValueError):
    """A proof, size or hash does not verify."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf (one record's canonical bytes)."""
    h = hashlib.sha256(b"\x00")
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    h = hashlib.sha256(b"\x01")
    h.update(left)
    h.update(right)
    return h.digest()


def _split(n: int) -> int:
    # The largest power of two strictly smaller than n (n >= 2).
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaves(leaves: Sequence[bytes]) -> bytes:
    """The reference MTH (RFC 9162 2.1.1) over leaf *hashes*, by recursion; for small trees."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root_from_leaves(leaves[:k]), root_from_leaves(leaves[k:]))


def range_keys(start: int, end: int) -> list[NodeKey]:
    """The perfect subtrees, left to right, whose fold is the tree node over ``[start, end)``.

    ``[start, end)`` must be a node of some RFC 6962 tree (``start`` a multiple of the
    largest power of two not above ``end - start``), as every range in a proof is.
    """
    keys: list[NodeKey] = []
    while start < end:
        level = (end - start).bit_length() - 1
        keys.append((level, start >> level))
        start += 1 << level
    return keys


def range_hash(hashes: Sequence[bytes]) -> bytes:
    """Fold the hashes of :func:`range_keys` into the node hash (right to left)."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def _inclusion_ranges(index: int, start: int, end: int, out: list[tuple[int, int]]) -> None:
    # RFC 9162 2.1.3.1 PATH(m, D[start:end]), emitting the sibling ranges deepest first.
    if end - start <= 1:
        return
    k = _split(end - start)
    if index < start + k:
        _inclusion_ranges(index, start, start + k, out)
        out.append((start + k, end))
    else:
        _inclusion_ranges(index, start + k, end, out)
        out.append((start, start + k))


def _consistency_ranges(
    old: int, start: int, end: int, whole: bool, out: list[tuple[int, int]]
) -> None:
    # RFC 9162 2.1.4.1 SUBPROOF(m, D[start:end], b), with m = old - start.
    if old == end:
        if not whole:
            out.append((start, end))
        return
    k = _split(end - start)
    if old <= start + k:
        _consistency_ranges(old, start, start + k, whole, out)
        out.append((start + k, end))
    else:
        _consistency_ranges(old, start + k, end, False, out)
        out.append((start, start + k))


def _check_sizes(index: int, size: int) -> None:
    if size < 0 or index < 0 or index >= size:
        raise ProofError(f"index {index} is outside a tree of size {size}")


def inclusion_keys(index: int, size: int) -> list[list[NodeKey]]:
    """The perfect subtrees each hash of the inclusion proof of leaf ``index`` folds."""
    _check_sizes(index, size)
    ranges: list[tuple[int, int]] = []
    _inclusion_ranges(index, 0, size, ranges)
    return [range_keys(a, b) for a, b in ranges]


def consistency_keys(old: int, new: int) -> list[list[NodeKey]]:
    """The perfect subtrees each hash of the consistency proof ``old -> new`` folds."""
    if not 0 <= old <= new:
        raise ProofError(f"no consistency proof from tree size {old} to {new}")
    if old in (0, new):
        return []
    ranges: list[tuple[int, int]] = []
    _consistency_ranges(old, 0, new, True, ranges)
    return [range_keys(a, b) for a, b in ranges]


def root_keys(size: int) -> list[NodeKey]:
    """The perfect subtrees (the compact range of ``[0, size)``) whose fold is the root."""
    return range_keys(0, size)


def _resolve(groups: Sequence[Sequence[NodeKey]], nodes: Nodes) -> list[bytes]:
    wanted = sorted({k for g in groups for k in g})
    found = nodes(wanted) if wanted else {}
    return [range_hash([found[k] for k in g]) for g in groups]


def inclusion_proof(index: int, size: int, nodes: Nodes) -> list[bytes]:
    """The RFC 9162 inclusion proof of leaf ``index`` in the tree of ``size`` leaves.

    Args:
        index: zero-based leaf index (record ``seq - 1``).
        size: tree size.
        nodes: looks up perfect-subtree hashes (one batched call).

    Returns:
        The proof hashes, the leaf's sibling first.
    """
    return _resolve(inclusion_keys(index, size), nodes)


def consistency_proof(old: int, new: int, nodes: Nodes) -> list[bytes]:
    """The RFC 9162 consistency proof from tree size ``old`` to ``new`` (empty if trivial)."""
    return _resolve(consistency_keys(old, new), nodes)


def root_hash(size: int, nodes: Nodes) -> bytes:
    """The root of the tree of ``size`` leaves."""
    if size == 0:
        return EMPTY_ROOT
    return _resolve([root_keys(size)], nodes)[0]


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name} is {len(value)} bytes, not {HASH_SIZE}")


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check an inclusion proof (RFC 9162 2.1.3.2).

    Args:
        index: zero-based leaf index.
        size: tree size the proof is for.
        leaf: the leaf *hash* (:func:`leaf_hash` of the record bytes).
        proof: the proof hashes.
        root: the trusted root of the tree of ``size`` (from a verified checkpoint).

    Raises:
        ProofError: the proof does not bind ``leaf`` at ``index`` to ``root``.
    """
    _check_sizes(index, size)
    _check_hash("leaf hash", leaf)
    _check_hash("root hash", root)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        _check_hash("proof hash", p)
        if sn == 0:
            raise ProofError(f"inclusion proof has {len(proof)} hashes: too many for this tree")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"inclusion proof has {len(proof)} hashes: too few for this tree")
    if r != root:
        raise ProofError(f"inclusion proof of index {index} does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check a consistency proof (RFC 9162 2.1.4.2): the tree of ``new_size`` extends
    the tree of ``old_size``.

    Raises:
        ProofError: it does not (or the proof is malformed).
    """
    # Roots are only compared, never hashed, so their length needs no check of its own (the
    # reference vectors accept equal opaque roots for equal sizes).
    if old_size < 0 or new_size < old_size:
        raise ProofError(f"tree size {new_size} cannot extend tree size {old_size}")
    if old_size == 0:
        # As transparency-dev/merkle: a proof from the empty tree proves nothing, so none is
        # accepted (callers treat size 0 as trivially consistent without asking for one).
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if old_size == new_size:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same tree size {old_size}")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    for p in proof:
        _check_hash("proof hash", p)
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"consistency proof has {len(proof)} hashes: too many")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"consistency proof has {len(proof)} hashes: too few")
    if fr != old_root:
        raise ProofError(f"consistency proof does not lead to the root of tree size {old_size}")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the root of tree size {new_size}")


class CompactRange:
    """The right edge of a growing tree: the perfect subtrees covering ``[0, size)``.

    Appending a leaf merges equal-sized subtrees like a binary counter, so each append costs
    amortised O(1) and at most ``log2(size)`` hashes; :meth:`root` folds at most
    ``log2(size)`` hashes. Memory is O(log N).
    """

    __slots__ = ("_hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        """Start from ``size`` leaves whose :func:`root_keys` hashes are ``hashes``."""
        if len(hashes) != size.bit_count():
            raise ValueError(f"a compact range of size {size} has {size.bit_count()} hashes")
        self.size = size
        self._hashes = list(hashes)

    def append(self, leaf: bytes) -> list[tuple[NodeKey, bytes]]:
        """Add one leaf hash; return every perfect subtree it completes, the leaf first."""
        index = self.size
        made: list[tuple[NodeKey, bytes]] = [((0, index), leaf)]
        h = leaf
        level = 0
        while index & 1:
            h = node_hash(self._hashes.pop(), h)
            index >>= 1
            level += 1
            made.append(((level, index), h))
        self._hashes.append(h)
        self.size += 1
        return made

    def root(self) -> bytes:
        """The root of the tree of :attr:`size` leaves."""
        if not self._hashes:
            return EMPTY_ROOT
        return range_hash(self._hashes)

    def hashes(self) -> list[bytes]:
        """The perfect-subtree hashes, largest (leftmost) first."""
        return list(self._hashes)
