"""Adversarial tests of the core (issue 2): generators, context leaks, transparency,
exceptions, capture, threads, propagation, flow breaks and configure.

Tests marked ``xfail(strict=True, reason="BUG: ...")`` reproduce a real defect: they fail
today and will start passing (and so fail the suite) once the bug is fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import copy
import dataclasses
import functools
import gc
import inspect
import pickle
import threading
import time
import traceback
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import coworker
from coworker import _setup
from coworker import attributes as attr
from coworker._scope import EMPTY_SCOPE, SCOPE


def _current_name() -> str | None:
    span = trace.get_current_span()
    return getattr(span, "name", None) if span.is_recording() else None


def _short(span: Any) -> str:
    return span.name.rsplit(".", 1)[-1]


# Module level, so that pickle can find them by reference.
@coworker.run
def double(x: int) -> int:
    """Doubles."""
    return 2 * x


@coworker.run
async def adouble(x: int) -> int:
    return 2 * x


@coworker.run
def gen_range(n: int):
    yield from range(n)


@coworker.run
async def agen_range(n: int):
    for i in range(n):
        yield i


# ----------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Transparency
# ----------------------------------------------------------------------------------------


class Slotted:
    """A class with __slots__ and decorated members of every kind."""

    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x = 1

    @coworker.run
    def method(self, a: int) -> int:
        """Method doc."""
        return self.x + a

    @coworker.run
    @classmethod
    def cls_outer(cls, a: int) -> str:
        """Cls outer."""
        return cls.__name__

    @classmethod
    @coworker.run
    def cls_inner(cls, a: int) -> str:
        """Cls inner."""
        return cls.__name__

    @coworker.run
    @staticmethod
    def static_outer(a: int) -> int:
        """Static outer."""
        return a

    @staticmethod
    @coworker.run
    def static_inner(a: int) -> int:
        """Static inner."""
        return a

    @property
    @coworker.run
    def prop(self) -> int:
        """Prop doc."""
        return self.x

    @coworker.run
    def gen(self, n: int):
        """Gen doc."""
        yield from range(n)

    @coworker.run
    async def amethod(self, a: int) -> int:
        """Async doc."""
        return a


def test_every_member_kind_on_slotted_class(spans: Any) -> None:
    """Methods, class/static methods (both orders), properties, generators, async methods."""
    o = Slotted()
    assert o.method(1) == 2
    assert Slotted.method(o, 2) == 3
    assert Slotted.cls_outer(0) == Slotted.cls_inner(0) == o.cls_outer(0) == "Slotted"
    assert Slotted.static_outer(4) == Slotted.static_inner(4) == o.static_inner(4) == 4
    assert o.prop == 1
    assert list(o.gen(2)) == [0, 1]
    assert asyncio.run(o.amethod(5)) == 5
    names = [s.name for s in spans.get_finished_spans()]
    assert names == [
        "Slotted.method",
        "Slotted.method",
        "Slotted.cls_outer",
        "Slotted.cls_inner",
        "Slotted.cls_outer",
        "Slotted.static_outer",
        "Slotted.static_inner",
        "Slotted.static_inner",
        "Slotted.prop",
        "Slotted.gen",
        "Slotted.amethod",
    ]


@pytest.mark.parametrize(
    ("get", "name", "doc", "params"),
    [
        (lambda: Slotted.method, "method", "Method doc.", ["self", "a"]),
        (lambda: Slotted().method, "method", "Method doc.", ["a"]),
        (lambda: Slotted.cls_outer, "cls_outer", "Cls outer.", ["a"]),
        (lambda: Slotted.cls_inner, "cls_inner", "Cls inner.", ["a"]),
        (lambda: Slotted.static_outer, "static_outer", "Static outer.", ["a"]),
        (lambda: Slotted.static_inner, "static_inner", "Static inner.", ["a"]),
        (lambda: Slotted.gen, "gen", "Gen doc.", ["self", "n"]),
        (lambda: Slotted.amethod, "amethod", "Async doc.", ["self", "a"]),
        (lambda: double, "double", "Doubles.", ["x"]),
    ],
)
def test_metadata_preserved_for_every_kind(get: Any, name: str, doc: str, params: list) -> None:
    """__name__, __qualname__, __doc__, signature and __wrapped__ match the original."""
    fn = get()
    assert fn.__name__ == name
    assert fn.__qualname__.endswith(name)
    assert fn.__doc__ == doc
    assert list(inspect.signature(fn).parameters) == params
    assert hasattr(fn, "__wrapped__")


def test_property_docstring_and_callable_kind_predicates() -> None:
    """Property docs survive; inspect's kind predicates see through the decorator."""
    assert Slotted.prop.__doc__ == "Prop doc."
    assert inspect.iscoroutinefunction(adouble)
    assert asyncio.iscoroutinefunction(adouble)
    assert inspect.isgeneratorfunction(gen_range)
    assert inspect.isasyncgenfunction(agen_range)
    assert not inspect.iscoroutinefunction(double)
    assert inspect.iscoroutinefunction(Slotted().amethod)


