"""The :class:`Enforcer`: checks each run against a :class:`~coworker.acl.Policy` before its
body runs (doctype rules, then user roles narrowed by the agent scope, then rate limits), with
effective permissions cached per identity."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from coworker.acl.policy import WILDCARD, Grant, Policy, RateLimit
from coworker.acl.ratelimit import InMemoryRateLimiter, RateLimiter
from coworker.exceptions import ConfigError, PermissionDenied, RateLimited

if TYPE_CHECKING:
    from coworker.identity import Identity

__all__ = ["Enforcer", "build_enforcer"]


_MAX_CACHED_IDENTITIES: Final = 4096
_MAX_CACHED_DECISIONS: Final = 1024
_ANONYMOUS_KEY: Final = "<anonymous>"

# -- enforcement -----------------------------------------------------------------------------


class _Allow:
    """The decision "allowed, nothing more to check" (the cached fast path)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<allow>"


_ALLOW: Final = _Allow()


class _Decision:
    """What remains to check for one (identity, doctype, operation) when it is not a plain
    allow: a refusal, conditions on the call, rate limits."""

    __slots__ = ("deny", "limits", "scope_grants", "user_grants")

    def __init__(
        self,
        deny: str | None = None,
        user_grants: tuple[Grant, ...] = (),
        scope_grants: tuple[Grant, ...] = (),
        limits: tuple[tuple[str, RateLimit], ...] = (),
    ) -> None:
        self.deny = deny
        self.user_grants = user_grants
        self.scope_grants = scope_grants
        self.limits = limits


def _matching(
    grants: Mapping[str, tuple[Grant, ...]], doctype: str | None, operation: str
) -> tuple[bool, tuple[Grant, ...]]:
    """(unconditionally granted?, conditional grants that could grant)."""
    conditional: list[Grant] = []
    keys = (WILDCARD,) if doctype is None or doctype == WILDCARD else (doctype, WILDCARD)
    for key in keys:
        for grant in grants.get(key, ()):
            if grant.matches(operation):
                if grant.condition is None:
                    return True, ()
                conditional.append(grant)
    return False, tuple(conditional)


class _Effective:
    """The effective permissions of one (user id, trusted roles, agent id), with a per
    (doctype, operation) decision table filled on first use."""

    __slots__ = (
        "agent_id",
        "grants",
        "identity_required",
        "roles",
        "scope",
        "scope_name",
        "table",
        "user_id",
    )

    def __init__(
        self,
        policy: Policy | None,
        user_id: str | None,
        trusted_roles: tuple[str, ...],
        agent_id: str | None,
        identity_required: bool,
    ) -> None:
        self.user_id = user_id
        self.agent_id = agent_id
        self.identity_required = identity_required
        self.table: dict[str | None, dict[str, _Allow | _Decision]] = {}
        self.roles: tuple[str, ...] = ()
        self.grants: dict[str, tuple[Grant, ...]] = {}
        self.scope: Mapping[str, tuple[Grant, ...]] | None = None
        self.scope_name: str | None = None
        if policy is None:
            return
        self.roles = policy.roles_of(user_id, trusted_roles)
        merged: dict[str, list[Grant]] = {}
        for role in self.roles:
            for doctype, grants in policy.grants_of(role).items():
                merged.setdefault(doctype, []).extend(grants)
        self.grants = {k: tuple(v) for k, v in merged.items()}
        if agent_id is not None:
            for name in (agent_id, WILDCARD):
                scope = policy.agent_scope(name)
                if scope is not None:
                    self.scope, self.scope_name = scope, f"agents.{name}"
                    break

    def decide(
        self, policy: Policy | None, operation: str, doctype: str | None
    ) -> _Allow | _Decision:
        if self.identity_required:
            return _Decision(deny="require_identity: the run has no user")
        if policy is None:
            return _ALLOW
        # Decided on the normalized name, cached under the name the run used.
        operation = operation.strip().lower()
        if doctype is not None:
            rule = policy.doctype_rule(doctype)
            if rule is not None:
                refused = rule.refuses(operation, policy.read_operations)
                if refused is not None:
                    return _Decision(deny=refused)
        user_ok, user_grants = _matching(self.grants, doctype, operation)
        if not user_ok and not user_grants:
            who = "anonymous runs" if self.user_id is None else "the user's roles"
            return _Decision(
                deny=f"roles: {who} {list(self.roles)} grant no {operation!r} on "
                f"{doctype or WILDCARD!r}"
            )
        scope_grants: tuple[Grant, ...] = ()
        if self.scope is not None:
            scope_ok, scope_grants = _matching(self.scope, doctype, operation)
            if not scope_ok and not scope_grants:
                return _Decision(
                    deny=f"{self.scope_name}: the agent's scope does not include "
                    f"{operation!r} on {doctype or WILDCARD!r}"
                )
        limits = tuple(
            (self._limit_key(lim), lim)
            for lim in policy.rate_limits
            if lim.applies(operation, doctype, self.agent_id is not None)
        )
        if user_ok and not scope_grants and not limits:
            return _ALLOW
        return _Decision(
            user_grants=() if user_ok else user_grants, scope_grants=scope_grants, limits=limits
        )

    def _limit_key(self, lim: RateLimit) -> str:
        user = _ANONYMOUS_KEY if self.user_id is None else self.user_id
        if lim.per == "agent":
            return f"{lim.name}\x1f{user}\x1f{self.agent_id}"
        return f"{lim.name}\x1f{user}"


