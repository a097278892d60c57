"""coworker.configure / shutdown: providers, exporters, OTLP, env vars, exit-time export."""

from __future__ import annotations

import gzip
import http.server
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import coworker
from coworker import attributes as attr


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a process-wide OTel setup per test), checked.

    ``env`` replaces the environment (with a minimal PATH) so that no OTEL_* leaks in.
    """
    if env is not None:
        env = {"PATH": "/usr/bin:/bin", **env}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


class _Receiver(http.server.BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP protobuf receiver (the test's stand-in for a Collector)."""

    spans: list[tuple[str, dict[str, Any], str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            service = next(
                a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
            )
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attrs = {a.key: a.value.string_value for a in span.attributes}
                    _Receiver.spans.append((span.name, attrs, service))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[str]:
    _Receiver.spans = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


SCRIPT = textwrap.dedent(
    """
    import coworker
    coworker.configure("short-script", metrics=False)

    @coworker.run(operation="create", doctype="Note")
    def write():
        pass

    with coworker.flow("batch-job", "exit-test"):
        write()
    # no shutdown(): spans must still be exported at interpreter exit
    """
)


def test_short_script_exports_over_otlp_at_exit(otlp_receiver: str) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, a script's spans reach OTLP at exit."""
    env = {
        "PATH": "/usr/bin:/bin",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver,
        "OTEL_BSP_SCHEDULE_DELAY": "60000",  # only the exit-time flush can deliver them
    }
    subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True, timeout=60)
    assert [(n, a[attr.FLOW_ID], s) for n, a, s in _Receiver.spans] == [
        ("create Note", "exit-test", "short-script"),
        ("flow batch-job", "exit-test", "short-script"),  # the flow span ends after its run
    ]


def test_sdk_disabled_creates_no_provider() -> None:
    """OTEL_SDK_DISABLED=true: configure installs nothing and runs still work."""
    code = textwrap.dedent(
        """
        import coworker
        from opentelemetry import trace
        coworker.configure("x", metrics=False)
        @coworker.run
        def f(): return 3
        print(f(), type(trace.get_tracer_provider()).__name__)
        """
    )
    out = _python(code, {"OTEL_SDK_DISABLED": "true"})
    assert out.stdout.split() == ["3", "ProxyTracerProvider"]


def test_existing_application_provider_is_kept() -> None:
    """configure adds to the app's SDK provider and never replaces its processors."""
    code = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        app_exp, ours = InMemorySpanExporter(), InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "app"}))
        provider.add_span_processor(SimpleSpanProcessor(app_exp))
        trace.set_tracer_provider(provider)
        import coworker
        coworker.configure("other-name", exporter=SimpleSpanProcessor(ours), metrics=False)
        @coworker.run
        def f(): pass
        f()
        assert trace.get_tracer_provider() is provider
        print(len(app_exp.get_finished_spans()), len(ours.get_finished_spans()),
              app_exp.get_finished_spans()[0].resource.attributes["service.name"])
        """
    )
    out = _python(code)
    assert out.stdout.split() == ["1", "1", "app"]
    assert "ignored" in out.stderr  # the service-name conflict is logged, not forced


def test_configure_again_replaces_previous_exporters(spans: Any) -> None:
    """A second configure call replaces the first one's exporters; shutdown removes them."""
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    coworker.configure(exporter=SimpleSpanProcessor(first), metrics=False)

    @coworker.run
    def f() -> None: ...

    f()
    coworker.configure(exporter=[SimpleSpanProcessor(second)], metrics=False)
    f()
    coworker.shutdown()
    f()
    assert len(first.get_finished_spans()) == 1
    assert len(second.get_finished_spans()) == 1
    assert len(spans.get_finished_spans()) == 3  # the test exporter saw all of them


def test_batch_exporter_flushed_by_force_flush(spans: Any) -> None:
    """A plain SpanExporter goes behind a BatchSpanProcessor; force_flush delivers."""
    exp = InMemorySpanExporter()
    coworker.configure(exporter=exp, metrics=False)

    @coworker.run
    def f() -> None: ...

    f()
    assert coworker.force_flush()
    assert len(exp.get_finished_spans()) == 1


