"""Tests for coworker.metrics: run, audit-append and spool-depth metrics via a real SDK."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode

from coworker import attributes as a
from coworker.metrics import (
    OUTCOME_OK,
    RunMetricsProcessor,
    audit_append,
    register_spool_depth,
    unregister_spool_depth,
)


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


@pytest.fixture
def tracer_provider(meter_provider: MeterProvider) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(RunMetricsProcessor(meter_provider=meter_provider))  # type: ignore[arg-type]
    yield provider
    provider.shutdown()


def _metrics(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Collect and index metrics by name."""
    data = reader.get_metrics_data()
    found: dict[str, Any] = {}
    if data is None:
        return found
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "coworker"
            for metric in scope_metrics.metrics:
                found[metric.name] = metric
    return found


def _points(metric: Any) -> dict[frozenset[tuple[str, Any]], Any]:
    return {frozenset(p.attributes.items()): p for p in metric.data.data_points}


def test_run_span_counts_and_times_with_ok_outcome(
    tracer_provider: TracerProvider, reader: InMemoryMetricReader
) -> None:
    """A finished run adds one to coworker.runs and records its duration in seconds."""
    tracer = tracer_provider.get_tracer("t")
    span = tracer.start_span(
        "create Invoice",
        attributes={
            a.RUN_ID: "r1",
            a.FLOW_TYPE: "workflow",
            a.OPERATION: "create",
            a.DOCTYPE: "Invoice",
            a.USER_ID: "alice",
        },
        start_time=1_000_000_000,
    )
    span.end(end_time=1_250_000_000)

    metrics = _metrics(reader)
    expected = frozenset(
        {(a.FLOW_TYPE, "workflow"), (a.OPERATION, "create"), (a.METRIC_ATTR_OUTCOME, OUTCOME_OK)}
    )
    runs = metrics[a.METRIC_RUNS]
    assert runs.unit == "{run}"
    assert runs.data.is_monotonic
    assert _points(runs)[expected].value == 1
    duration = metrics[a.METRIC_RUN_DURATION]
    assert duration.unit == "s"
    point = _points(duration)[expected]
    assert point.count == 1
    assert point.sum == pytest.approx(0.25)


def test_failed_run_outcome_is_error_type(
    tracer_provider: TracerProvider, reader: InMemoryMetricReader
) -> None:
    """A run with error.type is counted under outcome=<error.type>, apart from the ok ones."""
    tracer = tracer_provider.get_tracer("t")
    for error_type in ("PermissionDenied", None, "PermissionDenied"):
        with tracer.start_as_current_span(
            "submit Invoice", attributes={a.RUN_ID: "r", a.OPERATION: "submit"}
        ) as span:
            if error_type:
                span.set_attribute(a.ERROR_TYPE, error_type)
                span.set_status(Status(StatusCode.ERROR))

    points = _points(_metrics(reader)[a.METRIC_RUNS])
    denied = frozenset({(a.OPERATION, "submit"), (a.METRIC_ATTR_OUTCOME, "PermissionDenied")})
    ok = frozenset({(a.OPERATION, "submit"), (a.METRIC_ATTR_OUTCOME, OUTCOME_OK)})
    assert points[denied].value == 2
    assert points[ok].value == 1


def test_error_status_without_error_type_is_other(
    tracer_provider: TracerProvider, reader: InMemoryMetricReader
) -> None:
    """An error span that names no error.type uses the semconv fallback _OTHER."""
    with tracer_provider.get_tracer("t").start_as_current_span(
        "x", attributes={a.RUN_ID: "r"}, record_exception=False, set_status_on_exception=False
    ) as span:
        span.set_status(Status(StatusCode.ERROR))

    points = _points(_metrics(reader)[a.METRIC_RUNS])
    assert points[frozenset({(a.METRIC_ATTR_OUTCOME, "_OTHER")})].value == 1


