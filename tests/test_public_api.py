"""The public names of `coworker` are the contract: pinned here."""

from __future__ import annotations

import types

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


def test_all_is_pinned_and_sorted() -> None:
    """__all__ lists exactly the documented names (ruff's isort-style order)."""
    assert coworker.__all__ == EXPECTED


_LAZY = {"Policy", "record_usage"}  # resolved by coworker.__getattr__ (kept out of import)
_NOT_API = {"annotations", "TYPE_CHECKING", "Any"}  # the module's own imports


def test_all_is_exactly_the_public_namespace() -> None:
    """Every public name the package defines is in __all__, and nothing else (as httpx's
    test_exported_members pins it from vars())."""
    public = {
        name
        for name, value in vars(coworker).items()
        if (not name.startswith("_") or name == "__version__")
        and not isinstance(value, types.ModuleType)
        and name not in _NOT_API
    }
    assert sorted(coworker.__all__) == sorted(public | _LAZY)


def test_public_functions_return_exported_types() -> None:
    """What flow(), step(), acting_as(), run(...), turns and extract() return is exported, so
    applications can annotate what they hold."""
    assert type(coworker.flow("batch-job")) is coworker.FlowBlock
    assert type(coworker.workflow("w", ["a"]).start()) is coworker.FlowBlock
    assert type(coworker.step("s")) is coworker.StepBlock
    assert type(coworker.acting_as("u")) is coworker.IdentityBlock
    assert type(coworker.run("r")) is coworker.RunOptions
    assert type(coworker.run(operation="update")) is coworker.RunOptions
    assert type(coworker.conversation("c").turn()) is coworker.TurnBlock
    assert type(coworker.extract({})) is coworker.Extracted
    with coworker.run("r") as r:
        assert type(r) is coworker.Run


def test_version_has_one_source() -> None:
    """coworker.__version__ is the installed distribution's version (pyproject reads it from
    coworker._version)."""
    from importlib.metadata import version

    assert coworker.__version__ == version("coworker-otel")


def test_every_public_name_resolves_and_is_documented() -> None:
    """Each name exists and carries a docstring."""
    for name in coworker.__all__:
        obj = getattr(coworker, name)
        if not isinstance(obj, tuple | str):
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
