"""The OTLP/HTTP ingest endpoint: receive traces, append their audit spans to a store.

``coworker audit serve`` runs this behind uvicorn. It is what an OpenTelemetry Collector's
``otlphttp`` exporter (or any OTLP/HTTP span exporter) points at, so that services only send
OTLP and the audit trail is written server-side, where their code cannot suppress or alter it.

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` encoded as protobuf
(``application/x-protobuf``) or OTLP JSON (``application/json``; ids as hex), optionally
``Content-Encoding: gzip`` or ``deflate``. Spans whose ``coworker.audited`` attribute is
``true`` (or ``coworker.audit``, its name in coworker 0.1.0) become
:class:`~opentelemetry.sdk.trace.ReadableSpan` objects and go through the same
:func:`coworker.audit.record.entry_from_span` as the in-process exporter; other spans are
ignored (they belong to the operational trail), except that a span carrying
``gen_ai.usage.*`` token counts, audited or not, also gives a usage ledger record
(:mod:`~coworker.ingest.usage`; flow/step/turn roll-up spans are skipped). Answers follow
the OTLP/HTTP specification
(https://opentelemetry.io/docs/specs/otlp/#otlphttp-response):

======  ==========================================================================
200     appended (``partial_success`` counts the audit spans it rejected and why)
400     malformed body (reason in a ``google.rpc.Status``); nothing appended
401     missing or wrong bearer token
413     body (compressed or decompressed) larger than the limit
415     unsupported content type or content encoding
503     the store cannot append right now; ``Retry-After`` says when to retry (OTLP
        clients retry 429/502/503/504 only: a 500 would lose the data)
======  ==========================================================================

A span delivered twice (exporters retry) is recorded once: the dedup key is trace id + span
id + the SHA-256 of the record's content (:func:`dedup_key`), checked and written in the same
transaction by stores that support it
(:meth:`~coworker.audit.store_postgres.PostgresStore.append_unique`), and by an in-process
index of the log otherwise. A *different* span with the same ids (a forgery by a service that
saw them in ``traceparent``) is kept as well, and the server writes an ``ingest-conflict``
record naming both. Each bearer token (:class:`IngestToken`, :func:`load_tokens`) names the
services and identities it may write for; spans outside them are rejected with the reason, and
every record names the token that delivered it (``ingest_token``). uvicorn runs with a protocol
that closes connections whose request does not arrive whole within a read timeout and refuses
connections beyond a limit. ``GET /health`` answers 200 when the store can be read. Store
writes run with OpenTelemetry instrumentation suppressed. What is guaranteed against whom:
docs/ingest.md.

Not imported by ``import coworker``; needs the ``server`` extra (starlette, uvicorn,
opentelemetry-proto).

The package's modules, along the request's path: :mod:`~coworker.ingest.decode` (body,
protobuf/JSON, audit spans and limits), :mod:`~coworker.ingest.tokens` (who may write what),
:mod:`~coworker.ingest.records` (dedup keys, conflict records), :mod:`~coworker.ingest.prepare`
(an audit span's stored record in one step), :mod:`~coworker.ingest.usage`
(usage records and their dedup keys), :mod:`~coworker.ingest.app`
(the ASGI app) and :mod:`~coworker.ingest.server` (uvicorn, ``serve``, :class:`IngestServer`).
Everything public is importable from ``coworker.ingest``.
"""

from __future__ import annotations

from coworker.audit.record import CATEGORY_INGEST_CONFLICT
from coworker.ingest.app import DEFAULT_RETRY_AFTER, create_app
from coworker.ingest.decode import (
    DEFAULT_MAX_ATTRIBUTE_LENGTH,
    DEFAULT_MAX_ATTRIBUTES,
    DEFAULT_MAX_BODY_BYTES,
    AuditBatch,
    MalformedRequest,
    audit_spans,
    decode_request,
)
from coworker.ingest.records import content_digest, dedup_key
from coworker.ingest.server import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_READ_TIMEOUT,
    IngestServer,
    log_config,
    parse_listen,
    serve,
)
from coworker.ingest.tokens import (
    INGEST_TOKEN_FIELD,
    SHARED_TOKEN_NAME,
    IngestToken,
    load_tokens,
)

__all__ = [
    "CATEGORY_INGEST_CONFLICT",
    "DEFAULT_MAX_ATTRIBUTES",
    "DEFAULT_MAX_ATTRIBUTE_LENGTH",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_RETRY_AFTER",
    "INGEST_TOKEN_FIELD",
    "SHARED_TOKEN_NAME",
    "AuditBatch",
    "IngestServer",
    "IngestToken",
    "MalformedRequest",
    "audit_spans",
    "content_digest",
    "create_app",
    "decode_request",
    "dedup_key",
    "load_tokens",
    "log_config",
    "parse_listen",
    "serve",
]
