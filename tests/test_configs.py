"""Configs and dashboards are code: collector-config/ and dashboards/ agree with the library.

Every attribute and metric name in the collector configs and the Grafana dashboards must be one
that coworker emits: attribute keys come from :mod:`coworker.attributes`, and the library's
metric names (with units and kinds) are read from a real SDK recording of :mod:`coworker.metrics`
and translated to Prometheus form by :func:`prometheus_names`, never copied as strings.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Sum,
)
from opentelemetry.sdk.trace import TracerProvider

from coworker import attributes as a
from coworker.metrics import RunMetricsProcessor, audit_append, register_spool_depth

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COLLECTOR_DIR = ROOT / "collector-config"
DASHBOARD_DIR = ROOT / "dashboards"
OTELCOL_CONFIG = COLLECTOR_DIR / "otelcol-config.yaml"
SNIPPETS = COLLECTOR_DIR / "existing-collector-snippets.yaml"
COLLECTOR_CONFIGS = [OTELCOL_CONFIG, SNIPPETS]
COMPOSE = COLLECTOR_DIR / "docker-compose.yaml"
DATASOURCES = COLLECTOR_DIR / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDERS = COLLECTOR_DIR / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))

# The columns of coworker_audit.records that dashboards/audit.json reads (documented in
# dashboards/README.md); the PostgreSQL store must provide them. recorded_at is read as
# recorded_at::timestamptz, which works for a timestamptz column and for RFC 3339 text.
AUDIT_TABLE = "coworker_audit.records"
AUDIT_COLUMNS = frozenset(
    {
        "seq",
        "recorded_at",
        "category",
        "operation",
        "doctype",
        "user_id",
        "agent_id",
        "flow_id",
        "outcome",
        "hash",
    }
)

# Dimensions the spanmetrics connector always adds
# (opentelemetry-collector-contrib/connector/spanmetricsconnector/README.md).
SPANMETRICS_DEFAULT_DIMENSIONS = ("service.name", "span.name", "span.kind", "status.code")
# Labels Prometheus itself adds or a histogram series carries.
PROMETHEUS_OWN_LABELS = frozenset({"le", "job", "instance"})
# The collector's own telemetry (not the library's): the audit queue gauge and its labels.
COLLECTOR_INTERNAL_METRICS = {"otelcol_exporter_queue_size": frozenset({"exporter", "data_type"})}

_UNIT_WORDS = {
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "By": "bytes",
    "1": "",
}


# ------------------------------------------------------------------------------ name helpers
def prometheus_label(attribute: str) -> str:
    """The Prometheus label for an OTel attribute (dots and other characters become ``_``)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", attribute)


