"""RFC 6962 / 9162 tree hashing and proofs against the transparency-dev reference vectors,
plus property tests: every proof we make verifies, every mutation of it is rejected."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coworker.audit import merkle
from coworker.audit.merkle import CompactRange, NodeKey, ProofError

DATA = Path(__file__).parent / "data" / "transparency-dev-merkle"

# testonly.LeafInputs() and testonly.RootHashes() of transparency-dev/merkle (see DATA/README).
LEAF_INPUTS = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)]  # fmt: skip
ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]  # fmt: skip


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def _vectors(kind: str) -> list[Path]:
    return sorted((DATA / kind).rglob("*.json"))


class MemoryNodes:
    """All perfect subtrees of a list of leaf hashes, as a :data:`merkle.Nodes` lookup."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.table: dict[NodeKey, bytes] = {}
        cr = CompactRange()
        for leaf in leaves:
            self.table.update(cr.append(leaf))
        self.root = cr.root()

    def __call__(self, keys: Sequence[NodeKey]) -> Mapping[NodeKey, bytes]:
        return {k: self.table[k] for k in keys}


def test_the_vectors_are_all_there() -> None:
    """The copied reference data is complete (98 inclusion and 98 consistency files)."""
    assert len(_vectors("inclusion")) == 98
    assert len(_vectors("consistency")) == 98


