"""Decorated generators and async generators keep the generator protocol and its guarantees."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import inspect
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import coworker
from coworker import attributes as attr
from coworker._scope import EMPTY_SCOPE, SCOPE


def _current_name() -> str | None:
    span = trace.get_current_span()
    return getattr(span, "name", None) if span.is_recording() else None


def _short(span: Any) -> str:
    return span.name.rsplit(".", 1)[-1]


@coworker.run
def gen_range(n: int):
    yield from range(n)


def test_yield_from_delegation_forwards_send_throw_close_and_return(spans: Any) -> None:
    """`yield from` a decorated generator forwards send/throw/close and keeps the result."""
    log: list[Any] = []

    @coworker.run
    def inner():
        try:
            while True:
                try:
                    got = yield "item"
                    log.append(got)
                    if got == "stop":
                        return "result"
                except KeyError:
                    log.append("KeyError")
        finally:
            log.append("finally")

    def outer():
        result = yield from inner()
        log.append(("returned", result))
        yield "after"

    o = outer()
    assert next(o) == "item"
    assert o.send("a") == "item"
    assert o.throw(KeyError("k")) == "item"
    assert o.send("stop") == "after"
    o.close()
    assert log == ["a", "KeyError", "stop", "finally", ("returned", "result")]
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_yield_from_close_reaches_inner_body(spans: Any) -> None:
    """Closing the delegating generator closes the decorated one, inside its span."""
    seen: list[str | None] = []

    @coworker.run
    def inner():
        try:
            yield 1
            yield 2
        finally:
            seen.append(_current_name())

    def outer():
        yield from inner()

    o = outer()
    next(o)
    o.close()
    assert seen == ["test_yield_from_close_reaches_inner_body.<locals>.inner"]
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_exception_thrown_in_at_first_yield_is_handled_by_body(spans: Any) -> None:
    """throw() at the first yield reaches the body, which recovers; the span stays OK."""

    @coworker.run
    def g():
        try:
            yield 1
        except ValueError:
            yield "recovered"
        yield 3

    it = g()
    assert next(it) == 1
    assert it.throw(ValueError("v")) == "recovered"
    assert list(it) == [3]
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_unhandled_throw_propagates_same_object_and_marks_span(spans: Any) -> None:
    """An exception thrown in and not handled comes back as the same object; span ERROR."""

    @coworker.run
    def g():
        yield 1

    it = g()
    next(it)
    err = LookupError("thrown")
    with pytest.raises(LookupError) as info:
        it.throw(err)
    assert info.value is err
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.ERROR_TYPE] == "LookupError"


def test_generator_closed_before_start_makes_no_span(spans: Any) -> None:
    """close() before the first next() runs nothing (like a plain generator); no span."""
    ran: list[str] = []

    @coworker.run
    def g():
        try:
            ran.append("body")
            yield 1
        finally:
            ran.append("finally")

    it = g()
    it.close()
    with pytest.raises(StopIteration):
        next(it)
    assert ran == []
    assert spans.get_finished_spans() == ()


def test_generator_break_ends_span_by_refcount_without_gc(spans: Any) -> None:
    """An early `break` ends the span at once (CPython refcount), no gc.collect() needed."""
    finally_ran_in_span: list[str | None] = []

    @coworker.run
    def g():
        try:
            yield from range(10)
        finally:
            finally_ran_in_span.append(_current_name())

    for i in g():
        if i == 2:
            break
    assert len(spans.get_finished_spans()) == 1
    assert finally_ran_in_span == [
        "test_generator_break_ends_span_by_refcount_without_gc.<locals>.g"
    ]


def test_generator_body_identity_block_does_not_leak_to_consumer(spans: Any) -> None:
    """acting_as held across a yield inside a decorated generator stays in the body."""

    @coworker.run
    def g():
        with coworker.acting_as("body-user"):
            yield coworker.current_identity().user_id
            yield coworker.current_identity().user_id

    with coworker.acting_as("consumer"):
        it = g()
        assert next(it) == "body-user"
        assert coworker.current_identity().user_id == "consumer"
        assert next(it) == "body-user"
        assert coworker.current_identity().user_id == "consumer"
        assert list(it) == []
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.USER_ID] == "consumer"


def test_contextmanager_over_decorated_generator(spans: Any) -> None:
    """@contextmanager stacked on @run: same exception object, suppression, spans ended."""

    @contextlib.contextmanager
    @coworker.run
    def cm():
        try:
            yield "v"
        except KeyError:
            pass  # suppress KeyError only

    err = ZeroDivisionError("z")
    with pytest.raises(ZeroDivisionError) as info:
        with cm():
            raise err
    assert info.value is err
    with cm() as value:
        assert value == "v"
        raise KeyError("suppressed")
    statuses = [s.status.status_code for s in spans.get_finished_spans()]
    assert statuses == [StatusCode.ERROR, StatusCode.UNSET]


def test_asynccontextmanager_over_decorated_async_generator(spans: Any) -> None:
    """@asynccontextmanager stacked on @run: same exception object, suppression works."""

    @contextlib.asynccontextmanager
    @coworker.run
    async def acm():
        try:
            yield "v"
        except KeyError:
            pass

    async def main() -> None:
        async with acm() as value:
            assert value == "v"
            raise KeyError("suppressed")
        err = ValueError("x")
        with pytest.raises(ValueError) as info:
            async with acm():
                raise err
        assert info.value is err

    asyncio.run(main())
    statuses = [s.status.status_code for s in spans.get_finished_spans()]
    assert statuses == [StatusCode.UNSET, StatusCode.ERROR]


def test_async_generator_cancelled_by_timeout_mid_iteration(spans: Any) -> None:
    """asyncio.timeout cancelling an async generator mid-body: span ends once, no leak."""
    log: list[tuple[str, str | None]] = []

    @coworker.run
    async def slow():
        try:
            for i in range(10):
                await asyncio.sleep(0.03)
                yield i
        finally:
            log.append(("finally", _current_name()))

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as deadline:
                async for _ in slow():
                    log.append(("consumer", _current_name()))
                    # Expire while the body awaits its next item (after >= 1 item).
                    deadline.reschedule(asyncio.get_running_loop().time() + 0.01)
        assert SCOPE.get() is EMPTY_SCOPE
        assert _current_name() is None

    asyncio.run(main())
    assert ("consumer", None) in log
    assert log[-1] == (
        "finally",
        "test_async_generator_cancelled_by_timeout_mid_iteration.<locals>.slow",
    )
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.ERROR_TYPE] == "asyncio.exceptions.CancelledError"


def test_async_generator_task_cancel_mid_iteration(spans: Any) -> None:
    """task.cancel() while the body awaits: the body's finally runs in the span; span ends."""
    log: list[str | None] = []

    @coworker.run
    async def slow():
        try:
            while True:
                await asyncio.sleep(0.02)
                yield 1
        finally:
            log.append(_current_name())

    async def main() -> None:
        async def consume() -> None:
            async for _ in slow():
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert log == ["test_async_generator_task_cancel_mid_iteration.<locals>.slow"]
    (span,) = spans.get_finished_spans()
    assert span.end_time is not None
    assert span.status.status_code is StatusCode.ERROR


