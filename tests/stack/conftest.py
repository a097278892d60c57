"""Fixtures of the ``stack`` tests: the built binaries and a registry of started processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack._stack import Procs, Stack, load_stack


@pytest.fixture(scope="session")
def stack() -> Stack:
    """The binaries of collector-config/build-local-stack.sh (waits for a running build)."""
    return Stack(load_stack())


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Start servers with ``procs.start(name, argv)``; all are stopped after the test."""
    registry = Procs(tmp_path)
    try:
        yield registry
    finally:
        registry.close()
