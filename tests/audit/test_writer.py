"""The writer isolates a record that cannot be stored: it never takes other records with it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import coworker
from coworker import _setup
from coworker.audit.pipeline import build_pipeline
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain
from coworker.audit.writer import AuditWriter
from tests.audit.conftest import SpanFactory, make_entries


def test_unencodable_record_is_stored_altered_and_named(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A span with a lone surrogate in user.id (set past every boundary check) is written with
    the bad characters escaped and one loud line; the following records are all stored."""
    pipeline = build_pipeline(f"sqlite:///{db_path}", on_failure="log")
    factory = SpanFactory(pipeline.processor)
    with caplog.at_level(logging.WARNING, logger="coworker.audit"):
        factory.run(0, **{"user.id": "bad\ud800"})
        for i in range(1, 6):
            factory.run(i, **{"user.id": "bob"})
    writer = pipeline.exporter.writer
    assert writer.retry_depth == 0 and writer.lost == 0
    records = [r.fields() for r in pipeline.store.iter_from(1)]
    assert [r["run_id"] for r in records] == [f"run-{i}" for i in range(6)]
    assert records[0]["user_id"] == "bad\\ud800"  # visible, not silently replaced
    assert [r["user_id"] for r in records[1:]] == ["bob"] * 5
    altered = [r for r in caplog.records if "ALTERED" in r.getMessage()]
    assert len(altered) == 1 and "run=run-0" in altered[0].getMessage()
    assert altered[0].levelno == logging.CRITICAL and "user_id" in altered[0].getMessage()
    assert verify_chain(pipeline.store).ok
    pipeline.shutdown()


def test_unrepresentable_values_do_not_block_the_batch(db_path: Path) -> None:
    """A float NaN or a huge integer in a field (what a hostile exporter client could send)
    is stored as text; the records of the same group commit are stored too."""
    store = SQLiteStore(db_path)
    writer = AuditWriter(store, on_failure="log")
    entries = make_entries(3)
    entries[1][0]["intent_seq"] = 2**80
    entries[2][0]["doctype"] = float("nan")
    records = writer.write(entries)
    assert len(records) == 3 and writer.retry_depth == 0
    stored = [r.fields() for r in store.iter_from(1)]
    assert stored[1]["intent_seq"] == str(2**80) and stored[2]["doctype"] == "nan"
    store.close()


def test_surrogate_user_is_refused_before_it_reaches_the_trail(db_path: Path) -> None:
    """acting_as with a lone surrogate raises at once; the other user's records all land."""
    coworker.configure(audit=f"sqlite:///{db_path}", audit_failure="log", metrics=False)

    @coworker.run(operation="update", doctype="Invoice")
    def update(i: int) -> int:
        return i

    with pytest.raises(ValueError, match="UTF-8"):
        coworker.acting_as("eve\ud800")
    with coworker.acting_as("bob"):
        for i in range(5):
            update(i)
    store = _setup.audit_store()
    assert [json.loads(r.body)["user_id"] for r in store.iter_from(1)] == ["bob"] * 5
