"""The public names of `coworker` are the contract: pinned here."""

from __future__ import annotations

import pytest

import coworker

EXPECTED = [
    "BREAK_REASONS",
    "Agent",
    "AuditUnavailable",
    "BudgetExceeded",
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
    "record_usage",
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
    """Value errors are ValueErrors; nothing overlaps the OS's exceptions."""
    assert not issubclass(coworker.PermissionDenied, OSError)
    assert issubclass(coworker.RateLimited, coworker.PermissionDenied)
    assert issubclass(coworker.ValidationError, ValueError)
    assert issubclass(coworker.ConfigError, ValueError)
    for exc in (coworker.PermissionDenied, coworker.ValidationError, coworker.AuditUnavailable):
        assert issubclass(exc, coworker.CoworkerError)


def test_no_exception_is_an_os_error() -> None:
    """An application's ``except OSError`` around I/O does not swallow a denial (issue 11)."""
    import coworker.exceptions as exceptions

    for name in exceptions.__all__:
        assert not issubclass(getattr(exceptions, name), OSError), name
    policy = coworker.Policy.from_dict({"doctypes": {"Ledger": {"deny": ["delete"]}}})
    coworker.configure("t", policy=policy)
    try:

        @coworker.run(operation="delete", doctype="Ledger")
        def purge() -> None:
            raise AssertionError("the body must not run")

        with pytest.raises(coworker.PermissionDenied):
            try:
                with coworker.acting_as("admin-1"):
                    purge()
            except OSError:  # the retry-on-I/O-error pattern must not see the denial
                pytest.fail("PermissionDenied was caught by except OSError")
    finally:
        coworker.shutdown()


def test_audit_subpackage_is_lazy_attribute() -> None:
    """coworker.audit resolves on first access."""
    assert coworker.audit.verify_chain is not None
