"""The attributes= option: callables and static dicts cannot forge what coworker sets."""

from __future__ import annotations

from typing import Any

import coworker
from coworker import attributes as attr


def test_attributes_callable_none_doctype_is_ignored(spans: Any) -> None:
    """A None operation/doctype from the callable is skipped like any other None value."""

    @coworker.run(operation="update", attributes=lambda a: {"doctype": a["doctype"]})
    def update(doctype: str | None = None) -> None:
        pass

    update()
    (span,) = spans.get_finished_spans()
    assert attr.DOCTYPE not in span.attributes
    assert "None" not in span.name


def test_attributes_callable_returning_non_mapping_does_not_break_call(spans: Any) -> None:
    """A wrong return type from the attributes callable is logged and ignored."""

    @coworker.run(attributes=lambda a: [("k", 1)])
    def f() -> int:
        return 1

    assert f() == 1
    assert len(spans.get_finished_spans()) == 1


def test_attributes_cannot_forge_identity_or_flow(spans: Any) -> None:
    """Reserved keys (user.id, gen_ai.agent.id, flow.id) come only from coworker's context."""

    @coworker.run(operation="update", doctype="Invoice", attributes=lambda a: dict(a["extra"]))
    def update(extra: dict) -> None:
        pass

    forged = {attr.USER_ID: "mallory", attr.AGENT_ID: "trusted-agent", attr.FLOW_ID: "f"}
    update(forged)
    with coworker.acting_as("alice"):
        update(forged)
    anonymous, alice = (s.attributes for s in spans.get_finished_spans())
    assert attr.USER_ID not in anonymous and attr.FLOW_ID not in anonymous
    assert alice[attr.USER_ID] == "alice"
    assert attr.AGENT_ID not in alice


def test_static_attributes_cannot_forge_identity(spans: Any) -> None:
    """Reserved keys in a static attributes= dict are refused at decoration or ignored."""

    def fn() -> None:
        pass

    try:
        traced = coworker.run(attributes={attr.USER_ID: "svc-admin"})(fn)
    except (TypeError, ValueError):
        return
    traced()
    (span,) = spans.get_finished_spans()
    assert attr.USER_ID not in span.attributes
