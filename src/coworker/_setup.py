"""``coworker.configure`` and ``coworker.shutdown``: wiring coworker into OpenTelemetry.

The rule is OTel's: never take over an application's setup. ``configure`` installs a global
SDK ``TracerProvider`` only when none is set, and otherwise adds one processor of its own
(:class:`coworker._sdk.CoworkerProcessor`) to the existing SDK provider. Everything
``configure`` sets up lives inside that processor, so calling ``configure`` again replaces it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace

from coworker import _state, config
from coworker._run import finish_abandoned
from coworker._state import SETTINGS
from coworker.exceptions import ConfigError

__all__ = ["configure", "force_flush", "shutdown"]

_log = logging.getLogger(__name__)
_lock = threading.RLock()
_processor: Any = None  # the CoworkerProcessor on the provider, once added
_owns_provider = False
_audit_pipeline: Any = None
_checkpointer: Any = None  # coworker.audit.checkpointer.Checkpointer when checkpoint_key is set
_atexit_registered = False


def _sdk_disabled() -> bool:
    raw = os.environ.get("OTEL_SDK_DISABLED")
    return raw is not None and raw.strip().lower() == "true"


def configure(
    service_name: str | None = None,
    *,
    exporter: Any | Sequence[Any] | None = None,
    debug: bool | None = None,
    audit: Any = None,
    fail_closed: bool | None = None,
    audit_failure: str = "raise",
    policy: Any = None,
    require_identity: bool = False,
    state_changing_operations: Iterable[str] | None = None,
    sensitive_doctypes: Iterable[str] | None = None,
    redact: Iterable[str] | None = None,
    trace_payloads: str = "redacted",
    redaction: Any = None,
    capture_limit: int | None = None,
    flow_idle_timeout: float | None = None,
    trust_baggage_identity: bool | None = None,
    otlp: bool | None = None,
    metrics: bool = True,
    checkpoint_key: Any = None,
    checkpoint_every: Any = None,
    checkpoint_publish: Any = None,
    witnesses: Sequence[str] | None = None,
    flow_events: str | Iterable[str] | bool | None = None,
    flow_spans: bool | None = None,
    flow_span_max_duration: float | None = None,
    flow_seal: str = "deferred",
) -> None:
    """Set up coworker: the tracer provider, exporters, the audit trail and the policy.

    Each call describes the whole coworker setup and replaces the previous one (the
    application's own processors are never touched).

    Args:
        service_name: ``service.name`` of a provider coworker installs (default:
            ``OTEL_SERVICE_NAME``, else OTel's ``unknown_service``).
        exporter: a ``SpanExporter`` (added behind a ``BatchSpanProcessor``), a
            ``SpanProcessor`` (added as is), or a list of them: the operational trail.
        debug: record exception stack traces on spans (default: ``COWORKER_DEBUG``).
        audit: the audit store: a URL (``sqlite:///path.db``, ``postgresql://...``,
            ``memory://``), ``True`` for the default SQLite file
            (:data:`coworker.config.DEFAULT_AUDIT_PATH`), or an ``AuditStore``. Default:
            ``COWORKER_AUDIT_URL``, else no audit trail.
        fail_closed: write an intent record before each state-changing run and refuse to run
            it when that fails (default: ``COWORKER_AUDIT_FAIL_CLOSED``, else ``False``).
        audit_failure: what a failed audit append does at the end of a run: ``"raise"``
            (``AuditUnavailable`` propagates to the caller) or ``"log"`` (an error log line
            and an in-memory retry queue).
        policy: a ``coworker.Policy``, a path to a TOML/YAML policy file, a dict, or a
            ready ``coworker.acl.Enforcer`` (e.g. one built with a shared rate limiter).
        require_identity: with a policy, a run without a user is a denial.
        state_changing_operations: operations classified as ``state-change`` (replaces the
            default set: create, insert, update, delete, submit, cancel, amend, ...).
        sensitive_doctypes: doctypes whose reads are audited (``sensitive-read``), added to
            those the policy marks sensitive.
        redact: key fragments whose captured values are redacted (replaces the default).
        trace_payloads: what exporters (the trace backend) get of the captured input/output:
            ``"redacted"`` (default: by ``redaction``) or ``"none"``. The audit store gets
            them encrypted either way (docs/privacy.md). Exporters given as span processors
            are not wrapped.
        redaction: a :class:`coworker.redaction.Redactor` applied to every string attribute
            of exported spans (default: ``redact``'s keys, card numbers, e-mail addresses).
        capture_limit: maximum characters of a captured input/output (default 4096).
        flow_idle_timeout: seconds after which an idle ``ai-conversation`` flow breaks
            (default: ``COWORKER_FLOW_IDLE_TIMEOUT``, else 1800; 0 disables).
        trust_baggage_identity: accept identity from W3C baggage in ``coworker.extract``.
        otlp: add an OTLP exporter (default: when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
            ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set and coworker installed the
            provider, so that an application's own OTLP export is not doubled).
        metrics: record run metrics through the OTel metrics API (no-op without a
            ``MeterProvider``).
        checkpoint_key: a log key file (``coworker audit keygen``): sign C2SP checkpoints
            of the audit log in the background, one more at shutdown (``docs/proofs.md``).
        checkpoint_every: ``N`` records (default 1000, plus a 60 s idle heartbeat), ``"Ts"``
            seconds, or ``(N, T)``.
        checkpoint_publish: a directory (or several) each new checkpoint is written to,
            e.g. a WORM share; failures are logged and retried, never block appends.
        witnesses: C2SP tlog-witness URLs asked to cosign each checkpoint (needs
            ``checkpoint_key``); a refusal is logged, 409 meaning it saw another tree.
        flow_events: the flow types whose lifecycle (started, steps, breaks, end, seal) is
            written to the audit log (docs/flows.md): flow type names, ``True`` / ``"all"``
            for every type, ``False`` / ``"none"`` for none. Default:
            ``COWORKER_FLOW_EVENTS``, else ``workflow`` only. Needs an audit trail.
        flow_spans: give flows, steps and conversation turns spans of their own, so that a
            workflow is one trace and a turn is one trace (docs/observability.md, "Trace
            shape"). Default: ``COWORKER_FLOW_SPANS``, else ``True``; ``False`` keeps every
            top-level run its own trace.
        flow_span_max_duration: seconds after which an open flow or turn span is ended and
            continued by a linked span (so long-lived flows show as complete traces).
            Default: ``COWORKER_FLOW_SPAN_MAX_DURATION``, else 300; 0 turns it off.
        flow_seal: when a flow's end (completed, failed, broken) and its seal are written:
            ``"deferred"`` (default: with the next record any flow writes, within 50 ms at
            the latest, and at ``force_flush``/``shutdown``; costs no transaction) or
            ``"wait"`` (durable before the flow block exits: two transactions per flow).

    Raises:
        ConfigError: a setting is invalid (the message names it). Security-relevant settings
            (audit store, policy) fail here rather than fall back.
    """
    global _processor, _owns_provider, _audit_pipeline, _atexit_registered, _checkpointer
    # Validate and build everything first, apply last: a configure() that raises leaves the
    # previous configuration (policy, audit trail, exporters) fully in force.
    if audit_failure not in ("raise", "log"):
        raise ConfigError(f"audit_failure={audit_failure!r}: use 'raise' or 'log'")
    if capture_limit is not None and (not isinstance(capture_limit, int) or capture_limit < 16):
        raise ConfigError(f"capture_limit={capture_limit!r}: must be an int >= 16")
    from coworker import _flow_events

    event_types = _flow_events.parse_types(
        flow_events if flow_events is not None else os.environ.get(config.COWORKER_FLOW_EVENTS)
    )
    if flow_seal not in ("deferred", "wait"):
        raise ConfigError(f"flow_seal={flow_seal!r}: use 'deferred' or 'wait'")
    if flow_idle_timeout is not None and flow_idle_timeout < 0:
        raise ConfigError(f"flow_idle_timeout={flow_idle_timeout!r} must be >= 0")
    if flow_spans is not None and not isinstance(flow_spans, bool):
        raise ConfigError(f"flow_spans={flow_spans!r}: use True or False")
    if flow_span_max_duration is not None and (
        isinstance(flow_span_max_duration, bool)
        or not isinstance(flow_span_max_duration, int | float)
        or not flow_span_max_duration >= 0
    ):
        raise ConfigError(
            f"flow_span_max_duration={flow_span_max_duration!r} must be a number of seconds >= 0"
        )
    if service_name is not None:
        from coworker.identity import text

        try:  # it ends in every audit record (``service``)
            service_name = text(service_name, "service_name")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if witnesses and checkpoint_key is None:
        raise ConfigError("witnesses=... cosign checkpoints: they need checkpoint_key=...")
    with _lock:
        debug = config.resolve(debug, config.COWORKER_DEBUG, False, config.parse_bool)
        spans_on = config.resolve(flow_spans, config.COWORKER_FLOW_SPANS, True, config.parse_bool)
        span_bound = config.resolve(
            flow_span_max_duration,
            config.COWORKER_FLOW_SPAN_MAX_DURATION,
            300.0,
            config.parse_seconds,
        )
        fail_closed = config.resolve(
            fail_closed, config.COWORKER_AUDIT_FAIL_CLOSED, False, config.parse_bool
        )
        if audit is None:
            audit = os.environ.get(config.COWORKER_AUDIT_URL) or None
        if audit is True:
            audit = "sqlite:///" + config.DEFAULT_AUDIT_PATH
        wants_audit = audit not in (None, False)
        if fail_closed and not wants_audit:
            raise ConfigError("fail_closed=True needs an audit store (audit=...)")
        disabled = _sdk_disabled()
        if disabled and wants_audit:
            # The audit trail is built from spans: without the SDK there would be none, and
            # fail-closed would protect nothing. A security setting fails fast.
            raise ConfigError(
                f"OTEL_SDK_DISABLED=true, but audit={audit!r} is configured: the audit trail "
                "is built from spans, so it would be silently off; unset one of the two"
            )
        enforcer = None
        if policy is not None or require_identity:
            from coworker.acl import build_enforcer

            enforcer = build_enforcer(policy, require_identity=require_identity)
        sensitive = set(sensitive_doctypes or ())
        if enforcer is not None:
            sensitive |= set(getattr(enforcer, "sensitive_doctypes", ()))

        members: list[Any] = []
        pipeline = None
        checkpointer = None
        provider: Any = None
        if not disabled:
            from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = trace.get_tracer_provider()
            if not isinstance(provider, trace.ProxyTracerProvider | TracerProvider):
                raise ConfigError(
                    f"the global tracer provider is a {type(provider).__name__}, not the OTel "
                    "SDK's TracerProvider: coworker cannot add its processors to it"
                )
            will_own = _owns_provider or isinstance(provider, trace.ProxyTracerProvider)
            exporters: list[Any] = (
                []
                if exporter is None
                else (list(exporter) if isinstance(exporter, list | tuple) else [exporter])
            )
            if otlp or (otlp is None and will_own and _otlp_env_set()):
                exporters.append(_otlp_exporter())
            if wants_audit:
                from coworker.audit.pipeline import build_pipeline

                pipeline = build_pipeline(audit, fail_closed=fail_closed, on_failure=audit_failure)
                members.append(pipeline.processor)
                from coworker.audit.usage import UsageLedgerProcessor  # usage (issue 16)

                members.append(UsageLedgerProcessor(pipeline.exporter))  # usage (issue 16)
                if checkpoint_key is not None:
                    from coworker.audit.checkpointer import start_from_config

                    try:
                        checkpointer = start_from_config(
                            pipeline.store,
                            checkpoint_key,
                            checkpoint_every,
                            checkpoint_publish,
                            witnesses,
                        )
                    except BaseException:
                        pipeline.shutdown()  # a bad key leaves the old configuration in force
                        raise
            elif checkpoint_key is not None:
                raise ConfigError("checkpoint_key=... needs an audit store (audit=...)")
            if metrics:
                from coworker.metrics import RunMetricsProcessor

                members.append(RunMetricsProcessor())
            if exporters:
                from coworker.redaction import RedactingSpanExporter, Redactor

                rules = redaction if redaction is not None else Redactor(keys=redact)
            for item in exporters:
                members.append(
                    item
                    if isinstance(item, SpanProcessor)
                    else BatchSpanProcessor(RedactingSpanExporter(item, rules, trace_payloads))
                )

        # Flow events queued for the current audit trail go there first (they belong with
        # its runs): a store that cannot take them fails configure() here, the previous
        # configuration still in force and the events still queued, not half-applied.
        try:
            _flow_events.flush()
        except BaseException:
            if checkpointer is not None:
                checkpointer.close()
            if pipeline is not None:
                pipeline.shutdown()
            raise

        # -- apply ----------------------------------------------------------------------
        s = SETTINGS
        s.debug = debug
        s.policy = enforcer
        if state_changing_operations is not None:
            s.state_changing = frozenset(o.lower() for o in state_changing_operations)
        s.sensitive_doctypes = frozenset(sensitive)
        if redact is not None:
            s.redact = tuple(r.lower() for r in redact)
        if capture_limit is not None:
            s.capture_limit = capture_limit
        if flow_idle_timeout is not None:
            s.flow_idle_timeout = flow_idle_timeout
        if trust_baggage_identity is not None:
            s.trust_baggage_identity = trust_baggage_identity
        s.flow_spans = spans_on
        s.flow_span_max_duration = float(span_bound)
        if disabled:
            _log.info("OTEL_SDK_DISABLED=true: coworker runs create no spans; policy still applies")
            s.audit_gate = None
            s.audit_records = False
            return
        provider = _install_provider(provider, service_name)
        if _processor is None:
            from coworker._sdk import CoworkerProcessor

            _processor = CoworkerProcessor()
            provider.add_span_processor(_processor)
        old = _processor.replace(members)
        old_pipeline, _audit_pipeline = _audit_pipeline, pipeline
        s.audit_gate = pipeline.gate if pipeline is not None and fail_closed else None
        s.audit_records = pipeline is not None
        usage_rules = getattr(getattr(enforcer, "policy", None), "usage", None)  # usage (16)
        if usage_rules is not None:  # budgets count the other processes' ledger records too
            usage_rules.share(pipeline.store if pipeline is not None else None)
        if pipeline is not None:  # flow events (issue 14): queued ones go to the old writer
            _flow_events.install(
                pipeline.exporter.writer, event_types, wait_seal=flow_seal == "wait"
            )
        else:
            _flow_events.uninstall()
        _shutdown_members(old, old_pipeline)
        # After the pipeline flushed: the last checkpoint covers every record it wrote.
        old_checkpointer, _checkpointer = _checkpointer, checkpointer
        if old_checkpointer is not None:
            old_checkpointer.close()
        _state.TRACER.reset()
        if not _atexit_registered:
            # The SDK provider flushes at exit too; this covers a provider that was created
            # with shutdown_on_exit=False by the application.
            atexit.register(shutdown)
            # atexit runs last-registered first: abandoned generators end their spans (and
            # write their records) before shutdown closes the audit trail.
            atexit.register(finish_abandoned)
            _atexit_registered = True


def _install_provider(provider: Any, service_name: str | None) -> Any:
    """Install an SDK provider when none is set; otherwise keep the application's."""
    global _owns_provider
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    from coworker._sdk import PrivateRandomIdGenerator

    if isinstance(provider, trace.ProxyTracerProvider):
        resource = Resource.create({SERVICE_NAME: service_name} if service_name else {})
        mine = TracerProvider(resource=resource, id_generator=PrivateRandomIdGenerator())
        trace.set_tracer_provider(mine)
        provider = trace.get_tracer_provider()
        _owns_provider = provider is mine  # False if the app won a race to set its own
    if service_name and not _owns_provider:
        current = provider.resource.attributes.get(SERVICE_NAME)
        if current != service_name:
            _log.warning(
                "configure(service_name=%r) ignored: the application's provider already "
                "names the service %r",
                service_name,
                current,
            )
    return provider


def _otlp_env_set() -> bool:
    if "none" in os.environ.get("OTEL_TRACES_EXPORTER", "").lower().split(","):
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _otlp_exporter() -> Any:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/json":
        # The OTel Python exporters have no JSON encoding; say so rather than send protobuf
        # silently (the operational trail is a tuning knob: warn and fall back).
        _log.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=http/json is not supported by the OTel Python "
            "exporters; sending http/protobuf to the same endpoint"
        )
        protocol = "http/protobuf"
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPExporter,
        )

        return HTTPExporter()
    raise ConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or http/protobuf (http/json falls "
        "back to http/protobuf)"
    )


def _shutdown_members(members: Iterable[Any], pipeline: Any) -> None:
    for member in members:
        try:
            member.shutdown()
        except Exception:
            _log.exception("coworker: shutting down %r failed", member)
    if pipeline is not None:
        pipeline.shutdown()


def force_flush(timeout_millis: int = 30000) -> bool:
    """Export everything coworker's processors hold; ``True`` when all succeeded."""
    from coworker import _flow_events

    with _lock:
        _flow_events.flush()
        return _processor.force_flush(timeout_millis) if _processor is not None else True


def shutdown() -> None:
    """Flush and close what :func:`configure` set up (exporters, the audit store).

    The tracer provider stays (it may be the application's); runs keep working and are
    exported by whatever the provider still has. Safe to call more than once.
    """
    from coworker import _flow_events

    global _audit_pipeline, _checkpointer
    with _lock:
        SETTINGS.audit_gate = None
        SETTINGS.audit_records = False
        _flow_events.uninstall()
        old = _processor.replace(()) if _processor is not None else ()
        pipeline, _audit_pipeline = _audit_pipeline, None
        _shutdown_members(old, pipeline)
        checkpointer, _checkpointer = _checkpointer, None
        if checkpointer is not None:
            checkpointer.close()  # one last checkpoint, after the pipeline flushed


# One reset for all process-wide state: coworker._state.reset() shuts down what configure()
# installed too (the processor stays on the provider, emptied, and is reused by the next
# configure(): an SDK provider cannot drop a processor).
_state.on_reset(shutdown)


def audit_store() -> Any:
    """The audit store of the current configuration, or ``None``."""
    return _audit_pipeline.store if _audit_pipeline is not None else None


def _settings_snapshot() -> Mapping[str, Any]:  # used by tests and the demo
    return {name: getattr(SETTINGS, name) for name in SETTINGS.__slots__}
