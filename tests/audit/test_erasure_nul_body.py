"""A record whose body holds a \\u0000 (a NUL in any string: an ingested span's name) is one
PostgreSQL's jsonb cannot read: erasure, which picked the subject's payloads with a jsonb
cast over every record with a payload, failed for every subject (the real server)."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.postgres


def test_a_body_jsonb_cannot_read_does_not_block_erasure(pg: Any) -> None:
    """Alice's payload is erased although other records hold a NUL; bob's payloads in such
    records (by user id and by payload subject) are erased when he asks, and a legal hold on
    a flow still covers a subject named only in such a record."""
    from coworker.audit.erasure import ErasureRefused, hold_entry
    from coworker.audit.store_postgres import PostgresStore

    store = PostgresStore(pg.schema_url(), spool=None)
    try:
        store.append(
            [
                {"kind": "outcome", "user_id": "bob", "name": "a\x00b"},
                {"kind": "outcome", "user_id": "alice", "name": "plain"},
                {"kind": "outcome", "user_id": "x", "payload_subject": "bob", "name": "\x00"},
                {"kind": "outcome", "user_id": "y", "payload_subject": "carol", "name": "\x00",
                 "flow_id": "f1"},
            ],
            [b"bob's", b"alice's", b"bob's too", b"carol's"],
        )  # fmt: skip
        assert store.erase("alice", "gdpr").seqs == (2,)
        assert store.erase("bob", "gdpr").seqs == (1, 3)
        store.append([hold_entry(subject=None, flow_id="f1", reason="litigation", by=None)])
        with pytest.raises(ErasureRefused):
            store.erase("carol", "gdpr")
    finally:
        store.close()
