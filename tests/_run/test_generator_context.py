"""A decorated generator's body shares the consumer's application ContextVars both ways,
like a plain generator, while coworker's scope and the span stay the body's own."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import trace

import coworker

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("app_var", default="unset")


def _span_name() -> str | None:
    span = trace.get_current_span()
    return getattr(span, "name", None) if span.is_recording() else None


def test_body_sees_what_the_consumer_sets_between_steps(spans: Any) -> None:
    """A value the consumer sets after the first step is what the body reads at the next."""

    @coworker.run
    def g() -> Iterator[str]:
        yield VAR.get()
        yield VAR.get()

    def consume() -> list[str]:
        it = g()
        first = next(it)
        VAR.set("changed")
        return [first, next(it)]

    assert contextvars.copy_context().run(consume) == ["unset", "changed"]


def test_consumer_sees_what_the_body_sets_during_a_step(spans: Any) -> None:
    """A value the body sets before yielding is the consumer's until the body resets it."""

    @contextlib.contextmanager
    @coworker.run
    def using(value: str) -> Iterator[None]:
        token = VAR.set(value)  # reset at the next step: the same token works across steps
        try:
            yield
        finally:
            VAR.reset(token)

    def consume() -> list[str]:
        seen = [VAR.get()]
        with using("inside"):
            seen.append(VAR.get())
            assert _span_name() is None  # the body's span is not the consumer's
        seen.append(VAR.get())
        return seen

    assert contextvars.copy_context().run(consume) == ["unset", "inside", "unset"]
    assert len(spans.get_finished_spans()) == 1


def test_variable_created_by_the_body_is_unset_again_for_the_consumer(spans: Any) -> None:
    """A variable the body creates and resets to no value is gone for the consumer too."""
    fresh: contextvars.ContextVar[int] = contextvars.ContextVar("fresh")

    @coworker.run
    def g() -> Iterator[None]:
        token = fresh.set(1)
        yield
        fresh.reset(token)
        yield

    def consume() -> list[Any]:
        it = g()
        next(it)
        seen: list[Any] = [fresh.get("missing")]
        next(it)
        seen.append(fresh.get("missing"))
        return seen

    assert contextvars.copy_context().run(consume) == [1, "missing"]


def test_variable_the_consumer_unsets_is_unset_in_the_body(spans: Any) -> None:
    """The consumer resetting a variable to no value between steps unsets it in the body,
    whether the body inherited it at its first step or it was set later."""
    early: contextvars.ContextVar[int] = contextvars.ContextVar("early")
    late: contextvars.ContextVar[int] = contextvars.ContextVar("late")

    @coworker.run
    def g() -> Iterator[tuple[Any, Any]]:
        while True:
            yield early.get("missing"), late.get("missing")

    def consume() -> list[tuple[Any, Any]]:
        t_early = early.set(1)
        it = g()
        seen = [next(it)]
        t_late = late.set(2)
        seen.append(next(it))
        late.reset(t_late)
        seen.append(next(it))
        early.reset(t_early)
        seen.append(next(it))
        it.close()
        return seen

    assert contextvars.copy_context().run(consume) == [
        (1, "missing"),
        (1, 2),
        (1, "missing"),
        ("missing", "missing"),
    ]