@pytest.mark.parametrize("path", _vectors("inclusion"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inclusion_reference_vector(path: Path) -> None:
    """Each transparency-dev inclusion vector verifies exactly when it should."""
    v = json.loads(path.read_text())
    args = (
        v["leafIdx"], v["treeSize"], _b64(v["leafHash"]),
        [_b64(p) for p in v["proof"] or []], _b64(v["root"]),
    )  # fmt: skip
    if v["wantErr"]:
        with pytest.raises(ProofError):
            merkle.verify_inclusion(*args)
    else:
        merkle.verify_inclusion(*args)


@pytest.mark.parametrize("path", _vectors("consistency"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_consistency_reference_vector(path: Path) -> None:
    """Each transparency-dev consistency vector verifies exactly when it should."""
    v = json.loads(path.read_text())
    args = (
        v["size1"], v["size2"], _b64(v["root1"]), _b64(v["root2"]),
        [_b64(p) for p in v["proof"] or []],
    )  # fmt: skip
    if v["wantErr"]:
        with pytest.raises(ProofError):
            merkle.verify_consistency(*args)
    else:
        merkle.verify_consistency(*args)


def test_roots_match_the_reference_tree() -> None:
    """Roots of the reference leaves at every size match testonly.RootHashes()."""
    leaves = [merkle.leaf_hash(x) for x in LEAF_INPUTS]
    cr = CompactRange()
    assert cr.root() == ROOTS[0] == merkle.EMPTY_ROOT
    for n, leaf in enumerate(leaves, 1):
        cr.append(leaf)
        assert cr.root() == ROOTS[n]
        assert merkle.root_from_leaves(leaves[:n]) == ROOTS[n]
        assert merkle.root_hash(n, MemoryNodes(leaves)) == ROOTS[n]


def test_generated_proofs_equal_the_reference_happy_paths() -> None:
    """Proofs we generate over the reference leaves are byte-identical to the vectors."""
    nodes = MemoryNodes([merkle.leaf_hash(x) for x in LEAF_INPUTS])
    checked = 0
    for path in _vectors("inclusion"):
        v = json.loads(path.read_text())
        if v["wantErr"] or path.parent.name in ("additional", "single-entry"):
            continue
        if _b64(v["root"]) != ROOTS[v["treeSize"]]:
            continue
        proof = merkle.inclusion_proof(v["leafIdx"], v["treeSize"], nodes)
        assert proof == [_b64(p) for p in v["proof"] or []], path
        checked += 1
    for path in _vectors("consistency"):
        v = json.loads(path.read_text())
        if v["wantErr"] or _b64(v["root2"]) != ROOTS[v["size2"]] or v["size1"] == 0:
            continue
        proof = merkle.consistency_proof(v["size1"], v["size2"], nodes)
        assert proof == [_b64(p) for p in v["proof"] or []], path
        checked += 1
    assert checked >= 8


def test_compact_range_reports_every_perfect_subtree_once() -> None:
    """Appending N leaves yields each perfect subtree exactly once with its true hash."""
    leaves = [merkle.leaf_hash(b"%d" % i) for i in range(37)]
    cr = CompactRange()
    seen: dict[NodeKey, bytes] = {}
    for leaf in leaves:
        for key, h in cr.append(leaf):
            assert key not in seen
            seen[key] = h
    for (level, index), h in seen.items():
        start = index << level
        assert h == merkle.root_from_leaves(leaves[start : start + (1 << level)])
    assert len(seen) == sum(37 >> lvl for lvl in range(6))


def test_inclusion_proof_at_a_million_leaves_is_at_most_20_hashes() -> None:
    """A tree of 10^6 leaves needs at most 20 hashes per proof (log2 bound)."""
    for index in (0, 1, 524_287, 999_999):
        assert sum(1 for _ in merkle.inclusion_keys(index, 1_000_000)) <= 20
    assert len(merkle.consistency_keys(999_000, 1_000_000)) <= 20


def test_bad_sizes_are_rejected_before_hashing() -> None:
    """Index out of range, shrinking trees and wrong hash lengths raise ProofError."""
    with pytest.raises(ProofError):
        merkle.inclusion_keys(5, 5)
    with pytest.raises(ProofError):
        merkle.consistency_keys(6, 5)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(0, 1, b"short", [], merkle.EMPTY_ROOT)


@st.composite
def _tree_and_index(draw: st.DrawFn) -> tuple[list[bytes], int]:
    size = draw(st.integers(min_value=1, max_value=70))
    leaves = [merkle.leaf_hash(b"leaf %d" % i) for i in range(size)]
    return leaves, draw(st.integers(min_value=0, max_value=size - 1))


@settings(max_examples=150, deadline=None)
@given(_tree_and_index(), st.data())
def test_every_inclusion_proof_verifies_and_every_mutation_fails(
    tree: tuple[list[bytes], int], data: st.DataObject
) -> None:
    """An inclusion proof verifies; a flipped bit, a wrong index/size/leaf or an extra or
    missing hash does not."""
    leaves, index = tree
    size = len(leaves)
    nodes = MemoryNodes(leaves)
    proof = merkle.inclusion_proof(index, size, nodes)
    merkle.verify_inclusion(index, size, leaves[index], proof, nodes.root)
    assert len(proof) <= max(1, (size - 1).bit_length())

    def rejected(i: int, n: int, leaf: bytes, p: list[bytes], root: bytes) -> None:
        with pytest.raises(ProofError):
            merkle.verify_inclusion(i, n, leaf, p, root)

    if proof:
        at = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        flipped = list(proof)
        flipped[at] = _flip(flipped[at], bit)
        rejected(index, size, leaves[index], flipped, nodes.root)
        rejected(index, size, leaves[index], proof[:-1], nodes.root)
    rejected(index, size, leaves[index], [*proof, nodes.root], nodes.root)
    rejected(index, size, leaves[index], [nodes.root, *proof], nodes.root)
    rejected(index, size, _flip(leaves[index], 0), proof, nodes.root)
    rejected(index, size, leaves[index], proof, _flip(nodes.root, 7))
    for other in (index - 1, index + 1):
        if 0 <= other < size and leaves[other] != leaves[index]:
            rejected(other, size, leaves[index], proof, nodes.root)
    # Tree size x2 and /2, each with the true root of that size (a checkpoint binds the two).
    doubled = MemoryNodes([*leaves, *(merkle.leaf_hash(b"more %d" % i) for i in range(size))])
    rejected(index, size * 2, leaves[index], proof, doubled.root)
    if index < size // 2:
        rejected(index, size // 2, leaves[index], proof, merkle.root_hash(size // 2, nodes))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 70), st.data())
def test_every_consistency_proof_verifies_and_every_mutation_fails(
    new: int, data: st.DataObject
) -> None:
    """A consistency proof verifies; flipped bits, swapped roots, wrong sizes do not."""
    old = data.draw(st.integers(1, new))
    leaves = [merkle.leaf_hash(b"leaf %d" % i) for i in range(new)]
    nodes = MemoryNodes(leaves)
    old_root = merkle.root_hash(old, nodes)
    proof = merkle.consistency_proof(old, new, nodes)
    merkle.verify_consistency(old, new, old_root, nodes.root, proof)
    if old == new:
        assert proof == []
        return

    def rejected(m: int, n: int, r1: bytes, r2: bytes, p: list[bytes]) -> None:
        with pytest.raises(ProofError):
            merkle.verify_consistency(m, n, r1, r2, p)

    at = data.draw(st.integers(0, len(proof) - 1))
    flipped = list(proof)
    flipped[at] = _flip(flipped[at], data.draw(st.integers(0, 255)))
    rejected(old, new, old_root, nodes.root, flipped)
    rejected(old, new, old_root, nodes.root, proof[:-1])
    rejected(old, new, old_root, nodes.root, [*proof, old_root])
    rejected(old, new, nodes.root, old_root, proof)
    rejected(old, new, _flip(old_root, 3), nodes.root, proof)
    rejected(old, new, old_root, _flip(nodes.root, 3), proof)
    if old + 1 < new:
        rejected(old + 1, new, old_root, nodes.root, proof)
    if old > 1:
        rejected(old - 1, new, old_root, nodes.root, proof)
    rejected(old, new * 2, old_root, nodes.root, proof)


def _flip(value: bytes, bit: int) -> bytes:
    raw = bytearray(value)
    raw[(bit // 8) % len(raw)] ^= 1 << (bit % 8)
    return bytes(raw)
