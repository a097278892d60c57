"""Input/output capture: redacted, size-limited JSON that never raises.

Values are walked (not ``json.dumps``-ed with a ``default``) so that redaction applies at every
depth and a value whose ``__repr__`` or ``__iter__`` raises becomes a placeholder instead of an
exception in the application's call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Final

__all__ = ["REDACTED", "TRUNCATED", "capture"]

REDACTED: Final = "[REDACTED]"
TRUNCATED: Final = "…[truncated]"
_MAX_DEPTH: Final = 6
_MAX_ITEMS: Final = 100
_MAX_STR: Final = 1024


def _redacted_key(key: str, redact: tuple[str, ...]) -> bool:
    k = str.lower(key)  # str's own lower(): a subclass key must not talk its way out
    return any(fragment in k for fragment in redact)


def _walk(value: Any, redact: tuple[str, ...], depth: int) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        # JSON has no NaN/Infinity: keep them readable instead of emitting invalid JSON.
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, str):
        return value if len(value) <= _MAX_STR else value[:_MAX_STR] + TRUNCATED
    if depth >= _MAX_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        value = value._asdict()  # a NamedTuple: its field names decide redaction
    elif isinstance(value, SimpleNamespace):
        value = vars(value)
    elif hasattr(type(value), "_get_kwargs") and hasattr(value, "__dict__"):
        value = vars(value)  # argparse.Namespace: CLI options such as --password
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= _MAX_ITEMS:
                out[TRUNCATED] = f"{len(value) - _MAX_ITEMS} more"
                break
            key = str.__str__(k) if isinstance(k, str) else _safe_repr(k)
            out[key] = REDACTED if _redacted_key(key, redact) else _walk(v, redact, depth + 1)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = []
        for i, v in enumerate(value):
            if i >= _MAX_ITEMS:
                items.append(f"{TRUNCATED} {len(value) - _MAX_ITEMS} more")
                break
            items.append(_walk(v, redact, depth + 1))
        return items
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is not None:
        return {
            name: REDACTED
            if _redacted_key(name, redact)
            else _walk(getattr(value, name, None), redact, depth + 1)
            for name in fields
        }
    try:
        text = repr(value)
    except Exception as exc:
        return f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= _MAX_STR else text[:_MAX_STR] + TRUNCATED


def _safe_repr(value: Any) -> str:
    try:
        return str.__str__(repr(value))
    except Exception as exc:
        return f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"


def capture(value: Any, redact: tuple[str, ...], limit: int) -> str:
    """Serialize ``value`` for a span attribute.

    Keys containing any of ``redact`` (case-insensitive) get ``[REDACTED]`` values, at any
    depth; strings, containers and the whole result are size-limited; nothing raises.

    Args:
        value: anything.
        redact: lower-case key fragments to redact.
        limit: maximum length of the returned string.

    Returns:
        JSON text, at most ``limit`` characters (then ending in ``…[truncated]``).
    """
    try:
        text = json.dumps(_walk(value, redact, 0), ensure_ascii=False, separators=(",", ":"))
    except Exception as exc:  # a hostile __repr__/__iter__/__eq__: never break the app
        text = json.dumps(f"<unserializable {type(value).__name__}: {type(exc).__name__}>")
    if len(text) > limit:
        text = text[: max(limit - len(TRUNCATED), 0)] + TRUNCATED
    if not text.isascii():
        # A lone surrogate (a badly decoded argument) is not UTF-8: an OTLP exporter could
        # not encode the span, and would drop its whole batch. Escape it visibly.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
