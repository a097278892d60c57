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
from coworker.audit.sqlite_schema import _HEAD, _HEAD_SEAL, _INSERT, _INSERT_V1, _row, _row_v1
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
    if row is not None and row[1] != store._own_head:
        # Not the record this store appended last (another process's, or from before it
        # opened the file): is it a seal (coworker.audit.chain_seal)? The head this store
        # wrote itself is known not to be one: a hash compare instead of a body read.
        row = conn.execute(_HEAD_SEAL).fetchone()
        if row is not None and row[1] is None:
            row = _refuse_sealed(store, conn, row[0], len(entries))
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
    # The head's hash as this store wrote it (it binds the seq): the next append finding it
    # there skips the seal check.
    # A seal is only ever appended by coworker.audit.chain_seal.seal, through a store of its
    # own that it closes at once (any other store finds the seal at the head, not its own).
    store._own_head = sealed[-1].hash
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


def _refuse_sealed(store: SQLiteStore, conn: sqlite3.Connection, seq: int, count: int) -> Any:
    """Raise :class:`~coworker.audit.chain_seal.ChainSealed` when the head (``seq``, whose
    body begins like a seal) is the seal of the store's chain (it was retired); else return
    the head's ``(seq, hash)`` row (a record that merely begins alike)."""
    from coworker.audit.chain_seal import is_seal, refused

    found = conn.execute(
        "SELECT seq, hash, body FROM audit_records WHERE seq = ?", (seq,)
    ).fetchone()
    if found is not None and is_seal(bytes(found[2]), store.chain):
        raise refused(repr(store.path), store.chain, seq, count)
    return (found[0], found[1]) if found is not None else None
