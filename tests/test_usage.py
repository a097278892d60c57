"""record_usage and @coworker.run(usage=...): the GenAI span attributes, validation at the
boundary, the OpenAI/Anthropic extractors (look-alikes and the SDKs' real classes), metrics."""

from __future__ import annotations

import asyncio
import math
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import coworker
from coworker import attributes as a
from coworker.pricing import TokenCounts
from coworker.usage import (
    Usage,
    UsageWarning,
    _metrics,
    anthropic_usage,
    auto_usage,
    openai_usage,
)
from tests.deps import require


def _chat_completion(**usage: Any) -> Any:
    """A look-alike of openai.types.chat.ChatCompletion (documented field names)."""
    return SimpleNamespace(
        id="chatcmpl-1",
        object="chat.completion",
        model="gpt-4o",
        usage=SimpleNamespace(
            prompt_tokens=usage.get("prompt", 1000),
            completion_tokens=usage.get("completion", 300),
            total_tokens=1300,
            prompt_tokens_details=SimpleNamespace(cached_tokens=usage.get("cached", 400)),
            completion_tokens_details=SimpleNamespace(reasoning_tokens=usage.get("reasoning", 100)),
        ),
    )


def _anthropic_message() -> Any:
    """A look-alike of anthropic.types.Message."""
    return SimpleNamespace(
        type="message",
        model="claude-3-5-sonnet-latest",
        usage=SimpleNamespace(
            input_tokens=50, output_tokens=20, cache_creation_input_tokens=30,
            cache_read_input_tokens=200,
        ),
    )  # fmt: skip


def test_record_usage_sets_semconv_totals_on_the_run_span(spans: Any) -> None:
    """Two calls in a run add up to gen_ai.usage.* totals, with model, provider and cost."""
    coworker.configure(metrics=False)
    with coworker.run("turn"):
        c1 = coworker.record_usage(
            model="gpt-4o", input_tokens=1000, output_tokens=200, cache_read_input_tokens=500,
            provider="openai",
        )  # fmt: skip
        c2 = coworker.record_usage(model="gpt-4o", input_tokens=10, output_tokens=5)
    (span,) = spans.get_finished_spans()
    at = span.attributes
    assert at[a.GEN_AI_USAGE_INPUT_TOKENS] == 1010
    assert at[a.GEN_AI_USAGE_OUTPUT_TOKENS] == 205
    assert at[a.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 500
    assert at[a.GEN_AI_REQUEST_MODEL] == "gpt-4o"
    assert at[a.GEN_AI_PROVIDER_NAME] == "openai"
    assert c1 is not None and c2 is not None
    assert math.isclose(at[a.GEN_AI_USAGE_COST_AMOUNT], float(c1.amount + c2.amount))
    assert at[a.GEN_AI_USAGE_COST_CURRENCY] == "USD"
    assert at[a.GEN_AI_USAGE_COST_SOURCE].startswith("genai-prices ")
    assert "gen_ai.usage.cost" not in at
    assert span.events == ()  # per-call detail is in the usage ledger, not in span events


def test_unknown_model_has_tokens_but_no_cost(spans: Any) -> None:
    """An unpriced model: tokens on the span, no cost attribute (null, never 0), a warning."""
    coworker.configure(metrics=False)
    with coworker.run("turn"), pytest.warns(UsageWarning, match="null"):
        assert coworker.record_usage(model="in-house-7b", input_tokens=5, output_tokens=1) is None
    (span,) = spans.get_finished_spans()
    assert span.attributes[a.GEN_AI_USAGE_INPUT_TOKENS] == 5
    assert a.GEN_AI_USAGE_COST_AMOUNT not in span.attributes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_tokens": -1}, "input_tokens"),
        ({"input_tokens": float("nan")}, "input_tokens"),
        ({"input_tokens": True}, "input_tokens"),
        ({"output_tokens": 1.5}, "output_tokens"),
        ({"output_tokens": "7"}, "output_tokens"),
        ({"input_tokens": 2**53}, "input_tokens"),
        ({"cache_read_input_tokens": -3}, "cache_read"),
        ({"reasoning_tokens": False}, "reasoning"),
        ({"model": ""}, "model"),
        ({"model": None}, "model"),
        ({"cache_read_input_tokens": 11}, "exceed input_tokens"),
        ({"reasoning_tokens": 6}, "exceed output_tokens"),
    ],
)
def test_bad_usage_is_refused_at_the_boundary(
    spans: Any, kwargs: dict[str, Any], match: str
) -> None:
    """Negative, NaN, bool, fractional, huge or inconsistent counts raise ValueError."""
    coworker.configure(metrics=False)
    args: dict[str, Any] = {"model": "gpt-4o", "input_tokens": 10, "output_tokens": 5, **kwargs}
    with coworker.run("turn"), pytest.raises(ValueError, match=match):
        coworker.record_usage(**args)
    (span,) = spans.get_finished_spans()
    assert a.GEN_AI_USAGE_INPUT_TOKENS not in span.attributes  # nothing half-recorded


