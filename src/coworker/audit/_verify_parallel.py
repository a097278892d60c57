"""Verify a large SQLite log on several cores: each worker re-hashes one seq range.

Sound because the chain is checkable piecewise: a range is intact when every record links to
the one before it inside the range, and the ranges join up when each range's first
``prev_hash`` equals the previous range's last hash (the genesis value for the first). On any
problem the caller falls back to the serial verifier, which names the first bad record.

Only stdlib imports here: a worker starts with nothing else to load.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from operator import add, methodcaller
from typing import Final

CHUNK: Final = 25_000
"""Records per work item at most (also the progress granularity)."""

MIN_CHUNK: Final = 2_500
"""Records per work item at least (unless :data:`CHUNK` is smaller): a work item costs ~0.6 ms
of CPU to start (a connection, its file mapping, two statements), ~250 records' worth."""

MMAP_SIZE: Final = 1 << 30
"""Readers map the file instead of copying pages: about 1.6x faster scans."""

BATCH: Final = 256
"""Rows fetched at a time: a batch's bodies (~700 bytes each) stay in the CPU's cache from
the fetch through the hashing and the byte search (4,096 cost ~30% more CPU per row)."""

MIN_RECORDS: Final = 150_000
"""Below this, process start-up costs more than it saves."""

Chunk = tuple[str, int, int, str | None]
Result = tuple[bool, bytes | None, bytes | None, int, list[int] | None, list[int]]


def verify_range(job: Chunk) -> Result:
    """Check records ``lo..hi`` of the file: ``(ok, first_prev_hash, last_hash, count,
    candidates, committed)``.

    ``flag`` is an SQL expression over ``audit_records r LEFT JOIN audit_payloads p`` that is
    true for a row the store's integrity check must look at (its query columns may not match
    its body); it is computed in the same scan as the hashes, so each row is read once for
    both. ``candidates`` is those seqs, or ``None`` when no flag was given or a body is not
    JSON (the caller then runs the store's own scan). ``committed`` is the seqs whose body
    may commit to a payload (:func:`committing`), found in the same batches as the hashes.
    """
    path, lo, hi, flag = job
    # PARSE_COLNAMES: only the columns _LINKS names "[...]" are converted (see _AS_FETCHED).
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, detect_types=sqlite3.PARSE_COLNAMES)
    committed: list[int] = []
    try:
        conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
        first = conn.execute("SELECT prev_hash FROM audit_records WHERE seq = ?", (lo,)).fetchone()
        if first is None:
            return False, None, None, 0, None, committed
        if flag is not None:
            candidates: list[int] = []
            try:
                ok, last, count = _scan(
                    conn,
                    "SELECT r.hash, r.body, " + flag + " FROM audit_records r LEFT JOIN "
                    "audit_payloads p ON p.seq = r.seq WHERE r.seq BETWEEN ? AND ? "
                    "ORDER BY r.seq",
                    lo,
                    hi,
                    first[0],
                    candidates,
                    committed,
                )
            except sqlite3.OperationalError:  # a body that is not JSON
                committed.clear()
            else:
                return ok, first[0], last, count, candidates, committed
        ok, last, count = _scan_links(conn, lo, hi, first[0], committed)
        return ok, first[0], last, count, None, committed
    finally:
        conn.close()


_AS_FETCHED: Final = "COWORKER_VERIFY_BLOB"
"""A converter (registered in :mod:`sqlite3`'s process-wide table under a name nothing else
uses) that returns the bytes as fetched: a column with a converter is read without the GIL
released and re-taken around ``sqlite3_column_type``, once per column and row otherwise
(-686 of 35,784 instructions per record under callgrind). It also reads TEXT as its UTF-8
bytes, which the default conversion returns as ``str``: hence the filter in :data:`_LINKS`."""

sqlite3.register_converter(_AS_FETCHED, bytes.__bytes__)

