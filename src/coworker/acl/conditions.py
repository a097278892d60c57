"""The ``where`` condition language of policy grants (docs/acl.md, "Conditions").

A ``where`` table maps a *subject* to a *test*. Subject: a bound-argument name with an
optional dotted path (``owner``, ``doc.owner``) or an identity reference (``$user.id``).
Test: a literal (equality), a list (membership), or a table of operators. Every term must
hold; anything missing, of the wrong type or raising makes the term false (fail closed).
Nothing is ever evaluated as code, and values compare only with values of the same exact
built-in kind (``True`` is not ``1``, a ``str`` subclass never matches).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from coworker.exceptions import ConfigError

if TYPE_CHECKING:
    from coworker.identity import Identity

__all__ = ["Condition"]


class _Missing:
    """A value a condition could not find (argument absent, no user, unknown attribute)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()


# -- the condition language ------------------------------------------------------------------
#
# A ``where`` table maps a *subject* to a *test*. Subject: a bound-argument name with an
# optional dotted path (``owner``, ``doc.owner``) or an identity reference (``$user.id``).
# Test: a literal (equality), a list (membership), or a table of operators. Every term must
# hold; anything missing, of the wrong type or raising makes the term false (fail closed).
# Nothing is ever evaluated as code.


# No coercion, and only built-in types: ``True == 1`` and ``True <= 1000`` hold in Python, and
# a ``str`` subclass can define ``__eq__`` to equal anything. So a value is compared only with
# a value of the same *kind*, decided by its exact type; anything else (a subclass, a Decimal,
# an object with its own ``__eq__``, a NaN) makes the term false.
_KINDS: Final[Mapping[type, str]] = {
    str: "str",
    int: "number",
    float: "number",
    bool: "bool",
    type(None): "null",
    datetime.datetime: "datetime",
    datetime.date: "date",
    datetime.time: "time",
}
_ORDERED_KINDS: Final = frozenset({"str", "number", "datetime", "date", "time"})
_COLLECTIONS: Final = (list, tuple, set, frozenset)


def _kind(value: Any) -> str | None:
    kind = _KINDS.get(type(value))
    if kind == "number" and value != value:  # NaN: unordered and unequal to itself
        return None
    return kind


def _same_kind(value: Any, operand: Any) -> str | None:
    kind = _kind(value)
    return kind if kind is not None and kind == _kind(operand) else None


def _eq(value: Any, operand: Any) -> bool:
    return _same_kind(value, operand) is not None and bool(value == operand)


def _members(value: Any) -> Any:
    # A lone string is one value, not a collection of characters: ``"sales" in "wholesales"``
    # must not grant anything. Only built-in collections are iterated (exact types).
    if type(value) is str:
        return (value,)
    if type(value) in _COLLECTIONS:
        return value
    return None


def _op_eq(value: Any, operand: Any) -> bool:
    return _eq(value, operand)


def _op_ne(value: Any, operand: Any) -> bool:
    return _same_kind(value, operand) is not None and bool(value != operand)


def _op_in(value: Any, operand: Any) -> bool:
    members = _members(operand)
    return members is not None and any(_eq(value, m) for m in members)


def _op_not_in(value: Any, operand: Any) -> bool:
    members = _members(operand)
    if members is None or _kind(value) is None:
        return False
    # Every member must be comparable: a member of another kind proves nothing.
    return all(_same_kind(value, m) is not None and value != m for m in members)


def _op_contains(value: Any, operand: Any) -> bool:
    members = _members(value)
    return members is not None and any(_eq(m, operand) for m in members)


def _ordered(value: Any, operand: Any) -> bool:
    return _same_kind(value, operand) in _ORDERED_KINDS


def _op_lt(value: Any, operand: Any) -> bool:
    return _ordered(value, operand) and bool(value < operand)


def _op_le(value: Any, operand: Any) -> bool:
    return _ordered(value, operand) and bool(value <= operand)


def _op_gt(value: Any, operand: Any) -> bool:
    return _ordered(value, operand) and bool(value > operand)


def _op_ge(value: Any, operand: Any) -> bool:
    return _ordered(value, operand) and bool(value >= operand)


_OPERATORS: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    "eq": _op_eq,
    "ne": _op_ne,
    "in": _op_in,
    "not_in": _op_not_in,
    "contains": _op_contains,
    "lt": _op_lt,
    "le": _op_le,
    "gt": _op_gt,
    "ge": _op_ge,
}


class _Arg:
    """A bound argument, optionally followed into mappings / public attributes."""

    __slots__ = ("path",)

    def __init__(self, path: tuple[str, ...]) -> None:
        self.path = path

    def get(self, args: Mapping[str, Any], identity: Identity | None) -> Any:
        value: Any = args.get(self.path[0], _MISSING)
        for name in self.path[1:]:
            if value is _MISSING:
                return _MISSING
            if isinstance(value, Mapping):
                value = value.get(name, _MISSING)
            else:
                value = getattr(value, name, _MISSING)
        return value

    def __repr__(self) -> str:
        return ".".join(self.path)


