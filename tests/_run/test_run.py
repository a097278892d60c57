"""coworker.run on every callable kind: spans, transparency, errors, capture."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import sys
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import coworker
from coworker import attributes as attr
from tests.conftest import by_name


@coworker.run
def plain(a: int, b: int = 2) -> int:
    """Adds."""
    return a + b


def test_bare_decorator_makes_one_span_with_run_ids(spans: Any) -> None:
    """A bare @run call makes one span named by qualname with run id == chain id."""
    assert plain(1) == 3
    (span,) = spans.get_finished_spans()
    assert span.name == "plain"
    a = span.attributes
    assert a[attr.RUN_ID] == a[attr.CHAIN_ID]
    assert len(a[attr.RUN_ID]) == 16
    assert attr.RUN_PARENT_ID not in a
    assert a[attr.AUDITED] is False
    assert a[attr.CODE_FUNCTION] == "tests._run.test_run.plain"
    assert span.status.status_code is StatusCode.UNSET


def test_transparency_of_metadata() -> None:
    """Signature, names, docstring and __wrapped__ are the original's."""
    assert plain.__name__ == "plain"
    assert plain.__qualname__ == "plain"
    assert plain.__doc__ == "Adds."
    assert inspect.signature(plain) == inspect.signature(plain.__wrapped__)
    assert list(inspect.signature(plain).parameters) == ["a", "b"]
    assert plain.__wrapped__(1, 1) == 2


def test_parameter_named_flow_passes_through(spans: Any) -> None:
    """A wrapped function's own `flow` parameter is untouched."""

    @coworker.run(operation="update", doctype="Order")
    def route(order: str, flow: str = "default") -> str:
        return f"{order}:{flow}"

    assert route("o1", flow="express") == "o1:express"
    assert route("o1", "slow") == "o1:slow"
    assert [s.name for s in spans.get_finished_spans()] == ["update Order"] * 2


def test_span_name_operation_doctype_and_explicit(spans: Any) -> None:
    """Name is '{operation} {doctype}', an explicit name wins, else the qualname."""

    @coworker.run(operation="create", doctype="Invoice")
    def a() -> None: ...

    @coworker.run("custom", operation="create", doctype="Invoice")
    def b() -> None: ...

    @coworker.run(operation="create")
    def c() -> None: ...

    a(), b(), c()
    names = [s.name for s in spans.get_finished_spans()]
    assert names == [
        "create Invoice",
        "custom",
        "test_span_name_operation_doctype_and_explicit.<locals>.c",
    ]


def test_nested_runs_are_child_spans_with_parent_and_chain(spans: Any) -> None:
    """Nested calls make child spans whose run parent/chain ids point up the tree."""

    @coworker.run
    def leaf() -> None: ...

    @coworker.run
    def middle() -> None:
        leaf()

    @coworker.run
    def root() -> None:
        middle()

    root()
    s = by_name(spans)
    r, m, lf = (
        s["test_nested_runs_are_child_spans_with_parent_and_chain.<locals>.root"],
        s["test_nested_runs_are_child_spans_with_parent_and_chain.<locals>.middle"],
        s["test_nested_runs_are_child_spans_with_parent_and_chain.<locals>.leaf"],
    )
    assert m.parent.span_id == r.context.span_id
    assert lf.parent.span_id == m.context.span_id
    assert m.attributes[attr.RUN_PARENT_ID] == r.attributes[attr.RUN_ID]
    assert lf.attributes[attr.RUN_PARENT_ID] == m.attributes[attr.RUN_ID]
    chain = {x.attributes[attr.CHAIN_ID] for x in (r, m, lf)}
    assert chain == {r.attributes[attr.RUN_ID]}


def test_exception_propagates_same_object_and_marks_span(spans: Any) -> None:
    """The same exception object propagates; span is ERROR with error.type and an event."""
    boom = KeyError("missing")

    @coworker.run
    def fail() -> None:
        raise boom

    with pytest.raises(KeyError) as info:
        fail()
    assert info.value is boom
    assert any(f.co_name == "fail" for f in _frames(info.value.__traceback__))
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attr.ERROR_TYPE] == "KeyError"
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes[attr.EXCEPTION_TYPE] == "KeyError"
    assert attr.EXCEPTION_STACKTRACE not in event.attributes


def _frames(tb: Any) -> list[Any]:
    out = []
    while tb is not None:
        out.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return out


