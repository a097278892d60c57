"""Retiring a named chain: a sealing record in the chain itself, then the registry's record.

Retiring (``coworker audit retire-chain NAME``) is two appends, in this order:

1. the **seal**: a record appended to the chain itself, under the chain's own write lock (the
   SQLite write lock of its file, the PostgreSQL advisory lock ``append()`` takes), so that
   it is atomic with every other append to that chain::

       {"v": 1, "kind": "chain", "category": "chain-seal", "operation": "seal",
        "chain_name": NAME, "chain_genesis": <hex>, "reason": ..., ...}

   Every append path reads the head under that lock (SQLite's Python append, PostgreSQL's
   server-side ``append()`` and ``lock_head()``, and so the spool's shipper and ingest) and
   refuses to append after a seal: :class:`ChainSealed` (an
   :class:`~coworker.AuditUnavailable`), with an ERROR log line naming the chain. A writer
   that opened the chain before it was retired is refused from then on; whatever it appended
   before the seal is under it, and so under the head the registry records.
2. the registry's ``retire`` record in the default chain (:mod:`coworker.audit.chain_registry`)
   naming the **sealed head** (the seal record's seq and hash, ``"chain_sealed": true``).

A crash between the two leaves a sealed chain the registry does not call retired: nothing can
be written to it, and verify names it ``sealed`` (a failure: the retirement is incomplete,
removing the chain now would make it ``vanished``). Running ``retire-chain`` again finds the
seal at the head and records it (it never seals twice).

What the hot path pays: on SQLite nothing measurable when the head is the record the same
store appended last (its hash is kept); a head another process wrote is read again comparing
its body's first bytes with :data:`SEAL_PREFIX` (in SQL: no bytes object). PostgreSQL's
``append()`` reads the head's ``category`` column in the head read it already does. Only a
head that looks like a seal is parsed (:func:`is_seal`). A seal is appended only through a
store :func:`seal` opens and closes at once, so no store ever finds its own seal at the head.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

from coworker.audit.chain import check_chain_name, genesis
from coworker.audit.record import SCHEMA_VERSION, format_time
from coworker.audit.store import Head
from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = [
    "CATEGORY_CHAIN_SEAL",
    "SEAL_PREFIX",
    "ChainRetired",
    "ChainSealed",
    "is_seal",
    "retire",
    "seal",
    "seal_entry",
    "sealed_head",
]

_log = logging.getLogger("coworker.audit")

CATEGORY_CHAIN_SEAL: Final = "chain-seal"
"""``category`` of a chain's sealing record (``kind`` ``chain``, ``operation`` ``seal``)."""
SEAL_PREFIX: Final = b'{"category":"chain-seal",'
"""How every seal's canonical body begins (no key of it sorts before ``category``): the
append's head read compares these bytes; a body that starts so is then parsed
(:func:`is_seal`), so a record that merely begins alike seals nothing."""
SEALED_SQLSTATE: Final = "CWSEA"
"""SQLSTATE of PostgreSQL's ``append()``/``lock_head()`` refusing a sealed chain (schema 7+)."""
SEAL_MIN_PG_VERSION: Final = 7
"""The PostgreSQL schema version whose append functions refuse a sealed chain."""


class ChainSealed(AuditUnavailable):
    """The chain was retired: its head is a seal, and nothing is appended after it.

    Attributes:
        chain: the chain.
        seq: the seal's seq (``0`` when the server did not say).
    """

    def __init__(
        self, label: str, chain: str, seq: int, count: int, message: str | None = None
    ) -> None:
        super().__init__(
            message
            or f"audit store {label}: chain {chain!r} was retired (sealed at seq {seq}): "
            f"{count} record(s) refused, nothing written; a retired chain is never written "
            "again: write to another chain"
        )
        self.chain = chain
        self.seq = seq


class ChainRetired(ChainSealed):
    """The chain registry says the chain was retired: a store does not open it for writing
    (a :class:`ChainSealed`, so that a PostgreSQL store stops spooling entries for it).

    Attributes:
        chain: the chain.
        seq: the head it was retired at (``0``: none recorded).
    """

    def __init__(self, label: str, chain: str, seq: int, registry_seq: int) -> None:
        AuditUnavailable.__init__(
            self,
            f"audit store {label}: chain {chain!r} was retired (registry seq {registry_seq}); "
            "a retired chain is never written again: use another name",
        )
        self.chain = chain
        self.seq = seq


def refused(label: str, chain: str, seq: int, count: int) -> ChainSealed:
    """:class:`ChainSealed`, logged (ERROR) as it is raised: the caller's failure policy may
    swallow the exception, the log line names the chain."""
    _log.error(
        "audit store %s: chain %r is retired (sealed at seq %d): %d record(s) refused",
        label,
        chain,
        seq,
        count,
    )
    return ChainSealed(label, chain, seq, count)


def seal_entry(name: str, reason: str) -> dict[str, Any]:
    """The fields (without ``seq``) of chain ``name``'s sealing record.

    Raises:
        ConfigError: ``reason`` holds a NUL character: PostgreSQL's jsonb cannot read the
            seal's body then, and its append functions would not take it for a seal.
    """
    if "\0" in reason:
        raise ConfigError("the reason of a retirement must not contain a NUL character")
    now = format_time(time.time_ns())
    return {
        "v": SCHEMA_VERSION,
        "kind": "chain",
        "category": CATEGORY_CHAIN_SEAL,
        "operation": "seal",
        "recorded_at": now,
        "start": now,
        "chain_name": check_chain_name(name),
        "chain_genesis": genesis(name).hex(),
        "reason": reason,
        "user_id": None,
        "payload_digest": None,
    }


