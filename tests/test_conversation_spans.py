"""Conversation turns as spans: one trace per turn, breaks as span links (real SDK)."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import coworker
from coworker import attributes as attr
from tests.test_flow_spans import named, one, tree


@coworker.run(operation="select", doctype="Invoice")
def find() -> None:
    pass


@coworker.run(operation="update", doctype="Invoice")
def update() -> None:
    find()


AGENT = {"agent_name": "billing-assistant", "session": "s-1"}


def test_each_turn_is_one_trace_with_an_invoke_agent_span(spans: Any) -> None:
    """A turn an agent handles is an ``invoke_agent {agent name}`` AGENT span, the root of its
    own trace, its runs (and their children) nested under it."""
    chat = coworker.conversation("chat-42")
    with coworker.acting_as("user-456", "agent-789", **AGENT):
        with chat.turn(message_id="msg-1"):
            find()
        with chat.turn():
            update()
    assert tree(spans) == [
        ("invoke_agent billing-assistant", [("select Invoice", [])]),
        ("invoke_agent billing-assistant", [("update Invoice", [("select Invoice", [])])]),
    ]
    first, second = sorted(
        named(spans, "invoke_agent billing-assistant"), key=lambda s: s.start_time
    )
    assert first.context.trace_id != second.context.trace_id
    assert first.parent is None and second.parent is None
    a = first.attributes
    assert a[attr.GEN_AI_OPERATION_NAME] == "invoke_agent"
    assert a[attr.OPENINFERENCE_SPAN_KIND] == "AGENT"
    assert a[attr.SPAN_TYPE] == "turn"
    assert a[attr.CONVERSATION_ID] == "chat-42"
    assert (a[attr.USER_ID], a[attr.SESSION_ID]) == ("user-456", "s-1")
    assert (a[attr.AGENT_ID], a[attr.AGENT_NAME]) == ("agent-789", "billing-assistant")
    assert (a[attr.TURN_NUMBER], a[attr.TURN_MESSAGE_ID]) == (1, "msg-1")
    assert (a[attr.FLOW_TYPE], a[attr.FLOW_ID]) == ("ai-conversation", chat.flow.id)
    assert second.attributes[attr.TURN_NUMBER] == 2
    assert attr.TURN_MESSAGE_ID not in second.attributes
    assert attr.AUDITED not in a


def test_all_turns_are_found_by_conversation_and_session_id(spans: Any) -> None:
    """Every turn span (across a break) carries ``gen_ai.conversation.id`` and ``session.id``:
    a trace backend finds the whole conversation with either."""
    chat = coworker.conversation("chat-7")
    with coworker.acting_as("u", "a", **AGENT):
        for n in range(3):
            with chat.turn():
                if n == 2:
                    coworker.break_flow("topic-change")
                find()
    turns = [s for s in spans.get_finished_spans() if attr.TURN_NUMBER in s.attributes]
    assert len(turns) == 4  # three turns; the third broke into a second span
    assert {s.attributes[attr.CONVERSATION_ID] for s in turns} == {"chat-7"}
    assert {s.attributes[attr.SESSION_ID] for s in turns} == {"s-1"}
    assert sorted(s.attributes[attr.TURN_NUMBER] for s in turns) == [1, 2, 3, 3]


def test_turn_without_an_agent_is_a_chain_span(spans: Any) -> None:
    """No agent acting: the turn span is ``conversation turn``, OpenInference CHAIN, with no
    ``gen_ai.operation.name``."""
    chat = coworker.conversation("chat-1")
    with coworker.acting_as("u"), chat.turn():
        find()
    turn = one(spans, "conversation turn")
    assert turn.attributes[attr.OPENINFERENCE_SPAN_KIND] == "CHAIN"
    assert attr.GEN_AI_OPERATION_NAME not in turn.attributes
    assert turn.attributes[attr.USER_ID] == "u"


def test_agent_without_a_name_is_plain_invoke_agent(spans: Any) -> None:
    """The spec's name without ``gen_ai.agent.name``: ``invoke_agent``."""
    chat = coworker.conversation("chat-1")
    with coworker.acting_as("u", "agent-1"), chat.turn():
        find()
    assert one(spans, "invoke_agent").attributes[attr.AGENT_ID] == "agent-1"