def test_debug_mode_records_stack_trace(spans: Any) -> None:
    """With debug on, the exception event carries the stack trace."""
    coworker.configure(debug=True, metrics=False)

    class Custom(Exception):
        pass

    @coworker.run
    def fail() -> None:
        raise Custom("x")

    with pytest.raises(Custom):
        fail()
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.ERROR_TYPE].endswith(
        "test_debug_mode_records_stack_trace.<locals>.Custom"
    )
    assert "raise Custom" in span.events[0].attributes[attr.EXCEPTION_STACKTRACE]


def test_return_value_unchanged_identity() -> None:
    """The return value is the very object the function returned."""
    obj = object()

    @coworker.run
    def give() -> object:
        return obj

    assert give() is obj


async def _async_add(a: int) -> int:
    await asyncio.sleep(0)
    assert trace.get_current_span().is_recording()
    return a + 1


def test_coroutine_span_covers_the_await(spans: Any) -> None:
    """A coroutine's span opens when awaited and closes after it finishes."""
    wrapped = coworker.run(_async_add)
    assert inspect.iscoroutinefunction(wrapped)
    coro = wrapped(1)
    assert spans.get_finished_spans() == ()
    assert asyncio.run(coro) == 2
    (span,) = spans.get_finished_spans()
    assert span.name == "_async_add"


def test_methods_classmethods_staticmethods(spans: Any) -> None:
    """Instance, class and static methods work, with the instance passed through."""

    class Repo:
        factor = 10

        def __init__(self) -> None:
            self.n = 1

        @coworker.run(operation="update", doctype="Thing", capture_input=True)
        def bump(self, by: int) -> int:
            self.n += by
            return self.n

        @coworker.run
        @classmethod
        def make(cls) -> Repo:
            return cls()

        @classmethod
        @coworker.run
        def make2(cls) -> int:
            return cls.factor

        @coworker.run
        @staticmethod
        def util(x: int) -> int:
            return x * 2

    r = Repo.make()
    assert isinstance(r, Repo)
    assert r.bump(2) == 3
    assert Repo.make2() == 10
    assert Repo.util(4) == 8 and r.util(5) == 10
    names = [s.name for s in spans.get_finished_spans()]
    assert names == [
        "test_methods_classmethods_staticmethods.<locals>.Repo.make",
        "update Thing",
        "test_methods_classmethods_staticmethods.<locals>.Repo.make2",
        "test_methods_classmethods_staticmethods.<locals>.Repo.util",
        "test_methods_classmethods_staticmethods.<locals>.Repo.util",
    ]
    bump = by_name(spans)["update Thing"]
    assert bump.attributes[attr.INPUT] == '{"by":2}'


def test_partial_and_callable_object(spans: Any) -> None:
    """functools.partial objects and instances with __call__ are runs too."""

    def mul(a: int, b: int) -> int:
        return a * b

    class Doubler:
        def __call__(self, x: int) -> int:
            return 2 * x

    p = coworker.run(functools.partial(mul, 3))
    d = coworker.run(Doubler())
    assert p(4) == 12
    assert d(5) == 10
    names = [s.name for s in spans.get_finished_spans()]
    assert names == [
        "test_partial_and_callable_object.<locals>.mul",
        "test_partial_and_callable_object.<locals>.Doubler",
    ]


def test_context_manager_form(spans: Any) -> None:
    """`with run(...) as r` opens a span around the block; r exposes the run."""
    with coworker.run("batch", operation="import", doctype="Invoice") as r:
        assert coworker.current_run() is r
        assert r.category == attr.CATEGORY_STATE_CHANGE
        r.set_attribute("rows", 3)
        with coworker.run("inner") as inner:
            assert inner.parent_id == r.id
    assert coworker.current_run() is None
    s = by_name(spans)
    assert s["batch"].attributes["rows"] == 3
    assert s["inner"].parent.span_id == s["batch"].context.span_id


def test_context_manager_records_exception(spans: Any) -> None:
    """An exception leaving a `with run` block marks the span and propagates."""
    with pytest.raises(ZeroDivisionError), coworker.run("div"):
        1 / 0  # noqa: B018
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.ERROR_TYPE] == "ZeroDivisionError"


def test_async_context_manager_form(spans: Any) -> None:
    """`async with run(...)` works the same."""

    async def main() -> str:
        async with coworker.run("async-block") as r:
            await asyncio.sleep(0)
            return r.id

    run_id = asyncio.run(main())
    (span,) = spans.get_finished_spans()
    assert span.attributes[attr.RUN_ID] == run_id


