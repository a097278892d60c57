"""The local stack for the ``stack`` tests: find the binaries, run them, wait for them.

The binaries come from ``collector-config/build-local-stack.sh``, which writes their paths to
``$COWORKER_STACK_STATE/stack.env`` (default: its cache directory) and ``ready`` or ``failed``
to ``status`` in the same directory. ``.ci/run`` starts that script in the background and the
tests wait for ``status`` to leave ``building`` (an event written by the script, checked
against the script's pid so that a killed build does not leave the tests waiting).

Without ``CI`` a missing part skips its tests with the command that builds it; with ``CI`` set
it fails them.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COLLECTOR_DIR = ROOT / "collector-config"
BUILD_SCRIPT = COLLECTOR_DIR / "build-local-stack.sh"
TOKEN_FILE = COLLECTOR_DIR / "secrets" / "ingest-token"
BUILD_TIMEOUT = float(os.environ.get("COWORKER_STACK_TIMEOUT", "3600"))
"""How long a test waits for a build still running (a cold CI build takes minutes)."""

T = TypeVar("T")


def unavailable(reason: str) -> None:
    """Fail under CI, skip elsewhere: a missing part of the stack is a CI failure."""
    if os.environ.get("CI"):
        pytest.fail(f"stack part missing under CI: {reason}")
    pytest.skip(f"DID NOT RUN: {reason} (build it: bash {BUILD_SCRIPT.relative_to(ROOT)})")


def state_dir() -> Path:
    """Where build-local-stack.sh writes ``status`` and ``stack.env``."""
    if os.environ.get("COWORKER_STACK_STATE"):
        return Path(os.environ["COWORKER_STACK_STATE"])
    if os.environ.get("COWORKER_STACK_CACHE"):
        return Path(os.environ["COWORKER_STACK_CACHE"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "coworker-stack"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build_log_tail(state: Path) -> str:
    for name in ("build.log", "phoenix.log"):
        log = state / name
        if log.is_file():
            return log.read_text(errors="replace")[-1500:]
    return ""


def load_stack() -> dict[str, str]:
    """The ``stack.env`` assignments, after waiting for a build in progress."""
    state = state_dir()
    status_file = state / "status"
    if not status_file.is_file():
        unavailable(f"no stack build found in {state}")
    deadline = time.monotonic() + BUILD_TIMEOUT
    while (status := status_file.read_text().strip()) == "building":
        pid_file = state / "pid"
        dead = pid_file.is_file() and not _pid_alive(int(pid_file.read_text().strip() or 0))
        # Re-read the status: the script may have finished between the two reads.
        if dead and status_file.read_text().strip() == "building":
            unavailable(f"the stack build died without a status\n{_build_log_tail(state)}")
        if time.monotonic() > deadline:
            pytest.fail(f"the stack build did not finish in {BUILD_TIMEOUT:.0f} s")
        time.sleep(1)
    env_file = state / "stack.env"
    # After a failed build the parts that did build are still listed: only the tests of the
    # missing part fail (Stack.binary), with the build log in the message.
    if status != "ready" and not env_file.is_file():
        unavailable(f"the stack build {status}\n{_build_log_tail(state)}")
    env: dict[str, str] = {"_BUILD_LOG": _build_log_tail(state) if status != "ready" else ""}
    for line in env_file.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    return env


@dataclass
class Stack:
    """Paths of the built binaries (empty string: that part was not built)."""

    env: dict[str, str]

    def binary(self, key: str) -> str:
        """The path of ``OTELCOL_BIN``, ``JAEGER_BIN``, ... or unavailable()."""
        path = self.env.get(key, "")
        if not path or not os.access(path, os.X_OK):
            unavailable(
                f"{key} is not built ({path or 'no path'})\n{self.env.get('_BUILD_LOG', '')}"
            )
        return path


# ------------------------------------------------------------------------------ processes
_handed_out: set[int] = set()
_port_rng = random.Random()


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, below the kernel's ephemeral range.

    A port from ``bind(0)`` lies in the ephemeral range, from which every outgoing connection
    (the collector's exporters, the tests' clients) takes its source port: one of them could
    take it before the server binds it ("address already in use", seen in CI). Ports below
    that range are only taken by servers; none is handed out twice in one test process.
    """
    low = _ephemeral_low()
    for _ in range(500):
        port = _port_rng.randrange(10_000, max(low, 10_001))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # no free port below the range: the old way
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A server process of the stack, its output in a log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    stop_timeout: float = 20
    """Seconds between SIGTERM and SIGKILL at teardown."""
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Proc:
        """Start (or restart) the process; its output goes to the log file (appended)."""
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is running"
        with self.log_path.open("ab") as log:
            log.write(f"\n--- start {self.argv}\n".encode())
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        """The running process's pid."""
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, wait; SIGKILL if it does not stop."""
        if not self.alive():
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=30)

    def kill9(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        assert self.popen is not None and self.alive(), f"{self.name} is not running"
        self.popen.kill()
        self.popen.wait(timeout=30)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the process's output."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


class Procs:
    """Every process a test started; all stopped at teardown, in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Proc] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> Proc:
        """Start ``argv`` as ``name``."""
        proc = Proc(name, argv, self.log_dir / f"{name}.log", **kwargs)
        self.started.append(proc)
        return proc.start()

    def logs(self) -> str:
        """The tails of every process's output (for failure messages)."""
        return "\n".join(f"===== {p.name}\n{p.log_tail()}" for p in self.started)

    def close(self) -> None:
        """Stop everything."""
        for proc in reversed(self.started):
            with contextlib.suppress(Exception):
                proc.stop(timeout=proc.stop_timeout)


