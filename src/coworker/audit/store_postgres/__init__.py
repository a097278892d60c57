"""The shared audit store: an append-only, hash-chained log in PostgreSQL (psycopg 3).

Many processes on many hosts append to one log. Layout (schema version 5, in a PostgreSQL
schema of its own, ``coworker_audit`` by default)::

    records(seq bigint PRIMARY KEY, prev_hash bytea UNIQUE, hash bytea, body bytea,
            dedup_key bytea (unique when set), inserted_at timestamptz,
            kind, category, operation, doctype, outcome, flow_id, step_id, run_id,
            user_id, agent_id, trace_id, span_id, recorded_at, time, attempt bytea)
    payloads(seq bigint PRIMARY KEY, payload bytea)
    keys(subject text PRIMARY KEY, key bytea, created timestamptz)
    schema_version(version integer PRIMARY KEY, applied_at timestamptz)

``seq``, ``prev_hash``, ``hash`` and ``body`` are exactly what :func:`coworker.audit.chain.seal`
hashes, as ``bytea`` (never ``jsonb``, which would reorder keys and change the bytes). The text
columns are copies of body fields for ``coworker audit query``: conveniences, not evidence.
``dedup_key`` makes a second delivery of the same span a no-op (``append_unique``, used by the
OTLP ingest endpoint). Payloads live in their own table, which is not append-only, so that a
payload can be erased without breaking the chain.

The package is split along its seams:

* :mod:`.ddl` — the versioned DDL (migrations) and :func:`writer_grants`;
* :mod:`.guards` — the append-only guards, how they are checked and restored;
* :mod:`.connection` — connections, the watchdog, the schema check on connect;
* :mod:`.reads` — head, pages, search, integrity findings;
* :mod:`.writes` — the append path (the server-side ``append()`` function, one round trip
  under the lock, then the durable flush);
* :mod:`.group_flush` — group commit: appends committed asynchronously, made durable by
  one flush on a connection of its own (``submit_unique``, the ingest endpoint);
* :mod:`.shipper` — the outage spool and the thread that ships it;
* :mod:`.erase` — data keys, erasure and purge;
* :mod:`.store` — :class:`PostgresStore`, which puts them together.

See ``docs/postgres.md`` for the guarantees and how each is kept.
"""

from __future__ import annotations

from coworker.audit.store_postgres._wire import (
    DEFAULT_SCHEMA,
    AppendResult,
    _ByteaArray,
    _column_values,
    _Int8Array,
    _register_arrays,
    _split_url,
    _TextArray,
    chain_schema,
    default_spool_path,
    spool_path,
)
from coworker.audit.store_postgres.ddl import SCHEMA_VERSION, writer_grants
from coworker.audit.store_postgres.group_flush import PendingAppend
from coworker.audit.store_postgres.store import PostgresStore

__all__ = [
    "DEFAULT_SCHEMA",
    "SCHEMA_VERSION",
    "AppendResult",
    "PendingAppend",
    "PostgresStore",
    "_ByteaArray",
    "_Int8Array",
    "_TextArray",
    "_column_values",
    "_register_arrays",
    "_split_url",
    "chain_schema",
    "default_spool_path",
    "spool_path",
    "writer_grants",
]