def test_spans_without_run_id_are_ignored(
    tracer_provider: TracerProvider, reader: InMemoryMetricReader
) -> None:
    """Spans that are not coworker runs (HTTP, DB, ...) produce no run metrics."""
    tracer = tracer_provider.get_tracer("t")
    with tracer.start_as_current_span("GET /", attributes={a.OPERATION: "read"}):
        pass
    with tracer.start_as_current_span("bare"):
        pass

    assert a.METRIC_RUNS not in _metrics(reader)


def test_processor_is_a_well_behaved_span_processor() -> None:
    """force_flush succeeds, shutdown is harmless and a broken span does not raise."""
    processor = RunMetricsProcessor(meter_provider=MeterProvider())
    assert processor.force_flush() is True
    processor.on_end(object())  # type: ignore[arg-type]
    processor.shutdown()


def test_audit_append_records_count_and_latency(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """audit_append adds to coworker.audit.appends and its latency histogram, by category."""
    audit_append(a.CATEGORY_STATE_CHANGE, OUTCOME_OK, 0.002, meter_provider=meter_provider)
    audit_append(a.CATEGORY_STATE_CHANGE, OUTCOME_OK, 0.004, meter_provider=meter_provider)
    audit_append(
        a.CATEGORY_AUTHORIZATION_FAILURE, "AuditUnavailable", 1.5, meter_provider=meter_provider
    )

    metrics = _metrics(reader)
    ok = frozenset({(a.AUDIT_CATEGORY, a.CATEGORY_STATE_CHANGE), (a.METRIC_ATTR_OUTCOME, "ok")})
    failed = frozenset(
        {
            (a.AUDIT_CATEGORY, a.CATEGORY_AUTHORIZATION_FAILURE),
            (a.METRIC_ATTR_OUTCOME, "AuditUnavailable"),
        }
    )
    appends = _points(metrics[a.METRIC_AUDIT_APPENDS])
    assert appends[ok].value == 2
    assert appends[failed].value == 1
    duration = metrics[a.METRIC_AUDIT_APPEND_DURATION]
    assert duration.unit == "s"
    assert _points(duration)[ok].sum == pytest.approx(0.006)


def test_spool_depth_gauge_reads_callbacks_until_unregistered(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Each registered callback is observed at collection; a failing one is skipped."""
    depth = [3]

    def spool_a() -> int:
        return depth[0]

    def broken() -> int:
        raise RuntimeError("store closed")

    register_spool_depth(spool_a, attributes={"spool": "a"}, meter_provider=meter_provider)
    register_spool_depth(broken, attributes={"spool": "b"}, meter_provider=meter_provider)

    gauge = _metrics(reader)[a.METRIC_AUDIT_SPOOL_DEPTH]
    assert [(dict(p.attributes), p.value) for p in gauge.data.data_points] == [({"spool": "a"}, 3)]

    depth[0] = 7
    points = _metrics(reader)[a.METRIC_AUDIT_SPOOL_DEPTH].data.data_points
    assert [p.value for p in points] == [7]

    assert unregister_spool_depth(spool_a, meter_provider=meter_provider) is True
    assert unregister_spool_depth(spool_a, meter_provider=meter_provider) is False
    assert a.METRIC_AUDIT_SPOOL_DEPTH not in _metrics(reader) or not (
        _metrics(reader)[a.METRIC_AUDIT_SPOOL_DEPTH].data.data_points
    )


def test_without_meter_provider_everything_is_a_cheap_no_op() -> None:
    """With no MeterProvider set, the API calls work and import no SDK module."""
    code = (
        "import sys\n"
        "from coworker import metrics\n"
        "metrics.audit_append('state-change', 'ok', 0.1)\n"
        "metrics.register_spool_depth(lambda: 1)\n"
        "metrics.RunMetricsProcessor()\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')], sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_global_meter_provider_set_later_is_picked_up() -> None:
    """Without a MeterProvider nothing is recorded (cheaply); once the app sets one, runs are
    counted through it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import coworker
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        coworker.configure("m")

        @coworker.run(operation="select", doctype="Invoice")
        def f():
            pass

        f()  # no provider yet: dropped
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        f(); f()
        data = reader.get_metrics_data()
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == "coworker.runs":
                        print(sum(p.value for p in m.data.data_points))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "2"
