"""How the parallel verifier splits a log into work items: contiguous ranges that shrink
towards the end (guided scheduling), and a record edited in the smallest ones is still named."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from coworker.audit import _verify_parallel as par
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import EDITED
from tests.audit.conftest import make_entries, raw


@pytest.mark.parametrize("head_seq", [1, 2_499, 150_000, 200_000, 1_234_567])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_ranges_cover_the_log_once_in_order(head_seq: int, workers: int) -> None:
    """The ranges are 1..head_seq without gap or overlap, none larger than CHUNK."""
    ranges = par.ranges(head_seq, workers)
    assert ranges[0][0] == 1 and ranges[-1][1] == head_seq
    assert all(lo <= hi for lo, hi in ranges)
    assert all(a[1] + 1 == b[0] for a, b in pairwise(ranges))
    assert max(hi - lo + 1 for lo, hi in ranges) <= par.CHUNK


def test_ranges_shrink_towards_the_end() -> None:
    """Full chunks while plenty remains, then smaller ones down to MIN_CHUNK (the last one
    holds what is left), so that no worker idles for a whole chunk at the end."""
    sizes = [hi - lo + 1 for lo, hi in par.ranges(200_000, 2)]
    assert sizes[:5] == [par.CHUNK] * 5
    assert sizes == sorted(sizes, reverse=True)
    assert min(sizes[:-1]) == par.MIN_CHUNK and sizes[-1] <= par.MIN_CHUNK


_CHILD = """
import json, sys
from coworker.audit import _verify_parallel as par
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain
par.MIN_RECORDS, par.CHUNK, par.MIN_CHUNK = int(sys.argv[2]), 1_000, 100
jobs = []
ranges = par.ranges
par.ranges = lambda head, workers: jobs.extend(ranges(head, workers)) or jobs
seen = []
report = verify_chain(SQLiteStore(sys.argv[1], readonly=True), progress=seen.append)
print(json.dumps({"parallel": par.can_fork(), "jobs": jobs, "progress": seen, **report.to_dict()}))
"""


def _verify_in_child(path: Path, *, serial: bool = False) -> dict[str, Any]:
    # A fresh single-threaded process: the parallel path only forks when that is safe.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(10**9 if serial else 1_000)],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    ).stdout  # fmt: skip
    return json.loads(out)  # type: ignore[no-any-return]


def test_shrinking_ranges_verify_and_name_an_edit_in_the_last_ones(tmp_path: Path) -> None:
    """A log split into shrinking ranges verifies whole, and a body edited in one of the
    smallest ranges near the end is named exactly."""
    path = tmp_path / "audit.db"
    store = SQLiteStore(path)
    store.append([make_entries(1)[0][0]] * 3_000)
    store.close()
    result = _verify_in_child(path)
    if not result["parallel"]:
        pytest.skip("parallel verify needs fork and several cores")
    sizes = [hi - lo + 1 for lo, hi in result["jobs"]]
    assert len(sizes) > 5 and sizes[0] > sizes[-2] == 100  # guided: the parallel path ran
    assert result["ok"] and result["checked"] == 3_000 and result["progress"][-1] == 3_000
    conn = raw(path)
    conn.execute("UPDATE audit_records SET body = CAST(body || ' ' AS BLOB) WHERE seq = 2950")
    conn.close()
    result = _verify_in_child(path)
    assert (result["ok"], result["bad_seq"], result["kind"]) == (False, 2_950, EDITED)


def _rechain(conn: sqlite3.Connection, seq: int, prev: bytes, head: int) -> None:
    """Re-hash records ``seq..head`` from ``prev``: a tail rewritten with recomputed hashes."""
    for n in range(seq, head + 1):
        body = conn.execute("SELECT body FROM audit_records WHERE seq = ?", (n,)).fetchone()[0]
        digest = hashlib.sha256(prev + body).digest()
        conn.execute(
            "UPDATE audit_records SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, n)
        )
        prev = digest


@pytest.mark.parametrize(
    "edit", ["prev-as-text", "prev-empty", "hash-as-int", "hash-empty", "text-skipped"]
)
def test_rows_of_other_types_fail_the_workers_scan_as_the_serial_loop(
    tmp_path: Path, edit: str
) -> None:
    """The workers read only rows whose three columns are BLOBs, as bytes: a column of
    another type, an empty hash, or a TEXT body whose neighbours were relinked
    around it (links intact without it) fails the parallel scan, and the report is the
    serial verifier's."""
    path = tmp_path / "audit.db"
    store = SQLiteStore(path)
    store.append([make_entries(1)[0][0]] * 3_000)
    store.close()
    conn = raw(path)
    prev = conn.execute("SELECT prev_hash FROM audit_records WHERE seq = 2222").fetchone()[0]
    if edit == "prev-as-text":
        conn.execute(
            "UPDATE audit_records SET prev_hash = CAST(prev_hash AS TEXT) WHERE seq = 2222"
        )
    elif edit == "prev-empty":
        conn.execute("UPDATE audit_records SET prev_hash = x'' WHERE seq = 2222")
    elif edit == "hash-as-int":
        conn.execute("UPDATE audit_records SET hash = 7 WHERE seq = 2222")
    elif edit == "hash-empty":
        conn.execute("UPDATE audit_records SET hash = x'' WHERE seq = 2222")
    else:  # a TEXT body with the same bytes, the record after it linked to the one before
        conn.execute("UPDATE audit_records SET body = CAST(body AS TEXT) WHERE seq = 2222")
        _rechain(conn, 2223, prev, 3_000)
    conn.close()
    result = _verify_in_child(path)
    serial = _verify_in_child(path, serial=True)
    if not result["parallel"]:
        pytest.skip("parallel verify needs fork and several cores")
    assert result["jobs"] and not serial["jobs"]  # the parallel path ran, then the serial one
    assert not result["ok"] and result["bad_seq"] in (2221, 2222, 2223)
    assert (result["kind"], result["bad_seq"]) == (serial["kind"], serial["bad_seq"])
    assert result["detail"] == serial["detail"]
