"""Flows, steps, workflows, conversations, breaks, identity, and no context leaks."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import pytest

import coworker
from coworker import attributes as attr


@coworker.run(operation="select", doctype="Item")
def select_item() -> str | None:
    return coworker.current_step()


@coworker.run(operation="update", doctype="Item")
def update_item() -> None:
    select_item()


def _attrs(spans: Any) -> list[dict[str, Any]]:
    return [dict(s.attributes) for s in spans.get_finished_spans()]


@pytest.mark.usefixtures("flow_spans_off")
def test_flow_block_sets_type_id_metadata_and_restores(spans: Any) -> None:
    """Runs in a flow carry flow.type/flow.id/metadata; after the block nothing remains."""
    with coworker.flow("batch-job", "nightly-7", source="cron") as f:
        assert coworker.current_flow() is f
        update_item()
    assert coworker.current_flow() is None
    select_item()
    a = _attrs(spans)
    assert a[0][attr.FLOW_TYPE] == "batch-job" and a[0][attr.FLOW_ID] == "nightly-7"
    assert a[0][attr.FLOW_METADATA_PREFIX + "source"] == "cron"
    assert a[1][attr.FLOW_ID] == "nightly-7"  # the parent (update) ends after its child
    assert attr.FLOW_ID not in a[2]


def test_flow_id_generated_and_type_validated() -> None:
    """A flow gets a UUID id when none is given; a bad type is a ValueError."""
    with coworker.flow("api-request") as f:
        assert len(f.id) == 36
    with pytest.raises(ValueError, match="lower-case"):
        coworker.flow("Bad Type")


@pytest.mark.usefixtures("flow_spans_off")
def test_workflow_steps_and_unknown_step(spans: Any) -> None:
    """Workflow definitions validate step ids at once; runs carry definition and step."""
    orders = coworker.workflow("order-processing", steps=["validate", "payment", "ship"])
    with orders.start() as f:
        with f.step("payment"):
            update_item()
        with pytest.raises(ValueError, match="not in workflow"):
            f.step("refund")
        with pytest.raises(ValueError, match="not in workflow"):
            coworker.step("refund")

        @coworker.run(step="teleport")
        def bad_step() -> None: ...

        with pytest.raises(ValueError, match="teleport"):
            bad_step()
    a = _attrs(spans)
    assert {x[attr.STEP_ID] for x in a} == {"payment"}
    assert {x[attr.FLOW_DEFINITION_ID] for x in a} == {"order-processing"}
    assert {x[attr.FLOW_TYPE] for x in a} == {"workflow"}
    with pytest.raises(ValueError, match="twice"):
        coworker.workflow("w", steps=["a", "a"])


@pytest.mark.usefixtures("flow_spans_off")
def test_run_step_shorthand(spans: Any) -> None:
    """@run(step=...) sets step.id for that run and its children."""

    @coworker.run(step="ship")
    def ship() -> str | None:
        return select_item()

    with coworker.flow("workflow"):
        assert ship() == "ship"
    assert {x[attr.STEP_ID] for x in _attrs(spans)} == {"ship"}


@pytest.mark.usefixtures("flow_spans_off")
def test_conversation_turns_assign_unique_step_ids_and_break(spans: Any) -> None:
    """Conversation runs get turn-N-op-K step ids; a topic change breaks to a linked flow."""
    chat = coworker.conversation("chat-1")
    with coworker.acting_as("user-456", "agent-789", agent_name="helper"):
        with chat.turn(message_id="m1"):
            first_flow = coworker.current_flow()
            assert first_flow is not None
            select_item()
            select_item()
            update_item()  # its child select inherits the update's step
        with chat.turn():
            select_item()
            new = coworker.break_flow("topic-change")
            select_item()
        with chat.turn():
            select_item()
    a = _attrs(spans)
    steps = [x[attr.STEP_ID] for x in a]
    assert steps == [
        "turn-1-select-1",
        "turn-1-select-2",
        "turn-1-update-1",
        "turn-1-update-1",
        "turn-2-select-1",
        "turn-2-select-1",
        "turn-3-select-1",
    ]
    assert all(x[attr.CONVERSATION_ID] == "chat-1" for x in a)
    assert all(x[attr.FLOW_TYPE] == "ai-conversation" for x in a)
    assert [x[attr.FLOW_ID] for x in a[:5]] == [first_flow.id] * 5
    assert a[5][attr.FLOW_ID] == new.id == a[6][attr.FLOW_ID]
    assert a[5][attr.FLOW_PREVIOUS_ID] == first_flow.id
    assert a[5][attr.FLOW_BREAK_REASON] == "topic-change"
    assert all(x[attr.AGENT_ID] == "agent-789" and x[attr.USER_ID] == "user-456" for x in a)
    assert all(x[attr.GEN_AI_OPERATION_NAME] == "execute_tool" for x in a)


def test_break_flow_needs_a_flow_and_scopes_to_block(spans: Any) -> None:
    """break_flow outside a flow is an error; inside it lasts until the block ends."""
    with pytest.raises(coworker.CoworkerError, match="needs a current flow"):
        coworker.break_flow("explicit-reset")
    with coworker.flow("workflow", "w1"):
        broken = coworker.break_flow("task-completed", type="api-request")
        assert coworker.current_flow() is broken
        assert broken.type == "api-request" and broken.previous_id == "w1"
    assert coworker.current_flow() is None


@pytest.mark.usefixtures("flow_spans_off")
def test_idle_timeout_breaks_flow_on_next_run(spans: Any) -> None:
    """A flow idle longer than its timeout breaks with reason 'timeout' on the next run."""
    with coworker.flow("ai-conversation", "c1", idle_timeout=0.05) as f:
        select_item()
        time.sleep(0.08)
        select_item()
        select_item()
        assert coworker.current_flow().previous_id == f.id
    a = _attrs(spans)
    assert a[0][attr.FLOW_ID] == "c1"
    assert a[1][attr.FLOW_BREAK_REASON] == "timeout"
    assert a[1][attr.FLOW_ID] == a[2][attr.FLOW_ID] != "c1"


def test_configured_idle_timeout_applies_to_conversations(spans: Any, monkeypatch: Any) -> None:
    """COWORKER_FLOW_IDLE_TIMEOUT sets the default for ai-conversation flows only."""
    monkeypatch.setenv("COWORKER_FLOW_IDLE_TIMEOUT", "12")
    from coworker._state import SETTINGS

    SETTINGS.reset()
    assert coworker.conversation("c").flow.idle_timeout == 12
    with coworker.flow("workflow") as f:
        assert f.idle_timeout is None


@pytest.mark.usefixtures("flow_spans_off")
def test_new_session_breaks_flow(spans: Any) -> None:
    """A different session in the same flow breaks it with reason 'new-session'."""
    chat = coworker.conversation("c2")
    with coworker.acting_as("u", session="s1"), chat.turn():
        select_item()
    with coworker.acting_as("u", session="s2"), chat.turn():
        select_item()
    a = _attrs(spans)
    assert a[1][attr.FLOW_BREAK_REASON] == "new-session"
    assert a[1][attr.FLOW_PREVIOUS_ID] == a[0][attr.FLOW_ID]
    assert a[1][attr.SESSION_ID] == "s2"


def test_identity_nesting_and_restore(spans: Any) -> None:
    """acting_as nests, replaces, and restores; siblings never inherit an agent."""
    with coworker.acting_as(coworker.User("u1"), coworker.Agent("a1", "Bot")):
        select_item()
        with coworker.acting_as("u2"):
            select_item()
        select_item()
    select_item()
    a = _attrs(spans)
    assert (a[0][attr.USER_ID], a[0][attr.AGENT_ID], a[0][attr.AGENT_NAME]) == ("u1", "a1", "Bot")
    assert a[1][attr.USER_ID] == "u2" and attr.AGENT_ID not in a[1]
    assert a[2][attr.AGENT_ID] == "a1"
    assert attr.USER_ID not in a[3] and attr.AGENT_ID not in a[3]
    with pytest.raises(TypeError):
        coworker.acting_as(42)  # type: ignore[arg-type]


def test_sibling_run_does_not_inherit_finished_runs_context(spans: Any) -> None:
    """After a run that entered a step and identity ends, the next run sees none of it."""

    @coworker.run
    def noisy() -> None:
        # Blocks opened inside a run end with it.
        with coworker.step("inner"), coworker.acting_as("intruder", "rogue-agent"):
            select_item()

    with coworker.flow("workflow"):
        noisy()
        select_item()
    a = _attrs(spans)
    last = a[-1]
    assert attr.STEP_ID not in last and attr.AGENT_ID not in last and attr.USER_ID not in last
    assert attr.RUN_PARENT_ID not in last


@pytest.mark.usefixtures("flow_spans_off")
def test_context_follows_asyncio_tasks(spans: Any) -> None:
    """Flow, step and identity follow the call into asyncio tasks."""

    @coworker.run(operation="select", doctype="Item")
    async def fetch(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def main() -> None:
        with coworker.flow("api-request", "req-1"), coworker.acting_as("u9"):
            with coworker.step("gather"):
                await asyncio.gather(*(asyncio.create_task(fetch(i)) for i in range(3)))

    asyncio.run(main())
    a = _attrs(spans)
    assert len(a) == 3
    assert all(x[attr.FLOW_ID] == "req-1" and x[attr.STEP_ID] == "gather" for x in a)
    assert all(x[attr.USER_ID] == "u9" for x in a)


@pytest.mark.usefixtures("flow_spans_off")
def test_async_blocks(spans: Any) -> None:
    """flow/step/acting_as work with `async with`."""

    async def main() -> None:
        async with coworker.flow("api-request", "r2"), coworker.step("s"):
            async with coworker.acting_as("u"):
                select_item()

    asyncio.run(main())
    (a,) = _attrs(spans)
    assert (a[attr.FLOW_ID], a[attr.STEP_ID], a[attr.USER_ID]) == ("r2", "s", "u")


@pytest.mark.usefixtures("flow_spans_off")
def test_step_counters_are_bounded_by_live_turns(spans: Any) -> None:
    """100,000 turns of one conversation, each with a run: no per-turn counter is kept."""
    chat = coworker.conversation("long-chat")
    flow = chat.flow
    for i in range(100_000):
        with chat.turn():
            select_item()
        if i % 10_000 == 0:
            spans.clear()
    spans.clear()
    assert len(flow._counters) == 0  # only runs outside any turn count here
    gc.collect()
    assert not any(type(o).__name__ == "_Turn" for o in gc.get_objects())
    with chat.turn():
        select_item()
        select_item()
    steps = [s.attributes[attr.STEP_ID] for s in spans.get_finished_spans()]
    assert steps == ["turn-100001-select-1", "turn-100001-select-2"]


@pytest.mark.usefixtures("flow_spans_off")
def test_concurrent_turns_get_distinct_numbers(spans: Any) -> None:
    """Turns started from many threads at once never share a number (nor step ids)."""
    chat = coworker.conversation("busy-chat")
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(200):
            with chat.turn():
                select_item()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = [s.attributes[attr.STEP_ID] for s in spans.get_finished_spans()]
    assert len(steps) == 1600 == len(set(steps))
    assert chat.turns == 1600
