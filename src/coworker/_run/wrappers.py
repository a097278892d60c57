"""The wrappers: a few lines per callable kind over the one lifecycle
(:func:`coworker._run.lifecycle.begin` / :meth:`~coworker._run.lifecycle.Run.end`).

wrapt's ``FunctionWrapper`` keeps the signature, names, docstring and ``__wrapped__``, binds
methods, classmethods and staticmethods, and proxies ``__code__`` (so
``inspect.iscoroutinefunction`` stays true); :mod:`coworker._run.pickling` adds pickling by
reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from coworker._run.generators import drive, drive_async, named_driver, new_view
from coworker._run.lifecycle import begin
from coworker._run.pickling import Wrapper
from coworker._run.spec import Spec, check_arguments, kind_of

__all__ = ["decorate"]

Wrapped = Callable[..., Any]


def decorate(fn: Any, spec_for: Callable[[Any, str], Spec]) -> Any:
    """Wrap ``fn`` (a callable, classmethod or staticmethod) for its kind.

    Args:
        fn: what the decorator was applied to.
        spec_for: builds the :class:`Spec` from the target and its qualified name.
    """
    target = fn.__func__ if isinstance(fn, classmethod | staticmethod) else fn
    if not callable(target):
        raise TypeError(f"coworker.run can only decorate callables, got {type(fn).__name__}")
    spec = spec_for(target, _qualname(target))
    kind = kind_of(target)
    if kind == "async generator":
        return Wrapper(fn, _agen_wrapper(spec))
    if kind == "coroutine":
        return Wrapper(fn, _async_wrapper(spec))
    if kind == "generator":
        return Wrapper(fn, _gen_wrapper(spec))
    return Wrapper(fn, _sync_wrapper(spec))


def _qualname(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str):
        return name
    if isinstance(fn, functools.partial):
        return _qualname(fn.func)
    return type(fn).__qualname__


def _sync_wrapper(spec: Spec) -> Callable[..., Any]:
    capture_output = spec.capture_output

    def wrapper(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        r = begin(spec, (instance, args, kwargs))
        if r is None:
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            r.end(exc)
            raise
        if capture_output:
            r.set_output(result)
        r.end()
        return result

    return wrapper


def _async_wrapper(spec: Spec) -> Callable[..., Any]:
    capture_output = spec.capture_output

    async def run_coroutine(
        wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        r = begin(spec, (instance, args, kwargs))
        if r is None:
            return await wrapped(*args, **kwargs)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            r.end(exc)
            raise
        if capture_output:
            r.set_output(result)
        r.end()
        return result

    def wrapper(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        # Wrong arguments raise TypeError here, at the call site, as they always did; the
        # original's coroutine is created only when awaited, so a coroutine that is closed or
        # cancelled before it starts leaves no "never awaited" warning behind.
        check_arguments(spec, instance, args, kwargs)
        return run_coroutine(wrapped, instance, args, kwargs)

    return wrapper


def _gen_wrapper(spec: Spec) -> Callable[..., Any]:
    driver: Any = None

    def wrapper(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        nonlocal driver
        # Calling the original creates the generator (argument errors raise here, as before);
        # its body, the policy check and the span wait for the first next().
        orig = wrapped(*args, **kwargs)
        if driver is None:
            driver = named_driver(drive, orig)
        return driver(new_view(orig, spec, (instance, args, kwargs)))

    return wrapper


def _agen_wrapper(spec: Spec) -> Callable[..., Any]:
    driver: Any = None

    def wrapper(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        nonlocal driver
        orig = wrapped(*args, **kwargs)
        if driver is None:
            driver = named_driver(drive_async, orig)
        return driver(new_view(orig, spec, (instance, args, kwargs)))

    return wrapper