def prometheus_names(name: str, unit: str, kind: str) -> set[str]:
    """The Prometheus series names for an OTel metric, as the collector's exporter writes them.

    Follows the OTel → Prometheus compatibility spec (UnderscoreEscapingWithSuffixes, the
    prometheus exporter's default): non-alphanumerics become ``_``; a unit adds its word
    (``s`` → ``_seconds``; annotations like ``{run}`` add nothing); counters end in ``_total``;
    histograms expose ``_bucket``, ``_sum`` and ``_count``.

    Args:
        name: OTel metric name, e.g. ``coworker.run.duration``.
        unit: UCUM unit of the instrument.
        kind: ``counter``, ``histogram`` or ``gauge``.

    Returns:
        The series names a PromQL query may select.
    """
    base = re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9_:]", "_", name))
    unit = re.sub(r"\{[^}]*\}", "", unit)
    word = _UNIT_WORDS.get(unit, prometheus_label(unit)) if unit else ""
    if word and not base.endswith("_" + word):
        base = f"{base}_{word}"
    if kind == "counter":
        return {f"{base}_total"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def attribute_keys() -> frozenset[str]:
    """Every span/metric attribute key defined in coworker.attributes."""
    keys = {
        value
        for name, value in vars(a).items()
        if name.isupper()
        and isinstance(value, str)
        and "." in value
        and not value.endswith(".")
        and not name.startswith("METRIC_")
    }
    keys.add(a.METRIC_ATTR_OUTCOME)
    return frozenset(keys)


# ------------------------------------------------------------------------------ loaders
def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _collector(path: Path = OTELCOL_CONFIG) -> dict[str, Any]:
    return _load_yaml(path)


def _dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(datasource, target) for every query, including template variables."""
    for panel in _all_panels(dashboard):
        for target in panel.get("targets", []):
            yield target.get("datasource") or panel["datasource"], target
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            target = query if isinstance(query, dict) else {"rawSql": query}
            if var["datasource"]["type"] == "prometheus":
                target = {"expr": var["definition"]}
            yield var["datasource"], target


def _promql(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for ds, t in _targets(dashboard) if ds["type"] == "prometheus"]


def _sql(dashboard: dict[str, Any]) -> list[str]:
    return [
        t["rawSql"] for ds, t in _targets(dashboard) if ds["type"].endswith("postgresql-datasource")
    ]


def _traceql(dashboard: dict[str, Any]) -> list[str]:
    return [t["query"] for ds, t in _targets(dashboard) if ds["type"] == "tempo"]


def _component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def _spanmetrics(config: dict[str, Any]) -> dict[str, Any]:
    found = [v for k, v in config["connectors"].items() if _component_type(k) == "spanmetrics"]
    assert len(found) == 1
    return found[0] or {}


# ------------------------------------------------------------------------------ metric catalogue
def _usage_metrics(meter_provider: Any) -> None:
    """Record the usage metrics (issue 16) once, with every dimension they carry."""
    from decimal import Decimal

    from coworker.identity import Agent, Identity, User
    from coworker.pricing import Cost, TokenCounts
    from coworker.usage import _metrics

    _metrics(
        "gpt-4o",
        "openai",
        TokenCounts(10, 2),
        Cost(Decimal("0.01"), "USD", "test"),
        Identity(User("u"), Agent("a")),
        "sales",
        "ai-conversation",
        meter_provider=meter_provider,
    )


@pytest.fixture(scope="module")
def library_metrics() -> dict[str, frozenset[str]]:
    """Prometheus series name -> allowed labels, for every metric coworker.metrics emits.

    Recorded with a real SDK so names, units, kinds and attributes are what the library does.
    """
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(RunMetricsProcessor(meter_provider=meter_provider))  # type: ignore[arg-type]
    with tracer_provider.get_tracer("t").start_as_current_span(
        "create Invoice",
        attributes={a.RUN_ID: "r", a.FLOW_TYPE: "workflow", a.OPERATION: "create"},
    ):
        pass
    audit_append(a.CATEGORY_STATE_CHANGE, "ok", 0.01, meter_provider=meter_provider)
    register_spool_depth(lambda: 0, meter_provider=meter_provider)
    _usage_metrics(meter_provider)
    data = reader.get_metrics_data()
    assert data is not None
    catalogue: dict[str, frozenset[str]] = {}
    resource_labels = {prometheus_label(a.SERVICE_NAME)} | PROMETHEUS_OWN_LABELS
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if isinstance(metric.data, Histogram):
                    kind = "histogram"
                elif isinstance(metric.data, Sum) and metric.data.is_monotonic:
                    kind = "counter"
                else:
                    assert isinstance(metric.data, Gauge | Sum)
                    kind = "gauge"
                labels = {
                    prometheus_label(k) for p in metric.data.data_points for k in p.attributes
                }
                for series in prometheus_names(metric.name, metric.unit, kind):
                    catalogue[series] = frozenset(labels | resource_labels)
    meter_provider.shutdown()
    tracer_provider.shutdown()
    expected = {
        a.METRIC_RUNS,
        a.METRIC_RUN_DURATION,
        a.METRIC_AUDIT_APPENDS,
        a.METRIC_AUDIT_APPEND_DURATION,
        a.METRIC_AUDIT_SPOOL_DEPTH,
        a.METRIC_GEN_AI_TOKEN_USAGE,
        a.METRIC_USAGE_COST,
    }
    recorded = {
        m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    assert recorded == expected
    return catalogue


@pytest.fixture(scope="module")
def span_metrics() -> dict[str, frozenset[str]]:
    """Prometheus series name -> labels for the spanmetrics connector as configured."""
    connector = _spanmetrics(_collector())
    namespace = connector.get("namespace", "traces.span.metrics")
    unit = connector.get("histogram", {}).get("unit", "ms")
    dims = [d["name"] for d in connector.get("dimensions", [])]
    labels = frozenset(
        {prometheus_label(d) for d in (*SPANMETRICS_DEFAULT_DIMENSIONS, *dims)}
        | PROMETHEUS_OWN_LABELS
    )
    catalogue: dict[str, frozenset[str]] = {}
    for series in prometheus_names(f"{namespace}.calls", "", "counter"):
        catalogue[series] = labels
    for series in prometheus_names(f"{namespace}.duration", unit, "histogram"):
        catalogue[series] = labels
    return catalogue


def test_prometheus_names_follow_the_spec() -> None:
    """The name translation gives the documented Prometheus names."""
    assert prometheus_names("traces.span.metrics.calls", "", "counter") == {
        "traces_span_metrics_calls_total"
    }
    assert "traces_span_metrics_duration_milliseconds_bucket" in prometheus_names(
        "traces.span.metrics.duration", "ms", "histogram"
    )
    assert prometheus_names(a.METRIC_RUNS, "{run}", "counter") == {"coworker_runs_total"}
    assert prometheus_label(a.AGENT_ID) == "gen_ai_agent_id"


# ------------------------------------------------------------------------------ parsing
ALL_YAML = sorted(COLLECTOR_DIR.rglob("*.yaml")) + sorted(COLLECTOR_DIR.rglob("*.yml"))


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    """Every YAML file in collector-config/ is a non-empty mapping."""
    assert isinstance(_load_yaml(path), dict)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_parses(path: Path) -> None:
    """Every dashboard is JSON with a uid, a title and panels."""
    dashboard = _dashboard(path)
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]


def test_the_expected_files_exist() -> None:
    """The stack's files and both dashboards are present."""
    assert {p.name for p in DASHBOARDS} >= {"flows.json", "audit.json"}
    for path in (*COLLECTOR_CONFIGS, COMPOSE, DATASOURCES, DASHBOARD_PROVIDERS):
        assert path.is_file(), path


# ------------------------------------------------------------------------------ collector
_SECTIONS = {"receivers", "processors", "exporters", "connectors", "extensions"}


@pytest.mark.parametrize("path", COLLECTOR_CONFIGS, ids=lambda p: p.name)
def test_pipelines_reference_defined_components(path: Path) -> None:
    """Pipelines, service extensions, authenticators and queue storages are all defined."""
    config = _collector(path)
    defined = {section: set(config.get(section) or {}) for section in _SECTIONS}
    pipelines = config["service"]["pipelines"]
    used: dict[str, set[str]] = {section: set() for section in _SECTIONS}
    connector_as_exporter: set[str] = set()
    connector_as_receiver: set[str] = set()
    for name, pipeline in pipelines.items():
        assert _component_type(name) in {"traces", "metrics", "logs"}, name
        assert pipeline.get("receivers") and pipeline.get("exporters"), name
        for receiver in pipeline["receivers"]:
            assert receiver in defined["receivers"] | defined["connectors"], (name, receiver)
            if receiver in defined["connectors"]:
                connector_as_receiver.add(receiver)
            else:
                used["receivers"].add(receiver)
        for processor in pipeline.get("processors", []):
            assert processor in defined["processors"], (name, processor)
            used["processors"].add(processor)
        for exporter in pipeline["exporters"]:
            assert exporter in defined["exporters"] | defined["connectors"], (name, exporter)
            if exporter in defined["connectors"]:
                connector_as_exporter.add(exporter)
            else:
                used["exporters"].add(exporter)
    enabled = set(config["service"].get("extensions", []))
    assert enabled <= defined["extensions"]
    for exporter_id, exporter in (config.get("exporters") or {}).items():
        exporter = exporter or {}
        authenticator = exporter.get("auth", {}).get("authenticator")
        storage = exporter.get("sending_queue", {}).get("storage")
        for extension in filter(None, (authenticator, storage)):
            assert extension in enabled, (exporter_id, extension)
    # A connector joins two pipelines: exporter of one, receiver of another.
    assert connector_as_exporter == connector_as_receiver == defined["connectors"]
    used["extensions"] = enabled
    for section in ("receivers", "processors", "exporters", "extensions"):
        assert used[section] == defined[section], (
            f"unused {section}: {defined[section] - used[section]}"
        )


@pytest.mark.parametrize("path", COLLECTOR_CONFIGS, ids=lambda p: p.name)
def test_spanmetrics_dimensions_are_library_attributes(path: Path) -> None:
    """The connector's dimensions are attribute keys coworker emits, including the required ones."""
    dims = [d["name"] for d in _spanmetrics(_collector(path))["dimensions"]]
    assert set(dims) <= attribute_keys()
    assert {a.FLOW_TYPE, a.STEP_ID, a.OPERATION, a.DOCTYPE, a.AGENT_ID} <= set(dims)
    assert a.FLOW_ID not in dims and a.RUN_ID not in dims, "unbounded cardinality"


_ATTR_IN_OTTL = re.compile(r'attributes\["([^"]+)"\]')
_AUDIT_COMPARISON = re.compile(r'attributes\["([^"]+)"\]\s*(==|!=)\s*("?)(\w+)\3')


@pytest.mark.parametrize("path", COLLECTOR_CONFIGS, ids=lambda p: p.name)
def test_audit_filter_compares_the_boolean_attribute(path: Path) -> None:
    """The audit filter keeps spans whose coworker.audited (or 0.1.0's coworker.audit) is the
    boolean true."""
    config = _collector(path)
    filters = {k: v for k, v in config["processors"].items() if _component_type(k) == "filter"}
    assert len(filters) == 1
    ((filter_id, filter_config),) = filters.items()
    conditions = filter_config["traces"]["span"]
    # One condition (conditions in a list are OR-ed: two would drop every legacy span, or
    # every new one): drop a span when neither the flag nor its 0.1.0 name is true.
    (condition,) = conditions
    assert set(_ATTR_IN_OTTL.findall(condition)) <= attribute_keys()
    keys = []
    for comparison in condition.split(" and "):
        match = _AUDIT_COMPARISON.fullmatch(comparison.strip())
        assert match, condition
        key, operator, quote, literal = match.groups()
        keys.append(key)
        assert quote == "", "a quoted 'true' is a string, coworker.audited is a boolean"
        # The filter DROPS matching spans, so keeping audit spans means dropping "!= true".
        assert (operator, literal) == ("!=", "true")
    assert keys == [a.AUDITED, a.AUDITED_LEGACY]
    audit_pipelines = [
        p for p in config["service"]["pipelines"].values() if filter_id in p.get("processors", [])
    ]
    assert len(audit_pipelines) == 1
    (audit_exporter,) = audit_pipelines[0]["exporters"]
    exporter = config["exporters"][audit_exporter]
    assert _component_type(audit_exporter) == "otlphttp"
    assert exporter["auth"]["authenticator"].startswith("bearertokenauth")
    assert exporter["sending_queue"]["storage"].startswith("file_storage")
    assert exporter["retry_on_failure"]["max_elapsed_time"] == 0
    assert exporter["sending_queue"]["block_on_overflow"] is True
    assert "batch" not in audit_pipelines[0].get("processors", [])


def test_every_span_goes_to_jaeger_and_tempo() -> None:
    """One traces pipeline exports to Jaeger, Tempo and the span-metrics connector."""
    config = _collector()
    exporters = set(config["service"]["pipelines"]["traces"]["exporters"])
    assert {"otlp/jaeger", "otlp/tempo", "spanmetrics"} <= exporters
    for pipeline in config["service"]["pipelines"].values():
        assert pipeline.get("processors", ["memory_limiter"])[0] == "memory_limiter"


# ------------------------------------------------------------------------------ compose
def _compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE)


