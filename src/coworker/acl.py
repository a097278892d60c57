"""Access control for ``coworker.run``: a :class:`Policy` says who may do what, an
:class:`Enforcer` checks each run before its body runs.

The rule of the product: **an AI agent acts with its user's permissions and never more.**
The effective permission of a run is decided in this order (the first "no" wins)::

    doctype rules        apply to everybody, admins included; they only ever forbid
      then  user roles   the roles of [users] for user.id, plus User.roles from the app
      and   agent scope  [agents.<id>] (or [agents."*"]) may only narrow the user's roles
      then  rate limits  N runs per window, per user or per agent-for-user

Identity comes only from the :class:`~coworker.identity.Identity` the application set with
``coworker.acting_as``; span attributes, baggage and the decorated function's arguments never
change it. Conditions (``where``) may *read* the call's bound arguments to restrict a grant,
never to widen one.

The module is pure: no I/O except reading a policy file in :meth:`Policy.from_file`, no
OpenTelemetry import, and ``yaml`` / ``tomllib`` are imported only when a file is loaded. The
format, the condition language and the precedence are documented in ``docs/acl.md``.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from coworker._state import DEFAULT_READ_OPERATIONS
from coworker.exceptions import ConfigError, PermissionDenied, RateLimited

if TYPE_CHECKING:
    from coworker.identity import Identity

__all__ = [
    "WILDCARD",
    "Enforcer",
    "InMemoryRateLimiter",
    "Policy",
    "RateLimiter",
    "build_enforcer",
]

WILDCARD: Final = "*"
"""Matches every doctype (as a key) or every operation (in an operation list)."""

_TOP_LEVEL_KEYS: Final = (
    "anonymous",
    "agents",
    "doctypes",
    "rate_limits",
    "read_operations",
    "roles",
    "usage",  # usage (issue 16): cost centers and budgets, parsed by coworker.usage_policy
    "users",
)
_DOCTYPE_RULE_KEYS: Final = (
    "allow", "deny", "read_only", "sensitive",
    "cost_center", "owner_pays",  # usage (issue 16): read by coworker.usage_policy
)  # fmt: skip
_GRANT_KEYS: Final = ("op", "ops", "where")
_RATE_LIMIT_KEYS: Final = ("doctypes", "limit", "operations", "per", "window")
_RATE_LIMIT_PER: Final = ("agent", "user")
_WINDOW_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MAX_CACHED_IDENTITIES: Final = 4096
_MAX_CACHED_DECISIONS: Final = 1024
_ANONYMOUS_KEY: Final = "<anonymous>"


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


class _Condition:
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


# -- grants, doctype rules, rate limits ------------------------------------------------------


class _Grant:
    """One entry of a role's (or agent scope's) list for a doctype."""

    __slots__ = ("condition", "ops", "source")

    def __init__(self, ops: frozenset[str], condition: _Condition | None, source: str) -> None:
        self.ops = ops
        self.condition = condition
        self.source = source

    def matches(self, operation: str) -> bool:
        return operation in self.ops or WILDCARD in self.ops


def _op_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ConfigError(f"{where}: expected an operation name, got {value!r}")
    # Operations compare case-insensitively (the decorator classifies them that way too), so
    # that "Delete" can never slip past a rule written for "delete".
    return value.lower()


def _op_list(value: Any, where: str) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ConfigError(f"{where}: expected a list of operation names, got {value!r}")
    return frozenset(_op_name(v, f"{where}[{i}]") for i, v in enumerate(value))


def _str_list(value: Any, where: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ConfigError(f"{where}: expected a list of {what}, got {value!r}")
    out: list[str] = []
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{where}[{i}]: expected a non-empty string, got {v!r}")
        out.append(v)
    return tuple(out)


def _table(value: Any, where: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _check_keys(table: Mapping[Any, Any], allowed: Sequence[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r} (expected one of {', '.join(allowed)})"
            )


def _parse_grants(spec: Any, where: str) -> dict[str, tuple[_Grant, ...]]:
    """``{doctype: [op | {op|ops, where}]}`` → compiled grants per doctype."""
    out: dict[str, tuple[_Grant, ...]] = {}
    for doctype, entries in _table(spec, where).items():
        here = f"{where}.{doctype}"
        if not isinstance(doctype, str) or not doctype:
            raise ConfigError(f"{here}: a doctype must be a non-empty string")
        if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
            raise ConfigError(f"{here}: expected a list of operations, got {entries!r}")
        grants: list[_Grant] = []
        plain: set[str] = set()
        for i, entry in enumerate(entries):
            at = f"{here}[{i}]"
            if isinstance(entry, Mapping):
                _check_keys(entry, _GRANT_KEYS, at)
                if ("op" in entry) == ("ops" in entry):
                    raise ConfigError(f"{at}: give exactly one of 'op' or 'ops'")
                ops = (
                    frozenset((_op_name(entry["op"], f"{at}.op"),))
                    if "op" in entry
                    else _op_list(entry["ops"], f"{at}.ops")
                )
                cond = _Condition(entry["where"], f"{at}.where") if "where" in entry else None
                if cond is None:
                    plain |= ops
                else:
                    grants.append(_Grant(ops, cond, at))
            else:
                plain.add(_op_name(entry, at))
        if plain:
            grants.insert(0, _Grant(frozenset(plain), None, here))
        out[doctype] = tuple(grants)
    return out


class _DoctypeRule:
    __slots__ = ("allow", "deny", "name", "read_only", "sensitive")

    def __init__(self, name: str, spec: Any, where: str) -> None:
        spec = _table(spec, where)
        _check_keys(spec, _DOCTYPE_RULE_KEYS, where)
        self.name = name
        self.allow = _op_list(spec["allow"], f"{where}.allow") if "allow" in spec else None
        self.deny = _op_list(spec.get("deny", ()), f"{where}.deny")
        for key in ("read_only", "sensitive"):
            if not isinstance(spec.get(key, False), bool):
                raise ConfigError(f"{where}.{key}: expected true or false")
        self.read_only: bool = spec.get("read_only", False)
        self.sensitive: bool = spec.get("sensitive", False)

    def refuses(self, operation: str, read_operations: frozenset[str]) -> str | None:
        """The rule that forbids ``operation``, or ``None``."""
        where = f"doctypes.{self.name}"
        if self.allow is not None and operation not in self.allow and WILDCARD not in self.allow:
            return f"{where}.allow = {sorted(self.allow)}"
        if operation in self.deny or WILDCARD in self.deny:
            return f"{where}.deny = {sorted(self.deny)}"
        if self.read_only and operation not in read_operations:
            return f"{where}.read_only = true"
        return None


def _parse_window(value: Any, where: str) -> float:
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value[-1:] in _WINDOW_UNITS:
        try:
            seconds = float(value[:-1]) * _WINDOW_UNITS[value[-1]]
        except ValueError:
            seconds = None
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        raise ConfigError(
            f"{where}: expected a positive number of seconds or '30s', '5m', '1h', '1d', "
            f"got {value!r}"
        )
    return seconds


class _RateLimit:
    __slots__ = ("doctypes", "limit", "name", "operations", "per", "window")

    def __init__(self, name: str, spec: Any, where: str) -> None:
        spec = _table(spec, where)
        _check_keys(spec, _RATE_LIMIT_KEYS, where)
        for key in ("per", "operations", "limit", "window"):
            if key not in spec:
                raise ConfigError(f"{where}: missing key {key!r}")
        if spec["per"] not in _RATE_LIMIT_PER:
            raise ConfigError(f"{where}.per: expected 'user' or 'agent', got {spec['per']!r}")
        limit = spec["limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"{where}.limit: expected a positive integer, got {limit!r}")
        self.name = name
        self.per: str = spec["per"]
        self.operations = _op_list(spec["operations"], f"{where}.operations")
        self.doctypes = (
            frozenset(_str_list(spec["doctypes"], f"{where}.doctypes", "doctypes"))
            if "doctypes" in spec
            else frozenset((WILDCARD,))
        )
        self.limit: int = limit
        self.window = _parse_window(spec["window"], f"{where}.window")

    def applies(self, operation: str, doctype: str | None, has_agent: bool) -> bool:
        if self.per == "agent" and not has_agent:
            return False
        if operation not in self.operations and WILDCARD not in self.operations:
            return False
        return WILDCARD in self.doctypes or doctype in self.doctypes


# -- the policy ------------------------------------------------------------------------------


class Policy:
    """Who may do what: roles, users, agent scopes, doctype rules and rate limits.

    Build it from Python, :meth:`from_dict` or :meth:`from_file`; all three take the same
    structure (see ``docs/acl.md``). A policy is immutable and validated when built: a typo
    raises :class:`~coworker.ConfigError` naming the key, it never yields a silently empty or
    wider policy.

    Example::

        Policy(
            roles={"clerk": {"Invoice": ["select"], "Task": ["select", "update"]},
                   "admin": {"*": ["*"]}},
            users={"user-456": ["clerk"], "root": ["admin"]},
            agents={"agent-789": {"Task": ["select"]}},
            doctypes={"AuditTrail": {"allow": ["create", "select"]},
                      "Customer": {"sensitive": True}},
            rate_limits={"agent-deletes": {"per": "agent", "operations": ["delete"],
                                           "limit": 20, "window": "1m"}},
        )

    Args:
        roles: role → doctype (or ``"*"``) → list of operations (``"*"`` for all) or
            ``{op|ops, where}`` tables for conditional grants.
        users: user id → role names.
        agents: agent id (or ``"*"`` for any agent not listed) → doctype → operations; an
            agent's scope, intersected with its user's permissions.
        doctypes: doctype → ``{allow, deny, read_only, sensitive}``; applies to everyone.
        rate_limits: name → ``{per, operations, doctypes, limit, window}``.
        anonymous: roles of a run without a user (default none: every checked operation of
            an anonymous run is denied).
        read_operations: the operations ``read_only`` doctypes allow (default: coworker's read
            operations, ``select``, ``read``, ``get``, ...).
        source: where the policy came from, for messages (set by :meth:`from_file`).

    Raises:
        ConfigError: the structure is invalid; the message names the key.
    """

    __slots__ = (
        "_agents",
        "_anonymous",
        "_doctypes",
        "_rate_limits",
        "_read_operations",
        "_roles",
        "_users",
        "source",
        "usage",  # usage (issue 16)
    )

    def __init__(
        self,
        *,
        roles: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
        users: Mapping[str, Sequence[str]] | None = None,
        agents: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
        doctypes: Mapping[str, Mapping[str, Any]] | None = None,
        rate_limits: Mapping[str, Mapping[str, Any]] | None = None,
        anonymous: Sequence[str] | None = None,
        read_operations: Sequence[str] | None = None,
        source: str = "policy",
        usage: Mapping[str, Any] | None = None,  # usage (issue 16)
    ) -> None:
        self.source = source
        from coworker.usage_policy import UsageRules  # usage (issue 16)

        self.usage = UsageRules(doctypes, usage)  # usage (issue 16)
        self._roles: dict[str, dict[str, tuple[_Grant, ...]]] = {}
        for role, spec in _table(roles or {}, "roles").items():
            if not isinstance(role, str) or not role:
                raise ConfigError(f"roles.{role!r}: a role name must be a non-empty string")
            self._roles[role] = _parse_grants(spec, f"roles.{role}")

        def known_roles(value: Any, where: str) -> tuple[str, ...]:
            names = _str_list(value, where, "role names")
            for i, name in enumerate(names):
                if name not in self._roles:
                    raise ConfigError(f"{where}[{i}]: unknown role {name!r}")
            return names

        self._users: dict[str, tuple[str, ...]] = {
            str(uid): known_roles(names, f"users.{uid}")
            for uid, names in _table(users or {}, "users").items()
        }
        self._anonymous = known_roles(anonymous or (), "anonymous")
        self._agents: dict[str, dict[str, tuple[_Grant, ...]]] = {
            str(aid): _parse_grants(spec, f"agents.{aid}")
            for aid, spec in _table(agents or {}, "agents").items()
        }
        self._doctypes: dict[str, _DoctypeRule] = {
            str(name): _DoctypeRule(str(name), spec, f"doctypes.{name}")
            for name, spec in _table(doctypes or {}, "doctypes").items()
        }
        self._rate_limits = tuple(
            _RateLimit(str(name), spec, f"rate_limits.{name}")
            for name, spec in _table(rate_limits or {}, "rate_limits").items()
        )
        self._read_operations = (
            frozenset(DEFAULT_READ_OPERATIONS)
            if read_operations is None
            else _op_list(read_operations, "read_operations")
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "policy") -> Policy:
        """Build a policy from the file structure (``roles``, ``users``, ``agents``, ...).

        Args:
            data: the parsed document.
            source: where it came from, for messages.

        Raises:
            ConfigError: unknown top-level key, empty document, or an invalid entry.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a table at the top level")
        if not data:
            raise ConfigError(f"{source}: the policy is empty (refusing a silent empty policy)")
        _check_keys(data, _TOP_LEVEL_KEYS, source)
        try:
            return cls(**{k: data[k] for k in data}, source=source)
        except ConfigError as exc:
            if source == "policy":
                raise
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Load a policy from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file.

        Args:
            path: the file.

        Raises:
            ConfigError: the file is missing, unreadable, not valid TOML/YAML/JSON (the message
                names the line) or not a valid policy (the message names the key).
        """
        name = os.fspath(path)
        suffix = os.path.splitext(name)[1].lower()
        try:
            with open(name, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise ConfigError(f"policy file {name!r}: {exc.strerror or exc}") from exc
        data: Any
        if suffix == ".toml":
            import tomllib

            try:
                data = tomllib.loads(raw.decode("utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"policy file {name!r}: invalid TOML: {exc}") from exc
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ConfigError(
                    f"policy file {name!r}: YAML needs PyYAML (pip install 'coworker-otel[yaml]')"
                ) from exc
            try:
                data = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(exc, "problem", None) or exc
                raise ConfigError(f"policy file {name!r}: invalid YAML{at}: {problem}") from exc
        elif suffix == ".json":
            import json

            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ConfigError(f"policy file {name!r}: invalid JSON: {exc}") from exc
        else:
            raise ConfigError(
                f"policy file {name!r}: unknown format {suffix!r} (use .toml, .yaml or .json)"
            )
        if data is None:
            data = {}
        return cls.from_dict(data, source=f"policy file {name!r}")

    @property
    def sensitive_doctypes(self) -> frozenset[str]:
        """Doctypes whose reads are audited (``sensitive = true``)."""
        return frozenset(n for n, r in self._doctypes.items() if r.sensitive)

    def roles_of(self, user_id: str | None, trusted_roles: Sequence[str] = ()) -> tuple[str, ...]:
        """The roles that apply to a user: ``[users]`` plus the app's ``User.roles``.

        Roles the policy does not define are dropped (they grant nothing).

        Args:
            user_id: the user id, or ``None`` for an anonymous run.
            trusted_roles: ``User.roles`` from the application's identity source.
        """
        base = self._anonymous if user_id is None else self._users.get(user_id, ())
        seen: dict[str, None] = dict.fromkeys(base)
        for role in trusted_roles:
            if role in self._roles:
                seen[role] = None
        return tuple(seen)

    def __repr__(self) -> str:
        return (
            f"<Policy {self.source}: {len(self._roles)} roles, {len(self._users)} users, "
            f"{len(self._agents)} agent scopes, {len(self._doctypes)} doctype rules, "
            f"{len(self._rate_limits)} rate limits>"
        )


# -- rate limiting ---------------------------------------------------------------------------


@runtime_checkable
class RateLimiter(Protocol):
    """Where rate-limit counts live; in-process by default, pluggable for a shared backend."""

    def hit(self, key: str, limit: int, window: float) -> float:
        """Count one run under ``key`` if it fits in the limit.

        Guarantee: a run is counted (and ``0.0`` returned) only when fewer than ``limit`` runs
        were counted under ``key`` in the last ``window`` seconds; the check and the count are
        atomic with respect to other callers of the same backend (threads, and processes for
        a shared backend). Otherwise nothing is counted and the result is the number of
        seconds (> 0) until a run would fit.

        Args:
            key: opaque, stable string naming the limit and its subject.
            limit: runs allowed per window (≥ 1).
            window: window length in seconds (> 0).
        """
        ...


class InMemoryRateLimiter:
    """A sliding-window log per key, guarded by one lock: exact and thread-safe, per process.

    Args:
        clock: monotonic seconds; injectable for tests.
    """

    _SWEEP_EVERY: Final = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._log: dict[str, deque[float]] = {}
        self._windows: dict[str, float] = {}
        self._hits = 0

    def hit(self, key: str, limit: int, window: float) -> float:
        """See :meth:`RateLimiter.hit`."""
        with self._lock:
            now = self._clock()
            log = self._log.get(key)
            if log is None:
                log = self._log[key] = deque()
                self._windows[key] = window
            horizon = now - window
            while log and log[0] <= horizon:
                log.popleft()
            if len(log) >= limit:
                return max(log[len(log) - limit] + window - now, 1e-9)
            log.append(now)
            self._hits += 1
            if self._hits % self._SWEEP_EVERY == 0:
                self._sweep(now)
            return 0.0

    def _sweep(self, now: float) -> None:
        # Drop keys whose whole log has expired, so idle users do not accumulate.
        stale = [k for k, log in self._log.items() if not log or log[-1] <= now - self._windows[k]]
        for k in stale:
            del self._log[k]
            del self._windows[k]

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._log.clear()
            self._windows.clear()


# -- enforcement -----------------------------------------------------------------------------


class _Allow:
    """The decision "allowed, nothing more to check" (the cached fast path)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<allow>"


