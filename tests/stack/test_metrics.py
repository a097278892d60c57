"""Span metrics and the library's metrics reach the real Prometheus through the collector, and
every PromQL query of dashboards/*.json returns data there, with the labels its panel shows.

The app is the demo's workload with a ``MeterProvider`` (tests/stack/metrics_app.py); the
collector runs the shipped config and Prometheus the shipped prometheus.yaml (addresses and
intervals substituted). Grafana's variables are substituted as Grafana does: a query
variable's values come from its ``label_values(...)`` query against the same Prometheus, and
the default selection "All" becomes the variable's ``allValue``.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.pg import PGServer, import_psycopg, require_server
from tests.stack._stack import (
    ROOT,
    OtlpSink,
    Procs,
    Prometheus,
    Stack,
    python_env,
    start_collector,
    start_ingest,
    start_prometheus,
    wait_until,
)

pytestmark = [pytest.mark.stack, pytest.mark.postgres]

DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
SERVICE = "coworker-metrics-app"
# Grafana's $__rate_interval is max(4 x scrape interval, interval + scrape interval): with the
# shipped 15 s scrape interval that is 1 m. $__range: the dashboard's time range.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s"}
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\s*\)$", re.S)


@dataclass
class MetricsStack:
    """The running collector, Prometheus and app."""

    prometheus: Prometheus
    procs: Procs


@pytest.fixture(scope="module")
def metrics_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsStack]:
    """Collector + Prometheus + the metrics app running the demo workload in a loop."""
    import_psycopg()
    tmp_path = tmp_path_factory.mktemp("metrics")
    procs = Procs(tmp_path)
    server = PGServer(require_server())
    sink = OtlpSink()
    stop_file, ready_file = tmp_path / "stop", tmp_path / "ready"
    try:
        ingest = start_ingest(procs, f"sqlite:///{tmp_path / 'ingest.db'}")
        collector = start_collector(
            procs, stack, tmp_path, jaeger=sink.endpoint, tempo=sink.endpoint,
            ingest=ingest.base_url,
        )  # fmt: skip
        prometheus = start_prometheus(procs, stack, tmp_path, collector=collector)
        argv = [sys.executable, "-m", "tests.stack.metrics_app", "--service", SERVICE,
                "--pg", server.schema_url("app_audit"), "--spool", str(tmp_path / "spool.db"),
                "--stop-file", str(stop_file), "--ready-file", str(ready_file)]  # fmt: skip
        env = python_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.otlp_http,
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        )
        app = procs.start("metrics-app", argv, env=env, cwd=tmp_path)
        wait_until(ready_file.exists, "the app ran its first iteration", procs=procs, watch=(app,))
        yield MetricsStack(prometheus, procs)
    finally:
        stop_file.write_text("1")
        procs.close()
        sink.close()
        server.close()


# ------------------------------------------------------------------------------ the dashboards
def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def prometheus_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every Prometheus query of the dashboard."""
    found = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            datasource = target.get("datasource") or panel.get("datasource") or {}
            if datasource.get("type") == "prometheus":
                found.append((panel["title"], target))
    return found


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace ``$name``, ``${name}`` and ``${name:format}`` like Grafana (regex values)."""
    values = {**GRAFANA_INTERVALS, **variables}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)
    assert "$" not in out, out
    return out


def prometheus_regex(value: str) -> str:
    """A literal value as Grafana puts it in a PromQL regex string (escapes doubled)."""
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\\\1", value)


def resolve_variables(
    prometheus: Prometheus, dashboard: dict[str, Any], selected: dict[str, str]
) -> dict[str, str]:
    """Every template variable's value: ``selected`` where given, else its default ("All").

    A Prometheus query variable must find values (a variable that lists nothing is a bug).
    """
    variables: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        if var["type"] == "query" and var["datasource"]["type"] == "prometheus":
            match = _LABEL_VALUES.match(var["definition"])
            assert match, var["definition"]
            series, label = substitute(match.group(1), variables), match.group(2)
            values = wait_until(
                lambda s=series, lb=label: prometheus.label_values(lb, s),
                f"variable ${name}: label_values({series}, {label}) lists values",
                timeout=120,
                interval=1,
            )
            if name == "service":
                assert SERVICE in values, values
            current = var["current"]["value"]
            default = var.get("allValue") if current == ["$__all"] else "|".join(current)
            variables[name] = prometheus_regex(selected[name]) if name in selected else default
        elif var["type"] == "textbox":
            variables[name] = var["current"]["value"]
        else:  # a SQL variable (Audit dashboard): not a Prometheus query
            variables[name] = var["current"]["value"]
    return variables


def panel_labels(target: dict[str, Any]) -> set[str]:
    """The labels the panel shows: ``{{label}}`` in the legend and ``by (...)`` groupings."""
    labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat") or ""))
    for grouping in re.findall(r"\bby\s*\(([^)]*)\)", target["expr"]):
        labels |= {g.strip() for g in grouping.split(",") if g.strip()}
    return labels - {"le"}


def evaluate(prometheus: Prometheus, target: dict[str, Any], expr: str) -> list[dict[str, Any]]:
    """The panel's query as Grafana runs it: instant, or a range over the last 5 minutes."""
    if target.get("instant"):
        return prometheus.query(expr)
    now = time.time()
    return prometheus.query(expr, start=now - 300, end=now, step=5)


