"""Captured input/output under hostile values: redaction holds, the text is valid UTF-8."""

from __future__ import annotations

import json

from coworker._capture import REDACTED, capture
from coworker._state import DEFAULT_REDACT


class _Innocent(str):
    """A key that claims, when lower-cased, not to be a password."""

    def lower(self) -> str:
        return "harmless"


def test_str_subclass_key_cannot_escape_redaction() -> None:
    """A dict key whose lower() lies is still redacted by its real text."""
    out = json.loads(capture({_Innocent("Password"): "hunter2"}, DEFAULT_REDACT, 4096))
    assert out == {"Password": REDACTED}


def test_lone_surrogate_is_escaped_not_kept() -> None:
    """A lone surrogate in a captured value is escaped visibly, so the text is UTF-8."""
    text = capture({"name": "bad\ud800"}, DEFAULT_REDACT, 4096)
    text.encode("utf-8")  # would raise on a lone surrogate
    assert "\\ud800" in text
