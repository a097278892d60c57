"""``coworker demo``: a small sample app whose trace is printed as a tree.

Two flows of work:

* an **order-processing workflow** with three steps (validate, payment, ship) where the
  payment gateway times out once and the step is retried;
* an **AI conversation** in which an agent acts for a user: it looks up invoices, updates
  one, then the user changes topic, which breaks the flow into a new, linked one.

The spans are printed as flow → step → run (with user and agent), sent over OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and the state-changing runs go to the embedded audit
store, which is then verified.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import coworker
from coworker import attributes as attr
from coworker import config

# -- the sample application ------------------------------------------------------------------


class GatewayTimeout(Exception):
    """The payment gateway did not answer (the demo's transient failure)."""


_gateway_calls = {"n": 0}


@coworker.run(operation="select", doctype="Order")
def load_order(order_id: str) -> dict[str, Any]:
    return {"id": order_id, "amount": 120, "items": 3}


@coworker.run(operation="validate", doctype="Order")
def validate(order: dict[str, Any]) -> None:
    if order["amount"] <= 0:
        raise coworker.ValidationError("amount must be positive")


@coworker.run(operation="submit", doctype="Payment", capture_input=True)
def charge(order_id: str, amount: int, card_token: str) -> str:
    _gateway_calls["n"] += 1
    if _gateway_calls["n"] == 1:
        raise GatewayTimeout("payment gateway timed out after 2.0 s")
    return f"pay-{order_id}"


@coworker.run(operation="create", doctype="Shipment")
def ship(order_id: str) -> str:
    return f"ship-{order_id}"


def process_order(order_id: str) -> None:
    orders = coworker.workflow("order-processing", steps=["validate", "payment", "ship"])
    with coworker.acting_as("clerk-17", session="s-web-1"), orders.start(channel="web") as flow:
        with flow.step("validate"):
            validate(load_order(order_id))
        with flow.step("payment"):
            for attempt in (1, 2):
                try:
                    charge(order_id, 120, card_token="tok_live_4242")
                    break
                except GatewayTimeout:
                    if attempt == 2:
                        raise
        with flow.step("ship"):
            ship(order_id)


@coworker.run(operation="select", doctype="Invoice")
def find_invoices(customer: str) -> list[str]:
    return [f"INV-{customer}-1", f"INV-{customer}-2"]


@coworker.run(operation="update", doctype="Invoice")
def set_due_date(invoice_id: str, due: str) -> None:
    return None


@coworker.run(operation="select", doctype="Task")
def list_tasks(owner: str) -> list[str]:
    return ["call supplier"]


def assistant_chat() -> None:
    chat = coworker.conversation("chat-42")
    user = coworker.User("user-456")
    with coworker.acting_as(user, "agent-789", agent_name="billing-assistant", session="s-1"):
        with chat.turn(message_id="msg-1"):  # "which invoices does ACME have?"
            find_invoices("ACME")
        with chat.turn(message_id="msg-2"):  # "move the first one to next Friday"
            set_due_date("INV-ACME-1", "2026-11-27")
        with chat.turn(message_id="msg-3"):  # "unrelated: what are my tasks?"
            coworker.break_flow("topic-change")
            list_tasks("user-456")


# -- printing the tree -----------------------------------------------------------------------


def _short(value: Any) -> str:
    return str(value)[:8]


def print_tree(spans: Sequence[Any], out: TextIO = sys.stdout) -> None:
    """Print finished spans as flow → step → run → child runs."""
    spans = sorted(spans, key=lambda s: s.start_time)
    children: dict[str, list[Any]] = {}
    flows: dict[str, list[Any]] = {}
    for s in spans:
        a = s.attributes
        parent = a.get(attr.RUN_PARENT_ID)
        if parent:
            children.setdefault(parent, []).append(s)
        else:
            flows.setdefault(a.get(attr.FLOW_ID, "(no flow)"), []).append(s)
    for flow_id, roots in flows.items():
        a = roots[0].attributes
        line = f"flow {a.get(attr.FLOW_TYPE, '-')} {flow_id}"
        if attr.FLOW_DEFINITION_ID in a:
            line += f"  definition={a[attr.FLOW_DEFINITION_ID]}"
        if attr.CONVERSATION_ID in a:
            line += f"  conversation={a[attr.CONVERSATION_ID]}"
        if attr.FLOW_PREVIOUS_ID in a:
            line += (
                f"  ← broke from {_short(a[attr.FLOW_PREVIOUS_ID])}… ({a[attr.FLOW_BREAK_REASON]})"
            )
        print(line, file=out)
        by_step: dict[str, list[Any]] = {}
        for s in roots:
            by_step.setdefault(s.attributes.get(attr.STEP_ID, "(no step)"), []).append(s)
        for step_id, runs in by_step.items():
            failed = any(r.status.status_code.name == "ERROR" for r in runs)
            print(f"  step {step_id}" + ("  (failed once, retried)" if failed else ""), file=out)
            for r in runs:
                _print_run(r, children, 4, out)


def _print_run(span: Any, children: dict[str, list[Any]], indent: int, out: TextIO) -> None:
    a = span.attributes
    ok = span.status.status_code.name != "ERROR"
    who = []
    if attr.USER_ID in a:
        who.append(f"user={a[attr.USER_ID]}")
    if attr.AGENT_ID in a:
        who.append(f"agent={a.get(attr.AGENT_NAME, '')}({a[attr.AGENT_ID]})")
    mark = "✓" if ok else "✗"
    text = f"{' ' * indent}{mark} {span.name}  run={a[attr.RUN_ID][:8]}"
    if who:
        text += "  " + " ".join(who)
    if a.get(attr.AUDIT):
        text += f"  [audit: {a[attr.AUDIT_CATEGORY]}]"
    if not ok:
        text += f"  error={a.get(attr.ERROR_TYPE)}"
    print(text, file=out)
    for child in children.get(a[attr.RUN_ID], []):
        _print_run(child, children, indent + 2, out)


def _print_audit(store: Any, url: str, out: TextIO) -> bool:
    from coworker.audit import verify_chain

    records = [r.fields() for r in store.iter_from(1)]
    print(f"\naudit trail: {len(records)} records in {url}", file=out)
    for rec in records[-8:]:
        print(
            "  seq {seq:>4}  {category:<22} {operation} {doctype}  outcome={outcome}  "
            "user={user}  agent={agent}".format(
                seq=rec.get("seq"),
                category=str(rec.get("category")),
                operation=rec.get("operation") or "-",
                doctype=rec.get("doctype") or "-",
                outcome=rec.get("outcome"),
                user=rec.get("user_id") or "-",
                agent=rec.get("agent_id") or "-",
            ),
            file=out,
        )
    report = verify_chain(store)
    state = "intact" if report.ok else f"BROKEN: {report.detail}"
    head = report.head
    head_text = f"head seq={head.seq} hash={head.hash_hex[:16]}…" if head else "empty"
    print(f"verify: {state}; {head_text}", file=out)
    return report.ok


def main(audit_url: str | None = None, audit: bool = True, out: TextIO = sys.stdout) -> int:
    """Run the demo; return the process exit code (non-zero if the audit trail is broken)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    url = None
    if audit:
        url = (
            audit_url
            or os.environ.get(config.COWORKER_AUDIT_URL)
            or ("sqlite:///" + config.DEFAULT_AUDIT_PATH)
        )
    coworker.configure(
        os.environ.get("OTEL_SERVICE_NAME") or "coworker-demo",
        exporter=[SimpleSpanProcessor(memory)],
        audit=url,
    )
    try:
        _gateway_calls["n"] = 0
        process_order("ORD-1001")
        assistant_chat()
    finally:
        coworker.force_flush()
    print_tree(memory.get_finished_spans(), out)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        print(f"\nsent over OTLP to {os.environ['OTEL_EXPORTER_OTLP_ENDPOINT']}", file=out)
    ok = True
    if url is not None:
        # Read through the store the run wrote to (a memory:// store exists only there).
        from coworker._setup import audit_store

        ok = _print_audit(audit_store(), url, out)
    coworker.shutdown()
    return 0 if ok else 1


def flows_in(spans: Iterable[Any]) -> set[str]:
    """The flow ids of the spans (used by tests)."""
    return {s.attributes[attr.FLOW_ID] for s in spans if attr.FLOW_ID in s.attributes}
