"""Blocks restore the scope through nested failures and when one object is shared."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import coworker
from coworker import attributes as attr
from coworker._scope import EMPTY_SCOPE, SCOPE


@pytest.mark.usefixtures("flow_spans_off")
def test_exception_through_nested_blocks_restores_everything(spans: Any) -> None:
    """An exception crossing flow/step/identity/run blocks restores each level exactly."""
    orders = coworker.workflow("orders", steps=["pay"])
    with coworker.flow("batch-job", "outer") as outer:
        with pytest.raises(RuntimeError):
            with orders.start("wf"), coworker.step("pay"), coworker.acting_as("u", "a"):
                with coworker.run("inner-block"):
                    raise RuntimeError("x")
        assert coworker.current_flow() is outer
        assert coworker.current_step() is None
        assert coworker.current_identity() is None
        assert coworker.current_run() is None
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.FLOW_ID] == "wf"
    assert span.attributes[attr.STEP_ID] == "pay"


def test_shared_run_options_block_in_concurrent_tasks(spans: Any) -> None:
    """One shared coworker.run(...) block object in concurrent tasks: no crossover."""
    shared = coworker.run("shared-block", operation="select")

    async def request(user: str, delay: float) -> tuple[str, str]:
        with coworker.acting_as(user):
            await asyncio.sleep(delay)
            async with shared as r:
                await asyncio.sleep(0.02)
                assert coworker.current_run() is r
            assert coworker.current_run() is None
            return user, coworker.current_identity().user_id

    async def main() -> list[tuple[str, str]]:
        return await asyncio.gather(request("alice", 0), request("bob", 0.01))

    assert asyncio.run(main()) == [("alice", "alice"), ("bob", "bob")]
    users = sorted(s.attributes[attr.USER_ID] for s in spans.get_finished_spans())
    assert users == ["alice", "bob"]


SYSTEM = coworker.acting_as("system")  # a module-level block, shared like a constant


def test_shared_acting_as_block_in_concurrent_tasks_keeps_each_identity(spans: Any) -> None:
    """Each task gets back its own identity after leaving a shared acting_as block."""

    async def request(user: str, delay: float) -> str | None:
        with coworker.acting_as(user):
            await asyncio.sleep(delay)
            async with SYSTEM:
                await asyncio.sleep(0.02)
            identity = coworker.current_identity()
            return identity.user_id if identity is not None else None

    async def main() -> list[str | None]:
        return await asyncio.gather(request("alice", 0), request("bob", 0.01))

    assert asyncio.run(main()) == ["alice", "bob"]


def test_shared_acting_as_block_nested_restores(spans: Any) -> None:
    """Nested use of one acting_as object restores the caller's identity, no error."""
    try:
        with coworker.acting_as("caller"):
            with SYSTEM:
                with SYSTEM:
                    pass
            assert coworker.current_identity().user_id == "caller"
    finally:
        SCOPE.set(EMPTY_SCOPE)  # undo the leak so the other tests stay meaningful