def _volume_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        yield source, target


def test_compose_mounted_paths_exist() -> None:
    """Every bind-mounted host path and every build context/Dockerfile exists."""
    compose = _compose()
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        if "image" in service:
            tag = service["image"].rsplit(":", 1)
            assert len(tag) == 2 and tag[1] not in {"latest", ""}, f"{name}: pin the image"
        for source, _target in _volume_mounts(service):
            if source.startswith((".", "/")):
                assert (COLLECTOR_DIR / source).resolve().exists(), (name, source)
            else:
                assert source in named, (name, source)
        if "build" in service:
            context = (COLLECTOR_DIR / service["build"]["context"]).resolve()
            dockerfile = context / service["build"]["dockerfile"]
            assert dockerfile.is_file()
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"COPY {source}: not in the repository"


def test_compose_wires_the_collector_to_the_services() -> None:
    """Exporter hosts, the Prometheus target and the Grafana mounts match the compose services."""
    compose = _compose()
    services = compose["services"]
    config = _collector()
    for exporter_id in ("otlp/jaeger", "otlp/tempo", "otlphttp/coworker-audit"):
        endpoint = config["exporters"][exporter_id]["endpoint"]
        host = re.sub(r"^https?://", "", endpoint).split(":")[0]
        assert host in services, (exporter_id, host)
    ingest_port = config["exporters"]["otlphttp/coworker-audit"]["endpoint"].rsplit(":", 1)[1]
    ingest_command = services["coworker-ingest"]["command"]
    assert ingest_command[ingest_command.index("--listen") + 1] == f"0.0.0.0:{ingest_port}"
    # The same token file for the collector's bearertokenauth and the ingest endpoint.
    token_path = config["extensions"]["bearertokenauth/coworker"]["filename"]
    assert ingest_command[ingest_command.index("--token-file") + 1] == token_path
    for name in ("collector", "coworker-ingest"):
        assert token_path in {t for _s, t in _volume_mounts(services[name])}
    queue_dir = config["extensions"]["file_storage/audit"]["directory"]
    assert queue_dir in {t for _s, t in _volume_mounts(services["collector"])}
    # Prometheus scrapes the collector's prometheus exporter.
    prom_port = config["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    targets = {
        t
        for job in _load_yaml(COLLECTOR_DIR / "prometheus.yaml")["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    assert f"collector:{prom_port}" in targets
    # Grafana loads the dashboards directory through the provider's path.
    provider_path = _load_yaml(DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    grafana_mounts = dict(_volume_mounts(services["grafana"]))
    assert (COLLECTOR_DIR / grafana_mounts["../dashboards"]).name
    assert grafana_mounts["../dashboards"] == provider_path
    assert "./grafana/provisioning" in grafana_mounts


def test_compose_ingest_command_matches_the_cli() -> None:
    """Every option the compose file passes to `coworker audit serve` is one the CLI offers."""
    command = _compose()["services"]["coworker-ingest"]["command"]
    assert command[:2] == ["audit", "serve"]
    result = subprocess.run(
        [sys.executable, "-m", "coworker", "audit", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"DID NOT RUN: `coworker audit serve` is not available: {result.stderr[-200:]}")
    for option in (arg for arg in command if arg.startswith("--")):
        assert option in result.stdout, f"`coworker audit serve` has no {option}"


# ------------------------------------------------------------------------------ dashboards
def _datasources() -> dict[str, dict[str, Any]]:
    return {ds["uid"]: ds for ds in _load_yaml(DATASOURCES)["datasources"]}


def test_datasources_point_at_compose_services() -> None:
    """Each provisioned data source's host is a service of the compose stack."""
    services = _compose()["services"]
    for ds in _datasources().values():
        host = re.sub(r"^https?://", "", ds["url"]).split(":")[0]
        assert host in services, ds["name"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panel_ids_unique_and_datasources_provisioned(path: Path) -> None:
    """Panel ids are unique; every data source reference matches a provisioned uid and type."""
    dashboard = _dashboard(path)
    ids = [panel["id"] for panel in _all_panels(dashboard)]
    assert len(ids) == len(set(ids)), ids
    provisioned = _datasources()
    refs = [ds for ds, _t in _targets(dashboard)]
    refs += [p["datasource"] for p in _all_panels(dashboard) if "datasource" in p]
    assert refs
    for ref in refs:
        assert ref["uid"] in provisioned, ref
        assert provisioned[ref["uid"]]["type"] == ref["type"], ref


_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)[^,]*,\s*(\w+)\s*\)")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_promql_uses_only_emitted_metrics_and_labels(
    path: Path,
    library_metrics: dict[str, frozenset[str]],
    span_metrics: dict[str, frozenset[str]],
) -> None:
    """Every metric and label in a PromQL query is one the library or the connector emits."""
    known = {**library_metrics, **span_metrics, **COLLECTOR_INTERNAL_METRICS}
    queries = _promql(_dashboard(path))
    assert queries
    for expr in queries:
        selected: set[str] = set()
        for metric, matchers in _SELECTOR.findall(expr):
            assert metric in known, f"{metric} is not emitted: {expr}"
            selected.add(metric)
            for label in _MATCHER.findall(matchers):
                assert label in known[metric], f"{metric} has no label {label}: {expr}"
        for metric, label in _LABEL_VALUES.findall(expr):
            assert metric in known, expr
            selected.add(metric)
            assert label in known[metric], f"{metric} has no label {label}: {expr}"
        assert selected, f"no metric selector in: {expr}"
        labels = set().union(*(known[m] for m in selected))
        for grouping in _GROUPING.findall(expr):
            for label in filter(None, (s.strip() for s in grouping.split(","))):
                assert label in labels, f"grouping by unknown label {label}: {expr}"
        exporter_labels = re.findall(r'exporter="([^"]+)"', expr)
        assert set(exporter_labels) <= set(_collector()["exporters"]), expr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_traceql_uses_library_attributes(path: Path) -> None:
    """TraceQL span and resource attributes are keys coworker emits."""
    for query in _traceql(_dashboard(path)):
        names = re.findall(r'span\."([^"]+)"', query) + re.findall(
            r"resource\.([a-zA-Z_][a-zA-Z0-9_.]*)", query
        )
        assert names, query
        assert set(names) <= attribute_keys(), query


def test_flows_dashboard_searches_by_flow_id() -> None:
    """The Flows dashboard has a TraceQL search on flow.id and the four filter variables."""
    dashboard = _dashboard(DASHBOARD_DIR / "flows.json")
    assert any(f'span."{a.FLOW_ID}"' in q for q in _traceql(dashboard))
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"service", "flow_type", "user", "agent"} <= names


_SQL_WORDS = frozenset(
    {
        *("select", "from", "where", "and", "or", "not", "as", "group", "by", "order", "desc"),
        *("asc", "limit", "count", "max", "min", "coalesce", "encode", "is", "null", "distinct"),
        *("union", "all", "in", "timestamptz"),
        *("metric", "value", "__value", "__text"),  # column aliases Grafana reads
    }
)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_sql_reads_only_the_documented_audit_columns(path: Path) -> None:
    """SQL reads coworker_audit.records, its documented columns and real category names."""
    for query in _sql(_dashboard(path)):
        categories = re.findall(r"category\s*=\s*'([^']*)'", query)
        assert set(categories) <= set(a.AUDIT_CATEGORIES), query
        assert AUDIT_TABLE in query
        text = query.replace(AUDIT_TABLE, " ")
        text = re.sub(r"'[^']*'", " ", text)  # string literals
        text = re.sub(r'"[^"]*"', " ", text)  # quoted aliases
        text = re.sub(r"\$\{[^}]*\}|\$__\w+|\$\w+", " ", text)  # Grafana macros and variables
        words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)}
        unknown = words - _SQL_WORDS - AUDIT_COLUMNS
        assert not unknown, f"{unknown} in: {query}"


