"""Cost-center precedence and budget windows of coworker.usage_policy, as pure rules."""

from __future__ import annotations

from decimal import Decimal

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
