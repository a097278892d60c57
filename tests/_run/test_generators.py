"""Generators and async generators: lazy, span current only inside the body, always ended."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import coworker
from coworker import attributes as attr


def _current_name() -> str | None:
    span = trace.get_current_span()
    return getattr(span, "name", None) if span.is_recording() else None


@coworker.run
def counter(n: int):
    for i in range(n):
        # Inside the body our span is current.
        assert _current_name() == "counter"
        yield i


def test_laziness_and_span_only_inside_body(spans: Any) -> None:
    """Calling does not run the body; between items the consumer's context is untouched."""
    gen = counter(3)
    assert spans.get_finished_spans() == ()
    assert coworker.current_run() is None
    seen = []
    for item in gen:
        assert _current_name() is None  # not leaked into the consumer
        assert coworker.current_run() is None
        seen.append(item)
    assert seen == [0, 1, 2]
    (span,) = spans.get_finished_spans()
    assert span.name == "counter"


def test_never_iterated_makes_no_span(spans: Any) -> None:
    """A generator that is created and dropped never runs its body, so no span."""
    gen = counter(2)
    del gen
    gc.collect()
    assert spans.get_finished_spans() == ()


def test_early_break_ends_span(spans: Any) -> None:
    """Breaking out of a for loop ends the span (the proxy is collected and closes)."""
    for item in counter(10):
        if item == 1:
            break
    gc.collect()
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_send_throw_close_are_forwarded(spans: Any) -> None:
    """send(), throw() and close() reach the original generator."""
    log: list[Any] = []

    @coworker.run
    def echo():
        try:
            while True:
                try:
                    got = yield
                    log.append(got)
                except ValueError as exc:
                    log.append(f"caught {exc}")
        finally:
            log.append("closed")

    g = echo()
    next(g)
    g.send("a")
    g.throw(ValueError("v"))
    g.close()
    assert log == ["a", "caught v", "closed"]
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_exception_in_generator_body_marks_span(spans: Any) -> None:
    """An exception raised by the body propagates and the span is an error."""

    @coworker.run
    def bad():
        yield 1
        raise RuntimeError("broken")

    g = bad()
    assert next(g) == 1
    with pytest.raises(RuntimeError, match="broken"):
        next(g)
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.ERROR_TYPE] == "RuntimeError"


def test_return_value_of_generator_preserved() -> None:
    """StopIteration.value (yield from result) is preserved."""

    @coworker.run
    def gen():
        yield 1
        return "done"

    def outer():
        result = yield from gen()
        return result

    o = outer()
    assert next(o) == 1
    with pytest.raises(StopIteration) as info:
        next(o)
    assert info.value.value == "done"


def test_nested_run_inside_generator_is_child(spans: Any) -> None:
    """A run called from the generator body is a child of the generator's span."""

    @coworker.run
    def leaf() -> int:
        return 1

    @coworker.run
    def parent():
        yield leaf()
        yield leaf()

    assert list(parent()) == [1, 1]
    finished = spans.get_finished_spans()
    gen_span = next(s for s in finished if s.name.endswith("parent"))
    leaves = [s for s in finished if s.name.endswith("leaf")]
    assert len(leaves) == 2
    assert all(s.parent.span_id == gen_span.context.span_id for s in leaves)
    assert all(s.attributes[attr.RUN_PARENT_ID] == gen_span.attributes[attr.RUN_ID] for s in leaves)


def test_consumer_run_is_not_parent_of_generator_items(spans: Any) -> None:
    """Runs in the consumer between items are not children of the generator span."""

    @coworker.run
    def consume(x: int) -> int:
        return x

    for item in counter(2):
        consume(item)
    finished = spans.get_finished_spans()
    gen_span = next(s for s in finished if s.name == "counter")
    for s in finished:
        if s.name.endswith("consume"):
            assert s.parent is None or s.parent.span_id != gen_span.context.span_id


@pytest.mark.usefixtures("flow_spans_off")
def test_generator_keeps_flow_of_its_call_site(spans: Any) -> None:
    """The generator body runs with the flow where it was called, wherever iterated."""
    with coworker.flow("batch-job", "job-1"):
        gen = counter(2)
    assert list(gen) == [0, 1]
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.FLOW_ID] == "job-1"


def test_async_generator_span_only_inside_body(spans: Any) -> None:
    """Async generators: lazy, span current only in the body, asend/athrow/aclose forwarded."""
    log: list[Any] = []

    @coworker.run
    async def ticks(n: int):
        for i in range(n):
            await asyncio.sleep(0)
            assert _current_name() == "test_async_generator_span_only_inside_body.<locals>.ticks"
            got = yield i
            log.append(got)

    async def main() -> list[int]:
        out = []
        agen = ticks(3)
        assert spans.get_finished_spans() == ()
        out.append(await agen.__anext__())
        assert _current_name() is None
        out.append(await agen.asend("x"))
        async for v in agen:
            assert _current_name() is None
            out.append(v)
        return out

    assert asyncio.run(main()) == [0, 1, 2]
    assert log == ["x", None, None]
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET


def test_async_generator_aclose_and_error(spans: Any) -> None:
    """aclose() ends the span; an error in the body marks it."""

    @coworker.run
    async def forever():
        i = 0
        while True:
            yield i
            i += 1

    @coworker.run
    async def broken():
        yield 1
        raise ValueError("nope")

    async def main() -> None:
        g = forever()
        assert await g.__anext__() == 0
        await g.aclose()
        b = broken()
        await b.__anext__()
        with pytest.raises(ValueError):
            await b.__anext__()

    asyncio.run(main())
    finished = spans.get_finished_spans()
    assert len(finished) == 2
    assert finished[0].status.status_code is StatusCode.UNSET
    assert finished[1].attributes[attr.ERROR_TYPE] == "ValueError"


def test_async_generator_athrow_forwarded(spans: Any) -> None:
    """athrow() reaches the body, which may handle it and continue."""

    @coworker.run
    async def resilient():
        while True:
            try:
                yield "ok"
            except KeyError:
                yield "handled"

    async def main() -> list[str]:
        g = resilient()
        first = await g.__anext__()
        second = await g.athrow(KeyError("k"))
        await g.aclose()
        return [first, second]

    assert asyncio.run(main()) == ["ok", "handled"]
    assert len(spans.get_finished_spans()) == 1


def test_async_generator_abandoned_ends_span(spans: Any) -> None:
    """An async generator dropped mid-iteration still ends its span."""

    @coworker.run
    async def items():
        for i in range(100):
            yield i

    async def main() -> None:
        async for i in items():
            if i == 2:
                break

    asyncio.run(main())
    gc.collect()
    assert len(spans.get_finished_spans()) == 1
