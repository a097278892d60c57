"""``coworker demo``: a small sample app whose trace is printed as a tree.

Two flows of work:

* an **order-processing workflow** with three steps (validate, payment, ship) where the
  payment gateway times out once and the step is retried;
* an **AI conversation** in which an agent acts for a user: it looks up invoices, updates
  one, then the user changes topic, which breaks the flow into a new, linked one.

The spans are printed as flow → step → run (with user and agent), sent over OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (the demo then
says how many spans the endpoint took and why the others failed), and the state-changing runs
go to the embedded audit store, which is then verified. Every value printed goes through
:func:`coworker._text.printable`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import coworker
from coworker import attributes as attr
from coworker import config
from coworker._text import printable as _p

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


def _model_call(prompt_tokens: int, completion_tokens: int) -> None:
    # The agent's model call behind the tool, as an OpenAI SDK response would report it.
    from coworker.usage import openai_usage, record_usage

    usage = openai_usage(
        {
            "model": "gpt-4o-mini",
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        }
    )
    assert usage is not None
    record_usage(**usage._asdict())


# Captured: Phoenix shows the call's input and output in its panes (input.value/output.value).
@coworker.run(operation="select", doctype="Invoice", capture_input=True, capture_output=True)
def find_invoices(customer: str) -> list[str]:
    _model_call(1200, 80)
    return [f"INV-{customer}-1", f"INV-{customer}-2"]


@coworker.run(operation="update", doctype="Invoice")
def set_due_date(invoice_id: str, due: str) -> None:
    return None


@coworker.run(operation="select", doctype="Task")
def list_tasks(owner: str) -> list[str]:
    _model_call(640, 25)
    return ["call supplier"]


def assistant_chat() -> None:
    chat = coworker.conversation("chat-42")
    user = coworker.User("user-456")
    with coworker.acting_as(
        user, "agent-789", agent_name="billing-assistant", session="s-1", cost_center="billing"
    ):
        with chat.turn(message_id="msg-1"):  # "which invoices does ACME have?"
            find_invoices("ACME")
        with chat.turn(message_id="msg-2"):  # "move the first one to next Friday"
            set_due_date("INV-ACME-1", "2026-11-27")
        with chat.turn(message_id="msg-3"):  # "unrelated: what are my tasks?"
            coworker.break_flow("topic-change")
            list_tasks("user-456")


# -- printing the tree -----------------------------------------------------------------------


def _short(value: Any) -> str:
    return _p(str(value)[:8])


def print_tree(spans: Sequence[Any], out: TextIO = sys.stdout) -> None:
    """Print finished spans as trees: one per trace, flow → step → run → child runs.

    With flow spans (the default) each workflow is one trace and each conversation turn one;
    without them (``configure(flow_spans=False)``) the runs are grouped by their attributes.
    """
    spans = sorted(spans, key=lambda s: s.start_time)
    if not any(_is_flow_span(s) for s in spans):
        _print_by_attributes(spans, out)
        return
    ids = {s.context.span_id for s in spans}
    children: dict[int | None, list[Any]] = {}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        children.setdefault(parent, []).append(s)
    last_trace = None
    for root in children.get(None, []):
        trace_id = root.context.trace_id
        if trace_id != last_trace:
            print(f"trace {trace_id:032x}", file=out)
            last_trace = trace_id
        _print_span(root, children, 2, out)


def _is_flow_span(span: Any) -> bool:
    a = span.attributes
    return attr.OPENINFERENCE_SPAN_KIND in a and attr.RUN_ID not in a


def _print_span(
    span: Any,
    children: dict[Any, list[Any]],
    indent: int,
    out: TextIO,
    show_step: bool = False,
) -> None:
    if not _is_flow_span(span):
        _print_run(span, {}, indent, out, children, show_step)
        return
    a = span.attributes
    kids = children.get(span.context.span_id, [])
    pad = " " * indent
    if a.get(attr.SPAN_TYPE) == "step":
        line = f"{pad}step {_p(a[attr.STEP_ID])}"
        if any(k.status.status_code.name == "ERROR" for k in kids):
            line += "  (failed once, retried)"
    else:
        line = pad
        if attr.TURN_NUMBER in a:
            line += f"turn {a[attr.TURN_NUMBER]} "
        line += f"{_p(span.name)}: flow {_p(a.get(attr.FLOW_TYPE, '-'))} {_p(a.get(attr.FLOW_ID))}"
        if attr.FLOW_DEFINITION_ID in a:
            line += f"  definition={_p(a[attr.FLOW_DEFINITION_ID])}"
        if attr.CONVERSATION_ID in a:
            line += f"  conversation={_p(a[attr.CONVERSATION_ID])}"
        for link in span.links:
            la = link.attributes or {}
            if la.get(attr.LINK_TYPE) == "flow-break":
                line += (
                    f"  ← broke from {_short(la.get(attr.FLOW_PREVIOUS_ID))}… "
                    f"({_p(la.get(attr.FLOW_BREAK_REASON))})"
                )
        if attr.FLOW_NEXT_ID in a:
            line += f"  → broken, continued in {_short(a[attr.FLOW_NEXT_ID])}…"
    if attr.GEN_AI_USAGE_INPUT_TOKENS in a:
        line += (
            f"  tokens={a[attr.GEN_AI_USAGE_INPUT_TOKENS]}+"
            f"{a.get(attr.GEN_AI_USAGE_OUTPUT_TOKENS, 0)}"
        )
    print(line, file=out)
    is_step = a.get(attr.SPAN_TYPE) == "step"
    for kid in kids:
        # A run directly under a flow or turn span names its step (a conversation's assigned
        # turn-n-op-k); under a step span the step line says it.
        _print_span(kid, children, indent + 2, out, not is_step)


def _print_by_attributes(spans: Sequence[Any], out: TextIO) -> None:
    """The runs grouped by ``flow.id`` and ``step.id`` (no flow spans to follow)."""
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
        line = f"flow {_p(a.get(attr.FLOW_TYPE, '-'))} {_p(flow_id)}"
        if attr.FLOW_DEFINITION_ID in a:
            line += f"  definition={_p(a[attr.FLOW_DEFINITION_ID])}"
        if attr.CONVERSATION_ID in a:
            line += f"  conversation={_p(a[attr.CONVERSATION_ID])}"
        if attr.FLOW_PREVIOUS_ID in a:
            line += (
                f"  ← broke from {_short(a[attr.FLOW_PREVIOUS_ID])}… "
                f"({_p(a.get(attr.FLOW_BREAK_REASON))})"
            )
        print(line, file=out)
        by_step: dict[str, list[Any]] = {}
        for s in roots:
            by_step.setdefault(s.attributes.get(attr.STEP_ID, "(no step)"), []).append(s)
        for step_id, runs in by_step.items():
            failed = any(r.status.status_code.name == "ERROR" for r in runs)
            print(
                f"  step {_p(step_id)}" + ("  (failed once, retried)" if failed else ""), file=out
            )
            for r in runs:
                _print_run(r, children, 4, out)


def _print_run(
    span: Any,
    children: dict[str, list[Any]],
    indent: int,
    out: TextIO,
    tree: dict[Any, list[Any]] | None = None,
    show_step: bool = False,
) -> None:
    a = span.attributes
    ok = span.status.status_code.name != "ERROR"
    who = []
    if attr.USER_ID in a:
        who.append(f"user={_p(a[attr.USER_ID])}")
    if attr.AGENT_ID in a:
        who.append(f"agent={_p(a.get(attr.AGENT_NAME, ''))}({_p(a[attr.AGENT_ID])})")
    mark = "✓" if ok else "✗"
    text = f"{' ' * indent}{mark} {_p(span.name)}  run={_short(a[attr.RUN_ID])}"
    if show_step and attr.STEP_ID in a:
        text += f"  step={_p(a[attr.STEP_ID])}"
    if who:
        text += "  " + " ".join(who)
    if a.get(attr.AUDITED):
        text += f"  [audit: {_p(a[attr.AUDIT_CATEGORY])}]"
    if not ok:
        text += f"  error={_p(a.get(attr.ERROR_TYPE))}"
    if attr.GEN_AI_USAGE_INPUT_TOKENS in a:
        used_out = a.get(attr.GEN_AI_USAGE_OUTPUT_TOKENS, 0)
        text += f"  tokens={a[attr.GEN_AI_USAGE_INPUT_TOKENS]}+{used_out}"
    print(text, file=out)
    if tree is not None:  # the trace tree: children by parent span
        for child in tree.get(span.context.span_id, []):
            _print_span(child, tree, indent + 2, out)
        return
    for child in children.get(a[attr.RUN_ID], []):
        _print_run(child, children, indent + 2, out)


def _print_usage(spans: Sequence[Any], out: TextIO) -> None:
    """The tokens and cost the agent's model calls used (coworker.record_usage)."""
    tokens_in = tokens_out = 0
    cost = 0.0
    currency = source = None
    unpriced = 0
    for s in spans:
        a = s.attributes
        if attr.GEN_AI_USAGE_INPUT_TOKENS not in a or attr.RUN_ID not in a:
            continue  # runs only: flow, step and turn spans carry roll-ups of the same usage
        tokens_in += a[attr.GEN_AI_USAGE_INPUT_TOKENS]
        tokens_out += a.get(attr.GEN_AI_USAGE_OUTPUT_TOKENS, 0)
        if attr.GEN_AI_USAGE_COST_AMOUNT in a:
            cost += a[attr.GEN_AI_USAGE_COST_AMOUNT]
            currency, source = a[attr.GEN_AI_USAGE_COST_CURRENCY], a[attr.GEN_AI_USAGE_COST_SOURCE]
        else:
            unpriced += 1
    text = f"\nusage: {tokens_in} input + {tokens_out} output tokens"
    if currency is not None:
        text += f", cost {cost:.6f} {_p(currency)} (pricing: {_p(source)})"
    if unpriced:
        text += f", {unpriced} run(s) unpriced (pip install 'coworker-otel[pricing]')"
    print(text, file=out)


