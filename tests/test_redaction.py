"""Redaction at the trace-export boundary (issue 15): no raw personal value reaches OTLP."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import coworker
from coworker.audit.store_sqlite import SQLiteStore
from coworker.redaction import Redactor

EMAIL = "alice.smith+tag@example.co.uk"
CARD = "4111 1111 1111 1111"
CARD_DASHED = "5500-0000-0000-0004"
CUSTOM = "NHS-943-476-5919"


@dataclasses.dataclass
class Customer:
    name: str
    contact: dict[str, Any]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple | list):
        return [s for v in value for s in _strings(v)]
    return []


def _exported_text(exporter: InMemorySpanExporter) -> str:
    out = []
    for span in exporter.get_finished_spans():
        for value in (span.attributes or {}).values():
            out += _strings(value)
        for event in span.events:
            for value in (event.attributes or {}).values():
                out += _strings(value)
    return "\n".join(out)


def _run_app(tmp_path: Path, **configure: Any) -> tuple[InMemorySpanExporter, Path]:
    exporter = InMemorySpanExporter()
    db = tmp_path / "a.db"
    coworker.configure(exporter=exporter, audit=f"sqlite:///{db}", otlp=False, **configure)

    @coworker.run(operation="update", doctype="Customer", capture_input=True, capture_output=True)
    def update(customer: Customer, notes: list[Any], card: str) -> dict[str, Any]:
        if card == "fail":
            raise ValueError(f"card {CARD} declined for {EMAIL}")
        return {"ok": True, "echo": [EMAIL, {"nested": {"deeper": CARD_DASHED}}]}

    with coworker.acting_as("alice"):
        update(
            Customer("Alice", {"email": EMAIL, "phones": ("+44 20", {"card": CARD})}),
            [f"mail me at <{EMAIL}>", (CARD_DASHED,), {"id": CUSTOM}, 3.5, None],
            CARD,
        )
        with pytest.raises(ValueError):
            update(Customer("A", {}), [], "fail")
    coworker.shutdown()
    return exporter, db


def test_no_email_or_card_number_reaches_the_trace_exporter(tmp_path: Path) -> None:
    """Nested, dataclass, tuple, in-text and exception-message values are all redacted in
    every exported attribute, while the audit store keeps the capture (encrypted)."""
    exporter, db = _run_app(tmp_path)
    text = _exported_text(exporter)
    assert "coworker.input" in {k for s in exporter.get_finished_spans() for k in s.attributes}
    for secret in (EMAIL, CARD, CARD_DASHED, CARD.replace(" ", "")):
        assert secret not in text
    assert "[REDACTED]" in text
    store = SQLiteStore(db, readonly=True)
    try:
        kept = [store.plaintext(r) for r in store.iter_from(1) if r.payload is not None]
    finally:
        store.close()
    assert any(p is not None and EMAIL.encode() in p for p in kept)  # the audit copy


def test_trace_payloads_none_drops_the_capture_and_a_callable_redacts_more(
    tmp_path: Path,
) -> None:
    """trace_payloads="none" exports no coworker.input/output; a callable rule is applied."""
    exporter, _ = _run_app(tmp_path, trace_payloads="none")
    keys = {k for s in exporter.get_finished_spans() for k in s.attributes}
    assert "coworker.input" not in keys and "coworker.output" not in keys
    rules = Redactor(func=lambda s: s.replace(CUSTOM, "[ID]"))
    exporter, _ = _run_app(tmp_path / "b", redaction=rules)
    text = _exported_text(exporter)
    assert CUSTOM not in text and "[ID]" in text


def test_redactor_handles_unusual_values() -> None:
    """Truncated JSON, nested JSON strings, key names at depth, a failing callable."""
    r = Redactor(keys=["password"])
    assert EMAIL not in r.captured('{"a": "' + EMAIL + '", "b": "…[truncated]')
    assert r.captured('{"x": "{\\"password\\": \\"hunter2\\"}"') == "[REDACTED]"  # truncated
    nested = json.loads(r.captured(json.dumps({"l": [{"Password": "hunter2"}], "e": EMAIL})))
    assert nested == {"l": [{"Password": "[REDACTED]"}], "e": "[REDACTED]"}
    boom = Redactor(func=lambda s: 1 / 0)  # type: ignore[arg-type,return-value]
    assert boom.text("anything") == "[REDACTED]"
    assert r.text("order 12345 shipped") == "order 12345 shipped"  # short numbers stay
    # Long numbers that are no card: a decimal price, a non-Luhn id (cost metrics need them).
    assert r.text("0.000123450000000000") == "0.000123450000000000"
    assert r.text("id 1234567890123456") == "id 1234567890123456"
    assert r.text("card 4111111111111111.") == "card [REDACTED]."


LUHN_UUID = "a708a824-f612-4933-9292-85451500f2e6"  # its digits match the card pattern


def test_ids_in_coworkers_own_formats_are_exported_whole(tmp_path: Path) -> None:
    """A flow id whose digits pass the card-number check (about 1 random UUID in 400) reaches
    the trace exporter whole, so the trace still finds its audit records; a card number used
    as an id, and a card in any other attribute, are still redacted."""
    assert Redactor().text(LUHN_UUID) != LUHN_UUID  # the pattern alone would cut it
    exporter = InMemorySpanExporter()
    coworker.configure(exporter=exporter, audit=f"sqlite:///{tmp_path / 'a.db'}", otlp=False)

    @coworker.run(operation="update", doctype="Customer")
    def update() -> None:
        trace.get_current_span().set_attribute("app.note", f"card {CARD}")

    with coworker.flow("workflow", id=LUHN_UUID):
        update()
    with coworker.flow("workflow", id=CARD.replace(" ", "")):
        update()
    coworker.shutdown()
    spans = exporter.get_finished_spans()
    flow_ids = [s.attributes.get("flow.id") for s in spans if s.attributes.get("flow.id")]
    assert LUHN_UUID in flow_ids
    assert CARD.replace(" ", "") not in flow_ids and "[REDACTED]" in flow_ids
    assert CARD not in _exported_text(exporter)