def _break_link(span: Any) -> Any:
    (link,) = span.links
    return link


def test_break_inside_a_turn_links_the_new_flow_to_the_old(spans: Any) -> None:
    """``break_flow`` inside a turn ends the old flow's turn span (``flow.next.id``) and
    starts the new flow's, whose link points at it and carries the reason; the rest of the
    turn's runs nest under the new span, in the new flow."""
    chat = coworker.conversation("chat-42")
    with coworker.acting_as("user-456", "agent-789", **AGENT):
        with chat.turn():
            find()
        old = chat.flow
        with chat.turn():
            find()  # still the old flow
            new = coworker.break_flow("topic-change")
            update()
    turn2 = sorted(
        (s for s in spans.get_finished_spans() if s.attributes.get(attr.TURN_NUMBER) == 2),
        key=lambda s: s.start_time,
    )
    old_span, new_span = turn2
    assert old_span.attributes[attr.FLOW_ID] == old.id
    assert old_span.attributes[attr.FLOW_NEXT_ID] == new.id
    assert new_span.attributes[attr.FLOW_ID] == new.id
    assert new_span.attributes[attr.FLOW_PREVIOUS_ID] == old.id
    assert new_span.attributes[attr.FLOW_BREAK_REASON] == "topic-change"
    link = _break_link(new_span)
    assert link.context.span_id == old_span.context.span_id
    assert link.context.trace_id == old_span.context.trace_id
    assert dict(link.attributes) == {
        attr.LINK_TYPE: "flow-break",
        attr.FLOW_BREAK_REASON: "topic-change",
        attr.FLOW_PREVIOUS_ID: old.id,
    }
    assert new_span.context.trace_id != old_span.context.trace_id  # a new intent, a new trace
    (after,) = [s for s in named(spans, "update Invoice")]
    assert after.parent.span_id == new_span.context.span_id
    assert after.attributes[attr.FLOW_ID] == new.id
    before = [s for s in named(spans, "select Invoice") if s.attributes[attr.FLOW_ID] == old.id]
    assert {s.parent.span_id for s in before if s.start_time > old_span.start_time} == {
        old_span.context.span_id
    }


def test_break_between_turns_links_the_next_turn(spans: Any) -> None:
    """``chat.break_flow()`` outside any turn: the next turn (the new flow's first span)
    links to the old flow's last turn span."""
    chat = coworker.conversation("chat-9")
    with coworker.acting_as("u", "a", **AGENT):
        with chat.turn():
            find()
        last_old = chat.flow
        chat.break_flow("explicit-reset")
        with chat.turn():
            find()
        with chat.turn():
            find()  # a later turn of the same new flow: no link
    t1, t2, t3 = sorted(named(spans, "invoke_agent billing-assistant"), key=lambda s: s.start_time)
    link = _break_link(t2)
    assert link.context.span_id == t1.context.span_id
    assert link.attributes[attr.FLOW_BREAK_REASON] == "explicit-reset"
    assert link.attributes[attr.FLOW_PREVIOUS_ID] == last_old.id
    assert t3.links == ()
    assert t2.attributes[attr.FLOW_ID] == t3.attributes[attr.FLOW_ID] != last_old.id