_ALLOW: Final = _Allow()


class _Decision:
    """What remains to check for one (identity, doctype, operation) when it is not a plain
    allow: a refusal, conditions on the call, rate limits."""

    __slots__ = ("deny", "limits", "scope_grants", "user_grants")

    def __init__(
        self,
        deny: str | None = None,
        user_grants: tuple[_Grant, ...] = (),
        scope_grants: tuple[_Grant, ...] = (),
        limits: tuple[tuple[str, _RateLimit], ...] = (),
    ) -> None:
        self.deny = deny
        self.user_grants = user_grants
        self.scope_grants = scope_grants
        self.limits = limits


def _matching(
    grants: Mapping[str, tuple[_Grant, ...]], doctype: str | None, operation: str
) -> tuple[bool, tuple[_Grant, ...]]:
    """(unconditionally granted?, conditional grants that could grant)."""
    conditional: list[_Grant] = []
    keys = (WILDCARD,) if doctype is None or doctype == WILDCARD else (doctype, WILDCARD)
    for key in keys:
        for grant in grants.get(key, ()):
            if grant.matches(operation):
                if grant.condition is None:
                    return True, ()
                conditional.append(grant)
    return False, tuple(conditional)


class _Effective:
    """The effective permissions of one (user id, trusted roles, agent id), with a per
    (doctype, operation) decision table filled on first use."""

    __slots__ = (
        "agent_id",
        "grants",
        "identity_required",
        "roles",
        "scope",
        "scope_name",
        "table",
        "user_id",
    )

    def __init__(
        self,
        policy: Policy | None,
        user_id: str | None,
        trusted_roles: tuple[str, ...],
        agent_id: str | None,
        identity_required: bool,
    ) -> None:
        self.user_id = user_id
        self.agent_id = agent_id
        self.identity_required = identity_required
        self.table: dict[str | None, dict[str, _Allow | _Decision]] = {}
        self.roles: tuple[str, ...] = ()
        self.grants: dict[str, tuple[_Grant, ...]] = {}
        self.scope: dict[str, tuple[_Grant, ...]] | None = None
        self.scope_name: str | None = None
        if policy is None:
            return
        self.roles = policy.roles_of(user_id, trusted_roles)
        merged: dict[str, list[_Grant]] = {}
        for role in self.roles:
            for doctype, grants in policy._roles[role].items():
                merged.setdefault(doctype, []).extend(grants)
        self.grants = {k: tuple(v) for k, v in merged.items()}
        if agent_id is not None:
            for name in (agent_id, WILDCARD):
                if name in policy._agents:
                    self.scope, self.scope_name = policy._agents[name], f"agents.{name}"
                    break

    def decide(
        self, policy: Policy | None, operation: str, doctype: str | None
    ) -> _Allow | _Decision:
        if self.identity_required:
            return _Decision(deny="require_identity: the run has no user")
        if policy is None:
            return _ALLOW
        # Decided on the normalized name, cached under the name the run used.
        operation = operation.strip().lower()
        if doctype is not None:
            rule = policy._doctypes.get(doctype)
            if rule is not None:
                refused = rule.refuses(operation, policy._read_operations)
                if refused is not None:
                    return _Decision(deny=refused)
        user_ok, user_grants = _matching(self.grants, doctype, operation)
        if not user_ok and not user_grants:
            who = "anonymous runs" if self.user_id is None else "the user's roles"
            return _Decision(
                deny=f"roles: {who} {list(self.roles)} grant no {operation!r} on "
                f"{doctype or WILDCARD!r}"
            )
        scope_grants: tuple[_Grant, ...] = ()
        if self.scope is not None:
            scope_ok, scope_grants = _matching(self.scope, doctype, operation)
            if not scope_ok and not scope_grants:
                return _Decision(
                    deny=f"{self.scope_name}: the agent's scope does not include "
                    f"{operation!r} on {doctype or WILDCARD!r}"
                )
        limits = tuple(
            (self._limit_key(lim), lim)
            for lim in policy._rate_limits
            if lim.applies(operation, doctype, self.agent_id is not None)
        )
        if user_ok and not scope_grants and not limits:
            return _ALLOW
        return _Decision(
            user_grants=() if user_ok else user_grants, scope_grants=scope_grants, limits=limits
        )

    def _limit_key(self, lim: _RateLimit) -> str:
        user = _ANONYMOUS_KEY if self.user_id is None else self.user_id
        if lim.per == "agent":
            return f"{lim.name}\x1f{user}\x1f{self.agent_id}"
        return f"{lim.name}\x1f{user}"


