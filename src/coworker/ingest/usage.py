"""Usage ledger records from ingested spans: the chargeback of services that only send OTLP.

A span that carries OTel GenAI token counts (``gen_ai.usage.input_tokens`` and the other names
of :data:`TOKEN_ATTRIBUTES`, what :func:`coworker.record_usage` sets on a run's span) becomes
one usage record (kind and category ``usage``), the same shape the in-process usage ledger
(:mod:`coworker.audit.usage`) writes, whether or not the span is audited. Flow, step and turn
spans (``coworker.span.type``) carry roll-up totals of the runs under them and are skipped:
counting them would count every token twice or more.

The cost is computed here, with the server's pricing (its version in ``cost_source``), not
taken from the span's ``gen_ai.usage.cost.*``: the sender's price claim is not evidence. The
dedup key of a usage record lives in its own space (:func:`usage_key`, 57 bytes): a resent span
is recorded once, and the usage record of a span is never taken for a second version of the
span's outcome record (no ``ingest-conflict``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Final

from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from coworker import attributes as attr
from coworker.audit.record import canonical

__all__ = [
    "KIND_USAGE",
    "ROLLUP_SPAN_TYPES",
    "TOKEN_ATTRIBUTES",
    "TOKEN_KEYS",
    "UsageRefused",
    "is_usage_key",
    "usage_entries_of",
    "usage_key",
    "wants_usage",
]

TOKEN_ATTRIBUTES: Final = (
    attr.GEN_AI_USAGE_INPUT_TOKENS,
    attr.GEN_AI_USAGE_OUTPUT_TOKENS,
    attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
)
"""A span with any of these attributes is a usage span."""
TOKEN_KEYS: Final = frozenset(TOKEN_ATTRIBUTES)

ROLLUP_SPAN_TYPES: Final = frozenset({"flow", "step", "turn"})
"""``coworker.span.type`` values of roll-up spans: their totals repeat their runs' usage."""

KIND_USAGE: Final = "usage"
"""The ``kind`` of a usage record (:data:`coworker.audit.usage.KIND_USAGE`; not imported from
there, which pulls in the SDK span processor for every decoding worker)."""

_MAX_TOKENS: Final = 2**53 - 1  # what a record (a JCS number) holds exactly; as record_usage
_USAGE_TAG: Final = b"coworker.ingest-usage\x00"
_USAGE_MARK: Final = b"U"
USAGE_KEY_LEN: Final = 57
"""24 bytes of ids + 32 of digest + ``U``: never the length of a span key (24, 56) or a
conflict key (32), so the conflict scan over a span's ids never counts a usage record."""
# Not part of what identifies the usage of a span: the cost is the server's pricing at the
# time of the append, and a resend after a pricing update must still be a duplicate.
_NOT_USAGE_CONTENT: Final = frozenset(
    {"seq", "recorded_at", "ingest_token", "cost_amount", "cost_currency", "cost_source"}
)


class UsageRefused(ValueError):
    """A usage span whose token counts (or model, provider) cannot be a usage record."""


def wants_usage(attributes: Iterable[KeyValue]) -> bool:
    """``True`` when an OTLP span's attributes carry token counts and it is no roll-up span."""
    usage = False
    for kv in attributes:
        key = kv.key
        if key in TOKEN_KEYS:
            usage = True
        elif key == attr.SPAN_TYPE and kv.value.string_value in ROLLUP_SPAN_TYPES:
            return False
    return usage


def usage_key(ids: bytes, fields: Mapping[str, Any]) -> bytes:
    """The dedup key of an ingested usage record (see :data:`USAGE_KEY_LEN`)."""
    content = {k: v for k, v in fields.items() if k not in _NOT_USAGE_CONTENT}
    return ids + hashlib.sha256(_USAGE_TAG + canonical(content)).digest() + _USAGE_MARK


def is_usage_key(key: bytes) -> bool:
    """``True`` for a key made by :func:`usage_key`."""
    return len(key) == USAGE_KEY_LEN and key[-1:] == _USAGE_MARK


def _count(attributes: Mapping[str, Any], name: str) -> int:
    value = attributes.get(name)
    if value is None:
        return 0
    # bool is an int in Python (True tokens is a bug), and a double is no count.
    if type(value) is not int:
        raise UsageRefused(f"{name} must be an integer, got {_show(value)}")
    if value < 0 or value > _MAX_TOKENS:
        raise UsageRefused(f"{name} must be in [0, 2**53), got {value}")
    return value


