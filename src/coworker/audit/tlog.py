"""The Merkle tree of an audit store, kept beside it, and the checkpoints signed over it.

:class:`LogTree` catches the tree up with the store (:meth:`LogTree.sync`): it reads the
records after the last one it hashed, checks that they chain (a checkpoint is never signed
over a broken chain), and stores the perfect subtrees they complete. Only subtrees of
``2**STORED_LEVEL`` leaves and up are stored (one row per 8 records); smaller ones are
re-hashed from at most ``2**STORED_LEVEL`` records when a proof needs them. Appending is
never O(N): the compact range of the right edge is rebuilt from O(log N) stored rows.

The tables are created by this module next to the store's own (the store's schema code is
not touched), and are a cache, not evidence: a proof made from them verifies against a
signed checkpoint or it does not. ``coworker audit verify --checkpoint`` re-hashes the
records themselves.

SQLite (in ``<store file>.tree``, a file of its own: see :data:`TREE_SUFFIX`)::

    audit_tree_nodes(level, idx, hash)           perfect subtrees, level >= STORED_LEVEL
    audit_tree_state(id = 1, size, last_hash)    records hashed so far, hash of the last
    audit_checkpoints(id, origin, tree_size, note, created_at)

PostgreSQL: the same tables as ``<schema>.tree_nodes``, ``tree_state``, ``checkpoints``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from coworker.audit import _fork, merkle
from coworker.audit.chain import GENESIS_PREV_HASH, link
from coworker.audit.merkle import CompactRange, NodeKey
from coworker.audit.store import first_prev
from coworker.exceptions import AuditUnavailable

__all__ = [
    "STORED_LEVEL",
    "TREE_SUFFIX",
    "LogTree",
    "StoredCheckpoint",
    "TreeError",
    "TreeTable",
    "open_table",
]

_log = logging.getLogger("coworker.audit")

STORED_LEVEL: Final = 4
"""Perfect subtrees of at least 2**STORED_LEVEL leaves are stored; smaller ones re-hashed."""

_FLUSH_NODES: Final = 4096

TREE_SUFFIX: Final = ".tree"
"""A SQLite store's tree lives in ``<file>.tree`` beside it: a file of its own, so that the
checkpointer never takes the log's write lock (appends never wait for it)."""


class TreeError(RuntimeError):
    """The records do not chain, so no tree (and no checkpoint) is made over them."""


class _Raced(Exception):
    """Another process moved the tree state between our read and our write."""


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed checkpoint as kept in the store's ``checkpoints`` table."""

    origin: str
    size: int
    note: bytes
    created_at: str


