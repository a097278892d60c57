"""``coworker.extract`` inside a real instrumented web framework.

A FastAPI app with the OpenTelemetry FastAPI instrumentation, served by uvicorn on 127.0.0.1,
called over HTTP by a client that runs coworker and injects its context. The instrumentation's
server span already continues the request's trace: the runs inside ``extract`` must nest under
it, not become its siblings (with a ``traceparent``) or start a trace of their own (without).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind

import coworker
from coworker import attributes as attr
from tests.deps import require

require("uvicorn", "the server extra")
require("fastapi", "the dev extra")
require("opentelemetry.instrumentation.fastapi", "the dev extra")
httpx = require("httpx", "the dev extra")

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: E402


@coworker.run(operation="update", doctype="Order")
async def update_order(order: str) -> str:
    """The service's own audited run, inside the request."""
    return order


def make_app() -> FastAPI:
    """The service: its handlers enter ``coworker.extract`` as the docs tell users to."""
    app = FastAPI()

    @app.get("/orders/{order}")
    async def get_order(order: str, request: Request) -> dict[str, Any]:
        trusted = request.query_params.get("trust") == "1"
        with coworker.extract(request.headers, trust_identity=trusted):
            await update_order(order)
        return {"ok": True}

    @app.post("/messages")
    async def message(request: Request) -> dict[str, Any]:
        # A message whose producer's context travelled in the body, not in the HTTP headers.
        body = await request.json()
        async with coworker.extract(body["headers"]):
            await update_order(body["order"])
        return {"ok": True}

    FastAPIInstrumentor.instrument_app(app, tracer_provider=trace.get_tracer_provider())
    return app


@pytest.fixture
def service(spans: Any) -> Iterator[str]:
    """The instrumented app on a real uvicorn server on loopback; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(make_app(), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "uvicorn started")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``condition`` until it is truthy (a generous bound, never a guess of duration)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for: {what}")


def server_span(spans: Any) -> Any:
    """The instrumentation's SERVER span, once it has ended (after the response is sent)."""
    return wait_for(
        lambda: next((s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER), None),
        "the server span",
    )


def run_span(spans: Any) -> Any:
    (span,) = [s for s in spans.get_finished_spans() if s.name == "update Order"]
    return span


def test_runs_nest_under_the_server_span_that_continues_the_traceparent(
    spans: Any, service: str
) -> None:
    """With a traceparent, the run is a child of the server span (not its sibling); the flow,
    step and the caller's run still come from the baggage."""
    with coworker.flow("api-request", "req-42"), coworker.step("checkout"):
        with coworker.acting_as("alice", "agent-1"), coworker.run("client call") as client:
            headers = coworker.inject({})
            assert httpx.get(f"{service}/orders/o-1", headers=headers).status_code == 200
    server = server_span(spans)
    caller = next(s for s in spans.get_finished_spans() if s.name == "client call")
    run = run_span(spans)
    assert server.parent.span_id == caller.context.span_id, "the instrumentation continued it"
    assert run.context.trace_id == caller.context.trace_id
    assert run.parent.span_id == server.context.span_id
    a = run.attributes
    assert (a[attr.FLOW_ID], a[attr.STEP_ID]) == ("req-42", "checkout")
    assert a[attr.RUN_PARENT_ID] == client.id and a[attr.CHAIN_ID] == client.chain_id
    assert attr.USER_ID not in a, "baggage identity is not trusted by default"


def test_trusted_baggage_identity_is_added_under_the_server_span(spans: Any, service: str) -> None:
    """trust_identity applies the caller's identity; the parent is still the server span."""
    with coworker.acting_as("bob", "agent-2", agent_name="bot"), coworker.run("client call"):
        headers = coworker.inject({})
        assert httpx.get(f"{service}/orders/o-2?trust=1", headers=headers).status_code == 200
    server = server_span(spans)
    run = run_span(spans)
    assert run.parent.span_id == server.context.span_id
    assert run.attributes[attr.USER_ID] == "bob"
    assert run.attributes[attr.AGENT_NAME] == "bot"


def test_without_trace_headers_runs_stay_in_the_request_trace(spans: Any, service: str) -> None:
    """No traceparent, no baggage: the run is a child of the server span, in its trace."""
    assert httpx.get(f"{service}/orders/o-3").status_code == 200
    server = server_span(spans)
    run = run_span(spans)
    assert run.context.trace_id == server.context.trace_id
    assert run.parent is not None and run.parent.span_id == server.context.span_id
    assert attr.RUN_PARENT_ID not in run.attributes


def test_a_carrier_of_another_trace_becomes_a_link_of_the_server_span(
    spans: Any, service: str
) -> None:
    """Headers naming another trace than the current server span's: the local span stays the
    parent, the carrier's span becomes a link of it, and the flow still continues."""
    with coworker.flow("batch-job", "job-9"), coworker.run("producer") as producer:
        carried = coworker.inject({})
    producer_span = next(s for s in spans.get_finished_spans() if s.name == "producer")
    answer = httpx.post(f"{service}/messages", json={"headers": carried, "order": "o-4"})
    assert answer.status_code == 200
    server = server_span(spans)
    run = run_span(spans)
    assert server.context.trace_id != producer_span.context.trace_id
    assert run.parent.span_id == server.context.span_id
    assert run.context.trace_id == server.context.trace_id
    assert [link.context.span_id for link in server.links] == [producer_span.context.span_id]
    assert run.attributes[attr.FLOW_ID] == "job-9"
    assert run.attributes[attr.RUN_PARENT_ID] == producer.id
