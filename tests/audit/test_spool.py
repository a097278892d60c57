"""The local spool keeps every entry readable, whatever bytes its shipment attempts hold."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from coworker.audit.spool import Spool


def test_attempt_hashes_that_are_not_utf8_stay_readable(tmp_path: Path) -> None:
    """Two noted attempts with non-UTF-8 hash bytes: peek() still returns both, exactly."""
    spool = Spool(tmp_path / "spool.db")
    spool.put([{"operation": "update"}], [None])
    (entry,) = spool.peek()
    first, second = (7, b"\xff" * 32), (8, bytes(range(224, 256)))
    spool.note_attempt({entry.id: first})
    spool.note_attempt({entry.id: second})
    (entry,) = spool.peek()
    assert entry.attempted == (first, second)
    spool.close()


def test_spool_files_with_text_typed_attempts_are_read(tmp_path: Path) -> None:
    """A spool written before the fix (attempts stored as TEXT by ||) is still shipped."""
    spool = Spool(tmp_path / "spool.db")
    spool.put([{"operation": "update"}], [None])
    (entry,) = spool.peek()
    spool.close()
    raw = sqlite3.connect(tmp_path / "spool.db")
    attempt = (9).to_bytes(8, "big") + b"\xfe" * 32
    raw.execute("UPDATE spool SET attempted = attempted || ? WHERE id = ?", (attempt, entry.id))
    raw.commit()
    assert raw.execute("SELECT typeof(attempted) FROM spool").fetchone() == ("text",)
    raw.close()
    (entry,) = Spool(tmp_path / "spool.db").peek()
    assert len(entry.attempted) == 1 and entry.attempted[0][1] == b"\xfe" * 32


def test_a_new_spool_is_private_to_its_user(tmp_path: Path) -> None:
    """The spool holds unsealed records and payloads: mode 0600, whatever the umask."""
    import os

    old = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "spool.db")
        spool.put([{"i": 1}])
    finally:
        os.umask(old)
    for suffix in ("", "-wal"):
        path = tmp_path / f"spool.db{suffix}"
        if path.exists():
            assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    spool.close()
