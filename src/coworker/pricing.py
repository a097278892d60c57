"""Prices of model tokens: a versioned, auditable source for every cost coworker computes.

Two layers, the first that knows a model wins:

1. an **override file** of the project (``pricing.toml`` or ``.json``, see ``docs/usage.md``):
   per model (optionally per provider), per token kind, a currency and a ``valid_from`` date;
2. the maintained `genai-prices <https://pypi.org/project/genai-prices/>`_ library (extra
   ``coworker-otel[pricing]``), imported only when a price is first needed.

Every :class:`Cost` carries the pricing version it was computed with (``source``): the override
file's ``version`` (or the SHA-256 of its bytes) or ``genai-prices <version>``. A model neither
layer knows gives ``None`` (and one warning per model), never 0.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, getcontext
from typing import Any, Final, NamedTuple

from coworker.exceptions import ConfigError

__all__ = ["Cost", "Pricing", "TokenCounts", "UsageWarning", "default_pricing", "set_pricing"]

TOKEN_KINDS: Final = ("input", "output", "cache_read", "cache_creation", "reasoning")
"""Price keys of an override entry: ``<kind>_mtok`` is the price per million tokens."""

_MILLION: Final = Decimal(1_000_000)


class UsageWarning(UserWarning):
    """Usage that could not be priced or recorded as asked (the message says why)."""


class TokenCounts(NamedTuple):
    """Token counts of one model call (or a sum of them), in OTel semconv meaning.

    ``input`` includes ``cache_read`` and ``cache_creation``; ``output`` includes
    ``reasoning``. A named tuple, immutable: building one costs a tenth of what a frozen
    dataclass's ``__init__`` does (five ``object.__setattr__`` calls), once per model call.
    """

    input: int
    output: int
    cache_read: int = 0
    cache_creation: int = 0
    reasoning: int = 0


@dataclass(frozen=True, slots=True)
class Cost:
    """A computed cost.

    Attributes:
        amount: the amount as a Decimal (never a binary float inside coworker).
        currency: ISO 4217 code (``USD``).
        source: the pricing version used (``genai-prices 0.2.3``, ``pricing.toml acme-2026``).
    """

    amount: Decimal
    currency: str
    source: str


@dataclass(frozen=True, slots=True)
class _Entry:
    model: str
    provider: str | None
    currency: str
    valid_from: _dt.datetime
    prices: Mapping[str, Decimal]
    rates: _Rates


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        out = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not out.is_finite() or out < 0:
        raise ConfigError(f"{where}: a price must be a finite number >= 0, got {value!r}")
    return out


def _when(value: Any, where: str) -> _dt.datetime:
    if isinstance(value, _dt.datetime):
        out = value
    elif isinstance(value, _dt.date):
        out = _dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            out = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an ISO date, got {value!r}") from None
    else:
        raise ConfigError(f"{where}: expected a date, got {value!r}")
    return out if out.tzinfo is not None else out.replace(tzinfo=_dt.UTC)


class Pricing:
    """Prices from an override table, falling back to ``genai-prices``.

    Args:
        overrides: the parsed override document (``{"version": ..., "models": [...]}``).
        source: a name for messages and the default version (a file name).
        fallback: use ``genai-prices`` for models the overrides do not know.

    Raises:
        ConfigError: an invalid entry; the message names it.
    """

    def __init__(
        self,
        overrides: Mapping[str, Any] | None = None,
        *,
        source: str = "pricing",
        fallback: bool = True,
        digest: str | None = None,
    ) -> None:
        data = dict(overrides or {})
        unknown = sorted(set(data) - {"version", "models"})
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown} (expected version, models)")
        models = data.get("models", [])
        if not isinstance(models, list):
            raise ConfigError(f"{source}.models: expected a list of tables")
        entries: list[_Entry] = []
        for i, spec in enumerate(models):
            where = f"{source}.models[{i}]"
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{where}: expected a table")
            allowed = {"model", "provider", "currency", "valid_from"} | {
                f"{k}_mtok" for k in TOKEN_KINDS
            }
            extra = sorted(set(spec) - allowed)
            if extra:
                raise ConfigError(f"{where}: unknown key(s) {extra}")
            model = spec.get("model")
            if not isinstance(model, str) or not model:
                raise ConfigError(f"{where}.model: expected a model name")
            provider = spec.get("provider")
            if provider is not None and (not isinstance(provider, str) or not provider):
                raise ConfigError(f"{where}.provider: expected a provider name")
            currency = spec.get("currency", "USD")
            if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
                raise ConfigError(f"{where}.currency: expected an ISO 4217 code like 'USD'")
            prices = {
                k: _decimal(spec[f"{k}_mtok"], f"{where}.{k}_mtok")
                for k in TOKEN_KINDS
                if f"{k}_mtok" in spec
            }
            if "input" not in prices or "output" not in prices:
                raise ConfigError(f"{where}: input_mtok and output_mtok are required")
            valid_from = _when(spec.get("valid_from", "1970-01-01"), f"{where}.valid_from")
            entries.append(
                _Entry(model, provider, currency.upper(), valid_from, prices, _rates(prices))
            )
        version = data.get("version")
        if version is not None and (not isinstance(version, str) or not version):
            raise ConfigError(f"{source}.version: expected a non-empty string")
        if version is None and entries:
            version = f"sha256:{digest or _digest(data)}"
        # Latest valid_from first: the first entry valid at a time is the one in force.
        self._entries = sorted(entries, key=lambda e: e.valid_from, reverse=True)
        self._override_version = f"{source} {version}" if entries else None
        self._fallback = fallback
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str | None, int], Any] = {}
        self._costs: dict[tuple[Any, ...], Cost] = {}
        self._warned: set[tuple[str, str | None]] = set()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, fallback: bool = True) -> Pricing:
        """Load an override file (``.toml`` or ``.json``).

        Raises:
            ConfigError: missing, unreadable or invalid file.
        """
        name = os.fspath(path)
        try:
            with open(name, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise ConfigError(f"pricing file {name!r}: {exc.strerror or exc}") from exc
        try:
            if name.lower().endswith(".json"):
                data = json.loads(raw)
            else:
                import tomllib

                data = tomllib.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"pricing file {name!r}: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"pricing file {name!r}: expected a table at the top level")
        return cls(
            data,
            source=os.path.basename(name),
            fallback=fallback,
            digest=hashlib.sha256(raw).hexdigest()[:16],
        )

    @property
    def version(self) -> str:
        """The version string of this pricing (overrides + the library's version)."""
        parts = []
        if self._override_version is not None:
            parts.append(self._override_version)
        if self._fallback:
            parts.append(f"genai-prices {_library_version() or 'absent'}")
        return " + ".join(parts) or "none"

    def cost(
        self,
        model: str,
        tokens: TokenCounts,
        *,
        provider: str | None = None,
        at: _dt.datetime | None = None,
    ) -> Cost | None:
        """The cost of ``tokens`` of ``model`` at time ``at`` (default: now), or ``None`` with
        a :class:`UsageWarning` (once per model) when no layer knows the model."""
        entry = None
        if self._entries:
            when = at or _dt.datetime.now(_dt.UTC)
            entry = self._entry(model, provider, when)
        if entry is not None:
            assert self._override_version is not None
            return Cost(_apply(entry.rates, tokens), entry.currency, self._override_version)
        if self._fallback:
            cost = self._library_cost(model, provider, tokens, at)
            if cost is not None:
                return cost
        key = (model, provider)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"no price for model {model!r}"
                + (f" of provider {provider!r}" if provider else "")
                + f" in pricing {self.version!r}: its cost is recorded as null, not 0",
                UsageWarning,
                stacklevel=3,
            )
        return None

    def _entry(self, model: str, provider: str | None, when: _dt.datetime) -> _Entry | None:
        for e in self._entries:
            if (
                e.model == model
                and e.valid_from <= when
                and (e.provider is None or provider is None or e.provider == provider)
            ):
                return e
        return None

    def _library_cost(
        self, model: str, provider: str | None, tokens: TokenCounts, at: _dt.datetime | None
    ) -> Cost | None:
        # genai-prices costs ~0.3 ms a call; its prices change by date, not per call. The
        # per-token rates of a model are cached per UTC day, and a call's cost is their linear
        # combination (tiered prices are not linear: those calls are priced fully).
        day = int((at.timestamp() if at is not None else time.time()) // 86400)
        # The Cost of the same counts of the same model on the same day is the same frozen
        # object: one dict read instead of the Decimal arithmetic (an agent loop repeats its
        # prompt sizes; the key holds every input of the result, so the value is exact).
        ckey = (model, provider, day, tokens)  # the counts are a tuple: no copy of them
        done = self._costs.get(ckey)
        if done is not None:
            return done
        key = (model, provider, day)
        hit = self._cache.get(key, _MISS)  # a dict read is atomic; writes take the lock
        when = at
        if hit is _MISS or isinstance(hit, _Tiered):
            when = at or _dt.datetime.now(_dt.UTC)
        if hit is _MISS:
            assert when is not None
            hit = self._library_rates(model, provider, when)
            with self._lock:
                if len(self._cache) > 4096:
                    self._cache.clear()
                self._cache[key] = hit
        if hit is None:
            return None
        if isinstance(hit, _Tiered):
            assert when is not None
            return _library_full(model, provider, tokens, when)
        rates, currency, source = hit
        cost = Cost(_apply(rates, tokens), currency, source)
        with self._lock:
            if len(self._costs) > 4096:
                self._costs.clear()
            self._costs[ckey] = cost
        return cost

    def _library_rates(self, model: str, provider: str | None, when: _dt.datetime) -> Any:
        try:
            import genai_prices
            from genai_prices import types as gp_types
        except ImportError:
            return None
        try:
            calc = genai_prices.calc_price(
                genai_prices.Usage(input_tokens=0, output_tokens=0),
                model,
                provider_id=provider,
                genai_request_timestamp=when,
            )
        except (LookupError, ValueError):
            return None
        mp = calc.model_price
        rates: dict[str, Decimal] = {}
        for kind, field in (
            ("input", "input_mtok"),
            ("output", "output_mtok"),
            ("cache_read", "cache_read_mtok"),
            ("cache_creation", "cache_write_mtok"),
        ):
            value = getattr(mp, field, None)
            if value is None:
                continue
            if isinstance(value, gp_types.TieredPrices):
                return _Tiered()
            rates[kind] = Decimal(value)
        rates.setdefault("input", Decimal(0))
        rates.setdefault("output", Decimal(0))
        return _rates(rates), "USD", f"genai-prices {_library_version()}"


class _Tiered:
    """Marker: the model's library price is tiered, so each call is priced fully."""


_MISS: Final = object()


def _library_full(
    model: str, provider: str | None, tokens: TokenCounts, when: _dt.datetime
) -> Cost | None:
    import genai_prices

    calc = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=tokens.input,
            output_tokens=tokens.output,
            cache_read_tokens=tokens.cache_read,
            cache_write_tokens=tokens.cache_creation,
        ),
        model,
        provider_id=provider,
        genai_request_timestamp=when,
    )
    return Cost(Decimal(calc.total_price), "USD", f"genai-prices {_library_version()}")