# Every row's own prev_hash, so that the links are checked exactly as the serial verifier does
# (prev_hash(n) == hash(n-1), hash(n) == SHA-256(prev_hash(n) || body(n))). Only rows whose
# three columns are BLOBs are returned (every BLOB is >= the empty one; NULL, numbers and TEXT
# are not): a row of another type (a TEXT body with the very bytes) is missing from the scan,
# which the count or the next link catches, as a TypeError or str != bytes does in the serial
# loop. A converter gets None for an empty BLOB: a TypeError or a mismatch, a failure too.
_LINKS: Final = (
    f'SELECT hash AS "hash [{_AS_FETCHED}]", prev_hash AS "prev_hash [{_AS_FETCHED}]", '
    f'body AS "body [{_AS_FETCHED}]" FROM audit_records WHERE seq BETWEEN ? AND ? '
    "AND hash >= x'' AND prev_hash >= x'' AND body >= x'' ORDER BY seq"
)


def _scan_links(
    conn: sqlite3.Connection, lo: int, hi: int, prev: bytes, committed: list[int]
) -> tuple[bool, bytes | None, int]:
    """The hash loop over one range without a per-row flag: ``(intact, last hash, records
    checked)``; the seqs of the bodies that may commit to a payload are added to
    ``committed`` (:func:`committing`, on each batch once its hashes are checked).

    No Python bytecode runs per row: each batch is split into columns by ``zip``, the
    ``prev_hash || body`` messages are hashed by ``map`` over C functions, and the links and
    digests are compared as whole tuples. Every check is the serial verifier's: the first
    ``prev_hash`` is the range's start, each later one is the previous row's hash, each hash
    is SHA-256 of its row's ``prev_hash || body``; a column of another type (TEXT, NULL)
    fails the comparison or raises ``TypeError``, which is a failure too.
    """
    digest = methodcaller("digest")
    sha256 = hashlib.sha256
    cursor = conn.execute(_LINKS, (lo, hi))
    count = 0
    while True:
        rows = cursor.fetchmany(BATCH)
        if not rows:
            break
        hashes, prevs, bodies = zip(*rows, strict=True)
        try:
            intact = (
                prevs[0] == prev
                and prevs[1:] == hashes[:-1]
                and tuple(map(digest, map(sha256, map(add, prevs, bodies)))) == hashes
            )
        except TypeError:  # a tampered column of another type
            intact = False
        if not intact:
            return False, None, count
        first = lo + count  # intact: the batch is seqs lo + count, lo + count + 1, ...
        committed += [first + i for i in committing(bodies)]
        prev = hashes[-1]
        count += len(rows)
    return count == hi - lo + 1, prev, count


# What the bodies are searched for (see committing).
_KEY: Final = b"payload_digest"
_NULL_KEY: Final = b'payload_digest":n'


def committing(bodies: Sequence[object]) -> list[int]:
    """The positions in ``bodies`` of those that may commit to a payload: a superset of the
    bodies that Python's ``json.loads`` decodes to an object with a ``payload_digest`` that
    is not ``None``, at any depth and under any duplicate key (the integrity check decodes
    each one it is given, so over-reporting costs time only).

    A body is left out only when it is ``bytes`` with no backslash, no NUL byte, and every
    occurrence of ``payload_digest`` in it followed by ``":n``. That is sound: without a NUL
    byte ``json.loads`` decodes the bytes as UTF-8 (UTF-16 or -32 JSON text has a NUL in
    every ASCII character, and JSON needs some); without a backslash no string has an
    escape (``\\u0070`` for ``p``...), so a key that decodes to ``payload_digest`` is those
    very bytes between quotes; and a value after ``":`` that starts with ``n`` can only be
    ``null``. Every record coworker writes without a payload holds ``"payload_digest":null``
    once and passes; a whole batch is tested at C speed (one join, two ``memchr``, two
    counts), body by body only when the batch does not pass.
    """
    try:
        blob = b"\n".join(bodies)  # type: ignore[arg-type]  # not bytes: TypeError
    except TypeError:
        blob = None
    # The separator is in neither pattern: no occurrence spans two bodies.
    if (
        blob is not None
        and b"\\" not in blob
        and b"\0" not in blob
        and blob.count(_KEY) == blob.count(_NULL_KEY)
    ):
        return []
    return [i for i, body in enumerate(bodies) if _may_commit(body)]