def test_functools_wraps_stacking_both_orders(spans: Any) -> None:
    """Another functools.wraps decorator above or below @run keeps metadata and spans."""

    def other(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return wrapper

    @other
    @coworker.run
    def above(x: int, *, y: int = 1) -> int:
        """Above."""
        return x + y

    @coworker.run
    @other
    def below(x: int, *, y: int = 1) -> int:
        """Below."""
        return x + y

    def reference(x: int, *, y: int = 1) -> int: ...

    assert above(1, y=2) == below(1, y=2) == 3
    for fn, doc in ((above, "Above."), (below, "Below.")):
        assert fn.__doc__ == doc
        assert inspect.signature(fn) == inspect.signature(reference)
    assert [_short(s) for s in spans.get_finished_spans()] == ["above", "below"]


def test_partial_and_callable_object_of_async_and_generator(spans: Any) -> None:
    """partials and callable objects of coroutines/generators get the right wrapper kind."""

    async def base(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    class AsyncCallable:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0.01)
            return x

    class GenCallable:
        def __call__(self, n: int):
            yield from range(n)

    p = coworker.run(functools.partial(base, 1))
    ac = coworker.run(AsyncCallable())
    gc_ = coworker.run(GenCallable())
    assert asyncio.run(p(2)) == 3
    assert asyncio.run(ac(7)) == 7
    it = gc_(2)
    assert _short(spans.get_finished_spans()[-1]) == "AsyncCallable"  # gen not started yet
    assert list(it) == [0, 1]
    by = {_short(s): s for s in spans.get_finished_spans()}
    # The async callable's span covers the await (>= 10 ms), not just coroutine creation.
    assert by["AsyncCallable"].end_time - by["AsyncCallable"].start_time >= 9_000_000
    assert set(by) == {"base", "AsyncCallable", "GenCallable"}


def test_unstarted_decorated_coroutine_closes_without_warning() -> None:
    """A decorated coroutine closed or cancelled before it starts warns no more than a plain one."""

    async def main() -> None:
        task = asyncio.create_task(adouble(1))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coro = adouble(1)
        coro.close()
        del coro
        asyncio.run(main())
        gc.collect()
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == []


def test_coroutine_argument_errors_raise_at_call_time() -> None:
    """A bad call of a decorated async def raises TypeError at once, like the plain one."""
    with pytest.raises(TypeError):
        coro = adouble()  # type: ignore[call-arg]
        coro.close()


def test_decorated_module_level_function_pickles() -> None:
    """pickle round-trips a decorated module-level function by reference."""
    assert pickle.loads(pickle.dumps(double))(3) == 6


class _Svc:
    def __init__(self, k: int) -> None:
        self.k = k

    @coworker.run
    def work(self, x: int) -> int:
        return self.k * x


def test_decorated_bound_method_pickles() -> None:
    """pickle round-trips svc.work and _Svc.work like plain methods."""
    svc = _Svc(3)
    assert pickle.loads(pickle.dumps(svc.work))(2) == 6
    assert pickle.loads(pickle.dumps(_Svc.work))(svc, 2) == 6


def test_decorated_function_copies() -> None:
    """copy.copy and copy.deepcopy of a decorated function work like for a function."""
    assert copy.copy(double)(2) == 4
    assert copy.deepcopy(double)(2) == 4


# ----------------------------------------------------------------------------------------
# Exceptions
# ----------------------------------------------------------------------------------------


def test_same_exception_object_traceback_and_context(spans: Any) -> None:
    """The same exception object propagates with its traceback, __cause__ and __context__."""

    def deepest() -> None:
        try:
            raise KeyError("first")
        except KeyError as exc:
            raise ValueError("second") from exc

    @coworker.run
    def outer() -> None:
        deepest()

    with pytest.raises(ValueError) as info:
        outer()
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-2:] == ["outer", "deepest"]
    assert isinstance(info.value.__cause__, KeyError)
    assert isinstance(info.value.__context__, KeyError)


