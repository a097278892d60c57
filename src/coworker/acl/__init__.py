"""Access control for ``coworker.run``: a :class:`Policy` says who may do what, an
:class:`Enforcer` checks each run before its body runs.

The rule of the product: **an AI agent acts with its user's permissions and never more.**
The effective permission of a run is decided in this order (the first "no" wins)::

    doctype rules        apply to everybody, admins included; they only ever forbid
      then  user roles   the roles of [users] for user.id, plus User.roles from the app
      and   agent scope  [agents.<id>] (or [agents."*"]) may only narrow the user's roles
      then  rate limits  N runs per window, per user or per agent-for-user

Identity comes only from the :class:`~coworker.identity.Identity` the application set with
``coworker.acting_as``; span attributes, baggage and the decorated function's arguments never
change it. Conditions (``where``) may *read* the call's bound arguments to restrict a grant,
never to widen one.

The package is pure: no I/O except reading a policy file in :meth:`Policy.from_file`, no
OpenTelemetry import, and ``yaml`` / ``tomllib`` are imported only when a file is loaded. The
format, the condition language and the precedence are documented in ``docs/acl.md``.
"""

from __future__ import annotations

from coworker.acl.enforcer import Enforcer, build_enforcer
from coworker.acl.policy import WILDCARD, Policy
from coworker.acl.ratelimit import InMemoryRateLimiter, RateLimiter

__all__ = [
    "WILDCARD",
    "Enforcer",
    "InMemoryRateLimiter",
    "Policy",
    "RateLimiter",
    "build_enforcer",
]
