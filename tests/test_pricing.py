"""Pricing: override files win, genai-prices fills in, every cost names its version, unknown
models cost null (never 0), and a golden table pins the numbers."""

from __future__ import annotations

import datetime as dt
import warnings
from decimal import Decimal
from pathlib import Path

import pytest

from coworker.exceptions import ConfigError
from coworker.pricing import Pricing, TokenCounts, UsageWarning

OVERRIDE = """
version = "acme-2026-01"

[[models]]
model = "acme-llm"
currency = "EUR"
valid_from = 2026-01-01
input_mtok = 2.0
output_mtok = 8.0
cache_read_mtok = 0.5
cache_creation_mtok = 2.5
reasoning_mtok = 8.0

[[models]]
model = "acme-llm"
currency = "EUR"
valid_from = 2026-06-01
input_mtok = 1.0
output_mtok = 4.0

[[models]]
model = "gpt-4o"
provider = "openai"
input_mtok = 100
output_mtok = 100
"""

# Golden: (model, provider, tokens) -> cost in USD under genai-prices 0.2.x on 2026-12-01.
# Prices per MTok (genai-prices' data): gpt-4o 2.5 in / 10 out / 1.25 cache read;
# claude-3-5-sonnet 3 in / 15 out / 0.3 cache read / 3.75 cache write.
GOLDEN = [
    ("gpt-4o", "openai", TokenCounts(1_000_000, 0), Decimal("2.5")),
    ("gpt-4o", "openai", TokenCounts(0, 1_000_000), Decimal("10")),
    ("gpt-4o", "openai", TokenCounts(1000, 500, cache_read=200), Decimal("0.00725")),
    (
        "claude-3-5-sonnet-latest",
        "anthropic",
        TokenCounts(1300, 100, cache_read=200, cache_creation=100),
        Decimal("0.004935"),
    ),
]
WHEN = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(("model", "provider", "tokens", "expected"), GOLDEN)
def test_golden_library_prices(
    model: str, provider: str, tokens: TokenCounts, expected: Decimal
) -> None:
    """The cached linear rates give exactly genai-prices' own result, pinned here."""
    import genai_prices

    cost = Pricing().cost(model, tokens, provider=provider, at=WHEN)
    assert cost is not None
    assert cost.amount == expected
    assert cost.currency == "USD"
    assert cost.source == f"genai-prices {genai_prices.__version__}"
    direct = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=tokens.input,
            output_tokens=tokens.output,
            cache_read_tokens=tokens.cache_read,
            cache_write_tokens=tokens.cache_creation,
        ),
        model,
        provider_id=provider,
        genai_request_timestamp=WHEN,
    )
    assert direct.total_price == expected


def test_override_file_wins_and_names_its_version(tmp_path: Path) -> None:
    """An override entry beats the library and its version is the cost's source."""
    path = tmp_path / "pricing.toml"
    path.write_text(OVERRIDE)
    pricing = Pricing.from_file(path)
    cost = pricing.cost("gpt-4o", TokenCounts(1_000_000, 0), provider="openai", at=WHEN)
    assert cost is not None and cost.amount == Decimal(100)
    assert cost.source == "pricing.toml acme-2026-01"
    assert "genai-prices" in pricing.version and "acme-2026-01" in pricing.version