def test_async_generator_gc_while_loop_runs_ends_span(spans: Any) -> None:
    """An abandoned async generator collected while the loop runs is aclose()d by the loop's
    finalizer: its cleanup runs inside the span, then the span ends (no loop shutdown)."""
    cleanup: list[str | None] = []

    @coworker.run
    async def items():
        try:
            for i in range(100):
                await asyncio.sleep(0)
                yield i
        finally:
            cleanup.append(_current_name())

    async def main() -> int:
        g = items()
        await g.__anext__()
        del g
        gc.collect()
        for _ in range(10_000):  # the finalizer's aclose() runs on a later loop iteration
            if spans.get_finished_spans():
                break
            await asyncio.sleep(0)
        return len(spans.get_finished_spans())

    assert asyncio.run(main()) == 1
    assert cleanup == ["test_async_generator_gc_while_loop_runs_ends_span.<locals>.items"]
    assert SCOPE.get() is EMPTY_SCOPE


def test_async_generator_finalized_by_loop_shutdown_ends_span(spans: Any) -> None:
    """Loop shutdown ends the span, runs the finally inside it, and reports no error."""
    log: list[str | None] = []
    keep: list[Any] = []
    loop_errors: list[Any] = []

    @coworker.run
    async def stream():
        try:
            for i in range(10):
                yield i
        finally:
            await asyncio.sleep(0.01)  # async cleanup
            log.append(_current_name())

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, c: loop_errors.append(c))
        g = stream()
        keep.append(g)
        await g.__anext__()

    asyncio.run(main())
    try:
        assert loop_errors == []
        assert len(spans.get_finished_spans()) == 1
        assert log == ["test_async_generator_finalized_by_loop_shutdown_ends_span.<locals>.stream"]
    finally:
        keep.clear()