def test_attributes_dict_and_callable(spans: Any) -> None:
    """attributes= may be a dict or a callable of the bound arguments (doctype from args)."""

    @coworker.run(
        operation="update", attributes=lambda a: {"doctype": a["kind"], "record.id": a["rid"]}
    )
    def save(kind: str, rid: str, flow: int = 0) -> None: ...

    @coworker.run(attributes={"team": "billing"})
    def static() -> None: ...

    save("Invoice", "INV-9")
    static()
    s = by_name(spans)
    upd = s["update Invoice"]
    assert upd.attributes[attr.DOCTYPE] == "Invoice"
    assert upd.attributes["record.id"] == "INV-9"
    assert upd.attributes[attr.AUDIT_CATEGORY] == attr.CATEGORY_STATE_CHANGE
    assert s["test_attributes_dict_and_callable.<locals>.static"].attributes["team"] == "billing"


def test_attributes_callable_that_raises_does_not_break_the_call(spans: Any, caplog: Any) -> None:
    """A buggy attributes callable is logged and ignored; the call still runs."""

    @coworker.run(attributes=lambda a: 1 / 0)
    def f() -> int:
        return 7

    assert f() == 7
    assert "attributes callable" in caplog.text
    assert len(spans.get_finished_spans()) == 1


def test_capture_is_redacted_limited_and_never_raises(spans: Any) -> None:
    """Captured input/output redacts secrets, truncates, and survives hostile values."""

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    @coworker.run(capture_input=True, capture_output=True)
    def login(user: str, password: str, opts: dict, blob: Any) -> dict:
        return {"token": "abc", "ok": True, "big": "x" * 10_000}

    result = login("ann", "hunter2", {"API_KEY": "k", "nested": {"Authorization": "b"}}, Hostile())
    assert result["token"] == "abc"
    (span,) = spans.get_finished_spans()
    captured_in = span.attributes[attr.INPUT]
    assert "hunter2" not in captured_in and '"password":"[REDACTED]"' in captured_in
    assert '"API_KEY":"[REDACTED]"' in captured_in
    assert '"Authorization":"[REDACTED]"' in captured_in
    assert "unrepresentable Hostile" in captured_in
    out = span.attributes[attr.OUTPUT]
    assert '"token":"[REDACTED]"' in out
    assert len(out) <= 4096 and "abc" not in out


def test_capture_off_by_default(spans: Any) -> None:
    """Without capture options no input/output attribute is recorded."""
    plain(1)
    (span,) = spans.get_finished_spans()
    assert attr.INPUT not in span.attributes and attr.OUTPUT not in span.attributes


