"""The one place that defines coworker's version (pyproject.toml reads it from here)."""

from __future__ import annotations

__version__ = "0.1.0"
