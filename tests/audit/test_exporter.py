"""The exporter, the synchronous processor, the fail-closed gate and the failure policies."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace.export import SpanExportResult

import coworker
from coworker import attributes as a
from coworker.audit.exporter import AuditSpanExporter
from coworker.audit.pipeline import build_pipeline
from coworker.audit.query import IN_DOUBT, in_doubt, query
from coworker.audit.store import InMemoryStore, StoredRecord
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain
from coworker.exceptions import AuditUnavailable, ConfigError
from tests.audit.conftest import SpanFactory


def _count(path: Path) -> int:
    """Run records (a workflow's flow events, category flow, are not counted)."""
    conn = sqlite3.connect(path)
    try:
        sql = "SELECT COUNT(*) FROM audit_records WHERE category IS NOT 'flow'"
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


# -- the exporter --------------------------------------------------------------------------


def test_entry_point_loads_the_exporter() -> None:
    """OTEL_TRACES_EXPORTER=coworker_audit resolves to AuditSpanExporter."""
    (ep,) = entry_points(group="opentelemetry_traces_exporter", name="coworker_audit")
    assert ep.load() is AuditSpanExporter


def test_no_arg_exporter_uses_env_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AuditSpanExporter() opens COWORKER_AUDIT_URL."""
    monkeypatch.setenv("COWORKER_AUDIT_URL", f"sqlite:///{tmp_path}/env.db")
    exporter = AuditSpanExporter()
    assert isinstance(exporter.store, SQLiteStore)
    assert exporter.store.path == f"{tmp_path}/env.db"
    exporter.shutdown()


def test_no_arg_exporter_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a URL the default .coworker/audit.db in the working directory is used."""
    monkeypatch.delenv("COWORKER_AUDIT_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    exporter = AuditSpanExporter()
    factory = SpanFactory()
    assert exporter.export([factory.run(1)]) is SpanExportResult.SUCCESS
    factory.shutdown()
    exporter.shutdown()
    assert _count(tmp_path / ".coworker" / "audit.db") == 1


def test_export_keeps_only_audit_spans() -> None:
    """Spans without coworker.audited=True do not reach the store."""
    store = InMemoryStore()
    exporter = AuditSpanExporter(store)
    factory = SpanFactory()
    spans = [factory.run(1), factory.run(2, **{a.AUDITED: False}), factory.run(3)]
    with factory.tracer.start_as_current_span("plain read"):
        pass
    spans.append(factory.memory.get_finished_spans()[-1])
    factory.shutdown()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert [r.fields()["run_id"] for r in store.iter_from(1)] == ["run-1", "run-3"]
    exporter.shutdown()
    assert exporter.export(spans) is SpanExportResult.FAILURE


def test_export_failure_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """export() returns FAILURE and logs when the store fails; it never raises."""
    SQLiteStore(tmp_path / "ro.db").close()
    exporter = AuditSpanExporter(f"sqlite:///{tmp_path}/ro.db?mode=ro")
    factory = SpanFactory()
    with caplog.at_level(logging.ERROR, logger="coworker.audit"):
        assert exporter.export([factory.run(1)]) is SpanExportResult.FAILURE
    factory.shutdown()
    assert "queued for retry" in caplog.text
    assert exporter.writer.retry_depth == 1
    exporter.shutdown()


# -- the synchronous processor ----------------------------------------------------------------


def test_record_is_durable_when_span_ends(db_path: Path) -> None:
    """When span.end() returns, another connection already sees the record."""
    pipeline = build_pipeline(f"sqlite:///{db_path}")
    factory = SpanFactory(pipeline.processor)
    for i in range(3):
        factory.run(i)
        assert _count(db_path) == i + 1
    pipeline.shutdown()


def test_raise_policy_propagates_from_span_end(db_path: Path) -> None:
    """With on_failure='raise' a failed append raises AuditUnavailable out of span.end()."""
    SQLiteStore(db_path).close()
    pipeline = build_pipeline(f"sqlite:///{db_path}?mode=ro", on_failure="raise")
    factory = SpanFactory(pipeline.processor)
    with pytest.raises(AuditUnavailable, match="readonly"):
        factory.run(1)
    pipeline.shutdown()


def test_log_policy_queues_and_retries(db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With on_failure='log' a failed record is logged, queued and written on the next append."""
    pipeline = build_pipeline(f"sqlite:///{db_path}?busy_timeout=0.05", on_failure="log")
    factory = SpanFactory(pipeline.processor)
    factory.run(0)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with caplog.at_level(logging.ERROR, logger="coworker.audit"):
        factory.run(1)  # does not raise
        factory.run(2)
    blocker.execute("ROLLBACK")
    blocker.close()
    assert caplog.text.count("queued for retry") == 2
    assert pipeline.exporter.writer.retry_depth == 2
    factory.run(3)  # the store is back: queued records go first, in order
    assert pipeline.exporter.writer.retry_depth == 0
    runs = [r.fields()["run_id"] for r in pipeline.store.iter_from(1)]
    assert runs == ["run-0", "run-1", "run-2", "run-3"]
    assert verify_chain(pipeline.store).ok
    pipeline.shutdown()


def test_full_retry_queue_is_loud(db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A record pushed out of a full retry queue is logged as lost, and counted."""
    SQLiteStore(db_path).close()
    pipeline = build_pipeline(f"sqlite:///{db_path}?mode=ro", on_failure="log", retry_limit=2)
    factory = SpanFactory(pipeline.processor)
    with caplog.at_level(logging.ERROR, logger="coworker.audit"):
        for i in range(3):
            factory.run(i)
    assert "AUDIT RECORD LOST" in caplog.text and "run=run-0" in caplog.text
    assert pipeline.exporter.writer.lost == 1
    with caplog.at_level(logging.ERROR, logger="coworker.audit"):
        assert pipeline.processor.force_flush() is False
        pipeline.shutdown()
    assert caplog.text.count("AUDIT RECORD LOST") == 3  # the two queued ones at shutdown
    assert pipeline.exporter.writer.lost == 3


def test_force_flush_writes_queued_records(db_path: Path) -> None:
    """force_flush() retries the queue once the store is back."""
    pipeline = build_pipeline(f"sqlite:///{db_path}?busy_timeout=0.05", on_failure="log")
    factory = SpanFactory(pipeline.processor)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    factory.run(1)
    assert pipeline.processor.force_flush() is False
    blocker.execute("ROLLBACK")
    blocker.close()
    assert pipeline.processor.force_flush() is True
    assert _count(db_path) == 1
    pipeline.shutdown()


def test_full_disk_raise_policy(db_path: Path) -> None:
    """A full database raises AuditUnavailable per record; nothing partial, chain intact."""
    store = SQLiteStore(db_path)
    store.close()
    pages = sqlite3.connect(db_path).execute("PRAGMA page_count").fetchone()[0]
    pipeline = build_pipeline(f"sqlite:///{db_path}?max_page_count={pages + 2}")
    factory = SpanFactory(pipeline.processor)
    written = failed = 0
    for i in range(200):
        try:
            factory.run(i, **{a.DOCTYPE: "x" * 500})
            written += 1
        except AuditUnavailable:
            failed += 1
    assert failed > 0
    assert _count(db_path) == written
    assert verify_chain(pipeline.store).ok
    pipeline.shutdown()


def test_group_commit_from_many_threads(db_path: Path) -> None:
    """Concurrent audited runs are all durable, gapless, and verify."""
    pipeline = build_pipeline(f"sqlite:///{db_path}")
    factory = SpanFactory(pipeline.processor)

    def work(t: int) -> None:
        for i in range(50):
            factory.run(t * 1000 + i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _count(db_path) == 400
    report = verify_chain(pipeline.store)
    assert report.ok and report.checked == 400
    pipeline.shutdown()


class _RecordingStore(InMemoryStore):
    """A real store that also notes whether instrumentation was suppressed during appends."""

    def __init__(self) -> None:
        super().__init__()
        self.suppressed: list[Any] = []

    def append(
        self, entries: Sequence[Mapping[str, Any]], payloads: Sequence[bytes | None] | None = None
    ) -> list[StoredRecord]:
        key = otel_context._SUPPRESS_INSTRUMENTATION_KEY
        self.suppressed.append(otel_context.get_value(key))
        return super().append(entries, payloads)


def test_store_writes_suppress_instrumentation() -> None:
    """DB instrumentation cannot trace the audit trail's own writes."""
    store = _RecordingStore()
    pipeline = build_pipeline(store)
    factory = SpanFactory(pipeline.processor)
    factory.run(1)
    assert store.suppressed == [True]
    pipeline.shutdown()


def test_pipeline_does_not_close_a_store_it_was_given() -> None:
    """A store passed in stays open after shutdown; bad options fail fast."""
    store = InMemoryStore()
    pipeline = build_pipeline(store)
    pipeline.shutdown()
    assert store.append([{"a": "b"}])[0].seq == 1
    with pytest.raises(ConfigError, match="audit_failure"):
        build_pipeline(store, on_failure="ignore")


# -- the fail-closed gate -----------------------------------------------------------------------


def test_gate_writes_intent_then_outcome(db_path: Path) -> None:
    """The gate appends an intent; the outcome points back at it; nothing is in doubt."""
    pipeline = build_pipeline(f"sqlite:///{db_path}", fail_closed=True)
    assert pipeline.gate is not None
    factory = SpanFactory(pipeline.processor)
    with factory.tracer.start_as_current_span("update", attributes={a.AUDITED: True}) as span:
        seq = pipeline.gate.intent(span)
        assert _count(db_path) == 1
    records = list(pipeline.store.iter_from(1))
    assert [r.fields()["kind"] for r in records] == ["intent", "outcome"]
    assert records[1].fields()["intent_seq"] == seq == 1
    assert in_doubt(pipeline.store) == []
    pipeline.shutdown()


def test_gate_failure_raises(db_path: Path) -> None:
    """An intent that cannot be written raises AuditUnavailable, even under 'log'."""
    SQLiteStore(db_path).close()
    pipeline = build_pipeline(f"sqlite:///{db_path}?mode=ro", fail_closed=True, on_failure="log")
    factory = SpanFactory()
    assert pipeline.gate is not None
    with factory.tracer.start_as_current_span("update") as span, pytest.raises(AuditUnavailable):
        pipeline.gate.intent(span)
    factory.shutdown()
    pipeline.shutdown()


def test_intent_without_outcome_is_in_doubt(db_path: Path) -> None:
    """An intent whose run never ended shows as in-doubt in query and verify."""
    pipeline = build_pipeline(f"sqlite:///{db_path}", fail_closed=True)
    assert pipeline.gate is not None
    factory = SpanFactory()  # no audit processor: the outcome is never written (a crash)
    with factory.tracer.start_as_current_span("update", attributes={a.AUDITED: True}) as span:
        pipeline.gate.intent(span)
    factory.shutdown()
    assert [e.status for e in query(pipeline.store)] == [IN_DOUBT]
    assert verify_chain(pipeline.store).in_doubt == (1,)
    assert in_doubt(InMemoryStore()) == []
    pipeline.shutdown()


# -- end to end with @coworker.run ------------------------------------------------------------


def _app() -> dict[str, Callable[..., Any]]:
    @coworker.run(operation="update", doctype="Invoice", capture_input=True)
    def update_invoice(invoice_id: str, amount: int) -> str:
        return invoice_id

    @coworker.run(operation="submit", doctype="Invoice")
    def submit_invoice(invoice_id: str) -> None:
        raise coworker.ValidationError("amount must be positive")

    @coworker.run(operation="read", doctype="Invoice")
    def read_invoice(invoice_id: str) -> str:
        return invoice_id

    return {"update": update_invoice, "submit": submit_invoice, "read": read_invoice}


def test_coworker_run_end_to_end(db_path: Path) -> None:
    """Real @coworker.run calls: state changes and failures are audited, reads are not."""
    coworker.configure(audit=f"sqlite:///{db_path}")
    app = _app()
    with coworker.acting_as("alice", agent="agent-7"), coworker.flow("workflow"):
        app["update"]("INV-1", 10)
        assert _count(db_path) == 1  # durable when the call returned
        app["read"]("INV-1")
        with pytest.raises(coworker.ValidationError):
            app["submit"]("INV-1")
    coworker.shutdown()
    store = SQLiteStore(db_path, readonly=True)
    entries = [e for e in query(store) if e.fields["category"] != "flow"]  # runs only
    assert [(e.fields["operation"], e.fields["category"], e.status) for e in entries] == [
        ("update", a.CATEGORY_STATE_CHANGE, "ok"),
        ("submit", a.CATEGORY_VALIDATION_VIOLATION, "coworker.exceptions.ValidationError"),
    ]
    assert {e.fields["user_id"] for e in entries} == {"alice"}
    assert entries[0].payload is not None and b"INV-1" in entries[0].payload
    assert b"INV-1" not in next(store.iter_from(1)).body
    assert verify_chain(store).ok
    store.close()


def test_coworker_fail_closed_refuses_to_run(db_path: Path) -> None:
    """fail_closed: when the intent cannot be written the function body never runs."""
    SQLiteStore(db_path).close()
    coworker.configure(audit=f"sqlite:///{db_path}?mode=ro", fail_closed=True)
    ran: list[int] = []

    @coworker.run(operation="delete", doctype="Invoice")
    def delete_invoice() -> None:
        ran.append(1)

    with pytest.raises(AuditUnavailable):
        delete_invoice()
    assert ran == []


def test_coworker_fail_closed_intent_and_outcome(db_path: Path) -> None:
    """fail_closed: an intent before the body, the outcome after, linked."""
    coworker.configure(audit=f"sqlite:///{db_path}", fail_closed=True)
    seen: list[int] = []

    @coworker.run(operation="create", doctype="Invoice")
    def create_invoice() -> None:
        seen.append(_count(db_path))

    create_invoice()
    coworker.shutdown()
    assert seen == [1]
    store = SQLiteStore(db_path, readonly=True)
    kinds = [(r.fields()["kind"], r.fields()["intent_seq"]) for r in store.iter_from(1)]
    assert kinds == [("intent", None), ("outcome", 1)]
    store.close()


def test_coworker_run_classification_reaches_the_trail(db_path: Path) -> None:
    """Sensitive reads and failed changes are audited; ordinary reads and their errors not."""
    coworker.configure(audit=f"sqlite:///{db_path}", sensitive_doctypes=["Salary"])

    @coworker.run(operation="read", doctype="Salary")
    def read_salary() -> int:
        return 1

    @coworker.run(operation="read", doctype="Invoice")
    def read_invoice_broken() -> None:
        raise RuntimeError("db down")

    @coworker.run(operation="delete", doctype="Invoice")
    def delete_invoice_broken() -> None:
        raise RuntimeError("db down")

    read_salary()
    with pytest.raises(RuntimeError):
        read_invoice_broken()
    with pytest.raises(RuntimeError):
        delete_invoice_broken()
    coworker.shutdown()
    store = SQLiteStore(db_path, readonly=True)
    got = [(e.fields["doctype"], e.fields["category"], e.status) for e in query(store)]
    store.close()
    assert got == [
        ("Salary", a.CATEGORY_SENSITIVE_READ, "ok"),
        ("Invoice", a.CATEGORY_STATE_CHANGE, "RuntimeError"),
    ]