def wait_until(
    condition: Callable[[], T | None],
    what: str,
    *,
    timeout: float = 60,
    interval: float = 0.2,
    procs: Procs | None = None,
    watch: tuple[Proc, ...] = (),
) -> T:
    """Poll ``condition`` until it returns a truthy value; fail with the logs after ``timeout``.

    A process in ``watch`` that exits stops the wait at once (it will not come back).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = condition()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            result, last_error = None, exc
        if result:
            return result
        dead = [p.name for p in watch if not p.alive()]
        if dead or time.monotonic() > deadline:
            logs = procs.logs() if procs else ""
            reason = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f} s"
            pytest.fail(f"{what}: {reason} (last error: {last_error!r})\n{logs}")
        time.sleep(interval)


def http_ok(url: str, **kwargs: Any) -> bool:
    """Whether GET ``url`` answers 2xx."""
    return httpx.get(url, timeout=5, **kwargs).is_success


# ------------------------------------------------------------------------------ configs
def load_yaml(path: Path) -> Any:
    """Parse a YAML file."""
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def write_yaml(path: Path, data: Any) -> Path:
    """Write ``data`` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def replace_at(config: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """Set ``config[path...] = value``, failing if the key is not already there.

    The tests substitute only addresses and paths of the shipped config; a renamed key must
    fail loudly instead of leaving the shipped value in place.
    """
    node: Any = config
    for key in path[:-1]:
        node = node[key]
    assert isinstance(node, dict) and path[-1] in node, f"the shipped config has no {path}"
    node[path[-1]] = value


@dataclass
class CollectorPorts:
    """The loopback ports one collector instance listens on."""

    grpc: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)
    health: int = field(default_factory=free_port)
    prometheus: int = field(default_factory=free_port)
    telemetry: int = field(default_factory=free_port)


