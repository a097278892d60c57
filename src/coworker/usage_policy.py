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

Budget counts: each process counts its own usage exactly, in memory; with an audit store
(``coworker.configure(audit=..., policy=...)``) it adds what *other* processes wrote to the
store's usage ledger, read incrementally (:class:`LedgerSpend`). See ``docs/usage.md``
("Budgets") for what a check can miss between processes, and the bound.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final

from coworker.exceptions import BudgetExceeded, ConfigError

if TYPE_CHECKING:
    from coworker.identity import Identity, User

__all__ = ["PROCESS_FIELD", "Budget", "LedgerSpend", "UsageRules", "cost_center_of_user"]

_log = logging.getLogger(__name__)
_USAGE_KEYS: Final = ("budget_refresh", "budgets", "cost_centers", "default_cost_center")
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
        refresh = table.get("budget_refresh", 1.0)
        # 0: read the ledger at every check (exact but for runs in flight; one query a run).
        self.refresh = (
            0.0
            if refresh == 0 and type(refresh) in (int, float)
            else _window(refresh, "usage.budget_refresh")
        )
        self._clock = clock
        self._lock = threading.Lock()
        # (budget name, subject id) -> (window index, tokens, cost): this process's spend.
        self._spent: dict[tuple[str, str], tuple[int, int, Decimal]] = {}
        self._generation = _FORKS[0]
        # The other processes' spend, once coworker.configure(audit=...) shares a store.
        self.ledger: LedgerSpend | None = None

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

    def share(self, store: Any) -> None:
        """Count what other processes wrote to ``store``'s usage ledger against the budgets
        too (``coworker.configure(audit=...)`` calls this); ``None`` stops it.

        A store without ``search`` (the in-memory one) is not shared: nothing else writes it.
        """
        if store is None or not self.budgets or not callable(getattr(store, "search", None)):
            self.ledger = None
        else:
            self.ledger = LedgerSpend(store, self.budgets, refresh=self.refresh)

    def _spent_on(self, key: tuple[str, str], index: int) -> tuple[bool, int, Decimal]:
        """(any usage seen, tokens, cost) of one budget key in window ``index``: this
        process's from memory plus, when shared, the other processes' from the ledger."""
        seen, tokens, cost = False, 0, _ZERO
        with self._lock:
            own = self._spent.get(key)
        if own is not None and own[0] == index:
            seen, tokens, cost = True, own[1], own[2]
        ledger = self.ledger
        if ledger is not None:
            other = ledger.get(key, index)
            if other is not None:
                seen, tokens, cost = True, tokens + other[0], cost + other[1]
        return seen, tokens, cost

    def check(self, identity: Identity | None, doctype: str | None) -> None:
        """Refuse the run if a budget of its user, agent or cost center is spent.

        With a shared ledger the other processes' spend comes from a per-process cache,
        refreshed by one indexed query when it is older than ``[usage] budget_refresh`` or
        when a budget is within 10% of its cap (see :class:`LedgerSpend`).

        Raises:
            BudgetExceeded: the message names the budget; ``retry_after`` is the time to the
                next window.
        """
        if not self.budgets:
            return
        if self._generation != _FORKS[0]:
            self._forked()
        center = self.cost_center(identity, doctype)
        now = self._clock()
        ledger = self.ledger
        for attempt in (0, 1):
            near = False
            for b in self.budgets:
                subject = self._subject(b, identity, center)
                if subject is None:
                    continue
                index = int(now // b.window)
                seen, tokens, cost = self._spent_on((b.name, subject), index)
                if not seen:
                    continue
                over_tokens = b.max_tokens is not None and tokens >= b.max_tokens
                if over_tokens or (b.max_cost is not None and cost >= b.max_cost):
                    cap = (
                        f"{tokens} of {b.max_tokens} tokens"
                        if over_tokens
                        else f"{cost} of {b.max_cost} {b.currency}"
                    )
                    raise BudgetExceeded(
                        f"budget {b.name!r} of {b.per} {subject!r} is spent ({cap} in this "
                        f"{b.window:g} s window)",
                        retry_after=(index + 1) * b.window - now,
                        user=identity.user.id if identity is not None and identity.user else None,
                        agent=(
                            identity.agent.id if identity is not None and identity.agent else None
                        ),
                        doctype=doctype,
                        rule=f"usage.budgets.{b.name}",
                        budget=b.name,
                    )
                near = near or (
                    (b.max_tokens is not None and tokens >= b.max_tokens * _NEAR)
                    or (b.max_cost is not None and cost >= b.max_cost * _NEAR_COST)
                )
            # Under the cap by what this process knows: look at the ledger again when the
            # cache is old, or when a budget is close enough to its cap that what the others
            # spent since the last look may fill it; then decide once more.
            if ledger is None or attempt or not (near or ledger.stale()):
                return
            if not ledger.refresh(now):
                return

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
        if self._generation != _FORKS[0]:
            self._forked()
        now = self._clock()
        for b in self.budgets:
            subject = self._subject(b, identity, center)
            if subject is None:
                continue
            index = int(now // b.window)
            add_cost = amount if amount is not None and currency == b.currency else _ZERO
            key = (b.name, subject)
            with self._lock:
                old = self._spent.get(key)
                if old is None or old[0] != index:
                    old = (index, 0, _ZERO)
                self._spent[key] = (index, old[1] + tokens, old[2] + add_cost)

    def _forked(self) -> None:
        # A forked child starts with its parent's counts, which the parent also holds (and
        # whose ledger records now count as another process's): start from nothing.
        self._generation = _FORKS[0]
        self._lock = threading.Lock()
        self._spent = {}
        if self.ledger is not None:
            self.ledger = LedgerSpend(self.ledger.store, self.budgets, refresh=self.refresh)

    def reset(self) -> None:
        """Forget this process's counts (tests, a new billing period set by hand); what the
        ledger holds of the other processes still counts."""
        with self._lock:
            self._spent.clear()


_ZERO: Final = Decimal(0)
_NEAR: Final = 0.9
_NEAR_COST: Final = Decimal("0.9")
LOOKBACK: Final = 86400.0
"""Seconds before a window's start from which the first refresh reads usage records (by the
record's run start: a run that began up to a day before the window and spent in it counts)."""

PROCESS_FIELD: Final = "usage_process"
"""The usage record key naming the process (incarnation) that wrote it: a budget check counts
its own process's usage from memory, so it skips these records in the ledger."""

_PROCESS = [secrets.token_hex(8)]
_FORKS = [0]


def process_id() -> str:
    """This process's id in the usage records it writes (new in a forked child)."""
    return _PROCESS[0]


def _after_fork_in_child() -> None:
    _PROCESS[0] = secrets.token_hex(8)
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class LedgerSpend:
    """The other processes' spend per budget and subject, from a store's usage ledger.

    A cache: :meth:`refresh` reads only the usage records appended since the last one
    (``category = 'usage' AND seq > cursor``: the SQLite store's ``(category, seq)`` index,
    the PostgreSQL store's primary key) and adds them up per budget key and window. The first
    refresh reads the usage records whose run started at most :data:`LOOKBACK` seconds before
    the earliest current window. Records this process wrote (:data:`PROCESS_FIELD`) are
    skipped: :class:`UsageRules` has them exactly, in memory, before they are even written.

    Args:
        store: the audit store (anything with the stores' ``search``).
        budgets: the budgets to add up for.
        refresh: seconds a refresh stays fresh (:meth:`stale`).
    """

    def __init__(self, store: Any, budgets: Iterable[Budget], *, refresh: float) -> None:
        self.store = store
        self.budgets = tuple(budgets)
        self.refresh_every = refresh
        self.refreshes = 0  # how many queries ran (tests, benchmarks)
        self._cursor: int | None = None
        self._refreshed_at = -float("inf")  # time.monotonic() of the last refresh
        self._spent: dict[tuple[str, str], tuple[int, int, Decimal]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], index: int) -> tuple[int, Decimal] | None:
        """(tokens, cost) the others spent on ``key`` in window ``index``, as last read."""
        value = self._spent.get(key)
        if value is None or value[0] != index:
            return None
        return value[1], value[2]

    def stale(self) -> bool:
        """Whether the last refresh is older than ``refresh`` seconds."""
        return time.monotonic() - self._refreshed_at >= self.refresh_every

    def refresh(self, now: float) -> bool:
        """Read the usage records appended since the last refresh; ``False`` when the store
        could not be read (logged; the cache stays as it was and is retried after
        ``refresh`` seconds: a budget then holds on what was last read, it does not refuse
        every run because the store is away)."""
        from coworker import attributes as attr
        from coworker.audit.record import format_time

        with self._lock:
            try:
                if self._cursor is None:
                    head = self.store.head()
                    cursor = head.seq if head is not None else 0
                    start = min(int(now // b.window) * b.window for b in self.budgets)
                    since = format_time(int((start - LOOKBACK) * 1e9))
                    found = list(self.store.search({"category": attr.CATEGORY_USAGE}, since=since))
                else:
                    cursor = self._cursor
                    found = list(self.store.search({"category": attr.CATEGORY_USAGE}, after=cursor))
            except Exception as exc:  # the store's failure must not fail the run's check
                self._refreshed_at = time.monotonic()
                _log.warning(
                    "coworker: budgets could not read the usage ledger (%s); using the "
                    "spend last read",
                    exc,
                )
                return False
            own = _PROCESS[0]
            for rec in found:
                cursor = max(cursor, rec.seq)
                try:
                    fields = json.loads(rec.body)
                except ValueError:
                    continue  # verify reports a malformed body; it spends nothing
                if (
                    type(fields) is dict
                    and fields.get("kind") == attr.CATEGORY_USAGE
                    and fields.get("category") == attr.CATEGORY_USAGE
                    and fields.get(PROCESS_FIELD) != own
                ):
                    self._add(fields, now)
            self._cursor = cursor
            self._refreshed_at = time.monotonic()
            self.refreshes += 1
            return True

    def _add(self, rec: Mapping[str, Any], now: float) -> None:
        at = _seconds(rec.get("usage_at")) or _seconds(rec.get("end")) or _seconds(rec.get("start"))
        if at is None:
            return
        # A record read now was spent by now: one dated later (a hostile ingest sender, a
        # skewed clock) counts in the current window. Left in its future window it would
        # displace the key's current one, and every later record (older than it) was skipped.
        at = min(at, now)
        tokens = 0
        for name in ("input_tokens", "output_tokens"):
            value = rec.get(name)
            if type(value) is int and 0 < value < 2**53:
                tokens += value
        amount: Decimal | None = None
        raw = rec.get("cost_amount")
        if isinstance(raw, str):
            try:
                amount = Decimal(raw)
            except InvalidOperation:
                amount = None
            # A cost the pricing can have made: finite, >= 0, not absurdly large (a hostile
            # record must not overflow the sums: it spends nothing).
            if amount is not None and not (
                amount.is_finite() and amount >= 0 and amount.adjusted() < 24
            ):
                amount = None
        subjects = {
            "user": rec.get("user_id"),
            "agent": rec.get("agent_id"),
            "cost_center": rec.get("cost_center"),
        }
        for b in self.budgets:
            subject = subjects[b.per]
            if not isinstance(subject, str) or (b.match != "*" and b.match != subject):
                continue
            index = int(at // b.window)
            cost = (
                amount if amount is not None and rec.get("cost_currency") == b.currency else _ZERO
            )
            key = (b.name, subject)
            old = self._spent.get(key)
            if old is not None and old[0] > index:
                continue  # an older window's record, read late
            if old is None or old[0] < index:
                old = (index, 0, _ZERO)
            self._spent[key] = (index, old[1] + tokens, old[2] + cost)


def _seconds(text: Any) -> float | None:
    """Unix seconds of a record's fixed-width RFC 3339 time, or ``None``."""
    if not isinstance(text, str):
        return None
    try:  # nanoseconds cut to microseconds for datetime
        return _dt.datetime.fromisoformat(text[:26] + "+00:00").timestamp()
    except ValueError:
        return None


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