def test_body_tokens_still_reset_after_the_consumer_unsets_an_inherited_variable(
    spans: Any,
) -> None:
    """The consumer unsetting a variable the body inherited at its first step leaves the
    body's own tokens working across its yields: its application variable resets, and a
    span it keeps current across a yield detaches (no "Failed to detach context")."""
    inherited: contextvars.ContextVar[str] = contextvars.ContextVar("inherited")
    tracer = trace.get_tracer("test")

    @coworker.run
    def g() -> Iterator[Any]:
        token = VAR.set("body")
        with tracer.start_as_current_span("held"):
            yield inherited.get("missing")
            yield inherited.get("missing")
        VAR.reset(token)  # a token of an earlier step
        yield VAR.get(), _span_name()

    def consume() -> list[Any]:
        t = inherited.set("request")
        it = g()
        seen = [next(it)]
        inherited.reset(t)  # unset between steps (it existed when the body began)
        seen.append(next(it))
        seen.append(next(it))
        it.close()
        return seen

    detach_errors: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = detach_errors.append  # type: ignore[method-assign]
    logging.getLogger("opentelemetry.context").addHandler(handler)
    try:
        seen = contextvars.copy_context().run(consume)
    finally:
        logging.getLogger("opentelemetry.context").removeHandler(handler)
    assert seen[:2] == ["request", "missing"]
    assert seen[2][0] == "unset" and seen[2][1].endswith("<locals>.g")  # its own span again
    assert detach_errors == []


def test_span_is_current_only_inside_the_body_with_nested_runs(spans: Any) -> None:
    """Runs inside the body are its children; the consumer never sees the body's span."""

    @coworker.run
    def child() -> str | None:
        return _span_name()

    @coworker.run
    def g() -> Iterator[str | None]:
        for _ in range(3):
            yield child()

    outside = []
    for item in g():
        outside.append(_span_name())
        assert item is not None and item.endswith("child")
    assert outside == [None, None, None]
    finished = spans.get_finished_spans()
    parent = next(s for s in finished if s.name.endswith(".g"))
    assert all(s.parent.span_id == parent.context.span_id for s in finished if s is not parent)


def test_finished_generator_leaves_no_reference_cycle(spans: Any) -> None:
    """An exhausted decorated generator is freed by reference counting alone (its run and
    its context hold no cycle), so nothing waits for the cyclic collector."""

    @coworker.run
    def g() -> Iterator[int]:
        yield 1

    assert list(g()) == [1]  # warm-up: first-call caches are not garbage
    gc.collect()
    gc.disable()
    try:
        it = g()
        ref = weakref.ref(it)
        assert list(it) == [1]
        del it
        assert ref() is None
        collected = gc.collect()
    finally:
        gc.enable()
    assert collected == 0


def test_async_body_and_consumer_share_application_variables(spans: Any) -> None:
    """The same both ways for async generators, across real suspensions of the body."""

    @contextlib.asynccontextmanager
    @coworker.run
    async def using(value: str) -> AsyncIterator[str]:
        token = VAR.set(value)
        await asyncio.sleep(0)  # a real suspension inside the body's context
        try:
            yield _span_name() or ""
        finally:
            await asyncio.sleep(0)
            VAR.reset(token)

    @coworker.run
    async def reader() -> AsyncIterator[str]:
        while True:
            await asyncio.sleep(0)
            yield VAR.get()

    async def main() -> list[str]:
        seen = []
        async with using("inside") as name:
            assert name.endswith("using")
            assert _span_name() is None
            seen.append(VAR.get())
        seen.append(VAR.get())
        it = reader()
        seen.append(await it.__anext__())
        VAR.set("later")
        seen.append(await it.__anext__())
        await it.aclose()
        return seen

    assert asyncio.run(main()) == ["inside", "unset", "unset", "later"]
    assert len(spans.get_finished_spans()) == 2


def test_async_body_cancelled_while_suspended_handles_it_in_its_span(spans: Any) -> None:
    """Cancelling the consumer's task while the body awaits throws into the body, which
    handles it inside its own span."""
    handled: list[str | None] = []

    @coworker.run
    async def slow() -> AsyncIterator[int]:
        try:
            await asyncio.sleep(30)
            yield 1
        except asyncio.CancelledError:
            handled.append(_span_name())
            raise

    async def main() -> None:
        task = asyncio.ensure_future(slow().__anext__())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(handled) == 1 and handled[0] is not None and handled[0].endswith("slow")
    assert len(spans.get_finished_spans()) == 1