def test_audit_dashboard_panels() -> None:
    """The Audit dashboard shows categories, doctypes, authorization failures and the head."""
    queries = " ".join(_sql(_dashboard(DASHBOARD_DIR / "audit.json")))
    assert f"category = '{a.CATEGORY_AUTHORIZATION_FAILURE}'" in queries
    assert "ORDER BY seq DESC LIMIT 1" in queries
    assert "doctype" in queries


def render_grafana_sql(query: str, variables: dict[str, str] | None = None) -> str:
    """Expand the Grafana macros the audit dashboard uses, as Grafana's PostgreSQL source does.

    Args:
        query: the panel's raw SQL.
        variables: template variable values (default ``__all`` = no filter).

    Returns:
        Plain SQL for PostgreSQL.
    """
    variables = variables or {}
    query = re.sub(
        r"\$__timeGroupAlias\(([^,]+),\s*\$__interval\)",
        r'floor(extract(epoch from \1)/60)*60 AS "time"',
        query,
    )
    query = re.sub(
        r"\$__timeFilter\(([^)]+)\)",
        r"\1 BETWEEN '2000-01-01T00:00:00Z' AND '2100-01-01T00:00:00Z'",
        query,
    )
    query = re.sub(
        r"\$\{(\w+):sqlstring\}",
        lambda m: "'" + variables.get(m.group(1), "__all").replace("'", "''") + "'",
        query,
    )
    assert "$" not in query, query
    return query


