"""The SQLite audit store's append path inside its write transaction: payloads sealed, the head
read, the records chained onto it and inserted, every row checked to be there
(:class:`~coworker.audit.store_sqlite.SQLiteStore`'s write half)."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from coworker.audit import erasure
from coworker.audit.chain import Prepared, prepare, seal_after
from coworker.audit.sqlite_erasure import _key_in_txn
from coworker.audit.sqlite_migrate import file_version
from coworker.audit.sqlite_schema import _HEAD, _INSERT, _INSERT_V1, _row, _row_v1
from coworker.audit.store import StoredRecord

if TYPE_CHECKING:
    from coworker.audit.store_sqlite import SQLiteStore

__all__ = ["append_in_txn"]


def append_in_txn(
    store: SQLiteStore,
    conn: sqlite3.Connection,
    entries: Sequence[Mapping[str, Any]],
    payloads: Sequence[bytes | None] | None,
    prepared: list[Prepared] | None = None,
) -> list[StoredRecord]:
    """Seal ``entries`` onto the head and insert them: called with the store's lock held,
    inside ``BEGIN IMMEDIATE``.

    Raises:
        sqlite3.Error: nothing may be committed (the caller rolls back).
    """
    # Payloads are sealed here, in the transaction that inserts them: a key created for them
    # commits with them, and an erase committed by another process just before cannot leave
    # us a stale key.
    # (``prepared`` given: append() found nothing to seal before it took the lock.)
    if (
        prepared is None
        and store.encrypt_payloads
        and payloads is not None
        and payloads.count(None) != len(payloads)
    ):
        keys = (
            store.keystore.get_or_create_key
            if store.keystore is not None
            else lambda subject: _key_in_txn(conn, subject)
        )
        entries, payloads = erasure.seal_all(entries, payloads, keys, store.subject_field)
        try:
            prepared = prepare(entries)
        except ValueError as exc:
            raise sqlite3.DataError(f"unencodable record: {exc}") from exc
    if prepared is None:
        prepared = prepare(entries)
    # The head is read inside the write transaction, every time: it costs one indexed
    # lookup (~1.5 us; ``PRAGMA data_version`` to validate a cached head would cost ~1 us),
    # and whatever another process appended is then always the base of our chain.
    row = conn.execute(_HEAD).fetchone()
    if row is None:
        sealed = seal_after(prepared, 0, store._first_prev, payloads)
    else:
        sealed = seal_after(prepared, row[0], row[1], payloads)
    try:
        inserted = _insert(conn, store.schema_version, sealed, entries)
    except sqlite3.OperationalError as exc:
        # Another process migrated the file to version 2 since this connection opened it
        # (the version 1 insert names columns that are generated now): take the file's
        # version and insert again, in the same transaction (nothing was inserted).
        version = file_version(conn)
        if "generated column" not in str(exc) or version == store.schema_version:
            raise
        store.schema_version = version or store.schema_version
        inserted = _insert(conn, store.schema_version, sealed, entries)
    if inserted != len(sealed):
        # A foreign trigger doing RAISE(IGNORE) skips rows without an error.
        raise sqlite3.IntegrityError(
            f"only {inserted} of {len(sealed)} row(s) were inserted: a trigger "
            "dropped them (run `coworker audit verify`)"
        )
    if payloads is not None and payloads.count(None) != len(payloads):
        blobs = [(r.seq, r.payload) for r in sealed if r.payload is not None]
        conn.executemany("INSERT INTO audit_payloads (seq, payload) VALUES (?, ?)", blobs)
    return sealed


def _insert(
    conn: sqlite3.Connection,
    version: int,
    sealed: list[StoredRecord],
    entries: Sequence[Mapping[str, Any]],
) -> int:
    """Insert the sealed rows into a ``version`` file: how many went in."""
    insert, row = (_INSERT, _row) if version >= 2 else (_INSERT_V1, _row_v1)
    if len(sealed) == 1:  # the common group of one: no executemany machinery
        return conn.execute(insert, row(sealed[0], entries[0])).rowcount
    rows = [row(r, e) for r, e in zip(sealed, entries, strict=True)]
    return conn.executemany(insert, rows).rowcount