def is_seal(body: bytes, chain: str) -> bool:
    """Whether ``body`` is the sealing record of ``chain``."""
    if not body.startswith(SEAL_PREFIX):
        return False
    try:
        fields = json.loads(body)
    except ValueError:
        return False
    return (
        isinstance(fields, dict)
        and fields.get("kind") == "chain"
        and fields.get("operation") == "seal"
        and fields.get("chain_name") == chain
        and fields.get("chain_genesis") == genesis(chain).hex()
    )


def sealed_head(store: Any) -> Head | None:
    """The head of ``store``'s chain when it is a seal (the chain is retired or being
    retired), else ``None``."""
    head = store.head()
    if head is None:
        return None
    for record in store.iter_from(head.seq):
        if record.seq == head.seq and is_seal(bytes(record.body), _chain(store)):
            return Head(record.seq, record.hash)
        break
    return None


def _chain(store: Any) -> str:
    chain = getattr(store, "chain", "")
    return chain if isinstance(chain, str) else ""


def _writer(store: Any) -> Any:
    """A writer of ``store``'s chain (``store`` may be read-only), never spooling: a seal is
    written now or not at all."""
    from coworker.audit.store_sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        return SQLiteStore(
            store.store_path,
            chain=store.chain,
            synchronous="FULL",
            busy_timeout=store.busy_timeout,
            create=False,
        )
    from coworker.audit.store_postgres import PostgresStore

    writer = PostgresStore(store.url, chain=store.chain, spool=None, create=False)
    if writer._version < SEAL_MIN_PG_VERSION:
        version = writer._version
        writer.close()
        raise AuditUnavailable(
            f"audit store {writer}: schema version {version}: its append does not refuse a "
            f"sealed chain (version {SEAL_MIN_PG_VERSION}); open a store on it once as the "
            "schema owner (it upgrades), then retire it"
        )
    return writer


def seal(store: Any, reason: str) -> Head:
    """Seal ``store``'s chain (see the module docstring) and return the sealed head; a chain
    sealed already (an interrupted retirement) is left as it is and its seal returned.

    Raises:
        AuditUnavailable: the seal could not be written.
        ConfigError: ``reason`` holds a NUL character (:func:`seal_entry`); nothing written.
    """
    name = _chain(store)
    writer = _writer(store)
    try:
        found = sealed_head(writer)
        if found is not None:
            _log.warning(
                "audit store %s: chain %r was sealed already at seq %d (an interrupted "
                "retirement): recording it",
                writer,
                name,
                found.seq,
            )
            return found
        try:
            records = writer.append([seal_entry(name, reason)])
        except ChainSealed:  # another retirement sealed it meanwhile
            found = sealed_head(writer)
            if found is None:
                raise
            return found
        if len(records) != 1:
            raise AuditUnavailable(f"audit store {writer}: the seal was not written")
        return Head(records[0].seq, records[0].hash)
    finally:
        writer.close()


def retire(store: Any, reason: str) -> tuple[Any, Head]:
    """Retire the named chain ``store`` (open, SQLite or PostgreSQL, read-only will do) on
    purpose: seal it, then append the ``retire`` record naming the sealed head to its default
    chain. Afterwards nothing is appended to it, no writer opens it, and once its file or
    schema is removed verify says ``retired`` (exit 0) instead of ``vanished``.

    Returns:
        Its :class:`~coworker.audit.chain_registry.Registration` and the sealed head.

    Raises:
        ConfigError: the registry does not name it (adopt it first), or it was retired.
        AuditUnavailable: the chain or the registry cannot be read or written.
    """
    from coworker.audit.chain_registry import registrations, registry_entry, registry_key
    from coworker.audit.store_postgres import PostgresStore
    from coworker.audit.store_sqlite import SQLiteStore

    name = check_chain_name(_chain(store))
    if not name:
        raise ConfigError("the default chain cannot be retired: it holds the registry")
    seal_entry(name, reason)  # a reason it cannot take: refused before anything is written
    default: Any
    if isinstance(store, SQLiteStore):
        default = SQLiteStore(
            store.store_path, synchronous="FULL", busy_timeout=store.busy_timeout, chain=""
        )
    else:
        default = PostgresStore(store.url, schema=store.base_schema, chain="", spool=None)
    try:
        known = registrations(default).get(name)
        if known is None:
            raise ConfigError(
                f"chain {name!r} is not in the chain registry: `coworker audit adopt-chains` "
                "first (retiring anchors its last head)"
            )
        if known.retired is not None:
            raise ConfigError(f"chain {name!r} was retired already (seq {known.retired.seq})")
        head = seal(store, reason)
        entry: Mapping[str, Any] = {
            **registry_entry(name, head, retire=True, reason=reason),
            "chain_sealed": True,
        }
        if isinstance(default, SQLiteStore):
            default.append([entry])
        elif default.append_unique([entry], None, [registry_key(name, retire=True)]).duplicates:
            raise ConfigError(f"chain {name!r} was retired already")
    finally:
        default.close()
    return known, head
