"""The append path of the PostgreSQL store: one locked transaction, then the durable flush."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql

from coworker.audit.chain import prepare, seal
from coworker.audit.spool import Spool
from coworker.audit.store import (
    Head,
    StoredRecord,
)
from coworker.audit.store_postgres._wire import (
    _COLUMNS,
    AppendResult,
    _ByteaArray,
    _column_values,
    _Int8Array,
    _is_unreachable,
    _Item,
    _record,
    _ServerDown,
    _TextArray,
    _Unreachable,
)
from coworker.audit.store_postgres.ddl import (
    _FLUSH,
)
from coworker.audit.store_postgres.reads import _Reads
from coworker.exceptions import AuditUnavailable

_log = logging.getLogger("coworker.audit")


class _Writes(_Reads):
    """The append path of the PostgreSQL store: one locked transaction, then the durable flush."""

    # -- writing -----------------------------------------------------------------------------
    def _write_with_retry(self, items: list[_Item], note: Spool | None = None) -> AppendResult:
        """Write items; one reconnect on a dead connection; raises _Unreachable."""
        for attempt in range(2):
            try:
                conn = self._connection()
            except _ServerDown as exc:
                raise _Unreachable(items, exc) from exc
            sealed_hashes: list[tuple[int, bytes] | None] = [None] * len(items)
            try:
                with self._deadline(conn):
                    return self._write(conn, items, sealed_hashes, note)
            except AuditUnavailable:
                self._rollback_or_drop(conn)
                raise
            except Exception as exc:
                if not isinstance(exc, psycopg.Error):
                    # Not the database's doing (a record that cannot be canonicalised, a bug):
                    # nothing was committed; never let it escape as anything else.
                    self._rollback_or_drop(conn)
                    raise AuditUnavailable(
                        f"audit store {self}: append of {len(items)} record(s) failed: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                unreachable = _is_unreachable(exc, conn)
                self._rollback_or_drop(conn)
                if not unreachable:
                    if isinstance(exc, psycopg.errors.IntegrityError):
                        raise AuditUnavailable(
                            f"audit store {self}: the database refused the append as a fork "
                            f"of the chain (another writer without the lock?): {exc}"
                        ) from exc
                    raise AuditUnavailable(
                        f"audit store {self}: append of {len(items)} record(s) failed: {exc}"
                    ) from exc
                # COMMIT may have reached the server before the connection died: remember the
                # hashes so that the next attempt (or the shipper) can tell.
                items = [
                    _Item(
                        it.fields,
                        it.payload,
                        it.dedup_key,
                        it.attempted + ((h,) if h is not None else ()),
                        it.spool_id,
                    )
                    for it, h in zip(items, sealed_hashes, strict=True)
                ]
                if attempt == 1:
                    raise _Unreachable(items, exc) from exc
                self._next_connect = 0.0
        raise AssertionError("unreachable")  # pragma: no cover

    def _write(
        self,
        conn: psycopg.Connection[Any],
        items: list[_Item],
        sealed_hashes: list[tuple[int, bytes] | None],
        note: Spool | None,
    ) -> AppendResult:
        table = self._table
        # Everything that does not depend on the head is encoded before taking the lock:
        # the lock is held by one writer at a time, so every microsecond under it counts.
        plain = [_column_values(it.fields) for it in items]
        prepared = prepare(it.fields for it in items)
        attempted = [a for it in items for a in it.attempted]
        keys = [it.dedup_key for it in items if it.dedup_key is not None]
        committed: dict[int, StoredRecord] = {}
        duplicates: list[int] = []
        skip: set[int] = set()
        with conn.cursor() as cur:
            # One round trip: BEGIN (explicitly READ COMMITTED), then lock_head() takes the
            # advisory lock and reads the head in a statement of its own (a fresh snapshot,
            # after the lock is granted). The connection is in autocommit mode so that psycopg
            # does not spend a round trip on a BEGIN of its own; the transaction is ours.
            cur.execute(self._begin_lock_head())
            cur.nextset()
            row = cur.fetchone()
            head = Head(row[0], bytes(row[1])) if row is not None else None
            if attempted:
                # An earlier attempt whose COMMIT answer was lost may have gone through.
                cur.execute(
                    sql.SQL(
                        "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM {} r"
                        " LEFT JOIN {} p ON p.seq = r.seq WHERE r.seq = ANY(%b)"
                    ).format(table, self._payloads),
                    (_Int8Array.of([a[0] for a in attempted]),),
                )
                present = {(r[0], bytes(r[2])): _record(r) for r in cur.fetchall()}
                for i, it in enumerate(items):
                    for a in it.attempted:
                        if a in present:
                            committed[i] = present[a]
                            skip.add(i)
                            break
            if keys:
                cur.execute(
                    sql.SQL("SELECT dedup_key FROM {} WHERE dedup_key = ANY(%b)").format(table),
                    (_ByteaArray.of(keys),),
                )
                seen = {bytes(r[0]) for r in cur.fetchall()}
                for i, it in enumerate(items):
                    if i in skip or it.dedup_key is None:
                        continue
                    if it.dedup_key in seen:
                        duplicates.append(i)
                        skip.add(i)
                    else:
                        seen.add(it.dedup_key)
            todo = (
                [i for i in range(len(items)) if i not in skip] if skip else list(range(len(items)))
            )
            sealed = seal([prepared[i] for i in todo], head, [items[i].payload for i in todo])
            if sealed:
                for i, rec in zip(todo, sealed, strict=True):
                    sealed_hashes[i] = (rec.seq, rec.hash)
                params: list[Any] = [
                    _Int8Array.of([r.seq for r in sealed]),
                    _ByteaArray.of([r.prev_hash for r in sealed]),
                    _ByteaArray.of([r.hash for r in sealed]),
                    _ByteaArray.of([r.body for r in sealed]),
                    _ByteaArray.of([items[i].dedup_key for i in todo]),
                ]
                for c in range(len(_COLUMNS) + 1):
                    params.append(_TextArray.of([plain[i][c] for i in todo]))
                cur.execute(self._insert_sql(), params)
                if cur.rowcount != len(sealed):
                    # A rule (DO INSTEAD NOTHING) or a trigger returning NULL drops rows
                    # without an error: never report them as written.
                    raise AuditUnavailable(
                        f"audit store {self}: only {cur.rowcount} of {len(sealed)} row(s) were "
                        "inserted: a rule or trigger on the table dropped them "
                        "(run `coworker audit verify`)"
                    )
                blobs = [(r.seq, r.payload) for r in sealed if r.payload is not None]
                if blobs:
                    cur.execute(
                        sql.SQL(
                            "INSERT INTO {} (seq, payload)"
                            " SELECT * FROM unnest(%b::bigint[], %b::bytea[])"
                        ).format(self._payloads),
                        (
                            _Int8Array.of([b[0] for b in blobs]),
                            _ByteaArray.of([b[1] for b in blobs]),
                        ),
                    )
            if note is not None and sealed:
                # Durably note the hashes before COMMIT: if we crash after the server committed
                # and before the spool forgot the entries, the next shipper sees they are in.
                note.note_attempt(
                    {
                        spool_id: (rec.seq, rec.hash)
                        for i, rec in zip(todo, sealed, strict=True)
                        if (spool_id := items[i].spool_id)
                    }
                )
            cur.execute("COMMIT")
        if sealed or committed:  # found committed by an earlier attempt: make sure it is durable
            self._flush(conn)
        if committed:
            by_index = dict(zip(todo, sealed, strict=True))
            by_index.update(committed)
            sealed = [by_index[i] for i in sorted(by_index)]
        return AppendResult(sealed, duplicates)

    def _begin_lock_head(self) -> sql.Composed:
        if self._lock_head is None:
            self._lock_head = sql.SQL(
                "BEGIN ISOLATION LEVEL READ COMMITTED; SELECT seq, hash FROM {}({})"
            ).format(sql.Identifier(self.schema, "lock_head"), sql.Literal(self._oid))
        return self._lock_head

    def _flush(self, conn: psycopg.Connection[Any]) -> None:
        """Return once our (asynchronously committed) records are durable.

        The append committed with ``synchronous_commit=off`` so that the head lock is free
        at once. This second transaction writes one WAL record of its own (a transactional
        logical-decoding message, allowed to any role, at any ``wal_level``) and commits
        synchronously: PostgreSQL then flushes the WAL up to *its* commit record, which comes
        after ours. A transaction that writes no WAL (``SELECT txid_current()``) would not do:
        its commit is asynchronous whatever ``synchronous_commit`` says, and waits for
        nothing. This is group commit across processes: one fsync covers every writer that
        committed meanwhile. WAL is replayed in order, so a crash can lose only a tail of
        the log that no caller was told is durable; a later record (which hashes ours) is
        never durable without ours.
        """
        # One round trip: a single statement in autocommit mode is its own transaction.
        # Never weaker than 'on' (a server-wide 'off' would make this wait for nothing);
        # stronger settings (remote_write, remote_apply) are kept.
        conn.execute(_FLUSH)

    def _insert_sql(self) -> sql.Composed:
        if self._insert is None:
            names = ["seq", "prev_hash", "hash", "body", "dedup_key", *_COLUMNS, "time"]
            types = ["bigint"] + ["bytea"] * 4 + ["text"] * (len(_COLUMNS) + 1)
            self._insert = sql.SQL("INSERT INTO {} ({}) SELECT * FROM unnest({})").format(
                self._table,
                sql.SQL(", ").join(sql.Identifier(n) for n in names),
                sql.SQL(", ").join(sql.SQL("%b::" + t + "[]") for t in types),
            )
        return self._insert
