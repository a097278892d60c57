"""Optional test dependencies: skip with the reason when one is missing, fail under CI.

The dev extra installs all of them; under CI (``CI`` set) a missing one means the extra is
broken, and a skipped test would prove nothing.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

__all__ = ["require"]


def require(module: str, reason: str) -> ModuleType:
    """Import ``module``; skip (module level too) or, under CI, fail naming ``reason``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} is not installed ({reason}): {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: these tests must run)", pytrace=False)
        pytest.skip(message, allow_module_level=True)