def _print_audit(store: Any, url: str, out: TextIO) -> bool:
    from coworker.audit import verify_chain
    from coworker.audit.fold import list_flows

    records = [r.fields() for r in store.iter_from(1)]
    # Flow events (docs/flows.md) are listed by their fold below, not record by record.
    runs = [r for r in records if r.get("category") != "flow"]
    events = len(records) - len(runs)
    print(f"\naudit trail: {len(runs)} run records and {events} flow events in {_p(url)}", file=out)
    for rec in runs[-8:]:
        print(
            "  seq {seq:>4}  {category:<22} {operation} {doctype}  outcome={outcome}  "
            "user={user}  agent={agent}".format(
                seq=rec.get("seq"),
                category=_p(rec.get("category")),
                operation=_p(rec.get("operation") or "-"),
                doctype=_p(rec.get("doctype") or "-"),
                outcome=_p(rec.get("outcome")),
                user=_p(rec.get("user_id") or "-"),
                agent=_p(rec.get("agent_id") or "-"),
            ),
            file=out,
        )
    for flow in list_flows(store)[-1:]:
        print(
            f"  flow {_short(flow.flow_id)}: {_p(flow.status)} at step "
            f"{_p(flow.current_step or '-')}, sealed={'yes' if flow.sealed else 'no'}  "
            f"(coworker audit flow {_short(flow.flow_id)})",
            file=out,
        )
    report = verify_chain(store)
    state = "intact" if report.ok else f"BROKEN: {_p(report.detail)}"
    head = report.head
    head_text = f"head seq={head.seq} hash={head.hash_hex[:16]}…" if head else "empty"
    print(f"verify: {state}; {head_text}", file=out)
    return report.ok


