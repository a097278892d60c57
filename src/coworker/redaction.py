"""Redaction for the operational trail: what the trace backend may see (issue 15).

The audit store gets the captured input/output encrypted (docs/privacy.md); the trace backend
(OTLP to Jaeger, Tempo...) gets, by configuration, a *redacted* capture or none at all. One
mechanism, a :class:`Redactor`, applied at that boundary by :class:`RedactingSpanExporter` to
every string attribute of every exported span and span event:

* key names: a value under a key containing one of ``keys`` (case-insensitive, any depth of
  the captured JSON) becomes ``[REDACTED]``;
* value patterns: any match of ``patterns`` inside any string (card numbers, e-mail
  addresses by default) becomes ``[REDACTED]``;
* a callable ``func(value) -> value`` for anything else, applied to every string after the
  patterns.

Configure it with ``coworker.configure(trace_payloads="redacted" | "none", redaction=...)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from opentelemetry.sdk.trace.export import SpanExporter

from coworker import attributes as attr
from coworker._capture import REDACTED

__all__ = [
    "CARD_NUMBER",
    "EMAIL",
    "RedactingSpanExporter",
    "Redactor",
]

CARD_NUMBER: Final = re.compile(r"(?<!\d)(?<!\d\.)(?:\d[ -]?){12,18}\d(?!\d|\.\d)")
"""13 to 19 digits, optionally grouped by spaces or dashes, that pass the Luhn check (payment
card numbers). Digits in a decimal number are not a card: ``0.000123450000000000`` is a price."""
EMAIL: Final = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
"""An e-mail address."""

_PAYLOAD_KEYS: Final = (attr.INPUT, attr.OUTPUT, attr.INPUT_VALUE, attr.OUTPUT_VALUE)
"""The captured input/output, under coworker's keys and OpenInference's (the same text)."""
_PAYLOAD_TYPES: Final = (attr.INPUT_MIME_TYPE, attr.OUTPUT_MIME_TYPE)

_ID_KEYS: Final = frozenset(
    {
        attr.FLOW_ID,
        attr.FLOW_PREVIOUS_ID,
        attr.FLOW_NEXT_ID,
        attr.RUN_ID,
        attr.RUN_PARENT_ID,
        attr.CHAIN_ID,
        attr.CONVERSATION_ID,
        attr.SESSION_ID,
        attr.SESSION_PREVIOUS_ID,
    }
)
"""Attributes that hold identifiers, which coworker generates as UUIDs or hex (flow, run, chain
ids; a conversation's or session's id is its flow's unless the application names it)."""
_ID_FORMAT: Final = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|(?=[0-9]*[a-f])[0-9a-f]{16,32}"
)
"""coworker's own id formats: a UUID, or 16-32 hex digits with at least one letter (an id of
digits only could be a card number the application chose as an id: it is redacted as text)."""


