"""Decorated generators and async generators: real generators that drive the original.

Calling a decorated generator function creates the original generator at once (argument
errors raise where they always did) and returns a *real* generator (``inspect.isgenerator``,
``types.GeneratorType``; for async ones ``inspect.isasyncgen``) whose body drives the
original one step at a time. Python itself then provides the generator protocol: ``send``,
``throw``, ``close``, re-entrance and first-``send`` errors, ``gi_running`` and
``inspect.getgeneratorstate``, closing on garbage collection (what an early ``break``
amounts to), and for async generators ``__anext__``/``asend``/``athrow`` awaitables that
``asyncio.create_task`` accepts plus the event loop's finalizer hooks.

A plain generator runs in its consumer's context. The driver keeps that for every
application ``ContextVar`` and gives the body its own view of just two variables, coworker's
scope and the OTel current context: they start as they were at the call site (so the body
sees the flow, step and identity of the place it was created), carry the run's span while
the body runs, and are swapped back to the consumer's values after every step. The span is
therefore current exactly while the body runs. The policy check happens at the first step
(a refused generator stays refused); the span ends on exhaustion, ``close()``, an exception,
and garbage collection; one started and still suspended at interpreter exit is ended as a
failure by :func:`finish_abandoned`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, Generator
from typing import Any, Final

from opentelemetry.context import Context

from coworker._run import otelctx
from coworker._run.lifecycle import Call, Run, begin
from coworker._run.spec import Spec
from coworker._scope import SCOPE, Scope, restore

__all__ = ["View", "drive", "drive_async", "finish_abandoned"]

_scope_get = SCOPE.get
_scope_set = SCOPE.set
_scope_reset = SCOPE.reset
_otel_get = otelctx.get_current
_otel_set = otelctx.attach
_otel_reset = otelctx.reset


class View:
    """One decorated generator call: the original, the body's view of the context, the run."""

    __slots__ = ("call", "done", "orig", "otel", "run", "scope", "spec")
    # scope/otel: the body's view as of the call; the drivers carry it on from there.

    def __init__(self, orig: Any, spec: Spec, call: Call) -> None:
        self.orig = orig
        self.spec = spec
        self.call = call
        self.scope: Scope = _scope_get()
        self.otel: Any = _otel_get()
        self.run: Run | None = None
        self.done = False

    def start(self) -> None:
        """Open the run (inside the body's view); a refusal closes the original unstarted."""
        try:
            self.run = begin(self.spec, self.call)
        except BaseException:
            self.done = True  # refused (policy, fail-closed): the body never runs
            _close_unstarted(self.orig)
            raise
        if self.run is not None:
            _SUSPENDED.add(self)

    def finish(self, exc: BaseException | None) -> None:
        """End the run's span (once); the steps restore the context, not this."""
        if self.done:
            return
        self.done = True
        _SUSPENDED.discard(self)
        r = self.run
        if r is not None:
            if isinstance(exc, StopIteration | StopAsyncIteration):
                exc = None  # exhaustion is the generator's success
            r.end_detached(exc)

    def running(self) -> bool:
        """The original is executing right now (in some thread)."""
        orig = self.orig
        return bool(getattr(orig, "gi_running", False) or getattr(orig, "ag_running", False))


_SUSPENDED: Final[set[View]] = set()
"""Generator runs whose body has started and not finished (their span is open). A plain set
(C-speed add/discard): a view leaves it when its run finishes, which a collected driver
does too (collection closes it)."""


def finish_abandoned() -> int:
    """End the span of every started, unfinished decorated generator, as a failure.

    Called at interpreter exit, before the audit trail is flushed and closed: a generator
    that ran part of its body (and may have changed state) and was never exhausted or
    closed would otherwise end its span only when collected, after the audit store is gone,
    and its record would be lost. Its record says ``RuntimeError`` (abandoned).

    Returns:
        How many runs were ended.
    """
    ended = 0
    for view in list(_SUSPENDED):
        if view.running():
            continue  # executing right now (another thread): it will end its own span
        view.finish(RuntimeError("generator abandoned: never finished before exit"))
        ended += 1
    return ended


