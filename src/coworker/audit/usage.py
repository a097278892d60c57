"""The usage ledger: one audit record (category ``usage``) per :func:`coworker.record_usage`
call, in the same hash chain and through the same never-lose writer as every other record;
and ``coworker usage report``, which rolls the records up and recomputes their cost.

:class:`UsageLedgerProcessor` is added by ``coworker.configure(audit=...)`` after the audit
processor. When a run's span ends it turns each usage call recorded on it
(:func:`coworker.usage.take_pending`) into a record and appends them all in one group commit,
before ``span.end()`` returns (the same durability as a state-change record). The record
repeats the run's identity fields (run, chain, flow, step, user, agent, session, trace and
span ids) and adds the usage keys of :data:`USAGE_FIELDS` (optional keys: no schema version
change).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from coworker import attributes as attr
from coworker._text import printable
from coworker.audit.exporter import AuditSpanExporter
from coworker.audit.record import entry_from_span, format_time

__all__ = [
    "GROUPINGS",
    "KIND_USAGE",
    "USAGE_FIELDS",
    "UsageLedgerProcessor",
    "UsageReport",
    "register",
    "report",
    "usage_entries",
]

KIND_USAGE: Final = "usage"
"""The ``kind`` of a usage record: not ``outcome``, so that nothing takes it for a run's outcome
(the flow fold's run counts, ``audit tree``, the pairing of fail-closed intents)."""

USAGE_FIELDS: Final = (
    "model",
    "provider",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
    "cost_amount",  # exact decimal text, or null when the model had no price
    "cost_currency",
    "cost_source",  # the pricing version
    "cost_center",
    "usage_at",  # when record_usage was called (RFC 3339 ns)
    "usage_index",  # 0, 1, ... within the run
    "usage_process",  # the writing process's random id (absent in records made by ingest)
)
"""The keys a usage record adds to the run's identity fields."""

_EVENT_KEYS: Final = (
    ("model", attr.GEN_AI_REQUEST_MODEL),
    ("provider", attr.GEN_AI_PROVIDER_NAME),
    ("input_tokens", attr.GEN_AI_USAGE_INPUT_TOKENS),
    ("output_tokens", attr.GEN_AI_USAGE_OUTPUT_TOKENS),
    ("cache_read_input_tokens", attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS),
    ("cache_creation_input_tokens", attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS),
    ("reasoning_tokens", attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS),
    ("cost_amount", attr.GEN_AI_USAGE_COST_AMOUNT),
    ("cost_currency", attr.GEN_AI_USAGE_COST_CURRENCY),
    ("cost_source", attr.GEN_AI_USAGE_COST_SOURCE),
    ("cost_center", attr.COST_CENTER),
)

_TOKEN_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
)


def usage_entries(
    span: Any,
    calls: Sequence[Mapping[str, Any]],
    *,
    record: Mapping[str, Any] | None = None,
    process: str | None = None,
) -> list[tuple[dict[str, Any], bytes | None]]:
    """The usage ledger entries of a finished span, one per recorded usage call.

    ``record`` is the span's own record when the caller has made it already (the ingest
    server); else it is made here. ``process`` names the writing process
    (``usage_process``: its budgets skip their own records, which they count in memory).
    """
    if not calls:
        return []
    base = dict(record) if record is not None else entry_from_span(span)[0]
    base.update(
        kind=KIND_USAGE,
        category=attr.CATEGORY_USAGE,
        payload_digest=None,  # the run's captured input/output belongs to its own record
        intent_seq=None,
    )
    if process is not None:
        base["usage_process"] = process
    out: list[tuple[dict[str, Any], bytes | None]] = []
    for index, values in enumerate(calls):
        fields = dict(base)
        for key, name in _EVENT_KEYS:
            value = values.get(name)
            fields[key] = value if value is None or type(value) in (int, str) else str(value)
        for key in _TOKEN_FIELDS:
            if fields[key] is None:
                fields[key] = 0  # record_usage leaves zero counts out of its event
        at = values.get("usage_at")
        fields["usage_at"] = format_time(at) if type(at) is int else None
        fields["usage_index"] = index
        out.append((fields, None))
    return out


def _take_pending(span: Any) -> list[dict[str, Any]] | None:
    # An import statement in on_end costs ~4,000 instructions per run (callgrind): import
    # once (lazily: coworker.usage loads the usage policy), then call it directly.
    global _take_pending
    from coworker.usage import take_pending

    _take_pending = take_pending
    return take_pending(span)


