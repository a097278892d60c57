"""coworker: OpenTelemetry spans that say which flow, which step, which run, which user and
which AI agent — and a tamper-evident audit trail of the runs that change state.

Quick start::

    import coworker

    coworker.configure("billing", audit="sqlite:///audit.db")

    @coworker.run(operation="update", doctype="Invoice")
    def set_amount(invoice_id: str, amount: int) -> None: ...

    with coworker.acting_as("user-456", agent="agent-789", agent_name="billing-assistant"):
        with coworker.flow("api-request"):
            set_amount("INV-1", 120)

``import coworker`` loads only the OpenTelemetry API; the SDK, the audit stores and the CLI
are imported when :func:`configure` or the ``coworker`` command needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coworker._run import Run, RunOptions, current_run, run
from coworker._setup import configure, force_flush, shutdown
from coworker._version import __version__
from coworker.conversations import Conversation, TurnBlock, conversation
from coworker.exceptions import (
    AuditUnavailable,
    BudgetExceeded,
    ConfigError,
    CoworkerError,
    PermissionDenied,
    RateLimited,
    ValidationError,
)
from coworker.flow import (
    BREAK_REASONS,
    Flow,
    FlowBlock,
    StepBlock,
    WorkflowDefinition,
    break_flow,
    current_flow,
    current_step,
    flow,
    step,
    workflow,
)
from coworker.identity import Agent, Identity, IdentityBlock, User, acting_as, current_identity
from coworker.propagation import Extracted, extract, inject, propagate

if TYPE_CHECKING:
    from coworker.acl import Policy
    from coworker.usage import record_usage

__all__ = [
    "BREAK_REASONS",
    "Agent",
    "AuditUnavailable",
    "BudgetExceeded",
    "ConfigError",
    "Conversation",
    "CoworkerError",
    "Extracted",
    "Flow",
    "FlowBlock",
    "Identity",
    "IdentityBlock",
    "PermissionDenied",
    "Policy",
    "RateLimited",
    "Run",
    "RunOptions",
    "StepBlock",
    "TurnBlock",
    "User",
    "ValidationError",
    "WorkflowDefinition",
    "__version__",
    "acting_as",
    "break_flow",
    "configure",
    "conversation",
    "current_flow",
    "current_identity",
    "current_run",
    "current_step",
    "extract",
    "flow",
    "force_flush",
    "inject",
    "propagate",
    "record_usage",
    "run",
    "shutdown",
    "step",
    "workflow",
]


def __getattr__(name: str) -> Any:
    # Lazy: the policy loader and the audit package stay out of ``import coworker``.
    if name == "Policy":
        from coworker.acl import Policy

        return Policy
    if name == "record_usage":  # usage (issue 16): decimal/pricing stay out of the import
        from coworker.usage import record_usage

        # Bound once: a module __getattr__ runs on every coworker.record_usage otherwise.
        globals()["record_usage"] = record_usage
        return record_usage
    if name == "audit":
        import importlib

        return importlib.import_module("coworker.audit")
    raise AttributeError(f"module 'coworker' has no attribute {name!r}")