@pytest.mark.parametrize(
    ("exc", "failed"),
    [
        (KeyboardInterrupt(), True),
        (SystemExit(0), False),
        (SystemExit(None), False),
        (SystemExit(2), True),
        (SystemExit("fatal"), True),
        (MemoryError(), True),
    ],
)
def test_base_exceptions_end_the_span(spans: Any, exc: BaseException, failed: bool) -> None:
    """BaseExceptions propagate as-is; the span always ends; a clean exit is not an error."""

    @coworker.run
    def boom() -> None:
        raise exc

    with pytest.raises(type(exc)) as info:
        boom()
    assert info.value is exc
    (span,) = spans.get_finished_spans()
    assert (span.status.status_code is StatusCode.ERROR) is failed
    assert (attr.ERROR_TYPE in span.attributes) is failed


def test_cancelled_coroutine_ends_span_and_restores_context(spans: Any) -> None:
    """A decorated coroutine cancelled mid-await ends its span (CancelledError) cleanly."""
    started = asyncio.Event()

    @coworker.run
    async def waits() -> None:
        started.set()
        await asyncio.sleep(10)

    async def main() -> None:
        with coworker.flow("batch-job", "c1"):
            task = asyncio.create_task(waits())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert coworker.current_run() is None

    asyncio.run(main())
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.ERROR_TYPE] == "asyncio.exceptions.CancelledError"
    assert span.attributes[attr.FLOW_ID] == "c1"


def test_exception_with_raising_str_in_debug_mode(spans: Any) -> None:
    """An exception whose __str__ raises is still recorded (debug stack trace included)."""

    class Hostile(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    @coworker.run
    def boom() -> None:
        raise Hostile

    coworker.configure(debug=True, metrics=False)
    with pytest.raises(Hostile):
        boom()
    (span,) = spans.get_finished_spans()
    (event,) = span.events
    assert event.attributes[attr.EXCEPTION_MESSAGE].startswith("<unprintable")
    assert "Hostile" in event.attributes[attr.EXCEPTION_STACKTRACE]


def test_stopiteration_escaping_a_plain_function_is_a_failure(spans: Any) -> None:
    """`next()` on an empty iterator inside a plain run is an error of that run."""

    @coworker.run
    def first(items: list[int]) -> int:
        return next(iter(items))

    with pytest.raises(StopIteration):
        first([])
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attr.ERROR_TYPE] == "StopIteration"


# ----------------------------------------------------------------------------------------
# Context leaks, nesting, breaks
# ----------------------------------------------------------------------------------------


def test_exception_through_nested_blocks_restores_everything(spans: Any) -> None:
    """An exception crossing flow/step/identity/run blocks restores each level exactly."""
    orders = coworker.workflow("orders", steps=["pay"])
    with coworker.flow("batch-job", "outer") as outer:
        with pytest.raises(RuntimeError):
            with orders.start("wf"), coworker.step("pay"), coworker.acting_as("u", "a"):
                with coworker.run("inner-block"):
                    raise RuntimeError("x")
        assert coworker.current_flow() is outer
        assert coworker.current_step() is None
        assert coworker.current_identity() is None
        assert coworker.current_run() is None
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.FLOW_ID] == "wf"
    assert span.attributes[attr.STEP_ID] == "pay"


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