class UsageLedgerProcessor(SpanProcessor):
    """Append the usage records of each ended span, synchronously (see the module docs).

    Args:
        exporter: the audit exporter whose writer (and store) the audit processor uses.
    """

    def __init__(self, exporter: AuditSpanExporter) -> None:
        self.exporter = exporter

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do at start."""

    def on_end(self, span: ReadableSpan) -> None:
        """Write the span's usage records; durable before this returns.

        Raises:
            AuditUnavailable: the store failed and the writer's policy is ``"raise"``.
        """
        calls = _take_pending(span)
        if not calls:
            return
        from coworker.usage_policy import process_id

        entries = usage_entries(span, calls, process=process_id())
        if entries:
            self.exporter.writer.write(entries)

    def shutdown(self) -> None:
        """The audit processor owns the exporter and closes it."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """The audit processor flushes the shared writer."""
        return True


# -- the report ------------------------------------------------------------------------------

GROUPINGS: Final = {
    "flow": "flow_id",
    "flow-type": "flow_type",
    "user": "user_id",
    "agent": "agent_id",
    "cost-center": "cost_center",
    "model": "model",
    "run": "chain_id",
}
"""``--by`` value → record field."""

PRICING_RECORDED: Final = "recorded"
PRICING_CURRENT: Final = "current"


@dataclass
class _Row:
    key: str | None
    records: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TOKEN_FIELDS, 0))
    cost: dict[str, Decimal] = field(default_factory=dict)
    unpriced: int = 0

    def add(self, rec: Mapping[str, Any], amount: Decimal | None, currency: str | None) -> None:
        self.records += 1
        for k in _TOKEN_FIELDS:
            v = rec.get(k)
            if type(v) is int:
                self.tokens[k] += v
        if amount is None or currency is None:
            self.unpriced += 1
        else:
            self.cost[currency] = self.cost.get(currency, Decimal(0)) + amount

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "records": self.records,
            **self.tokens,
            "cost": {c: str(v) for c, v in sorted(self.cost.items())},
            "unpriced_records": self.unpriced,
        }


@dataclass
class UsageReport:
    """Rows per group and the totals (which equal the sum of the records)."""

    by: str
    pricing_version: str
    rows: list[_Row]
    total: _Row

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (amounts as exact decimal strings)."""
        return {
            "by": self.by,
            "pricing_version": self.pricing_version,
            "rows": [r.as_json() for r in self.rows],
            "total": self.total.as_json(),
        }


def _parse_time(value: str | None) -> _dt.datetime | None:
    if not value:
        return None
    try:
        t = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        from coworker.exceptions import ConfigError

        raise ConfigError(f"expected an ISO date or time, got {value!r}") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=_dt.UTC)


def _record_time(rec: Mapping[str, Any]) -> _dt.datetime | None:
    text = rec.get("usage_at") or rec.get("start")
    if not isinstance(text, str):
        return None
    try:  # fixed width: nanoseconds cut to microseconds for datetime
        return _dt.datetime.fromisoformat(text[:26] + "+00:00")
    except ValueError:
        return None