def test_config_errors_name_the_parameter(monkeypatch: Any) -> None:
    """Bad settings raise ConfigError naming the parameter or variable."""
    with pytest.raises(coworker.ConfigError, match="audit_failure"):
        coworker.configure(audit_failure="ignore")
    with pytest.raises(coworker.ConfigError, match="capture_limit"):
        coworker.configure(capture_limit=1)
    with pytest.raises(coworker.ConfigError, match="fail_closed"):
        coworker.configure(fail_closed=True)
    monkeypatch.setenv("COWORKER_DEBUG", "maybe")
    with pytest.raises(coworker.ConfigError, match="COWORKER_DEBUG"):
        coworker.configure()


def test_debug_from_environment(spans: Any, monkeypatch: Any) -> None:
    """COWORKER_DEBUG=1 turns on stack traces."""
    monkeypatch.setenv("COWORKER_DEBUG", "1")
    coworker.configure(metrics=False)

    @coworker.run
    def f() -> None:
        raise ValueError("x")

    with pytest.raises(ValueError):
        f()
    (s,) = spans.get_finished_spans()
    assert attr.EXCEPTION_STACKTRACE in s.events[0].attributes


def test_failed_configure_keeps_the_previous_configuration(spans: Any, tmp_path: Any) -> None:
    """A configure() that raises changes nothing: the previous policy stays in force."""
    policy = {"roles": {"clerk": {"Invoice": ["select"]}}, "users": {"u1": ["clerk"]}}
    coworker.configure(policy=policy, metrics=False)

    @coworker.run(operation="delete", doctype="Invoice")
    def delete() -> None: ...

    with pytest.raises(coworker.ConfigError):
        coworker.configure(audit="bogus://x", metrics=False)
    with pytest.raises(coworker.ConfigError, match="flow_idle_timeout"):
        coworker.configure(policy=None, flow_idle_timeout=-1, metrics=False)
    with coworker.acting_as("u1"), pytest.raises(coworker.PermissionDenied):
        delete()


def test_audit_with_sdk_disabled_is_refused() -> None:
    """OTEL_SDK_DISABLED with an audit store configured fails fast instead of auditing nothing."""
    code = textwrap.dedent(
        """
        import coworker
        try:
            coworker.configure(audit="sqlite:///never.db", fail_closed=True, metrics=False)
        except coworker.ConfigError as exc:
            print("refused:", "OTEL_SDK_DISABLED" in str(exc))
        """
    )
    out = _python(code, {"OTEL_SDK_DISABLED": "true"})
    assert out.stdout.strip() == "refused: True"


def test_http_json_protocol_warns_and_falls_back(monkeypatch: Any, caplog: Any) -> None:
    """OTLP http/json (unsupported by the Python exporters) is said, not silently swapped."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from coworker._setup import _otlp_exporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    assert isinstance(_otlp_exporter(), OTLPSpanExporter)
    assert "http/json is not supported" in caplog.text
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with pytest.raises(coworker.ConfigError, match="carrier-pigeon"):
        _otlp_exporter()


def test_otel_service_name_is_respected() -> None:
    """Without service_name=, the provider coworker installs takes OTEL_SERVICE_NAME."""
    code = textwrap.dedent(
        """
        import coworker
        from opentelemetry import trace
        coworker.configure(metrics=False)
        print(trace.get_tracer_provider().resource.attributes["service.name"])
        """
    )
    out = _python(code, {"OTEL_SERVICE_NAME": "billing-api"})
    assert out.stdout.strip() == "billing-api"


def test_unencodable_service_name_is_a_config_error() -> None:
    """service_name ends in every audit record: a lone surrogate fails configure at once."""
    with pytest.raises(coworker.ConfigError, match="UTF-8"):
        coworker.configure("svc\ud800", metrics=False)
