"""Usage ledger records from spans sent over OTLP to ``coworker audit serve``: real coworker
spans, the SDK's OTLP exporter, a real IngestServer on 127.0.0.1 and a real SQLite store (and the
real PostgreSQL server for the append_unique path)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.deps import require

require("starlette", "the server extra")
require("uvicorn", "the server extra")
httpx = require("httpx", "the dev extra")

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

import coworker  # noqa: E402
from coworker import attributes as a  # noqa: E402
from coworker.audit.record import CATEGORY_INGEST_CONFLICT  # noqa: E402
from coworker.audit.urls import open_store  # noqa: E402
from coworker.audit.usage import report, usage_records  # noqa: E402
from coworker.cli import main  # noqa: E402
from coworker.ingest import IngestServer  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROTOBUF = {"Content-Type": "application/x-protobuf"}
ORDERS = coworker.workflow("ingest-orders", steps=["plan", "write"])


@pytest.fixture(autouse=True)
def _fresh_pricing() -> Iterator[None]:
    """Each test prices with a fresh default pricing."""
    from coworker.pricing import set_pricing

    set_pricing(None)
    yield
    set_pricing(None)


@coworker.run(operation="select", doctype="Prompt")
def _read_call(tokens: int) -> None:
    # A read: its span is not audited, its usage must still reach the ledger.
    coworker.record_usage(
        model="gpt-4o", input_tokens=tokens, output_tokens=tokens // 10, provider="openai"
    )


@coworker.run(operation="create", doctype="Campaign")
def _write_call(tokens: int) -> None:
    # A state change: audited, and it carries usage (and a nested read with its own usage).
    coworker.record_usage(
        model="gpt-4o-mini", input_tokens=tokens, output_tokens=7, cache_read_input_tokens=5
    )
    _read_call(30)


def _records(url: str) -> list[Any]:
    store = open_store(url)
    try:
        return list(store.iter_from(1))
    finally:
        store.close()


def _usage(url: str) -> list[dict[str, Any]]:
    return list(usage_records(_records(url)))


def _export(url: str, spans: Sequence[ReadableSpan]) -> None:
    store = open_store(url)
    try:
        with IngestServer(store, token=TOKEN) as server:
            exporter = OTLPSpanExporter(endpoint=server.endpoint, headers=AUTH, timeout=10)
            assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        store.close()


def _coworker_spans(direct_url: str, spans: Any) -> list[ReadableSpan]:
    """Real coworker spans of a flow with reads and writes, and the direct ledger beside."""
    coworker.configure(audit=direct_url, metrics=False)
    with coworker.acting_as("maria", "agent-7", cost_center="marketing"):
        with ORDERS.start() as flow:
            with flow.step("plan"):
                _read_call(1000)
            with flow.step("write"):
                _write_call(200)
    coworker.shutdown()
    return list(spans.get_finished_spans())


def _totals(url: str, by: str) -> dict[str, Any]:
    total: dict[str, Any] = report(_records(url), by=by).as_json()["total"]
    return total


def test_real_coworker_spans_make_the_usage_records_a_direct_run_makes(
    tmp_path: Path, spans: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs' usage over OTLP = the direct ledger's: tokens, model, cost, identity, cost center."""
    direct, ingested = f"sqlite:///{tmp_path / 'direct.db'}", f"sqlite:///{tmp_path / 'in.db'}"
    finished = _coworker_spans(direct, spans)
    rollups = [s for s in finished if (s.attributes or {}).get(a.SPAN_TYPE)]
    assert rollups and all(a.GEN_AI_USAGE_INPUT_TOKENS in s.attributes for s in rollups)
    _export(ingested, finished)
    got, want = _usage(ingested), _usage(direct)
    assert len(got) == len(want) == 3  # one per run span: flow and step totals not counted
    key = lambda r: (r["span_id"], r["model"])  # noqa: E731
    for g, w in zip(sorted(got, key=key), sorted(want, key=key), strict=True):
        for field in (
            "model", "provider", "input_tokens", "output_tokens", "cache_read_input_tokens",
            "flow_id", "flow_type", "step_id", "user_id", "agent_id", "cost_center",
            "trace_id", "span_id", "run_id", "cost_amount", "cost_currency", "cost_source",
        ):  # fmt: skip
            assert g[field] == w[field], field
        assert g["ingest_token"] == "shared-token"
    assert got[0]["cost_source"] and got[0]["cost_amount"] is not None
    for by in ("flow", "user", "cost-center", "model"):
        assert _totals(ingested, by) == _totals(direct, by)
    assert main(["usage", "report", "--by", "user", "--url", ingested, "--json"]) == 0
    total = json.loads(capsys.readouterr().out)["total"]
    assert (total["records"], total["input_tokens"], total["output_tokens"]) == (3, 1230, 110)
    # The audited write still has its audit record, and nothing reads as a conflict.
    records = [r.fields() for r in _records(ingested)]
    assert [r["doctype"] for r in records if r["kind"] == "outcome"] == ["Campaign"]
    assert not [r for r in records if r["category"] == CATEGORY_INGEST_CONFLICT]


