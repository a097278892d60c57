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
sees the flow, step and identity of the place it was created) and carry the run's span while
the body runs. Each step runs in a context of the body's own with one ``Context.run``, kept
in step with the consumer's application variables both ways (:class:`View`): about a fifth
of what swapping the two variables in and out around every step cost. The span is
therefore current exactly while the body runs. The policy check happens at the first step
(a refused generator stays refused); the span ends on exhaustion, ``close()``, an exception,
and garbage collection; one started and still suspended at interpreter exit is ended as a
failure by :func:`finish_abandoned`.
"""

from __future__ import annotations

import contextvars
import sys
import types
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from typing import Any, Final, cast

from opentelemetry.context import Context

from coworker._run import otelctx
from coworker._run.lifecycle import Call, Run, begin
from coworker._run.spec import Spec
from coworker._scope import SCOPE, Scope, restore

__all__ = ["View", "drive", "drive_async", "finish_abandoned", "named_driver", "new_view"]

_scope_get = SCOPE.get
_scope_set = SCOPE.set
_scope_reset = SCOPE.reset
_otel_get = otelctx.get_current
_otel_set = otelctx.attach
_otel_reset = otelctx.reset
_copy_context: Final = contextvars.copy_context
_OTEL_VAR: Final = otelctx._VAR
_OURS: Final = frozenset(v for v in (SCOPE, _OTEL_VAR) if v is not None)
"""coworker's scope and the OTel current context: the body's own, never kept in step."""
_MISSING: Final = contextvars.Token.MISSING
_EXHAUSTED: Final = (StopIteration, StopAsyncIteration)
_new_view: Final = object.__new__
_new_context: Final = contextvars.Context
_NOTHING: Final = contextvars.Context()
"""No variables to fill in: :func:`_enter` then only opens the run (the swapping drivers)."""
_get_hooks: Final = sys.get_asyncgen_hooks
_set_hooks: Final = sys.set_asyncgen_hooks


class View:
    """One decorated generator call: the original, the body's context, the run.

    A plain generator has no context of its own: its body reads and writes the context of
    whoever resumes it. A decorated one runs each step with ``Context.run`` in a context of
    its own (``ctx``: one context switch per step, where swapping two variables in and out
    cost five times as much), kept in step with the consumer's for every application
    variable, both ways: what the consumer set or unset between two steps is pulled in
    before the next one (:meth:`pull`), what the body set or unset during a step is pushed
    out to the consumer after it (:meth:`push`). Only coworker's scope and the OTel current
    context are the body's own: the view of its call site, then its span. Two snapshots of
    an unchanged context compare by one pointer comparison, so a step where neither side
    changed anything costs a context copy and two comparisons; and since the body always
    runs in the same context, its own tokens work across its steps.
    """

    __slots__ = (
        "call",
        "ctx",
        "done",
        "orig",
        "otel",
        "pulled",
        "pushed",
        "run",
        "scope",
        "snap",
        "spec",
    )

    orig: Any
    spec: Spec
    call: Call
    scope: Scope
    """The body's scope as of the call site (the swapping drivers carry it on from there)."""
    otel: Any
    """The body's OTel context as of the call site (likewise)."""
    run: Run | None
    done: bool
    ctx: contextvars.Context
    """The body's context (set by the driver at the first step)."""
    pulled: dict[contextvars.ContextVar[Any], contextvars.Token[Any]] | None
    """Tokens of variables the driver created from nothing in the body's context: resetting
    one is how a variable is unset there."""
    pushed: dict[contextvars.ContextVar[Any], contextvars.Token[Any]] | None
    """The same for the consumer's context."""
    snap: contextvars.Context
    """The body's context as the first step left it once the run was open (before the body
    ran): what the driver compares with to see what the body changed (set by
    :func:`_enter`)."""

    def enter(self) -> contextvars.Context:
        """The body's context at the first step: the consumer's variables, with the call
        site's view and the run (opened there); see :func:`_enter`."""
        ctx = self.ctx = contextvars.Context()
        ctx.run(_enter, self, _copy_context())
        return ctx

    def pull(self, cur: contextvars.Context) -> contextvars.Context:
        """Bring what the consumer changed (its context is ``cur``) into the body's context;
        return the body's context afterwards (a new one, rarely: see below)."""
        ctx = self.ctx
        assert ctx is not None
        if self.pulled is None:
            self.pulled = {}
        if ctx.run(_apply, cur, ctx, self.pulled):
            return ctx
        # The consumer unset a variable the body's context has had from the start: no token
        # can unset it there, so the body continues in a new context made of the
        # consumer's variables and its own view (its older tokens no longer reset).
        new = self.ctx = contextvars.Context()
        self.pulled = {}
        new.run(_rebuild, cur, ctx, self.pulled)
        return new

    def push(self, before: contextvars.Context) -> contextvars.Context:
        """Bring what the body changed during a step (its context was ``before``) into the
        consumer's context; return the consumer's context afterwards."""
        if self.pushed is None:
            self.pushed = {}
        ctx = self.ctx
        assert ctx is not None
        _apply(ctx, before, self.pushed)
        return _copy_context()

    def finish(self, exc: BaseException | None) -> None:
        """End the run's span (once); the steps restore the context, not this."""
        if self.done:
            return
        self.done = True
        _SUSPENDED.discard(self)
        r = self.run
        if r is not None:
            if exc is not None and isinstance(exc, _EXHAUSTED):
                exc = None  # exhaustion is the generator's success
            r.end_detached(exc)

    def running(self) -> bool:
        """The original is executing right now (in some thread)."""
        orig = self.orig
        return bool(getattr(orig, "gi_running", False) or getattr(orig, "ag_running", False))


