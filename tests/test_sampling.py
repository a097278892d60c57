"""The audit trail ignores the trace sampler; the operational trail stays sampled.

Each case runs in a fresh interpreter: a process has one global tracer provider, and the
sampler is the provider's. The samplers are the SDK's own; the exporters are real
``InMemorySpanExporter`` objects behind the SDK's ``SimpleSpanProcessor``. Exact expectations
come from the samplers' documented decisions (``ALWAYS_OFF``; ``TraceIdRatioBased`` samples a
trace id iff its low 64 bits are below ``ratio * 2**64``; ``ParentBased`` follows the parent's
sampled flag), never from statistics.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

# The application: 100 audited updates, then a JSON report of the store and the exporter.
_APP = """
import json, sys
import coworker
from coworker import _setup

@coworker.run(operation="update", doctype="Invoice")
def update(i):
    return i

def report(exported, **extra):
    coworker.force_flush()
    store = _setup.audit_store()
    bodies = [json.loads(r.body) for r in store.iter_from(1)]
    out = {
        "records": [
            {k: b.get(k) for k in ("kind", "trace_id", "span_id", "parent_span_id", "category",
                                   "user_id", "outcome")}
            for b in bodies
        ],
        "exported": [format(s.context.trace_id, "032x") for s in exported.get_finished_spans()],
        "exported_sampled": [s.context.trace_flags.sampled for s in exported.get_finished_spans()],
    }
    out.update(extra)
    print(json.dumps(out))
"""


def _run(code: str, tmp_path: Path, **env: str) -> dict[str, Any]:
    """Run the app plus ``code`` in a fresh interpreter; return its JSON report."""
    script = _APP + textwrap.dedent(code).replace("DB", repr(f"sqlite:///{tmp_path}/audit.db"))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _ratio_samples(trace_id: str, ratio: float) -> bool:
    """``TraceIdRatioBased(ratio)``'s decision for a trace id (its documented rule)."""
    return (int(trace_id, 16) & (2**64 - 1)) < round(ratio * 2**64)


def _outcomes(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report["records"] if r["kind"] == "outcome"]


_OWN_PROVIDER = """
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exported = InMemorySpanExporter()
coworker.configure("svc", audit=DB, exporter=SimpleSpanProcessor(exported), metrics=False)
for i in range(100):
    update(i)
report(exported)
"""


def test_always_off_env_sampler_keeps_every_record(tmp_path: Path) -> None:
    """OTEL_TRACES_SAMPLER=always_off: 100 calls, 100 records with trace ids, 0 exported."""
    report = _run(_OWN_PROVIDER, tmp_path, OTEL_TRACES_SAMPLER="always_off")
    outcomes = _outcomes(report)
    assert len(outcomes) == 100
    trace_ids = {r["trace_id"] for r in outcomes}
    assert len(trace_ids) == 100 and all(t and len(t) == 32 and int(t, 16) for t in trace_ids)
    assert report["exported"] == []


def test_traceidratio_env_sampler_exports_exactly_the_sampled(tmp_path: Path) -> None:
    """traceidratio 0.1 from the env: every record kept; the exporter gets exactly the
    traces the ratio sampler selects, all of them flagged sampled."""
    report = _run(
        _OWN_PROVIDER, tmp_path, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0.1"
    )
    outcomes = _outcomes(report)
    assert len(outcomes) == 100
    expected = sorted(r["trace_id"] for r in outcomes if _ratio_samples(r["trace_id"], 0.1))
    assert sorted(report["exported"]) == expected
    assert all(report["exported_sampled"])
    assert len(expected) < 100  # the sampler did drop some: the test is not vacuous


_APP_PROVIDER = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
exported = InMemorySpanExporter()
provider = TracerProvider(sampler=SAMPLER)
provider.add_span_processor(SimpleSpanProcessor(exported))
trace.set_tracer_provider(provider)
coworker.configure(audit=DB, metrics=False)
for i in range(100):
    update(i)
report(exported)
"""


@pytest.mark.parametrize(
    ("sampler", "ratio"),
    [
        ("ALWAYS_OFF", 0.0),
        ("TraceIdRatioBased(0.1)", 0.1),
        ("ParentBased(TraceIdRatioBased(0.1))", 0.1),
    ],
)
def test_application_provider_sampler_keeps_every_record(
    tmp_path: Path, sampler: str, ratio: float
) -> None:
    """An application-owned TracerProvider(sampler=...): every record; its own exporter
    sees exactly what its sampler selects."""
    report = _run(_APP_PROVIDER.replace("SAMPLER", sampler), tmp_path)
    outcomes = _outcomes(report)
    assert len(outcomes) == 100
    expected = sorted(r["trace_id"] for r in outcomes if _ratio_samples(r["trace_id"], ratio))
    assert sorted(report["exported"]) == expected


def test_sampled_out_remote_parent_record_names_its_trace(tmp_path: Path) -> None:
    """ParentBased: under a remote parent with the sampled flag off, the record carries the
    parent's trace and span id and nothing is exported; under a sampled parent it is."""
    code = """
    from opentelemetry import trace, context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exported))
    trace.set_tracer_provider(provider)
    coworker.configure(audit=DB, metrics=False)
    for flags, tid in ((TraceFlags.DEFAULT, 0xAB), (TraceFlags.SAMPLED, 0xCD)):
        remote = SpanContext(tid, 0x1234, is_remote=True, trace_flags=TraceFlags(flags))
        token = context.attach(trace.set_span_in_context(NonRecordingSpan(remote)))
        try:
            update(tid)
        finally:
            context.detach(token)
    report(exported)
    """
    report = _run(code, tmp_path)
    outcomes = _outcomes(report)
    assert [(r["trace_id"], r["parent_span_id"]) for r in outcomes] == [
        (f"{0xAB:032x}", f"{0x1234:016x}"),
        (f"{0xCD:032x}", f"{0x1234:016x}"),
    ]
    assert report["exported"] == [f"{0xCD:032x}"]