def test_a_redelivered_span_does_not_double_the_usage(tmp_path: Path, spans: Any) -> None:
    """Resent spans (also to a restarted server) add no usage record and no conflict record."""
    url = f"sqlite:///{tmp_path / 'in.db'}"
    finished = _coworker_spans(f"sqlite:///{tmp_path / 'direct.db'}", spans)
    _export(url, finished)
    before = _totals(url, "user")
    for _ in range(2):  # each a fresh server: dedup rebuilt from the log
        _export(url, finished)
    assert _totals(url, "user") == before
    records = [r.fields() for r in _records(url)]
    assert len(records) == 4  # 3 usage + 1 audit record
    assert not [r for r in records if r["category"] == CATEGORY_INGEST_CONFLICT]


def test_a_redelivered_span_does_not_double_the_usage_in_postgres(spans: Any) -> None:
    """PostgreSQL's append_unique: a resend is a duplicate, the usage key no conflict."""
    from tests.pg import PGServer, require_server

    pg = PGServer(require_server())
    try:
        url = pg.schema_url()
        finished = _coworker_spans(pg.schema_url(), spans)
        for _ in range(2):
            _export(url, finished)
        records = [r.fields() for r in _records(url)]
        assert sum(r["kind"] == "usage" for r in records) == 3
        assert not [r for r in records if r["category"] == CATEGORY_INGEST_CONFLICT]
    finally:
        pg.close()


