"""Exceptions pass through runs untouched and end their spans as failures."""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import coworker
from coworker import attributes as attr


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


@pytest.mark.usefixtures("flow_spans_off")
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
