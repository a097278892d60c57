"""A row inserted with another record's dedup key (chained correctly, another body) must not
make the genuine record be answered "duplicate" and dropped: the writer confirms the row is
that record before it answers so, and verify names the forged row (the real PostgreSQL
server; SQLite's in-process index, which derives every key from the bodies)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from coworker.audit.dedup import body_key, key_matches
from coworker.audit.record import canonical
from coworker.cli import main

TRACE, SPAN = "ab" * 16, "cd" * 8


def span_record(name: str) -> dict[str, Any]:
    from coworker.ingest.records import QUERY_FIELDS

    fields: dict[str, Any] = dict.fromkeys(QUERY_FIELDS)
    fields.update(
        kind="outcome", category="state-change", operation="update", trace_id=TRACE,
        span_id=SPAN, recorded_at="2026-01-01T00:00:00.000000000Z", name=name,
    )  # fmt: skip
    return fields


def genuine_key(fields: dict[str, Any]) -> bytes:
    from coworker.ingest.records import dedup_key

    return dedup_key(bytes.fromhex(fields["trace_id"]) + bytes.fromhex(fields["span_id"]), fields)


def test_a_key_is_checked_against_its_body() -> None:
    genuine = span_record("genuine")
    key = genuine_key(genuine)
    assert key_matches(key, canonical({**genuine, "seq": 5}))
    assert body_key(key, canonical({**span_record("forged"), "seq": 5})) not in (None, key)
    assert key_matches(b"app-key", b"{}")  # nothing to check


@pytest.mark.postgres
def test_a_forged_dedup_key_does_not_drop_the_genuine_record_on_postgres(
    pg: Any, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row carrying the key of a span yet to arrive, with another body: the span, when it
    arrives, is written (not a duplicate; CRITICAL log), and verify names the forged row."""
    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    store = PostgresStore(url, spool=None)
    genuine = span_record("genuine")
    key = genuine_key(genuine)
    forged = store.append_unique([span_record("forged")], None, [key])
    assert [r.seq for r in forged.records] == [1]
    caplog.set_level(logging.CRITICAL, logger="coworker.audit")
    result = store.append_unique([genuine], None, [key])
    assert result.duplicates == [] and [r.seq for r in result.records] == [2]
    assert any("seq 1, whose body is not that record" in r.getMessage() for r in caplog.records)
    # Resent after the forgery: its re-key is held by itself, a duplicate.
    assert store.append_unique([genuine], None, [key]).duplicates == [0]
    # A forger who also took the re-key: the record is still written (without a key).
    from coworker.audit.dedup import rekey

    third = {**span_record("third"), "span_id": "01" * 8}
    tkey = genuine_key(third)
    store.append_unique([span_record("forged")], None, [tkey])
    store.append_unique([span_record("forged")], None, [rekey(tkey)])
    assert [r.seq for r in store.append_unique([third], None, [tkey]).records] == [5]
    # A genuine resend of a record whose key is its own is still a duplicate.
    other = {**span_record("other"), "span_id": "ef" * 8}
    okey = genuine_key(other)
    assert store.append_unique([other], None, [okey]).records
    assert store.append_unique([other], None, [okey]).duplicates == [0]
    store.close()
    capsys.readouterr()
    assert main(["audit", "verify", "--url", url]) == 1
    out = capsys.readouterr().out
    # seq 4 holds a forged re-key: 32 bytes on a record that does not earn it, which is also
    # what an application's own key (a SHA-256 digest) on its record looks like, so verify
    # trusts it; the writer did not (the genuine record went in without a key, seq 5).
    assert "seq 1" in out and "seq 3" in out and "seq 4" not in out
    assert "dedup key is not its body's" in out and "seq 2" not in out and "seq 5" not in out
    bodies = [r.fields()["name"] for r in PostgresStore(url, readonly=True).iter_from(1)]
    assert bodies == ["forged", "genuine", "forged", "forged", "third", "other"]


def test_sqlite_dedup_derives_every_key_from_the_bodies(tmp_path: Path) -> None:
    """SQLite keeps no key column: ingest's in-process index recomputes each key from the
    bodies, so a row with a span's ids and another body is a conflict, not a duplicate."""
    from coworker.audit.store_sqlite import SQLiteStore
    from coworker.ingest.records import _SeenSpans

    store = SQLiteStore(tmp_path / "a.db")
    store.append([span_record("forged")])  # the file's writer, by hand
    genuine = span_record("genuine")
    fresh, duplicates, conflicts = _SeenSpans(store).append(
        [genuine], [None], [genuine_key(genuine)], None
    )
    assert (fresh, duplicates, conflicts) == (1, 0, 1)
    assert [r.fields()["name"] for r in store.iter_from(1)][:2] == ["forged", "genuine"]
    store.close()


@pytest.mark.postgres
@pytest.mark.parametrize(
    "key",
    [
        __import__("hashlib").sha256(b"order-1").digest(),  # 32 bytes, a conflict key's length
        b"0123456789abcdef0123456789abcdef",  # uuid4().hex: 32 bytes too
        b"order-000000000000000001",  # 24 bytes, a legacy span key's length
    ],
    ids=["sha256", "uuid-hex", "24-chars"],
)
def test_an_applications_own_key_of_a_coworker_keys_length_still_deduplicates(
    pg: Any, key: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """An application's append_unique with keys of its own (a SHA-256 digest, a uuid's hex)
    whose length is that of a key coworker derives: its resend was taken for a forgery (the
    row holding the key is no ingest conflict record), written again with a CRITICAL line on
    every retry, and verify failed a sound log with dedup-mismatch."""
    from coworker.audit.store_postgres import PostgresStore

    url = pg.schema_url()
    store = PostgresStore(url, spool=None)
    order = {"kind": "outcome", "category": "state-change", "operation": "pay", "order": 1}
    assert [r.seq for r in store.append_unique([order], None, [key]).records] == [1]
    again = store.append_unique([order], None, [key])
    assert again.duplicates == [0] and again.records == []
    store.close()
    capsys.readouterr()
    assert main(["audit", "verify", "--url", url]) == 0, capsys.readouterr().out


def _genuine(form: str) -> tuple[dict[str, Any], bytes]:
    """A record of each key form coworker derives, with its key."""
    from coworker.audit.chain_registry import registry_entry, registry_key
    from coworker.ingest.records import _conflict_entry, _conflict_key

    ids = bytes.fromhex(TRACE + SPAN)
    if form == "span":
        fields = span_record("genuine")
        return fields, genuine_key(fields)
    if form == "conflict":
        pair = [(b"\x01" * 32, 1), (b"\x02" * 32, 2)]
        return _conflict_entry(ids, pair, 2, None), _conflict_key(ids, b"\x02" * 32)
    return registry_entry("billing"), registry_key("billing")


@pytest.mark.postgres
@pytest.mark.parametrize("form", ["span", "conflict", "registry"])
def test_a_forged_key_on_an_unrelated_body_does_not_drop_the_genuine_record(
    pg: Any, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer's check does not depend on what the forged row's body looks like: the
    genuine record earns its key, the row holding it does not, so it is written."""
    from coworker.audit.store_postgres import PostgresStore

    store = PostgresStore(pg.schema_url(), spool=None)
    try:
        fields, key = _genuine(form)
        store.append_unique([{"kind": "outcome", "category": "x"}], None, [key])
        caplog.set_level(logging.CRITICAL, logger="coworker.audit")
        result = store.append_unique([fields], None, [key])
        assert result.duplicates == [] and [r.seq for r in result.records] == [2]
        assert any("whose body is not that record" in r.getMessage() for r in caplog.records)
    finally:
        store.close()