def test_new_session_break_sets_session_previous_id(spans: Any) -> None:
    """A session change breaks the flow at the next run: the new flow's span has
    ``session.id`` = the new session, ``session.previous_id`` = the old one, and a
    ``new-session`` link."""
    chat = coworker.conversation("chat-3")
    with coworker.acting_as("u", "a", agent_name="bot", session="s-1"), chat.turn():
        find()
    with coworker.acting_as("u", "a", agent_name="bot", session="s-2"), chat.turn():
        find()
    first, stale, fresh = sorted(named(spans, "invoke_agent bot"), key=lambda s: s.start_time)
    assert fresh.attributes[attr.SESSION_ID] == "s-2"
    assert fresh.attributes[attr.SESSION_PREVIOUS_ID] == "s-1"
    assert _break_link(fresh).attributes[attr.FLOW_BREAK_REASON] == "new-session"
    assert _break_link(fresh).context.span_id == stale.context.span_id
    # The turn entered in the old flow before the first run broke it: ended, empty, linked.
    assert stale.attributes[attr.FLOW_NEXT_ID] == fresh.attributes[attr.FLOW_ID]
    assert attr.SESSION_PREVIOUS_ID not in first.attributes
    (run,) = [s for s in named(spans, "select Invoice") if s.attributes[attr.SESSION_ID] == "s-2"]
    assert run.parent.span_id == fresh.context.span_id


def test_idle_timeout_break_links_with_reason_timeout(
    spans: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle conversation breaks at the next turn's first run (reason ``timeout``): that
    run nests under the new flow's span, linked to the old flow's."""
    import sys

    flow_module = sys.modules["coworker.flow"]  # the module (coworker.flow is the function)
    now = [1000.0]
    monkeypatch.setattr(flow_module, "_monotonic", lambda: now[0])
    chat = coworker.conversation("chat-5", idle_timeout=60)
    with coworker.acting_as("u", "a", **AGENT):
        with chat.turn():
            find()
        now[0] += 61
        with chat.turn():
            find()
    turns = sorted(named(spans, "invoke_agent billing-assistant"), key=lambda s: s.start_time)
    assert len(turns) == 3
    assert _break_link(turns[2]).attributes[attr.FLOW_BREAK_REASON] == "timeout"
    last_run = max(named(spans, "select Invoice"), key=lambda s: s.start_time)
    assert last_run.parent.span_id == turns[2].context.span_id


def test_turn_failing_marks_its_span_error(spans: Any) -> None:
    """An exception out of a turn: its span is ERROR with error.type."""
    chat = coworker.conversation("chat-1")
    with pytest.raises(ValueError), coworker.acting_as("u", "a", **AGENT), chat.turn():
        raise ValueError("bad")
    turn = one(spans, "invoke_agent billing-assistant")
    assert turn.status.status_code is StatusCode.ERROR
    assert turn.attributes[attr.ERROR_TYPE] == "ValueError"


def test_break_inside_a_workflow_step_interrupts_it_and_links(spans: Any) -> None:
    """``break_flow()`` inside a step of a flow block: the old flow's span and the open step's
    end (the step ``interrupted``), the new flow's span starts linked; what follows in the
    block, the rest of the step included, nests under the new flow's span."""
    with coworker.flow("batch-job") as f, coworker.step("load"):
        find()
        new = coworker.break_flow("task-completed")
        update()
    with_old = one(spans, "step load")
    assert with_old.attributes[attr.STEP_OUTCOME] == "interrupted"
    old_root, new_root = sorted(named(spans, "flow batch-job"), key=lambda s: s.start_time)
    assert old_root.attributes[attr.FLOW_ID] == f.id
    assert old_root.attributes[attr.FLOW_NEXT_ID] == new.id
    assert _break_link(new_root).context.span_id == old_root.context.span_id
    (after,) = named(spans, "update Invoice")
    assert after.parent.span_id == new_root.context.span_id
    assert after.attributes[attr.FLOW_ID] == new.id


def test_break_inside_a_run_redirects_the_next_root_run(spans: Any) -> None:
    """A run that calls ``break_flow()`` stays under the old flow's span; the next root run
    of the block goes under the new flow's span (the stale one is not reused)."""

    @coworker.run(operation="select", doctype="Topic")
    def decide() -> None:
        coworker.break_flow("topic-change")

    chat = coworker.conversation("chat-11")
    with coworker.acting_as("u", "a", **AGENT), chat.turn():
        decide()
        find()
    old_turn, new_turn = sorted(
        named(spans, "invoke_agent billing-assistant"), key=lambda s: s.start_time
    )
    assert one(spans, "select Topic").parent.span_id == old_turn.context.span_id
    assert one(spans, "select Invoice").parent.span_id == new_turn.context.span_id