def test_valid_from_picks_the_price_in_force(tmp_path: Path) -> None:
    """Before 2026-06-01 the January price applies, after it the June one."""
    path = tmp_path / "pricing.toml"
    path.write_text(OVERRIDE)
    pricing = Pricing.from_file(path, fallback=False)
    t = TokenCounts(1_000_000, 1_000_000)
    march = pricing.cost("acme-llm", t, at=dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    july = pricing.cost("acme-llm", t, at=dt.datetime(2026, 7, 1, tzinfo=dt.UTC))
    assert march is not None and march.amount == Decimal(10) and march.currency == "EUR"
    assert july is not None and july.amount == Decimal(5)
    before = pricing.cost("acme-llm", t, at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    assert before is None


def test_token_kinds_are_priced_apart(tmp_path: Path) -> None:
    """Cached and reasoning tokens are billed at their rate, not twice as input/output."""
    path = tmp_path / "pricing.toml"
    path.write_text(OVERRIDE)
    pricing = Pricing.from_file(path, fallback=False)
    t = TokenCounts(1_000_000, 1_000_000, cache_read=500_000, cache_creation=250_000)
    cost = pricing.cost("acme-llm", t, at=dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    # 250k plain in x 2 + 500k x 0.5 + 250k x 2.5 + 1M out x 8
    assert cost is not None and cost.amount == Decimal("9.375")


def test_unknown_model_costs_null_with_one_warning() -> None:
    """No price: None and a UsageWarning (once per model), never 0."""
    pricing = Pricing()
    with pytest.warns(UsageWarning, match="null, not 0"):
        assert pricing.cost("no-such-model-xyz", TokenCounts(10, 10)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pricing.cost("no-such-model-xyz", TokenCounts(10, 10)) is None


def test_json_override_is_accepted(tmp_path: Path) -> None:
    """A .json override file works like TOML; without a version its digest names it."""
    path = tmp_path / "prices.json"
    path.write_text('{"models": [{"model": "m", "input_mtok": 1, "output_mtok": 2}]}')
    cost = Pricing.from_file(path).cost("m", TokenCounts(1_000_000, 0))
    assert cost is not None and cost.amount == Decimal(1)
    assert cost.source.startswith("prices.json sha256:")


@pytest.mark.parametrize(
    "models",
    [
        '[{"model": "m", "input_mtok": -1, "output_mtok": 2}]',
        '[{"model": "m", "input_mtok": "NaN", "output_mtok": 2}]',
        '[{"model": "m", "input_mtok": true, "output_mtok": 2}]',
        '[{"model": "m", "input_mtok": 1}]',
        '[{"model": "", "input_mtok": 1, "output_mtok": 1}]',
        '[{"model": "m", "input_mtok": 1, "output_mtok": 1, "currency": "dollars"}]',
        '[{"model": "m", "input_mtok": 1, "output_mtok": 1, "typo_mtok": 1}]',
    ],
)
def test_bad_override_entries_fail_loudly(tmp_path: Path, models: str) -> None:
    """Negative, NaN, boolean or missing prices, bad currency, unknown keys: ConfigError."""
    path = tmp_path / "p.json"
    path.write_text(f'{{"models": {models}}}')
    with pytest.raises(ConfigError, match=r"models\[0\]"):
        Pricing.from_file(path)


# The ledger's cost text (str of the Decimal) for these inputs, as the code before the cost
# cache and the resolved rates produced it: the text must never change with the code.
GOLDEN_TEXT = [
    ("gpt-4o", "openai", TokenCounts(1_000_000, 0), "2.50"),
    ("gpt-4o", "openai", TokenCounts(0, 1_000_000), "10.00"),
    ("gpt-4o", "openai", TokenCounts(1000, 500, cache_read=200), "0.00725"),
    (
        "claude-3-5-sonnet-latest",
        "anthropic",
        TokenCounts(1300, 100, cache_read=200, cache_creation=100),
        "0.004935",
    ),
    ("gpt-4o", None, TokenCounts(1200, 80, cache_read=256), "0.00348"),
    ("o3", "openai", TokenCounts(5000, 3000, cache_read=1000, reasoning=2000), "0.0325"),
    ("gpt-4o", "openai", TokenCounts(7, 3), "0.0000475"),
]


def test_cached_costs_keep_the_exact_ledger_text() -> None:
    """A cost served from the per-counts cache has the same text as the first computation."""
    pricing = Pricing()
    for _ in range(3):  # cold, then from the cache, with the other counts in between
        for model, provider, tokens, text in GOLDEN_TEXT:
            cost = pricing.cost(model, tokens, provider=provider, at=WHEN)
            assert cost is not None
            assert str(cost.amount) == text, (model, tokens)


def test_cost_cache_tells_counts_and_days_apart() -> None:
    """Counts that differ in one kind, or another day's price, are never served another's."""
    pricing = Pricing()
    base = pricing.cost("gpt-4o", TokenCounts(1000, 500), provider="openai", at=WHEN)
    cached = pricing.cost(
        "gpt-4o", TokenCounts(1000, 500, cache_read=200), provider="openai", at=WHEN
    )
    assert base is not None and cached is not None
    assert base.amount - cached.amount == 200 * (Decimal("2.5") - Decimal("1.25")) / 1_000_000
    old = pricing.cost(
        "gpt-4o",
        TokenCounts(1000, 500),
        provider="openai",
        at=dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
    )
    fresh = Pricing().cost(
        "gpt-4o",
        TokenCounts(1000, 500),
        provider="openai",
        at=dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
    )
    assert old is not None and fresh is not None
    assert str(old.amount) == str(fresh.amount)


def test_override_text_is_exact(tmp_path: Path) -> None:
    """Override prices resolved once per entry give the same text as the per-kind formula."""
    path = tmp_path / "pricing.toml"
    path.write_text(OVERRIDE)
    pricing = Pricing.from_file(path)
    at = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    cost = pricing.cost(
        "acme-llm", TokenCounts(1000, 300, cache_read=100, cache_creation=50, reasoning=20), at=at
    )
    assert cost is not None
    # 850 x 2.0 + 100 x 0.5 + 50 x 2.5 + 280 x 8.0 + 20 x 8.0, per million
    assert str(cost.amount) == "0.004275"


def test_integer_pricing_equals_the_decimal_formula_digit_for_digit() -> None:
    """The integer fast path gives the Decimal formula's coefficient and exponent, always."""
    import random

    from coworker.pricing import _apply, _apply_decimal, _rates

    rng = random.Random(2)
    # Equal values with other exponents (2.5 / 2.50, 0 / 0.0 / 0E-9), long rates beyond the
    # precision, positive exponents.
    texts = ["0", "0.0", "0E-9", "2.5", "2.50", "10", "1.25", "0.075", "0.000001", "1E+1",
             "12.345678", "3.1415926535897932384626433832795028841971", "7E+3"]  # fmt: skip
    for _ in range(20_000):
        prices = {"input": Decimal(rng.choice(texts)), "output": Decimal(rng.choice(texts))}
        for kind in ("cache_read", "cache_creation", "reasoning"):
            if rng.random() < 0.5:
                prices[kind] = Decimal(rng.choice(texts))
        top = rng.choice([10, 1000, 10**6, 10**15, 2**53])
        inp = rng.randrange(top)
        read = rng.randrange(inp + 1)
        created = rng.randrange(inp - read + 1)
        out = rng.randrange(top)
        tokens = TokenCounts(inp, out, read, created, rng.randrange(out + 1))
        rates = _rates(prices)
        fast, slow = _apply(rates, tokens), _apply_decimal(rates, tokens)
        assert fast.as_tuple() == slow.as_tuple(), (prices, tokens)
