"""Automatic flow breaks: idle timeouts, new sessions, breaks inside nested runs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import coworker
from coworker import attributes as attr


def _short(span: Any) -> str:
    return span.name.rsplit(".", 1)[-1]


def test_break_flow_inside_nested_runs(spans: Any) -> None:
    """A break in a child run: parent keeps the old flow, later runs get the new one."""

    @coworker.run
    def leaf() -> str:
        return coworker.current_flow().id

    @coworker.run
    def breaker() -> str:
        leaf()
        coworker.break_flow("topic-change")
        return leaf()

    @coworker.run
    def parent() -> str:
        return breaker()

    with coworker.flow("ai-conversation", "old") as f:
        new_id = parent()
        assert coworker.current_flow().id == new_id != "old"
        assert leaf() == new_id
    assert f.id == "old"
    assert coworker.current_flow() is None
    s = {}
    for span in spans.get_finished_spans():
        s.setdefault(_short(span), []).append(span.attributes)
    assert s["parent"][0][attr.FLOW_ID] == "old"
    assert s["breaker"][0][attr.FLOW_ID] == "old"
    assert [a[attr.FLOW_ID] for a in s["leaf"]] == ["old", new_id, new_id]
    assert s["leaf"][1][attr.FLOW_PREVIOUS_ID] == "old"
    assert s["leaf"][1][attr.FLOW_BREAK_REASON] == "topic-change"


@pytest.mark.usefixtures("flow_spans_off")
def test_new_session_breaks_once_then_sticks(spans: Any) -> None:
    """A session change breaks the flow once; runs in the new session stay in the new flow."""

    @coworker.run
    def r() -> str:
        return coworker.current_flow().id

    with coworker.flow("ai-conversation", "f0"):
        with coworker.acting_as("u", session="s1"):
            assert r() == "f0"
        with coworker.acting_as("u", session="s2"):
            second = r()
            assert r() == second != "f0"
        with coworker.acting_as("u"):  # no session: no break
            assert r() == second
    reasons = [s.attributes.get(attr.FLOW_BREAK_REASON) for s in spans.get_finished_spans()]
    assert reasons == [None, "new-session", "new-session", "new-session"]


def test_idle_timeout_counts_from_the_end_of_the_last_run(capcoworker: Any) -> None:
    """A run longer than the timeout followed at once by another stays in one flow; the same
    idle time after the run ends breaks it (an injected clock, no sleeping)."""

    @coworker.run
    def long_call() -> None:
        capcoworker.advance(0.15)  # the run takes longer than the idle timeout

    @coworker.run
    def quick() -> None:
        pass

    with coworker.flow("ai-conversation", "f", idle_timeout=0.1):
        long_call()
        quick()
        capcoworker.advance(0.15)  # now the flow really is idle
        quick()
    runs = [s for s in capcoworker.spans() if attr.RUN_ID in s.attributes]  # no flow spans
    ids = [s.attributes[attr.FLOW_ID] for s in runs]
    assert ids[:2] == ["f", "f"] and ids[2] != "f"


@pytest.mark.usefixtures("flow_spans_off")
def test_child_of_a_long_run_stays_in_the_parents_flow(spans: Any) -> None:
    """A run tree never straddles an idle-timeout break."""

    @coworker.run
    def child() -> None:
        pass

    @coworker.run
    def parent() -> None:
        time.sleep(0.15)
        child()

    with coworker.flow("ai-conversation", "f", idle_timeout=0.1):
        parent()
    ids = {_short(s): s.attributes[attr.FLOW_ID] for s in spans.get_finished_spans()}
    assert ids == {"child": "f", "parent": "f"}


def test_in_flight_run_keeps_flow_active(capcoworker: Any) -> None:
    """While any run of the flow is running, the flow is not idle, however long ago that run
    started (an injected clock; the runs are ordered by events, not sleeps)."""
    started, release = threading.Event(), threading.Event()

    @coworker.run
    def long_call() -> None:
        started.set()
        assert release.wait(30)

    @coworker.run
    def quick() -> None:
        pass

    with coworker.flow("ai-conversation", "f", idle_timeout=0.1):
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(coworker.propagate(long_call))
            assert started.wait(30)
            capcoworker.advance(0.15)  # longer than the timeout since anything arrived
            quick()
            release.set()
            fut.result()
    runs = [s for s in capcoworker.spans() if attr.RUN_ID in s.attributes]  # no flow spans
    ids = {_short(s): s.attributes[attr.FLOW_ID] for s in runs}
    assert ids == {"quick": "f", "long_call": "f"}


def test_idle_timeout_breaks_after_real_idleness(capcoworker: Any) -> None:
    """After inactivity the next run breaks with 'timeout', linked to the old flow (an
    injected clock: the runs after the break are in one flow however slow the machine)."""

    @coworker.run
    def quick() -> None:
        pass

    with coworker.flow("batch-job", "f", idle_timeout=0.05):
        quick()
        capcoworker.advance(0.08)
        quick()
        quick()
    a = [s.attributes for s in capcoworker.spans() if attr.RUN_ID in s.attributes]
    assert a[0][attr.FLOW_ID] == "f"
    assert a[1][attr.FLOW_BREAK_REASON] == "timeout" and a[1][attr.FLOW_PREVIOUS_ID] == "f"
    assert a[2][attr.FLOW_ID] == a[1][attr.FLOW_ID]


def test_negative_idle_timeout_is_rejected() -> None:
    """A negative idle_timeout is a ValueError, as in configure()."""
    with pytest.raises(ValueError):
        coworker.flow("batch-job", idle_timeout=-1)


class _Rendezvous:
    """Flow metadata whose str() (called while a broken flow is rebuilt) waits for a second
    thread: a real application object that makes the race in touch() deterministic."""

    def __init__(self) -> None:
        self.armed = False
        self.barrier = threading.Barrier(2, timeout=0.5)

    def __str__(self) -> str:
        if self.armed:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return "rendezvous"


def test_concurrent_runs_after_idle_share_one_new_flow(capcoworker: Any) -> None:
    """Runs racing after an idle period all land in one new flow (an injected clock: no
    second break from a slow thread start)."""
    probe = _Rendezvous()

    @coworker.run
    def quick() -> None:
        pass

    with coworker.flow("batch-job", "f", idle_timeout=0.05, probe=probe):
        quick()
        capcoworker.advance(0.08)
        probe.armed = True
        with ThreadPoolExecutor(2) as pool:
            for fut in [pool.submit(coworker.propagate(quick)) for _ in range(2)]:
                fut.result()
    runs = [s for s in capcoworker.spans() if attr.RUN_ID in s.attributes]
    later = [s.attributes[attr.FLOW_ID] for s in runs[1:]]
    assert len(later) == 2
    assert later[0] == later[1] != "f"  # one new flow, not the idle one