class Enforcer:
    """Checks runs against a :class:`Policy`; what ``coworker.configure(policy=...)`` installs.

    Effective permissions are computed once per (user id, ``User.roles``, agent id) and
    cached, with a per (doctype, operation) decision; an allowed run with no condition and no
    rate limit costs two dict lookups and allocates nothing. The cache belongs to this
    enforcer: a new policy means a new enforcer (``configure`` builds one), so a policy change
    can never be answered from a stale cache.

    Args:
        policy: the policy, or ``None`` to check only ``require_identity``.
        require_identity: deny every run (even one without an operation) that has no user.
        rate_limiter: where rate-limit counts live (default: a new
            :class:`InMemoryRateLimiter`).
    """

    __slots__ = (
        "_cache",
        "_limiter",
        "_memo",
        "_require_identity",
        "policy",
        "sensitive_doctypes",
    )

    def __init__(
        self,
        policy: Policy | None,
        *,
        require_identity: bool = False,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        if not isinstance(require_identity, bool):
            raise ConfigError(f"require_identity: expected True or False, got {require_identity!r}")
        if rate_limiter is not None and not isinstance(rate_limiter, RateLimiter):
            raise ConfigError("rate_limiter: expected an object with hit(key, limit, window)")
        self.policy = policy
        self._require_identity = require_identity
        self._limiter: RateLimiter = (
            rate_limiter if rate_limiter is not None else InMemoryRateLimiter()
        )
        self.sensitive_doctypes: frozenset[str] = (
            policy.sensitive_doctypes if policy is not None else frozenset()
        )
        self._cache: dict[tuple[str | None, tuple[str, ...], str | None], _Effective] = {}
        self._memo: tuple[Any, _Effective] = (None, self._effective_for_key(None, (), None))

    @property
    def require_identity(self) -> bool:
        """Whether runs without a user are denied."""
        return self._require_identity

    def cache_clear(self) -> None:
        """Forget every cached effective permission (they are recomputed on next use)."""
        self._cache.clear()
        self._memo = (None, self._effective_for_key(None, (), None))

    def _effective_for_key(
        self, user_id: str | None, roles: tuple[str, ...], agent_id: str | None
    ) -> _Effective:
        key = (user_id, roles, agent_id)
        eff = self._cache.get(key)
        if eff is None:
            if len(self._cache) >= _MAX_CACHED_IDENTITIES:
                self._cache.clear()
            eff = _Effective(
                self.policy,
                user_id,
                roles,
                agent_id,
                self._require_identity and user_id is None,
            )
            self._cache[key] = eff
        return eff

    def _effective(self, identity: Identity | None) -> _Effective:
        user = identity.user if identity is not None else None
        agent = identity.agent if identity is not None else None
        eff = self._effective_for_key(
            None if user is None else user.id,
            () if user is None else user.roles,
            None if agent is None else agent.id,
        )
        # One slot, swapped atomically: the common case is many runs under one acting_as().
        self._memo = (identity, eff)
        return eff

    def enforce(
        self,
        identity: Identity | None,
        operation: str | None,
        doctype: str | None,
        arguments: Callable[[], Mapping[str, Any]],
    ) -> None:
        """Allow the run or raise; called by ``coworker.run`` before the body.

        A run without ``operation`` is not checked (only ``require_identity`` applies to it);
        a run without ``doctype`` is checked against the ``"*"`` grants only and no doctype
        rule.

        Args:
            identity: who acts (``None``: nobody set one).
            operation: what the run does (``"select"``, ``"update"``, ...).
            doctype: the kind of record.
            arguments: returns the call's bound arguments; called only if a condition needs
                them.

        Raises:
            PermissionDenied: the policy refuses the run; the message names the rule.
            RateLimited: a rate limit of the policy is exhausted.
        """
        rules = self.policy.usage if self.policy is not None else None  # usage (issue 16)
        if rules is not None and rules.budgets:  # usage (issue 16): refuse before the body
            rules.check(identity, doctype)
        if operation is None:
            if self._require_identity and (identity is None or identity.user is None):
                raise self._denied(identity, operation, doctype, "require_identity: no user")
            return
        memo = self._memo
        eff = memo[1] if memo[0] is identity else self._effective(identity)
        ops = eff.table.get(doctype)
        decision = None if ops is None else ops.get(operation)
        if decision is _ALLOW:
            return
        if decision is None:
            decision = self._decide(eff, operation, doctype)
            if decision is _ALLOW:
                return
        self._apply(decision, identity, operation, doctype, arguments, True)  # type: ignore[arg-type]

    def is_allowed(
        self,
        identity: Identity | None,
        operation: str | None,
        doctype: str | None,
        arguments: Mapping[str, Any] | None = None,
    ) -> bool:
        """Whether the run would be allowed, without counting it against rate limits.

        For UIs ("show the delete button?"). A rate limit is reported as allowed.

        Args:
            identity: who acts.
            operation: what the run does.
            doctype: the kind of record.
            arguments: the bound arguments conditions would test (``None``: no arguments).
        """
        args: Mapping[str, Any] = arguments if arguments is not None else {}
        try:
            if operation is None:
                self.enforce(identity, None, doctype, lambda: args)
            else:
                decision = self._decide(self._effective(identity), operation, doctype)
                if isinstance(decision, _Decision):
                    self._apply(decision, identity, operation, doctype, lambda: args, False)
        except PermissionDenied:
            return False
        return True

    def _decide(self, eff: _Effective, operation: str, doctype: str | None) -> _Allow | _Decision:
        """The cached decision for (doctype, operation), computed and stored on first use."""
        table = eff.table
        ops = table.get(doctype)
        decision = None if ops is None else ops.get(operation)
        if decision is None:
            decision = eff.decide(self.policy, operation, doctype)
            if ops is None:
                if len(table) >= _MAX_CACHED_DECISIONS:
                    table.clear()
                ops = table.setdefault(doctype, {})
            if len(ops) < _MAX_CACHED_DECISIONS:
                ops[operation] = decision
        return decision

    def _apply(
        self,
        decision: _Decision,
        identity: Identity | None,
        operation: str,
        doctype: str | None,
        arguments: Callable[[], Mapping[str, Any]],
        consume: bool,
    ) -> None:
        """Check what a non-trivial decision still needs: refusal, conditions, rate limits."""
        if decision.deny is not None:
            raise self._denied(identity, operation, doctype, decision.deny)
        user_grants = decision.user_grants
        scope_grants = decision.scope_grants
        if user_grants or scope_grants:
            args = arguments()
            if user_grants:
                for grant in user_grants:
                    if grant.condition.holds(args, identity):  # type: ignore[union-attr]
                        break
                else:
                    raise self._denied(
                        identity, operation, doctype, _unmet(user_grants, "the user's roles")
                    )
            if scope_grants:
                for grant in scope_grants:
                    if grant.condition.holds(args, identity):  # type: ignore[union-attr]
                        break
                else:
                    raise self._denied(
                        identity, operation, doctype, _unmet(scope_grants, "the agent's scope")
                    )
        if consume:
            for key, lim in decision.limits:
                retry = self._limiter.hit(key, lim.limit, lim.window)
                if retry > 0:
                    rule = f"rate_limits.{lim.name}: {lim.limit} per {lim.window:g}s per {lim.per}"
                    raise RateLimited(
                        _message(identity, operation, doctype, rule, "rate limited"),
                        retry_after=retry,
                        user=identity.user_id if identity is not None else None,
                        agent=identity.agent_id if identity is not None else None,
                        operation=operation,
                        doctype=doctype,
                        rule=rule,
                    )

    def _denied(
        self,
        identity: Identity | None,
        operation: str | None,
        doctype: str | None,
        rule: str,
    ) -> PermissionDenied:
        return PermissionDenied(
            _message(identity, operation, doctype, rule, "permission denied"),
            user=identity.user_id if identity is not None else None,
            agent=identity.agent_id if identity is not None else None,
            operation=operation,
            doctype=doctype,
            rule=rule,
        )

    def __repr__(self) -> str:
        return f"<Enforcer {self.policy!r} require_identity={self._require_identity}>"


def _unmet(grants: tuple[_Grant, ...], whose: str) -> str:
    parts = [f"{g.source}.where ({g.condition.describe()})" for g in grants if g.condition]
    return f"{whose} grant it only where " + " or ".join(parts) + ", not met"


def _message(
    identity: Identity | None,
    operation: str | None,
    doctype: str | None,
    rule: str,
    what: str,
) -> str:
    user = identity.user_id if identity is not None else None
    agent = identity.agent_id if identity is not None else None
    who = "anonymous" if user is None else f"user {user!r}"
    if agent is not None:
        who += f" via agent {agent!r}"
    return f"{what}: {who} may not {operation!r} on {doctype or WILDCARD!r} ({rule})"


def build_enforcer(
    policy: Policy | Enforcer | str | os.PathLike[str] | Mapping[str, Any] | None,
    *,
    require_identity: bool = False,
    rate_limiter: RateLimiter | None = None,
) -> Enforcer | None:
    """Turn what ``coworker.configure(policy=...)`` received into an :class:`Enforcer`.

    Args:
        policy: a :class:`Policy`, a path to a policy file, a mapping with the file's
            structure, an :class:`Enforcer` (used as is, e.g. to bring a shared rate
            limiter), or ``None``.
        require_identity: deny runs that have no user.
        rate_limiter: a shared rate-limit backend (default: in-process).

    Returns:
        The enforcer, or ``None`` when there is nothing to enforce (no policy and identity not
        required).

    Raises:
        ConfigError: the policy is invalid or of an unsupported type.
    """
    if not isinstance(require_identity, bool):
        raise ConfigError(f"require_identity: expected True or False, got {require_identity!r}")
    if policy is None:
        if not require_identity:
            return None
        return Enforcer(None, require_identity=True, rate_limiter=rate_limiter)
    if isinstance(policy, Enforcer):
        # A ready enforcer (e.g. with a shared rate limiter); never loosen what it requires.
        if rate_limiter is None and (policy.require_identity or not require_identity):
            return policy
        return Enforcer(
            policy.policy,
            require_identity=require_identity or policy.require_identity,
            rate_limiter=rate_limiter if rate_limiter is not None else policy._limiter,
        )
    if isinstance(policy, Policy):
        resolved = policy
    elif isinstance(policy, (str, os.PathLike)):
        resolved = Policy.from_file(policy)
    elif isinstance(policy, Mapping):
        resolved = Policy.from_dict(policy)
    else:
        raise ConfigError(
            f"policy: expected a Policy, a file path or a mapping, got {type(policy).__name__}"
        )
    return Enforcer(resolved, require_identity=require_identity, rate_limiter=rate_limiter)
