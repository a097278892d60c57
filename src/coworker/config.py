"""The ``COWORKER_*`` environment variables, each with what it means, and how they resolve.

Precedence everywhere: an explicit argument to :func:`coworker.configure`, then the
environment variable, then the documented default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Final, TypeVar

from coworker.exceptions import ConfigError

__all__ = [
    "COWORKER_AUDIT_FAIL_CLOSED",
    "COWORKER_AUDIT_URL",
    "COWORKER_DEBUG",
    "COWORKER_FLOW_EVENTS",
    "COWORKER_FLOW_IDLE_TIMEOUT",
    "COWORKER_FLOW_SPANS",
    "COWORKER_FLOW_SPAN_MAX_DURATION",
    "COWORKER_TRACE_VIEWER_URL",
    "COWORKER_TRUST_BAGGAGE_IDENTITY",
    "DEFAULT_AUDIT_PATH",
    "parse_bool",
    "resolve",
]

_log = logging.getLogger(__name__)

COWORKER_DEBUG: Final = "COWORKER_DEBUG"
"""``1``/``true``: record exception stack traces on spans (off by default: stack traces can
carry data and cost time)."""

COWORKER_AUDIT_URL: Final = "COWORKER_AUDIT_URL"
"""Where the audit trail goes: ``sqlite:///path/audit.db``, ``postgresql://...`` or
``memory://``."""

COWORKER_AUDIT_FAIL_CLOSED: Final = "COWORKER_AUDIT_FAIL_CLOSED"
"""``1``/``true``: write an intent record before each state-changing run and refuse to run it
(``AuditUnavailable``) when that write fails."""

COWORKER_FLOW_IDLE_TIMEOUT: Final = "COWORKER_FLOW_IDLE_TIMEOUT"
"""Seconds of inactivity after which the next run of an ``ai-conversation`` flow breaks it
with reason ``timeout`` (default 1800; ``0`` turns it off)."""

COWORKER_FLOW_EVENTS: Final = "COWORKER_FLOW_EVENTS"
"""Flow types whose lifecycle is written to the audit log as flow events (docs/flows.md):
a comma-separated list (default ``workflow``), ``all`` or ``none``."""

COWORKER_FLOW_SPANS: Final = "COWORKER_FLOW_SPANS"
"""``0``/``false``: no flow, step and turn spans; every top-level run is its own trace, as
before issue 13 (default on: a workflow is one trace)."""

COWORKER_FLOW_SPAN_MAX_DURATION: Final = "COWORKER_FLOW_SPAN_MAX_DURATION"
"""Seconds after which an open flow (or turn) span is ended and continued by a linked span, so
that trace viewers get complete traces of long-lived flows (default 300; ``0`` turns it off)."""

COWORKER_TRUST_BAGGAGE_IDENTITY: Final = "COWORKER_TRUST_BAGGAGE_IDENTITY"
"""``1``/``true``: accept ``user.id`` / agent identity that arrives in W3C baggage from another
process (off by default: baggage is caller-controlled)."""

COWORKER_TRACE_VIEWER_URL: Final = "COWORKER_TRACE_VIEWER_URL"
"""Where people look at the traces (Phoenix ``http://127.0.0.1:6006``, Jaeger
``http://127.0.0.1:16686``, Grafana ...): ``coworker demo`` prints it with the flow ids to
search for. Unset, an OTLP endpoint on port 6006 (Phoenix takes OTLP/HTTP on its UI port) is
taken as the viewer."""

DEFAULT_AUDIT_PATH: Final = os.path.join(".coworker", "audit.db")
"""The embedded SQLite audit store used by ``coworker demo`` and by ``configure(audit=True)``:
``./.coworker/audit.db`` relative to the working directory."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

T = TypeVar("T")


def parse_bool(name: str, value: str) -> bool:
    """Parse a boolean environment value, naming the variable on error.

    Raises:
        ConfigError: the value is not one of 1/0, true/false, yes/no, on/off.
    """
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (use true or false)")


def resolve(arg: T | None, env: str, default: T, parse: Callable[[str, str], T]) -> T:
    """Return ``arg`` if given, else the parsed environment variable ``env``, else ``default``.

    Args:
        arg: the explicit argument (``None`` means not given).
        env: the environment variable name.
        default: the documented default.
        parse: ``parse(name, raw)`` converting the raw string; raises ConfigError when bad.
    """
    if arg is not None:
        return arg
    raw = os.environ.get(env)
    if raw is None:
        return default
    return parse(env, raw)


def parse_seconds(name: str, value: str) -> float:
    """Parse a non-negative number of seconds, naming the variable on error."""
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number of seconds") from None
    if seconds < 0:
        raise ConfigError(f"{name}={value!r} must not be negative")
    return seconds