def finite_values(series: dict[str, Any]) -> list[float]:
    """The series' sample values that are numbers (not NaN/Inf)."""
    samples = series.get("values") or [series["value"]]
    return [float(v) for _t, v in samples if math.isfinite(float(v))]


def has_data(result: list[dict[str, Any]], labels: set[str]) -> list[dict[str, Any]]:
    """The series of ``result`` with every label in ``labels`` and at least one finite value."""
    return [
        s for s in result if finite_values(s) and all(s["metric"].get(label) for label in labels)
    ]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_query_returns_data_with_the_panel_labels(
    metrics_stack: MetricsStack, path: Path
) -> None:
    """Each PromQL target, variables at their defaults, returns series with the panel's labels."""
    prometheus = metrics_stack.prometheus
    dashboard = json.loads(path.read_text())
    variables = resolve_variables(prometheus, dashboard, {})
    targets = prometheus_targets(dashboard)
    assert targets
    for title, target in targets:
        expr = substitute(target["expr"], variables)
        labels = panel_labels(target)
        wait_until(
            lambda t=target, e=expr, lb=labels: has_data(evaluate(prometheus, t, e), lb),
            f"{path.name} / {title}: {expr} returns series with labels {sorted(labels)}",
            procs=metrics_stack.procs,
            timeout=150,
            interval=2,
        )


def test_error_ratio_panels_show_zero_for_a_selection_without_errors(
    metrics_stack: MetricsStack,
) -> None:
    """Error rate by step and Failing steps give 0 for steps that never fail, not "No data".

    The agent's conversation steps never fail; an errors/all ratio whose numerator has no
    series at all used to return nothing for them.
    """
    prometheus = metrics_stack.prometheus
    dashboard = json.loads((ROOT / "dashboards" / "flows.json").read_text())
    variables = resolve_variables(prometheus, dashboard, {"agent": "agent-789"})
    ratio_panels = {"Error rate by step", "Failing steps over the time range"}
    targets = [(t, tg) for t, tg in prometheus_targets(dashboard) if t in ratio_panels]
    assert len(targets) == 2
    for title, target in targets:
        expr = substitute(target["expr"], variables)
        result = wait_until(
            lambda t=target, e=expr: has_data(evaluate(prometheus, t, e), {"step_id"}),
            f"{title} with agent-789 returns the agent's steps",
            procs=metrics_stack.procs,
            timeout=150,
            interval=2,
        )
        steps = {s["metric"]["step_id"] for s in result}
        assert steps and all(step.startswith("turn-") for step in steps), steps
        assert {v for s in result for v in finite_values(s)} == {0.0}


def test_span_metrics_and_library_metrics_carry_the_app_service(
    metrics_stack: MetricsStack,
) -> None:
    """Connector and library series both reach Prometheus labelled with the app's service."""
    prometheus = metrics_stack.prometheus
    for metric in (
        "traces_span_metrics_calls_total",
        "traces_span_metrics_duration_seconds_bucket",
        "coworker_runs_total",
        "coworker_run_duration_seconds_bucket",
        "coworker_audit_appends_total",
        "coworker_audit_spool_depth",
    ):
        wait_until(
            lambda m=metric: prometheus.query(f'{m}{{service_name="{SERVICE}"}}'),
            f"{metric} for {SERVICE} in Prometheus",
            procs=metrics_stack.procs,
            timeout=150,
            interval=2,
        )
    calls = prometheus.query(
        f'sum by (flow_type, step_id) (traces_span_metrics_calls_total{{service_name="{SERVICE}"}})'
    )
    steps = {(s["metric"].get("flow_type"), s["metric"].get("step_id")) for s in calls}
    assert {("workflow", "validate"), ("workflow", "payment"), ("workflow", "ship")} <= steps
    errors = prometheus.query(
        "traces_span_metrics_calls_total"
        f'{{service_name="{SERVICE}", step_id="payment", status_code="STATUS_CODE_ERROR"}}'
    )
    assert errors, "the payment step's failures are counted"