def test_outside_a_run_warns_and_records_nothing(spans: Any) -> None:
    """Outside a run: the documented no-op for the trail, with a UsageWarning."""
    coworker.configure(metrics=False)
    with pytest.warns(UsageWarning, match="outside a recorded coworker run"):
        cost = coworker.record_usage(model="gpt-4o", input_tokens=10, output_tokens=5)
    assert cost is not None
    assert spans.get_finished_spans() == ()


def test_openai_chat_completions_look_alike() -> None:
    """prompt/completion tokens and their details map to the semconv counts."""
    assert openai_usage(_chat_completion()) == Usage(
        model="gpt-4o", input_tokens=1000, output_tokens=300, cache_read_input_tokens=400,
        reasoning_tokens=100, provider="openai",
    )  # fmt: skip


def test_openai_responses_api_look_alike_and_dict() -> None:
    """The Responses API names (input_tokens, *_details) work, as attributes or dict keys."""
    body = {
        "object": "response",
        "model": "o3-mini",
        "usage": {
            "input_tokens": 80,
            "output_tokens": 40,
            "total_tokens": 120,
            "input_tokens_details": {"cached_tokens": 16},
            "output_tokens_details": {"reasoning_tokens": 32},
        },
    }
    assert openai_usage(body) == Usage("o3-mini", 80, 40, None, 16, 32, "openai")
    assert auto_usage(body) == openai_usage(body)


def test_anthropic_input_tokens_include_the_cache() -> None:
    """Anthropic reports cached tokens apart; the semconv input_tokens includes them."""
    u = anthropic_usage(_anthropic_message())
    assert u == Usage("claude-3-5-sonnet-latest", 280, 20, 30, 200, None, "anthropic")
    assert auto_usage(_anthropic_message()) == u


def test_no_usage_in_the_response_gives_none() -> None:
    """A response without usage (streaming chunk, error body) extracts to None."""
    assert openai_usage(SimpleNamespace(model="gpt-4o", usage=None)) is None
    assert anthropic_usage({"model": "claude"}) is None
    assert auto_usage(object()) is None


def test_real_openai_sdk_classes() -> None:
    """The OpenAI SDK's own pydantic models, built locally (no network)."""
    openai_types = require("openai.types", "the dev extra")
    from openai.types.chat import ChatCompletion
    from openai.types.completion_usage import (
        CompletionTokensDetails,
        CompletionUsage,
        PromptTokensDetails,
    )
    from openai.types.responses import Response
    from openai.types.responses.response_usage import (
        InputTokensDetails,
        OutputTokensDetails,
        ResponseUsage,
    )

    assert openai_types is not None
    chat = ChatCompletion(
        id="c1", object="chat.completion", created=0, model="gpt-4o", choices=[],
        usage=CompletionUsage(
            prompt_tokens=120, completion_tokens=30, total_tokens=150,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=64),
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=10),
        ),
    )  # fmt: skip
    assert openai_usage(chat) == Usage("gpt-4o", 120, 30, None, 64, 10, "openai")
    resp = Response.model_construct(
        id="r1", object="response", model="o3-mini",
        usage=ResponseUsage(
            input_tokens=90, output_tokens=45, total_tokens=135,
            input_tokens_details=InputTokensDetails(cached_tokens=9, cache_write_tokens=3),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=40),
        ),
    )  # fmt: skip
    assert openai_usage(resp) == Usage("o3-mini", 90, 45, 3, 9, 40, "openai")
    assert auto_usage(resp) == openai_usage(resp)


def test_real_anthropic_sdk_message() -> None:
    """The Anthropic SDK's own Message model, built locally."""
    require("anthropic", "the dev extra")
    from anthropic.types import Message
    from anthropic.types import Usage as AUsage

    msg = Message(
        id="m1", type="message", role="assistant", content=[], model="claude-3-5-sonnet-latest",
        stop_reason="end_turn", stop_sequence=None,
        usage=AUsage(
            input_tokens=10, output_tokens=5, cache_creation_input_tokens=None,
            cache_read_input_tokens=100,
        ),
    )  # fmt: skip
    assert anthropic_usage(msg) == Usage(
        "claude-3-5-sonnet-latest", 110, 5, None, 100, None, "anthropic"
    )
    assert auto_usage(msg) == anthropic_usage(msg)


