"""Process-wide settings read on the hot path, set by :func:`coworker.configure`.

One mutable object with ``__slots__`` so that the decorator reads plain attributes. The hooks
(``policy``, ``audit_gate``) are ``None`` unless configured, so an unconfigured run pays one
attribute read for each.
"""

from __future__ import annotations

from typing import Any, Final

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
        self.trust_baggage_identity: bool = config.resolve(
            None, config.COWORKER_TRUST_BAGGAGE_IDENTITY, False, config.parse_bool
        )


SETTINGS: Final = Settings()
