"""Signed checkpoints of an audit store: made on demand (:func:`make_checkpoint`) or in the
background (:class:`Checkpointer`: every N records or T seconds, a heartbeat when idle, one
at shutdown), stored beside the log and published to a directory (:class:`DirectoryPublisher`)
or an S3 bucket with Object Lock (:class:`S3Publisher`).

The idle heartbeat checks that the log still ends in the record last hashed into the tree
(Ed25519 is deterministic, so re-signing the same tree would only repeat the same bytes): a
rewrite (which changes the last record's hash) or a truncation while the application runs
is logged as an error within ``every_seconds`` and nothing more is signed.

The log key never signs a tree that does not extend the last checkpoint it signed
(tlog-checkpoint "Signatures": a log MUST NOT sign inconsistent checkpoints): before
signing, the tree's root at the last checkpoint's size is compared with that checkpoint.

Publishing is off the append path: a failed publish is logged loudly (``coworker.audit``
logger, ERROR) and retried with back-off; appends never wait for it.

A store with several chains (``?chain=NAME``): each round signs a checkpoint of every chain
under its own origin (``<origin>/chain/<name>``) and a **heads note** listing every chain's
tree (:func:`make_heads`), stored beside the checkpoints and published with them. A chain
that vanished since the last heads note (its file or schema deleted whole) is logged at
ERROR and no heads note is signed without it: signing one would bless the deletion.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from coworker.audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    chain_signer,
    heads_note,
    open_checkpoint,
    open_heads,
    parse_note,
    sign_checkpoint,
)
from coworker.audit.keys import Signer
from coworker.audit.tlog import LogTree, TreeError

__all__ = [
    "Checkpointer",
    "DirectoryPublisher",
    "S3Publisher",
    "cosign",
    "heads_key",
    "make_checkpoint",
    "make_heads",
    "open_chain",
    "publisher_for",
    "start_from_config",
]

_log = logging.getLogger("coworker.audit")

_RETRY_MAX: Final = 60.0


def cosign(tree: LogTree, checkpoint: Checkpoint, note: bytes, witnesses: Sequence[Any]) -> bytes:
    """Ask each witness to cosign; store and return the note with every cosignature got.

    A refusing or unreachable witness is logged (ERROR) and skipped: the next checkpoint
    asks it again, with a consistency proof from the size it holds.
    """
    from coworker.audit.witness import WitnessRefused, add_cosignatures

    lines: list[str] = []
    for witness in witnesses:
        try:
            lines += witness.add_checkpoint(
                note, checkpoint, lambda old: tree.consistency(old, checkpoint.size)
            )
        except WitnessRefused as exc:
            _log.error("audit checkpoint %d not cosigned: %s", checkpoint.size, exc)
            if exc.status == 409:
                _log.error(
                    "witness %s holds a different tree of this log: someone showed it another "
                    "log (a fork), or this log was rewritten or truncated",
                    witness.url,
                )
    if not lines:
        return note
    cosigned = add_cosignatures(note, lines)
    tree.table.add_checkpoint(checkpoint.origin, checkpoint.size, cosigned)
    return cosigned


def make_checkpoint(
    tree: LogTree, signer: Signer, previous: Checkpoint | None = None
) -> tuple[Checkpoint, bytes]:
    """Catch the tree up, sign a checkpoint of it and store it.

    Args:
        tree: the store's tree.
        signer: the log key (its name is the store's origin; a named chain's checkpoint is
            signed under ``<origin>/chain/<name>``, :func:`~coworker.audit.checkpoint.
            chain_signer`).
        previous: the last checkpoint this process signed: the new one must extend it too
            (the stored checkpoints live beside the database and can be deleted).

    Returns:
        The checkpoint and its signed note bytes.

    Raises:
        TreeError: the records do not chain, the log no longer contains the tree of the
            last stored checkpoint, or the stored tree does not match the records (nothing
            is signed: the root signed is always computed from the records).
    """
    # A chain is a log of its own: its checkpoints must never carry the store's origin (a
    # witness seeing two trees under one origin would call it a fork).
    signer = chain_signer(signer, getattr(tree.store, "chain", "") or "")
    size = tree.sync()
    tree.check_head()
    if previous is not None and (
        previous.size > size or (previous.size and tree.root(previous.size) != previous.root)
    ):
        raise TreeError(
            f"the log no longer contains the tree of checkpoint {previous.size} signed by this "
            "process: rewritten or truncated? refusing to sign"
        )
    stored = tree.table.latest(signer.name)
    last: Checkpoint | None = None
    if stored is not None:
        last = _opened.get(stored.note)
        if last is None:
            last, _ = open_checkpoint(stored.note, signer.verifier)
            _remember(stored.note, last)
        if last.size > size:
            # Another process may have signed a bigger tree since our sync: catch up once
            # before calling it a truncation.
            size = tree.sync()
            tree.check_head()
        if last.size > size:
            raise TreeError(
                f"the log has {size} records but checkpoint {last.size} was signed: "
                "truncated? refusing to sign"
            )
        if last.size and tree.root(last.size) != last.root:
            raise TreeError(
                f"the log no longer contains the tree of checkpoint {last.size}: "
                "rewritten? refusing to sign"
            )
        if last.size == size:
            return last, stored.note
    bases = [c for c in (previous, last) if c is not None and c.size <= size]
    base = max(bases, key=lambda c: c.size) if bases else None
    root = tree.trusted_root(size, (base.size, base.root) if base is not None else None)
    checkpoint = Checkpoint(signer.name, size, root)
    note = sign_checkpoint(checkpoint, signer)
    tree.table.add_checkpoint(signer.name, size, note)
    _remember(note, checkpoint)
    return checkpoint, note


def _remember(note: bytes, checkpoint: Checkpoint) -> None:
    # One entry per chain's last checkpoint; bounded so that a process signing many chains
    # (or many stores) does not grow it without end.
    if len(_opened) >= 1024:
        _opened.clear()
    _opened[note] = checkpoint


def heads_key(origin: str) -> str:
    """The key under which heads notes of ``origin`` are stored in a tree's checkpoint table
    (never a valid origin, so no checkpoint lookup ever returns a heads note)."""
    return f"heads {origin}"


def open_chain(store: Any, chain: str) -> Any:
    """Another chain of ``store``'s store, with a connection of its own; nothing is created
    (a chain deleted between listing and opening is an error, never a new empty chain).

    Raises:
        AuditUnavailable: the chain is gone or cannot be opened.
        ConfigError: ``store`` is of a kind that has no chains.
    """
    from coworker.audit.store_sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        return SQLiteStore(
            store.store_path, busy_timeout=store.busy_timeout, create=False, chain=chain
        )
    if type(store).__name__ == "PostgresStore":
        from coworker.audit.store_postgres import PostgresStore

        return PostgresStore(
            store.url, schema=store.base_schema, chain=chain, spool=False, create=False
        )
    from coworker.exceptions import ConfigError

    raise ConfigError(f"{store!r} has no chains to open")


def _retired_at_or_after(registration: Any, size: int) -> bool:
    """Whether a chain that a heads note listed with ``size`` records was retired on purpose
    holding all of them (a chain cut before its retirement still counts as vanished)."""
    retired = getattr(registration, "retired", None)
    if retired is None:
        return False
    return size == 0 or (retired.head is not None and retired.head.seq >= size)


def make_heads(
    signer: Signer,
    trees: Mapping[str, LogTree],
    checkpoints: Mapping[str, Checkpoint],
    table: Any,
    previous: bytes | None = None,
) -> bytes:
    """Sign, store and return the heads note over ``checkpoints`` (``chain -> checkpoint``).

    Args:
        signer: the store's log key (the note is signed under its origin).
        trees: every chain's tree, synced (by :func:`make_checkpoint`).
        checkpoints: the latest checkpoint of every chain of the store.
        table: the tree table the note is stored in (under :func:`heads_key`).
        previous: the last heads note signed (default: the last stored in ``table``): every
            chain it lists must still be listed, holding the tree it lists.

    Raises:
        TreeError: a chain of the previous heads note, or one the chain registry in the
            default chain names, is missing, or a chain of the previous note is smaller or
            no longer holds its tree (it vanished, was cut or rewritten): nothing is signed.
    """
    registered: dict[str, Any] = {}
    if "" in trees:
        # The chain registry names every chain ever made: a note never leaves out one that
        # is gone, even when no earlier note listed it, unless it was retired on purpose.
        from coworker.audit.chain_registry import registrations

        registered = registrations(trees[""].store)
        missing = sorted(
            c for c, r in registered.items() if c not in checkpoints and r.retired is None
        )
        if missing:
            raise TreeError(
                "chain(s) "
                + ", ".join(f"{c!r} (registry seq {registered[c].seq})" for c in missing)
                + " of the chain registry vanished (file or schema deleted whole?): "
                "refusing to sign a heads note without them"
            )
    if previous is None:
        stored = table.latest(heads_key(signer.name))
        previous = stored.note if stored is not None else None
    if previous is not None:
        try:
            before = open_heads(previous, signer.verifier)
        except CheckpointError as exc:
            raise TreeError(f"the last stored heads note does not verify: {exc}") from None
        gone = sorted(
            c
            for c, (size, _) in before.items()
            if c not in checkpoints and not _retired_at_or_after(registered.get(c), size)
        )
        if gone:
            raise TreeError(
                "chain(s) "
                + ", ".join(repr(c) for c in gone)
                + " of the last heads note vanished (file or schema deleted whole?): "
                "refusing to sign a heads note without them"
            )
        bad = sorted(
            c
            for c, (size, root) in before.items()
            if c in checkpoints  # else retired (above)
            and (checkpoints[c].size < size or (size and trees[c].root(size) != root))
        )
        if bad:
            raise TreeError(
                "chain(s) "
                + ", ".join(repr(c) for c in bad)
                + " no longer hold the tree the last heads note lists: truncated or "
                "rewritten? refusing to sign"
            )
    note = heads_note(signer, {c: (cp.size, cp.root) for c, cp in checkpoints.items()})
    if note != previous:
        total = sum(cp.size for cp in checkpoints.values())
        table.add_checkpoint(heads_key(signer.name), total, note)
    return note


def _note_text(note: bytes) -> str | None:
    try:
        return parse_note(note).text
    except ValueError:
        return None


# The last checkpoint verified or signed here, by its note bytes: the next round need not
# verify its own signature again.
_opened: dict[bytes, Checkpoint] = {}


class DirectoryPublisher:
    """Writes each checkpoint to ``<dir>/<origin with / as _>/<size>.checkpoint`` and
    ``latest.checkpoint`` (write-once files: a WORM share keeps every one)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def __call__(self, checkpoint: Checkpoint, note: bytes) -> None:
        """Publish one checkpoint (atomically: temp file, fsync, rename).

        A numbered file is never replaced: another note of the same size (a fork the key
        signed after the log was rewritten, or the same tree with other cosignatures) is
        written beside it as ``<size>-<sha256 prefix>.checkpoint``, and a fork is logged at
        ERROR. Replacing it would erase the evidence the directory is there to keep.
        """
        target = self.directory / checkpoint.origin.replace("/", "_")
        target.mkdir(parents=True, exist_ok=True)
        numbered = target / f"{checkpoint.size}.checkpoint"
        if numbered.exists():
            kept = numbered.read_bytes()
            if kept != note:
                if _note_text(kept) != checkpoint.text:
                    _log.error(
                        "a different checkpoint of tree size %d of %s is already published in "
                        "%s: the key signed two different trees of one size (a fork, or the "
                        "log was rewritten); both are kept",
                        checkpoint.size,
                        checkpoint.origin,
                        numbered,
                    )
                digest = hashlib.sha256(note).hexdigest()[:16]
                self._write(target, f"{checkpoint.size}-{digest}.checkpoint", note)
        else:
            self._write(target, numbered.name, note)
        self._write(target, "latest.checkpoint", note)

    def publish_heads(self, origin: str, note: bytes) -> None:
        """Publish one heads note: ``<dir>/<origin with / as _>/heads/<UTC time>-<sha256
        prefix>.heads`` (written once: the same note again is not written twice) and
        ``latest.heads`` beside the checkpoints."""
        import datetime

        target = self.directory / origin.replace("/", "_")
        folder = target / "heads"
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(note).hexdigest()[:16]
        if not any(folder.glob(f"*-{digest}.heads")):
            when = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            self._write(folder, f"{when}-{digest}.heads", note)
        self._write(target, "latest.heads", note)

    @staticmethod
    def _write(target: Path, name: str, note: bytes) -> None:
        path = target / name
        if not name.startswith("latest.") and path.exists():
            return  # written once (the name derives from the content, or is the first one)
        tmp = target / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(note)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return f"DirectoryPublisher({str(self.directory)!r})"