def render_collector_config(
    *,
    ports: CollectorPorts,
    queue_dir: Path,
    jaeger: str,
    tempo: str,
    ingest: str,
    token_file: Path = TOKEN_FILE,
) -> dict[str, Any]:
    """collector-config/otelcol-config.yaml with only its addresses and paths substituted.

    Args:
        ports: where the collector listens (instead of 0.0.0.0:4317/4318/13133/8889/8888).
        queue_dir: the persistent audit queue (instead of /var/lib/otelcol/file_storage).
        jaeger: host:port of Jaeger's OTLP/gRPC receiver (instead of jaeger:4317).
        tempo: host:port of an OTLP/gRPC receiver standing in for Tempo (tempo:4317).
        ingest: base URL of `coworker audit serve` (instead of http://coworker-ingest:4319).
        token_file: the bearer token file (instead of the compose secret's mount point).
    """
    config = load_yaml(COLLECTOR_DIR / "otelcol-config.yaml")
    local = "127.0.0.1"
    replace_at(config, ("extensions", "health_check", "endpoint"), f"{local}:{ports.health}")
    replace_at(config, ("extensions", "bearertokenauth/coworker", "filename"), str(token_file))
    storage = ("extensions", "file_storage/audit")
    replace_at(config, (*storage, "directory"), str(queue_dir))
    replace_at(config, (*storage, "compaction", "directory"), str(queue_dir))
    otlp = ("receivers", "otlp", "protocols")
    replace_at(config, (*otlp, "grpc", "endpoint"), f"{local}:{ports.grpc}")
    replace_at(config, (*otlp, "http", "endpoint"), f"{local}:{ports.http}")
    replace_at(config, ("exporters", "otlp/jaeger", "endpoint"), jaeger)
    replace_at(config, ("exporters", "otlp/tempo", "endpoint"), tempo)
    replace_at(config, ("exporters", "prometheus", "endpoint"), f"{local}:{ports.prometheus}")
    replace_at(config, ("exporters", "otlphttp/coworker-audit", "endpoint"), ingest)
    (reader,) = config["service"]["telemetry"]["metrics"]["readers"]
    replace_at(reader, ("pull", "exporter", "prometheus", "host"), local)
    replace_at(reader, ("pull", "exporter", "prometheus", "port"), ports.telemetry)
    return config


def jaeger_config(*, otlp_grpc: int, query_http: int, query_grpc: int, health: int) -> Any:
    """collector-config/jaeger-local.yaml with its loopback ports substituted."""
    config = load_yaml(COLLECTOR_DIR / "jaeger-local.yaml")
    local = "127.0.0.1"
    extensions = config["extensions"]
    replace_at(extensions, ("healthcheckv2", "http", "endpoint"), f"{local}:{health}")
    replace_at(extensions, ("jaeger_query", "http", "endpoint"), f"{local}:{query_http}")
    replace_at(extensions, ("jaeger_query", "grpc", "endpoint"), f"{local}:{query_grpc}")
    replace_at(
        config, ("receivers", "otlp", "protocols", "grpc", "endpoint"), f"{local}:{otlp_grpc}"
    )
    return config


def coworker_cli() -> list[str]:
    """The ``coworker`` command of this interpreter's environment."""
    return [sys.executable, "-m", "coworker"]


