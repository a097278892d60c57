"""Erasure and purge in the PostgreSQL store (issue 15): data keys, payload deletes."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import psycopg
from psycopg import sql

from coworker.audit import erasure
from coworker.audit.store import (
    StoredRecord,
)
from coworker.audit.store_postgres._wire import (
    _COLUMNS,
    _bytes,
    _ServerDown,
)
from coworker.audit.store_postgres.shipper import _Shipper
from coworker.exceptions import AuditUnavailable

_log = logging.getLogger("coworker.audit")


# A body jsonb cannot read: canonical JSON writes U+0000 as this escape, which jsonb refuses
# ("unsupported Unicode escape sequence"). CASE decides before the cast is evaluated.
_NUL: Final = "pg_catalog.strpos(pg_catalog.convert_from(r.body, 'UTF8'), '\\u0000') > 0"


def _field(body: Any, name: str) -> str | None:
    """The string ``name`` of a record body decoded in Python (``None``: none, or no JSON
    object)."""
    if body is None:
        return None
    try:
        fields = json.loads(bytes(body))
    except ValueError:
        return None
    value = fields.get(name) if isinstance(fields, dict) else None
    return value if isinstance(value, str) else None


class _Erasure(_Shipper):
    """Erasure and purge in the PostgreSQL store (issue 15): data keys, payload deletes."""

    # -- erasure (issue 15) ------------------------------------------------------------------
    def _seal_payloads(
        self, entries: Sequence[Mapping[str, Any]], payloads: Sequence[bytes | None] | None
    ) -> tuple[Sequence[Mapping[str, Any]], Sequence[bytes | None] | None]:
        # Sealed before the entries become items: a retried or spooled item keeps the same
        # bytes (the dedup of a lost COMMIT answer compares hashes), and the spool file
        # holds ciphertext, never the captured plaintext.
        if (
            not self.encrypt_payloads
            or payloads is None
            or not any(p is not None for p in payloads)
            or (self.keystore is None and not self._key_table)
        ):
            return entries, payloads
        keys = self.keystore.get_or_create_key if self.keystore is not None else self._make_key
        try:
            return erasure.seal_all(entries, payloads, keys, self.subject_field)
        except AuditUnavailable as exc:
            # No key without the server: the record must not be lost for it. The payload is
            # kept as captured (erase still deletes it, by subject) and this is said loudly.
            _log.warning(
                "audit store %s: no data key (%s); %d payload(s) stored unencrypted",
                self,
                exc,
                sum(p is not None for p in payloads),
            )
            return entries, payloads

    def _make_key(self, subject: str) -> bytes:
        keys = sql.Identifier(self.schema, "keys")
        query = sql.SQL(
            "WITH ins AS (INSERT INTO {k} (subject, key) VALUES (%s, %s)"
            " ON CONFLICT (subject) DO NOTHING RETURNING key)"
            " SELECT key FROM ins UNION ALL SELECT key FROM {k} WHERE subject = %s"
        ).format(k=keys)
        for _ in range(3):  # a concurrent first insert is invisible to our snapshot: retry
            rows = self._fetch(query, (subject, erasure.new_key(), subject))
            if rows:
                return _bytes(rows[0][0])
        raise AuditUnavailable(f"audit store {self}: cannot make a data key for {subject!r}")

    def _flow_subjects(self, flow_id: str) -> set[str]:
        rows = self._fetch(
            sql.SQL(
                "SELECT DISTINCT user_id, CASE WHEN " + _NUL + " THEN NULL ELSE"
                " convert_from(r.body, 'UTF8')::jsonb ->> 'payload_subject' END,"
                " CASE WHEN " + _NUL + " THEN r.body END FROM {} r WHERE flow_id = %s"
            ).format(self._table),
            (flow_id,),
        )
        found = {v for row in rows for v in row[:2] if isinstance(v, str)}
        return found | {v for row in rows if (v := _field(row[2], "payload_subject"))}

    def plaintext(self, record: StoredRecord) -> bytes | None:
        """The readable payload of ``record``: decrypted, or as stored when not encrypted."""
        return erasure.plaintext(record, self.key_for)

    def delete_payloads(self, seqs: Sequence[int]) -> bool:
        """Delete the payload rows of ``seqs`` (a purge; the records stay), then ``VACUUM``.

        Raises:
            AuditUnavailable: nothing was deleted.
        """
        with self._lock:
            try:
                conn = self._connection()
            except _ServerDown as exc:
                raise AuditUnavailable(f"audit store {self}: {exc}") from exc
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        sql.SQL("DELETE FROM {} WHERE seq = ANY(%s)").format(self._payloads),
                        (list(seqs),),
                    )
                    cur.execute(sql.SQL("VACUUM {}").format(self._payloads))
            except psycopg.Error as exc:
                self._rollback_or_drop(conn)
                raise AuditUnavailable(f"audit store {self}: purge failed: {exc}") from exc
        return True

    def erase(self, subject: str, reason: str, *, by: str | None = None) -> erasure.Erased:
        """Append the erasure record of ``subject``, then delete its payloads and data key.

        The record comes first (an interrupted erase is re-run and completes; it never leaves
        payloads missing without a record). The key table is then rewritten
        (``VACUUM FULL``: the deleted key's bytes leave the table's files) and the payloads
        table vacuumed; the server's WAL and backups keep old pages until they are recycled
        (docs/privacy.md). Needs a role with DELETE on the tables (the schema owner).

        Raises:
            ErasureRefused: a legal hold covers the subject; nothing was changed.
            AuditUnavailable: the record was not appended or the rows not deleted.
        """
        if self.readonly:
            raise AuditUnavailable(f"audit store {self} is read-only: erase refused")
        erasure.refuse_if_held(erasure.store_holds(self), subject, self._flow_subjects)
        column = self.subject_field if self.subject_field in _COLUMNS else None
        by_subject = (
            sql.SQL("r.{} = %s").format(sql.Identifier(column))
            if column is not None
            else sql.SQL("convert_from(r.body, 'UTF8')::jsonb ->> %s = %s")
        )
        params: tuple[Any, ...] = (
            (subject, subject) if column is not None else (subject, self.subject_field, subject)
        )
        rows = self._fetch(
            sql.SQL(
                "SELECT p.seq FROM {p} p JOIN {t} r ON r.seq = p.seq WHERE CASE WHEN "
                + _NUL
                + " THEN false ELSE"
                " convert_from(r.body, 'UTF8')::jsonb ->> 'payload_subject' = %s OR {by} END"
                " ORDER BY p.seq"
            ).format(p=self._payloads, t=self._table, by=by_subject),
            params,
        )
        # A body holding a \u0000 (any record's strings may: an ingested span's name) is one
        # jsonb cannot read: those few are decoded here, and never fail the whole erase.
        odd = self._fetch(
            sql.SQL(
                "SELECT p.seq, r.body FROM {p} p JOIN {t} r ON r.seq = p.seq WHERE " + _NUL
            ).format(p=self._payloads, t=self._table),
            (),
        )
        seqs = sorted(
            [int(r[0]) for r in rows]
            + [
                int(r[0])
                for r in odd
                if subject in (_field(r[1], "payload_subject"), _field(r[1], self.subject_field))
            ]
        )
        record = erasure.append_now(self, erasure.erasure_entry(subject, reason, by=by, seqs=seqs))
        deletes: list[tuple[sql.Composed, tuple[Any, ...]]] = [
            (sql.SQL("DELETE FROM {} WHERE seq = ANY(%s)").format(self._payloads), (seqs,))
        ]
        if self._key_table:
            deletes.append(
                (
                    sql.SQL("DELETE FROM {} WHERE subject = %s").format(
                        sql.Identifier(self.schema, "keys")
                    ),
                    (subject,),
                )
            )
        with self._lock:
            try:
                conn = self._connection()
            except _ServerDown as exc:
                raise AuditUnavailable(f"audit store {self}: {exc}") from exc
            try:
                with conn.cursor() as cur:
                    cur.execute("BEGIN")
                    for statement, args in deletes:
                        cur.execute(statement, args)
                    cur.execute("COMMIT")
                    # VACUUM runs outside a transaction (the connection is in autocommit).
                    if self._key_table:
                        cur.execute(
                            sql.SQL("VACUUM FULL {}").format(sql.Identifier(self.schema, "keys"))
                        )
                    cur.execute(sql.SQL("VACUUM {}").format(self._payloads))
            except psycopg.Error as exc:
                self._rollback_or_drop(conn)
                raise AuditUnavailable(
                    f"audit store {self}: erase of {subject!r} (record seq {record.seq}) did not "
                    f"complete; run it again: {exc}"
                ) from exc
        erasure.forget_keys()
        if self.keystore is not None:
            self.keystore.destroy_key(subject)
        return erasure.Erased(record, tuple(seqs))