@coworker.run(operation="chat", usage=openai_usage)
def _ask(question: str) -> Any:
    return _chat_completion(prompt=len(question), cached=0, reasoning=0)


def test_run_usage_extractor_records_inside_the_run(spans: Any) -> None:
    """@run(usage=...) records from the return value on the run's own span; the value and
    the function's identity are untouched."""
    coworker.configure(metrics=False)
    result = _ask("four")
    assert result.usage.prompt_tokens == 4
    (span,) = spans.get_finished_spans()
    assert span.name == "_ask"
    assert span.attributes[a.GEN_AI_USAGE_INPUT_TOKENS] == 4
    assert span.attributes[a.CODE_FUNCTION].endswith("test_usage._ask")
    assert _ask.__name__ == "_ask"


def test_run_usage_extractor_async_and_methods(spans: Any) -> None:
    """Coroutines and methods get their usage recorded too."""
    coworker.configure(metrics=False)

    class Bot:
        @coworker.run(usage=anthropic_usage)
        def reply(self) -> Any:
            return _anthropic_message()

        @coworker.run(usage=auto_usage)
        async def areply(self) -> Any:
            return _anthropic_message()

    Bot().reply()
    asyncio.run(Bot().areply())
    got = [s.attributes[a.GEN_AI_USAGE_INPUT_TOKENS] for s in spans.get_finished_spans()]
    assert got == [280, 280]


def test_a_failing_extractor_never_fails_the_call(spans: Any) -> None:
    """The body ran (its side effects happened): the call returns, the failure is warned."""
    coworker.configure(metrics=False)

    def broken(result: Any) -> Any:
        return {"model": "gpt-4o", "input_tokens": -5, "output_tokens": 1}

    @coworker.run(usage=broken)
    def work() -> int:
        return 7

    with pytest.warns(UsageWarning, match="extractor 'broken' failed"):
        assert work() == 7
    (span,) = spans.get_finished_spans()
    assert a.GEN_AI_USAGE_INPUT_TOKENS not in span.attributes


def test_usage_option_refuses_generators_and_with_blocks() -> None:
    """No single return value: a clear TypeError, at decoration or entry."""
    with pytest.raises(TypeError, match="generators"):

        @coworker.run(usage=openai_usage)
        def gen() -> Any:
            yield 1

    with pytest.raises(TypeError, match="record_usage"), coworker.run("x", usage=openai_usage):
        pass


