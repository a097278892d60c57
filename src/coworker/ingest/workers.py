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
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
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

__all__ = ["DecodePool", "Decoded", "decode_body"]

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


def _warm() -> int:
    return 0


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
        self._executor: ProcessPoolExecutor | None = None
        self._broken: ProcessPoolExecutor | None = None  # the pool to replace, if any
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
        executor = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn")
        )
        try:
            for started in [executor.submit(_warm) for _ in range(self.workers)]:
                started.result()
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        self._executor = executor

    def submit(self, *args: Any) -> tuple[Future[Decoded], ProcessPoolExecutor] | None:
        """Hand :func:`decode_body` ``args`` to a worker: the future and the pool it went to
        (for :meth:`mark_broken`); ``None`` when the pool is not running (the caller decodes
        in its own process)."""
        executor = self._executor
        if executor is None:
            return None
        try:
            return executor.submit(decode_body, *args), executor
        except RuntimeError:  # broken (a worker died): decode here until it is restarted
            self.mark_broken(executor)
            return None

    def mark_broken(self, executor: ProcessPoolExecutor | None = None) -> None:
        """Stop handing work to the current pool (a worker died); :meth:`restart` replaces it."""
        with self._restart_lock:
            executor = executor or self._executor
            if executor is not None and executor is self._executor:
                _log.error("an ingest decoding worker died; decoding in the server process")
                self._broken, self._executor = executor, None

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
                old.shutdown(wait=False, cancel_futures=True)
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

    def shutdown(self) -> None:
        """Stop the processes (after the in-flight requests)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