def new_view(orig: Any, spec: Spec, call: Call) -> View:
    """The view of one call: made without ``View.__init__`` (a class call with an
    ``__init__`` is a C-to-Python call, ~700 instructions more than this function's frame)."""
    view = _new_view(View)
    view.orig = orig
    view.spec = spec
    view.call = call
    view.scope = _scope_get()
    view.otel = _otel_get()
    view.run = None
    view.done = False
    view.pulled = view.pushed = None
    return view


def named_driver(driver: Callable[[View], Any], orig: Any) -> Callable[[View], Any]:
    """``driver`` as a function named like ``orig`` (a generator of the decorated function):
    a generator takes its ``__name__`` and ``__qualname__`` from the function that made it,
    so the driver's generators are born with the original's names (copying them onto each
    one cost ~860 instructions per call)."""
    code: Any = driver.__code__
    named: Any = types.FunctionType(
        code, driver.__globals__, orig.__name__, driver.__defaults__, driver.__closure__
    )
    named.__qualname__ = orig.__qualname__
    return cast("Callable[[View], Any]", named)


_SUSPENDED: Final[set[View]] = set()
"""Generator runs whose body has started and not finished (their span is open). A plain set
(C-speed add/discard): a view leaves it when its run finishes, which a collected driver
does too (collection closes it)."""


def _enter(view: View, cur: contextvars.Context) -> None:
    """Fill the body's new, empty context (current here) at the first step, and open the run
    in it; a refusal closes the original unstarted.

    Built from an empty context rather than copied, each application variable set with a
    token kept in :attr:`View.pulled`: a variable the consumer unsets later can then be unset
    in the body's context too, which a copy could not do without replacing the context (and
    the tokens the body holds across its steps, its own or OTel's for a span it keeps
    current across a ``yield``, would no longer reset). With :data:`_NOTHING` (the swapping
    drivers, whose two variables are already in place) it only opens the run.
    """
    if cur:  # (an empty one, often the case outside a request, needs no token table)
        tokens: dict[contextvars.ContextVar[Any], contextvars.Token[Any]] = {}
        view.pulled = tokens
        for var, value in cur.items():  # coworker's two as well (their tokens go unused)
            tokens[var] = var.set(value)
    if _scope_get() is not view.scope:
        _scope_set(view.scope)
    if _otel_get() is not view.otel:
        _otel_set(view.otel)
    try:
        r = view.run = begin(view.spec, view.call)
    except BaseException:
        view.done = True  # refused (policy, fail-closed): the body never runs
        _close_unstarted(view.orig)
        raise
    if r is not None:
        _SUSPENDED.add(view)
    view.snap = _copy_context()


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