def _card(match: re.Match[str]) -> str:
    # Luhn: a long number that is not a valid card number (an id, an amount) stays.
    digits = [int(c) for c in match.group(0) if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return REDACTED if total % 10 == 0 else match.group(0)


class Redactor:
    """Redact strings and captured JSON by key name, value pattern and a callable.

    Args:
        keys: lower-case key fragments whose values are redacted (default: the capture's
            own list, ``password``, ``token``, ``secret``...).
        patterns: regular expressions whose matches are redacted inside any string.
        func: called on every string after the patterns; returns the string to keep.
    """

    def __init__(
        self,
        keys: Iterable[str] | None = None,
        patterns: Sequence[re.Pattern[str] | str] = (CARD_NUMBER, EMAIL),
        func: Callable[[str], str] | None = None,
    ) -> None:
        if keys is None:
            from coworker._state import DEFAULT_REDACT

            keys = DEFAULT_REDACT
        self.keys = tuple(k.lower() for k in keys)
        self.patterns = tuple(re.compile(p) if isinstance(p, str) else p for p in patterns)
        self.func = func

    def text(self, value: str) -> str:
        """``value`` with every pattern match replaced, then passed through ``func``."""
        for pattern in self.patterns:
            if pattern is CARD_NUMBER:
                value = pattern.sub(_card, value)
            else:
                value = pattern.sub(REDACTED, value)
        if self.func is not None:
            try:
                value = str(self.func(value))
            except Exception:  # a failing rule must not leak the value: redact it whole
                value = REDACTED
        return value

    def value(self, value: Any, depth: int = 0) -> Any:
        """A decoded JSON value (or attribute value) with keys and strings redacted."""
        if isinstance(value, str):
            return self.text(value)
        if depth > 64:
            return REDACTED
        if isinstance(value, Mapping):
            return {
                str(k): REDACTED
                if any(f in str(k).lower() for f in self.keys)
                else self.value(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v, depth + 1) for v in value]
        return value

    def captured(self, text: str) -> str:
        """A captured JSON text, redacted; text that is not JSON (truncated) by patterns."""
        try:
            decoded = json.loads(text)
        except ValueError:
            # Cut off by the capture limit: no structure to walk, so patterns only; a key
            # name match cannot be located, so any listed key makes the whole text go.
            lowered = text.lower()
            if any(k in lowered for k in self.keys):
                return REDACTED
            return self.text(text)
        # The capture itself nests JSON strings ({"input": "{\"email\": ...}"}): decode those too.
        return json.dumps(self._nested(decoded), ensure_ascii=False, separators=(",", ":"))

    def _nested(self, value: Any) -> Any:
        if isinstance(value, str) and value[:1] in ("{", "["):
            try:
                return self._nested_json(json.loads(value))
            except ValueError:
                return self.text(value)
        return self.value(value)

    def _nested_json(self, decoded: Any) -> str:
        return json.dumps(self.value(decoded), ensure_ascii=False, separators=(",", ":"))


class _RedactedSpan:
    # A read-only view of a ReadableSpan with other attributes and events: exporters read
    # spans through their public properties, which this delegates.
    def __init__(self, span: Any, attributes: Mapping[str, Any], events: Sequence[Any]) -> None:
        self._span = span
        self._attributes = attributes
        self._events = events

    @property
    def attributes(self) -> Mapping[str, Any]:
        return self._attributes

    @property
    def events(self) -> Sequence[Any]:
        return self._events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._span, name)


class RedactingSpanExporter(SpanExporter):
    """A ``SpanExporter`` that redacts every span before handing it to ``delegate``.

    Args:
        delegate: the real exporter (OTLP, console, in-memory).
        redactor: the rules.
        payloads: ``"redacted"``: the captured input/output go out redacted; ``"none"``:
            they are dropped from the exported spans (the audit store still gets them).
    """

    def __init__(self, delegate: Any, redactor: Redactor, payloads: str = "redacted") -> None:
        if payloads not in ("redacted", "none"):
            from coworker.exceptions import ConfigError

            raise ConfigError(f"trace_payloads={payloads!r} must be 'redacted' or 'none'")
        self.delegate = delegate
        self.redactor = redactor
        self.payloads = payloads

    def _attributes(self, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # The capture is there twice (coworker's key and OpenInference's): redact it once.
        redacted: dict[str, str] = {}
        for key, value in (attributes or {}).items():
            if key in _PAYLOAD_KEYS:
                if self.payloads == "none":
                    continue
                if isinstance(value, str):
                    if value not in redacted:
                        redacted[value] = self.redactor.captured(value)
                    value = redacted[value]
                out[key] = value
            elif key in _PAYLOAD_TYPES and self.payloads == "none":
                continue  # no value to describe
            elif isinstance(value, str):
                # An id in coworker's own format is not text: a card-number pattern matched
                # the digits of ~1 in 400 random UUIDs, and a flow id cut in the exported
                # trace no longer finds its audit records or its other spans.
                if key in _ID_KEYS and _ID_FORMAT.fullmatch(value):
                    out[key] = value
                else:
                    out[key] = self.redactor.text(value)
            elif isinstance(value, tuple | list):
                out[key] = tuple(self.redactor.text(v) if isinstance(v, str) else v for v in value)
            else:
                out[key] = value
        return out

    def _span(self, span: Any) -> Any:
        from opentelemetry.sdk.trace import Event

        events = [
            Event(e.name, self._attributes(e.attributes), e.timestamp) for e in span.events or ()
        ]
        return _RedactedSpan(span, self._attributes(span.attributes), events)

    def export(self, spans: Sequence[Any]) -> Any:
        """Redact, then export through the delegate."""
        return self.delegate.export([self._span(s) for s in spans])

    def shutdown(self) -> None:
        """Shut the delegate down."""
        self.delegate.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the delegate."""
        flush = getattr(self.delegate, "force_flush", None)
        return bool(flush(timeout_millis)) if flush is not None else True