@pytest.mark.postgres
def test_audit_dashboard_sql_runs_on_the_postgres_store() -> None:
    """Every Audit query runs on a real PostgresStore schema and finds the records appended."""
    from tests.pg import PGServer, import_psycopg, require_server

    psycopg = import_psycopg()
    from coworker.audit.store_postgres import PostgresStore

    server = PGServer(require_server())
    try:
        schema = AUDIT_TABLE.split(".")[0]
        store = PostgresStore(server.schema_url(schema), spool=False)
        common = {"kind": "outcome", "doctype": "Invoice", "flow_id": "f-1"}
        entries = [
            {
                **common,
                "category": a.CATEGORY_STATE_CHANGE,
                "operation": "create",
                "outcome": "ok",
                "user_id": "alice",
                "recorded_at": "2026-01-02T03:04:05.123456789Z",
            },
            {
                **common,
                "category": a.CATEGORY_AUTHORIZATION_FAILURE,
                "operation": "submit",
                "outcome": "PermissionDenied",
                "user_id": "alice",
                "agent_id": "agent-7",
                "recorded_at": "2026-01-02T03:04:06.000000001Z",
            },
        ]
        try:
            head = store.append(entries)[-1]
        finally:
            store.close()
        queries = _sql(_dashboard(DASHBOARD_DIR / "audit.json"))
        assert queries
        with psycopg.connect(server.url) as conn:
            for query in queries:
                for variables in ({}, {"user": "alice", "agent": "agent-7"}):
                    conn.execute(render_grafana_sql(query, variables)).fetchall()
            failures = next(q for q in queries if "GROUP BY 1, 2 ORDER BY 3 DESC" in q)
            rows = conn.execute(render_grafana_sql(failures)).fetchall()
            assert [r[:3] for r in rows] == [("alice", "agent-7", 1)]
            head_query = next(q for q in queries if "ORDER BY seq DESC LIMIT 1" in q)
            (row,) = conn.execute(render_grafana_sql(head_query)).fetchall()
            assert row[0] == head.seq == 2
            assert row[2] == head.hash.hex()
    finally:
        server.close()


