"""coworker._state.reset(): one reset for all process-wide state."""

from __future__ import annotations

from pathlib import Path

import coworker
from coworker import _flow_events, _setup, _state
from coworker._state import SETTINGS
from coworker.audit.store_sqlite import SQLiteStore


@coworker.run(operation="create", doctype="Doc")
def create() -> None:
    """An audited state change."""


def test_reset_also_undoes_what_configure_installed(tmp_path: Path) -> None:
    """After reset() no audit pipeline, policy or flow events are left installed: a run
    writes nothing, and configure() afterwards works as in a fresh process."""
    db = tmp_path / "a.db"
    coworker.configure(audit=f"sqlite:///{db}", fail_closed=True)
    create()
    _state.reset()
    assert _setup.audit_store() is None
    assert SETTINGS.audit_gate is None and not SETTINGS.audit_records
    assert _flow_events._writer is None
    create()  # recorded by nothing now
    store = SQLiteStore(db)
    assert store.count() == 2  # the intent and the outcome of the first run only
    store.close()
    coworker.configure(audit=f"sqlite:///{db}")
    create()
    coworker.shutdown()
    store = SQLiteStore(db)
    assert store.count() == 3
    store.close()
