"""The demo's workload as an app that exports traces AND metrics over OTLP (stack tests).

``coworker demo`` installs no ``MeterProvider``, so the library's own metrics would never
reach the collector. This app gives the process one (OTLP/HTTP, 1 s export interval), writes
the audit trail in-process to PostgreSQL through a TCP proxy that it cuts once at the start
(so the outage spool opens and ``coworker.audit.spool.depth`` is observed, as in an app that
lived through a database outage), then runs the demo's order workflow and AI conversation in
a loop until ``--stop-file`` exists or ``--max-seconds`` pass.

    python -m tests.stack.metrics_app --service S --pg URL --spool PATH --stop-file PATH
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def main(argv: list[str] | None = None) -> int:
    """Run the workload; return 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", required=True)
    parser.add_argument("--pg", required=True, help="PostgreSQL store URL (a schema= URL)")
    parser.add_argument("--spool", required=True, help="the store's outage spool file")
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--ready-file", required=True, help="written after the first iteration")
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args(argv)

    from opentelemetry import metrics
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    import coworker
    from coworker import _demo
    from tests.pg import TcpProxy, with_hostport

    # The global MeterProvider must exist before configure(): the library reads it lazily.
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=1000)
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": args.service})
    )
    metrics.set_meter_provider(provider)

    target = urlsplit(args.pg)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    url = with_hostport(args.pg, "127.0.0.1", proxy.port) + f"&spool={args.spool}"
    proxy.cut()  # the database is "down" for the first records: they go to the spool
    coworker.configure(args.service, audit=url)
    stop, deadline = Path(args.stop_file), time.monotonic() + args.max_seconds
    first = True
    try:
        while not stop.exists() and time.monotonic() < deadline:
            _demo._gateway_calls["n"] = 0  # the payment gateway times out once per order
            _demo.process_order("ORD-1001")
            _demo.assistant_chat()
            if first:
                proxy.restore()  # back up: the spool ships to PostgreSQL
                Path(args.ready_file).write_text("1")
                first = False
            time.sleep(0.5)
    finally:
        coworker.shutdown()
        provider.shutdown()
        proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
