"""The exceptions coworker raises, as one tree.

```
CoworkerError
├── ConfigError (also ValueError)       bad argument or setting; raised at construction
├── PermissionDenied                    the policy refused a run; audited
│   └── RateLimited                     too many runs of an operation class in a window; audited
│       └── BudgetExceeded              a usage budget (tokens or cost) is spent; audited
├── ValidationError (also ValueError)   a business rule raised by application code; audited
└── AuditUnavailable                    an audit record could not be made durable
```

Nothing here subclasses ``OSError`` (or ``PermissionError``): an application's
``except OSError: retry()`` around I/O must never swallow an access-control denial.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuditUnavailable",
    "BudgetExceeded",
    "ConfigError",
    "CoworkerError",
    "PermissionDenied",
    "RateLimited",
    "ValidationError",
]


class CoworkerError(Exception):
    """Base class of every exception coworker raises."""


class ConfigError(CoworkerError, ValueError):
    """A configuration value is invalid; the message names the parameter."""


class PermissionDenied(CoworkerError):
    """The effective permissions of the acting user (and agent) do not allow the run.

    Raised by ``coworker.run`` before the function body runs. The span is marked as an error
    and an ``authorization-failure`` audit record is written.

    Attributes:
        user: the user id, or ``None`` for an anonymous run.
        agent: the agent id, or ``None``.
        operation: the operation that was refused.
        doctype: the doctype it was refused on.
        rule: a human-readable description of the rule that decided.
    """

    def __init__(
        self,
        message: str = "permission denied",
        *,
        user: str | None = None,
        agent: str | None = None,
        operation: str | None = None,
        doctype: str | None = None,
        rule: str | None = None,
    ) -> None:
        super().__init__(message)
        self.user = user
        self.agent = agent
        self.operation = operation
        self.doctype = doctype
        self.rule = rule


class RateLimited(PermissionDenied):
    """A rate limit of the policy was exceeded; audited as a policy violation.

    Attributes:
        retry_after: seconds until the window allows another run (best effort).
    """

    def __init__(
        self, message: str = "rate limited", *, retry_after: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class BudgetExceeded(RateLimited):
    """A usage budget of the policy (tokens or cost per user, agent or cost center per
    window) is spent; the next run is refused before its body, audited as a policy violation.

    A :class:`RateLimited` (and so a :class:`PermissionDenied`): code that backs off on rate
    limits backs off here too, ``retry_after`` being the time to the next window.

    Attributes:
        budget: the name of the budget rule.
    """

    def __init__(
        self, message: str = "budget exceeded", *, budget: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.budget = budget


class ValidationError(CoworkerError, ValueError):
    """A business-rule violation raised by application code; audited as
    ``validation-violation``."""


class AuditUnavailable(CoworkerError):
    """An audit record could not be made durable.

    In fail-closed mode this is raised *before* a state-changing run executes, and the
    function body does not run.
    """