def _name(attributes: Mapping[str, Any], name: str) -> str | None:
    value = attributes.get(name)
    if value is None:
        return None
    if type(value) is not str or not value:
        raise UsageRefused(f"{name} must be a non-empty string, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    return repr(value)[:80]


_MAX_MODELS: Final = 1000  # entries of a per-model split; more is no run's honest usage


def _check(counts: list[int], what: str) -> None:
    if counts[2] + counts[3] > counts[0]:
        raise UsageRefused(
            f"{what}cache read + cache creation input tokens ({counts[2]} + {counts[3]}) "
            f"exceed the input tokens ({counts[0]})"
        )
    if counts[4] > counts[1]:
        raise UsageRefused(
            f"{what}reasoning tokens ({counts[4]}) exceed the output tokens ({counts[1]})"
        )


def _split(attributes: Mapping[str, Any]) -> list[tuple[str, str | None, list[int]]]:
    """The per-model split (``coworker.usage.by_model.*``) of a span, or ``[]``.

    Raises:
        UsageRefused: arrays of other types or lengths, bad names or counts.
    """
    models = attributes.get(attr.USAGE_BY_MODEL_MODEL)
    if models is None:
        return []
    if type(models) is not tuple or not models or len(models) > _MAX_MODELS:
        raise UsageRefused(
            f"{attr.USAGE_BY_MODEL_MODEL} must be an array of 1 to {_MAX_MODELS} model names"
        )
    providers = attributes.get(attr.USAGE_BY_MODEL_PROVIDER, ("",) * len(models))
    columns: list[tuple[Any, ...]] = [providers]
    for name in attr.USAGE_BY_MODEL_COUNTS:
        columns.append(attributes.get(name, (0,) * len(models)))
    for name, column in zip(
        (attr.USAGE_BY_MODEL_PROVIDER, *attr.USAGE_BY_MODEL_COUNTS), columns, strict=True
    ):
        if type(column) is not tuple or len(column) != len(models):
            raise UsageRefused(f"{name} must be an array as long as {attr.USAGE_BY_MODEL_MODEL}")
    out: list[tuple[str, str | None, list[int]]] = []
    for i, model in enumerate(models):
        provider = columns[0][i]
        if type(model) is not str or not model or type(provider) is not str:
            raise UsageRefused(
                f"{attr.USAGE_BY_MODEL_MODEL}[{i}] / provider: expected names, got "
                f"{_show(model)}, {_show(provider)}"
            )
        counts = [
            _count({f"{name}[{i}]": column[i]}, f"{name}[{i}]")
            for name, column in zip(attr.USAGE_BY_MODEL_COUNTS, columns[1:], strict=True)
        ]
        _check(counts, f"{model}: ")
        out.append((model, provider or None, counts))
    return out


def usage_entries_of(span: Any, fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The usage records of an ingested span, given the span's own record ``fields``.

    One record, priced by ``gen_ai.request.model``; or, when the span carries the per-model
    split of a run that called several models (``coworker.usage.by_model.*``), one record per
    model, each priced by its own model, plus one for any part of the ``gen_ai.usage.*``
    totals outside the split (set on the span by something else), priced by
    ``gen_ai.request.model``.

    Args:
        span: the decoded span: anything with ``attributes`` and ``end_time`` (a
            :class:`~opentelemetry.sdk.trace.ReadableSpan`, a
            :class:`~coworker.ingest.decode.SpanRecord`).
        fields: what :func:`~coworker.audit.record.entry_from_span` made of it (the identity
            fields the usage records repeat).

    Raises:
        UsageRefused: a count that is not an integer in [0, 2**53), cached tokens beyond the
            input tokens, reasoning tokens beyond the output tokens, a model, provider or
            cost center that is not a non-empty string, or a split that does not fit in the
            totals.
    """
    from coworker.audit.usage import usage_entries
    from coworker.pricing import TokenCounts, UsageWarning, default_pricing

    attributes = span.attributes or {}
    counts = [_count(attributes, name) for name in TOKEN_ATTRIBUTES]
    _check(counts, "")
    model = _name(attributes, attr.GEN_AI_REQUEST_MODEL)
    provider = _name(attributes, attr.GEN_AI_PROVIDER_NAME)
    center = _name(attributes, attr.COST_CENTER)
    parts: list[tuple[str | None, str | None, list[int]]] = list(_split(attributes))
    rest = list(counts)
    for _, _, part in parts:
        for i, n in enumerate(part):
            rest[i] -= n
    if any(n < 0 for n in rest):
        raise UsageRefused(
            f"the per-model split ({attr.USAGE_BY_MODEL_MODEL}) exceeds the span's totals"
        )
    if not parts:
        parts = [(model, provider, counts)]
    elif any(rest):
        _check(rest, "the totals outside the per-model split: ")
        parts.append((model, provider, rest))
    at = _dt.datetime.fromtimestamp(span.end_time / 1e9, _dt.UTC)
    calls: list[dict[str, Any]] = []
    for name, by, part in parts:
        cost = None
        if name is not None:
            with warnings.catch_warnings():
                # An unknown model gives a null cost; the report counts it as unpriced. A
                # warning per model in a server's log says nothing the record does not.
                warnings.simplefilter("ignore", UsageWarning)
                cost = default_pricing().cost(name, TokenCounts(*part), provider=by, at=at)
        call: dict[str, Any] = {
            attr.GEN_AI_REQUEST_MODEL: name,
            attr.GEN_AI_PROVIDER_NAME: by,
            attr.COST_CENTER: center,
            "usage_at": span.end_time,
        }
        call.update(zip(TOKEN_ATTRIBUTES, part, strict=True))
        if cost is not None:
            call[attr.GEN_AI_USAGE_COST_AMOUNT] = str(cost.amount)
            call[attr.GEN_AI_USAGE_COST_CURRENCY] = cost.currency
            call[attr.GEN_AI_USAGE_COST_SOURCE] = cost.source
        calls.append(call)
    entries = [entry for entry, _ in usage_entries(span, calls, record=fields)]
    assert all(e["kind"] == KIND_USAGE for e in entries)
    return entries
