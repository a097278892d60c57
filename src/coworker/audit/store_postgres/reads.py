"""Reads of the PostgreSQL store: head, pages of records, search, integrity findings."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql

from coworker.audit import erasure
from coworker.audit.chain import check_chain_name
from coworker.audit.dedup import key_matches
from coworker.audit.store import (
    COLUMN_MISMATCH,
    DEDUP_MISMATCH,
    GUARD,
    MAX_FINDINGS,
    OUT_OF_RANGE,
    PAYLOAD_MISMATCH,
    Finding,
    Head,
    StoredRecord,
    erased_seqs,
    malformed_finding,
    payload_finding,
)
from coworker.audit.store_postgres._wire import (
    _COLUMNS,
    _FILTER_COLUMNS,
    _PAGE,
    _ByteaArray,
    _bytes,
    _column_values,
    _record,
    _ServerDown,
    _split_url,
)
from coworker.audit.store_postgres.connection import _Connections
from coworker.audit.store_postgres.guards import (
    _guard_problems,
)
from coworker.exceptions import AuditUnavailable, ConfigError

_log = logging.getLogger("coworker.audit")


class _Reads(_Connections):
    """Reads of the PostgreSQL store: head, pages of records, search, integrity findings."""

    def key_for(self, subject: str) -> bytes | None:
        """The data key of ``subject``, or ``None`` (none made yet, or destroyed)."""
        if self.keystore is not None:
            return self.keystore.get_key(subject)
        if not self._key_table:
            return None
        rows = self._fetch(
            sql.SQL("SELECT key FROM {} WHERE subject = %s").format(
                sql.Identifier(self.schema, "keys")
            ),
            (subject,),
        )
        return _bytes(rows[0][0]) if rows else None

    def tree_table(self) -> Any:
        """The Merkle tree of this chain, in tables of its schema (``coworker.audit.tlog``)."""
        from coworker.audit.tlog import PostgresTable

        conninfo, _, _ = _split_url(self.url)
        return PostgresTable(conninfo, self.schema)

    def erased_payloads(self) -> dict[int, Any]:
        """Erased payloads by record seq, from an indexed search for erasure records."""
        return erasure.searched_erasures(self.search)

    def chains(self) -> list[str]:
        """The chains of this store (its default chain ``""`` first, then by name): every
        schema ``<schema>:<name>`` that holds an audit log, beside the store's own schema."""
        rows = self._fetch(
            sql.SQL(
                "SELECT n.nspname FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid"
                " WHERE c.relname = 'schema_version' AND (n.nspname = %s OR"
                " left(n.nspname, %s) = %s) ORDER BY n.nspname"
            ),
            (self.base_schema, len(self.base_schema) + 1, self.base_schema + ":"),
        )
        names = [
            r[0][len(self.base_schema) + 1 :] if r[0] != self.base_schema else "" for r in rows
        ]
        valid = []
        for name in names:
            try:
                valid.append(check_chain_name(name))
            except ValueError:
                continue  # a schema named like a chain that no coworker made: not ours
        return sorted(valid, key=lambda n: (n != "", n))

    def head(self) -> Head | None:
        """See :class:`~coworker.audit.store.AuditStore` (the shared log's head)."""
        query = sql.SQL("SELECT seq, hash FROM {} WHERE seq >= 1 ORDER BY seq DESC LIMIT 1").format(
            self._table
        )
        rows = self._fetch(query, ())
        return Head(rows[0][0], bytes(rows[0][1])) if rows else None

    def iter_from(self, seq: int = 1) -> Iterator[StoredRecord]:
        """See :class:`~coworker.audit.store.AuditStore`; reads page by page in seq order."""
        query = sql.SQL(
            "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM {} r "
            "LEFT JOIN {} p ON p.seq = r.seq WHERE r.seq >= %s ORDER BY r.seq LIMIT %s"
        ).format(self._table, self._payloads)
        next_seq = max(seq, 1)
        while True:
            rows = self._fetch(query, (next_seq, _PAGE))
            for row in rows:
                yield _record(row)
            if len(rows) < _PAGE:
                return
            next_seq = rows[-1][0] + 1

    def iter_chain(self, seq: int = 1) -> Iterator[tuple[int, bytes, bytes, bytes]]:
        """Yield ``(seq, prev_hash, hash, body)`` tuples in order: what verify needs."""
        query = sql.SQL(
            "SELECT seq, prev_hash, hash, body FROM {} WHERE seq >= %s ORDER BY seq LIMIT %s"
        ).format(self._table)
        next_seq = max(seq, 1)
        while True:
            rows = self._fetch(query, (next_seq, _PAGE))
            for row in rows:
                yield row[0], _bytes(row[1]), _bytes(row[2]), _bytes(row[3])
            if len(rows) < _PAGE:
                return
            next_seq = rows[-1][0] + 1

    def count(self) -> int:
        """Number of records (for progress bars)."""
        head = self.head()
        return head.seq if head is not None else 0

    def search(
        self,
        filters: Mapping[str, str | None],
        *,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        after: int = 0,
    ) -> Iterator[StoredRecord]:
        """Records matching the filters, in seq order (same contract as the SQLite store).

        Args:
            filters: keys ``flow_id``, ``user``, ``agent``, ``doctype``, ``operation``,
                ``category``, ``kind``, ``run_id``, ``span_id``, ``trace_id``; ``None`` values
                are ignored.
            since: RFC 3339 lower bound (inclusive) on the record time.
            until: RFC 3339 upper bound (exclusive) on the record time.
            limit: at most this many records.
            after: only records with a seq above this (an incremental reader's cursor).

        The caller should re-check the decoded body: the columns are unhashed copies.
        """
        where: list[sql.Composable] = []
        params: list[Any] = []
        for key, value in filters.items():
            if value is None:
                continue
            column = _FILTER_COLUMNS.get(key)
            if column is None:
                raise ConfigError(f"unknown audit filter {key!r}")
            where.append(sql.SQL("r.{} = %s").format(sql.Identifier(column)))
            params.append(value)
        if since is not None:
            where.append(sql.SQL("r.time >= %s"))
            params.append(since)
        if until is not None:
            where.append(sql.SQL("r.time < %s"))
            params.append(until)
        where.append(sql.SQL("r.seq >= %s"))
        query = sql.SQL(
            "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM {} r "
            "LEFT JOIN {} p ON p.seq = r.seq WHERE {} ORDER BY r.seq LIMIT %s"
        ).format(self._table, self._payloads, sql.SQL(" AND ").join(where))
        remaining = limit
        next_seq = max(after, 0) + 1
        while remaining is None or remaining > 0:
            page = _PAGE if remaining is None else min(_PAGE, remaining)
            rows = self._fetch(query, (*params, next_seq, page))
            for row in rows:
                yield _record(row)
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < page:
                return
            next_seq = rows[-1][0] + 1

    def dedup_keys_between(
        self, bounds: Sequence[tuple[bytes, bytes]], limit: int = 10_000
    ) -> list[tuple[bytes, int]]:
        """``(dedup_key, seq)`` of the records with ``low <= dedup_key < high`` for any bound
        (at most ``limit`` per bound, in key order).

        One index range scan per bound; the ingest endpoint uses it to find every record
        whose key starts with a span's trace and span id (a resend with other content).
        """
        if not bounds:
            return []
        # LATERAL + ORDER BY the indexed key: psycopg prepares a statement run often, and the
        # generic plan of a plain join scans the table; this one walks the index per bound.
        query = sql.SQL(
            "SELECT r.dedup_key, r.seq FROM unnest(%b, %b) AS b(low, high) CROSS JOIN LATERAL "
            "(SELECT dedup_key, seq FROM {} WHERE dedup_key >= b.low AND dedup_key < b.high "
            "ORDER BY dedup_key LIMIT %s) r"
        ).format(self._table)
        low = _ByteaArray.of([b[0] for b in bounds])
        high = _ByteaArray.of([b[1] for b in bounds])
        rows = self._fetch(query, (low, high, limit))
        return [(bytes(row[0]), int(row[1])) for row in rows]

    def last_inserted_at(self) -> float | None:
        """UNIX time the newest record reached the shared log (server clock), or ``None``."""
        query = sql.SQL(
            "SELECT extract(epoch FROM inserted_at) FROM {} WHERE seq >= 1"
            " ORDER BY seq DESC LIMIT 1"
        )
        rows = self._fetch(query.format(self._table), ())
        return float(rows[0][0]) if rows else None

    def open_intents(self) -> list[int]:
        """Seqs of intent records that no later outcome record of the same span closes.

        The fast path of :func:`coworker.audit.query.in_doubt`: one query (a hash anti-join
        over the log; no span index is kept, it would slow every append).
        """
        query = sql.SQL(
            "SELECT i.seq FROM {t} i WHERE i.kind = 'intent' AND i.seq >= 1 AND NOT EXISTS ("
            "SELECT 1 FROM {t} o WHERE o.span_id = i.span_id AND o.kind = 'outcome'"
            " AND o.trace_id IS NOT DISTINCT FROM i.trace_id AND o.seq > i.seq) ORDER BY i.seq"
        ).format(t=self._table)
        return [row[0] for row in self._fetch(query, ())]

    # -- integrity -----------------------------------------------------------------------------
    def integrity_findings(self, head: Head | None) -> list[Finding]:
        """See :class:`~coworker.audit.store.IntegrityChecked`: columns against bodies,
        payloads against digests, rows outside ``1..head``, the guards' definitions (triggers,
        their function, the constraints, no rules or row-level security on the log)."""
        last = head.seq if head is not None else 0
        findings: list[Finding] = []
        with self._lock:
            try:
                conn = self._connection()
            except _ServerDown as exc:
                raise AuditUnavailable(f"audit store {self}: {exc}") from exc
            try:
                with self._deadline(conn), conn.cursor() as cur:
                    problems = _guard_problems(cur, self.schema, self.chain)
                conn.commit()
            except psycopg.Error as exc:
                self._rollback_or_drop(conn)
                raise AuditUnavailable(f"audit store {self}: {exc}") from exc
        findings += [Finding(GUARD, None, p) for p in problems]
        # Only below 1: the head is the highest seq, and a row above it was appended after
        # the head was read (verify runs while the applications write).
        stray = self._fetch(
            sql.SQL("SELECT seq FROM {} WHERE seq < 1 ORDER BY seq LIMIT %s").format(self._table),
            (MAX_FINDINGS,),
        )
        findings += [
            Finding(OUT_OF_RANGE, r[0], f"seq {r[0]}: a row outside 1..{last} (never appended)")
            for r in stray
        ]
        orphans = self._fetch(
            sql.SQL(
                "SELECT p.seq FROM {} p WHERE p.payload IS NOT NULL AND NOT EXISTS ("
                "SELECT 1 FROM {} r WHERE r.seq = p.seq) ORDER BY p.seq LIMIT %s"
            ).format(self._payloads, self._table),
            (MAX_FINDINGS,),
        )
        findings += [
            Finding(PAYLOAD_MISMATCH, r[0], f"seq {r[0]}: a payload with no record")
            for r in orphans
        ]
        names = [*_COLUMNS, "time"]
        query = sql.SQL(
            "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload, r.dedup_key, {} FROM {} r"
            " LEFT JOIN {} p ON p.seq = r.seq WHERE r.seq >= %s AND r.seq <= %s"
            " ORDER BY r.seq LIMIT %s"
        ).format(
            sql.SQL(", ").join(sql.SQL("r.") + sql.Identifier(n) for n in names),
            self._table,
            self._payloads,
        )
        columns: list[Finding] = []
        payloads: list[Finding] = []
        malformed: list[Finding] = []
        keys: list[Finding] = []
        erased = erased_seqs(self)
        next_seq = 1
        while next_seq <= last:
            rows = self._fetch(query, (next_seq, last, _PAGE))
            for row in rows:
                record = _record(row)
                try:
                    fields = json.loads(record.body)
                except ValueError:
                    fields = None
                # The hash links hold for any bytes the writer hashed: a writer role's crafted
                # INSERT or append() call can chain a body that is no record at all.
                bad = malformed_finding(record.seq, fields)
                if bad is not None:
                    if len(malformed) < MAX_FINDINGS:
                        malformed.append(bad)
                    if not isinstance(fields, dict):
                        continue
                want = [None if v is None else v.decode() for v in _column_values(fields)]
                got = list(row[6:])
                if (
                    row[5] is not None
                    and len(keys) < MAX_FINDINGS
                    and not key_matches(bytes(row[5]), record.body, fields)
                ):
                    keys.append(
                        Finding(
                            DEDUP_MISMATCH,
                            record.seq,
                            f"seq {record.seq}: its dedup key is not its body's (a row "
                            "carrying another record's key: that record would be dropped "
                            "as a duplicate)",
                        )
                    )
                if got != want:
                    wrong = ", ".join(
                        f"{n}={g!r} (body: {w!r})"
                        for n, g, w in zip(names, got, want, strict=True)
                        if g != w
                    )
                    if len(columns) < MAX_FINDINGS:
                        columns.append(
                            Finding(
                                COLUMN_MISMATCH,
                                record.seq,
                                f"seq {record.seq}: query column(s) differ from the record: "
                                + wrong,
                            )
                        )
                found = payload_finding(record, fields, self.key_for, erased)
                if found is not None and len(payloads) < MAX_FINDINGS:
                    payloads.append(found)
            if len(rows) < _PAGE:
                break
            next_seq = rows[-1][0] + 1
        return findings + malformed + keys + columns + payloads