def usage_records(records: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """The decoded usage records among ``records`` (``StoredRecord`` objects or dicts)."""
    for rec in records:
        fields = rec.fields() if hasattr(rec, "fields") and callable(rec.fields) else rec
        if fields.get("category") == attr.CATEGORY_USAGE and fields.get("kind") == KIND_USAGE:
            yield fields


def report(
    records: Iterable[Any],
    *,
    by: str,
    since: str | None = None,
    until: str | None = None,
    pricing_version: str = PRICING_CURRENT,
    pricing: Any = None,
) -> UsageReport:
    """Roll usage records up by ``by`` (a key of :data:`GROUPINGS`).

    Args:
        records: stored records (any category; only usage records count).
        by: the grouping.
        since: keep records at or after this ISO time.
        until: keep records before this ISO time.
        pricing_version: ``"current"`` recomputes every cost with ``pricing`` (default: the
            process's :func:`coworker.pricing.default_pricing`); ``"recorded"`` keeps the cost
            stored in each record; any other value must equal the current pricing's version.
        pricing: a :class:`coworker.pricing.Pricing` for recomputation.

    Raises:
        ConfigError: unknown grouping, bad time, or a pricing version not available here.
    """
    from coworker.exceptions import ConfigError
    from coworker.pricing import TokenCounts, default_pricing

    if by not in GROUPINGS:
        raise ConfigError(f"--by: expected one of {sorted(GROUPINGS)}, got {by!r}")
    pricer = pricing if pricing is not None else default_pricing()
    if pricing_version not in (PRICING_RECORDED, PRICING_CURRENT):
        if pricing_version != pricer.version:
            raise ConfigError(
                f"pricing version {pricing_version!r} is not available here: use "
                f"'{PRICING_RECORDED}' (the cost stored in each record) or the current "
                f"{pricer.version!r}"
            )
        pricing_version = PRICING_CURRENT
    lo, hi = _parse_time(since), _parse_time(until)
    key_field = GROUPINGS[by]
    rows: dict[str | None, _Row] = {}
    total = _Row(None)
    for rec in usage_records(records):
        when = _record_time(rec)
        if (lo is not None and (when is None or when < lo)) or (
            hi is not None and (when is None or when >= hi)
        ):
            continue
        amount: Decimal | None
        currency: str | None
        if pricing_version == PRICING_RECORDED:
            amount, currency = _decimal(rec.get("cost_amount")), rec.get("cost_currency")
        else:
            model = rec.get("model")
            cost = None
            if isinstance(model, str) and model:
                ints: dict[str, int] = {}
                for k in _TOKEN_FIELDS:
                    v = rec.get(k)
                    ints[k] = v if type(v) is int else 0
                cost = pricer.cost(
                    model,
                    TokenCounts(
                        ints["input_tokens"],
                        ints["output_tokens"],
                        ints["cache_read_input_tokens"],
                        ints["cache_creation_input_tokens"],
                        ints["reasoning_tokens"],
                    ),
                    provider=rec.get("provider"),
                    at=when,
                )
            amount = cost.amount if cost is not None else None
            currency = cost.currency if cost is not None else None
        key = rec.get(key_field)
        key = key if isinstance(key, str) else None
        row = rows.get(key)
        if row is None:
            row = rows[key] = _Row(key)
        row.add(rec, amount, currency)
        total.add(rec, amount, currency)
    version = "recorded" if pricing_version == PRICING_RECORDED else pricer.version
    ordered = sorted(rows.values(), key=lambda r: (r.key is None, r.key or ""))
    return UsageReport(by, version, ordered, total)


def _decimal(value: Any) -> Decimal | None:
    if not isinstance(value, str):
        return None
    try:
        out = Decimal(value)
    except InvalidOperation:
        return None
    return out if out.is_finite() else None


def _cost_text(cost: Mapping[str, Decimal], unpriced: int) -> str:
    parts = [f"{_money(v)} {c}" for c, v in sorted(cost.items())]
    if unpriced:
        parts.append(f"{unpriced} unpriced")
    return "; ".join(parts) or "-"


def _money(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.000001'))}"


def format_table(rep: UsageReport) -> str:
    """The report as an aligned text table with a totals line (every value escaped)."""
    head = [rep.by, "records", "input", "output", "cache read", "cache write", "reasoning"]
    head.append("cost")
    lines = []
    for row in [*rep.rows, rep.total]:
        label = "TOTAL" if row is rep.total else (row.key if row.key is not None else "-")
        lines.append(
            [
                printable(label),
                str(row.records),
                *(str(row.tokens[k]) for k in _TOKEN_FIELDS),
                printable(_cost_text(row.cost, row.unpriced)),
            ]
        )
    widths = [max(len(head[i]), *(len(x[i]) for x in lines)) for i in range(len(head))]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    body = [fmt(head), sep, *(fmt(x) for x in lines[:-1]), sep, fmt(lines[-1])]
    body.append(f"pricing: {printable(rep.pricing_version)}")
    return "\n".join(body)


# -- CLI -------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add ``coworker usage report`` to the top-level CLI."""
    usage = subparsers.add_parser("usage", help="token usage and cost from the usage ledger")
    usage_sub = usage.add_subparsers(dest="usage_command", required=True)
    rep = usage_sub.add_parser("report", help="usage and cost rolled up, with totals")
    rep.add_argument("--by", required=True, choices=sorted(GROUPINGS))
    rep.add_argument("--since", help="ISO date/time (inclusive)")
    rep.add_argument("--until", help="ISO date/time (exclusive)")
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.add_argument(
        "--pricing-version",
        default=PRICING_CURRENT,
        help="'current' (default: recompute with today's pricing), 'recorded' (the cost "
        "stored in each record), or the exact current version string",
    )
    rep.add_argument("--pricing", help="pricing override file (.toml/.json) to recompute with")
    rep.add_argument("--url", default=None, help="audit store URL (default: COWORKER_AUDIT_URL)")
    rep.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from coworker.audit.urls import open_store, resolve_url
    from coworker.exceptions import ConfigError, CoworkerError
    from coworker.pricing import Pricing

    try:
        pricing = Pricing.from_file(args.pricing) if args.pricing else None
        resolved = resolve_url(args.url)
        if resolved.startswith("sqlite:") and "mode=" not in resolved:
            resolved += ("&" if "?" in resolved else "?") + "mode=ro"
        store = open_store(resolved)
        try:
            rep = report(
                store.iter_from(1),
                by=args.by,
                since=args.since,
                until=args.until,
                pricing_version=args.pricing_version,
                pricing=pricing,
            )
        finally:
            store.close()
    except (ConfigError, CoworkerError) as exc:
        print(f"coworker usage: {printable(str(exc))}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep.as_json(), ensure_ascii=True, indent=2))
    else:
        print(format_table(rep))
    return 0
