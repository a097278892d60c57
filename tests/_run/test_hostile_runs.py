"""A hostile body, caller or thread cannot forge, hide or mislabel a run's own audit record."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace

import coworker
from coworker import _setup
from coworker import attributes as attr


def _records() -> list[dict[str, Any]]:
    coworker.force_flush()
    store = _setup.audit_store()
    records = [json.loads(r.body) for r in store.iter_from(1)]
    return [r for r in records if r["category"] != "flow"]  # run records (not flow events)


@pytest.fixture
def audited(tmp_path: Path, spans: Any) -> Any:
    coworker.configure(audit=f"sqlite:///{tmp_path / 'audit.db'}", metrics=False)
    return spans


def test_body_cannot_rewrite_its_own_record(audited: Any) -> None:
    """Attributes the body sets on its own span (user, audit flag, operation, run ids, name)
    do not reach its audit record: the record says what coworker checked at the start."""

    @coworker.run(operation="delete", doctype="Invoice")
    def delete(invoice_id: str) -> None:
        span = trace.get_current_span()
        span.set_attribute(attr.USER_ID, "someone-else")
        span.set_attribute(attr.AUDITED, False)
        span.set_attribute(attr.AUDIT_CATEGORY, "nothing")
        span.set_attribute(attr.OPERATION, "select")
        span.set_attribute(attr.DOCTYPE, "Note")
        span.set_attribute(attr.RUN_ID, "forged")
        span.set_attribute(attr.RUN_PARENT_ID, "forged-parent")
        span.update_name("select Note")

    with coworker.acting_as("alice", "bot-1"), coworker.flow("workflow", "f-1"):
        delete("INV-1")
    (record,) = _records()
    assert record["user_id"] == "alice" and record["agent_id"] == "bot-1"
    assert (record["category"], record["operation"], record["doctype"]) == (
        "state-change",
        "delete",
        "Invoice",
    )
    assert record["name"] == "delete Invoice" and record["flow_id"] == "f-1"
    assert record["run_id"] != "forged" and record["parent_run_id"] is None


def test_run_set_attribute_refuses_reserved_keys(audited: Any) -> None:
    """Run.set_attribute says no to identity/audit keys instead of silently forging them."""
    with coworker.run("batch", operation="update", doctype="Invoice") as r:
        with pytest.raises(ValueError, match="reserved"):
            r.set_attribute(attr.USER_ID, "root")
        with pytest.raises(ValueError, match="reserved"):
            r.set_attribute(attr.AUDITED, False)
        r.set_attribute("invoice.count", 3)
    (record,) = _records()
    assert record["user_id"] is None and record["category"] == "state-change"


def test_threads_keep_their_own_identity_in_the_trail(audited: Any) -> None:
    """Many threads acting as different users at once: each record names its own user."""

    @coworker.run(operation="update", doctype="Invoice")
    def update(who: str) -> str:
        return who

    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for _ in range(50):
            with coworker.acting_as(f"user-{n}"):
                update(f"user-{n}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = audited.get_finished_spans()
    assert len(spans) == 400
    for s in spans:
        assert s.attributes[attr.USER_ID] == s.attributes.get(attr.USER_ID)
    records = _records()
    assert len(records) == 400
    assert sorted(r["user_id"] for r in records) == sorted(
        f"user-{n}" for n in range(8) for _ in range(50)
    )


def test_tasks_cannot_leak_identity_into_each_other(audited: Any) -> None:
    """An asyncio task that switches identity mid-await does not change its sibling's."""

    @coworker.run(operation="update", doctype="Invoice")
    async def update(pause: asyncio.Event, resume: asyncio.Event) -> str | None:
        pause.set()
        await resume.wait()
        ident = coworker.current_identity()
        return ident.user_id if ident else None

    async def main() -> list[str | None]:
        paused, resume = asyncio.Event(), asyncio.Event()

        async def victim() -> str | None:
            with coworker.acting_as("alice"):
                return await update(paused, resume)

        async def attacker() -> None:
            await paused.wait()
            with coworker.acting_as("root"):
                resume.set()
                await asyncio.sleep(0)

        results = await asyncio.gather(victim(), attacker())
        return [results[0]]

    assert asyncio.run(main()) == ["alice"]
    assert [r["user_id"] for r in _records()] == ["alice"]


def test_generator_body_cannot_rewrite_its_record(audited: Any) -> None:
    """A decorated generator that sets user.id between items keeps its own identity."""

    @coworker.run(operation="import", doctype="Invoice")
    def rows() -> Any:
        yield 1
        trace.get_current_span().set_attribute(attr.USER_ID, "root")
        yield 2

    with coworker.acting_as("alice"):
        assert list(rows()) == [1, 2]
    assert [r["user_id"] for r in _records()] == ["alice"]


def test_body_cannot_forge_a_record(audited: Any) -> None:
    """A read that marks its own span audited, as root, leaves no forged record."""

    @coworker.run(operation="select", doctype="Invoice")
    def read() -> None:
        span = trace.get_current_span()
        span.set_attribute(attr.AUDITED, True)
        span.set_attribute(attr.AUDIT_CATEGORY, "state-change")
        span.set_attribute(attr.USER_ID, "root")

    with coworker.acting_as("alice"):
        read()
    assert _records() == []


def test_blocks_exited_out_of_order_still_write_their_records(audited: Any) -> None:
    """Two run blocks exited in the wrong order: both spans end, both records are written."""
    outer = coworker.run("outer", operation="update", doctype="A")
    inner = coworker.run("inner", operation="update", doctype="B")
    before = coworker.current_run()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # out of order
    inner.__exit__(None, None, None)
    from coworker._scope import EMPTY_SCOPE, SCOPE

    SCOPE.set(EMPTY_SCOPE)  # the interleaving itself leaves the context off: reset it
    otel_context.attach(otel_context.Context())
    assert before is None
    assert sorted(r["doctype"] for r in _records()) == ["A", "B"]
    assert len(audited.get_finished_spans()) == 2


def test_abandoned_generator_is_recorded_at_exit(tmp_path: Path) -> None:
    """A decorated generator that ran part of its body and is still referenced at interpreter
    exit gets its record (as a failure) before the audit trail closes."""
    import subprocess
    import sys
    import textwrap

    db = tmp_path / "audit.db"
    code = textwrap.dedent(
        f"""
        import asyncio, coworker
        coworker.configure(audit="sqlite:///{db}", metrics=False)

        @coworker.run(operation="import", doctype="Invoice")
        def rows():
            yield from range(10)

        @coworker.run(operation="import", doctype="Payment")
        async def arows():
            for i in range(10):
                yield i

        @coworker.run(operation="import", doctype="Refund")
        async def refunds():
            for i in range(10):
                yield i

        KEEP = [rows()]
        next(KEEP[0])
        async def main():
            g = arows()
            KEEP.append(g)
            await g.__anext__()
        asyncio.run(main())  # its shutdown aclose()s arows(), as it does any async generator
        KEEP.append(refunds())
        try:  # one step without an event loop: nothing will ever close this one
            KEEP[-1].__anext__().send(None)
        except StopIteration:
            pass
        """
    )
    subprocess.run(
        [sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, check=True, timeout=60
    )
    from coworker.audit.store_sqlite import SQLiteStore

    store = SQLiteStore(db, readonly=True)
    got = sorted((r.fields()["doctype"], r.fields()["outcome"]) for r in store.iter_from(1))
    store.close()
    # Payment was closed early by asyncio.run's shutdown (like a `break`: not a failure).
    assert got == [("Invoice", "RuntimeError"), ("Payment", "ok"), ("Refund", "RuntimeError")]
