"""A really full disk and a really read-only filesystem under the SQLite audit store.

A tiny tmpfs is mounted for each test (this needs root, which the project's machines and CI
have; elsewhere the tests skip with the reason). Unlike ``max_page_count`` or ``mode=ro``, the
failures come from the kernel: ENOSPC and EROFS.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import coworker
from coworker.audit import open_store, verify_chain


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs mounted at a fresh directory."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


@coworker.run(operation="create", doctype="Note", capture_input=True)
def create_note(text: str) -> str:
    return text


def test_disk_full_raises_and_loses_nothing_that_returned(small_fs: Path, spans: Any) -> None:
    """On ENOSPC a call raises AuditUnavailable; every call that returned has its record."""
    url = f"sqlite:///{small_fs / 'audit.db'}"
    coworker.configure(audit=url, metrics=False)
    returned = []
    with pytest.raises(coworker.AuditUnavailable):
        for i in range(100_000):
            create_note("x" * 2000 + str(i))  # fill the 512 KiB filesystem
            returned.append(i)
    coworker.shutdown()
    assert 0 < len(returned) < 100_000
    _remount(small_fs, "size=64m")  # space again: the log is intact and writable
    store = open_store(url)
    try:
        report = verify_chain(store)
        assert report.ok, report.detail
        assert report.checked == len(returned)
    finally:
        store.close()


def test_disk_full_log_policy_retries_when_space_returns(
    small_fs: Path, spans: Any, caplog: Any
) -> None:
    """With audit_failure='log', records wait in the retry queue and land once space returns."""
    url = f"sqlite:///{small_fs / 'audit.db'}"
    coworker.configure(audit=url, audit_failure="log", metrics=False)
    filler = small_fs / "filler"
    create_note("first")
    # Take the remaining space with an ordinary file, so the next append hits ENOSPC.
    with open(filler, "wb") as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    for i in range(3):
        create_note(f"while full {i}")  # returns: the record is queued, loudly
    assert "queued for retry" in caplog.text
    filler.unlink()
    assert coworker.force_flush()
    coworker.shutdown()
    store = open_store(url)
    try:
        report = verify_chain(store)
        assert report.ok and report.checked == 4
    finally:
        store.close()


def test_read_only_filesystem_is_audit_unavailable(small_fs: Path, spans: Any) -> None:
    """On a filesystem remounted read-only, configure refuses the audit store at once (a
    security setting fails fast) instead of letting state changes run unaudited."""
    url = f"sqlite:///{small_fs / 'audit.db'}"
    coworker.configure(audit=url, metrics=False)
    create_note("before")
    coworker.shutdown()  # closes the files, so the filesystem can be remounted
    _remount(small_fs, "ro")
    with pytest.raises(coworker.AuditUnavailable, match=r"audit\.db"):
        coworker.configure(audit=url, fail_closed=True, metrics=False)
    _remount(small_fs, "rw")
    store = open_store(url)
    try:
        report = verify_chain(store)
        assert report.ok and report.checked == 1
    finally:
        store.close()
