"""Cost-center precedence and budget windows of coworker.usage_policy, as pure rules."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import coworker
from coworker.identity import Agent, Identity, User
from coworker.usage_policy import UsageRules, with_cost_center

DOCTYPES = {
    "Campaign": {"cost_center": "marketing", "owner_pays": True},
    "Invoice": {"cost_center": "finance"},
}
USAGE = {"cost_centers": {"listed": "support"}, "default_cost_center": "shared"}


@pytest.mark.parametrize(
    ("user", "doctype", "expected"),
    [
        (User("own", attributes={"cost_center": "sales"}), "Campaign", "marketing"),  # 1
        (User("own", attributes={"cost_center": "sales"}), "Invoice", "sales"),  # 2
        (User("listed"), "Invoice", "support"),  # 3
        (User("nobody"), "Invoice", "finance"),  # 4
        (User("nobody"), "Customer", "shared"),  # 5
        (None, None, "shared"),
    ],
)
def test_cost_center_precedence(user: User | None, doctype: str | None, expected: str) -> None:
    """owner_pays doctype > the user's own > the policy's table > doctype > default."""
    rules = UsageRules(DOCTYPES, USAGE)
    assert rules.cost_center(Identity(user), doctype) == expected


def test_acting_as_cost_center_needs_a_user() -> None:
    """An anonymous block has nobody to charge; a named user keeps roles and attributes."""
    with pytest.raises(ValueError, match="needs a user"):
        coworker.acting_as(None, cost_center="sales")
    u = with_cost_center(User("u", roles=("r",), attributes={"dept": "x"}), "sales")
    assert u.roles == ("r",) and dict(u.attributes) == {"dept": "x", "cost_center": "sales"}


def test_budget_window_rolls_over() -> None:
    """A spent budget refuses until the next window, then allows again."""
    now = [1_000_000.0]
    rules = UsageRules(
        None,
        {"budgets": {"b": {"per": "agent", "window": "1h", "max_cost": 1, "currency": "USD"}}},
        clock=lambda: now[0],
    )
    ident = Identity(User("u"), Agent("bot"))
    rules.account(ident, None, 10, Decimal("0.6"), "USD")
    rules.check(ident, None)
    rules.account(ident, None, 10, Decimal("0.6"), "EUR")  # another currency: not counted
    rules.check(ident, None)
    rules.account(ident, None, 10, Decimal("0.4"), "USD")
    with pytest.raises(coworker.BudgetExceeded) as info:
        rules.check(ident, None)
    assert info.value.budget == "b" and info.value.agent == "bot"
    assert info.value.retry_after == pytest.approx(3600 - (now[0] % 3600))
    rules.check(Identity(User("u"), Agent("other")), None)  # each agent its own budget
    now[0] += 3600
    rules.check(ident, None)


def _usage(user: str, tokens: Any, **extra: Any) -> dict[str, Any]:
    from coworker.audit.record import format_time

    at = format_time(time.time_ns())
    return {
        "kind": "usage",
        "category": "usage",
        "user_id": user,
        "start": at,
        "usage_at": at,
        "input_tokens": tokens,
        "output_tokens": 0,
        **extra,
    }


def test_shared_budget_counts_other_processes_records_and_ignores_hostile_ones(
    tmp_path: Path,
) -> None:
    """A shared store's usage records of other processes count; this process's own (by
    usage_process), bad counts, bad amounts and other categories do not; each refresh reads
    only what was appended since the last."""
    from coworker.audit.store_sqlite import SQLiteStore
    from coworker.usage_policy import PROCESS_FIELD, process_id

    store = SQLiteStore(str(tmp_path / "a.db"))
    rules = UsageRules(
        None,
        {
            "budget_refresh": 0,
            "budgets": {"b": {"per": "user", "max_tokens": 1000, "max_cost": 1}},
        },
    )
    rules.share(store)
    ident = Identity(User("u"))
    store.append(
        [
            _usage("u", 400),
            _usage("u", 5000, **{PROCESS_FIELD: process_id()}),  # ours: counted in memory
            _usage("u", True),
            _usage("u", -5),
            _usage("u", 1, cost_amount="NaN", cost_currency="USD"),
            _usage("u", 1, cost_amount="1e999999999", cost_currency="USD"),
            {**_usage("u", 5000), "category": "policy-violation"},
            {**_usage("u", 5000), "usage_at": "not a time", "start": None},
        ]
    )
    rules.check(ident, None)
    assert rules.ledger is not None and rules.ledger.get(("b", "u"), 0) is None
    index = int(time.time() // 86400)
    assert rules.ledger.get(("b", "u"), index) == (402, Decimal(0))
    store.append([_usage("u", 600)])
    with pytest.raises(coworker.BudgetExceeded):
        rules.check(ident, None)
    assert rules.ledger.refreshes == 2
    store.close()


def test_a_shared_store_that_cannot_be_read_leaves_budgets_on_what_was_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ledger read failing logs a warning and keeps the last spend: no run fails for it."""
    from coworker.audit.store_sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "a.db"))
    rules = UsageRules(
        None, {"budget_refresh": 0, "budgets": {"b": {"per": "user", "max_tokens": 9}}}
    )
    rules.share(store)
    store.append([_usage("u", 5)])
    rules.check(Identity(User("u")), None)
    (tmp_path / "a.db").unlink()
    (tmp_path / "a.db").mkdir()  # the file is gone, a directory in its place
    rules.check(Identity(User("u")), None)
    assert "could not read the usage ledger" in caplog.text
    rules.account(Identity(User("u")), None, 4, None, None)
    with pytest.raises(coworker.BudgetExceeded):  # 5 read before + 4 of its own
        rules.check(Identity(User("u")), None)
    store.close()


def test_a_future_dated_usage_record_does_not_hide_the_others_spend(tmp_path: Path) -> None:
    """One usage record dated years ahead (a hostile ingest sender, a skewed clock) must not
    make the ledger cache skip every later record of the same user: it counts now."""
    from coworker.audit.record import format_time
    from coworker.audit.store_sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "a.db"))
    rules = UsageRules(
        None, {"budget_refresh": 0, "budgets": {"b": {"per": "user", "max_tokens": 1000}}}
    )
    rules.share(store)
    ahead = format_time(time.time_ns() + 10 * 365 * 86400 * 10**9)
    store.append([{**_usage("u", 1), "usage_at": ahead}])
    rules.check(Identity(User("u")), None)
    store.append([_usage("u", 999)])
    with pytest.raises(coworker.BudgetExceeded):
        rules.check(Identity(User("u")), None)
    store.close()