def _may_commit(body: object) -> bool:
    if type(body) is not bytes:
        return True
    return b"\\" in body or b"\0" in body or body.count(_KEY) != body.count(_NULL_KEY)


def _scan(
    conn: sqlite3.Connection,
    query: str,
    lo: int,
    hi: int,
    prev: bytes,
    candidates: list[int],
    committed: list[int],
) -> tuple[bool, bytes | None, int]:
    """The hash loop over one range with a per-row flag: ``(intact, last hash, records
    checked)``; the flagged seqs are added to ``candidates``, those whose body may commit to
    a payload to ``committed`` (as in :func:`_scan_links`)."""
    expected = lo
    sha256 = hashlib.sha256
    # seq is not fetched: rows come in seq order from [lo, hi] and seq is unique, so a
    # gap shows as a short count, and any misplaced row breaks the hash links.
    cursor = conn.execute(query, (lo, hi))
    cursor.arraysize = BATCH
    while True:
        rows = cursor.fetchmany()
        if not rows:
            break
        first = expected
        for digest, body, flagged in rows:
            try:
                intact = sha256(prev + body).digest() == digest
            except TypeError:  # a tampered column of another type
                intact = False
            if not intact:
                return False, None, expected - lo
            if flagged:
                candidates.append(expected)
            prev = digest
            expected += 1
        committed += [first + i for i in committing([row[1] for row in rows])]
    return expected - 1 == hi, prev, expected - lo


def ranges(head_seq: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous seq ranges ``(lo, hi)`` covering ``1..head_seq`` in order, one per work item.

    Guided scheduling: :data:`CHUNK` records each while plenty remain, then a quarter of what
    remains per worker, down to :data:`MIN_CHUNK`. Each worker takes the next range when it
    finishes one, so with equal ranges the first worker done idles for up to a whole range
    while the last one finishes (a median 57-75 ms of a 200,000-record verify on two cores,
    ranges of 25,000); with shrinking ones the workers end ~10 ms apart.
    """
    out = []
    lo = 1
    while lo <= head_seq:
        size = min(CHUNK, max(MIN_CHUNK, (head_seq - lo + 1) // (2 * workers)))
        hi = min(lo + size - 1, head_seq)
        out.append((lo, hi))
        lo = hi + 1
    return out


def can_fork() -> bool:
    """Forking is safe only in a single-threaded process with the fork start method."""
    return (
        hasattr(os, "fork")
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
        and (os.cpu_count() or 1) > 1
    )


def verify_parallel(
    path: str,
    head_seq: int,
    genesis: bytes,
    progress: Callable[[int], None] | None = None,
    flag: str | None = None,
) -> tuple[bytes, list[int] | None, list[int]] | None:
    """Verify records ``1..head_seq``: ``(hash of head_seq, candidates, committed)`` if all
    links are intact, or ``None`` when anything is wrong (the caller then runs the serial
    verifier).

    ``candidates`` are the seqs ``flag`` selects, in order, or ``None`` when there is no flag
    or they could not be computed in the scan; ``committed`` those whose body may commit to a
    payload (see :func:`verify_range`), in order."""
    workers = min(os.cpu_count() or 1, -(-head_seq // CHUNK))
    jobs = [(path, lo, hi, flag) for lo, hi in ranges(head_seq, workers)]
    ctx = multiprocessing.get_context("fork")
    prev = genesis
    done = 0
    candidates: list[int] | None = []
    committed: list[int] = []
    with ctx.Pool(workers) as pool:
        for ok, first_prev, last, count, found, commits in pool.imap(verify_range, jobs):
            if not ok or first_prev != prev or last is None:
                pool.terminate()
                return None
            if found is None:
                candidates = None
            elif candidates is not None:
                candidates += found
            committed += commits
            prev = last
            done += count
            if progress is not None:
                progress(done)
    return prev, candidates, committed