def _drive(view: View) -> Generator[Any, Any, Any]:
    """A real generator running ``view.orig`` step by step inside the body's context.

    Each ``send``/``throw`` (``close`` and garbage collection throw ``GeneratorExit``) is
    forwarded to the original with one ``Context.run`` of the body's context
    (:class:`View`); the two contexts are compared around each step and brought in step
    only when one side changed something.
    """
    orig = view.orig
    send = orig.send
    copy = _copy_context
    try:
        ctx = view.enter()
        snap: Any = view.snap
        try:
            item = ctx.run(send, None)  # no frame of ours between the caller and the body
        finally:
            seen = view.push(snap) if ctx != snap else copy()
            snap = ctx.copy()
        while True:
            try:
                arg = yield item
                method = send
            except BaseException as exc:  # throw(), close(), collection: the body's to handle
                arg = exc
                method = orig.throw
            cur = copy()
            if cur != seen:  # the consumer changed its context since the last step
                ctx = view.pull(cur)
                snap = ctx.copy()
            seen = cur
            try:
                item = ctx.run(method, arg)
            finally:
                if ctx != snap:  # the body changed its context during the step
                    seen = view.push(snap)
                    snap = ctx.copy()
    except StopIteration as stop:
        view.finish(None)
        return stop.value
    except BaseException as exc:
        view.finish(exc)
        raise


async def _drive_async(view: View) -> AsyncGenerator[Any, Any]:
    """A real async generator running ``view.orig`` inside the body's context.

    The original's ``asend``/``athrow`` awaitables are driven by :func:`_pump`, which runs
    with one ``Context.run`` of the body's context per resumption (:class:`View`); its first
    resumption fills that context and opens the run (:func:`_enter`). What it yields is
    either ``box`` (a one-slot list of the driver's own, which nothing else can yield)
    holding the original's next item, or, while it is inside ``yield from`` an awaitable of
    the original, what the body awaits (a future, or ``None`` for a bare yield), which goes
    up to the event loop from the driver's own frame, so other tasks never see the body's
    view. The two contexts are brought in step around items only: while the body awaits,
    its consumer (the task awaiting this generator) runs nothing.

    Why a pump (measured with callgrind, 10-item generator): resuming the original's
    awaitable with ``ctx.run`` straight from this frame makes every item arrive as a
    ``StopIteration`` raised into a Python frame, ~1,600 instructions per item more than the
    pump's generator step (whose ``yield from`` takes the item without a traceback); the pump
    catching ``StopAsyncIteration`` itself (to spare the driver the exception) costs more
    in per-item checks than it saves. Telling items by the box costs ~150 instructions per
    item less than asking the pump (``gi_yieldfrom``, a descriptor lookup).
    """
    copy = _copy_context
    ctx = view.ctx = _new_context()
    seen = copy()
    box: list[Any] = [None]
    pump: Any = _pump(view, seen, box)
    send = method = pump.send
    snap: Any = None
    try:
        signal = ctx.run(send, None)  # fills the body's context, opens the run, first step
        snap = view.snap
        while True:
            if signal is box:  # an item (anything else: the body awaits)
                if ctx != snap:  # the body changed its context since the last item
                    seen = view.push(snap)
                    snap = ctx.copy()
                try:
                    arg = yield box[0]
                    method = send
                except BaseException as exc:  # athrow(), aclose(), the loop's finalizer
                    arg = exc
                    method = pump.throw
                cur = copy()
                if cur != seen:  # the consumer changed its context since the last item
                    ctx = view.pull(cur)
                    snap = ctx.copy()
                    seen = cur  # (equal ones are interchangeable: no store per item)
            else:
                try:  # the body awaits: its future goes to the event loop from here
                    arg = await _suspend(signal)
                    method = send
                except BaseException as exc:  # cancellation: the body's to handle
                    arg = exc
                    method = pump.throw
            signal = ctx.run(method, arg)
    except StopAsyncIteration:
        if ctx != snap:
            view.push(snap)
        view.finish(None)
    except BaseException as exc:
        if snap is not None and ctx != snap:
            view.push(snap)
        view.finish(exc)
        raise


@types.coroutine
def _pump(view: View, cur: contextvars.Context, box: list[Any]) -> Generator[Any, Any, None]:
    """Drive the original async generator's ``asend``/``athrow`` awaitables (inside the
    body's context, which its first resumption fills from the consumer's ``cur``): their
    suspensions pass through, each item is put in ``box`` and the box yielded, a value or
    exception sent in goes to the original's next step.

    The original's first awaitable is made with the event loop's ``firstiter`` hook switched
    off: only the driver is registered with the loop, which closes it (and it the original)
    at shutdown; registered too, the original would be closed concurrently with it. Its
    finalizer hook stays (one ``set_asyncgen_hooks`` argument less to switch): the driver
    holds the original, and a started one is held by :data:`_SUSPENDED` until it finishes,
    so that finalizer never runs before the driver's has closed it.
    """
    _enter(view, cur)
    orig = view.orig
    asend = orig.asend
    firstiter = _get_hooks()[0]
    _set_hooks(None)
    try:
        step = asend(None)
    finally:
        _set_hooks(firstiter)
    while True:
        box[0] = yield from step
        try:
            step = asend((yield box))
        except BaseException as exc:  # athrow(), aclose(): the body's to handle
            step = orig.athrow(exc)


