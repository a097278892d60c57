"""Token usage and cost of model calls: :func:`record_usage` and ``@coworker.run(usage=...)``.

Tokens are the source of truth; cost is derived from a versioned pricing
(:mod:`coworker.pricing`). Each call of :func:`record_usage` inside a run

* adds the OTel GenAI ``gen_ai.usage.*`` totals (and the cost, in the shape of the open OTel
  cost proposal) to the run's span;
* while an audit pipeline is configured, keeps the call's counts beside the live span (a
  buffer, not span events: the SDK keeps at most 128 events per span and drops the
  rest, which would lose ledger records of a long agent loop); the usage ledger
  (:mod:`coworker.audit.usage`) turns each into one audit record of category ``usage`` when
  the span ends;
* records ``gen_ai.client.token.usage`` and ``coworker.usage.cost`` metrics and counts the
  tokens and cost against the policy's budgets.

Outside a run (or when no SDK is configured, so runs have no span) there is no span and no
ledger record: :func:`record_usage` then still validates, prices, counts budgets and metrics,
and warns with :class:`~coworker.pricing.UsageWarning`. That is a documented no-op for the
trail, never an exception in the application's hot path.

The extractors read SDK response objects by their documented field names (duck-typed: neither
the OpenAI nor the Anthropic SDK is a dependency) and also accept plain dicts.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

from coworker import _flow_spans
from coworker import attributes as attr
from coworker._run import otelctx
from coworker._run.lifecycle import USAGE_CLOSED, Run, attribute_dict
from coworker._scope import SCOPE
from coworker._state import SETTINGS
from coworker.identity import MAX_ID_CHARS, text
from coworker.pricing import Cost, TokenCounts, UsageWarning, default_pricing

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, MeterProvider

    from coworker.identity import Identity

__all__ = [
    "Usage",
    "UsageWarning",
    "anthropic_usage",
    "auto_usage",
    "openai_usage",
    "record_usage",
]

_log = logging.getLogger(__name__)
_F = TypeVar("_F", bound=Callable[..., Any])
_lock = threading.Lock()  # read-modify-write of a run's totals from several threads
# (trace id, span id) of a live span -> the usage calls recorded on it, until the ledger
# processor takes them when the span ends. Keyed by ids, not by the span object: the SDK hands
# processors a ReadableSpan copy. Filled only while an audit pipeline (and so the ledger
# processor, which empties it at every span end) is configured.
_PENDING: dict[tuple[int, int], list[dict[str, Any]]] = {}


def _key(span: Any) -> tuple[int, int]:
    ctx = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return ctx.trace_id, ctx.span_id


def take_pending(span: Any) -> list[dict[str, Any]] | None:
    """Remove and return the usage calls recorded on ``span`` (for the usage ledger)."""
    if not _PENDING:
        return None
    key = _key(span)
    with _lock:
        return _PENDING.pop(key, None)


_TOTALS: Final = (
    (attr.GEN_AI_USAGE_INPUT_TOKENS, "input"),
    (attr.GEN_AI_USAGE_OUTPUT_TOKENS, "output"),
    (attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, "cache_read"),
    (attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, "cache_creation"),
    (attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, "reasoning"),
)
_new_tuple: Final = tuple.__new__
_MAX_TOKENS: Final = 2**53 - 1  # beyond this no audit record (JCS number) holds it exactly
_AT: Final = "usage_at"  # key of the call's time (ns) in a pending usage entry


class Usage(NamedTuple):
    """What an extractor returns: the arguments of :func:`record_usage`."""

    model: str
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    reasoning_tokens: int | None = None
    provider: str | None = None


def _count(value: Any, name: str) -> int:
    # bool is an int in Python, and True tokens is a bug; so are NaN and 1.5.
    if type(value) is int and 0 <= value <= _MAX_TOKENS:
        return value
    if type(value) is not int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"record_usage {name}= must be an int >= 0, got {value!r}")
    if value < 0 or value > _MAX_TOKENS:
        raise ValueError(f"record_usage {name}= must be an int in [0, 2**53), got {value!r}")
    return int(value)


def _text(value: Any, what: str) -> str:
    if type(value) is str and value and value.isascii() and len(value) <= MAX_ID_CHARS:
        return value  # what identity.text accepts as it is, checked inline
    return text(value, what)


def _validate(
    model: Any,
    input_tokens: Any,
    output_tokens: Any,
    cache_creation_input_tokens: Any,
    cache_read_input_tokens: Any,
    reasoning_tokens: Any,
    provider: Any,
) -> tuple[str, str | None, TokenCounts]:
    if not (type(model) is str and model and model.isascii() and len(model) <= MAX_ID_CHARS):
        model = text(model, "record_usage model=")  # what _text checks, inline: the hot path
    if provider is not None:
        provider = _text(provider, "record_usage provider=")
    # The common case inline (plain ints in range): one function call per count costs more
    # than the check; anything else goes through _count, which converts or raises.
    if not (type(input_tokens) is int and 0 <= input_tokens <= _MAX_TOKENS):
        input_tokens = _count(input_tokens, "input_tokens")
    if not (type(output_tokens) is int and 0 <= output_tokens <= _MAX_TOKENS):
        output_tokens = _count(output_tokens, "output_tokens")
    # Optional counts: None (0) or the same inline check, else _count.
    read = cache_read_input_tokens
    if read is None:
        read = 0
    elif not (type(read) is int and 0 <= read <= _MAX_TOKENS):
        read = _count(read, "cache_read_input_tokens")
    creation = cache_creation_input_tokens
    if creation is None:
        creation = 0
    elif not (type(creation) is int and 0 <= creation <= _MAX_TOKENS):
        creation = _count(creation, "cache_creation_input_tokens")
    reasoning = reasoning_tokens
    if reasoning is None:
        reasoning = 0
    elif not (type(reasoning) is int and 0 <= reasoning <= _MAX_TOKENS):
        reasoning = _count(reasoning, "reasoning_tokens")
    # tuple.__new__ directly: the named tuple's own __new__ is a Python-level call.
    tokens: TokenCounts = _new_tuple(
        TokenCounts, (input_tokens, output_tokens, read, creation, reasoning)
    )
    if tokens.cache_read + tokens.cache_creation > tokens.input:
        raise ValueError(
            "record_usage: cache_read_input_tokens + cache_creation_input_tokens "
            f"({tokens.cache_read} + {tokens.cache_creation}) exceed input_tokens "
            f"({tokens.input}); per the OTel GenAI conventions input_tokens includes cached "
            "tokens (Anthropic reports them apart: use coworker.usage.anthropic_usage)"
        )
    if tokens.reasoning > tokens.output:
        raise ValueError(
            f"record_usage: reasoning_tokens ({tokens.reasoning}) exceed output_tokens "
            f"({tokens.output}); output_tokens includes reasoning tokens"
        )
    return model, provider, tokens


def record_usage(
    *,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_creation_input_tokens: int | None = None,
    cache_read_input_tokens: int | None = None,
    reasoning_tokens: int | None = None,
    provider: str | None = None,
) -> Cost | None:
    """Record the token usage of one model call in the current run.

    Args:
        model: the model name as requested (``gen_ai.request.model``).
        input_tokens: prompt tokens, *including* cache read and cache creation tokens.
        output_tokens: completion tokens, including reasoning tokens.
        cache_creation_input_tokens: input tokens written to the provider's cache.
        cache_read_input_tokens: input tokens served from the provider's cache.
        reasoning_tokens: output tokens spent on reasoning.
        provider: ``gen_ai.provider.name`` (``openai``, ``anthropic``, ...).

    Returns:
        The cost under the current pricing, or ``None`` when no price is known for the model
        (a :class:`UsageWarning` says so; the cost is null, never 0).

    Raises:
        ValueError: a count that is not an int >= 0 (bools, NaN, negative numbers, floats with
            a fraction), inconsistent counts, or an empty / non-string model.
    """
    # Eager: bad input raises here (nothing recorded), and the cost is the return value.
    model, provider, tokens = _validate(
        model,
        input_tokens,
        output_tokens,
        cache_creation_input_tokens,
        cache_read_input_tokens,
        reasoning_tokens,
        provider,
    )
    cost = default_pricing().cost(model, tokens, provider=provider)
    scope = SCOPE.get()
    r = scope.run
    center: Any = _UNSET
    enforcer = SETTINGS.policy
    if enforcer is not None:
        rules = getattr(getattr(enforcer, "policy", None), "usage", None)
        if rules is not None and rules.budgets:
            # Budgets count at the call, not at the run's end: the next run's check (a nested
            # run, another thread's) must see this call already.
            center = rules.cost_center(scope.identity, r.doctype if type(r) is Run else None)
            rules.account(
                scope.identity,
                center,
                tokens.input + tokens.output,
                cost.amount if cost is not None else None,
                cost.currency if cost is not None else None,
            )
    if type(r) is Run:
        # Everything else waits for the run's end (finish): one append here.
        call = (
            model,
            provider,
            tokens,
            cost,
            scope.identity,
            center,
            time.time_ns() if SETTINGS.audit_records else 0,  # usage_at: for the ledger
            # The flow/step/turn segment the call is under (otelctx: one ContextVar read).
            otelctx.get_current().get(_SEGMENT) if SETTINGS.flow_spans else None,
        )
        calls = r.usage
        if calls is not USAGE_CLOSED and r.span.is_recording():
            calls.append(call)  # atomic; no lock
            if r.usage is not USAGE_CLOSED:
                return cost
            # The run ended in another thread meanwhile: finish() drained the list by pops
            # (atomic, like this remove); whichever took the call handles it.
            try:
                calls.remove(call)
            except ValueError:
                return cost
    _unrecorded(model, provider, tokens, cost, scope.identity, center, r)
    return cost


_UNSET: Final = object()  # a call's cost center, before finish() works it out
_SEGMENT: Final = _flow_spans.KEY


def _unrecorded(
    model: str,
    provider: str | None,
    tokens: TokenCounts,
    cost: Cost | None,
    identity: Identity | None,
    center: Any,
    r: Any,
) -> None:
    """A call outside a recorded run: metrics (budgets counted already) and a warning."""
    run = r if type(r) is Run else None
    if center is _UNSET:
        center = _center(identity, run.doctype if run is not None else None)
    flow = run.flow if run is not None else None
    _metrics(model, provider, tokens, cost, identity, center, flow.type if flow else None)
    warnings.warn(
        "coworker.record_usage outside a recorded coworker run (no run, no configured SDK, "
        "or the run already ended): the usage counts for budgets and metrics but is on no "
        "span and in no usage ledger record",
        UsageWarning,
        stacklevel=3,
    )


def _center(identity: Identity | None, doctype: str | None) -> str | None:
    enforcer = SETTINGS.policy
    rules = getattr(getattr(enforcer, "policy", None), "usage", None)
    if rules is not None:
        center: str | None = rules.cost_center(identity, doctype)
        return center
    return _user_center(identity)


def finish(r: Run, calls: list[Any]) -> None:
    """The run ``r`` ends: put the usage calls recorded in it on its span (totals, and the
    per-model split when it used several models), into the usage ledger's pending records,
    the metrics and the flow roll-ups. Called by the run lifecycle before the span ends,
    after it set ``r.usage`` to :data:`USAGE_CLOSED`."""
    # Drain by pops: a thread appending while the run ends either sees its call popped here
    # or takes it back itself (record_usage's remove); never both, never neither.
    taken: list[Any] = []
    pop = calls.pop
    try:
        while calls:
            taken.append(pop())
    except IndexError:  # a racing thread's remove emptied it between the test and the pop
        pass
    if not taken:
        return
    taken.reverse()
    flow = r.flow
    flow_type = flow.type if flow is not None else None
    doctype = r.doctype
    ledger = SETTINGS.audit_records
    events: list[dict[str, Any]] = []
    n_in = n_out = n_read = n_creation = n_reasoning = 0
    amount = 0.0
    currency: str | None = None
    source: str | None = None
    mixed: str | None = None
    first_center: str | None = None
    for model, provider, tokens, cost, identity, center, at, seg in taken:
        if center is _UNSET:
            center = _center(identity, doctype)
        if first_center is None:
            first_center = center
        n_in += tokens.input
        n_out += tokens.output
        n_read += tokens.cache_read
        n_creation += tokens.cache_creation
        n_reasoning += tokens.reasoning
        price = 0.0
        if cost is not None:
            price = float(cost.amount)
            if currency is None or currency == cost.currency:
                currency = cost.currency
                amount += price
                source = cost.source
            else:
                mixed = cost.currency
        _metrics(model, provider, tokens, cost, identity, center, flow_type, None, price)
        if seg is not None:
            _flow_spans.add_usage(tokens, cost, seg)  # roll-ups on flow/step/turn spans
        if ledger:
            events.append(_ledger_event(model, provider, tokens, cost, center, at))
    span: Any = r.span
    current = attribute_dict(span)
    get = current.get
    totals: dict[str, Any] = {}
    # A count that is 0 and not on the span yet stays off it; one already there (set by the
    # body or another instrumentation) is added to.
    # Unrolled: no tuple of pairs built per run.
    before = get(_IN)
    if n_in or before is not None:
        totals[_IN] = (before if type(before) is int else 0) + n_in
    before = get(_OUT)
    if n_out or before is not None:
        totals[_OUT] = (before if type(before) is int else 0) + n_out
    before = get(_CACHE_READ)
    if n_read or before is not None:
        totals[_CACHE_READ] = (before if type(before) is int else 0) + n_read
    before = get(_CACHE_CREATION)
    if n_creation or before is not None:
        totals[_CACHE_CREATION] = (before if type(before) is int else 0) + n_creation
    before = get(_REASONING)
    if n_reasoning or before is not None:
        totals[_REASONING] = (before if type(before) is int else 0) + n_reasoning
    first = taken[0]
    if _MODEL not in current:
        totals[_MODEL] = first[0]  # the first model; each call's: the ledger, the split
        if first[1] is not None:
            totals[attr.GEN_AI_PROVIDER_NAME] = first[1]
    if first_center is not None and attr.COST_CENTER not in current:
        totals[attr.COST_CENTER] = first_center
    if currency is not None:
        have = get(_CURRENCY)
        if have is None or have == currency:
            # A float on the span (OTel has no decimal type); the ledger keeps each call's
            # exact decimal.
            totals[_AMOUNT] = float(get(_AMOUNT, 0.0)) + amount
            if have is None:
                totals[_CURRENCY] = currency
            if get(_SOURCE) != source:
                totals[_SOURCE] = source
        else:
            mixed = currency
    if mixed is not None:
        _log.warning(
            "coworker: run %s mixes cost currencies (%s, %s); the span keeps %s, the usage "
            "ledger has each call",
            r.id,
            get(_CURRENCY) or currency,
            mixed,
            get(_CURRENCY) or currency,
        )
    if len(taken) > 1:
        _split(taken, totals)
    _put_attributes(span, totals)
    if events:
        with _lock:
            _PENDING.setdefault(_key(span), []).extend(events)


def _split(calls: list[Any], out: dict[str, Any]) -> None:
    """The per-model split (:data:`coworker.attributes.USAGE_BY_MODEL_MODEL` and the arrays
    next to it) of calls that used more than one (model, provider)."""
    groups: dict[tuple[str, str | None], list[int]] = {}
    for call in calls:
        have = groups.get((call[0], call[1]))
        if have is None:
            groups[call[0], call[1]] = list(call[2])
        else:
            for i, n in enumerate(call[2]):
                have[i] += n
    if len(groups) < 2:
        return
    keys = list(groups)
    out[attr.USAGE_BY_MODEL_MODEL] = tuple(m for m, _ in keys)
    out[attr.USAGE_BY_MODEL_PROVIDER] = tuple(p or "" for _, p in keys)
    for i, name in enumerate(attr.USAGE_BY_MODEL_COUNTS):
        out[name] = tuple(groups[k][i] for k in keys)


_IN: Final = attr.GEN_AI_USAGE_INPUT_TOKENS
_OUT: Final = attr.GEN_AI_USAGE_OUTPUT_TOKENS
_CACHE_READ: Final = attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS
_CACHE_CREATION: Final = attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS
_REASONING: Final = attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS
_MODEL: Final = attr.GEN_AI_REQUEST_MODEL
_AMOUNT: Final = attr.GEN_AI_USAGE_COST_AMOUNT
_CURRENCY: Final = attr.GEN_AI_USAGE_COST_CURRENCY
_SOURCE: Final = attr.GEN_AI_USAGE_COST_SOURCE


def _ledger_event(
    model: str,
    provider: str | None,
    tokens: TokenCounts,
    cost: Cost | None,
    center: str | None,
    at: int,
) -> dict[str, Any]:
    """One call's entry for the usage ledger (built only while an audit pipeline is on)."""
    # Zero counts are left out (the ledger reads a missing count as 0).
    event: dict[str, Any] = {_MODEL: model, _IN: tokens.input, _OUT: tokens.output}
    if tokens.cache_read:
        event[_CACHE_READ] = tokens.cache_read
    if tokens.cache_creation:
        event[_CACHE_CREATION] = tokens.cache_creation
    if tokens.reasoning:
        event[_REASONING] = tokens.reasoning
    if provider is not None:
        event[attr.GEN_AI_PROVIDER_NAME] = provider
    if center is not None:
        event[attr.COST_CENTER] = center
    if cost is not None:
        # Exact decimal text in the event (the ledger's source); a float only on the span.
        event[_AMOUNT] = str(cost.amount)
        event[_CURRENCY] = cost.currency
        event[_SOURCE] = cost.source
    event[_AT] = at  # the call's time, not the run's end
    return event