def test_nested_decorated_generators_parent_child(spans: Any) -> None:
    """A decorated generator iterated inside another's body is its child; consumer is not."""

    @coworker.run
    def inner():
        yield 1
        yield 2

    @coworker.run
    def outer():
        for x in inner():
            yield x * 10

    @coworker.run
    def consumer_side(x: int) -> int:
        return x

    for x in outer():
        consumer_side(x)
    finished = {_short(s): s for s in spans.get_finished_spans()}
    assert finished["inner"].parent.span_id == finished["outer"].context.span_id
    assert finished["consumer_side"].parent is None


def test_reentrant_next_raises_valueerror_and_keeps_span(spans: Any) -> None:
    """Calling next() on a running decorated generator behaves like a plain generator."""
    holder: dict[str, Any] = {}
    caught: list[BaseException] = []

    @coworker.run
    def reent():
        try:
            next(holder["g"])
        except ValueError as exc:  # what a plain generator raises
            caught.append(exc)
        yield 1

    holder["g"] = reent()
    try:
        assert list(holder["g"]) == [1]
    finally:
        holder.clear()
    assert len(caught) == 1
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_reentrant_close_from_body_keeps_span(spans: Any) -> None:
    """close() on a running generator raises ValueError and leaves the run alone."""
    holder: dict[str, Any] = {}
    caught: list[BaseException] = []

    @coworker.run
    def reent():
        try:
            holder["g"].close()
        except ValueError as exc:
            caught.append(exc)
        yield 1
        yield 2

    holder["g"] = reent()
    try:
        assert list(holder["g"]) == [1, 2]
    finally:
        holder.clear()
    assert len(caught) == 1
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_send_non_none_before_start_keeps_generator_traced(spans: Any) -> None:
    """A rejected first send() leaves the generator unstarted and later fully traced."""

    @coworker.run
    def g():
        got = yield 1
        yield got

    it = g()
    with pytest.raises(TypeError):
        it.send("too early")
    assert list(it) == [1, None]  # as with a plain generator
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_concurrent_anext_misuse_does_not_end_owner_span(spans: Any) -> None:
    """The misusing caller gets RuntimeError; the owner's iteration and span are intact."""

    @coworker.run
    async def two():
        await asyncio.sleep(0.03)
        yield 1
        await asyncio.sleep(0.01)
        yield 2

    async def main() -> list[int]:
        g = two()
        first = asyncio.ensure_future(g.__anext__())
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError):
            await g.__anext__()
        return [await first] + [x async for x in g]

    assert asyncio.run(main()) == [1, 2]
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_async_generator_denied_by_policy_stays_denied(spans: Any) -> None:
    """After a PermissionDenied, retrying __anext__ must not run the body."""
    ran: list[str] = []

    @coworker.run(operation="delete", doctype="Invoice")
    async def purge():
        ran.append("body")
        yield "deleted"

    coworker.configure(require_identity=True, metrics=False)

    async def main() -> None:
        g = purge()
        with pytest.raises(coworker.PermissionDenied):
            await g.__anext__()
        with pytest.raises((coworker.PermissionDenied, StopAsyncIteration)):
            await g.__anext__()

    asyncio.run(main())
    assert ran == []


def test_sync_generator_denied_by_policy_stays_denied(spans: Any) -> None:
    """The sync counterpart: after a denial the generator is closed and never runs."""
    ran: list[str] = []

    @coworker.run(operation="delete", doctype="Invoice")
    def purge():
        ran.append("body")
        yield "deleted"

    coworker.configure(require_identity=True, metrics=False)
    g = purge()
    with pytest.raises(coworker.PermissionDenied):
        next(g)
    with pytest.raises(StopIteration):
        next(g)
    assert ran == []


def test_generator_body_sees_consumers_application_contextvars(spans: Any) -> None:
    """An app ContextVar set after creation, before iteration, is visible in the body."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("rid", default="unset")

    def plain():
        yield request_id.get()

    @coworker.run
    def traced():
        yield request_id.get()

    def check() -> tuple[str, str]:
        p, t = plain(), traced()
        request_id.set("req-42")
        return next(p), next(t)

    assert contextvars.copy_context().run(check) == ("req-42", "req-42")


def test_getgeneratorstate_works_on_decorated_generator() -> None:
    """inspect.getgeneratorstate() reports states for a decorated generator."""
    it = gen_range(2)
    assert inspect.getgeneratorstate(it) == inspect.GEN_CREATED
    next(it)
    assert inspect.getgeneratorstate(it) == inspect.GEN_SUSPENDED
    it.close()
    assert inspect.getgeneratorstate(it) == inspect.GEN_CLOSED