class _CountingExporter:
    """Wraps the OTLP exporter: counts the spans it took and the ones that failed, and keeps
    the exporter's own error messages, so that the demo reports what happened."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.exported = 0
        self.failed = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return str(
            getattr(self.inner, "_endpoint", None)
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        )

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter bug must not stop the demo from reporting it
            self.errors.append(f"{type(exc).__name__}: {exc}")
            result = SpanExportResult.FAILURE
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                self.exported += len(spans)
            else:
                self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))


class _ErrorLog(logging.Handler):
    """Collects the OTLP exporters' warnings (they log the HTTP status or connection error and
    return a bare FAILURE)."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


def _report_otlp(counting: _CountingExporter, out: TextIO) -> bool:
    total = counting.exported + counting.failed
    where = _p(counting.endpoint)
    if counting.failed == 0:
        print(f"\nOTLP: {counting.exported} span(s) exported to {where}", file=out)
        return True
    print(
        f"\nOTLP: FAILED to export {counting.failed} of {total} span(s) to {where} "
        f"({counting.exported} exported)",
        file=out,
    )
    # The first message names the cause (connection refused, HTTP 401 ...); the last one
    # says how the exporter gave up.
    for label, message in zip(
        ("error", "then"), dict.fromkeys(counting.errors[:1] + counting.errors[-1:]), strict=False
    ):
        print(f"      {label}: {_p(message[:500])}", file=out)
    return False


