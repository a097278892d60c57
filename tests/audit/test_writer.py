"""The writer isolates a record that cannot be stored: it never takes other records with it."""

from __future__ import annotations

import json
import logging
import sqlite3
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


def _reject_user(db_path: Path, user: str) -> None:
    """What a store that refuses one record's content looks like: a real SQLite trigger."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(
        "CREATE TRIGGER reject_user BEFORE INSERT ON audit_records "
        f"WHEN NEW.user_id = '{user}' BEGIN SELECT RAISE(ABORT, 'rejected'); END"
    )
    conn.close()


def test_rejected_record_does_not_block_the_retry_queue(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under "log", a record the store refuses (not an outage) is isolated: the following
    records of another user are all written, nothing waits in the queue for ever."""
    long_user = "x" * 5000
    store = SQLiteStore(db_path)
    _reject_user(db_path, long_user)
    writer = AuditWriter(store, on_failure="log")
    bad = make_entries(1, **{"user.id": long_user})
    good = make_entries(5, start=1, **{"user.id": "bob"})
    with caplog.at_level(logging.WARNING, logger="coworker.audit"):
        writer.write(bad)
        for entry in good:
            writer.write([entry])
    assert writer.retry_depth == 0 and writer.lost == 0
    users = [r.fields()["user_id"] for r in store.iter_from(1)]
    assert users[0].startswith("<5000 characters, sha256 ") and users[1:] == ["bob"] * 5
    rejected = [r for r in caplog.records if "REJECTED" in r.getMessage()]
    assert len(rejected) == 1 and "user_id" in rejected[0].getMessage()
    with sqlite3.connect(db_path) as conn:  # verify reports a foreign trigger: remove ours
        conn.execute("DROP TRIGGER reject_user")
    assert verify_chain(store).ok
    store.close()


def test_rejected_record_inside_a_group_commit(db_path: Path) -> None:
    """One refused record in a multi-record append: the others are written in order."""
    long_user = "y" * 3000
    store = SQLiteStore(db_path)
    _reject_user(db_path, long_user)
    writer = AuditWriter(store, on_failure="raise")
    entries = make_entries(2) + make_entries(1, start=2, **{"user.id": long_user})
    entries += make_entries(2, start=3)
    records = writer.write(entries)
    assert len(records) == 5
    runs = [r.fields()["run_id"] for r in store.iter_from(1)]
    assert runs == [f"run-{i}" for i in range(5)]
    store.close()


def test_outage_is_not_mistaken_for_a_bad_record(db_path: Path) -> None:
    """A store that refuses everything (read-only) fails the batch; nothing is shortened."""
    SQLiteStore(db_path).close()
    store = SQLiteStore(db_path, readonly=True)
    writer = AuditWriter(store, on_failure="log")
    writer.write(make_entries(3, **{"user.id": "z" * 400}))
    assert writer.retry_depth == 3 and writer.lost == 0
    store.close()


@pytest.mark.postgres
def test_postgres_index_limit_record_is_isolated(tmp_path: Path) -> None:
    """PostgreSQL refuses a user id beyond its btree row limit: that record becomes a failure
    record and the following ones are stored (before: all queued behind it)."""
    from tests.pg import PGServer, require_server

    pg = PGServer(require_server())
    try:
        from coworker.audit.store_postgres import PostgresStore

        store = PostgresStore(pg.schema_url(), spool=tmp_path / "spool.db")
        writer = AuditWriter(store, on_failure="log")
        writer.write(make_entries(1, **{"user.id": "u" * 300_000}))
        for entry in make_entries(3, start=1):
            writer.write([entry])
        assert writer.retry_depth == 0
        users = [r.fields()["user_id"] for r in store.iter_from(1)]
        assert users[0].startswith("<300000 characters") and users[1:] == ["alice"] * 3
        store.close()
    finally:
        pg.close()


def test_overlong_ids_are_refused_at_the_boundary() -> None:
    """An id no store can index (here 600 characters) fails where it is handed over."""
    with pytest.raises(ValueError, match="at most 512"):
        coworker.acting_as("u" * 600)
    with pytest.raises(ValueError, match="at most 512"):
        coworker.flow("workflow", "f" * 600)
    with pytest.raises(ValueError, match="at most 512"):
        coworker.run(operation="update", doctype="D" * 600)
    coworker.acting_as("u" * 512)  # the limit itself is fine


def test_metrics_count_records_and_time_each_append_once(db_path: Path) -> None:
    """One group commit of three records of two categories adds 3 to the append counter and
    one observation per category to the duration histogram."""
    import functools

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from coworker import attributes as a
    from coworker.metrics import audit_append

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    store = SQLiteStore(db_path)
    writer = AuditWriter(store)
    writer._metric = functools.partial(audit_append, meter_provider=provider)
    entries = make_entries(3)
    entries[2][0]["category"] = a.CATEGORY_AUTHORIZATION_FAILURE
    assert len(writer.write(entries)) == 3
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {
        m.name: {p.attributes[a.AUDIT_CATEGORY]: p for p in m.data.data_points}
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    appends = metrics[a.METRIC_AUDIT_APPENDS]
    assert appends[a.CATEGORY_STATE_CHANGE].value == 2
    assert appends[a.CATEGORY_AUTHORIZATION_FAILURE].value == 1
    duration = metrics[a.METRIC_AUDIT_APPEND_DURATION]
    assert duration[a.CATEGORY_STATE_CHANGE].count == 1
    assert duration[a.CATEGORY_AUTHORIZATION_FAILURE].count == 1
    store.close()