def test_fail_closed_under_always_off_runs_and_records(tmp_path: Path) -> None:
    """fail_closed with ALWAYS_OFF: every call runs, with an intent and an outcome record."""
    code = """
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exported = InMemorySpanExporter()
    coworker.configure(audit=DB, fail_closed=True, exporter=SimpleSpanProcessor(exported),
                       metrics=False)
    results = [update(i) for i in range(100)]
    report(exported, results=results)
    """
    report = _run(code, tmp_path, OTEL_TRACES_SAMPLER="always_off")
    assert report["results"] == list(range(100))
    kinds = [r["kind"] for r in report["records"]]
    assert kinds.count("intent") == 100 and kinds.count("outcome") == 100
    assert report["exported"] == []


def test_denials_and_validation_failures_recorded_under_always_off(tmp_path: Path) -> None:
    """Runs that become audited only at their end (a policy denial, a ValidationError in a
    read) are recorded under ALWAYS_OFF too; so is an audited child of a sampled-out read."""
    code = """
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exported = InMemorySpanExporter()
    coworker.configure(audit=DB, exporter=SimpleSpanProcessor(exported), metrics=False,
                       policy={"roles": {"clerk": {"Invoice": ["update", "select"]}},
                               "users": {"alice": ["clerk"]}})

    @coworker.run(operation="select", doctype="Invoice")
    def read(fail):
        if fail:
            raise coworker.ValidationError("bad filter")
        return update(1)

    with coworker.acting_as("alice"):
        read(False)
        try:
            read(True)
        except coworker.ValidationError:
            pass
    with coworker.acting_as("mallory"):
        try:
            update(2)
        except coworker.PermissionDenied:
            pass
    report(exported)
    """
    report = _run(code, tmp_path, OTEL_TRACES_SAMPLER="always_off")
    got = [(r["category"], r["user_id"]) for r in _outcomes(report)]
    assert got == [
        ("state-change", "alice"),
        ("validation-violation", "alice"),
        ("authorization-failure", "mallory"),
    ]
    child = _outcomes(report)[0]
    assert child["parent_span_id"] is not None  # the sampled-out read is still its parent
    assert report["exported"] == []


_WORKFLOWS = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
exported = InMemorySpanExporter()
provider = TracerProvider(sampler=SAMPLER)
provider.add_span_processor(SimpleSpanProcessor(exported))
trace.set_tracer_provider(provider)
coworker.configure(audit=DB, metrics=False)
orders = coworker.workflow("orders", steps=["a", "b"])
flows = []
recording = []
for i in range(40):
    with orders.start() as f:
        flows.append(f.id)
        recording.append(trace.get_current_span().is_recording())
        with f.step("a"):
            update(i)
        with f.step("b"):
            update(i)
roots = [s for s in exported.get_finished_spans() if s.name == "invoke_workflow orders"]
report(
    exported,
    roots=[format(s.context.trace_id, "032x") for s in roots],
    recording=recording,
    per_trace={
        format(t, "032x"): sorted(s.name for s in exported.get_finished_spans()
                                  if s.context.trace_id == t)
        for t in {s.context.trace_id for s in exported.get_finished_spans()}
    },
)
"""


@pytest.mark.parametrize(
    ("sampler", "ratio"),
    [("ALWAYS_OFF", 0.0), ("ParentBased(TraceIdRatioBased(0.5))", 0.5)],
)
def test_sampled_out_flow_span_keeps_its_runs_records(
    tmp_path: Path, sampler: str, ratio: float
) -> None:
    """A workflow whose flow span the application's sampler drops: every audited run of it
    keeps its record, naming the flow's trace; the exporter gets exactly the sampled
    workflows, each as a whole trace (flow, steps, runs), and no flow span is a record."""
    report = _run(_WORKFLOWS.replace("SAMPLER", sampler), tmp_path)
    outcomes = _outcomes(report)
    runs = [r for r in outcomes if r["category"] != "flow"]
    assert len(runs) == 80 and all(r["category"] == "state-change" for r in runs)
    trace_ids = [r["trace_id"] for r in runs]
    assert len(set(trace_ids)) == 40  # one trace per workflow, both runs in it
    assert all(r["parent_span_id"] for r in runs)  # under their (dropped) step spans
    expected = sorted({t for t in trace_ids if _ratio_samples(t, ratio)})
    assert sorted(report["roots"]) == expected
    for t in expected:
        assert report["per_trace"][t] == [
            "invoke_workflow orders",
            "step a",
            "step b",
            "update Invoice",
            "update Invoice",
        ]
    assert sorted(report["per_trace"]) == expected
    # The sampler's decision stands for the flow span (it is no audit record): a dropped one
    # is not even recorded, while its runs are (RECORD_ONLY).
    assert report["recording"].count(True) == len(expected)
    if ratio:
        assert 0 < len(expected) < 40  # the sampler did choose: the test is not vacuous
