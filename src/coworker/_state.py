"""Process-wide state read on the hot path: the settings and coworker's tracer; one reset().

:data:`SETTINGS` is one mutable object with ``__slots__`` so that a run reads plain
attributes. The hooks (``policy``, ``audit_gate``) are ``None`` unless configured, so an
unconfigured run pays one attribute read for each. :data:`TRACER` caches coworker's tracer of
the global SDK provider. :func:`reset` puts both back to what an unconfigured process has,
and calls the resets other modules registered with :func:`on_reset` (:mod:`coworker._setup`:
what ``configure`` installed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from opentelemetry import trace

from coworker._version import __version__

DEFAULT_STATE_CHANGING: Final = frozenset(
    {
        "create",
        "insert",
        "update",
        "delete",
        "submit",
        "cancel",
        "amend",
        "rename",
        "import",
        "write",
        "patch",
        "merge",
        "approve",
        "reject",
        "restore",
        "archive",
    }
)
"""Operations classified as ``state-change`` by default (configurable)."""

DEFAULT_READ_OPERATIONS: Final = frozenset(
    {"select", "read", "get", "list", "view", "search", "export", "download", "query", "report"}
)
"""Operations that count as reads for ``sensitive-read`` classification."""

DEFAULT_REDACT: Final = (
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "api_key",
    "apikey",
    "api-key",
    "cookie",
    "credential",
    "private_key",
    "session_key",
    "ssn",
)
"""Key fragments (case-insensitive substring) whose values capture replaces with ``[REDACTED]``."""


class Settings:
    """The live settings; see :func:`coworker.configure` for each one's meaning."""

    __slots__ = (
        "audit_gate",
        "audit_records",
        "capture_limit",
        "debug",
        "flow_idle_timeout",
        "flow_span_max_duration",
        "flow_spans",
        "policy",
        "read_operations",
        "redact",
        "sensitive_doctypes",
        "state_changing",
        "trust_baggage_identity",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to the defaults (what an unconfigured process has)."""
        from coworker import config

        self.debug: bool = config.resolve(None, config.COWORKER_DEBUG, False, config.parse_bool)
        self.policy: Any = None
        self.audit_gate: Any = None
        # An audit pipeline is configured: coworker's runs are recorded even when the trace
        # sampler drops them (coworker._sdk.AuditSampler).
        self.audit_records: bool = False
        self.state_changing: frozenset[str] = DEFAULT_STATE_CHANGING
        self.read_operations: frozenset[str] = DEFAULT_READ_OPERATIONS
        self.sensitive_doctypes: frozenset[str] = frozenset()
        self.redact: tuple[str, ...] = DEFAULT_REDACT
        self.capture_limit: int = 4096
        self.flow_idle_timeout: float = config.resolve(
            None, config.COWORKER_FLOW_IDLE_TIMEOUT, 1800.0, config.parse_seconds
        )
        # Flow, step and turn spans (coworker._flow_spans, issue 13).
        self.flow_spans: bool = config.resolve(
            None, config.COWORKER_FLOW_SPANS, True, config.parse_bool
        )
        self.flow_span_max_duration: float = config.resolve(
            None, config.COWORKER_FLOW_SPAN_MAX_DURATION, 300.0, config.parse_seconds
        )
        self.trust_baggage_identity: bool = config.resolve(
            None, config.COWORKER_TRUST_BAGGAGE_IDENTITY, False, config.parse_bool
        )


SETTINGS: Final = Settings()


class TracerCache:
    """coworker's tracer of the global SDK provider, resolved on first use."""

    __slots__ = ("tracer",)

    def __init__(self) -> None:
        self.tracer: trace.Tracer | None = None

    def resolve(self) -> trace.Tracer | None:
        """The tracer of the global SDK provider, or ``None`` while there is none."""
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):
            # No SDK yet: nothing is cached, so runs pick up a provider the app sets later.
            return None
        tracer = provider.get_tracer("coworker", __version__)
        gen = getattr(tracer, "id_generator", None)
        if gen is not None and type(gen).__name__ == "RandomIdGenerator":
            from coworker._sdk import PrivateRandomIdGenerator

            # Only our own tracer's generator: the application's tracers are left alone.
            tracer.id_generator = PrivateRandomIdGenerator()  # type: ignore[attr-defined]
        if SETTINGS.audit_records and getattr(tracer, "sampler", None) is not None:
            from coworker._sdk import wrap_sampler

            # The audit trail must not depend on the sampler: see coworker._sdk.AuditSampler.
            # Only while an audit pipeline is configured (configure() resets this cache
            # after setting audit_records): without one, runs skip its extra call.
            wrap_sampler(tracer)
        self.tracer = tracer
        return tracer

    def reset(self) -> None:
        """Forget the cached tracer (after the global provider changed)."""
        self.tracer = None


TRACER: Final = TracerCache()


def api_tracer() -> trace.Tracer:
    """A tracer of whatever provider is global now (a no-op one without an SDK)."""
    return trace.get_tracer("coworker", __version__)


_RESETS: Final[list[Callable[[], None]]] = []
"""What other modules holding process-wide state registered with :func:`on_reset`."""


def on_reset(fn: Callable[[], None]) -> None:
    """Have :func:`reset` call ``fn`` (a module that holds process-wide state registers its
    own reset here, so that one ``reset()`` covers all of it)."""
    _RESETS.append(fn)


def reset() -> None:
    """Back to an unconfigured process: what ``configure`` installed shut down and
    forgotten (processors' members, the audit pipeline, flow events, the checkpointer),
    default settings, no cached tracer."""
    for fn in _RESETS:
        fn()
    SETTINGS.reset()
    TRACER.reset()