# ------------------------------------------------------------------------------ the collector build
# The real collector validates both configs in tests/stack/test_validate.py (built by
# collector-config/build-local-stack.sh from this manifest); these checks need no binary.
BUILDER_MANIFEST = COLLECTOR_DIR / "builder-config.yaml"
BUILD_SCRIPT = COLLECTOR_DIR / "build-local-stack.sh"
_KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")


def _module_type(gomod: str, kind: str) -> str:
    """``.../processor/memorylimiterprocessor v0.161.0`` -> ``memorylimiter``."""
    name = gomod.split()[0].rsplit("/", 1)[1]
    return name.removesuffix(kind[:-1])


def _script_pin(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)", BUILD_SCRIPT.read_text(), re.M)
    assert match, name
    return match.group(1)


def test_builder_manifest_has_exactly_the_components_the_configs_use() -> None:
    """builder-config.yaml builds every component type the shipped configs name, and no other."""
    manifest = _load_yaml(BUILDER_MANIFEST)
    for kind in _KINDS:
        built = {_module_type(entry["gomod"], kind) for entry in manifest[kind]}
        used = {
            _component_type(component_id).replace("_", "")
            for path in COLLECTOR_CONFIGS
            for component_id in _collector(path).get(kind) or {}
        }
        assert built == used, kind