def python_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python process: no inherited OTel exporter settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ servers
class OtlpSink:
    """An in-process OTLP/gRPC trace receiver (stands in for Tempo, which is not built here)."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self
        self.spans: list[Any] = []
        self._lock = threading.Lock()

        class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                with sink._lock:
                    for rs in request.resource_spans:
                        for ss in rs.scope_spans:
                            sink.spans.extend(ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        """host:port for an OTLP/gRPC exporter."""
        return f"127.0.0.1:{self.port}"

    def count(self) -> int:
        """Spans received so far."""
        with self._lock:
            return len(self.spans)

    def close(self) -> None:
        """Stop the server."""
        self.server.stop(grace=None)


@dataclass
class Jaeger:
    """A running Jaeger v2 with its ports."""

    proc: Proc
    otlp_grpc: int
    query_http: int

    @property
    def otlp_endpoint(self) -> str:
        """host:port of its OTLP/gRPC receiver."""
        return f"127.0.0.1:{self.otlp_grpc}"

    def find_spans(self, service: str, since: float) -> list[dict[str, Any]]:
        """Every span of ``service`` since ``since`` (UNIX time), via GET /api/v3/traces.

        Returns OTLP-JSON spans, each with its resource's attributes under ``"resource"``.
        """
        from datetime import UTC, datetime

        def rfc3339(t: float) -> str:
            return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        response = httpx.get(
            f"http://127.0.0.1:{self.query_http}/api/v3/traces",
            params={
                "query.service_name": service,
                "query.start_time_min": rfc3339(since - 60),
                "query.start_time_max": rfc3339(time.time() + 60),
                "query.num_traces": "1000",
            },
            timeout=10,
        )
        if response.status_code == 404:  # "trace not found": nothing stored yet
            return []
        response.raise_for_status()
        spans = []
        for rs in response.json()["result"]["resourceSpans"]:
            resource = otlp_attributes(rs.get("resource", {}).get("attributes", []))
            for ss in rs.get("scopeSpans", []):
                for span in ss.get("spans", []):
                    spans.append({**span, "attrs": otlp_attributes(span.get("attributes", [])),
                                  "resource": resource})  # fmt: skip
        return spans


def otlp_attributes(attributes: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP-JSON ``[{key, value: {stringValue: ...}}]`` as a plain dict."""
    out: dict[str, Any] = {}
    for kv in attributes:
        value = kv.get("value", {})
        if "stringValue" in value:
            out[kv["key"]] = value["stringValue"]
        elif "boolValue" in value:
            out[kv["key"]] = value["boolValue"]
        elif "intValue" in value:
            out[kv["key"]] = int(value["intValue"])
        elif "doubleValue" in value:
            out[kv["key"]] = float(value["doubleValue"])
        else:
            out[kv["key"]] = value
    return out


def start_jaeger(procs: Procs, stack: Stack, tmp_path: Path) -> Jaeger:
    """Start Jaeger v2 (memory storage) on free loopback ports; wait for its query API."""
    otlp_grpc, query_http = free_port(), free_port()
    config = jaeger_config(
        otlp_grpc=otlp_grpc, query_http=query_http, query_grpc=free_port(), health=free_port()
    )
    path = write_yaml(tmp_path / "jaeger.yaml", config)
    # Memory storage, nothing to flush: Jaeger's 10 s graceful shutdown is not worth waiting for.
    proc = procs.start("jaeger", [stack.binary("JAEGER_BIN"), f"--config={path}"], stop_timeout=2)
    wait_until(
        lambda: http_ok(f"http://127.0.0.1:{query_http}/api/v3/services"),
        "Jaeger's query API answers",
        procs=procs,
        watch=(proc,),
    )
    return Jaeger(proc, otlp_grpc, query_http)


@dataclass
class Collector:
    """The built collector running the shipped config (addresses substituted)."""

    proc: Proc
    ports: CollectorPorts
    config_path: Path

    @property
    def otlp_http(self) -> str:
        """Base URL of its OTLP/HTTP receiver."""
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def otlp_grpc(self) -> str:
        """URL of its OTLP/gRPC receiver."""
        return f"http://127.0.0.1:{self.ports.grpc}"

    def wait_ready(self, procs: Procs) -> None:
        """Wait for the health_check extension to report the collector ready."""
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{self.ports.health}/"),
            "the collector's health_check answers",
            procs=procs,
            watch=(self.proc,),
        )

    def internal_metric(self, name: str, **labels: str) -> float | None:
        """Sum of the collector's own metric ``name`` with ``labels`` (None: not exposed yet)."""
        text = httpx.get(f"http://127.0.0.1:{self.ports.telemetry}/metrics", timeout=5).text
        return prometheus_text_sum(text, name, labels)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def prometheus_text_sum(text: str, name: str, labels: dict[str, str]) -> float | None:
    """Sum of the samples of ``name`` matching ``labels`` in Prometheus text format."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) != name:
            continue
        sample_labels = dict(_LABEL.findall(match.group(2) or ""))
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
            found = True
    return total if found else None


def start_collector(
    procs: Procs,
    stack: Stack,
    tmp_path: Path,
    *,
    jaeger: str,
    tempo: str,
    ingest: str,
    name: str = "collector",
) -> Collector:
    """Start the built collector with the shipped config; wait until it is healthy."""
    queue_dir = tmp_path / f"{name}-queue"
    queue_dir.mkdir(exist_ok=True)
    ports = CollectorPorts()
    config = render_collector_config(
        ports=ports, queue_dir=queue_dir, jaeger=jaeger, tempo=tempo, ingest=ingest
    )
    path = write_yaml(tmp_path / f"{name}.yaml", config)
    proc = procs.start(name, [stack.binary("OTELCOL_BIN"), f"--config={path}"])
    collector = Collector(proc, ports, path)
    collector.wait_ready(procs)
    return collector


@dataclass
class Ingest:
    """A running `coworker audit serve`."""

    proc: Proc
    port: int
    url: str

    @property
    def base_url(self) -> str:
        """Its base URL (what the collector's otlphttp exporter is given)."""
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, procs: Procs) -> None:
        """Wait for GET /health to answer 200."""
        wait_until(
            lambda: http_ok(f"{self.base_url}/health"),
            "`coworker audit serve` answers /health",
            procs=procs,
            watch=(self.proc,),
        )


