"""Fixtures for the audit tests: real SQLite files in tmp_path and span factories.

Spans come from a private SDK ``TracerProvider`` (never the global one, which
``tests/conftest.py`` owns) so that each test wires exactly the processors it tests.
End-to-end tests use ``coworker.configure`` + real ``@coworker.run`` calls instead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coworker import attributes as a
from coworker.audit.record import entry_from_span
from coworker.audit.store_sqlite import SQLiteStore


def audit_attributes(i: int = 0, **overrides: Any) -> dict[str, Any]:
    """Start attributes of an audited state-change run number ``i``."""
    attrs: dict[str, Any] = {
        a.AUDITED: True,
        a.AUDIT_CATEGORY: a.CATEGORY_STATE_CHANGE,
        a.OPERATION: "update",
        a.DOCTYPE: "Invoice",
        a.FLOW_TYPE: "workflow",
        a.FLOW_ID: "flow-1",
        a.STEP_ID: "approve",
        a.RUN_ID: f"run-{i}",
        a.CHAIN_ID: f"run-{i}",
        a.USER_ID: "alice",
        a.AGENT_ID: "agent-7",
        a.AGENT_NAME: "billing-assistant",
        a.SESSION_ID: "sess-1",
    }
    attrs.update(overrides)
    return {k: v for k, v in attrs.items() if v is not None}


class SpanFactory:
    """A private tracer provider whose finished spans are also kept in memory."""

    def __init__(self, *processors: SpanProcessor) -> None:
        self.memory = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({a.SERVICE_NAME: "billing"}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        for p in processors:
            self.provider.add_span_processor(p)
        self.tracer = self.provider.get_tracer("coworker-audit-tests")

    def run(self, i: int = 0, *, name: str = "update Invoice", **overrides: Any) -> ReadableSpan:
        """Start and end one audited span; return the finished span."""
        with self.tracer.start_as_current_span(name, attributes=audit_attributes(i, **overrides)):
            pass
        return self.memory.get_finished_spans()[-1]

    def shutdown(self) -> None:
        self.provider.shutdown()


@pytest.fixture
def span_factory() -> Iterator[Callable[..., SpanFactory]]:
    """Build :class:`SpanFactory` objects; their providers are shut down after the test."""
    made: list[SpanFactory] = []

    def make(*processors: SpanProcessor) -> SpanFactory:
        f = SpanFactory(*processors)
        made.append(f)
        return f

    yield make
    for f in made:
        f.shutdown()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Path of a fresh SQLite audit file."""
    return tmp_path / "audit.db"


@pytest.fixture
def sqlite_file_store(db_path: Path) -> Iterator[SQLiteStore]:
    """A SQLiteStore on a real file in tmp_path."""
    store = SQLiteStore(db_path)
    yield store
    store.close()


def make_entries(n: int, start: int = 0, **overrides: Any) -> list[tuple[dict[str, Any], Any]]:
    """``n`` record entries built from real finished spans."""
    factory = SpanFactory()
    try:
        return [entry_from_span(factory.run(start + i, **overrides)) for i in range(n)]
    finally:
        factory.shutdown()


def fill(store: Any, n: int, **overrides: Any) -> None:
    """Append ``n`` records to ``store``, one append per record."""
    for fields, payload in make_entries(n, **overrides):
        store.append([fields], [payload])


def legacy_log(path: Path, *, check: bool = True) -> None:
    """An empty schema version 1 file: plain query columns the writer copies from the body
    (``check=False``: as created before ``CHECK (seq >= 1)`` existed). Open it with
    ``SQLiteStore(path, upgrade=False)`` to keep it at version 1."""
    from coworker.audit import sqlite_schema

    ddl = sqlite_schema._DDL_V1
    if not check:
        ddl = ddl.replace(" CHECK (seq >= 1)", "")
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in sqlite_schema._split_ddl(ddl):
        conn.execute(statement)
    conn.execute("INSERT INTO audit_meta VALUES ('schema_version', '1')")
    conn.close()


def raw(path: Path) -> sqlite3.Connection:
    """A raw connection with the append-only triggers dropped: what a tamperer does."""
    conn = sqlite3.connect(path, isolation_level=None)
    for name in ("audit_records_no_update", "audit_records_no_delete", "audit_records_append_only"):
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    return conn


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    """The PostgreSQL server of the tests (tests/pg.py): one per module, its database and roles
    dropped at the module's end. A module with its own ``pg`` fixture overrides it."""
    from tests.pg import PGServer, import_psycopg, require_server

    import_psycopg()
    server = PGServer(require_server())
    yield server
    server.close()


def store_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh store's URL for a test parametrized over ``backend``: ``sqlite`` (a file in
    ``tmp_path``) or ``postgres`` (a schema of the module's ``pg`` server, no spool)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'a.db'}"
    url: str = request.getfixturevalue("pg").schema_url(spool="off")
    return url