def _raw_spans(*attribute_sets: dict[str, Any]) -> list[ReadableSpan]:
    """Spans of a non-coworker service that uses the GenAI names itself."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({a.SERVICE_NAME: "svc-llm"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests.ingest_usage")
    for i, attributes in enumerate(attribute_sets):
        with tracer.start_as_current_span(f"call-{i}", attributes=attributes):
            pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def _post(server: IngestServer, spans: Sequence[ReadableSpan]) -> ExportTraceServiceResponse:
    body = encode_spans(spans).SerializeToString()
    r = httpx.post(server.endpoint, content=body, headers={**AUTH, **PROTOBUF})
    assert r.status_code == 200
    return ExportTraceServiceResponse.FromString(r.content)


def _call(**extra: Any) -> dict[str, Any]:
    return {
        a.GEN_AI_REQUEST_MODEL: "gpt-4o",
        a.GEN_AI_USAGE_INPUT_TOKENS: 100,
        a.GEN_AI_USAGE_OUTPUT_TOKENS: 10,
        a.USER_ID: "bob",
        **extra,
    }


def test_rollup_spans_are_not_counted(tmp_path: Path) -> None:
    """flow/step/turn spans carry totals of their runs: no usage record of their own."""
    url = f"sqlite:///{tmp_path / 'in.db'}"
    rollups = [_call(**{a.SPAN_TYPE: kind}) for kind in ("flow", "step", "turn")]
    store = open_store(url)
    with IngestServer(store, token=TOKEN) as server:
        response = _post(server, _raw_spans(*rollups, _call(), {"no": "usage"}))
    store.close()
    assert response.partial_success.rejected_spans == 0
    (record,) = _usage(url)
    assert (record["input_tokens"], record["user_id"], record["service"]) == (100, "bob", "svc-llm")


def test_hostile_token_counts_are_refused_with_a_message(tmp_path: Path) -> None:
    """Negative, fractional, huge, bool, text and inconsistent counts: each span refused by
    name with a reason, the good span of the same batch and an audit record kept."""
    url = f"sqlite:///{tmp_path / 'in.db'}"
    hostile = [
        _call(**{a.GEN_AI_USAGE_INPUT_TOKENS: -5}),
        _call(**{a.GEN_AI_USAGE_OUTPUT_TOKENS: 1.5}),
        _call(**{a.GEN_AI_USAGE_INPUT_TOKENS: 2**62}),
        _call(**{a.GEN_AI_USAGE_INPUT_TOKENS: True}),
        _call(**{a.GEN_AI_USAGE_INPUT_TOKENS: "100"}),
        _call(**{a.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: 500}),
        _call(**{a.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: 11}),
        _call(**{a.GEN_AI_REQUEST_MODEL: 42}),
        # audited: the audit record is kept, only the usage is refused
        _call(**{a.GEN_AI_USAGE_OUTPUT_TOKENS: -1, a.AUDITED: True, a.OPERATION: "create"}),
    ]
    store = open_store(url)
    with IngestServer(store, token=TOKEN) as server:
        response = _post(server, _raw_spans(*hostile, _call()))
    store.close()
    assert response.partial_success.rejected_spans == len(hostile)
    message = response.partial_success.error_message
    assert "usage refused" in message and "call-0" in message and "must be in [0, 2**53)" in message
    assert "must be an integer, got 1.5" in message and "exceed the input tokens" in message
    (record,) = _usage(url)
    assert (record["input_tokens"], record["output_tokens"]) == (100, 10)
    outcomes = [r.fields() for r in _records(url) if r.fields()["kind"] == "outcome"]
    assert [r["name"] for r in outcomes] == ["call-8"]


def test_usage_records_come_from_decoding_workers_too(tmp_path: Path) -> None:
    """With decoding in worker processes the usage record and a refusal come back the same."""
    url = f"sqlite:///{tmp_path / 'in.db'}"
    store = open_store(url)
    with IngestServer(store, token=TOKEN, decode_workers=1) as server:
        response = _post(server, _raw_spans(_call(), _call(**{a.GEN_AI_USAGE_INPUT_TOKENS: -1})))
    store.close()
    assert response.partial_success.rejected_spans == 1
    assert "usage refused" in response.partial_success.error_message
    (record,) = _usage(url)
    assert (record["model"], record["input_tokens"], record["user_id"]) == ("gpt-4o", 100, "bob")


@coworker.run(operation="chat", doctype="Prompt")
def _two_models() -> None:
    # A planner on a large model, then the work on a small one (and the large one again).
    coworker.record_usage(model="gpt-4o", input_tokens=1000, output_tokens=100, provider="openai")
    coworker.record_usage(
        model="gpt-4o-mini", input_tokens=20000, output_tokens=3000, provider="openai"
    )
    coworker.record_usage(model="gpt-4o", input_tokens=500, output_tokens=50, provider="openai")


def test_a_run_calling_several_models_is_priced_per_model_by_the_server(
    tmp_path: Path, spans: Any
) -> None:
    """One run, two models: the server makes one usage record per model, each priced by its
    own rates, and its cost equals the direct ledger's (per call) to the last digit."""
    direct, ingested = f"sqlite:///{tmp_path / 'direct.db'}", f"sqlite:///{tmp_path / 'in.db'}"
    coworker.configure(audit=direct, metrics=False)
    with coworker.acting_as("maria"):
        _two_models()
    coworker.shutdown()
    finished = list(spans.get_finished_spans())
    _export(ingested, finished)
    got = {r["model"]: r for r in _usage(ingested)}
    assert sorted(got) == ["gpt-4o", "gpt-4o-mini"]
    assert (got["gpt-4o"]["input_tokens"], got["gpt-4o"]["output_tokens"]) == (1500, 150)
    assert (got["gpt-4o-mini"]["input_tokens"], got["gpt-4o-mini"]["output_tokens"]) == (
        20000,
        3000,
    )
    want = _totals(direct, "model")
    assert _totals(ingested, "model") == {**want, "records": 2}
    # gpt-4o: 1500 x 2.5/M + 150 x 10/M; gpt-4o-mini: 20000 x 0.15/M + 3000 x 0.6/M
    assert want["cost"] == {"USD": "0.01005"}
    assert main(["usage", "report", "--by", "model", "--url", ingested, "--json"]) == 0


