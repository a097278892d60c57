"""The access-control :class:`Policy`: roles, agent scopes, doctype rules and rate-limit
rules, parsed and validated from a dict, a TOML or a YAML file (docs/acl.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from coworker._state import DEFAULT_READ_OPERATIONS
from coworker.acl.conditions import Condition
from coworker.exceptions import ConfigError

if TYPE_CHECKING:
    pass

__all__ = ["WILDCARD", "DoctypeRule", "Grant", "Policy", "RateLimit"]


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


# -- grants, doctype rules, rate limits ------------------------------------------------------


class Grant:
    """One entry of a role's (or agent scope's) list for a doctype."""

    __slots__ = ("condition", "ops", "source")

    def __init__(self, ops: frozenset[str], condition: Condition | None, source: str) -> None:
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


def _parse_grants(spec: Any, where: str) -> dict[str, tuple[Grant, ...]]:
    """``{doctype: [op | {op|ops, where}]}`` → compiled grants per doctype."""
    out: dict[str, tuple[Grant, ...]] = {}
    for doctype, entries in _table(spec, where).items():
        here = f"{where}.{doctype}"
        if not isinstance(doctype, str) or not doctype:
            raise ConfigError(f"{here}: a doctype must be a non-empty string")
        if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
            raise ConfigError(f"{here}: expected a list of operations, got {entries!r}")
        grants: list[Grant] = []
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
                cond = Condition(entry["where"], f"{at}.where") if "where" in entry else None
                if cond is None:
                    plain |= ops
                else:
                    grants.append(Grant(ops, cond, at))
            else:
                plain.add(_op_name(entry, at))
        if plain:
            grants.insert(0, Grant(frozenset(plain), None, here))
        out[doctype] = tuple(grants)
    return out


class DoctypeRule:
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


class RateLimit:
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
        self._roles: dict[str, dict[str, tuple[Grant, ...]]] = {}
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
        self._agents: dict[str, dict[str, tuple[Grant, ...]]] = {
            str(aid): _parse_grants(spec, f"agents.{aid}")
            for aid, spec in _table(agents or {}, "agents").items()
        }
        self._doctypes: dict[str, DoctypeRule] = {
            str(name): DoctypeRule(str(name), spec, f"doctypes.{name}")
            for name, spec in _table(doctypes or {}, "doctypes").items()
        }
        self._rate_limits = tuple(
            RateLimit(str(name), spec, f"rate_limits.{name}")
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

    # -- what the enforcer reads (read-only views of the parsed policy) --------------------

    def grants_of(self, role: str) -> Mapping[str, tuple[Grant, ...]]:
        """The grants of a defined role, by doctype (``*`` for every doctype)."""
        return self._roles[role]

    def agent_scope(self, agent_id: str) -> Mapping[str, tuple[Grant, ...]] | None:
        """The ``[agents.<id>]`` scope of an agent, or ``None`` when it has none."""
        return self._agents.get(agent_id)

    def doctype_rule(self, doctype: str) -> DoctypeRule | None:
        """The ``[doctypes.<name>]`` rule, or ``None``."""
        return self._doctypes.get(doctype)

    @property
    def read_operations(self) -> frozenset[str]:
        """The operations that count as reads (for ``read_only`` doctypes)."""
        return self._read_operations

    @property
    def rate_limits(self) -> tuple[RateLimit, ...]:
        """The ``[[rate_limits]]`` rules, in file order."""
        return self._rate_limits

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