def start_ingest(procs: Procs, store_url: str, *, port: int | None = None) -> Ingest:
    """`coworker audit serve` on a free port with the shipped token file; wait for /health."""
    port = port or free_port()
    argv = [*coworker_cli(), "audit", "serve", "--url", store_url,
            "--listen", f"127.0.0.1:{port}", "--token-file", str(TOKEN_FILE),
            "--log-level", "warning"]  # fmt: skip
    proc = procs.start("ingest", argv, env=python_env())
    ingest = Ingest(proc, port, store_url)
    ingest.wait_ready(procs)
    return ingest


@dataclass
class Prometheus:
    """A running Prometheus scraping the collector."""

    proc: Proc
    port: int

    @property
    def api(self) -> str:
        """Base URL of its HTTP API."""
        return f"http://127.0.0.1:{self.port}/api/v1"

    def query(self, expr: str, **params: Any) -> list[dict[str, Any]]:
        """Evaluate ``expr`` (instant, or range with start/end/step); return the result list."""
        endpoint = "query_range" if "start" in params else "query"
        response = httpx.get(f"{self.api}/{endpoint}", params={"query": expr, **params}, timeout=30)
        body = response.json()
        assert body.get("status") == "success", (expr, body)
        result = body["data"]["result"]
        assert isinstance(result, list)
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` returns."""
        response = httpx.get(
            f"{self.api}/label/{label}/values", params={"match[]": match}, timeout=30
        )
        response.raise_for_status()
        return sorted(response.json()["data"])


def start_prometheus(
    procs: Procs, stack: Stack, tmp_path: Path, *, collector: Collector
) -> Prometheus:
    """Prometheus with the shipped prometheus.yaml, its targets pointed at ``collector``.

    Besides the targets only the intervals change (15 s → 1 s), so the test does not wait for
    slow scrapes.
    """
    config = load_yaml(COLLECTOR_DIR / "prometheus.yaml")
    replace_at(config, ("global", "scrape_interval"), "1s")
    replace_at(config, ("global", "evaluation_interval"), "1s")
    targets = {
        "collector:8889": f"127.0.0.1:{collector.ports.prometheus}",
        "collector:8888": f"127.0.0.1:{collector.ports.telemetry}",
    }
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [targets[t] for t in static["targets"]]
    path = write_yaml(tmp_path / "prometheus.yaml", config)
    port = free_port()
    argv = [stack.binary("PROMETHEUS_BIN"), f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    proc = procs.start("prometheus", argv)
    wait_until(
        lambda: http_ok(f"http://127.0.0.1:{port}/-/ready"),
        "Prometheus is ready",
        procs=procs,
        watch=(proc,),
    )
    return Prometheus(proc, port)
