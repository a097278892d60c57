"""Decorated generators return real generator objects; caller-inspecting code sees one frame.

Libraries branch on ``inspect.isgenerator`` / ``isasyncgen`` and merge async streams with
``asyncio.create_task(gen.__anext__())``; both must work on what a decorated generator
function returns, with the run's guarantees kept.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import types
import warnings
from typing import Any

import pytest

import coworker


@coworker.run
def numbers(n: int) -> Any:
    yield from range(n)


@coworker.run
async def anumbers(n: int) -> Any:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


def test_decorated_generator_is_a_real_generator(spans: Any) -> None:
    """inspect.isgenerator and types.GeneratorType hold; names are the original's."""
    gen = numbers(3)
    assert inspect.isgenerator(gen)
    assert isinstance(gen, types.GeneratorType)
    assert gen.__name__ == "numbers"
    assert gen.__qualname__ == "numbers"
    assert list(gen) == [0, 1, 2]
    assert len(spans.get_finished_spans()) == 1


def test_decorated_async_generator_is_a_real_async_generator(spans: Any) -> None:
    """inspect.isasyncgen and types.AsyncGeneratorType hold."""

    async def main() -> list[int]:
        agen = anumbers(2)
        assert inspect.isasyncgen(agen)
        assert isinstance(agen, types.AsyncGeneratorType)
        return [i async for i in agen]

    assert asyncio.run(main()) == [0, 1]
    assert len(spans.get_finished_spans()) == 1


def test_async_generator_and_method_generators_carry_the_originals_names(spans: Any) -> None:
    """Async generators and generators of methods are named like the original's (the driver
    is named after the decorated function once, not per call)."""

    class Source:
        @coworker.run
        def rows(self) -> Any:
            yield 1

        @coworker.run
        async def arows(self) -> Any:
            yield 1

    async def main() -> list[tuple[str, str]]:
        made = [anumbers(1), Source().arows(), Source().arows()]
        names = [(a.__name__, a.__qualname__) for a in made]
        for a in made:
            await a.aclose()
        return names

    assert asyncio.run(main()) == [
        ("anumbers", "anumbers"),
        ("arows", f"{Source.__qualname__}.arows"),
        ("arows", f"{Source.__qualname__}.arows"),
    ]
    gen = Source().rows()
    assert (gen.__name__, gen.__qualname__) == ("rows", f"{Source.__qualname__}.rows")
    gen.close()


def test_async_items_that_look_like_suspensions_reach_the_consumer(spans: Any) -> None:
    """Items the event loop would take for a suspension (None, a future) are items: the
    driver tells them apart from what the body awaits by how the pump hands them over."""

    @coworker.run
    async def odd_items(fut: asyncio.Future[int]) -> Any:
        yield None
        await asyncio.sleep(0)  # a real suspension (a bare yield) between items
        yield fut
        yield [None]

    async def main() -> list[Any]:
        fut = asyncio.get_running_loop().create_future()
        got = [item async for item in odd_items(fut)]
        assert got[1] is fut and not fut.done()
        return got

    got = asyncio.run(main())
    assert got[0] is None and got[2] == [None]
    assert len(spans.get_finished_spans()) == 1


def test_create_task_accepts_anext_asend_and_athrow(spans: Any) -> None:
    """asyncio.create_task(gen.__anext__()) merges streams; asend/athrow work as tasks too."""

    async def merge() -> list[int]:
        a, b = anumbers(3), anumbers(3)
        out: list[int] = []
        pending = {asyncio.create_task(a.__anext__()): a, asyncio.create_task(b.__anext__()): b}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                source = pending.pop(task)
                try:
                    out.append(task.result())
                except StopAsyncIteration:
                    continue
                pending[asyncio.create_task(source.__anext__())] = source
        c = anumbers(3)
        out.append(await asyncio.create_task(c.asend(None)))
        with pytest.raises(KeyError):
            await asyncio.create_task(c.athrow(KeyError("stop")))
        return out

    assert sorted(asyncio.run(merge())) == [0, 0, 0, 1, 1, 2, 2]
    spans_ = spans.get_finished_spans()
    assert len(spans_) == 3
    assert [s.status.is_ok for s in spans_].count(False) == 1  # the athrow'n one failed


def test_one_coworker_frame_between_caller_and_function(spans: Any) -> None:
    """A decorated function's caller is two frames up (one coworker frame between), for
    functions, coroutines and generators alike: stacklevel=3 names the real caller."""
    seen: dict[str, tuple[str, str]] = {}

    def record(kind: str) -> None:
        wrapper, caller = sys._getframe(2), sys._getframe(3)
        seen[kind] = (wrapper.f_code.co_filename, caller.f_code.co_name)

    @coworker.run
    def f() -> None:
        record("function")

    @coworker.run
    async def c() -> None:
        record("coroutine")

    @coworker.run
    def g() -> Any:
        record("generator")
        yield

    def caller() -> None:
        f()
        list(g())

    async def acaller() -> None:
        await c()

    caller()
    asyncio.run(acaller())
    for kind, (wrapper_file, caller_name) in seen.items():
        assert wrapper_file.endswith(("wrappers.py", "generators.py")), kind
        assert caller_name in ("caller", "acaller"), kind


def test_warning_stacklevel_three_points_at_the_caller(spans: Any) -> None:
    """warnings.warn(stacklevel=3) inside a decorated function names the caller's line (the
    documented pattern; stacklevel=2 names coworker's wrapper)."""

    @coworker.run
    def old_api() -> None:
        warnings.warn("old", DeprecationWarning, stacklevel=3)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_api()
    (w,) = caught
    assert w.filename == __file__


def test_async_generator_hooks_are_restored_after_the_first_step(spans: Any) -> None:
    """The driver switches the loop's async-generator hooks off only while it makes the
    original's first awaitable: afterwards the loop's hooks are in place again."""

    async def main() -> tuple[Any, Any]:
        before = sys.get_asyncgen_hooks()
        agen = anumbers(2)
        await agen.__anext__()
        after = sys.get_asyncgen_hooks()
        await agen.aclose()
        return before, after

    before, after = asyncio.run(main())
    assert before.firstiter is not None
    assert after == before
    assert len(spans.get_finished_spans()) == 1