def test_collector_and_jaeger_versions_are_pinned_together() -> None:
    """One collector release everywhere; the Jaeger build matches the compose image."""
    manifest = _load_yaml(BUILDER_MANIFEST)
    version = manifest["dist"]["version"]
    for kind in _KINDS:
        for entry in manifest[kind]:
            module_version = entry["gomod"].split()[1]
            # Stable core modules are v1.x (v1.N goes with v0.(N+94)); the rest share v0.x.
            if module_version.startswith("v0."):
                assert module_version == f"v{version}", entry
    services = _compose()["services"]
    assert services["collector"]["image"].endswith(f":{version}")
    assert _script_pin("OTELCOL_VERSION") == version
    jaeger = services["jaeger"]["image"].rsplit(":", 1)[1]
    assert _script_pin("JAEGER_VERSION") == jaeger
    # Jaeger v2.N.0 is tagged v1.(63+N).0 for the Go module path without /v2.
    major, minor, patch = (int(x) for x in jaeger.split("."))
    assert major == 2
    assert _script_pin("JAEGER_MODULE_VERSION") == f"v1.{63 + minor}.{patch}"


def _leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, str(i)))
    else:
        yield path, node


def test_local_overlay_changes_only_addresses_and_paths() -> None:
    """otelcol-local.yaml overrides existing endpoint/path keys of otelcol-config.yaml, no more."""
    shipped = dict(_leaves(_collector()))
    overlay = dict(_leaves(_load_yaml(COLLECTOR_DIR / "otelcol-local.yaml")))
    assert overlay
    for path, value in overlay.items():
        assert path in shipped, f"{'.'.join(path)} is not in otelcol-config.yaml"
        assert path[-1] in {"endpoint", "filename", "directory", "host", "port"}, path
        if path[-1] in {"endpoint", "host"}:
            assert "127.0.0.1" in str(value), (path, value)


def test_span_metrics_panels_count_runs_not_flow_spans() -> None:
    """Flow, step and turn spans (``coworker.span.type``) would inflate the run panels: every
    span-metrics selector of the Flows dashboard keeps to runs (``coworker_span_type=""``)."""
    exprs = [
        e
        for e in _promql(_dashboard(DASHBOARD_DIR / "flows.json"))
        if "traces_span" in e and not e.startswith("label_values(")  # variables: any span
    ]
    assert exprs
    for expr in exprs:
        for metric, matchers in _SELECTOR.findall(expr):
            if metric.startswith("traces_span_metrics"):
                assert 'coworker_span_type=""' in matchers, expr
