"""The usage part of a :class:`coworker.Policy`: cost centers and budgets.

Read from the policy document's raw tables (so the access-control parser only has to let the
keys through): ``cost_center`` / ``owner_pays`` in a ``[doctypes.<name>]`` rule, and a
top-level ``[usage]`` table::

    [doctypes.Campaign]
    cost_center = "marketing"
    owner_pays = true            # runs on Campaign are paid by marketing, whoever runs them

    [usage]
    default_cost_center = "shared"
    cost_centers = { "sales-rep-1" = "sales" }   # user id -> cost center

    [usage.budgets.sales-daily]
    per = "cost_center"          # user | agent | cost_center
    match = "sales"              # one id, or "*" (default): each id has its own budget
    window = "1d"                # fixed windows aligned to the Unix epoch (UTC days)
    max_tokens = 2_000_000       # and/or
    max_cost = 50.0
    currency = "USD"

Precedence of the cost center of a run (the first that names one wins):

1. the run's doctype rule with ``owner_pays = true``;
2. the user's own: ``acting_as(..., cost_center=...)`` (``User.attributes["cost_center"]``);
3. ``[usage] cost_centers`` of the policy for the user id;
4. the run's doctype rule ``cost_center`` without ``owner_pays`` (a doctype's default payer);
5. ``[usage] default_cost_center``; else none.

Budget counts are per process (like the in-memory rate limiter); see ``docs/usage.md``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final

from coworker.exceptions import BudgetExceeded, ConfigError

if TYPE_CHECKING:
    from coworker.identity import Identity, User

__all__ = ["Budget", "UsageRules", "cost_center_of_user"]

_USAGE_KEYS: Final = ("budgets", "cost_centers", "default_cost_center")
_BUDGET_KEYS: Final = ("currency", "match", "max_cost", "max_tokens", "per", "window")
_PER: Final = ("agent", "cost_center", "user")
_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
USER_ATTRIBUTE: Final = "cost_center"
"""The ``User.attributes`` key that ``acting_as(..., cost_center=...)`` sets."""


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 512:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return str.__str__(value)


def _window(value: Any, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value[-1:] in _UNITS:
        try:
            seconds = float(value[:-1]) * _UNITS[value[-1]]
        except ValueError:
            raise ConfigError(f"{where}: expected e.g. '1h' or '30d', got {value!r}") from None
    else:
        raise ConfigError(f"{where}: expected seconds or e.g. '1h', '30d', got {value!r}")
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(f"{where}: the window must be positive, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Budget:
    """One ``[usage.budgets.<name>]`` rule."""

    name: str
    per: str
    match: str
    window: float
    max_tokens: int | None
    max_cost: Decimal | None
    currency: str


def _budget(name: str, spec: Any, where: str) -> Budget:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a table")
    extra = sorted(set(spec) - set(_BUDGET_KEYS))
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {extra} (expected {list(_BUDGET_KEYS)})")
    per = spec.get("per")
    if per not in _PER:
        raise ConfigError(f"{where}.per: expected one of {list(_PER)}, got {per!r}")
    max_tokens = spec.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0
    ):
        raise ConfigError(f"{where}.max_tokens: expected an integer >= 0")
    max_cost: Decimal | None = None
    if "max_cost" in spec:
        raw = spec["max_cost"]
        try:
            if isinstance(raw, bool):
                raise InvalidOperation
            max_cost = Decimal(str(raw))
        except InvalidOperation:
            raise ConfigError(f"{where}.max_cost: expected a number") from None
        if not max_cost.is_finite() or max_cost < 0:
            raise ConfigError(f"{where}.max_cost: expected a finite number >= 0")
    if max_tokens is None and max_cost is None:
        raise ConfigError(f"{where}: a budget needs max_tokens or max_cost")
    currency = spec.get("currency", "USD")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
        raise ConfigError(f"{where}.currency: expected an ISO 4217 code like 'USD'")
    return Budget(
        name=name,
        per=per,
        match=_name(spec.get("match", "*"), f"{where}.match"),
        window=_window(spec.get("window", "1d"), f"{where}.window"),
        max_tokens=max_tokens,
        max_cost=max_cost,
        currency=currency.upper(),
    )


def cost_center_of_user(identity: Identity | None) -> str | None:
    """The cost center the application gave the acting user (``acting_as(cost_center=)``)."""
    user = identity.user if identity is not None else None
    if user is None:
        return None
    value = user.attributes.get(USER_ATTRIBUTE)
    return value if isinstance(value, str) and value else None


class UsageRules:
    """Cost centers and budgets of one policy, with the budgets' running counts.

    Args:
        doctypes: the policy's raw ``doctypes`` table.
        usage: the policy's raw ``usage`` table.
        clock: wall-clock seconds (windows are aligned to the epoch).

    Raises:
        ConfigError: an invalid entry; the message names it.
    """

    def __init__(
        self,
        doctypes: Mapping[str, Any] | None,
        usage: Mapping[str, Any] | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.doctype_centers: dict[str, tuple[str, bool]] = {}
        for doctype, rule in (doctypes or {}).items():
            if not isinstance(rule, Mapping):
                continue  # the ACL parser reports it
            where = f"doctypes.{doctype}"
            owner_pays = rule.get("owner_pays", False)
            if not isinstance(owner_pays, bool):
                raise ConfigError(f"{where}.owner_pays: expected true or false")
            if "cost_center" in rule:
                center = _name(rule["cost_center"], f"{where}.cost_center")
                self.doctype_centers[str(doctype)] = (center, owner_pays)
            elif owner_pays:
                raise ConfigError(f"{where}.owner_pays: needs a cost_center")
        table = usage or {}
        if not isinstance(table, Mapping):
            raise ConfigError("usage: expected a table")
        extra = sorted(set(table) - set(_USAGE_KEYS))
        if extra:
            raise ConfigError(f"usage: unknown key(s) {extra} (expected {list(_USAGE_KEYS)})")
        centers = table.get("cost_centers", {})
        if not isinstance(centers, Mapping):
            raise ConfigError("usage.cost_centers: expected a table of user id -> cost center")
        self.user_centers = {
            str(uid): _name(c, f"usage.cost_centers.{uid}") for uid, c in centers.items()
        }
        default = table.get("default_cost_center")
        self.default_center = (
            None if default is None else _name(default, "usage.default_cost_center")
        )
        budgets = table.get("budgets", {})
        if not isinstance(budgets, Mapping):
            raise ConfigError("usage.budgets: expected a table of named budgets")
        self.budgets = tuple(
            _budget(str(n), spec, f"usage.budgets.{n}") for n, spec in budgets.items()
        )
        self._clock = clock
        self._lock = threading.Lock()
        # (budget name, subject id) -> (window index, tokens, cost)
        self._spent: dict[tuple[str, str], tuple[int, int, Decimal]] = {}

    def cost_center(self, identity: Identity | None, doctype: str | None) -> str | None:
        """The cost center that pays for usage in a run on ``doctype`` by ``identity``
        (precedence in the module docstring)."""
        rule = self.doctype_centers.get(doctype) if doctype is not None else None
        if rule is not None and rule[1]:
            return rule[0]
        own = cost_center_of_user(identity)
        if own is not None:
            return own
        user = identity.user if identity is not None else None
        if user is not None:
            listed = self.user_centers.get(user.id)
            if listed is not None:
                return listed
        if rule is not None:
            return rule[0]
        return self.default_center

    def _subject(self, b: Budget, identity: Identity | None, center: str | None) -> str | None:
        if b.per == "user":
            subject = identity.user.id if identity is not None and identity.user else None
        elif b.per == "agent":
            subject = identity.agent.id if identity is not None and identity.agent else None
        else:
            subject = center
        if subject is None or (b.match != "*" and b.match != subject):
            return None
        return subject

    def check(self, identity: Identity | None, doctype: str | None) -> None:
        """Refuse the run if a budget of its user, agent or cost center is spent.

        Raises:
            BudgetExceeded: the message names the budget; ``retry_after`` is the time to the
                next window.
        """
        if not self.budgets:
            return
        center = self.cost_center(identity, doctype)
        now = self._clock()
        for b in self.budgets:
            subject = self._subject(b, identity, center)
            if subject is None:
                continue
            index = int(now // b.window)
            with self._lock:
                spent = self._spent.get((b.name, subject))
            if spent is None or spent[0] != index:
                continue
            over = (b.max_tokens is not None and spent[1] >= b.max_tokens) or (
                b.max_cost is not None and spent[2] >= b.max_cost
            )
            if over:
                cap = (
                    f"{spent[1]} of {b.max_tokens} tokens"
                    if b.max_tokens is not None and spent[1] >= b.max_tokens
                    else f"{spent[2]} of {b.max_cost} {b.currency}"
                )
                raise BudgetExceeded(
                    f"budget {b.name!r} of {b.per} {subject!r} is spent ({cap} in this "
                    f"{b.window:g} s window)",
                    retry_after=(index + 1) * b.window - now,
                    user=identity.user.id if identity is not None and identity.user else None,
                    agent=identity.agent.id if identity is not None and identity.agent else None,
                    doctype=doctype,
                    rule=f"usage.budgets.{b.name}",
                    budget=b.name,
                )

    def account(
        self,
        identity: Identity | None,
        center: str | None,
        tokens: int,
        amount: Decimal | None,
        currency: str | None,
    ) -> None:
        """Count one call's tokens and cost against every budget it falls under."""
        if not self.budgets:
            return
        now = self._clock()
        for b in self.budgets:
            subject = self._subject(b, identity, center)
            if subject is None:
                continue
            index = int(now // b.window)
            add_cost = amount if amount is not None and currency == b.currency else Decimal(0)
            key = (b.name, subject)
            with self._lock:
                old = self._spent.get(key)
                if old is None or old[0] != index:
                    old = (index, 0, Decimal(0))
                self._spent[key] = (index, old[1] + tokens, old[2] + add_cost)

    def reset(self) -> None:
        """Forget every budget's counts (tests, a new billing period set by hand)."""
        with self._lock:
            self._spent.clear()


def with_cost_center(user: User | None, cost_center: str) -> User:
    """``user`` (a :class:`~coworker.User`) with ``attributes["cost_center"]`` set; what
    ``acting_as(..., cost_center=...)`` does.

    Raises:
        ValueError: no user (an anonymous block has nobody to charge) or a bad name.
    """
    from coworker.identity import User, text

    if user is None:
        raise ValueError("acting_as(cost_center=...) needs a user: nobody to charge")
    center = text(cost_center, "cost_center")
    return User(user.id, user.roles, {**user.attributes, USER_ATTRIBUTE: center})