def _user_center(identity: Identity | None) -> str | None:
    from coworker.usage_policy import cost_center_of_user

    global _user_center
    _user_center = cost_center_of_user  # imported once, then called directly
    return cost_center_of_user(identity)


def _put_attributes(span: Any, values: Mapping[str, Any]) -> None:
    """Set ``values`` (ints, floats and strings coworker built: already clean) on the live SDK
    span, without the SDK's per-value cleaning, which costs more than all the rest of
    :func:`record_usage`. Same rules otherwise (the span's lock, the attribute count limit,
    nothing on an ended span); any other span, or a value length limit, takes the public
    ``set_attributes``."""
    attrs: Any = getattr(span, "_attributes", None)
    lock = getattr(span, "_lock", None)
    # One type check instead of probing each internal: the SDK's own BoundedAttributes
    # (whose _setitem_locked, _dict, maxlen and _lock this relies on), mutable, no value limit.
    if (
        type(attrs) is not _bounded_type()
        or lock is None
        or attrs.max_value_len is not None
        or attrs._immutable
    ):
        span.set_attributes(values)
        return
    setitem = attrs._setitem_locked
    # The span's lock only: every SDK writer (set_attribute(s), end) takes it first, so it
    # excludes them all; the attributes' own lock guards only their iteration, whose copy
    # (list of the dict) is, like this update (str keys), one C call under the GIL. A lock's
    # with-block costs ~2,000 instructions (argument parsing in acquire).
    with lock:
        if getattr(span, "_end_time", 0) is not None:
            span_ended = True
        else:
            span_ended = False
            inner = attrs._dict
            maxlen = attrs.maxlen
            if type(inner) is dict and (maxlen is None or len(inner) + len(values) <= maxlen):
                inner.update(values)  # room for all: nothing to drop
            else:
                with attrs._lock:
                    for key, value in values.items():
                        setitem(key, value)
    if span_ended:
        span.set_attributes(values)  # the SDK's own warning for an ended span


