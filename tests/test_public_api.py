"""The public names of `coworker` are the contract: pinned here."""

from __future__ import annotations

import coworker

EXPECTED = [
    "BREAK_REASONS",
    "Agent",
    "AuditUnavailable",
    "ConfigError",
    "Conversation",
    "CoworkerError",
    "Flow",
    "Identity",
    "PermissionDenied",
    "Policy",
    "RateLimited",
    "Run",
    "User",
    "ValidationError",
    "WorkflowDefinition",
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
    "run",
    "shutdown",
    "step",
    "workflow",
]


def test_all_is_pinned_and_sorted() -> None:
    """__all__ lists exactly the documented names (ruff's isort-style order)."""
    assert coworker.__all__ == EXPECTED


def test_every_public_name_resolves_and_is_documented() -> None:
    """Each name exists and carries a docstring."""
    for name in coworker.__all__:
        obj = getattr(coworker, name)
        if not isinstance(obj, tuple):
            assert obj.__doc__, name


def test_exception_tree() -> None:
    """Exceptions subclass the stdlib types users already catch."""
    assert issubclass(coworker.PermissionDenied, PermissionError)
    assert issubclass(coworker.RateLimited, coworker.PermissionDenied)
    assert issubclass(coworker.ValidationError, ValueError)
    assert issubclass(coworker.ConfigError, ValueError)
    for exc in (coworker.PermissionDenied, coworker.ValidationError, coworker.AuditUnavailable):
        assert issubclass(exc, coworker.CoworkerError)


def test_audit_subpackage_is_lazy_attribute() -> None:
    """coworker.audit resolves on first access."""
    assert coworker.audit.verify_chain is not None