def test_token_and_cost_metrics() -> None:
    """gen_ai.client.token.usage per token type and the cost counter, with the dimensions."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    from decimal import Decimal

    from coworker.identity import Agent, Identity, User
    from coworker.pricing import Cost

    ident = Identity(User("u1"), Agent("a1"))
    cost = Cost(Decimal("0.25"), "USD", "test")
    _metrics("gpt-4o", "openai", TokenCounts(100, 7), cost, ident, "sales", "ai-conversation",
             meter_provider=provider)  # fmt: skip
    data = reader.get_metrics_data()
    metrics = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    tokens = metrics[a.METRIC_GEN_AI_TOKEN_USAGE]
    by_type = {p.attributes[a.GEN_AI_TOKEN_TYPE]: p.sum for p in tokens.data.data_points}
    assert by_type == {"input": 100, "output": 7}
    point = next(iter(tokens.data.data_points))
    for key in (a.USER_ID, a.AGENT_ID, a.COST_CENTER, a.FLOW_TYPE, a.GEN_AI_REQUEST_MODEL):
        assert key in point.attributes
    (c,) = metrics[a.METRIC_USAGE_COST].data.data_points
    assert c.value == 0.25 and c.attributes[a.GEN_AI_USAGE_COST_CURRENCY] == "USD"
    provider.shutdown()


def test_import_coworker_stays_light() -> None:
    """record_usage is lazy: decimal pricing is not imported by ``import coworker``."""
    import subprocess
    import sys

    code = "import sys, coworker; print('coworker.pricing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert callable(coworker.record_usage)


def test_reasoning_and_cache_creation_totals(spans: Any) -> None:
    """Reasoning and cache-creation counts land on their semconv attributes."""
    coworker.configure(metrics=False)
    with coworker.run("turn"):
        coworker.record_usage(
            model="o3-mini",
            input_tokens=100,
            output_tokens=50,
            cache_creation_input_tokens=40,
            reasoning_tokens=30,
        )
    (span,) = spans.get_finished_spans()
    assert span.attributes[a.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == 30
    assert span.attributes[a.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] == 40
    assert a.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS not in span.attributes


def test_usage_attributes_fast_path_keeps_the_sdks_limits_and_ended_spans() -> None:
    """Usage totals written past the SDK's value cleaning end up exactly as set_attributes
    would leave them: the attribute count limit drops the oldest, an ended span is left."""
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider

    from coworker.usage import _put_attributes

    tracer = TracerProvider(span_limits=SpanLimits(max_span_attributes=3)).get_tracer("t")
    values = {"b": 2, "c": "x", "d": 1.5}
    fast, slow = tracer.start_span("fast", attributes={"a": 1}), tracer.start_span("slow")
    slow.set_attribute("a", 1)
    _put_attributes(fast, values)
    slow.set_attributes(values)
    assert dict(fast.attributes) == dict(slow.attributes) == values  # type: ignore[attr-defined]
    assert fast.dropped_attributes == slow.dropped_attributes == 1  # type: ignore[attr-defined]
    roomy = tracer.start_span("roomy")
    _put_attributes(roomy, {"k": 1})
    roomy.end()
    _put_attributes(roomy, {"late": 1})
    assert dict(roomy.attributes) == {"k": 1}  # type: ignore[attr-defined]


def test_a_run_calling_several_models_carries_the_per_model_split(spans: Any) -> None:
    """Totals as the GenAI conventions shape them (first model in gen_ai.request.model),
    plus coworker.usage.by_model.* arrays: each (model, provider) with its own counts; the
    cost on the span is each call priced by its own model."""
    coworker.configure(metrics=False)
    with coworker.run("agent"):
        big = coworker.record_usage(
            model="gpt-4o", input_tokens=1000, output_tokens=100, cache_read_input_tokens=200,
            provider="openai",
        )  # fmt: skip
        small = coworker.record_usage(model="gpt-4o-mini", input_tokens=20000, output_tokens=3000)
        again = coworker.record_usage(
            model="gpt-4o", input_tokens=500, output_tokens=50, provider="openai"
        )
    (span,) = spans.get_finished_spans()
    at = span.attributes
    assert at[a.GEN_AI_REQUEST_MODEL] == "gpt-4o" and at[a.GEN_AI_PROVIDER_NAME] == "openai"
    assert (at[a.GEN_AI_USAGE_INPUT_TOKENS], at[a.GEN_AI_USAGE_OUTPUT_TOKENS]) == (21500, 3150)
    assert at[a.USAGE_BY_MODEL_MODEL] == ("gpt-4o", "gpt-4o-mini")
    assert at[a.USAGE_BY_MODEL_PROVIDER] == ("openai", "")
    split = [at[name] for name in a.USAGE_BY_MODEL_COUNTS]
    assert split == [(1500, 20000), (150, 3000), (200, 0), (0, 0), (0, 0)]
    assert big is not None and small is not None and again is not None
    assert small.amount != big.amount  # each call at its own model's rates
    assert math.isclose(
        at[a.GEN_AI_USAGE_COST_AMOUNT], float(big.amount + small.amount + again.amount)
    )


def test_one_model_leaves_no_split_on_the_span(spans: Any) -> None:
    """The split is only for runs with several models: one model's span is as before."""
    coworker.configure(metrics=False)
    with coworker.run("chat"):
        coworker.record_usage(model="gpt-4o", input_tokens=10, output_tokens=1)
        coworker.record_usage(model="gpt-4o", input_tokens=10, output_tokens=1)
    (span,) = spans.get_finished_spans()
    assert not [k for k in span.attributes if k.startswith("coworker.usage.by_model")]
    assert span.attributes[a.GEN_AI_USAGE_INPUT_TOKENS] == 20


def test_usage_from_a_thread_racing_the_run_end_is_never_lost(spans: Any) -> None:
    """Threads recording into a run while it ends: every call is either on the span or
    warned about as outside a recorded run, never both, never neither."""
    import contextvars
    import threading

    coworker.configure(metrics=False)
    for _ in range(20):
        started = threading.Event()
        done: list[int] = []
        warned: list[int] = []

        def worker(started: threading.Event, done: list[int], warned: list[int]) -> None:
            started.set()
            for _ in range(200):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    coworker.record_usage(model="gpt-4o", input_tokens=1, output_tokens=0)
                (warned if caught else done).append(1)

        with coworker.run("racing"):
            ctx = contextvars.copy_context()
            t = threading.Thread(target=ctx.run, args=(worker, started, done, warned))
            t.start()
            started.wait(10)
        t.join(30)
        span = spans.get_finished_spans()[-1]
        assert span.attributes.get(a.GEN_AI_USAGE_INPUT_TOKENS, 0) == len(done)
        assert len(done) + len(warned) == 200