def _close_unstarted(orig: Any) -> None:
    if hasattr(orig, "aclose"):
        # A never-started async generator closes without running anything.
        closer = orig.aclose()
        try:
            closer.send(None)
        except StopIteration:
            pass
        finally:
            closer.close()
    else:
        orig.close()


def drive(view: View) -> Generator[Any, Any, Any]:
    """A real generator running ``view.orig`` step by step inside the body's view.

    Each ``send``/``throw`` (``close`` and garbage collection throw ``GeneratorExit``) is
    forwarded to the original with the view swapped in, and the view swapped out again
    before the value reaches the consumer.
    """
    orig = view.orig
    method = orig.send
    arg: Any = None
    # The body's view of the two variables, kept in locals: each step swaps them in and out.
    scope, otel = view.scope, view.otel
    scope_set, scope_get, scope_reset = _scope_set, _scope_get, _scope_reset
    otel_set, otel_get, otel_reset = _otel_set, _otel_get, _otel_reset
    started = False
    try:
        while True:
            scope_token = scope_set(scope)
            otel_token = otel_set(otel)
            try:
                if not started:
                    started = True
                    view.start()
                item = method(arg)
            finally:
                scope = scope_get()
                otel = otel_get()
                try:
                    otel_reset(otel_token)
                    scope_reset(scope_token)
                except ValueError:  # resumed in another context than the step began in
                    _restore(otel_token, scope_token)
            try:
                arg = yield item
                method = orig.send
            except BaseException as exc:  # throw(), close(), collection: the body's to handle
                arg = exc
                method = orig.throw
    except StopIteration as stop:
        view.finish(None)
        return stop.value
    except BaseException as exc:
        view.finish(exc)
        raise


async def drive_async(view: View) -> AsyncGenerator[Any, Any]:
    """A real async generator running ``view.orig`` inside the body's view.

    The view is swapped in around each awaited ``asend``/``athrow`` of the original: while
    that await is suspended the event loop runs other tasks, each in its own context, so
    only the body ever sees the run's span.
    """
    orig = view.orig
    method = orig.asend
    arg: Any = None
    started = False
    try:
        while True:
            scope_token = _scope_set(view.scope)
            otel_token = _otel_set(view.otel)
            try:
                if not started:
                    started = True
                    view.start()
                    step = _unhooked(method, arg)
                else:
                    step = method(arg)
                item = await step
            finally:
                view.scope = _scope_get()
                view.otel = _otel_get()
                try:
                    _otel_reset(otel_token)
                    _scope_reset(scope_token)
                except ValueError:  # resumed in another context than the step began in
                    _restore(otel_token, scope_token)
            try:
                arg = yield item
                method = orig.asend
            except BaseException as exc:  # athrow(), aclose(), the loop's finalizer
                arg = exc
                method = orig.athrow
    except StopAsyncIteration:
        view.finish(None)
    except BaseException as exc:
        view.finish(exc)
        raise


def _unhooked(method: Any, arg: Any) -> Any:
    """The first awaitable of the original, made with the event loop's async-generator
    hooks switched off: only the driver is registered with the loop, which finalizes it
    (and it the original), so the loop never closes the two concurrently at shutdown."""
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(None, None)
    try:
        return method(arg)
    finally:
        sys.set_asyncgen_hooks(*hooks)


def _restore(otel_token: Any, scope_token: Any) -> None:
    """Put the consumer's values back when the tokens cannot be reset (the consumer resumed
    the generator in another context than the step started in)."""
    try:
        _otel_reset(otel_token)
    except (ValueError, RuntimeError):
        old = otel_token.old_value
        _otel_set(Context() if old is otel_token.MISSING else old)
    restore(scope_token)
