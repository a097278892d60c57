"""Instruction counts for the benchmarks (``--callgrind``): one helper for every script.

Each measurement runs the script itself in a fresh process under ``valgrind --tool=callgrind``
with ``--case NAME`` and a count; :func:`per_iteration` takes the difference between N and 2N
iterations divided by N, so start-up and imports cancel out. The counts repeat for the same
binary, inputs and environment (``PYTHONHASHSEED=0``), whatever else the machine is doing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys


def instructions(script: str, case: str, count_flag: str, count: int) -> int:
    """Instructions callgrind counted for ``script --case CASE COUNT_FLAG COUNT``."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            os.path.abspath(script),
            "--case",
            case,
            count_flag,
            str(count),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    match = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    assert match, out.stderr[-2000:]
    return int(match.group(1))


def per_iteration(script: str, case: str, count_flag: str, count: int) -> float:
    """Instructions per iteration of ``case``: (2N iterations - N iterations) / N."""
    small = instructions(script, case, count_flag, count)
    large = instructions(script, case, count_flag, 2 * count)
    return (large - small) / count
