"""Decoding in worker processes (coworker.ingest.workers): the same answers and records as
decoding in the server process, a dead worker loses no request, answers cross the pipe intact
(marshal, or pickle for what marshal refuses) and shutdown leaves no process behind."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from multiprocessing import resource_tracker
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
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue  # noqa: E402

from coworker import attributes as attr  # noqa: E402
from coworker.audit.store_sqlite import SQLiteStore  # noqa: E402
from coworker.audit.verify import verify_chain  # noqa: E402
from coworker.exceptions import ConfigError  # noqa: E402
from coworker.ingest import IngestServer, create_app  # noqa: E402
from coworker.ingest.decode import AuditBatch  # noqa: E402
from coworker.ingest.records import QUERY_FIELDS  # noqa: E402
from coworker.ingest.workers import (  # noqa: E402
    Decoded,
    DecodePool,
    WorkerFailed,
    decode_body,
    decoded_from,
    encode_decoded,
)
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
    workers = pool._workers
    assert workers is not None
    for pid in workers.pids:
        os.kill(pid, signal.SIGKILL)
    for i in range(3):
        r = _post(server, encode_spans(make_spans(4, prefix=f"after-{i}")).SerializeToString())
        assert r.status_code == 200
    assert len(_records(path)) == 12
    assert pool._workers is not None and pool._workers is not workers
    assert not set(pool._workers.pids) & set(workers.pids)
    assert not any(_alive(pid) for pid in workers.pids)  # the old ones are reaped


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
    workers = pool._workers
    assert workers is not None
    monkeypatch.setenv("PYTHONHOME", str(path.parent / "no-such-python-home"))
    for pid in workers.pids:
        os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="coworker.ingest"):
        for i in range(3):
            r = _post(server, encode_spans(make_spans(4, prefix=f"down-{i}")).SerializeToString())
            assert r.status_code == 200
        assert pool.broken and pool._workers is None  # still to be restarted
        assert getattr(pool, "restart_failures", 0) >= 2
        failed = [r for r in caplog.records if "cannot restart" in r.getMessage()]
        assert len(failed) == 1
        monkeypatch.delenv("PYTHONHOME")
        r = _post(server, encode_spans(make_spans(4, prefix="back")).SerializeToString())
        assert r.status_code == 200
        assert pool._workers is not None and not pool.broken and pool.restart_failures == 0
        assert any("restarted after" in r.getMessage() for r in caplog.records)
    assert len(_records(path)) == 16


def _alive(pid: int) -> bool:
    """``pid`` is a process (a zombie counts: not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children() -> set[int]:
    """This process's child processes (any thread's), but the multiprocessing resource
    tracker (started once per process by spawn, not by the pool)."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    found.discard(getattr(resource_tracker._resource_tracker, "_pid", None) or -1)
    return found


def _wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


_ARGS = ("application/x-protobuf", "identity", 20 << 20, 64 * 1024, 1024, "shared-token")


def _mixed_request() -> bytes:
    """Audit spans, two of them rejected, and spans that are not audited."""
    request = encode_spans(make_spans(9, audit_every=2))
    spans = request.resource_spans[0].scope_spans[0].spans
    audit_ones = [s for s in spans if any(kv.key == attr.AUDITED for kv in s.attributes)]
    audit_ones[0].span_id = b"\x00" * 8
    audit_ones[1].end_time_unix_nano = 0
    return request.SerializeToString()


def test_a_worker_killed_holding_a_request_loses_it_not(tmp_path: Path) -> None:
    """The one worker is stopped, a request is handed to it (the free list is empty: the
    request's thread waits for its answer), then it is SIGKILLed: that request still gets its
    200 with every record stored (decoded in the server process), and the next request starts
    a fresh worker, which decodes it."""
    path = tmp_path / "ingest.db"
    server = IngestServer(SQLiteStore(path), token=TOKEN, close_store=True, decode_workers=1)
    with server:
        pool = server.app.state.ingest.pool
        workers = pool._workers
        (pid,) = workers.pids
        os.kill(pid, signal.SIGSTOP)
        answers: list[httpx.Response] = []
        body = encode_spans(make_spans(5, prefix="held")).SerializeToString()
        sender = threading.Thread(target=lambda: answers.append(_post(server, body)))
        sender.start()
        _wait_for(workers._idle.empty, "the request to take the worker")
        assert not answers  # it cannot answer: it is stopped with the request in its pipe
        os.kill(pid, signal.SIGKILL)
        sender.join(60)
        assert [r.status_code for r in answers] == [200]
        assert len(_records(path)) == 5
        assert pool.broken and pool._workers is None
        after = encode_spans(make_spans(3, prefix="after")).SerializeToString()
        assert _post(server, after).status_code == 200
        assert not pool.broken and pool._workers is not None
        (new,) = pool._workers.pids
        assert new != pid and _alive(new) and not _alive(pid)
        assert pool._workers._idle.qsize() == 1  # the request went through it and back
    assert len(_records(path)) == 8


def test_a_multi_megabyte_answer_passes_intact() -> None:
    """A request whose records hold ~5 MB (a 60 KB captured input on each of 80 audit spans):
    the worker's answer is the same Decoded as decoding here, byte for byte."""
    request = encode_spans(make_spans(80))
    for i, span in enumerate(request.resource_spans[0].scope_spans[0].spans):
        text = f"{i:05d}" + "".join(chr(0x41 + (i + j) % 50) for j in range(60_000))
        span.attributes.append(KeyValue(key=attr.INPUT, value=AnyValue(string_value=text)))
    body = request.SerializeToString()
    here = decode_body(body, *_ARGS)
    assert here.status is None and len(here.items) == 80
    assert len(encode_decoded(here)) > 4_800_000
    pool = DecodePool(1)
    pool.start()
    try:
        there = pool.decode(body, *_ARGS)
    finally:
        pool.shutdown()
    assert there is not None and _timeless(there) == _timeless(here)
    assert there.items[-1][5] == here.items[-1][5] and len(there.items[-1][5]) > 60_000


_RECORDED_AT = re.compile(rb'"recorded_at":"[^"]*"')


def _timeless(decoded: Decoded) -> Decoded:
    """``decoded`` but for each record's ``recorded_at`` (the time it was decoded)."""
    at = QUERY_FIELDS.index("recorded_at")
    items = []
    for item in decoded.items:
        if item[0] == "entry":
            kind, name, before, after, values, payload, key = item
            before, after = (_RECORDED_AT.sub(b"", half) for half in (before, after))
            values = (*values[:at], None, *values[at + 1 :])
            item = (kind, name, before, after, values, payload, key)
        items.append(item)
    return dataclasses.replace(decoded, items=items)


def test_marshal_round_trip_is_the_decoded() -> None:
    """Decoded requests (records, rejects, a 400, a 413) come back equal through marshal."""
    cases = [
        decode_body(_mixed_request(), *_ARGS),
        decode_body(b"\xff\x00 not protobuf", *_ARGS),
        Decoded(413),
        Decoded(None, "", AuditBatch(rejected=1, errors=["x"], total=3), []),
    ]
    assert cases[0].batch.rejected == 2 and len(cases[0].items) == 3
    assert cases[1].status == 400 and cases[1].message
    for decoded in cases:
        answer = encode_decoded(decoded)
        assert answer[:1] == b"M"
        assert decoded_from(answer) == decoded
    # Every field of AuditBatch but the SDK spans travels: here each differs from its
    # default (a field added to AuditBatch fails this until it is set here too).
    full = AuditBatch(records=[(1, b"r")], keys=[b"k" * 24], audited=[True], usage=[False],
                      rejected=4, errors=["e"], total=9)  # fmt: skip
    names = {f.name for f in dataclasses.fields(AuditBatch)} - {"spans"}
    assert all(getattr(full, n) != getattr(AuditBatch(), n) for n in names)
    answer = encode_decoded(Decoded(None, "", full, []))
    assert answer[:1] == b"M" and decoded_from(answer).batch == full


def test_what_marshal_refuses_goes_by_pickle() -> None:
    """A value marshal cannot hold (an IntEnum status, a str subclass in an item) is pickled
    instead, marked, and comes back equal and of its type; a request with such a value
    reaches a real worker the same way."""

    decoded = Decoded(HTTPStatus.BAD_REQUEST, "bad", AuditBatch(total=1), [("reject", Media("n"))])
    answer = encode_decoded(decoded)
    assert answer[:1] == b"P"
    back = decoded_from(answer)
    assert back == decoded
    assert type(back.status) is HTTPStatus and type(back.items[0][1]) is Media
    with pytest.raises(ValueError, match="not a decoding message"):
        decoded_from(b"?" + answer[1:])

    body = _mixed_request()
    pool = DecodePool(1)
    pool.start()
    try:
        there = pool.decode(body, Media(_ARGS[0]), *_ARGS[1:])
        assert there is not None and _timeless(there) == _timeless(decode_body(body, *_ARGS))
    finally:
        pool.shutdown()


class Media(str):
    """A str subclass (pickled across, since marshal refuses it); module level to pickle."""


def test_an_exception_in_a_worker_comes_back_with_its_traceback() -> None:
    """decode_body raising in the worker (here: called with too few arguments) is a
    WorkerFailed carrying the worker's traceback; the worker lives on and decodes the next."""
    pool = DecodePool(1)
    pool.start()
    try:
        (pid,) = pool._workers.pids
        with pytest.raises(WorkerFailed, match=r"(?s)Traceback.*TypeError.*decode_body"):
            pool.decode(b"")
        body = _mixed_request()
        there = pool.decode(body, *_ARGS)
        assert there is not None and _timeless(there) == _timeless(decode_body(body, *_ARGS))
        assert pool._workers.pids == [pid] and not pool.broken
    finally:
        pool.shutdown()


def test_shutdown_leaves_no_live_child_process() -> None:
    """After shutdown every worker has exited and been reaped: no child of this process is
    left (nor a zombie), even with a request just answered."""
    before = _children()
    pool = DecodePool(2)
    pool.start()
    workers = pool._workers
    assert workers is not None
    pids = set(workers.pids)
    assert len(pids) == 2 and pids <= _children() - before
    body = _mixed_request()
    assert pool.decode(body, *_ARGS) is not None
    pool.shutdown()
    assert not any(_alive(pid) for pid in pids)
    assert _children() - before == set()
    assert all(w.process.exitcode == 0 for w in workers.workers)  # told to exit: exited
    assert pool.decode(body, *_ARGS) is None  # stopped: the caller decodes itself
