"""The scope: one ContextVar, frozen snapshots, blocks restoring by token only."""

from __future__ import annotations

import contextvars
from typing import Any

import pytest

import coworker
from coworker._scope import EMPTY_SCOPE, SCOPE


def test_run_left_open_inside_acting_as_keeps_the_outer_flow(spans: Any) -> None:
    """Leaving acting_as puts back the scope it replaced even when a run block inside it was
    never exited: the outer flow does not disappear inside its own block."""

    def scenario() -> tuple[Any, Any, Any]:
        with coworker.flow("batch-job", "outer") as f:
            with coworker.acting_as("u1"):
                coworker.run("left-open").__enter__()  # never exited
            return f, coworker.current_flow(), coworker.current_identity()

    # The open run's span stays current in the context it ran in: use a copy, not ours.
    f, after, identity = contextvars.copy_context().run(scenario)
    assert after is f
    assert identity is None


def test_scope_is_frozen() -> None:
    """A scope snapshot cannot be changed in place (blocks set new ones)."""
    with pytest.raises(AttributeError):
        EMPTY_SCOPE.step = "x"  # type: ignore[misc]


def test_block_exited_out_of_order_restores_what_it_replaced(spans: Any) -> None:
    """Each block resets its own token: exiting the outer one first leaves the scope it
    found, and the inner one then puts back the outer's."""
    outer = coworker.acting_as("outer")
    inner = coworker.step("inner")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert SCOPE.get() is EMPTY_SCOPE
    inner.__exit__(None, None, None)
    assert coworker.current_identity() is not None  # what inner had replaced
    assert coworker.current_identity().user_id == "outer"  # type: ignore[union-attr]
    SCOPE.set(EMPTY_SCOPE)  # the hand-made interleaving leaves that behind: clear it


def test_extra_exit_is_harmless(spans: Any) -> None:
    """Exiting a block more often than it was entered changes nothing."""
    block = coworker.acting_as("u")
    with coworker.flow("batch-job") as f:
        with block:
            pass
        block.__exit__(None, None, None)
        assert coworker.current_flow() is f


SHARED = coworker.acting_as("system")


def test_shared_block_entered_from_many_threads_restores_each_threads_scope() -> None:
    """One block object entered and exited concurrently by 8 threads: inside, each sees the
    block's identity; after each exit, its own identity again (the token stack is per entry)."""
    import threading

    errors: list[str] = []
    start = threading.Barrier(8, timeout=10)

    def worker(n: int) -> None:
        with coworker.acting_as(f"user-{n}"):
            start.wait()
            for _ in range(500):
                with SHARED:
                    if coworker.current_identity().user_id != "system":  # type: ignore[union-attr]
                        errors.append(f"{n}: inside")
                if coworker.current_identity().user_id != f"user-{n}":  # type: ignore[union-attr]
                    errors.append(f"{n}: after")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert SHARED._tokens == []  # every entry was exited


def test_block_across_a_yield_resumed_in_another_context(spans: Any) -> None:
    """A generator body holding acting_as across a yield, resumed by the consumer in another
    context: the block still exits cleanly and neither context keeps its identity."""

    @coworker.run
    def body() -> Any:
        with coworker.acting_as("inside"):
            yield coworker.current_identity().user_id  # type: ignore[union-attr]
        yield coworker.current_identity()

    gen = body()
    assert next(gen) == "inside"
    other = contextvars.copy_context()
    assert other.run(next, gen) is None  # the block was left in the other context
    assert other.run(coworker.current_identity) is None
    assert coworker.current_identity() is None
    gen.close()
    assert len(spans.get_finished_spans()) == 1