class _Rates:
    """Per-token-kind prices per million, resolved once per price entry: input, cache read,
    cache creation, output, reasoning (a missing cache / reasoning price falls back to input /
    output); and the same as integers at one common exponent (``rate_k = mults[k] x 10**exp``).

    Kept with the entry, never looked up by value: ``Decimal("2.5") == Decimal("2.50")``, but
    their exponents, and so the cost's text, differ.
    """

    __slots__ = ("decimals", "exp", "mults")

    def __init__(self, prices: Mapping[str, Decimal]) -> None:
        self.decimals = (
            prices["input"],
            prices.get("cache_read", prices["input"]),
            prices.get("cache_creation", prices["input"]),
            prices["output"],
            prices.get("reasoning", prices["output"]),
        )
        parts = [r.as_tuple() for r in self.decimals]  # finite, >= 0 (checked on loading)
        self.exp = min(int(p.exponent) for p in parts)
        # Integer arithmetic, exact whatever the digits (every exponent is >= self.exp).
        self.mults = tuple(
            int("".join(map(str, p.digits))) * 10 ** (int(p.exponent) - self.exp) for p in parts
        )


_rates = _Rates
_EXACT_LIMIT: Final = 10**28  # the default context's precision: below it Decimal is exact


def _apply(rates: _Rates, t: TokenCounts) -> Decimal:
    """:func:`_apply_decimal`'s exact result, computed on integers when it is exact.

    Below the context precision every product and sum of :func:`_apply_decimal` is exact, so
    its result is the integer sum of tokens x scaled rates at the smallest rate exponent,
    divided by a million: Decimal keeps that quotient at the ideal exponent (the dividend's)
    where it is exact, otherwise at the fewest extra digits. The same coefficient and exponent,
    so the same text; anything beyond the precision takes the Decimal path.
    """
    m_in, m_read, m_creation, m_out, m_reasoning = rates.mults
    total = (
        (t.input - t.cache_read - t.cache_creation) * m_in
        + t.cache_read * m_read
        + t.cache_creation * m_creation
        + (t.output - t.reasoning) * m_out
        + t.reasoning * m_reasoning
    )
    if total >= _EXACT_LIMIT or getcontext().prec < 28:
        return _apply_decimal(rates, t)
    if not total:
        return Decimal((0, (0,), rates.exp))  # 0 / 1e6 keeps the dividend's exponent
    shift = 6  # divide by 10**6: strip up to 6 trailing zeros back toward the ideal exponent
    while shift and total % 10 == 0:
        total //= 10
        shift -= 1
    return Decimal(f"{total}E{rates.exp - shift}")