class TreeTable(Protocol):
    """Where a :class:`LogTree` keeps its subtrees and checkpoints."""

    def state(self) -> tuple[int, bytes]:
        """``(records hashed, hash of the last one)``; ``(0, genesis)`` when empty."""
        ...

    def nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """Stored subtree hashes for ``keys`` (missing ones are absent)."""
        ...

    def extend(
        self, old_size: int, new_size: int, last_hash: bytes, nodes: Sequence[tuple[NodeKey, bytes]]
    ) -> bool:
        """Store nodes and move the state from ``old_size`` to ``new_size`` atomically;
        ``False`` (nothing written) when another process moved it first."""
        ...

    def add_checkpoint(self, origin: str, size: int, note: bytes) -> None:
        """Keep a signed checkpoint."""
        ...

    def checkpoints(self, origin: str | None = None) -> list[StoredCheckpoint]:
        """Kept checkpoints, oldest first."""
        ...

    def latest(self, origin: str) -> StoredCheckpoint | None:
        """The newest kept checkpoint of ``origin`` (one row, however many are kept)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class MemoryTable:
    """A :class:`TreeTable` in memory (``memory://`` stores and read-only opens)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[NodeKey, bytes] = {}
        self._state: tuple[int, bytes] = (0, GENESIS_PREV_HASH)
        self._checkpoints: list[StoredCheckpoint] = []

    def state(self) -> tuple[int, bytes]:
        """See :class:`TreeTable`."""
        return self._state

    def nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """See :class:`TreeTable`."""
        return {k: self._nodes[k] for k in keys if k in self._nodes}

    def extend(
        self, old_size: int, new_size: int, last_hash: bytes, nodes: Sequence[tuple[NodeKey, bytes]]
    ) -> bool:
        """See :class:`TreeTable`."""
        with self._lock:
            if self._state[0] != old_size:
                return False
            self._nodes.update(nodes)
            self._state = (new_size, last_hash)
            return True

    def add_checkpoint(self, origin: str, size: int, note: bytes) -> None:
        """See :class:`TreeTable`."""
        with self._lock:
            self._checkpoints.append(StoredCheckpoint(origin, size, note, _now()))

    def checkpoints(self, origin: str | None = None) -> list[StoredCheckpoint]:
        """See :class:`TreeTable`."""
        return [c for c in self._checkpoints if origin is None or c.origin == origin]

    def latest(self, origin: str) -> StoredCheckpoint | None:
        """See :class:`TreeTable`."""
        found = self.checkpoints(origin)
        return found[-1] if found else None

    def close(self) -> None:
        """Nothing to release."""


_SQLITE_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS audit_tree_nodes (level INTEGER NOT NULL, idx INTEGER NOT NULL,"
    " hash BLOB NOT NULL, PRIMARY KEY (level, idx)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS audit_tree_state (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " size INTEGER NOT NULL, last_hash BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS audit_checkpoints (id INTEGER PRIMARY KEY, origin TEXT NOT NULL,"
    " tree_size INTEGER NOT NULL, note BLOB NOT NULL, created_at TEXT NOT NULL)",
)


class SQLiteTable:
    """A :class:`TreeTable` in a SQLite file (``<store file>.tree``)."""

    def __init__(self, path: str, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._pid = os.getpid()
        try:
            self._db = self._connect()
            # The tree is a cache rebuilt from the records, and a checkpoint is also published
            # outside: no fsync per commit, so the writers' lock is held for microseconds.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            for statement in _SQLITE_DDL:
                self._conn.execute(statement)
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"cannot open the tree tables in {path!r}: {exc}") from exc
        _fork.register(self)
        _fork.hold_across_fork(self)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        return conn

    @property
    def _conn(self) -> sqlite3.Connection:
        # With self._lock. A SQLite connection must not cross a fork: a child opens its own.
        if self._pid != os.getpid():
            _fork.orphan(self._db)
            self._db = self._connect()
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._pid = os.getpid()
        return self._db

    def _fork_lock(self) -> threading.Lock:
        return self._lock

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def state(self) -> tuple[int, bytes]:
        """See :class:`TreeTable`."""
        with self._lock:
            row = self._conn.execute("SELECT size, last_hash FROM audit_tree_state").fetchone()
        return (row[0], bytes(row[1])) if row else (0, GENESIS_PREV_HASH)

    def nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """See :class:`TreeTable`."""
        out: dict[NodeKey, bytes] = {}
        with self._lock:
            for level, idx in keys:
                row = self._conn.execute(
                    "SELECT hash FROM audit_tree_nodes WHERE level = ? AND idx = ?", (level, idx)
                ).fetchone()
                if row is not None:
                    out[(level, idx)] = bytes(row[0])
        return out

    def extend(
        self, old_size: int, new_size: int, last_hash: bytes, nodes: Sequence[tuple[NodeKey, bytes]]
    ) -> bool:
        """See :class:`TreeTable`."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT size FROM audit_tree_state").fetchone()
                if (row[0] if row else 0) != old_size:
                    conn.execute("ROLLBACK")
                    return False
                conn.executemany(
                    "INSERT OR IGNORE INTO audit_tree_nodes (level, idx, hash) VALUES (?, ?, ?)",
                    [(k[0], k[1], h) for k, h in nodes],
                )
                conn.execute(
                    "INSERT OR REPLACE INTO audit_tree_state (id, size, last_hash) "
                    "VALUES (1, ?, ?)",
                    (new_size, last_hash),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return True

    def add_checkpoint(self, origin: str, size: int, note: bytes) -> None:
        """See :class:`TreeTable`."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO audit_checkpoints (origin, tree_size, note, created_at) "
                "VALUES (?, ?, ?, ?)",
                (origin, size, note, _now()),
            )

    def checkpoints(self, origin: str | None = None) -> list[StoredCheckpoint]:
        """See :class:`TreeTable`."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT origin, tree_size, note, created_at FROM audit_checkpoints "
                "WHERE ? IS NULL OR origin = ? ORDER BY id",
                (origin, origin),
            ).fetchall()
        return [StoredCheckpoint(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def latest(self, origin: str) -> StoredCheckpoint | None:
        """See :class:`TreeTable`."""
        with self._lock:
            r = self._conn.execute(
                "SELECT origin, tree_size, note, created_at FROM audit_checkpoints "
                "WHERE origin = ? ORDER BY id DESC LIMIT 1",
                (origin,),
            ).fetchone()
        return StoredCheckpoint(r[0], r[1], bytes(r[2]), r[3]) if r else None

    def close(self) -> None:
        """Close the connection (a forked child leaves its parent's alone)."""
        with self._lock:
            if self._pid == os.getpid():
                self._db.close()


class PostgresTable:
    """A :class:`TreeTable` in the PostgreSQL schema of the store (its own connection)."""

    def __init__(self, conninfo: str, schema: str) -> None:
        import psycopg
        from psycopg import sql

        self._sql = sql
        self._schema = schema
        self._conninfo = conninfo
        self._lock = threading.Lock()
        self._pid = os.getpid()
        s = sql.Identifier(schema)
        try:
            self._db = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
            for ddl in (
                "CREATE TABLE IF NOT EXISTS {}.tree_nodes (level integer NOT NULL, "
                "idx bigint NOT NULL, hash bytea NOT NULL, PRIMARY KEY (level, idx))",
                "CREATE TABLE IF NOT EXISTS {}.tree_state (id integer PRIMARY KEY CHECK (id = 1),"
                " size bigint NOT NULL, last_hash bytea NOT NULL)",
                "CREATE TABLE IF NOT EXISTS {}.checkpoints (id bigserial PRIMARY KEY, "
                "origin text NOT NULL, tree_size bigint NOT NULL, note bytea NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now())",
            ):
                self._conn.execute(sql.SQL(ddl).format(s))
        except psycopg.Error as exc:
            raise AuditUnavailable(
                f"cannot open the tree tables in schema {schema}: {exc}"
            ) from exc
        _fork.register(self)

    @property
    def _conn(self) -> Any:
        # With self._lock. A connection must not cross a fork: a child's query on the
        # parent's socket would break both sessions; the child connects anew.
        if self._pid != os.getpid():
            import psycopg

            _fork.orphan(self._db)
            try:
                self._db = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5)
            except psycopg.Error as exc:
                raise AuditUnavailable(f"cannot reach the tree tables: {exc}") from exc
            self._pid = os.getpid()
        return self._db

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def _t(self, name: str) -> Any:
        return self._sql.Identifier(self._schema, name)

    def state(self) -> tuple[int, bytes]:
        """See :class:`TreeTable`."""
        q = self._sql.SQL("SELECT size, last_hash FROM {}").format(self._t("tree_state"))
        with self._lock:
            row = self._conn.execute(q).fetchone()
        return (int(row[0]), bytes(row[1])) if row else (0, GENESIS_PREV_HASH)

    def nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """See :class:`TreeTable`."""
        if not keys:
            return {}
        q = self._sql.SQL(
            "SELECT level, idx, hash FROM {} WHERE (level, idx) IN "
            "(SELECT * FROM unnest(%s::integer[], %s::bigint[]))"
        ).format(self._t("tree_nodes"))
        with self._lock:
            rows = self._conn.execute(q, ([k[0] for k in keys], [k[1] for k in keys])).fetchall()
        return {(int(r[0]), int(r[1])): bytes(r[2]) for r in rows}

    def extend(
        self, old_size: int, new_size: int, last_hash: bytes, nodes: Sequence[tuple[NodeKey, bytes]]
    ) -> bool:
        """See :class:`TreeTable`."""
        sql = self._sql
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute(
                sql.SQL("INSERT INTO {} VALUES (1, 0, %s) ON CONFLICT DO NOTHING").format(
                    self._t("tree_state")
                ),
                (GENESIS_PREV_HASH,),
            )
            row = cur.execute(
                sql.SQL("SELECT size FROM {} WHERE id = 1 FOR UPDATE").format(self._t("tree_state"))
            ).fetchone()
            if row is None or int(row[0]) != old_size:
                return False
            cur.executemany(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s) ON CONFLICT DO NOTHING").format(
                    self._t("tree_nodes")
                ),
                [(k[0], k[1], h) for k, h in nodes],
            )
            cur.execute(
                sql.SQL("UPDATE {} SET size = %s, last_hash = %s WHERE id = 1").format(
                    self._t("tree_state")
                ),
                (new_size, last_hash),
            )
        return True

    def add_checkpoint(self, origin: str, size: int, note: bytes) -> None:
        """See :class:`TreeTable`."""
        q = self._sql.SQL("INSERT INTO {} (origin, tree_size, note) VALUES (%s, %s, %s)").format(
            self._t("checkpoints")
        )
        with self._lock:
            self._conn.execute(q, (origin, size, note))

    def checkpoints(self, origin: str | None = None) -> list[StoredCheckpoint]:
        """See :class:`TreeTable`."""
        q = self._sql.SQL(
            "SELECT origin, tree_size, note, created_at FROM {} "
            "WHERE %s::text IS NULL OR origin = %s ORDER BY id"
        ).format(self._t("checkpoints"))
        with self._lock:
            rows = self._conn.execute(q, (origin, origin)).fetchall()
        return [
            StoredCheckpoint(r[0], int(r[1]), bytes(r[2]), r[3].strftime("%Y-%m-%dT%H:%M:%SZ"))
            for r in rows
        ]

    def latest(self, origin: str) -> StoredCheckpoint | None:
        """See :class:`TreeTable`."""
        q = self._sql.SQL(
            "SELECT origin, tree_size, note, created_at FROM {} WHERE origin = %s "
            "ORDER BY id DESC LIMIT 1"
        ).format(self._t("checkpoints"))
        with self._lock:
            r = self._conn.execute(q, (origin,)).fetchone()
        if r is None:
            return None
        return StoredCheckpoint(r[0], int(r[1]), bytes(r[2]), r[3].strftime("%Y-%m-%dT%H:%M:%SZ"))

    def close(self) -> None:
        """Close the connection (a forked child leaves its parent's alone)."""
        with self._lock:
            if self._pid == os.getpid():
                self._db.close()


