"""Decorated callables of every kind keep their metadata, signature, kind and binding."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import warnings
from typing import Any

import pytest

import coworker
from coworker import attributes as attr


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