Publisher = Callable[[Checkpoint, bytes], None]


_Pending = tuple[Any, str, Callable[[], None], int, float]
# (publisher, what is published, the call, attempts so far, not before this monotonic time)


class Checkpointer:
    """Signs checkpoints of a store in a background thread.

    Each round signs the checkpoint of the store's own chain, then one of every other chain
    of the store (``store.chains()``) and the heads note listing them all (:func:`make_heads`);
    a chain whose checkpoint fails, or a heads note refused, is logged at ERROR and retried
    next round (the own chain's checkpoint is still signed and published).

    Args:
        store: the audit store (its tree tables are created beside it).
        signer: the log key.
        every_records: sign when this many records were appended since the last checkpoint.
        every_seconds: sign at least this often while records arrive, and as an idle
            heartbeat (a fresh signature over the same tree shows the log is alive).
        publishers: called with each new checkpoint (e.g. :class:`DirectoryPublisher`); one
            with a ``publish_heads(origin, note)`` method also gets each new heads note.
        witnesses: :class:`~coworker.audit.witness.WitnessClient` objects asked to cosign
            each new checkpoint of the store's own chain before it is published.
        poll: how often the thread looks at the head, in seconds.
    """

    def __init__(
        self,
        store: Any,
        signer: Signer,
        *,
        every_records: int | None = 1000,
        every_seconds: float | None = 60.0,
        publishers: Sequence[Publisher] = (),
        witnesses: Sequence[Any] = (),
        poll: float = 0.5,
    ) -> None:
        self.store = store
        self.signer = signer
        self.every_records = every_records
        self.every_seconds = every_seconds
        self.publishers = list(publishers)
        self.witnesses = list(witnesses)
        self.poll = poll
        self.tree = LogTree(store)
        self.owns_store = False
        self.last: tuple[Checkpoint, bytes] | None = None
        self.heads: bytes | None = None
        """The last heads note signed (every chain's tree), or ``None`` before the first."""
        self.errors = 0
        self._chain = getattr(store, "chain", "") or ""
        self._chain_trees: dict[str, LogTree] = {}
        self._chain_last: dict[str, tuple[Checkpoint, bytes]] = {}
        self._pending: list[_Pending] = []
        for publish in self.publishers:
            if not callable(getattr(publish, "publish_heads", None)):
                _log.warning(
                    "audit checkpoint publisher %r takes no heads notes (no publish_heads "
                    "method): they are stored in the audit store only",
                    publish,
                )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._signed = threading.Condition()
        self._last_time = 0.0
        self._last_error = ""
        self._thread = threading.Thread(
            target=self._run, name="coworker-audit-checkpointer", daemon=True
        )
        self._thread.start()

    def checkpoint_now(self) -> tuple[Checkpoint, bytes]:
        """Sign (and publish) a checkpoint of everything appended so far, in this thread,
        then one of every other chain and the heads note.

        Raises:
            TreeError: the own chain cannot be signed, or another chain or the heads note
                failed (the own chain's checkpoint is then signed and queued all the same).
        """
        try:
            with self._signed:
                previous = self.last[0] if self.last is not None else None
                checkpoint, note = make_checkpoint(self.tree, self.signer, previous)
                heartbeat = self.last is not None and self.last[0] == checkpoint
                if not heartbeat and self.witnesses:
                    note = cosign(self.tree, checkpoint, note, self.witnesses)
                self.last = (checkpoint, note)
                self._last_time = time.monotonic()
                if not heartbeat:
                    self._queue_checkpoint(checkpoint, note)
                try:
                    self._heads_round(checkpoint)
                finally:
                    self._signed.notify_all()
        finally:
            self._publish()
        return checkpoint, note

    def _queue_checkpoint(self, checkpoint: Checkpoint, note: bytes) -> None:
        label = f"checkpoint {checkpoint.origin}/{checkpoint.size}"
        for publish in self.publishers:
            call = functools.partial(publish, checkpoint, note)
            self._pending.append((publish, label, call, 0, 0.0))

    def _heads_round(self, own: Checkpoint) -> None:
        # Every chain's checkpoint, then the note over all of them. One chain failing must
        # not stop the others being signed, but no heads note may leave a chain out.
        listed = getattr(self.store, "chains", None)
        names = list(listed()) if callable(listed) else []
        checkpoints = {self._chain: own}
        trees = {self._chain: self.tree}
        errors: list[str] = []
        for name in names:
            if name == self._chain:
                continue
            try:
                tree = self._chain_trees.get(name)
                if tree is None:
                    tree = self._chain_trees[name] = LogTree(open_chain(self.store, name))
                last = self._chain_last.get(name)
                checkpoint, note = make_checkpoint(
                    tree, self.signer, last[0] if last is not None else None
                )
                if last is None or last[0] != checkpoint:
                    self._queue_checkpoint(checkpoint, note)
                self._chain_last[name] = (checkpoint, note)
                checkpoints[name] = checkpoint
                trees[name] = tree
            except Exception as exc:
                errors.append(f"chain {name!r}: {exc}")
        for name in [n for n in self._chain_trees if n not in names]:
            gone = self._chain_trees.pop(name)
            gone.close()
            gone.store.close()
        if errors:
            raise TreeError("; ".join(errors) + " (no heads note signed this round)")
        note = make_heads(self.signer, trees, checkpoints, self.tree.table, self.heads)
        if note == self.heads:
            return
        self.heads = note
        label = f"heads note {self.signer.name} ({len(checkpoints)} chains)"
        for publish in self.publishers:
            publish_heads = getattr(publish, "publish_heads", None)
            if callable(publish_heads):
                call = functools.partial(publish_heads, self.signer.name, note)
                self._pending.append((publish, label, call, 0, 0.0))

    def _due(self) -> bool:
        head = self.store.head()
        size = head.seq if head is not None else 0
        signed = self.last[0].size if self.last is not None else -1
        if self.every_records is not None and size - max(signed, 0) >= self.every_records:
            return True
        if self.every_seconds is not None:
            return time.monotonic() - self._last_time >= self.every_seconds
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._due():
                    self.checkpoint_now()
                    self._last_error = ""
                else:
                    self._publish()
            except Exception as exc:  # keep going: the next round may succeed
                self.errors += 1
                if str(exc) != self._last_error:  # loud once per new problem, not per poll
                    _log.error("audit checkpoint failed (will retry): %s", exc)
                    self._last_error = str(exc)
            self._wake.wait(self.poll)
            self._wake.clear()

    def _publish(self, *, force: bool = False) -> None:
        # force: the last round at shutdown ignores the back-off.
        now = float("inf") if force else time.monotonic()
        keep: list[_Pending] = []
        for publish, label, call, attempts, not_before in self._pending:
            if now < not_before:
                keep.append((publish, label, call, attempts, not_before))
                continue
            try:
                call()
            except Exception as exc:
                delay = min(_RETRY_MAX, 2.0**attempts)
                now = time.monotonic()
                self.errors += 1
                _log.error(
                    "publishing audit %s to %r failed (attempt %d, retry in %.0f s): %s",
                    label, publish, attempts + 1, delay, exc,
                )  # fmt: skip
                keep.append((publish, label, call, attempts + 1, now + delay))
        self._pending = keep

    @property
    def unpublished(self) -> int:
        """Checkpoint and heads note publications still waiting for a retry."""
        return len(self._pending)

    def wait_for(self, size: int, timeout: float = 30.0) -> bool:
        """Block until a checkpoint of at least ``size`` records is signed (for tests)."""
        deadline = time.monotonic() + timeout
        with self._signed:
            while self.last is None or self.last[0].size < size:
                self._wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._signed.wait(min(left, 0.1))
        return True

    def close(self, *, final: bool = True) -> None:
        """Stop the thread; sign a last checkpoint (``final``) and try publishing once more."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        if final:
            try:
                self.checkpoint_now()
            except Exception as exc:
                _log.error("final audit checkpoint failed: %s", exc)
        self._publish(force=True)
        if self._pending:
            _log.error(
                "%d audit checkpoint publication(s) still failing at shutdown; the "
                "checkpoints and heads notes are stored in the audit store (coworker audit "
                "checkpoint prints the latest checkpoint, coworker audit heads a heads note)",
                len(self._pending),
            )
        for tree in self._chain_trees.values():
            tree.close()
            tree.store.close()
        self._chain_trees.clear()
        self.tree.close()
        if self.owns_store:
            self.store.close()


def _parse_every(every: Any) -> tuple[int | None, float | None]:
    # 1000 -> every 1000 records (and the 60 s heartbeat); "30s" -> every 30 seconds;
    # (1000, 30.0) -> whichever comes first.
    from coworker.exceptions import ConfigError

    if every is None:
        return 1000, 60.0
    if isinstance(every, tuple) and len(every) == 2:
        return _parse_every(every[0])[0], _parse_every(every[1])[1]
    if isinstance(every, int) and not isinstance(every, bool) and every > 0:
        return every, 60.0
    if isinstance(every, float) and every > 0:
        return None, every
    if isinstance(every, str) and every.endswith("s"):
        try:
            return None, float(every[:-1])
        except ValueError:
            pass
    raise ConfigError(
        f"checkpoint_every={every!r}: use N records (int), 'Ts' / T.0 seconds, or (N, T)"
    )


def start_from_config(
    store: Any,
    key: str | os.PathLike[str],
    every: Any = None,
    publish: Any = None,
    witnesses: Sequence[str] | None = None,
) -> Checkpointer:
    """Start the :class:`Checkpointer` that ``coworker.configure(checkpoint_key=...)`` asks for.

    The checkpointer reads the log through a connection of its own (a file or database
    store is reopened; its spool is never shared), so that it can sign the last checkpoint
    after the audit pipeline has flushed and closed its store.

    Raises:
        ConfigError: the key cannot be loaded or an option is wrong.
    """
    from coworker.audit.keys import load_signer
    from coworker.audit.store_sqlite import SQLiteStore
    from coworker.audit.witness import WitnessClient

    signer = load_signer(key)
    records, seconds = _parse_every(every)
    targets = (
        [publish]
        if isinstance(publish, str | os.PathLike) or callable(publish)
        else list(publish or ())
    )
    own = store
    if isinstance(store, SQLiteStore):
        own = SQLiteStore(store.path, busy_timeout=store.busy_timeout)
    elif type(store).__name__ == "PostgresStore":
        from coworker.audit.store_postgres import PostgresStore

        own = PostgresStore(store.url, schema=store.base_schema, chain=store.chain, spool=False)
    cpr = Checkpointer(
        own,
        signer,
        every_records=records,
        every_seconds=seconds,
        publishers=[publisher_for(t) for t in targets],
        witnesses=[WitnessClient(url) for url in witnesses or ()],
    )
    cpr.owns_store = own is not store
    return cpr


class S3Publisher:
    """Writes each checkpoint to an S3-compatible bucket, ``<prefix><origin>/<size>.checkpoint``
    and ``<prefix><origin>/latest.checkpoint``, the numbered objects under Object Lock
    (COMPLIANCE mode, ``retain_days``) so that nobody, the bucket owner included, can
    overwrite or delete them before the retention date.

    Needs ``boto3`` (the ``s3`` extra), imported on first use. Credentials and region come
    from the usual AWS environment / config.

    Args:
        bucket: a bucket created with Object Lock enabled.
        prefix: key prefix, e.g. ``"checkpoints/"``.
        retain_days: retention of each numbered checkpoint; ``None``: no lock request.
        endpoint_url: for S3-compatible servers (MinIO, Ceph...).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        retain_days: int | None = 365,
        endpoint_url: str | None = None,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.retain_days = retain_days
        if client is None:
            try:
                import boto3
            except ImportError as exc:  # pragma: no cover - the s3 extra is missing
                from coworker.exceptions import ConfigError

                raise ConfigError(
                    "publishing checkpoints to S3 needs boto3: pip install 'coworker-otel[s3]'"
                ) from exc
            client = boto3.client("s3", endpoint_url=endpoint_url)
        self._s3 = client

    def __call__(self, checkpoint: Checkpoint, note: bytes) -> None:
        """Publish one checkpoint (raises on failure; the checkpointer retries)."""
        base = f"{self.prefix}{checkpoint.origin}/"
        self._put(f"{base}{checkpoint.size}.checkpoint", f"{base}latest.checkpoint", note)

    def publish_heads(self, origin: str, note: bytes) -> None:
        """Publish one heads note: ``<prefix><origin>/heads/<sha256 of the note>.heads``
        (under Object Lock) and ``<prefix><origin>/latest.heads``."""
        base = f"{self.prefix}{origin}/"
        digest = hashlib.sha256(note).hexdigest()
        self._put(f"{base}heads/{digest}.heads", f"{base}latest.heads", note)

    def _put(self, key: str, latest: str, note: bytes) -> None:
        """``note`` under ``key`` (Object Lock when ``retain_days``), then under ``latest``."""
        import datetime

        extra: dict[str, Any] = {}
        if self.retain_days is not None:
            until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=self.retain_days)
            extra = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}
        self._s3.put_object(
            Bucket=self.bucket, Key=key, Body=note, ContentType="text/plain; charset=utf-8",
            **extra,
        )  # fmt: skip
        self._s3.put_object(
            Bucket=self.bucket, Key=latest, Body=note, ContentType="text/plain; charset=utf-8",
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"S3Publisher(s3://{self.bucket}/{self.prefix})"


def publisher_for(target: Any) -> Publisher:
    """A publisher from a ``checkpoint_publish`` item: a callable is used as is, an
    ``s3://bucket/prefix`` URL becomes an :class:`S3Publisher` (``?retain_days=N``,
    ``&endpoint=http://...``), anything else a :class:`DirectoryPublisher`."""
    if callable(target):
        return target  # type: ignore[no-any-return]
    text = os.fspath(target)
    if text.startswith("s3://"):
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(text)
        opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        retain = opts.get("retain_days", "365")
        return S3Publisher(
            parts.netloc,
            parts.path.lstrip("/"),
            retain_days=None if retain in ("0", "none") else int(retain),
            endpoint_url=opts.get("endpoint"),
        )
    return DirectoryPublisher(text)