# In-memory stores keep their tree for as long as they live.
_memory_tables: weakref.WeakKeyDictionary[Any, MemoryTable] = weakref.WeakKeyDictionary()


def open_table(store: Any) -> TreeTable:
    """The tree table that belongs with ``store``: its :meth:`~coworker.audit.store.AuditStore.
    tree_table` (SQLite file, PostgreSQL schema, memory); a store without one (not one of
    coworker's) gets an in-memory table kept as long as the store lives."""
    own = getattr(store, "tree_table", None)
    if own is not None:
        table: TreeTable = own()
        return table
    return memory_table(store)


def memory_table(store: Any) -> MemoryTable:
    """The in-memory tree table of ``store``, made on first use and kept while it lives."""
    table = _memory_tables.get(store)
    if table is None:
        table = _memory_tables[store] = MemoryTable()
    return table


def _chain_rows(store: Any, start: int) -> Iterator[tuple[int, bytes, bytes, bytes]]:
    iter_chain = getattr(store, "iter_chain", None)
    if iter_chain is not None:
        yield from iter_chain(start)
        return
    for r in store.iter_from(start):
        yield r.seq, r.prev_hash, r.hash, r.body


class LogTree:
    """The Merkle tree over one store's records.

    Args:
        store: an audit store.
        table: where to keep the tree (default :func:`open_table`).
    """

    def __init__(self, store: Any, table: TreeTable | None = None) -> None:
        self.store = store
        self.table = table if table is not None else open_table(store)
        self._lock = threading.Lock()
        _fork.register(self)
        # The right edge as of the last sync, and recent roots: a sync that finds the table
        # where this process left it reads only the new records (no leaf re-reads).
        self._edge: tuple[tuple[int, bytes], CompactRange] | None = None
        # Whether that edge was hashed from the records by this process (or checked against
        # them): only then may its root be signed. An edge rebuilt from stored rows is a
        # cache that the owner of the tree file can edit.
        self._edge_trusted = False
        self._roots: dict[int, bytes] = {}
        # The furthest (size, last record hash) this process has hashed: the tree table (a
        # file the database owner can replace) must never go back behind it.
        self._seen: tuple[int, bytes] | None = None

    def _after_fork_in_child(self) -> None:
        # The parent's checkpointer may have been inside a sync: rebuild from the table.
        self._lock = threading.Lock()
        self._edge = None
        self._edge_trusted = False

    @property
    def size(self) -> int:
        """Records in the tree so far (call :meth:`sync` to catch up)."""
        return self.table.state()[0]

    def sync(self, limit: int | None = None) -> int:
        """Hash the records appended since the last sync; return the tree size.

        Args:
            limit: stop after this many new records (``None``: up to the head).

        Raises:
            TreeError: a record does not chain onto the one before it.
        """
        for _attempt in range(5):
            try:
                return self._sync(limit)
            except _Raced:
                continue  # another process extended the tree first: start from its state
        raise TreeError("the tree kept being extended by other processes; retry")

    def _sync(self, limit: int | None) -> int:
        with self._lock:
            size, last = self.table.state()
            self._check_not_behind(size, last)
            if self._edge is not None and self._edge[0] == (size, last):
                cr = self._edge[1]
                trusted = self._edge_trusted
            else:
                keys = merkle.root_keys(size)
                found = self._nodes(keys)
                cr = CompactRange(size, [found[k] for k in keys])
                trusted = size == 0
            # An empty tree starts at the chain's genesis (a named chain's is not zeros).
            prev, start = (last if size else first_prev(self.store)), size
            pending: list[tuple[NodeKey, bytes]] = []
            for seq, prev_hash, digest, body in _chain_rows(self.store, size + 1):
                if seq != cr.size + 1 or prev_hash != prev or link(prev_hash, body) != digest:
                    raise TreeError(
                        f"record {seq} does not chain onto record {cr.size} as hashed into "
                        "the tree: run `coworker audit verify` (no checkpoint is signed)"
                    )
                prev = digest
                pending.extend(
                    n for n in cr.append(merkle.leaf_hash(body)) if n[0][0] >= STORED_LEVEL
                )
                if len(pending) >= _FLUSH_NODES:
                    self._extend(start, cr.size, prev, pending)
                    start, pending = cr.size, []
                if limit is not None and cr.size - size >= limit:
                    break
            if cr.size != start:
                self._extend(start, cr.size, prev, pending)
            self._edge = ((cr.size, prev), cr)
            self._edge_trusted = trusted
            self._seen = (cr.size, prev)
            if len(self._roots) > 64:
                self._roots.clear()
            self._roots[cr.size] = cr.root()
            return cr.size

    def _check_not_behind(self, size: int, last: bytes) -> None:
        seen = self._seen
        if seen is None:
            return
        if size < seen[0] or (size == seen[0] and last != seen[1]):
            self._roots.clear()
            raise TreeError(
                f"the stored tree went back from {seen[0]} to {size} records or changed: "
                "its table was replaced or rolled back (no checkpoint is signed)"
            )

    def trusted_root(self, size: int, base: tuple[int, bytes] | None = None) -> bytes:
        """The root of the first ``size`` records, computed from the records themselves.

        What gets signed must be the records' root, not the stored tree's: the tree file is
        a cache its owner can edit. When this process hashed the records up to ``size`` (the
        usual case of a running checkpointer) that root is at hand; otherwise the records after
        ``base`` (the size and root of a verified checkpoint, whose stored subtrees are checked
        against its root) are re-hashed, at most once per process.

        Args:
            size: the tree size (the synced size, see :meth:`sync`).
            base: ``(size, root)`` of a checkpoint verified with the log key, if any.

        Raises:
            TreeError: the stored tree does not match the records (or ``base``).
        """
        with self._lock:
            edge = self._edge
            if edge is not None and self._edge_trusted and edge[0][0] == size:
                return edge[1].root()
            start, root = base if base is not None and base[0] <= size else (0, merkle.EMPTY_ROOT)
            keys = merkle.root_keys(start)
            found = self._nodes(keys)
            cr = CompactRange(start, [found[k] for k in keys])
            if cr.root() != root:
                raise TreeError(
                    f"the stored tree of {start} records does not match the checkpoint of that "
                    "size: the tree table was edited or is corrupt (no checkpoint is signed)"
                )
            last = b""
            for seq, _, digest, body in _chain_rows(self.store, start + 1):
                if seq > size:
                    break
                if seq != cr.size + 1:
                    raise TreeError(f"record {cr.size + 1} is missing (no checkpoint is signed)")
                cr.append(merkle.leaf_hash(body))
                last = digest
            if cr.size != size:
                raise TreeError(f"the log has {cr.size} records, not {size}: truncated?")
            computed = cr.root()
            stored = self._roots.get(size) or merkle.root_hash(size, self._nodes)
            if computed != stored:
                self._roots.clear()
                raise TreeError(
                    f"the stored tree of {size} records does not match the records: the tree "
                    "table was edited or is corrupt (no checkpoint is signed; delete it to "
                    "rebuild it from the records)"
                )
            if edge is not None and edge[0] == (size, last):
                self._edge_trusted = True  # the cached edge folds to the records' root
            return computed

    def check_head(self) -> None:
        """Check that the log still ends where this tree does (or beyond, by new appends).

        A rewrite that recomputes the chain changes the last record's hash, a truncation its
        seq: either is caught here without re-reading the log.

        Raises:
            TreeError: the log was truncated or its tail rewritten under the tree.
        """
        tip = self._seen or self.table.state()
        head = self.store.head()
        seq = head.seq if head is not None else 0
        if seq < tip[0]:
            raise TreeError(
                f"the log has {seq} records but {tip[0]} were hashed into the tree: truncated"
            )
        if seq == tip[0] and head is not None and head.hash != tip[1]:
            raise TreeError(
                f"record {seq} is no longer the one hashed into the tree: the log was rewritten"
            )

    def _extend(
        self, start: int, end: int, last: bytes, nodes: list[tuple[NodeKey, bytes]]
    ) -> None:
        self._edge = None  # set again when the whole sync succeeded
        if not self.table.extend(start, end, last, nodes):
            raise _Raced

    def _nodes(self, keys: Sequence[NodeKey]) -> Mapping[NodeKey, bytes]:
        high = [k for k in keys if k[0] >= STORED_LEVEL]
        out: dict[NodeKey, bytes] = dict(self.table.nodes(high))
        missing = [k for k in high if k not in out]
        if missing:
            raise TreeError(f"tree node(s) {missing[:3]} are missing: the tree is not synced")
        blocks: dict[int, list[NodeKey]] = {}
        for k in keys:
            if k[0] < STORED_LEVEL:
                blocks.setdefault((k[1] << k[0]) >> STORED_LEVEL, []).append(k)
        for block, wanted in blocks.items():
            first = block << STORED_LEVEL
            last = max((k[1] + 1) << k[0] for k in wanted)
            leaves = self._leaves(first, last)
            for level, idx in wanted:
                a = (idx << level) - first
                out[(level, idx)] = merkle.root_from_leaves(leaves[a : a + (1 << level)])
        return out

    def _leaves(self, start: int, end: int) -> list[bytes]:
        leaves: list[bytes] = []
        for seq, _, _, body in _chain_rows(self.store, start + 1):
            if seq > end:
                break
            leaves.append(merkle.leaf_hash(body))
        if len(leaves) != end - start:
            raise TreeError(f"records {start + 1}..{end} are not all in the store")
        return leaves

    def root(self, size: int | None = None) -> bytes:
        """Root of the tree of ``size`` records (default: the synced size)."""
        size = self.size if size is None else size
        cached = self._roots.get(size)
        if cached is not None:
            return cached
        self._check(size)
        return merkle.root_hash(size, self._nodes)

    def inclusion(self, index: int, size: int | None = None) -> list[bytes]:
        """Inclusion proof of leaf ``index`` (record ``index + 1``) in the tree of ``size``."""
        size = self.size if size is None else size
        self._check(size)
        return merkle.inclusion_proof(index, size, self._nodes)

    def consistency(self, old: int, new: int | None = None) -> list[bytes]:
        """Consistency proof from tree size ``old`` to ``new`` (default: the synced size)."""
        new = self.size if new is None else new
        self._check(new)
        return merkle.consistency_proof(old, new, self._nodes)

    def _check(self, size: int) -> None:
        if size > self.size:
            raise TreeError(f"the tree has {self.size} records, not {size}: sync first")

    def close(self) -> None:
        """Close the table (not the store)."""
        if not isinstance(self.table, MemoryTable):
            self.table.close()