class _Ref:
    """An identity reference: ``$user.id``, ``$user.attributes.<key>...``, ``$agent.id``,
    ``$agent.name``, ``$session``."""

    __slots__ = ("path",)

    def __init__(self, path: tuple[str, ...]) -> None:
        self.path = path

    def get(self, args: Mapping[str, Any], identity: Identity | None) -> Any:
        if identity is None:
            return _MISSING
        head = self.path[0]
        if head == "session":
            return _MISSING if identity.session is None else identity.session
        obj: Any = identity.user if head == "user" else identity.agent
        if obj is None:
            return _MISSING
        if self.path[1] != "attributes":
            value = getattr(obj, self.path[1])
            return _MISSING if value is None else value
        value = obj.attributes
        for name in self.path[2:]:
            if not isinstance(value, Mapping):
                return _MISSING
            value = value.get(name, _MISSING)
            if value is _MISSING:
                return _MISSING
        return value

    def __repr__(self) -> str:
        return "$" + ".".join(self.path)


class _Literal:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self, args: Mapping[str, Any], identity: Identity | None) -> Any:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)


_Operand = _Arg | _Ref | _Literal


def _parse_ref(text: str, where: str) -> _Ref:
    path = tuple(text[1:].split("."))
    if any(not part for part in path):
        raise ConfigError(f"{where}: empty segment in reference {text!r}")
    head = path[0]
    ok = (
        (head == "session" and len(path) == 1)
        or (head in ("user", "agent") and len(path) == 2 and path[1] in ("id",))
        or (head == "agent" and path == ("agent", "name"))
        or (head == "user" and len(path) >= 3 and path[1] == "attributes")
    )
    if not ok:
        raise ConfigError(
            f"{where}: unknown reference {text!r} (use $user.id, $user.attributes.<key>, "
            "$agent.id, $agent.name or $session)"
        )
    return _Ref(path)


def _parse_value(value: Any, where: str) -> _Operand:
    """A right-hand side: ``$ref``, ``$$literal-dollar``, or any literal."""
    if isinstance(value, str) and value.startswith("$"):
        if value.startswith("$$"):
            return _Literal(value[1:])
        return _parse_ref(value, where)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_parse_value(v, where) for v in value]
        literals = [i.value for i in items if isinstance(i, _Literal)]
        if len(literals) != len(items):
            raise ConfigError(f"{where}: references are not allowed inside a list")
        # A tuple, not a set: a set would merge 1 and True (equal in Python, not here).
        return _Literal(tuple(literals))
    if isinstance(value, Mapping):
        raise ConfigError(f"{where}: a table is not a value here")
    return _Literal(value)


def _parse_subject(key: Any, where: str) -> _Arg | _Ref:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: a condition subject must be a non-empty string")
    if key.startswith("$"):
        return _parse_ref(key, f"{where}.{key}")
    path = tuple(key.split("."))
    for part in path:
        if not part.isidentifier() or part.startswith("_"):
            raise ConfigError(
                f"{where}.{key}: {part!r} is not an argument name or public attribute"
            )
    return _Arg(path)


class Condition:
    """A compiled ``where`` table: every term must hold."""

    __slots__ = ("source", "terms")

    def __init__(self, spec: Any, where: str) -> None:
        if not isinstance(spec, Mapping) or not spec:
            raise ConfigError(f"{where}: 'where' must be a non-empty table")
        terms: list[tuple[_Arg | _Ref, str, Callable[[Any, Any], bool], _Operand]] = []
        for key, test in spec.items():
            subject = _parse_subject(key, where)
            here = f"{where}.{key}"
            if isinstance(test, Mapping):
                if not test:
                    raise ConfigError(f"{here}: empty operator table")
                for op_name, operand in test.items():
                    fn = _OPERATORS.get(op_name)
                    if fn is None:
                        raise ConfigError(
                            f"{here}: unknown operator {op_name!r} "
                            f"(expected one of {', '.join(_OPERATORS)})"
                        )
                    terms.append((subject, op_name, fn, _parse_value(operand, f"{here}.{op_name}")))
            elif isinstance(test, (list, tuple, set, frozenset)):
                terms.append((subject, "in", _op_in, _parse_value(test, here)))
            else:
                terms.append((subject, "eq", _op_eq, _parse_value(test, here)))
        self.terms = tuple(terms)
        self.source = where

    def holds(self, args: Mapping[str, Any], identity: Identity | None) -> bool:
        """True when every term holds; a missing value or an error makes a term false."""
        # Reading may run the application's code (a property of an argument): any error there
        # is a "no", never an exception out of the permission check.
        try:
            for subject, _, fn, operand in self.terms:
                value = subject.get(args, identity)
                if value is _MISSING:
                    return False
                other = operand.get(args, identity)
                if other is _MISSING or not fn(value, other):
                    return False
        except Exception:
            return False
        return True

    def describe(self) -> str:
        """The condition in the policy's own words, for error messages."""
        return ", ".join(f"{s!r} {name} {o!r}" for s, name, _, o in self.terms)
