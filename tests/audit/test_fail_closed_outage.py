"""Fail-closed mode with a PostgreSQL store whose server is down: intents are spooled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import coworker
from coworker import attributes as attr
from coworker.audit.spool import Spool


def test_fail_closed_with_server_down_spools_intent_and_outcome(tmp_path: Path, spans: Any) -> None:
    """The intent is durable in the local spool, so the run executes; nothing is lost."""
    spool = tmp_path / "spool.db"
    # Port 1 on loopback refuses connections: a PostgreSQL outage, without touching the
    # shared server.
    url = f"postgresql://postgres@127.0.0.1:1/coworker?spool={spool}&connect_timeout=1"
    coworker.configure(audit=url, fail_closed=True, metrics=False)
    ran = []

    @coworker.run(operation="update", doctype="Invoice")
    def update() -> None:
        ran.append(True)

    update()
    coworker.shutdown()
    assert ran == [True]
    (span,) = spans.get_finished_spans()
    assert attr.AUDIT_INTENT_SEQ not in span.attributes  # no seq until shipped
    status = Spool(spool).status()
    assert status.depth == 2  # the intent and the outcome, in order


def test_spooled_records_are_not_retried_twice_under_log_policy(
    tmp_path: Path, spans: Any, caplog: Any
) -> None:
    """A spooled (durable, unsealed) record is not mistaken for a failure and re-queued."""
    spool = tmp_path / "spool.db"
    url = f"postgresql://postgres@127.0.0.1:1/coworker?spool={spool}&connect_timeout=1"
    coworker.configure(audit=url, audit_failure="log", metrics=False)

    @coworker.run(operation="delete", doctype="Task")
    def delete() -> None: ...

    delete()
    delete()
    assert coworker.force_flush()
    coworker.shutdown()
    assert Spool(spool).status().depth == 2
    assert "queued for retry" not in caplog.text
