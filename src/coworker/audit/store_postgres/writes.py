"""The append path of the PostgreSQL store: one locked transaction, then the durable flush."""

from __future__ import annotations

import logging
import secrets
from typing import Any, Final

import psycopg
from psycopg import sql

from coworker.audit.chain import genesis, link, prepare, seal
from coworker.audit.chain_seal import ChainSealed
from coworker.audit.spool import Spool
from coworker.audit.store import (
    Head,
    StoredRecord,
)
from coworker.audit.store_postgres._wire import (
    _COLUMNS,
    AppendResult,
    _ByteaArray,
    _column_arrays,
    _column_values,
    _int,
    _Int8Array,
    _is_unreachable,
    _Item,
    _pipelined,
    _record,
    _ServerDown,
    _TextArray,
    _Unreachable,
)
from coworker.audit.store_postgres.ddl import (
    _FLUSH,
    CHAIN_SEALED,
    LOCK_KEY_MISMATCH,
)
from coworker.audit.store_postgres.reads import _Reads
from coworker.exceptions import AuditUnavailable

_log = logging.getLogger("coworker.audit")

# Bytes of the random nonce that marks the rows of one server-side append.
_NONCE: Final = 16

# The prepared statements of the one-round-trip append (per connection, see _write_fast).
_APPEND: Final = b"coworker_audit_append"
_FLUSH_NAME: Final = b"coworker_audit_flush"
# append()'s parameters after the lock key: attempt bytea, before/after/payload/dedup
# bytea[], then one text[] per query column.
_APPEND_TYPES: Final = (17, 1001, 1001, 1001, 1001) + (1009,) * (len(_COLUMNS) + 1)