@types.coroutine
def _suspend(signal: Any) -> Generator[Any, Any, Any]:
    """Hand what the body's awaitable yielded (a future, or ``None`` for a bare yield) to
    the event loop, and return what the loop sends back."""
    return (yield signal)


def _apply(
    src: Mapping[Any, Any],
    dst: Mapping[Any, Any],
    tokens: dict[contextvars.ContextVar[Any], contextvars.Token[Any]],
) -> bool:
    """Make the current context's application variables what ``src`` has where they differ
    from ``dst`` (the current context, or what it was when last in step with ``src``).

    Returns:
        ``False`` when a variable ``src`` lacks could not be unset (no token of ours).
    """
    complete = True
    for var, value in src.items():
        if var not in _OURS and dst.get(var, _MISSING) is not value:
            token = var.set(value)
            if token.old_value is _MISSING:
                tokens[var] = token
    for var in dst:
        if var not in src and var not in _OURS:
            token = tokens.pop(var, None)
            if token is None:
                complete = False
                continue
            try:
                var.reset(token)
            except (ValueError, RuntimeError):
                complete = False  # set in another context (the generator moved)
    return complete


def _rebuild(
    src: Mapping[Any, Any],
    old: Mapping[Any, Any],
    tokens: dict[contextvars.ContextVar[Any], contextvars.Token[Any]],
) -> None:
    """Fill a new, empty current context: ``src``'s application variables, ``old``'s own."""
    for var, value in src.items():
        if var not in _OURS:
            tokens[var] = var.set(value)
    for var in _OURS:
        if var in old:
            var.set(old[var])


def _unhooked(method: Any, arg: Any) -> Any:
    """The first awaitable of the original, made with the event loop's async-generator
    hooks switched off: only the driver is registered with the loop, which finalizes it
    (and it the original), so the loop never closes the two concurrently at shutdown.

    Cost: ~3,900 instructions (``get_asyncgen_hooks`` ~1,100, each ``set`` ~1,400), only
    ~900 more than leaving the hooks on, since the loop's ``firstiter`` hook would then
    register the original as well (a ``WeakSet.add``). Switching ``firstiter`` alone saves
    nothing measurable (the cost is per call, not per hook).
    """
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


def _drive_swapping(view: View) -> Generator[Any, Any, Any]:  # pragma: no cover
    """The driver for a custom OTel runtime context (no ``ContextVar`` to run in): the two
    variables swapped in and out around each step."""
    orig = view.orig
    method = orig.send
    arg: Any = None
    scope, otel = view.scope, view.otel
    started = False
    try:
        while True:
            scope_token = _scope_set(scope)
            otel_token = _otel_set(otel)
            try:
                if not started:
                    started = True
                    _enter(view, _NOTHING)
                item = method(arg)
            finally:
                scope = _scope_get()
                otel = _otel_get()
                try:
                    _otel_reset(otel_token)
                    _scope_reset(scope_token)
                except ValueError:  # resumed in another context than the step began in
                    _restore(otel_token, scope_token)
            try:
                arg = yield item
                method = orig.send
            except BaseException as exc:
                arg = exc
                method = orig.throw
    except StopIteration as stop:
        view.finish(None)
        return stop.value
    except BaseException as exc:
        view.finish(exc)
        raise


async def _drive_async_swapping(view: View) -> AsyncGenerator[Any, Any]:  # pragma: no cover
    """:func:`_drive_swapping` for async generators."""
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
                    _enter(view, _NOTHING)
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
                except ValueError:
                    _restore(otel_token, scope_token)
            try:
                arg = yield item
                method = orig.asend
            except BaseException as exc:
                arg = exc
                method = orig.athrow
    except StopAsyncIteration:
        view.finish(None)
    except BaseException as exc:
        view.finish(exc)
        raise


# With the default OTel runtime context (a ContextVar) the body runs in a context of its own;
# a custom one (OTEL_PYTHON_CONTEXT) may keep the OTel context elsewhere: swap instead.
drive: Final = _drive if _OTEL_VAR is not None else _drive_swapping
"""The driver of decorated generators."""
drive_async: Final = _drive_async if _OTEL_VAR is not None else _drive_async_swapping
"""The driver of decorated async generators."""