def test_shared_run_options_block_in_concurrent_tasks(spans: Any) -> None:
    """One shared coworker.run(...) block object in concurrent tasks: no crossover."""
    shared = coworker.run("shared-block", operation="select")

    async def request(user: str, delay: float) -> tuple[str, str]:
        with coworker.acting_as(user):
            await asyncio.sleep(delay)
            async with shared as r:
                await asyncio.sleep(0.02)
                assert coworker.current_run() is r
            assert coworker.current_run() is None
            return user, coworker.current_identity().user_id

    async def main() -> list[tuple[str, str]]:
        return await asyncio.gather(request("alice", 0), request("bob", 0.01))

    assert asyncio.run(main()) == [("alice", "alice"), ("bob", "bob")]
    users = sorted(s.attributes[attr.USER_ID] for s in spans.get_finished_spans())
    assert users == ["alice", "bob"]


SYSTEM = coworker.acting_as("system")  # a module-level block, shared like a constant


def test_shared_acting_as_block_in_concurrent_tasks_keeps_each_identity(spans: Any) -> None:
    """Each task gets back its own identity after leaving a shared acting_as block."""

    async def request(user: str, delay: float) -> str | None:
        with coworker.acting_as(user):
            await asyncio.sleep(delay)
            async with SYSTEM:
                await asyncio.sleep(0.02)
            identity = coworker.current_identity()
            return identity.user_id if identity is not None else None

    async def main() -> list[str | None]:
        return await asyncio.gather(request("alice", 0), request("bob", 0.01))

    assert asyncio.run(main()) == ["alice", "bob"]


def test_shared_acting_as_block_nested_restores(spans: Any) -> None:
    """Nested use of one acting_as object restores the caller's identity, no error."""
    try:
        with coworker.acting_as("caller"):
            with SYSTEM:
                with SYSTEM:
                    pass
            assert coworker.current_identity().user_id == "caller"
    finally:
        SCOPE.set(EMPTY_SCOPE)  # undo the leak so the other tests stay meaningful


def test_idle_timeout_counts_from_the_end_of_the_last_run(spans: Any) -> None:
    """A long run followed at once by another stays in one flow."""

    @coworker.run
    def long_call() -> None:
        time.sleep(0.15)

    @coworker.run
    def quick() -> None:
        pass

    with coworker.flow("ai-conversation", "f", idle_timeout=0.1):
        long_call()
        quick()
    ids = [s.attributes[attr.FLOW_ID] for s in spans.get_finished_spans()]
    assert ids == ["f", "f"]


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


def test_in_flight_run_keeps_flow_active(spans: Any) -> None:
    """While any run of the flow is running, the flow is not idle."""
    started = threading.Event()

    @coworker.run
    def long_call() -> None:
        started.set()
        time.sleep(0.25)

    @coworker.run
    def quick() -> None:
        pass

    with coworker.flow("ai-conversation", "f", idle_timeout=0.1):
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(coworker.propagate(long_call))
            started.wait(5)
            time.sleep(0.15)
            quick()
            fut.result()
    ids = {_short(s): s.attributes[attr.FLOW_ID] for s in spans.get_finished_spans()}
    assert ids == {"quick": "f", "long_call": "f"}


def test_idle_timeout_breaks_after_real_idleness(spans: Any) -> None:
    """After real inactivity the next run breaks with 'timeout', linked to the old flow."""

    @coworker.run
    def quick() -> None:
        pass

    with coworker.flow("batch-job", "f", idle_timeout=0.05):
        quick()
        time.sleep(0.08)
        quick()
        quick()
    a = [s.attributes for s in spans.get_finished_spans()]
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


