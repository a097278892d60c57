"""The chain registry: every named chain's existence is anchored in the default chain.

A named chain lives in a file or schema of its own (``<path>.chains/<name>.db``, PostgreSQL
``"<schema>:<name>"``). Deleted whole, it would leave nothing for verify to find, so a
writer that opens a named chain for the first time first appends a **registry record** to
the default chain (durably, ``synchronous=FULL``) naming it::

    {"v": 1, "kind": "chain", "category": "chain-registry", "operation": "create" | "adopt",
     "chain_name": NAME, "chain_genesis": <hex of chain.genesis(NAME)>,
     "chain_head_seq": N | null, "chain_head_hash": <hex> | null, ...}

``create`` registers a chain with no records yet; ``adopt`` registers one that already had
records (made before this registry existed, by hand, or left by an interrupted creation)
and records its head at that moment, so that a later cut below it is named; ``retire``
(:func:`retire`, ``coworker audit retire-chain``) records a chain's last head before it is
removed on purpose: verify then says ``retired``, and no writer opens it again.

The order of a creation is: look the name up; refuse it if it is registered while its file
or schema is gone (``vanished``: a writer never starts a registered chain again, empty) or if
a registered or present chain has the same name up to case; create the chain's file or
schema (empty); append the registry record; only then may the chain's first record be
written. A crash between the last two leaves an empty, unregistered chain, which verify
reports as such (nothing was written to it) and the next writer registers; a registered
chain whose file or schema is missing has therefore always been deleted, never
half-created. ``coworker audit verify`` checks every registered chain is there
(:func:`coworker.audit.chain_check.check_registry`).

Creations race safely: on SQLite they serialize on ``<path>.chains/registry.lock`` (SQLite's
own write lock on an empty file, never written), on PostgreSQL the registry record carries
the dedup key ``coworker-chain\\0<name, case-folded>`` and ``append_unique`` checks and
inserts it under the chain's lock, so two processes creating one chain register it once and
``Billing`` racing ``billing`` registers one of them; the other is refused.

Chain names are case-preserving but unique regardless of case: on a case-insensitive file
system (macOS, Windows) ``Billing.db`` and ``billing.db`` are one file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from coworker.audit.chain import check_chain_name, genesis
from coworker.audit.record import SCHEMA_VERSION, format_time
from coworker.audit.store import Head
from coworker.exceptions import AuditUnavailable, ConfigError

if TYPE_CHECKING:
    import psycopg

    from coworker.audit.store_postgres import PostgresStore
    from coworker.audit.store_sqlite import SQLiteStore

__all__ = [
    "CATEGORY_CHAIN_REGISTRY",
    "KIND_CHAIN",
    "REGISTRY_LOCK",
    "Registration",
    "case_conflict",
    "parse_registration",
    "registrations",
    "registry_entry",
    "registry_key",
]

_log = logging.getLogger("coworker.audit")

KIND_CHAIN: Final = "chain"
"""``kind`` of a registry record (in the default chain)."""
CATEGORY_CHAIN_REGISTRY: Final = "chain-registry"
"""``category`` of a registry record (indexed on SQLite: the registry is read through it)."""
REGISTRY_LOCK: Final = "registry.lock"
"""The file in ``<path>.chains/`` whose SQLite write lock serializes chain creations."""
_KEY_PREFIX: Final = b"coworker-chain\x00"
_RETIRE_PREFIX: Final = b"coworker-chain-retired\x00"
# Second key of the PostgreSQL advisory lock namespace 'cowr' is a table oid (>= 16384) or
# the DDL lock (1); the registry needs none of its own (append_unique is atomic).


@dataclass(frozen=True, slots=True)
class Registration:
    """A chain named by the registry.

    Attributes:
        name: the chain.
        seq: the registry record's seq in the default chain.
        operation: ``create`` (registered empty) or ``adopt`` (registered with records);
            a parsed ``retire`` record has ``retire``.
        head: for ``adopt``, the chain's head when it was registered; for ``retire``, when it
            was retired.
        retired: the ``retire`` record of the chain, once it was retired on purpose (its
            file or schema may then be removed: verify says ``retired``, not ``vanished``).
    """

    name: str
    seq: int
    operation: str
    head: Head | None
    retired: Registration | None = None
    sealed: bool = False
    """For ``retire``: ``head`` is the chain's seal (:mod:`coworker.audit.chain_seal`), its last
    record; the records it was retired holding end one before it."""


def registry_entry(
    name: str, head: Head | None = None, *, retire: bool = False, reason: str | None = None
) -> dict[str, Any]:
    """The record fields (without ``seq``) registering chain ``name``; ``head``: its head when
    it already has records (``adopt``), else ``None`` (``create``). ``retire``: the record
    retiring it on purpose instead (``head``: its last record; ``reason``: why)."""
    now = format_time(time.time_ns())
    extra = {"reason": reason} if retire else {}
    return {
        **extra,
        "v": SCHEMA_VERSION,
        "kind": KIND_CHAIN,
        "category": CATEGORY_CHAIN_REGISTRY,
        "operation": "retire" if retire else "adopt" if head is not None else "create",
        "recorded_at": now,
        "start": now,
        "chain_name": check_chain_name(name),
        "chain_genesis": genesis(name).hex(),
        "chain_head_seq": head.seq if head is not None else None,
        "chain_head_hash": head.hash.hex() if head is not None else None,
        "user_id": None,
        "payload_digest": None,
    }


def registry_key(name: str, *, retire: bool = False) -> bytes:
    """The dedup key of ``name``'s registry record (``retire``: of its retirement): equal for
    names equal up to case."""
    return (_RETIRE_PREFIX if retire else _KEY_PREFIX) + name.casefold().encode("ascii")


def parse_registration(seq: int, body: bytes) -> Registration | None:
    """The registration a record body states, or ``None`` when it is not a well-formed one
    (the query columns it was found by are unhashed copies: the body decides)."""
    try:
        fields = json.loads(body)
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.get("kind") != KIND_CHAIN:
        return None
    if fields.get("category") != CATEGORY_CHAIN_REGISTRY:
        return None
    name = fields.get("chain_name")
    if not isinstance(name, str) or not name:
        return None
    try:
        check_chain_name(name)
    except ValueError:
        return None
    if fields.get("chain_genesis") != genesis(name).hex():
        return None
    operation = fields.get("operation")
    head: Head | None = None
    if operation == "retire" and fields.get("chain_head_seq") is None:
        pass  # an empty chain retired
    elif operation in ("adopt", "retire"):
        at, digest = fields.get("chain_head_seq"), fields.get("chain_head_hash")
        if type(at) is not int or at < 1 or not isinstance(digest, str):
            return None
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            return None
        if len(raw) != 32:
            return None
        head = Head(at, raw)
    elif operation != "create":
        return None
    sealed = operation == "retire" and head is not None and fields.get("chain_sealed") is True
    return Registration(name, seq, operation, head, sealed=sealed)


def registrations(default: Any) -> dict[str, Registration]:
    """Every chain the registry in ``default`` (a default chain's store) names, by name: the
    first registration of each (a second one of the same name is a harmless duplicate)."""
    out: dict[str, Registration] = {}
    for record in default.search({"kind": KIND_CHAIN, "category": CATEGORY_CHAIN_REGISTRY}):
        found = parse_registration(record.seq, record.body)
        if found is None:
            continue
        known = out.get(found.name)
        if found.operation == "retire":
            if known is not None and known.retired is None:  # a chain is retired once
                out[found.name] = dataclasses.replace(known, retired=found)
        elif known is None:
            out[found.name] = found
    return out


def case_conflict(name: str, names: Iterable[str]) -> str | None:
    """A name among ``names`` that equals ``name`` up to case without being it, or ``None``."""
    folded = name.casefold()
    for other in names:
        if other and other != name and other.casefold() == folded:
            return other
    return None


def _refuse_case(store_label: str, name: str, names: Iterable[str]) -> None:
    other = case_conflict(name, names)
    if other is not None:
        raise ConfigError(
            f"audit store {store_label}: chain {name!r} differs from its chain {other!r} only "
            "by case; chain names must differ regardless of case (on a case-insensitive file "
            "system both would be one file)"
        )


def _refuse_retired(label: str, registration: Registration) -> None:
    if registration.retired is not None:
        from coworker.audit.chain_seal import ChainRetired

        head = registration.retired.head
        raise ChainRetired(
            label, registration.name, head.seq if head else 0, registration.retired.seq
        )


def _vanished(label: str, registration: Registration, where: str) -> AuditUnavailable:
    return AuditUnavailable(
        f"audit store {label}: chain {registration.name!r} is registered in the default "
        f"chain (seq {registration.seq}) but its {where} is gone: it vanished. Refusing to "
        "start it again, empty; run `coworker audit verify`"
    )


# -- SQLite ------------------------------------------------------------------------------------
def open_sqlite_chain(store: SQLiteStore, open_file: Callable[[], None]) -> None:
    """Open the named chain ``store`` (a writer) through the registry: ``open_file`` creates or
    opens its file; the chain is registered in the default chain before this returns.

    Raises:
        AuditUnavailable: the chain is registered but its file is gone (``vanished``), or
            the registry cannot be read or written.
        ConfigError: another chain of the store has the same name up to case.
    """
    from coworker.audit.store_sqlite import SQLiteStore

    def connect() -> None:
        open_file()
        # From now on the file exists: a reconnect (in a forked child) that finds it gone
        # must fail, not make a new, empty chain that would verify as intact.
        store.create = False

    label = repr(store.store_path)
    known = _sqlite_registrations(store.store_path, store.busy_timeout)
    mine = known.get(store.chain)
    if mine is not None:  # the common case: registered already, no lock needed
        _refuse_retired(label, mine)
        if not os.path.exists(store.path):
            raise _vanished(label, mine, f"file {store.path!r}")
        connect()
        return
    _refuse_case(label, store.chain, [*known, *store.chains()])
    if not store.create:
        # An open that may not create (the checkpointer, `correct`): the chain must exist
        # (StoreNotFound otherwise) and is opened as it is; registering what is there is for
        # an application writer or `coworker audit adopt-chains` (adopt()), never a side
        # effect of reading a chain's tree.
        connect()
        return
    # The default chain first (a new store: its directory is made here, with the store's
    # own warning for a path that did not exist), then the lock beside the chains.
    default = SQLiteStore(
        store.store_path, synchronous="FULL", busy_timeout=store.busy_timeout, chain=""
    )
    try:
        with _sqlite_mutex(store.store_path, store.busy_timeout):
            known = registrations(default)
            mine = known.get(store.chain)
            if mine is not None:  # registered by another process meanwhile
                _refuse_retired(label, mine)
                if not os.path.exists(store.path):
                    raise _vanished(label, mine, f"file {store.path!r}")
                connect()
                return
            _refuse_case(label, store.chain, [*known, *store.chains()])
            existed = os.path.exists(store.path)
            connect()
            head = store.head() if existed else None
            default.append([registry_entry(store.chain, head)])
            _adopted(label, store.chain, head)
    finally:
        default.close()


def _adopted(label: str, name: str, head: Head | None) -> None:
    if head is not None:
        _log.warning(
            "audit store %s: chain %r (%d records) was not in the chain registry; registered "
            "it (adopted at head %d)",
            label,
            name,
            head.seq,
            head.seq,
        )


def adopt(store: Any) -> Head | None:
    """Register the named chain ``store`` (open as a writer, SQLite or PostgreSQL) in the
    registry as it is, when the registry does not name it yet (``coworker audit
    adopt-chains``); returns the head it was adopted at (``None``: it was registered already,
    or it has no records and is registered as created).

    Raises:
        ConfigError: a registered chain has the same name up to case.
        AuditUnavailable: the registry cannot be read or written.
    """
    from coworker.audit.store_sqlite import SQLiteStore

    name = check_chain_name(store.chain)
    if not name:
        raise ConfigError("the default chain is not registered: it holds the registry")
    if isinstance(store, SQLiteStore):
        default = SQLiteStore(
            store.store_path, synchronous="FULL", busy_timeout=store.busy_timeout, chain=""
        )
        try:
            with _sqlite_mutex(store.store_path, store.busy_timeout):
                known = registrations(default)
                if name in known:
                    return None
                _refuse_case(repr(store.store_path), name, known)
                head = store.head()
                default.append([registry_entry(name, head)])
        finally:
            default.close()
        _adopted(repr(store.store_path), name, head)
        return head
    head = store.head()
    assert head is None or isinstance(head, Head)
    if not _pg_append_registration(store, head):
        return None
    _adopted(str(store), name, head)
    return head


def _sqlite_registrations(path: str, busy_timeout: float) -> dict[str, Registration]:
    from coworker.audit.store_sqlite import SQLiteStore

    if not os.path.exists(path):
        return {}
    try:
        default = SQLiteStore(path, readonly=True, busy_timeout=busy_timeout)
    except AuditUnavailable:
        # Not there, or being created by another process this moment: the locked path
        # (a writer's open of the default chain) decides.
        return {}
    try:
        return registrations(default)
    finally:
        default.close()


@contextmanager
def _sqlite_mutex(path: str, busy_timeout: float) -> Iterator[None]:
    """Serialize chain creations of the store at ``path`` across threads and processes."""
    from coworker.audit.store_sqlite import CHAINS_SUFFIX

    directory = path + CHAINS_SUFFIX
    try:
        os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(
            os.path.join(directory, REGISTRY_LOCK), timeout=busy_timeout, isolation_level=None
        )
    except (OSError, sqlite3.Error) as exc:
        raise AuditUnavailable(f"audit store {path!r}: chain registry lock: {exc}") from exc
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")  # nothing is ever written: the lock is the point
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"audit store {path!r}: chain registry lock: {exc}") from exc
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


# -- PostgreSQL --------------------------------------------------------------------------------
def open_postgres_chain(
    store: Any, conn: psycopg.Connection[Any], ensure: Callable[[], None]
) -> None:
    """Check and create the schema of the named chain ``store`` (a writer) through the
    registry, on its new connection ``conn``: ``ensure`` creates or checks the schema; the
    chain is registered in the default chain before this returns.

    Raises:
        AuditUnavailable: the chain is registered but its schema is gone (``vanished``), or
            the registry cannot be written.
        ConfigError: a chain of the same name up to case is registered.
    """
    label = str(store)
    known = _pg_registration(store, conn)
    if known is not None and known.name != store.chain:
        _refuse_case(label, store.chain, [known.name])
    if known is not None:
        _refuse_retired(label, known)
    if known is not None or getattr(store, "_chain_registered", False):
        if not _pg_chain_exists(conn, store.schema):
            raise _vanished(label, known or Registration(store.chain, 0, "create", None), "schema")
        ensure()
        store._chain_registered = True
        return
    if not store.create:  # as on SQLite: opened as it is (StoreNotFound when missing)
        ensure()
        return
    existed = _pg_chain_exists(conn, store.schema)
    ensure()
    head = _pg_head(store, conn) if existed else None
    if _pg_append_registration(store, head):
        _adopted(label, store.chain, head)
    store._chain_registered = True


def _pg_chain_exists(conn: psycopg.Connection[Any], schema: str) -> bool:
    # What chains() lists a chain by: the schema's version table.
    with conn.cursor() as cur:
        cur.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = 'schema_version'",
            (schema,),
        )
        found = cur.fetchone() is not None
    conn.commit()
    return found


def _pg_registration(store: PostgresStore, conn: psycopg.Connection[Any]) -> Registration | None:
    """The registration of ``store.chain``'s name up to case, by its indexed dedup key."""
    from psycopg import sql

    if not _pg_chain_exists(conn, store.base_schema):
        return None
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "SELECT seq, body FROM {} WHERE dedup_key = ANY(%s) AND seq >= 1 ORDER BY seq"
            ).format(sql.Identifier(store.base_schema, "records")),
            ([registry_key(store.chain), registry_key(store.chain, retire=True)],),
        )
        rows = cur.fetchall()
    conn.commit()
    mine: Registration | None = None
    for seq, body in rows:
        found = parse_registration(int(seq), bytes(body))
        if found is None:
            continue
        if found.operation != "retire" and mine is None:
            mine = found
        elif found.operation == "retire" and mine is not None and found.name == mine.name:
            mine = dataclasses.replace(mine, retired=found)
    return mine