class Enforcer:
    """Checks runs against a :class:`Policy`; what ``coworker.configure(policy=...)`` installs.

    Effective permissions are computed once per (user id, ``User.roles``, agent id) and
    cached, with a per (doctype, operation) decision; an allowed run with no condition and no
    rate limit costs two dict lookups and allocates nothing. The cache belongs to this
    enforcer: a new policy means a new enforcer (``configure`` builds one), so a policy change
    can never be answered from a stale cache.

    Args:
        policy: the policy, or ``None`` to check only ``require_identity``.
        require_identity: deny every run (even one without an operation) that has no user.
        rate_limiter: where rate-limit counts live (default: a new
            :class:`InMemoryRateLimiter`).
    """

    __slots__ = (
        "_cache",
        "_limiter",
        "_memo",
        "_require_identity",
        "policy",
        "sensitive_doctypes",
    )

    def __init__(
        self,
        policy: Policy | None,
        *,
        require_identity: bool = False,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        if not isinstance(require_identity, bool):
            raise ConfigError(f"require_identity: expected True or False, got {require_identity!r}")
        if rate_limiter is not None and not isinstance(rate_limiter, RateLimiter):
            raise ConfigError("rate_limiter: expected an object with hit(key, limit, window)")
        self.policy = policy
        self._require_identity = require_identity
        self._limiter: RateLimiter = (
            rate_limiter if rate_limiter is not None else InMemoryRateLimiter()
        )
        self.sensitive_doctypes: frozenset[str] = (
            policy.sensitive_doctypes if policy is not None else frozenset()
        )
        self._cache: dict[tuple[str | None, tuple[str, ...], str | None], _Effective] = {}
        self._memo: tuple[Any, _Effective] = (None, self._effective_for_key(None, (), None))

    @property
    def require_identity(self) -> bool:
        """Whether runs without a user are denied."""
        return self._require_identity

    def cache_clear(self) -> None:
        """Forget every cached effective permission (they are recomputed on next use)."""
        self._cache.clear()
        self._memo = (None, self._effective_for_key(None, (), None))

    def _effective_for_key(
        self, user_id: str | None, roles: tuple[str, ...], agent_id: str | None
    ) -> _Effective:
        key = (user_id, roles, agent_id)
        eff = self._cache.get(key)
        if eff is None:
            if len(self._cache) >= _MAX_CACHED_IDENTITIES:
                self._cache.clear()
            eff = _Effective(
                self.policy,
                user_id,
                roles,
                agent_id,
                self._require_identity and user_id is None,
            )
            self._cache[key] = eff
        return eff

    def _effective(self, identity: Identity | None) -> _Effective:
        user = identity.user if identity is not None else None
        agent = identity.agent if identity is not None else None
        eff = self._effective_for_key(
            None if user is None else user.id,
            () if user is None else user.roles,
            None if agent is None else agent.id,
        )
        # One slot, swapped atomically: the common case is many runs under one acting_as().
        self._memo = (identity, eff)
        return eff

    def enforce(
        self,
        identity: Identity | None,
        operation: str | None,
        doctype: str | None,
        arguments: Callable[[], Mapping[str, Any]],
    ) -> None:
        """Allow the run or raise; called by ``coworker.run`` before the body.

        A run without ``operation`` is not checked (only ``require_identity`` applies to it);
        a run without ``doctype`` is checked against the ``"*"`` grants only and no doctype
        rule.

        Args:
            identity: who acts (``None``: nobody set one).
            operation: what the run does (``"select"``, ``"update"``, ...).
            doctype: the kind of record.
            arguments: returns the call's bound arguments; called only if a condition needs
                them.

        Raises:
            PermissionDenied: the policy refuses the run; the message names the rule.
            RateLimited: a rate limit of the policy is exhausted.
        """
        rules = self.policy.usage if self.policy is not None else None  # usage (issue 16)
        if rules is not None and rules.budgets:  # usage (issue 16): refuse before the body
            rules.check(identity, doctype)
        if operation is None:
            if self._require_identity and (identity is None or identity.user is None):
                raise self._denied(identity, operation, doctype, "require_identity: no user")
            return
        memo = self._memo
        eff = memo[1] if memo[0] is identity else self._effective(identity)
        ops = eff.table.get(doctype)
        decision = None if ops is None else ops.get(operation)
        if decision is _ALLOW:
            return
        if decision is None:
            decision = self._decide(eff, operation, doctype)
            if decision is _ALLOW:
                return
        self._apply(decision, identity, operation, doctype, arguments, True)  # type: ignore[arg-type]

    def is_allowed(
        self,
        identity: Identity | None,
        operation: str | None,
        doctype: str | None,
        arguments: Mapping[str, Any] | None = None,
    ) -> bool:
        """Whether the run would be allowed, without counting it against rate limits.

        For UIs ("show the delete button?"). A rate limit is reported as allowed.

        Args:
            identity: who acts.
            operation: what the run does.
            doctype: the kind of record.
            arguments: the bound arguments conditions would test (``None``: no arguments).
        """
        args: Mapping[str, Any] = arguments if arguments is not None else {}
        try:
            if operation is None:
                self.enforce(identity, None, doctype, lambda: args)
            else:
                decision = self._decide(self._effective(identity), operation, doctype)
                if isinstance(decision, _Decision):
                    self._apply(decision, identity, operation, doctype, lambda: args, False)
        except PermissionDenied:
            return False
        return True

    def _decide(self, eff: _Effective, operation: str, doctype: str | None) -> _Allow | _Decision:
        """The cached decision for (doctype, operation), computed and stored on first use."""
        table = eff.table
        ops = table.get(doctype)
        decision = None if ops is None else ops.get(operation)
        if decision is None:
            decision = eff.decide(self.policy, operation, doctype)
            if ops is None:
                if len(table) >= _MAX_CACHED_DECISIONS:
                    table.clear()
                ops = table.setdefault(doctype, {})
            if len(ops) < _MAX_CACHED_DECISIONS:
                ops[operation] = decision
        return decision

    def _apply(
        self,
        decision: _Decision,
        identity: Identity | None,
        operation: str,
        doctype: str | None,
        arguments: Callable[[], Mapping[str, Any]],
        consume: bool,
    ) -> None:
        """Check what a non-trivial decision still needs: refusal, conditions, rate limits."""
        if decision.deny is not None:
            raise self._denied(identity, operation, doctype, decision.deny)
        user_grants = decision.user_grants
        scope_grants = decision.scope_grants
        if user_grants or scope_grants:
            args = arguments()
            if user_grants:
                for grant in user_grants:
                    if grant.condition.holds(args, identity):  # type: ignore[union-attr]
                        break
                else:
                    raise self._denied(
                        identity, operation, doctype, _unmet(user_grants, "the user's roles")
                    )
            if scope_grants:
                for grant in scope_grants:
                    if grant.condition.holds(args, identity):  # type: ignore[union-attr]
                        break
                else:
                    raise self._denied(
                        identity, operation, doctype, _unmet(scope_grants, "the agent's scope")
                    )
        if consume:
            for key, lim in decision.limits:
                retry = self._limiter.hit(key, lim.limit, lim.window)
                if retry > 0:
                    rule = f"rate_limits.{lim.name}: {lim.limit} per {lim.window:g}s per {lim.per}"
                    raise RateLimited(
                        _message(identity, operation, doctype, rule, "rate limited"),
                        retry_after=retry,
                        user=identity.user_id if identity is not None else None,
                        agent=identity.agent_id if identity is not None else None,
                        operation=operation,
                        doctype=doctype,
                        rule=rule,
                    )

    def _denied(
        self,
        identity: Identity | None,
        operation: str | None,
        doctype: str | None,
        rule: str,
    ) -> PermissionDenied:
        return PermissionDenied(
            _message(identity, operation, doctype, rule, "permission denied"),
            user=identity.user_id if identity is not None else None,
            agent=identity.agent_id if identity is not None else None,
            operation=operation,
            doctype=doctype,
            rule=rule,
        )

    def __repr__(self) -> str:
        return f"<Enforcer {self.policy!r} require_identity={self._require_identity}>"


def _unmet(grants: tuple[Grant, ...], whose: str) -> str:
    parts = [f"{g.source}.where ({g.condition.describe()})" for g in grants if g.condition]
    return f"{whose} grant it only where " + " or ".join(parts) + ", not met"


def _message(
    identity: Identity | None,
    operation: str | None,
    doctype: str | None,
    rule: str,
    what: str,
) -> str:
    user = identity.user_id if identity is not None else None
    agent = identity.agent_id if identity is not None else None
    who = "anonymous" if user is None else f"user {user!r}"
    if agent is not None:
        who += f" via agent {agent!r}"
    return f"{what}: {who} may not {operation!r} on {doctype or WILDCARD!r} ({rule})"


def build_enforcer(
    policy: Policy | Enforcer | str | os.PathLike[str] | Mapping[str, Any] | None,
    *,
    require_identity: bool = False,
    rate_limiter: RateLimiter | None = None,
) -> Enforcer | None:
    """Turn what ``coworker.configure(policy=...)`` received into an :class:`Enforcer`.

    Args:
        policy: a :class:`Policy`, a path to a policy file, a mapping with the file's
            structure, an :class:`Enforcer` (used as is, e.g. to bring a shared rate
            limiter), or ``None``.
        require_identity: deny runs that have no user.
        rate_limiter: a shared rate-limit backend (default: in-process).

    Returns:
        The enforcer, or ``None`` when there is nothing to enforce (no policy and identity not
        required).

    Raises:
        ConfigError: the policy is invalid or of an unsupported type.
    """
    if not isinstance(require_identity, bool):
        raise ConfigError(f"require_identity: expected True or False, got {require_identity!r}")
    if policy is None:
        if not require_identity:
            return None
        return Enforcer(None, require_identity=True, rate_limiter=rate_limiter)
    if isinstance(policy, Enforcer):
        # A ready enforcer (e.g. with a shared rate limiter); never loosen what it requires.
        if rate_limiter is None and (policy.require_identity or not require_identity):
            return policy
        return Enforcer(
            policy.policy,
            require_identity=require_identity or policy.require_identity,
            rate_limiter=rate_limiter if rate_limiter is not None else policy._limiter,
        )
    if isinstance(policy, Policy):
        resolved = policy
    elif isinstance(policy, (str, os.PathLike)):
        resolved = Policy.from_file(policy)
    elif isinstance(policy, Mapping):
        resolved = Policy.from_dict(policy)
    else:
        raise ConfigError(
            f"policy: expected a Policy, a file path or a mapping, got {type(policy).__name__}"
        )
    return Enforcer(resolved, require_identity=require_identity, rate_limiter=rate_limiter)
