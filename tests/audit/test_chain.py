"""The hash chain: genesis, the link formula, seal."""

from __future__ import annotations

import hashlib

from coworker.audit.chain import GENESIS_PREV_HASH, link, seal
from coworker.audit.record import canonical
from coworker.audit.store import Head


def test_genesis_is_32_zero_bytes() -> None:
    """Record 1 chains from 32 zero bytes."""
    assert GENESIS_PREV_HASH == b"\x00" * 32


def test_link_is_sha256_of_prev_and_body() -> None:
    """hash = SHA-256(prev_hash || body)."""
    assert link(b"\x01" * 32, b"{}") == hashlib.sha256(b"\x01" * 32 + b"{}").digest()


def test_seal_numbers_and_chains() -> None:
    """seal assigns consecutive seqs and chains each record onto the previous one."""
    first = seal([{"a": "1"}, {"a": "2"}], None)
    assert [r.seq for r in first] == [1, 2]
    assert first[0].prev_hash == GENESIS_PREV_HASH
    assert first[0].body == canonical({"a": "1", "seq": 1})
    assert first[1].prev_hash == first[0].hash
    assert first[1].hash == link(first[0].hash, first[1].body)
    more = seal([{"a": "3"}], Head(2, first[1].hash), [b"payload"])
    assert more[0].seq == 3 and more[0].prev_hash == first[1].hash
    assert more[0].payload == b"payload"


def test_payload_is_not_hashed() -> None:
    """Erasing a payload cannot change any hash."""
    with_payload = seal([{"a": "1"}], None, [b"secret"])
    without = seal([{"a": "1"}], None, [None])
    assert with_payload[0].hash == without[0].hash


def test_prepared_bodies_are_byte_identical_to_canonical() -> None:
    """Splicing the seq into a prepared template gives exactly canonical({**fields, seq})."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from coworker.audit.chain import Prepared
    from coworker.audit.record import canonical

    keys = st.text(min_size=1, max_size=12).filter(lambda k: k != "seq")
    values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1),
        st.text(max_size=30),
        st.just('"seq":0'),
        st.just('\\"seq":0,'),
    )

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(keys, values, max_size=8), st.integers(min_value=1, max_value=2**53 - 1))
    def check(fields: dict, seq: int) -> None:
        assert Prepared(fields).body(seq) == canonical({**fields, "seq": seq})

    check()


def test_seal_after_is_seal_onto_that_head() -> None:
    """seal_after(seq, hash) seals exactly as seal onto Head(seq, hash); 0 and the genesis
    value as seal onto an empty log."""
    from coworker.audit.chain import prepare, seal_after

    entries = [{"a": "1"}, {"a": "2"}]
    assert seal_after(prepare(entries), 0, GENESIS_PREV_HASH) == seal(entries, None)
    head = Head(7, b"\x02" * 32)
    assert seal_after(prepare(entries), 7, head.hash, [b"p", None]) == seal(
        entries, head, [b"p", None]
    )
