"""Decoding in worker processes (coworker.ingest.workers): the same answers and records as
decoding in the server process, and a dead worker loses no request."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deps import require

require("starlette", "the server extra")
require("uvicorn", "the server extra")
httpx = require("httpx", "the dev extra")

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceResponse,
)

from coworker import attributes as attr  # noqa: E402
from coworker.audit.store_sqlite import SQLiteStore  # noqa: E402
from coworker.audit.verify import verify_chain  # noqa: E402
from coworker.exceptions import ConfigError  # noqa: E402
from coworker.ingest import IngestServer, create_app  # noqa: E402
from tests.test_ingest import AUTH, PROTOBUF, TOKEN, audited, comparable, make_spans  # noqa: E402


@pytest.fixture
def pooled(tmp_path: Path) -> Iterator[tuple[IngestServer, Path]]:
    path = tmp_path / "ingest.db"
    server = IngestServer(SQLiteStore(path), token=TOKEN, close_store=True, decode_workers=2)
    with server:
        yield server, path


def _records(path: Path) -> list[dict[str, Any]]:
    store = SQLiteStore(path, readonly=True)
    try:
        assert verify_chain(store).ok
        return [r.fields() for r in store.iter_from(1)]
    finally:
        store.close()


def _post(server: IngestServer, body: bytes) -> httpx.Response:
    return httpx.post(server.endpoint, content=body, headers={**AUTH, **PROTOBUF}, timeout=60)


def test_pooled_decoding_appends_durably_and_dedups(pooled: tuple[IngestServer, Path]) -> None:
    """Spans decoded in the workers are in the file when the 200 arrives (read by another
    connection), recorded exactly as entry_from_span makes them, and a resend is a duplicate."""
    from coworker.audit.record import entry_from_span

    server, path = pooled
    spans = make_spans(12)
    body = encode_spans(spans).SerializeToString()
    assert _post(server, body).status_code == 200
    records = _records(path)
    expected = [comparable(entry_from_span(s)[0]) for s in audited(spans)]
    assert [comparable(r) for r in records] == expected
    assert {r["ingest_token"] for r in records} == {"shared-token"}
    assert _post(server, body).status_code == 200
    assert len(_records(path)) == len(expected)
    assert server.stats["duplicates"] == len(expected)


def test_pooled_decoding_isolates_bad_input(pooled: tuple[IngestServer, Path]) -> None:
    """A malformed body is a 400 with its reason; bad audit spans are rejected with reasons
    while the others of the request are appended."""
    server, path = pooled
    r = _post(server, b"\xff\x00 not protobuf")
    assert r.status_code == 400 and not _records(path)
    request = encode_spans(make_spans(6))
    spans = request.resource_spans[0].scope_spans[0].spans
    audit_ones = [s for s in spans if any(kv.key == attr.AUDITED for kv in s.attributes)]
    audit_ones[0].span_id = b"\x00" * 8
    audit_ones[1].end_time_unix_nano = 0
    r = _post(server, request.SerializeToString())
    assert r.status_code == 200
    response = ExportTraceServiceResponse.FromString(r.content)
    assert response.partial_success.rejected_spans == 2
    assert "span_id" in response.partial_success.error_message
    assert len(_records(path)) == 4


def test_a_killed_worker_loses_no_request(pooled: tuple[IngestServer, Path]) -> None:
    """SIGKILL of every decoding worker: the next request is still decoded (in the server
    process) and appended, and the workers are started afresh for the ones after it."""
    server, path = pooled
    pool = server.app.state.ingest.pool
    executor = pool._executor
    assert executor is not None
    for pid in list(executor._processes):
        os.kill(pid, signal.SIGKILL)
    for i in range(3):
        r = _post(server, encode_spans(make_spans(4, prefix=f"after-{i}")).SerializeToString())
        assert r.status_code == 200
    assert len(_records(path)) == 12
    assert pool._executor is not None and pool._executor is not executor


def test_negative_worker_count_is_refused(tmp_path: Path) -> None:
    """decode_workers below zero is a configuration error, before anything starts."""
    with pytest.raises(ConfigError, match="decode_workers"):
        create_app(SQLiteStore(tmp_path / "x.db"), decode_workers=-1)


def test_a_failed_restart_is_retried_with_backoff_and_logged_once(
    pooled: tuple[IngestServer, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Workers killed while new ones cannot start (their interpreter fails: PYTHONHOME
    points nowhere): requests decode in the server process and are appended, the failure is
    logged once however many requests retry, and once workers can start again the next due
    restart brings the pool back."""
    import logging

    server, path = pooled
    pool = server.app.state.ingest.pool
    pool.restart_after = pool.restart_max = 0.0  # every request may retry at once
    executor = pool._executor
    assert executor is not None
    monkeypatch.setenv("PYTHONHOME", str(path.parent / "no-such-python-home"))
    for pid in list(executor._processes):
        os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="coworker.ingest"):
        for i in range(3):
            r = _post(server, encode_spans(make_spans(4, prefix=f"down-{i}")).SerializeToString())
            assert r.status_code == 200
        assert pool.broken and pool._executor is None  # still to be restarted
        assert getattr(pool, "restart_failures", 0) >= 2
        failed = [r for r in caplog.records if "cannot restart" in r.getMessage()]
        assert len(failed) == 1
        monkeypatch.delenv("PYTHONHOME")
        r = _post(server, encode_spans(make_spans(4, prefix="back")).SerializeToString())
        assert r.status_code == 200
        assert pool._executor is not None and not pool.broken and pool.restart_failures == 0
        assert any("restarted after" in r.getMessage() for r in caplog.records)
    assert len(_records(path)) == 16