def test_concurrent_runs_after_idle_share_one_new_flow(spans: Any) -> None:
    """Runs racing after an idle period all land in one new flow."""
    probe = _Rendezvous()

    @coworker.run
    def quick() -> None:
        pass

    with coworker.flow("batch-job", "f", idle_timeout=0.05, probe=probe):
        quick()
        time.sleep(0.08)
        probe.armed = True
        with ThreadPoolExecutor(2) as pool:
            for fut in [pool.submit(coworker.propagate(quick)) for _ in range(2)]:
                fut.result()
    later = [s.attributes[attr.FLOW_ID] for s in spans.get_finished_spans()[1:]]
    assert len(later) == 2
    assert later[0] == later[1]


# ----------------------------------------------------------------------------------------
# Capture and attributes
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Inner:
    api_key: str
    n: int


@dataclasses.dataclass
class _Outer:
    inner: _Inner
    Token: str
    note: str


def test_capture_redacts_nested_keys_and_dataclasses(spans: Any) -> None:
    """Redaction applies at every depth, in dicts, kwargs and (nested) dataclasses."""

    @coworker.run(capture_input=True, capture_output=True)
    def call(payload: dict, obj: _Outer, **extra: Any) -> dict:
        return {"headers": {"Authorization": "Bearer out-secret"}, "ok": True}

    call(
        {"user": {"PassWord": "p1", "profile": {"session_key": "p2", "name": "ann"}}},
        _Outer(_Inner("p3", 1), "p4", "visible"),
        client_secret="p5",
    )
    (span,) = spans.get_finished_spans()
    text = span.attributes[attr.INPUT] + span.attributes[attr.OUTPUT]
    for secret in ("p1", "p2", "p3", "p4", "p5", "out-secret"):
        assert secret not in text
    assert "ann" in text and "visible" in text and '"ok":true' in text


def test_capture_survives_hostile_and_huge_values(spans: Any) -> None:
    """Recursive, unrepresentable, huge and unserializable values never break the call."""

    class BadRepr:
        def __repr__(self) -> str:
            raise ValueError("no repr")

    class Huge:
        def __repr__(self) -> str:
            return "x" * 200_000

    recursive: dict[str, Any] = {"password": "p"}
    recursive["self"] = recursive
    looped: list[Any] = []
    looped.append(looped)

    @coworker.run(capture_input=True, capture_output=True)
    def call(*values: Any) -> Any:
        return values[0]

    values = (recursive, looped, BadRepr(), Huge(), 10**5000, float("nan"), b"\x00" * 10)
    assert call(*values) is recursive
    (span,) = spans.get_finished_spans()
    for key in (attr.INPUT, attr.OUTPUT):
        assert len(span.attributes[key]) <= 4096
    assert '"p"' not in span.attributes[attr.INPUT]


class _Login(NamedTuple):
    user: str
    password: str


class _Repo:
    @coworker.run(
        operation="update",
        capture_input=True,
        attributes=lambda a: {"doctype": a.get("doctype"), "record": a.get("record_id")},
    )
    def save(self, doctype: str, record_id: str, force: bool = False) -> str:
        return record_id


def test_method_called_through_the_class_binds_arguments_right(spans: Any) -> None:
    """Class.method(obj, ...) gives the attributes callable the same arguments as obj.method."""
    repo = _Repo()
    assert _Repo.save(repo, "Invoice", "INV-1") == "INV-1"
    assert repo.save("Invoice", "INV-1") == "INV-1"
    via_class, via_instance = spans.get_finished_spans()
    assert via_instance.name == "update Invoice"
    assert via_class.name == via_instance.name
    assert via_class.attributes["record"] == "INV-1"
    assert via_class.attributes[attr.INPUT] == via_instance.attributes[attr.INPUT]


def test_doctype_rule_applies_when_method_called_through_class(spans: Any) -> None:
    """A doctype rule refuses the run whichever way the decorated method is called."""
    deleted: list[str] = []

    class Repo:
        @coworker.run(operation="delete", attributes=lambda a: {"doctype": a["doctype"]})
        def delete(self, doctype: str, name: str) -> None:
            deleted.append(name)

    coworker.configure(
        policy={
            "roles": {"admin": {"*": ["*"]}},
            "users": {"root": ["admin"]},
            "doctypes": {"Ledger": {"deny": ["delete"]}},
        },
        metrics=False,
    )
    repo = Repo()
    with coworker.acting_as("root"):
        with pytest.raises(coworker.PermissionDenied):
            repo.delete("Ledger", "L-1")
        with pytest.raises(coworker.PermissionDenied):
            Repo.delete(repo, "Ledger", "L-2")
    assert deleted == []