class _Writes(_Reads):
    """The append path of the PostgreSQL store: one locked transaction, then the durable flush."""

    # -- writing -----------------------------------------------------------------------------
    def _write_with_retry(
        self, items: list[_Item], note: Spool | None = None, owed: list[_Item] | None = None
    ) -> AppendResult:
        """Write items; one reconnect on a dead connection; raises _Unreachable.

        With ``owed`` (an empty list), the one-round-trip append leaves the durable flush
        out (the records are committed, not yet durable) and fills ``owed`` with the items,
        each carrying its attempt: the caller owes the flush (:mod:`.group_flush`), and
        when that is lost sends them again, which finds what was committed (:meth:`_write`).
        ``owed`` stays empty when the result is durable already (the other paths flush).
        """
        for attempt in range(2):
            if owed is not None:
                owed.clear()
            try:
                conn = self._connection()
            except _ServerDown as exc:
                raise _Unreachable(items, exc) from exc
            except ChainSealed as exc:  # a reconnect found the chain retired in the registry
                self._sealed_seq = exc.seq or self._sealed_seq or -1
                _log.error("%s: %d record(s) refused", exc, len(items))
                raise
            sealed_hashes: list[tuple[int, bytes] | None] = [None] * len(items)
            try:
                with self._deadline(conn):
                    if self._version >= 4 and not any(it.attempted for it in items):
                        flush = owed is None
                        result = self._write_fast(conn, items, sealed_hashes, note, flush)
                        if not flush:
                            assert owed is not None
                            owed[:] = _marked(items, sealed_hashes)
                    else:
                        result = self._write(conn, items, sealed_hashes, note)
                    if result.duplicates:
                        result = self._confirm_duplicates(conn, items, result, note)
                    return result
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
                if exc.sqlstate == CHAIN_SEALED:
                    # The chain was retired (its head is a seal): nothing was written, and
                    # nothing ever will be (coworker.audit.chain_seal).
                    raise self._refuse_sealed(_sealed_seq(str(exc)), len(items)) from exc
                if exc.sqlstate == LOCK_KEY_MISMATCH and attempt == 0:
                    # Our cached lock key (the records table's oid) is not the chain's any
                    # more: nothing was written or locked. Reconnect (re-reads it) and retry.
                    _log.warning("audit store %s: %s; reconnecting", self, str(exc).strip())
                    self._drop_connection()
                    self._next_connect = 0.0
                    continue
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
                # hashes (or the nonce of a server-side append) so that the next attempt (or
                # the shipper) can tell.
                items = _marked(items, sealed_hashes)
                if attempt == 1:
                    raise _Unreachable(items, exc) from exc
                self._next_connect = 0.0
        raise AssertionError("unreachable")  # pragma: no cover

    def _confirm_duplicates(
        self,
        conn: psycopg.Connection[Any],
        items: list[_Item],
        result: AppendResult,
        note: Spool | None,
    ) -> AppendResult:
        """Answer "duplicate" only for an entry whose key is held by a row that is that record
        (:func:`coworker.audit.dedup.forged`); write the others under the key's re-key
        (:func:`coworker.audit.dedup.rekey`), or with no key when that is held by another
        record too.

        Only after a duplicate (the append without one costs nothing more): the row holding
        the key is read back. When the entry earns its key (a key coworker derived from it)
        and that row does not, the row was inserted by hand with another record's key (a
        writer role can): the genuine record is written all the same, with a CRITICAL log
        line; verify names the forged row when its body is of the key's kind. A resend of it
        finds its re-key held by itself: a duplicate again. A key the entry does not earn (an
        application's own) is trusted."""
        from coworker.audit.dedup import rekey

        forged = self._forged(conn, items, result.duplicates, lambda key: key)
        if not forged:
            return result
        for _, seq in forged:
            _log.critical(
                "audit store %s: the dedup key of an entry is held by seq %d, whose body is "
                "not that record (a row inserted with another record's key?): writing the "
                "entry under its re-key; run `coworker audit verify`",
                self,
                seq,
            )
        natural = {i: items[i].dedup_key for i, _ in forged}
        todo = [i for i, _ in forged]
        again = [_Item(items[i].fields, items[i].payload, rekey(natural[i] or b""), (),
                       items[i].spool_id) for i in todo]  # fmt: skip
        second = self._write_again(conn, again, note)
        records = [*result.records, *second.records]
        # A re-key held: by this very record (a resend after the forgery), or forged too.
        by_rekey = {rekey(n): n for n in natural.values() if n is not None}
        held = self._forged(conn, again, second.duplicates, lambda key: by_rekey[key])
        if held:
            for _, seq in held:
                _log.critical(
                    "audit store %s: the re-key of an entry is held by seq %d, another record "
                    "too: writing the entry without a key",
                    self,
                    seq,
                )
            last = [_Item(again[j].fields, again[j].payload, None, (), again[j].spool_id)
                    for j, _ in held]  # fmt: skip
            records += self._write_again(conn, last, note).records
        duplicates = sorted(
            {i for i in result.duplicates if i not in natural}
            | {todo[j] for j in second.duplicates if j not in {h for h, _ in held}}
        )
        records.sort(key=lambda r: r.seq)
        return AppendResult(records, duplicates, result.spooled)

    def _forged(
        self,
        conn: psycopg.Connection[Any],
        items: list[_Item],
        indexes: list[int],
        natural: Any,
    ) -> list[tuple[int, int]]:
        """``(index, seq of the holder)`` of the items among ``indexes`` whose key is held by a
        row that does not earn ``natural(key)`` (the record's own key) from its body, while
        the item earns it (:func:`coworker.audit.dedup.forged`: a key the item does not earn,
        an application's own, is trusted)."""
        from coworker.audit.chain import prepare
        from coworker.audit.dedup import forged

        keys = [k for i in indexes if (k := items[i].dedup_key) is not None]
        if not keys:
            return []
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT dedup_key, seq, body FROM {} WHERE dedup_key = ANY(%b)").format(
                    self._table
                ),
                (_ByteaArray.of(keys),),
            )
            held = {bytes(r[0]): (int(r[1]), bytes(r[2])) for r in cur.fetchall()}
        out: list[tuple[int, int]] = []
        for i in indexes:
            key = items[i].dedup_key
            row = held.get(key) if key is not None else None
            if key is None or row is None:
                continue
            if forged(natural(key), prepare([items[i].fields])[0].body(0), row[1]):
                out.append((i, row[0]))
        return out

    def _write_again(
        self, conn: psycopg.Connection[Any], items: list[_Item], note: Spool | None
    ) -> AppendResult:
        hashes: list[tuple[int, bytes] | None] = [None] * len(items)
        if self._version >= 4:
            return self._write_fast(conn, items, hashes, note)
        return self._write(conn, items, hashes, note)

    def _refuse_sealed(self, seq: int, count: int) -> AuditUnavailable:
        from coworker.audit.chain_seal import refused

        self._sealed_seq = seq or self._sealed_seq or -1
        return refused(str(self), self.chain, max(seq, 0), count)

    def _write_fast(
        self,
        conn: psycopg.Connection[Any],
        items: list[_Item],
        sealed_hashes: list[tuple[int, bytes] | None],
        note: Spool | None,
        flush: bool = True,
    ) -> AppendResult:
        """Append in one round trip: the database seals (``append()``, schema version 4).

        The lock is taken, the head read, the records hashed and inserted by one statement
        on the server; the durable flush follows in the same pipeline (its own transaction,
        after a Sync), so the client waits for one round trip and holds nothing meanwhile.
        Without ``flush`` the records are committed (asynchronously) and not yet durable:
        the caller flushes (:mod:`.group_flush`).
        Before sending, every item notes ``(-floor - 1, nonce)`` as its attempt (durably in
        the spool when shipping): if the answer is lost, the next attempt looks for rows above
        ``floor`` carrying the nonce (:meth:`_write`).
        """
        prepared = prepare(it.fields for it in items)
        nonce = secrets.token_bytes(_NONCE)
        mark = (-self._floor - 1, nonce)
        for i in range(len(items)):
            sealed_hashes[i] = mark
        if note is not None:
            note.note_attempt({it.spool_id: mark for it in items if it.spool_id})
        payloads = [it.payload for it in items]
        keys = [it.dedup_key for it in items]
        params: list[bytes | None] = [
            nonce,
            _ByteaArray.of([p.halves[0] for p in prepared]).data,
            _ByteaArray.of([p.halves[1] for p in prepared]).data,
            _ByteaArray.of(payloads).data if any(p is not None for p in payloads) else None,
            _ByteaArray.of(keys).data if any(k is not None for k in keys) else None,
        ]
        params += [a.data for a in _column_arrays([it.fields for it in items])]
        # One round trip: append() commits (asynchronously), then the durable flush, its own
        # transaction after a Sync (prepared on a new connection in the same round trip).
        if self._prepared is not conn:
            self._prepared = None
            setup = [
                (_APPEND, self._append_statement(), _APPEND_TYPES),
                (_FLUSH_NAME, _FLUSH.encode(), ()),
            ]
        else:
            setup = []

        def now_prepared() -> None:
            self._prepared = conn

        calls: list[tuple[bytes, list[bytes | None] | None]] = [(_APPEND, params)]
        if flush:
            calls.append((_FLUSH_NAME, None))
        res = _pipelined(conn, calls, setup, now_prepared)[0]
        value = res.get_value
        rows = [
            (_int(value(r, 0)), _int(value(r, 1)), value(r, 2), value(r, 3))
            for r in range(res.ntuples)
        ]
        if sorted(r[0] or 0 for r in rows) != list(range(1, len(items) + 1)):
            # append() answers one row per entry (its seq, or NULLs: a duplicate). Anything
            # else is not coworker's function (e.g. ALTERed to STRICT: a NULL argument then
            # returns nothing, inserts nothing): never report those entries as written.
            raise AuditUnavailable(
                f"audit store {self}: append() answered {len(rows)} row(s) for {len(items)} "
                "record(s): it is not coworker's function (run `coworker audit verify`)"
            )
        sealed: list[StoredRecord] = []
        duplicates: list[int] = []
        for index, seq, prev, digest in sorted(rows, key=lambda r: (r[1] is None, r[1] or 0, r[0])):
            assert index is not None
            i = index - 1
            if seq is None or prev is None or digest is None:
                duplicates.append(i)
                continue
            body = prepared[i].body(seq)
            if link(prev, body) != digest:
                # The Python verifier is the authority: a server that hashes other bytes than
                # chain.py is a fault to surface now, not at the next verify.
                raise AuditUnavailable(
                    f"audit store {self}: the database sealed seq {seq} with a hash that is not "
                    "SHA-256(prev_hash || body) of coworker's bytes (run `coworker audit verify`)"
                )
            sealed.append(StoredRecord(seq, prev, digest, body, items[i].payload))
        if sealed:
            self._floor = max(self._floor, sealed[-1].seq)
        duplicates.sort()
        return AppendResult(sealed, duplicates)

    def _append_statement(self) -> bytes:
        if self._append_sql is None:
            placeholders = ", ".join(f"${n}" for n in range(1, len(_APPEND_TYPES) + 1))
            self._append_sql = (
                sql.SQL("SELECT i, seq, prev_hash, hash FROM {}({}, ")
                .format(sql.Identifier(self.schema, "append"), sql.Literal(self._oid))
                .as_string()
                + placeholders
                + ")"
            ).encode()
        return self._append_sql

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
            sealed_by_us = [a for a in attempted if a[0] >= 1]
            if sealed_by_us:
                # An earlier attempt whose COMMIT answer was lost may have gone through.
                cur.execute(
                    sql.SQL(
                        "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM {} r"
                        " LEFT JOIN {} p ON p.seq = r.seq WHERE r.seq = ANY(%b)"
                    ).format(table, self._payloads),
                    (_Int8Array.of([a[0] for a in sealed_by_us]),),
                )
                present = {(r[0], bytes(r[2])): _record(r) for r in cur.fetchall()}
                for i, it in enumerate(items):
                    for a in it.attempted:
                        if a in present:
                            committed[i] = present[a]
                            skip.add(i)
                            break
            by_server = [a for a in attempted if a[0] < 0]
            if by_server and self._version >= 4:
                # Attempts of the server-side append() (_write_fast): the rows of one call
                # carry its nonce, above the floor the caller knew. We hold the lock: a
                # transaction of the lost connection still running has finished by now.
                cur.execute(
                    sql.SQL(
                        "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload, r.attempt FROM {} r"
                        " LEFT JOIN {} p ON p.seq = r.seq WHERE r.seq > %s AND r.attempt = ANY(%b)"
                        " ORDER BY r.seq"
                    ).format(table, self._payloads),
                    (
                        min(-a[0] - 1 for a in by_server),
                        _ByteaArray.of(sorted({a[1][:_NONCE] for a in by_server})),
                    ),
                )
                rows = cur.fetchall()
                claimed: set[int] = set()  # two byte-identical entries are two rows, not one
                for i, it in enumerate(items):
                    if i in skip:
                        continue
                    mine = {a[1][:_NONCE] for a in it.attempted if a[0] < 0}
                    for r in rows:
                        # The nonce names the call; the body (with the seq it got) the entry.
                        if (
                            r[0] not in claimed
                            and bytes(r[5]) in mine
                            and bytes(r[3]) == prepared[i].body(r[0])
                        ):
                            committed[i] = _record(r)
                            claimed.add(r[0])
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
            sealed = seal(
                [prepared[i] for i in todo],
                head,
                [items[i].payload for i in todo],
                first_prev=genesis(self.chain),
            )
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
        if sealed or committed or duplicates:
            # Found committed by an earlier attempt, or a duplicate of a row another writer
            # committed asynchronously and may not have flushed yet: make sure it is durable
            # before the caller is told it is stored.
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

    def _connect_flusher(self) -> psycopg.Connection[Any]:
        """A connection of the group flush's own (:mod:`.group_flush`): autocommit, names
        resolved in ``pg_catalog`` alone (as on the store's connection), the flush prepared.

        Raises:
            _ServerDown: the server cannot be reached (or refused the connection).
        """
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, **self._connect_options)
        except psycopg.OperationalError as exc:
            raise _ServerDown(str(exc).strip()) from exc
        try:
            with self._deadline(conn):
                conn.execute("SET search_path = pg_catalog, pg_temp")
                res = conn.pgconn.prepare(_FLUSH_NAME, _FLUSH.encode())
                if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
                    raise psycopg.errors.error_from_result(res, encoding=conn.info.encoding)
        except psycopg.Error as exc:
            conn.close()
            raise _ServerDown(str(exc).strip()) from exc
        return conn

    def _flush_on(self, conn: psycopg.Connection[Any]) -> None:
        """One durable flush on a flusher connection (see :meth:`_flush`), watched."""
        with self._deadline(conn):
            _pipelined(conn, [(_FLUSH_NAME, None)])

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


def _marked(items: list[_Item], marks: list[tuple[int, bytes] | None]) -> list[_Item]:
    """``items``, each with its attempt of this round added (what a next attempt looks for)."""
    return [
        _Item(
            it.fields,
            it.payload,
            it.dedup_key,
            it.attempted + ((h,) if h is not None else ()),
            it.spool_id,
        )
        for it, h in zip(items, marks, strict=True)
    ]


def _sealed_seq(message: str) -> int:
    """The seq in append()'s refusal of a sealed chain ("... sealed at seq N ..."), or 0."""
    import re

    found = re.search(r"sealed at seq (\d+)", message)
    return int(found.group(1)) if found is not None else 0