def _split_call(**extra: Any) -> dict[str, Any]:
    return _call(
        **{
            a.GEN_AI_USAGE_INPUT_TOKENS: 1100,
            a.GEN_AI_USAGE_OUTPUT_TOKENS: 110,
            a.USAGE_BY_MODEL_MODEL: ("gpt-4o", "gpt-4o-mini"),
            a.USAGE_BY_MODEL_PROVIDER: ("openai", ""),
            a.USAGE_BY_MODEL_COUNTS[0]: (100, 1000),
            a.USAGE_BY_MODEL_COUNTS[1]: (10, 100),
            **extra,
        }
    )


def test_a_per_model_split_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    """Splits longer or shorter than their models, of bad types, beyond the totals or
    inconsistent per model: each usage refused with a reason; a valid split and a partial
    one (the rest priced by gen_ai.request.model) recorded."""
    url = f"sqlite:///{tmp_path / 'in.db'}"
    hostile = [
        _split_call(**{a.USAGE_BY_MODEL_COUNTS[0]: (100,)}),
        _split_call(**{a.USAGE_BY_MODEL_MODEL: ("gpt-4o", 7)}),
        _split_call(**{a.USAGE_BY_MODEL_MODEL: "gpt-4o"}),
        _split_call(**{a.USAGE_BY_MODEL_COUNTS[0]: (100, 5000)}),
        _split_call(**{a.USAGE_BY_MODEL_COUNTS[0]: (100, -1)}),
        _split_call(**{a.USAGE_BY_MODEL_COUNTS[2]: (101, 0)}),
        _split_call(
            **{a.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: 2, a.USAGE_BY_MODEL_COUNTS[0]: (100, 999)}
        ),
    ]
    store = open_store(url)
    with IngestServer(store, token=TOKEN) as server:
        response = _post(
            server,
            _raw_spans(*hostile, _split_call(), _split_call(**{a.GEN_AI_USAGE_INPUT_TOKENS: 1300})),
        )
    store.close()
    assert response.partial_success.rejected_spans == len(hostile)
    message = response.partial_success.error_message
    assert "must be an array as long as" in message and "exceeds the span's totals" in message
    assert "outside the per-model split" in message
    records = sorted(
        ((r["name"], r["model"], r["provider"], r["input_tokens"], r["usage_index"])
         for r in (dict(x, name=x.get("name")) for x in _usage(url))),
        key=lambda t: (str(t[0]), t[4]),
    )  # fmt: skip
    assert [t[1:] for t in records] == [
        ("gpt-4o", "openai", 100, 0),
        ("gpt-4o-mini", None, 1000, 1),
        ("gpt-4o", "openai", 100, 0),
        ("gpt-4o-mini", None, 1000, 1),
        ("gpt-4o", None, 200, 2),  # the 200 input tokens outside the split
    ]