def _pg_head(store: PostgresStore, conn: psycopg.Connection[Any]) -> Head | None:
    from psycopg import sql

    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT seq, hash FROM {} WHERE seq >= 1 ORDER BY seq DESC LIMIT 1").format(
                sql.Identifier(store.schema, "records")
            )
        )
        row = cur.fetchone()
    conn.commit()
    return Head(int(row[0]), bytes(row[1])) if row is not None else None


def _pg_append_registration(store: Any, head: Head | None) -> bool:
    """Append ``store.chain``'s registry record to its default chain, once per name up to
    case (the dedup key, checked under the default chain's lock). ``False``: registered
    already by this name.

    Raises:
        ConfigError: it is registered under another case.
    """
    from coworker.audit.store_postgres import PostgresStore

    default = PostgresStore(
        store.url,
        schema=store.base_schema,
        chain="",
        spool=None,
        connect_timeout=store._connect_timeout,
        io_timeout=store._io_timeout,
    )
    try:
        result = default.append_unique(
            [registry_entry(store.chain, head)], None, [registry_key(store.chain)]
        )
        if not result.duplicates:
            return True
        # Registered meanwhile (another process), by this name or another case.
        rows = default.dedup_keys_between(
            [(registry_key(store.chain), registry_key(store.chain) + b"\x00")]
        )
        names = []
        for _, seq in rows:
            record = next(iter(default.iter_from(seq)), None)
            found = parse_registration(seq, record.body) if record is not None else None
            if found is not None and record is not None and record.seq == seq:
                names.append(found.name)
    finally:
        default.close()
    _refuse_case(str(store), store.chain, names)
    return False


def retire(store: Any, reason: str) -> tuple[Registration, Head | None]:
    """Retire the named chain ``store``: seal it, then record the sealed head in the registry
    (:func:`coworker.audit.chain_seal.retire`)."""
    from coworker.audit.chain_seal import retire as seal_and_retire

    return seal_and_retire(store, reason)
