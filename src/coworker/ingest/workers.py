"""Decoding requests in worker processes: several decoders behind the one writer.

The costly part of a request is turning its bytes into audit records: decompressing, parsing
protobuf or JSON, building each audit span's record (the fields of
:func:`~coworker.audit.record.entry_from_span`, straight from the protobuf message), its dedup
key and its canonical bytes. In one process that runs under one GIL, on one core, however many
requests arrive. :class:`DecodePool` runs it in worker processes instead; the server process
keeps what must be in one place: authentication, the token's limits, dedup against the log,
the append (durable before the answer) and the answer itself. A worker returns a few bytes and
strings per record (its body with a hole for the seq, the query fields, the dedup key: a
:class:`~coworker.ingest.records.PreparedRecord`; an audit span's made in one step by
:mod:`~coworker.ingest.prepare`), so the appending process only chains and inserts. A worker
that dies makes its request decode in the server process, so a request is never lost to the
pool.

The mechanism is ours, not ``concurrent.futures.ProcessPoolExecutor`` (whose feeder and result
threads, call queue and pickled work items and futures are CPU that the serve process and the
workers need not spend; docs/ingest.md has the figures): each worker sits behind a duplex
:func:`multiprocessing.Pipe` of its own, idle workers wait in a free list, and the request's
thread takes one, sends the request, blocks on the answer (without the GIL) and puts the worker
back. Requests and answers are single :mod:`marshal` strings (:func:`encode_decoded`,
:func:`decoded_from`), pickle only for a value marshal refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import marshal
import multiprocessing
import pickle
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from coworker.audit.record import storable
from coworker.ingest.decode import (
    AuditBatch,
    MalformedRequest,
    _decompress,
    _TooLarge,
    audit_spans,
    decode_request,
)
from coworker.ingest.prepare import ENTRY, builder
from coworker.ingest.records import PreparedRecord
from coworker.ingest.tokens import INGEST_TOKEN_FIELD
from coworker.ingest.usage import UsageRefused, usage_entries_of, usage_key

__all__ = [
    "DecodePool",
    "Decoded",
    "WorkerDied",
    "WorkerFailed",
    "decode_body",
    "decoded_from",
    "encode_decoded",
]

_log = logging.getLogger("coworker.ingest")

REJECT: Final = "reject"
"""The kind of an item that is a span rejected while its record was built."""


@dataclass
class Decoded:
    """One request, decoded.

    Attributes:
        status: ``None`` when decoded, else the HTTP status of the answer (400, 413).
        message: why, for an error status.
        batch: the audit spans' tally (``spans`` emptied: the records are in ``items``).
        items: per audit span, in request order: ``(ENTRY, span name, body before the seq,
            body after it, query field values, payload, dedup key)`` or ``(REJECT,
            reason)``; a usage span adds its usage record the same way (key:
            :func:`~coworker.ingest.usage.usage_key`) or its refusal. Plain tuples of bytes
            and strings: cheap to send from a worker.
    """

    status: int | None = None
    message: str = ""
    batch: AuditBatch = field(default_factory=AuditBatch)
    items: list[tuple[Any, ...]] = field(default_factory=list)


def decode_body(
    body: bytes,
    media: str,
    encoding: str,
    max_body_bytes: int,
    max_attribute_length: int,
    max_attributes: int,
    token_name: str | None = None,
) -> Decoded:
    """Decode one request body into records (runs in a worker or in the server process).

    ``token_name`` (the name of the request's token, already authenticated) goes into every
    record's ``ingest_token``, so that the record leaves here canonicalised, final but for its
    seq and chain hash.
    """
    try:
        raw = _decompress(body, encoding, max_body_bytes)
    except _TooLarge:
        return Decoded(413)
    except MalformedRequest as exc:
        return Decoded(400, str(exc))
    try:
        request = decode_request(raw, media)
    except MalformedRequest as exc:
        return Decoded(400, str(exc))
    batch = audit_spans(
        request,
        max_attribute_length=max_attribute_length,
        max_attributes=max_attributes,
        usage=True,
        records=True,
        build=builder(token_name),
    )
    items: list[tuple[Any, ...]] = []
    for record, ids, audited, usage in zip(
        batch.records, batch.keys, batch.audited, batch.usage, strict=True
    ):
        if type(record) is tuple:  # the stored record, made in one step (ingest.prepare)
            items.append(record)
            continue
        name = record.name[:80]
        fields = record.fields
        fixed, altered = storable(fields)
        if altered:
            # As the writer does for local spans (coworker.audit.writer._isolate): a value
            # no query column can hold (a NUL in user_id ...) is escaped, never stored as a
            # body that a query reads otherwise.
            _log.critical(
                "AUDIT RECORD ALTERED to be storable: span %r field(s) %s held values no store "
                "can keep; stored escaped as text (trace=%s span=%s)",
                name,
                ", ".join(altered),
                fields.get("trace_id"),
                fields.get("span_id"),
            )
            fields = dict(fixed)
        if audited:
            try:
                fields[INGEST_TOKEN_FIELD] = token_name
                prepared, digest = PreparedRecord.with_digest(fields)
                items.append((ENTRY, name, *prepared.parts, record.payload, ids + digest))
            except Exception as exc:
                items.append((REJECT, f"span {name!r}: cannot build its audit record: {exc}"))
                continue
        if usage:
            # Apart from the audit record: a hostile count refuses the usage record alone.
            try:
                entries = usage_entries_of(record, fields)  # one per model (usage, issue 16)
            except UsageRefused as exc:
                items.append((REJECT, f"span {name!r}: usage refused: {exc}"))
                continue
            for entry in entries:
                try:
                    entry[INGEST_TOKEN_FIELD] = token_name
                    prepared = PreparedRecord.of(entry)
                    items.append((ENTRY, name, *prepared.parts, None, usage_key(ids, entry)))
                except Exception as exc:
                    items.append((REJECT, f"span {name!r}: cannot build its usage record: {exc}"))
    batch.records, batch.keys, batch.audited, batch.usage = [], [], [], []
    return Decoded(None, "", batch, items)


def record_of(item: tuple[Any, ...]) -> tuple[PreparedRecord, bytes | None, bytes]:
    """``(record, payload, dedup key)`` of an :data:`ENTRY` item."""
    _, _, before, after, values, payload, key = item
    return PreparedRecord(before, after, values), payload, key


# -- answers: one marshal string ------------------------------------------------------------------
_MARSHAL: Final = b"M"
"""First byte of a message that is :mod:`marshal` data (the rest)."""
_PICKLE: Final = b"P"
"""First byte of a message that is pickled: marshal refused one of its values."""
_FAILED: Final = b"F"
"""First byte of a worker's answer when decoding raised: the rest is the traceback (UTF-8)."""
_READY: Final = b"R"
"""A worker's first message: it has imported the decoder."""

_ALIVE_CHECK: Final = 1.0
"""Seconds between checks that the worker holding a request is alive."""

_BATCH_FIELDS: Final = tuple(f.name for f in dataclasses.fields(AuditBatch) if f.name != "spans")
"""The :class:`AuditBatch` fields an answer carries (``spans``, SDK spans, only by pickle)."""


def _dumps(value: Any) -> bytes:
    """``value`` as one message: marshal, or pickle for a value marshal cannot hold."""
    try:
        return _MARSHAL + marshal.dumps(value)
    except ValueError:  # "unmarshallable object": a subclass of str or int, an object ...
        return _PICKLE + pickle.dumps(value, pickle.HIGHEST_PROTOCOL)


def _loads(message: bytes) -> Any:
    kind, rest = message[:1], memoryview(message)[1:]
    if kind == _MARSHAL:
        return marshal.loads(rest)
    if kind == _PICKLE:
        return pickle.loads(rest)
    raise ValueError(f"not a decoding message (first byte {kind!r})")


def encode_decoded(decoded: Decoded) -> bytes:
    """``decoded`` as the bytes a worker sends: one :mod:`marshal` string of plain values
    (status, message, the batch's tally, the items), or a pickle of the whole
    :class:`Decoded` when marshal refuses one of them (nothing is lost, only slower).
    :func:`decoded_from` reads either."""
    batch = decoded.batch
    if type(decoded) is not Decoded or type(batch) is not AuditBatch or batch.spans:
        return _PICKLE + pickle.dumps(decoded, pickle.HIGHEST_PROTOCOL)
    plain = (
        decoded.status,
        decoded.message,
        tuple(getattr(batch, name) for name in _BATCH_FIELDS),
        decoded.items,
    )
    try:
        return _MARSHAL + marshal.dumps(plain)
    except ValueError:
        return _PICKLE + pickle.dumps(decoded, pickle.HIGHEST_PROTOCOL)


def decoded_from(answer: bytes) -> Decoded:
    """The :class:`Decoded` that :func:`encode_decoded` made ``answer`` of.

    Raises:
        ValueError: ``answer`` is not such bytes.
    """
    value = _loads(answer)
    if answer[:1] == _PICKLE:
        if not isinstance(value, Decoded):
            raise ValueError(f"a pickled answer holds a {type(value).__name__}, not a Decoded")
        return value
    status, message, tally, items = value
    return Decoded(
        status, message, AuditBatch(**dict(zip(_BATCH_FIELDS, tally, strict=True))), items
    )


# -- the worker processes -------------------------------------------------------------------------
class WorkerDied(Exception):
    """The worker holding a request died (its pipe closed) before it answered.

    Attributes:
        workers: the set it belonged to (for :meth:`DecodePool.mark_broken`).
    """

    def __init__(self, workers: _Workers) -> None:
        super().__init__("an ingest decoding worker died")
        self.workers = workers


class WorkerFailed(Exception):
    """Decoding raised in the worker (which lives on); the message is the worker's traceback."""


def _worker_main(conn: Connection) -> None:
    """A worker: answer each request on ``conn`` until ``None`` or the server's end closes."""
    # Ctrl-C on `coworker audit serve` reaches the whole process group: the server stops its
    # workers itself (None), and a server that dies closes the pipe (EOFError).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send_bytes(_READY)
    while True:
        try:
            args = _loads(conn.recv_bytes())
        except EOFError:
            return
        if args is None:
            return
        try:
            answer = encode_decoded(decode_body(*args))
        except Exception:
            answer = _FAILED + traceback.format_exc().encode("utf-8", "replace")
        conn.send_bytes(answer)


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection  # the server's end of the worker's pipe


class _Workers:
    """``count`` spawned worker processes, each behind a duplex pipe of its own, and the free
    list of the idle ones (requests beyond ``count`` wait there for one)."""

    def __init__(self, count: int, *, start_timeout: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")  # the server has threads: no fork
        self.workers: list[_Worker] = []
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        try:
            for _ in range(count):
                ours, theirs = ctx.Pipe(duplex=True)
                process = ctx.Process(
                    target=_worker_main, args=(theirs,), name="coworker-ingest-decode", daemon=True
                )
                try:
                    process.start()
                finally:
                    # Only the worker may hold its end: its death must close the pipe (EOF here).
                    theirs.close()
                self.workers.append(_Worker(process, ours))
            deadline = time.monotonic() + start_timeout
            for worker in self.workers:  # they import in parallel; wait for each
                if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"a decoding worker did not start in {start_timeout:g}s")
                if worker.conn.recv_bytes() != _READY:
                    raise RuntimeError("a decoding worker sent something else than ready")
        except BaseException:
            self.terminate()
            raise
        for worker in self.workers:
            self._idle.put(worker)

    @property
    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [w.process.pid for w in self.workers if w.process.pid is not None]

    def call(self, request: bytes) -> bytes:
        """Send ``request`` to an idle worker (waiting for one) and return its answer.

        Raises:
            WorkerDied: the worker died (or was stopped) before answering.
        """
        worker = self._idle.get()
        try:
            worker.conn.send_bytes(request)
            # Blocks without the GIL. A dead worker closes its end of the pipe (EOFError),
            # unless a fork elsewhere in the server copied that end in the instant it was
            # ours: then its exit is what tells.
            while not worker.conn.poll(_ALIVE_CHECK):
                if not worker.process.is_alive():
                    raise WorkerDied(self)
            return worker.conn.recv_bytes()
        except (EOFError, OSError) as exc:  # OSError: a broken pipe, a closed handle
            raise WorkerDied(self) from exc
        finally:
            # Dead or alive: a dead one makes the next caller fail fast, rather than wait
            # forever for a worker that never comes back.
            self._idle.put(worker)

    def terminate(self) -> None:
        """Kill the processes now (a request a worker held raises :class:`WorkerDied`)."""
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in self.workers:
            self._reap(worker.process, 5.0)

    def stop(self, timeout: float) -> None:
        """Tell each worker to exit once it is idle (``None``), wait up to ``timeout`` seconds
        for them, and kill the ones left."""
        deadline = time.monotonic() + timeout
        stopped: list[_Worker] = []
        for _ in self.workers:
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break  # a request still holds one: it is killed below
            stopped.append(worker)
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(_dumps(None))
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                _log.warning("an ingest decoding worker did not exit in time; terminating it")
                worker.process.terminate()
            self._reap(worker.process, 5.0)
        for worker in stopped:
            worker.conn.close()
            self._idle.put(worker)  # closed: a late caller gets WorkerDied, not a hang

    @staticmethod
    def _reap(process: BaseProcess, timeout: float) -> None:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(timeout)


class DecodePool:
    """``workers`` decoding processes (spawned: the server has threads, so no fork).

    A pool whose worker died is replaced on the next request (:meth:`restart`); when the
    replacement cannot start (no memory, a process limit), requests decode in the server
    process and the restart is tried again after ``restart_after`` seconds, doubling up to
    ``restart_max``: logged once when it starts failing, once when it works again.

    Args:
        workers: how many processes.
        restart_after: seconds before the first retry of a failed restart.
        restart_max: the longest wait between retries.
    """

    def __init__(
        self, workers: int, *, restart_after: float = 1.0, restart_max: float = 60.0
    ) -> None:
        self.workers = workers
        self.restart_after = restart_after
        self.restart_max = restart_max
        self.restart_failures = 0
        """Failed restarts since the pool last ran."""
        self._workers: _Workers | None = None
        self._broken: _Workers | None = None  # the set to replace, if any
        self._retry_at: float | None = None  # when to try a failed restart again
        self._restart_lock = threading.Lock()

    @property
    def broken(self) -> bool:
        """``True`` when a worker died, or a restart failed, and the pool waits for
        :meth:`restart`."""
        return self._broken is not None or self._retry_at is not None

    def start(self) -> None:
        """Start the processes and wait until each has imported the decoder.

        Raises:
            Exception: the processes could not start (none is left running).
        """
        self._workers = _Workers(self.workers)

    def decode(self, *args: Any) -> Decoded | None:
        """:func:`decode_body` of ``args`` in a worker (blocks: call it from a thread);
        ``None`` when the pool is not running (the caller decodes in its own process).

        Raises:
            WorkerDied: the worker died holding the request (:meth:`mark_broken` its
                ``workers``, decode in this process).
            WorkerFailed: decoding raised in the worker.
        """
        workers = self._workers
        if workers is None:
            return None
        answer = workers.call(_dumps(args))
        if answer[:1] == _FAILED:
            raise WorkerFailed(answer[1:].decode("utf-8", "replace"))
        return decoded_from(answer)

    def mark_broken(self, workers: _Workers | None = None) -> None:
        """Stop handing work to the current processes (a worker died); :meth:`restart`
        replaces them."""
        with self._restart_lock:
            workers = workers or self._workers
            if workers is not None and workers is self._workers:
                _log.error("an ingest decoding worker died; decoding in the server process")
                self._broken, self._workers = workers, None

    def restart(self) -> None:
        """Replace a broken pool with a fresh one (once, however many requests saw it).

        Returns at once, leaving the request to decode in the server process, while another
        thread restarts the pool or while a failed restart waits for its next try.
        """
        if not self._restart_lock.acquire(blocking=False):
            return
        try:
            if not self.broken:
                return
            if self._retry_at is not None and time.monotonic() < self._retry_at:
                return
            old, self._broken = self._broken, None
            if old is not None:
                old.terminate()  # its survivors' requests decode in the server process
            try:
                self.start()
            except Exception:
                self.restart_failures += 1
                wait = min(
                    self.restart_after * 2 ** min(self.restart_failures - 1, 30), self.restart_max
                )
                self._retry_at = time.monotonic() + wait
                if self.restart_failures == 1:
                    _log.exception(
                        "cannot restart the ingest decoding workers; decoding in the server "
                        "process, retrying after %gs (then less often, up to every %gs)",
                        wait,
                        self.restart_max,
                    )
                return
            if self.restart_failures:
                _log.warning(
                    "ingest decoding workers restarted after %d failed attempt(s)",
                    self.restart_failures,
                )
            self.restart_failures = 0
            self._retry_at = None
        finally:
            self._restart_lock.release()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the processes (after the in-flight requests, waiting up to ``timeout``
        seconds for them; the ones left are killed)."""
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.stop(timeout)
        broken, self._broken = self._broken, None
        if broken is not None:
            broken.terminate()