def test_invalid_options_fail_at_decoration() -> None:
    """Bad options raise at once, naming the option."""
    with pytest.raises(ValueError, match="operation"):
        coworker.run(operation="")
    with pytest.raises(TypeError, match="attributes"):
        coworker.run(attributes=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callables"):
        coworker.run(name="x")(42)  # type: ignore[arg-type]


NO_SDK = """
import asyncio, sys, coworker
from opentelemetry import trace

@coworker.run(operation="update", doctype="Doc")
def f(x):
    return x + 1

@coworker.run
def g(n):
    yield from range(n)

@coworker.run
async def a():
    return 5

@coworker.run
async def ag():
    yield 1

async def collect():
    return [x async for x in ag()]

with coworker.flow("batch-job"):
    out = [f(1), list(g(3)), asyncio.run(a()), asyncio.run(collect())]
    with coworker.run("block") as r:
        out.append(r.span.is_recording())
print(out, "sdk" if "opentelemetry.sdk" in sys.modules else "no-sdk",
      type(trace.get_tracer_provider()).__name__)
"""


def test_without_sdk_every_kind_still_works() -> None:
    """With no SDK provider, runs of every kind work and load no SDK (no-op spans)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", NO_SDK], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split("] ")[-1].split() == ["no-sdk", "ProxyTracerProvider"]
    assert out.stdout.startswith("[2, [0, 1, 2], 5, [1], False]")


def test_import_is_light() -> None:
    """`import coworker` loads neither the SDK nor the audit stores nor database drivers."""
    import subprocess

    code = (
        "import sys, coworker; bad=[m for m in ('opentelemetry.sdk','coworker.audit','sqlite3',"
        "'psycopg','coworker.cli','coworker.acl') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_state_changing_flag_and_sensitive_reads(spans: Any) -> None:
    """state_changing forces/blocks the audit flag; sensitive doctype reads are audited."""
    coworker.configure(sensitive_doctypes=["Customer"], metrics=False)

    @coworker.run(operation="recalculate", doctype="Invoice", state_changing=True)
    def a() -> None: ...

    @coworker.run(operation="delete", doctype="TempFile", state_changing=False)
    def b() -> None: ...

    @coworker.run(operation="select", doctype="Customer")
    def c() -> None: ...

    @coworker.run(operation="select", doctype="Invoice")
    def d() -> None: ...

    a(), b(), c(), d()
    got = {s.name: s.attributes.get(attr.AUDIT_CATEGORY) for s in spans.get_finished_spans()}
    assert got == {
        "recalculate Invoice": attr.CATEGORY_STATE_CHANGE,
        "delete TempFile": None,
        "select Customer": attr.CATEGORY_SENSITIVE_READ,
        "select Invoice": None,
    }
    flags = {s.name: s.attributes[attr.AUDITED] for s in spans.get_finished_spans()}
    assert flags["select Customer"] is True and flags["select Invoice"] is False


def test_validation_error_and_permission_denied_are_audit_categories(spans: Any) -> None:
    """ValidationError / PermissionDenied raised in a run reclassify it for the audit trail."""

    @coworker.run(operation="select", doctype="Invoice")
    def invalid() -> None:
        raise coworker.ValidationError("amount must be positive")

    @coworker.run(operation="select", doctype="Invoice")
    def denied() -> None:
        raise coworker.PermissionDenied("no")

    @coworker.run(operation="select", doctype="Invoice")
    def technical() -> None:
        raise OSError("disk")

    for fn in (invalid, denied, technical):
        with pytest.raises((coworker.ValidationError, coworker.PermissionDenied, OSError)):
            fn()
    cats = [
        (s.attributes[attr.AUDITED], s.attributes.get(attr.AUDIT_CATEGORY))
        for s in spans.get_finished_spans()
    ]
    assert cats == [
        (True, attr.CATEGORY_VALIDATION_VIOLATION),
        (True, attr.CATEGORY_AUTHORIZATION_FAILURE),
        (False, None),
    ]


def test_garbage_collection_of_wrapper_objects() -> None:
    """Decorating many functions does not keep them alive."""
    import weakref

    def f() -> None: ...

    w = coworker.run(f)
    ref = weakref.ref(f)
    del f, w
    gc.collect()
    assert ref() is None


def test_fast_binder_matches_signature_bind() -> None:
    """The fast argument binder gives what inspect.Signature.bind gives, or the same error."""
    from coworker._run.spec import Binder as _Binder

    def f(a: Any, b: Any = 2, *, c: Any, d: Any = 4) -> None: ...

    def g(a: Any, /, b: Any, *rest: Any, **kw: Any) -> None: ...

    calls = [
        ((1,), {"c": 3}),
        ((1, 5), {"c": 3, "d": 9}),
        ((), {"a": 1, "c": 2}),
        ((1,), {}),
        ((1,), {"a": 2, "c": 1}),
        ((1,), {"c": 1, "zz": 2}),
        ((1, 2, 3), {"c": 1}),
    ]
    for fn in (f, g):
        sig = inspect.signature(fn)
        binder = _Binder(sig)
        for args, kwargs in calls:
            try:
                ba = sig.bind(*args, **kwargs)
                ba.apply_defaults()
                expected: Any = dict(ba.arguments)
            except TypeError:
                expected = TypeError
            try:
                got: Any = binder.bind(args, kwargs)
            except TypeError:
                got = TypeError
            assert got == expected, (fn.__name__, args, kwargs)


def test_bound_arguments_for_every_method_form(spans: Any) -> None:
    """capture_input names the arguments right for decorated methods and for bound methods
    given directly (never shifted by a dropped self/cls)."""

    class A:
        def m(self, x: int, y: int = 2) -> int:
            return x + y

        @classmethod
        def c(cls, x: int) -> int:
            return x

        @staticmethod
        def s(x: int) -> int:
            return x

    class B:
        @coworker.run(capture_input=True)
        def m(self, x: int, y: int = 2) -> int:
            return x

        @coworker.run(capture_input=True)
        @classmethod
        def c(cls, x: int) -> int:
            return x

        @coworker.run(capture_input=True)
        @staticmethod
        def s(x: int) -> int:
            return x

    a = A()
    coworker.run(a.m, capture_input=True)(1)
    coworker.run(A.c, capture_input=True)(5)
    coworker.run(A.s, capture_input=True)(7)
    B().m(1)
    B.c(2)
    B().c(3)
    B.s(4)
    B().s(5)
    got = [s.attributes[attr.INPUT] for s in spans.get_finished_spans()]
    assert got == [
        '{"x":1,"y":2}',
        '{"x":5}',
        '{"x":7}',
        '{"x":1,"y":2}',
        '{"x":2}',
        '{"x":3}',
        '{"x":4}',
        '{"x":5}',
    ]