def test_capture_redacts_namedtuple_and_namespace_fields(spans: Any) -> None:
    """Secrets in NamedTuple and SimpleNamespace fields are redacted like dict keys."""

    @coworker.run(capture_input=True)
    def login(creds: Any, ns: Any) -> None:
        pass

    login(_Login("bob", "hunter2"), types.SimpleNamespace(user="bob", api_key="k-123"))
    (span,) = spans.get_finished_spans()
    captured = span.attributes[attr.INPUT]
    assert "bob" in captured
    assert "hunter2" not in captured
    assert "k-123" not in captured


def test_capture_redacts_argparse_namespace(spans: Any) -> None:
    """Secrets in argparse.Namespace attributes are redacted like dict keys."""

    @coworker.run(capture_input=True)
    def main(options: Any) -> None:
        pass

    main(argparse.Namespace(user="bob", password="hunter2"))
    (span,) = spans.get_finished_spans()
    assert "bob" in span.attributes[attr.INPUT]
    assert "hunter2" not in span.attributes[attr.INPUT]


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


# ----------------------------------------------------------------------------------------
# Threads and processes
# ----------------------------------------------------------------------------------------


def test_propagate_used_concurrently_from_a_pool(spans: Any) -> None:
    """One propagate() wrapper called by 16 threads at once carries the caller's context."""
    barrier = threading.Barrier(16, timeout=5)

    @coworker.run(operation="select")
    def task(i: int) -> tuple[int, str | None]:
        barrier.wait()
        with coworker.acting_as(f"user-{i}"):
            return i, coworker.current_identity().user_id

    with coworker.flow("batch-job", "b"), coworker.step("fan"), coworker.acting_as("boss"):
        with coworker.run("parent") as parent, ThreadPoolExecutor(16) as pool:
            fn = coworker.propagate(task)
            results = list(pool.map(fn, range(16)))
        assert coworker.current_identity().user_id == "boss"
    assert results == [(i, f"user-{i}") for i in range(16)]
    runs = [s for s in spans.get_finished_spans() if s.name != "parent"]
    assert len(runs) == 16
    for s in runs:
        assert s.attributes[attr.FLOW_ID] == "b"
        assert s.attributes[attr.STEP_ID] == "fan"
        assert s.attributes[attr.USER_ID] == "boss"
        assert s.attributes[attr.RUN_PARENT_ID] == parent.id
    assert len({s.attributes[attr.RUN_ID] for s in runs}) == 16


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


def test_propagate_async_function_into_thread(spans: Any) -> None:
    """propagate() of a coroutine function carries the flow when run in a thread's loop."""

    @coworker.run
    async def af() -> str | None:
        f = coworker.current_flow()
        return f.id if f is not None else None

    with coworker.flow("batch-job", "J"), ThreadPoolExecutor(1) as pool:
        result = pool.submit(asyncio.run, coworker.propagate(af)()).result()
    assert result == "J"


@pytest.mark.parametrize(
    "carrier",
    [
        {"traceparent": "garbage"},
        {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},
        {"traceparent": "ff-zz", "tracestate": "==="},
        {"baggage": "%%%,==,;;"},
        {"baggage": "coworker.flow.type=BAD TYPE,coworker.flow.id=x"},
        {"baggage": "coworker.flow.type=batch-job,coworker.flow.id="},
        {"baggage": "coworker.user.id=,coworker.gen_ai.agent.id="},
        {"baggage": "coworker.user.id=" + "a" * 10_000},
        {"baggage": ",".join(f"k{i}=v" for i in range(500))},
        {"traceparent": ["a", "b"]},
        {},
    ],
)
def test_extract_malformed_strings_never_raises(spans: Any, carrier: dict) -> None:
    """Malformed W3C headers give an Extracted with no flow/identity; nothing raises."""

    @coworker.run
    def work() -> None:
        pass

    with coworker.extract(carrier, trust_identity=True) as ex:
        work()
        assert coworker.current_identity() is None
    assert ex.flow is None
    (span,) = spans.get_finished_spans()
    assert attr.FLOW_ID not in span.attributes and attr.USER_ID not in span.attributes