PHOENIX_PORT = 6006
"""Phoenix's default port: its UI and its OTLP/HTTP receiver (``/v1/traces``)."""


def trace_viewer() -> str | None:
    """The trace viewer to point people at: ``COWORKER_TRACE_VIEWER_URL``, else a Phoenix
    that the OTLP endpoint names (an ``http(s)`` endpoint on port 6006), else ``None``."""
    from urllib.parse import urlsplit

    explicit = os.environ.get(config.COWORKER_TRACE_VIEWER_URL, "").strip()
    if explicit:
        return explicit.rstrip("/")
    endpoint = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or ""
    ).strip()
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:  # a malformed endpoint: the exporter reports it, no viewer here
        return None
    if parts.scheme in ("http", "https") and port == PHOENIX_PORT:
        return f"{parts.scheme}://{parts.netloc}"
    return None


def _print_viewer(spans: Sequence[Any], sent: bool, out: TextIO) -> None:
    if not sent:
        print(
            "\nsee it in a trace viewer: `phoenix serve` (pip install arize-phoenix), then "
            f"OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{PHOENIX_PORT} coworker demo "
            "(docs/observability.md)",
            file=out,
        )
        return
    viewer = trace_viewer()
    if viewer is None:
        print(
            f"\nlook at it in your trace viewer (set {config.COWORKER_TRACE_VIEWER_URL} to get "
            "its link here):",
            file=out,
        )
    else:
        print(f"\nlook at it: {_p(viewer)}", file=out)
    flows: dict[str, str] = {}
    for span in spans:
        a = span.attributes
        if attr.FLOW_ID in a:
            flows.setdefault(a[attr.FLOW_ID], a.get(attr.FLOW_TYPE, "?"))
    for flow_id, flow_type in flows.items():
        print(f"  {_p(flow_type)}: search flow.id = {_p(flow_id)}", file=out)


def main(audit_url: str | None = None, audit: bool = True, out: TextIO = sys.stdout) -> int:
    """Run the demo; return the process exit code (non-zero if the audit trail is broken or
    OTLP export was asked for and failed)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from coworker._setup import _otlp_env_set, _otlp_exporter

    memory = InMemorySpanExporter()
    url = None
    if audit:
        url = (
            audit_url
            or os.environ.get(config.COWORKER_AUDIT_URL)
            or ("sqlite:///" + config.DEFAULT_AUDIT_PATH)
        )
    processors: list[Any] = [SimpleSpanProcessor(memory)]
    counting: _CountingExporter | None = None
    exporter_log = logging.getLogger("opentelemetry.exporter.otlp")
    handler: _ErrorLog | None = None
    if _otlp_env_set():
        # The demo owns its OTLP exporter (otlp=False below) so that it can count.
        counting = _CountingExporter(_otlp_exporter())
        handler = _ErrorLog(counting.errors)
        exporter_log.addHandler(handler)
        # An exporter, not a processor: configure() batches it behind the redaction that
        # every exporter gets (the captured input/output go out redacted).
        processors.append(counting)
    coworker.configure(
        os.environ.get("OTEL_SERVICE_NAME") or "coworker-demo",
        exporter=processors,
        audit=url,
        otlp=False,
    )
    ok = True
    try:
        try:
            _gateway_calls["n"] = 0
            with warnings.catch_warnings():
                # An unpriced model is reported in the usage line, not as a Python warning.
                from coworker.pricing import UsageWarning

                warnings.simplefilter("ignore", UsageWarning)
                process_order("ORD-1001")
                assistant_chat()
        finally:
            coworker.force_flush()
        print_tree(memory.get_finished_spans(), out)
        _print_usage(memory.get_finished_spans(), out)
        if counting is not None:
            ok = _report_otlp(counting, out)
        if counting is None or counting.exported:
            _print_viewer(memory.get_finished_spans(), counting is not None, out)
        if url is not None:
            # Read through the store the run wrote to (a memory:// store exists only there).
            from coworker._setup import audit_store

            ok = _print_audit(audit_store(), url, out) and ok
    finally:
        coworker.shutdown()
        if handler is not None:
            exporter_log.removeHandler(handler)
    return 0 if ok else 1


def flows_in(spans: Iterable[Any]) -> set[str]:
    """The flow ids of the spans (used by tests)."""
    return {s.attributes[attr.FLOW_ID] for s in spans if attr.FLOW_ID in s.attributes}
