"""Conversations: turns and step ids under concurrency."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import coworker
from coworker import attributes as attr
from coworker._scope import EMPTY_SCOPE, SCOPE


@pytest.mark.usefixtures("flow_spans_off")
def test_conversation_turns_from_two_tasks_concurrently(spans: Any) -> None:
    """Concurrent turns in two tasks: unique step ids, a break is shared by the conversation."""
    chat = coworker.conversation("chat-1")

    @coworker.run(operation="select")
    async def lookup() -> str:
        await asyncio.sleep(0.005)
        return coworker.current_flow().id

    async def turn(first: bool) -> list[str]:
        with chat.turn():
            await asyncio.sleep(0 if first else 0.01)
            if first:
                coworker.break_flow("topic-change")
            a = await lookup()
            await asyncio.sleep(0.02)
            return [a, await lookup()]

    async def main() -> list[list[str]]:
        return await asyncio.gather(turn(True), turn(False))

    results = asyncio.run(main())
    assert len({x for pair in results for x in pair}) == 1
    assert chat.flow.id == results[0][0] and chat.flow.break_reason == "topic-change"
    steps = sorted(s.attributes[attr.STEP_ID] for s in spans.get_finished_spans())
    assert steps == ["turn-1-select-1", "turn-1-select-2", "turn-2-select-1", "turn-2-select-2"]
    assert SCOPE.get() is EMPTY_SCOPE


@pytest.mark.usefixtures("flow_spans_off")
def test_conversation_step_ids_unique_across_threads(spans: Any) -> None:
    """Auto step ids stay unique when one turn's runs come from many threads."""
    chat = coworker.conversation("c")

    @coworker.run(operation="select")
    def q() -> None:
        pass

    with chat.turn(), ThreadPoolExecutor(8) as pool:
        fn = coworker.propagate(q)
        for fut in [pool.submit(fn) for _ in range(64)]:
            fut.result()
    steps = [s.attributes[attr.STEP_ID] for s in spans.get_finished_spans()]
    assert len(steps) == len(set(steps)) == 64