def test_extract_list_valued_headers_continue_trace_and_flow(spans: Any) -> None:
    """A carrier of str -> list[str] (OTel's default getter format) is read like str -> str."""
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    carrier: Any = {
        "traceparent": [f"00-{trace_id}-b7ad6b7169203331-01"],
        "baggage": ["coworker.flow.type=batch-job,coworker.flow.id=L1"],
    }

    @coworker.run
    def work() -> None:
        pass

    with coworker.extract(carrier) as ex:
        work()
    assert ex.flow is not None and ex.flow.id == "L1"
    (span,) = spans.get_finished_spans()
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.attributes[attr.FLOW_ID] == "L1"


def test_extract_bytes_header_values_never_raises() -> None:
    """bytes header values are decoded or ignored, never an exception."""
    carrier: Any = {
        "traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "baggage": b"coworker.flow.type=batch-job,coworker.flow.id=k1",
    }
    with coworker.extract(carrier):
        pass


def test_current_run_inside_extract_is_a_run_or_none(spans: Any) -> None:
    """current_run() keeps its documented type on the receiving side of a propagation."""
    carrier: dict[str, str] = {}
    with coworker.run("client"):
        coworker.inject(carrier)
    with coworker.extract(carrier):
        r = coworker.current_run()
        assert r is None or isinstance(r, coworker.Run)


def test_inject_extract_round_trip_of_awkward_values(spans: Any) -> None:
    """Commas, '=', ';', '+', spaces, '%20' and non-ASCII survive the baggage round trip."""
    flow_id = "id with space,comma=eq;semi+plus é"
    carrier: dict[str, str] = {}
    with coworker.flow("batch-job", flow_id), coworker.step("s p;a=c,e"):
        with coworker.acting_as("u+1 2,3=4;é", agent="a%20b", agent_name="Ag ent"):
            coworker.inject(carrier)
    with coworker.extract(carrier, trust_identity=True) as ex:
        assert coworker.current_step() == "s p;a=c,e"
    assert ex.flow is not None and ex.flow.id == flow_id
    claimed = ex.identity_claimed
    assert claimed is not None
    assert (claimed.user_id, claimed.agent_id, claimed.agent.name) == (
        "u+1 2,3=4;é",
        "a%20b",
        "Ag ent",
    )


# ----------------------------------------------------------------------------------------
# configure
# ----------------------------------------------------------------------------------------


def test_configure_from_threads_installs_one_processor(spans: Any) -> None:
    """Concurrent configure() calls leave one CoworkerProcessor and one live exporter."""
    exporters = [InMemorySpanExporter() for _ in range(8)]
    barrier = threading.Barrier(8, timeout=5)

    def configure(e: InMemorySpanExporter) -> None:
        barrier.wait()
        coworker.configure(exporter=SimpleSpanProcessor(e), metrics=False)

    threads = [threading.Thread(target=configure, args=(e,)) for e in exporters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    provider = trace.get_tracer_provider()
    ours = [
        p
        for p in provider._active_span_processor._span_processors  # type: ignore[attr-defined]
        if type(p).__name__ == "CoworkerProcessor"
    ]
    assert len(ours) == 1 and ours[0] is _setup._processor
    assert len(ours[0].members) == 1

    @coworker.run
    def f() -> None:
        pass

    f()
    assert sorted(len(e.get_finished_spans()) for e in exporters) == [0] * 7 + [1]
    assert len(spans.get_finished_spans()) == 1
    coworker.shutdown()
    coworker.shutdown()
    f()
    assert sum(len(e.get_finished_spans()) for e in exporters) == 1