_BOUNDED: Any = None  # opentelemetry.attributes.BoundedAttributes, once imported


def _bounded_type() -> Any:
    global _BOUNDED
    if _BOUNDED is None:
        from opentelemetry.attributes import BoundedAttributes

        _BOUNDED = BoundedAttributes
    return _BOUNDED


# -- metrics ---------------------------------------------------------------------------------

_TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
# The semconv advisory boundaries of gen_ai.client.token.usage.


class _Instruments:
    __slots__ = ("cost", "tokens")

    def __init__(self, meter_provider: MeterProvider | None) -> None:
        from coworker.metrics import _meter

        meter = _meter(meter_provider)
        self.tokens: Histogram = meter.create_histogram(
            attr.METRIC_GEN_AI_TOKEN_USAGE,
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.cost: Counter = meter.create_counter(
            attr.METRIC_USAGE_COST,
            unit="{currency_unit}",
            description="Cost of model calls, in the currency of gen_ai.usage.cost.currency.",
        )


_instruments: dict[int, _Instruments] = {}


def _metrics(
    model: str,
    provider: str | None,
    tokens: TokenCounts,
    cost: Cost | None,
    identity: Identity | None,
    center: str | None,
    flow_type: str | None,
    meter_provider: MeterProvider | None = None,
    amount: float | None = None,
) -> None:
    key = id(meter_provider)
    inst = _instruments.get(key)
    if inst is None:
        inst = _instruments[key] = _Instruments(meter_provider)
    user = identity.user.id if identity is not None and identity.user is not None else None
    agent = identity.agent.id if identity is not None and identity.agent is not None else None
    currency = cost.currency if cost is not None else None
    label_key = (model, provider, flow_type, user, agent, center, currency)
    sets = _LABELS.get(label_key)
    if sets is None:
        sets = _labels(model, provider, tokens, cost, identity, center, flow_type)
        if len(_LABELS) > 4096:
            _LABELS.clear()
        _LABELS[label_key] = sets
    inst.tokens.record(tokens.input, sets[0])
    inst.tokens.record(tokens.output, sets[1])
    if cost is not None:
        inst.cost.add(float(cost.amount) if amount is None else amount, sets[2])


_LABELS: dict[tuple[Any, ...], tuple[dict[str, str], dict[str, str], dict[str, str]]] = {}
"""The metric attribute sets per (model, provider, flow type, user, agent, cost center,
currency): built once, not per call (the SDK copies what it keeps)."""


def _labels(
    model: str,
    provider: str | None,
    tokens: TokenCounts,
    cost: Cost | None,
    identity: Identity | None,
    center: str | None,
    flow_type: str | None,
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    labels: dict[str, str] = {attr.GEN_AI_REQUEST_MODEL: model}
    if provider is not None:
        labels[attr.GEN_AI_PROVIDER_NAME] = provider
    if flow_type is not None:
        labels[attr.FLOW_TYPE] = flow_type
    if identity is not None:
        if identity.user is not None:
            labels[attr.USER_ID] = identity.user.id
        if identity.agent is not None:
            labels[attr.AGENT_ID] = identity.agent.id
    if center is not None:
        labels[attr.COST_CENTER] = center
    currency = {attr.GEN_AI_USAGE_COST_CURRENCY: cost.currency} if cost is not None else {}
    return (
        {**labels, attr.GEN_AI_TOKEN_TYPE: "input"},
        {**labels, attr.GEN_AI_TOKEN_TYPE: "output"},
        {**labels, **currency},
    )


# -- extractors ------------------------------------------------------------------------------


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def openai_usage(response: Any) -> Usage | None:
    """Usage of an OpenAI response: Chat Completions (``usage.prompt_tokens``,
    ``completion_tokens``, ``prompt_tokens_details.cached_tokens``,
    ``completion_tokens_details.reasoning_tokens``) or the Responses API (``usage.input_tokens``,
    ``output_tokens``, ``input_tokens_details.cached_tokens``,
    ``output_tokens_details.reasoning_tokens``); ``cache_write_tokens`` in the input details,
    where the SDK has it, is the cache creation count. ``None`` when there is no usage."""
    usage = _get(response, "usage")
    model = _get(response, "model")
    if usage is None or not model:
        return None
    if _get(usage, "prompt_tokens") is not None:
        inp, out = _get(usage, "prompt_tokens"), _get(usage, "completion_tokens")
        in_details = _get(usage, "prompt_tokens_details")
        out_details = _get(usage, "completion_tokens_details")
    else:
        inp, out = _get(usage, "input_tokens"), _get(usage, "output_tokens")
        in_details = _get(usage, "input_tokens_details")
        out_details = _get(usage, "output_tokens_details")
    if inp is None or out is None:
        return None
    return Usage(
        model=model,
        input_tokens=inp,
        output_tokens=out,
        cache_creation_input_tokens=_get(in_details, "cache_write_tokens"),
        cache_read_input_tokens=_get(in_details, "cached_tokens"),
        reasoning_tokens=_get(out_details, "reasoning_tokens"),
        provider="openai",
    )


def anthropic_usage(response: Any) -> Usage | None:
    """Usage of an Anthropic Messages response (``usage.input_tokens``, ``output_tokens``,
    ``cache_creation_input_tokens``, ``cache_read_input_tokens``).

    Anthropic's ``input_tokens`` excludes the cached tokens; the OTel conventions include
    them, so the recorded ``input_tokens`` is the sum of the three."""
    usage = _get(response, "usage")
    model = _get(response, "model")
    if usage is None or not model:
        return None
    inp, out = _get(usage, "input_tokens"), _get(usage, "output_tokens")
    if inp is None or out is None:
        return None
    created = _get(usage, "cache_creation_input_tokens")
    read = _get(usage, "cache_read_input_tokens")
    total = inp
    for extra in (created, read):
        if extra is not None:
            total = _count(total, "input_tokens") + _count(extra, "cache tokens")
    return Usage(
        model=model,
        input_tokens=total,
        output_tokens=out,
        cache_creation_input_tokens=created,
        cache_read_input_tokens=read,
        provider="anthropic",
    )


def auto_usage(response: Any) -> Usage | None:
    """OpenAI or Anthropic, told apart by their field names (``prompt_tokens`` /
    ``input_tokens_details`` are OpenAI's, ``cache_read_input_tokens`` or a ``type ==
    "message"`` response Anthropic's)."""
    usage = _get(response, "usage")
    if usage is None:
        return None
    if _get(response, "type") == "message" or _get(usage, "cache_read_input_tokens") is not None:
        return anthropic_usage(response)
    return openai_usage(response)


def _apply_extractor(extractor: Callable[[Any], Any], result: Any) -> None:
    """Record what ``extractor`` finds in ``result``; a failure never fails the call (its
    body already ran: its side effects happened) but is logged and warned about loudly."""
    try:
        found = extractor(result)
        if found is None:
            return
        if isinstance(found, Usage):
            record_usage(**found._asdict())
        elif isinstance(found, Mapping):
            record_usage(**found)
        else:
            raise TypeError(
                f"a usage extractor must return coworker.usage.Usage, a dict or None, got "
                f"{type(found).__name__}"
            )
    except Exception as exc:
        _log.error("coworker: usage extractor %r failed: %s", extractor, exc)
        warnings.warn(
            f"usage not recorded: the extractor {getattr(extractor, '__name__', extractor)!r} "
            f"failed on a {type(result).__name__}: {exc}",
            UsageWarning,
            stacklevel=4,
        )


def with_usage(options: Any, extractor: Callable[[Any], Any]) -> Any:
    """What ``coworker.run(..., usage=extractor)`` returns: a decorator whose run records
    ``extractor(return value)`` inside the run, before its span ends."""
    if not callable(extractor):
        raise TypeError("coworker.run usage= must be a callable (e.g. coworker.usage.openai_usage)")
    return _UsageOptions(options, extractor)


class _UsageOptions:
    __slots__ = ("_extractor", "_options")

    def __init__(self, options: Any, extractor: Callable[[Any], Any]) -> None:
        self._options = options
        self._extractor = extractor

    def __call__(self, fn: _F) -> _F:
        wrapped: _F = self._options(_wrap(fn, self._extractor))
        return wrapped

    def __enter__(self) -> Any:
        raise TypeError(
            "coworker.run(usage=...) needs a decorated callable's return value; in a with "
            "block call coworker.record_usage(...) instead"
        )

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ always raises
        return None


def _wrap(fn: Any, extractor: Callable[[Any], Any]) -> Any:
    if isinstance(fn, classmethod | staticmethod):
        return type(fn)(_wrap(fn.__func__, extractor))
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            "coworker.run(usage=...) does not apply to generators (no single return value); "
            "call coworker.record_usage(...) in the body"
        )
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def arun(*args: Any, **kwargs: Any) -> Any:
            result = await fn(*args, **kwargs)
            _apply_extractor(extractor, result)
            return result

        return arun

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        _apply_extractor(extractor, result)
        return result

    return run
