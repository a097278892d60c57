"""Text for terminals: stored values shown to a human with their control characters escaped.

Audit records hold whatever an application (or an ingest client) put in them: a user id with a
newline and ANSI escapes could otherwise forge a table row, move the cursor or hide text
(``"root\\n9999 …\\x1b[1A"``), and a bidi override could show an id reversed. Every
human-readable output of coworker goes through :func:`printable`; the stored record stays as
given, and ``--json`` outputs stay exact JSON (whose encoder escapes these characters itself).
"""

from __future__ import annotations

import unicodedata
from typing import Final

__all__ = ["json_text", "printable"]


def _escapes() -> dict[int, str]:
    table: dict[int, str] = {}
    # C0 controls (tab and newline included: a table cell is one line), DEL and C1 controls.
    for code in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)):
        table[code] = f"\\x{code:02x}"
    # Line and paragraph separators, and the bidirectional formatting characters that
    # reorder what follows them (Trojan Source, CVE-2021-42574).
    for code in (0x2028, 0x2029, 0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F)):
        table[code] = f"\\u{code:04x}"
    for code in range(0x2066, 0x206A):
        table[code] = f"\\u{code:04x}"
    # The escape character itself, so that an escaped value and a literal "\x1b" in the data
    # never look the same.
    table[ord("\\")] = "\\\\"
    return table


_ESCAPES: Final = _escapes()

# json.dumps escapes C0 controls itself; with ensure_ascii=False it leaves DEL, C1, the line
# separators and the bidi controls raw. They can only occur inside JSON strings, where \uXXXX
# means the same character: escaping them keeps the JSON exact and the line one line.
_JSON_ESCAPES: Final = {code: f"\\u{code:04x}" for code in _ESCAPES if code >= 0x7F}


def printable(value: object) -> str:
    """``str(value)`` with control, separator, bidi and other invisible format characters (and
    ``\\``) escaped.

    Args:
        value: anything; ``None`` becomes ``"None"`` like ``str``.

    Returns:
        One line of text that shows every character of the value and moves no cursor.
    """
    return _format_escaped(str(value).translate(_ESCAPES))


def _format_escaped(text: str) -> str:
    # Every other format character (Unicode category Cf: zero-width space and joiners, BOM,
    # soft hyphen, tag characters) is invisible, so "alice\u200b" would print as "alice"
    # while `query --user alice` does not find it. Looked up per character of non-ASCII text
    # only (a table of all of Unicode would cost the import a tenth of a second).
    if text.isascii():
        return text
    return "".join(
        (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        if unicodedata.category(c) == "Cf"
        else c
        for c in text
    )


def json_text(value: object) -> str:
    """``value`` as JSON text (sorted keys, non-ASCII kept) that is safe on a terminal and one
    line for line-splitting readers: the decoded value is exactly ``value``."""
    import json

    text = json.dumps(value, ensure_ascii=False, sort_keys=True).translate(_JSON_ESCAPES)
    if text.isascii():
        return text
    # JSON spells a character beyond U+FFFF as a surrogate pair.
    return "".join(
        "".join(f"\\u{u:04x}" for u in _utf16(c)) if unicodedata.category(c) == "Cf" else c
        for c in text
    )


def _utf16(char: str) -> list[int]:
    data = char.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
