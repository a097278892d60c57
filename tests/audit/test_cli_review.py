"""Human-readable audit output against invisible characters (found in review)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from coworker import attributes as a
from coworker._text import printable
from coworker.audit.store_sqlite import SQLiteStore
from coworker.cli import main
from tests.audit.conftest import fill

# Zero-width space, zero-width joiner, word joiner, BOM, soft hyphen, a tag character.
INVISIBLE = ("\u200b", "\u200d", "\u2060", "\ufeff", "\u00ad", "\U000e0041")


def test_invisible_format_characters_are_shown_escaped() -> None:
    """Every format character (Unicode category Cf) is escaped: 'alice' + a zero-width space
    printed as 'alice' while `query --user alice` does not find it."""
    for char in INVISIBLE:
        shown = printable(f"alice{char}")
        assert char not in shown and shown.startswith("alice\\"), repr(shown)
    assert printable("café ✓ 東京 ☃") == "café ✓ 東京 ☃"  # visible text stays as it is
    every = {chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"}
    assert not every & set(printable("".join(sorted(every))))


def test_a_lookalike_user_is_visible_in_the_query_table(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record of 'alice\\u200b' is not shown as alice's in `coworker audit query`."""
    store = SQLiteStore(db_path)
    fill(store, 1, **{a.USER_ID: "alice"})
    fill(store, 1, **{a.USER_ID: "alice\u200b"})
    store.close()
    url = f"sqlite:///{db_path}"
    assert main(["audit", "query", "--url", url]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 2
    assert "alice\\u200b" in rows[1] and "\u200b" not in rows[1]


def test_json_output_escapes_format_characters_and_stays_exact() -> None:
    """--json lines spell invisible characters as \\u escapes; they decode to the stored value."""
    import json

    from coworker._text import json_text

    value = {"user_id": "alice" + "".join(INVISIBLE)}
    text = json_text(value)
    assert not set(INVISIBLE) & set(text)
    assert json.loads(text) == value


def test_a_correction_with_a_lone_surrogate_is_a_bad_argument(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reason, corrector or value that is not UTF-8 (a shell argument in another encoding)
    is refused as that argument, nothing appended; it was reported as 'audit store ... ' error
    (AuditUnavailable) after reaching the store."""
    from coworker.audit.correction import correct
    from coworker.exceptions import ConfigError

    store = SQLiteStore(db_path)
    fill(store, 1)
    for kwargs in (
        {"reason": "bad\udcff"},
        {"reason": "ok", "by": "x\ud800"},
        {"reason": "ok", "doctype": "Inv\udfff"},
    ):
        reason = kwargs.pop("reason")
        with pytest.raises(ConfigError, match="not UTF-8"):
            correct(1, reason, store=store, **kwargs)
    assert store.head().seq == 1
    store.close()
    url = f"sqlite:///{db_path}"
    capsys.readouterr()
    assert main(["audit", "correct", "1", "--url", url, "--reason", "bad\udcff"]) == 2
    assert "reason" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["checkpoint", "--key", "{key}"],
        ["prove", "1"],
        ["prove", "--consistency", "1", "2"],
        ["export", "--out", "{tmp}/bundle", "--key", "{key}.pub"],
        ["correct", "1", "--reason", "typo"],
    ],
    ids=["checkpoint", "prove", "prove-consistency", "export", "correct"],
)
def test_a_mistyped_store_path_is_exit_2_and_creates_nothing(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """checkpoint, prove, export and correct on a SQLite path that does not exist fail with
    exit 2 and leave no directory behind (checkpoint made one and signed a tree of 0)."""
    key = tmp_path / "log.key"
    assert main(["audit", "keygen", "--name", "audit.example.com/typo", "--out", str(key)]) == 0
    missing = tmp_path / "typo-dir" / "audit.db"
    args = [part.format(key=key, tmp=tmp_path) for part in command]
    capsys.readouterr()
    assert main(["audit", *args, "--url", f"sqlite:///{missing}"]) == 2
    assert not missing.parent.exists()
    assert "audit.db" in capsys.readouterr().err


def test_export_says_which_selected_records_the_checkpoint_does_not_cover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Records selected but appended after the checkpoint are named on stderr (they were left
    out of the bundle without a word)."""
    key = tmp_path / "log.key"
    assert main(["audit", "keygen", "--name", "audit.example.com/late", "--out", str(key)]) == 0
    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    fill(store, 3, **{a.USER_ID: "alice"})
    store.close()
    url = f"sqlite:///{db}"
    assert main(["audit", "checkpoint", "--url", url, "--key", str(key)]) == 0
    store = SQLiteStore(db)
    fill(store, 2, **{a.USER_ID: "alice"})
    store.close()
    capsys.readouterr()
    out = tmp_path / "b"
    args = ["audit", "export", "--url", url, "--key", f"{key}.pub", "--out", str(out)]
    assert main([*args, "--user", "alice"]) == 0
    captured = capsys.readouterr()
    assert "exported 3 records" in captured.out
    assert "2 selected record(s) after the checkpoint's tree of 3 are NOT in the bundle" in (
        captured.err
    )