def _apply_decimal(rates: _Rates, t: TokenCounts) -> Decimal:
    """Sum of tokens x price per kind; cached input tokens are billed at their own rate and
    not again as input (semconv ``input_tokens`` includes them), reasoning likewise."""
    # The same products, sums and order as ever: the Decimal result (and so its text in the
    # ledger) must not change with the code.
    inp, cache_read, cache_creation, out, reasoning = rates.decimals
    total = (
        (t.input - t.cache_read - t.cache_creation) * inp
        + t.cache_read * cache_read
        + t.cache_creation * cache_creation
        + (t.output - t.reasoning) * out
        + t.reasoning * reasoning
    )
    return total / _MILLION


def _digest(data: Mapping[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(text).hexdigest()[:16]


def _library_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("genai-prices")
    except PackageNotFoundError:
        return None


_default: Pricing | None = None
_default_lock = threading.Lock()


def default_pricing() -> Pricing:
    """The process's pricing: :func:`set_pricing`'s, else ``COWORKER_PRICING`` (a file), else
    ``genai-prices`` alone."""
    global _default
    p = _default
    if p is None:
        with _default_lock:
            if _default is None:
                path = os.environ.get("COWORKER_PRICING")
                _default = Pricing.from_file(path) if path else Pricing()
            p = _default
    return p


def set_pricing(pricing: Pricing | str | os.PathLike[str] | None) -> Pricing | None:
    """Set the process's pricing (a :class:`Pricing` or an override file); ``None`` resets it
    to the default. Returns the previous one."""
    global _default
    if pricing is not None and not isinstance(pricing, Pricing):
        pricing = Pricing.from_file(pricing)
    with _default_lock:
        old, _default = _default, pricing
    return old
