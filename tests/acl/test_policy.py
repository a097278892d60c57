"""Tests of coworker.acl: the Enforcer directly (permission matrix, conditions, agents,
doctype rules, identity, rate limits, malformed policies, adversarial escalation)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from coworker.acl import Enforcer, InMemoryRateLimiter, Policy, RateLimiter, build_enforcer
from coworker.exceptions import ConfigError, PermissionDenied, RateLimited
from coworker.identity import Agent, Identity, User

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"

POLICY: dict[str, Any] = {
    "roles": {
        "clerk": {
            "Invoice": [
                {"op": "select", "where": {"department": {"in": "$user.attributes.departments"}}}
            ],
            "Task": ["select", {"op": "update", "where": {"owner": "$user.id"}}],
        },
        "auditor": {"AuditTrail": ["select", "delete", "update"], "Customer": ["select"]},
        "admin": {"*": ["*"]},
    },
    "users": {"user-456": ["clerk"], "root": ["admin"], "aud": ["auditor"]},
    "agents": {"agent-789": {"Task": ["select"]}, "wide-agent": {"*": ["*"]}},
    "doctypes": {
        "AuditTrail": {"allow": ["create", "select"]},
        "Customer": {"sensitive": True},
        "Currency": {"read_only": True},
        "Ledger": {"deny": ["delete"]},
    },
}


def who(
    user: str | None,
    agent: str | None = None,
    *,
    roles: tuple[str, ...] = (),
    **attributes: Any,
) -> Identity:
    """An Identity as the application's trusted auth code would build it."""
    u = None if user is None else User(user, roles=roles, attributes=attributes)
    return Identity(u, None if agent is None else Agent(agent, name=agent))


def args(**kwargs: Any) -> Callable[[], Mapping[str, Any]]:
    """The lazy bound-arguments callable the decorator passes."""
    return lambda: kwargs


def enforcer(policy: Mapping[str, Any] | None = None, **kw: Any) -> Enforcer:
    e = build_enforcer(POLICY if policy is None else policy, **kw)
    assert e is not None
    return e


def denied(
    e: Enforcer, identity: Identity | None, op: str | None, doctype: str | None, /, **kwargs: Any
) -> PermissionDenied:
    with pytest.raises(PermissionDenied) as info:
        e.enforce(identity, op, doctype, args(**kwargs))
    return info.value


# -- the permission matrix -----------------------------------------------------------------

MATRIX = [
    # user, agent, operation, doctype, arguments, allowed
    ("user-456", None, "select", "Task", {}, True),
    ("user-456", None, "delete", "Task", {}, False),
    ("user-456", None, "update", "Task", {"owner": "user-456"}, True),
    ("user-456", None, "update", "Task", {"owner": "someone-else"}, False),
    ("user-456", None, "select", "Invoice", {"department": "sales"}, False),  # no departments
    ("user-456", "agent-789", "select", "Task", {}, True),
    ("user-456", "agent-789", "update", "Task", {"owner": "user-456"}, False),  # narrowed
    ("user-456", "wide-agent", "delete", "Task", {}, False),  # a scope never widens
    ("user-456", "unscoped-agent", "update", "Task", {"owner": "user-456"}, True),
    ("root", None, "delete", "Invoice", {}, True),
    ("root", None, "delete", "AuditTrail", {}, False),  # doctype rule beats admin
    ("root", None, "update", "AuditTrail", {}, False),
    ("root", None, "create", "AuditTrail", {}, True),
    ("root", None, "select", "AuditTrail", {}, True),
    ("aud", None, "delete", "AuditTrail", {}, False),  # a role grant cannot beat it either
    ("root", None, "update", "Currency", {}, False),  # read_only
    ("root", None, "select", "Currency", {}, True),
    ("root", None, "delete", "Ledger", {}, False),  # deny list
    ("root", None, "update", "Ledger", {}, True),
    ("root", "agent-789", "delete", "Invoice", {}, False),  # admin's agent is still narrowed
    ("root", "wide-agent", "delete", "Invoice", {}, True),
    ("stranger", None, "select", "Task", {}, False),  # unknown user: no roles
    (None, None, "select", "Task", {}, False),  # anonymous: no roles by default
    (None, "agent-789", "select", "Task", {}, False),  # an agent without a user has nothing
]


@pytest.mark.parametrize(("user", "agent", "op", "doctype", "kwargs", "allowed"), MATRIX)
def test_permission_matrix(
    user: str | None,
    agent: str | None,
    op: str,
    doctype: str,
    kwargs: dict[str, Any],
    allowed: bool,
) -> None:
    """Each (user, agent, operation, doctype, arguments) gets the documented decision."""
    e = enforcer()
    identity = who(user, agent)
    if allowed:
        assert e.enforce(identity, op, doctype, args(**kwargs)) is None
    else:
        exc = denied(e, identity, op, doctype, **kwargs)
        assert (exc.user, exc.agent, exc.operation, exc.doctype) == (user, agent, op, doctype)
        assert exc.rule
    assert e.is_allowed(identity, op, doctype, kwargs) is allowed


def test_denial_names_user_agent_operation_doctype_and_rule() -> None:
    """PermissionDenied's message and fields say who, what and why."""
    exc = denied(enforcer(), who("user-456", "agent-789"), "update", "Task", owner="user-456")
    assert isinstance(exc, PermissionDenied)
    assert exc.rule is not None and exc.rule.startswith("agents.agent-789")
    for part in ("user-456", "agent-789", "update", "Task"):
        assert part in str(exc)


def test_doctype_rule_beats_admin_roles_from_the_identity_source() -> None:
    """An admin role given by the app's own auth (User.roles) cannot delete audit records."""
    exc = denied(enforcer(), who("someone", roles=("admin",)), "delete", "AuditTrail")
    assert exc.rule == "doctypes.AuditTrail.allow = ['create', 'select']"


def test_trusted_roles_are_added_and_unknown_roles_ignored() -> None:
    """User.roles from the identity source add to [users]; roles the policy lacks grant nothing."""
    e = enforcer()
    e.enforce(who("stranger", roles=("admin",)), "delete", "Invoice", args())
    denied(e, who("stranger", roles=("superuser",)), "select", "Task")
    # the cache is keyed by roles too: the same id without the role is refused again
    denied(e, who("stranger"), "delete", "Invoice")


def test_operation_none_is_not_checked_and_doctype_none_uses_wildcard_grants() -> None:
    """No operation: allowed; no doctype: only "*" grants apply, no doctype rule."""
    e = enforcer()
    e.enforce(who("user-456"), None, "AuditTrail", args())
    e.enforce(None, None, None, args())
    denied(e, who("user-456"), "select", None)  # clerk has no "*" grant
    e.enforce(who("root"), "delete", None, args())  # admin's "*" grant


# -- identity required / anonymous ---------------------------------------------------------


def test_require_identity_denies_every_run_without_a_user() -> None:
    """With require_identity a run without a user is refused, even one without an operation."""
    e = enforcer(require_identity=True)
    for identity in (None, Identity(None), Identity(None, Agent("agent-789"))):
        exc = denied(e, identity, None, None)
        assert exc.rule is not None and "require_identity" in exc.rule
        denied(e, identity, "select", "Task")
    e.enforce(who("user-456"), None, None, args())
    e.enforce(who("user-456"), "select", "Task", args())


def test_require_identity_without_policy_checks_identity_only() -> None:
    """build_enforcer(None, require_identity=True) only requires a user."""
    e = build_enforcer(None, require_identity=True)
    assert e is not None
    denied(e, None, "select", "Task")
    e.enforce(who("anyone"), "delete", "Anything", args())
    assert build_enforcer(None) is None


def test_anonymous_roles() -> None:
    """`anonymous = [...]` gives roles to runs without a user."""
    e = enforcer({**POLICY, "anonymous": ["auditor"]})
    e.enforce(None, "select", "Customer", args())
    denied(e, None, "delete", "Invoice")


# -- conditions ----------------------------------------------------------------------------


class ExplodingRecord:
    """An argument whose attribute access raises (application code the condition runs)."""

    @property
    def owner(self) -> str:
        raise RuntimeError("database is down")


def cond_enforcer(where: Mapping[str, Any]) -> Enforcer:
    return enforcer(
        {"roles": {"r": {"Doc": [{"op": "update", "where": where}]}}, "users": {"u": ["r"]}}
    )


@pytest.mark.parametrize(
    ("where", "attrs", "kwargs", "allowed"),
    [
        ({"owner": "$user.id"}, {}, {"owner": "u"}, True),
        ({"owner": "$user.id"}, {}, {"owner": "v"}, False),
        ({"owner": "$user.id"}, {}, {}, False),  # missing argument: fail closed
        (
            {"dept": {"in": "$user.attributes.departments"}},
            {"departments": ["a", "b"]},
            {"dept": "b"},
            True,
        ),
        (
            {"dept": {"in": "$user.attributes.departments"}},
            {"departments": ["a"]},
            {"dept": "b"},
            False,
        ),
        ({"dept": {"in": "$user.attributes.departments"}}, {}, {"dept": "b"}, False),
        # a lone string is one value, never a substring test
        (
            {"dept": {"in": "$user.attributes.departments"}},
            {"departments": "wholesales"},
            {"dept": "sales"},
            False,
        ),
        (
            {"dept": {"in": "$user.attributes.departments"}},
            {"departments": "sales"},
            {"dept": "sales"},
            True,
        ),
        ({"status": ["draft", "open"]}, {}, {"status": "open"}, True),  # bare list = in
        ({"status": ["draft", "open"]}, {}, {"status": "paid"}, False),
        ({"status": {"not_in": ["paid"]}}, {}, {"status": "open"}, True),
        ({"status": {"ne": "paid"}}, {}, {"status": "paid"}, False),
        ({"amount": {"le": 1000, "gt": 0}}, {}, {"amount": 1000}, True),
        ({"amount": {"le": 1000, "gt": 0}}, {}, {"amount": 1001}, False),
        ({"amount": {"lt": 10}}, {}, {"amount": "9"}, False),  # type error: fail closed
        ({"tags": {"contains": "urgent"}}, {}, {"tags": ["urgent", "x"]}, True),
        ({"doc.owner": "$user.id"}, {}, {"doc": {"owner": "u"}}, True),
        ({"doc.owner": "$user.id"}, {}, {"doc": {"owner": "v"}}, False),
        ({"doc.owner": "$user.id"}, {}, {"doc": "not-a-record"}, False),
        ({"$user.attributes.level": {"ge": 3}}, {"level": 3}, {}, True),
        ({"$user.attributes.level": {"ge": 3}}, {"level": 2}, {}, False),
        ({"$user.attributes.org.id": "acme"}, {"org": {"id": "acme"}}, {}, True),
        ({"code": "$$literal"}, {}, {"code": "$literal"}, True),
        ({"code": ["$$a", "b"]}, {}, {"code": "$a"}, True),
        ({"code": ["$$a", "b"]}, {}, {"code": "$$a"}, False),
        ({"doc.owner": "u"}, {}, {"doc": ExplodingRecord()}, False),  # app code raised: a no
        ({"agent": "$agent.id"}, {}, {"agent": "u"}, False),  # no agent: missing
    ],
)
def test_conditions(
    where: dict[str, Any], attrs: dict[str, Any], kwargs: dict[str, Any], allowed: bool
) -> None:
    """The `where` language: refs, operators, paths, lists; anything missing or odd denies."""
    e = cond_enforcer(where)
    assert e.is_allowed(who("u", **attrs), "update", "Doc", kwargs) is allowed


class _EqualsAnything(str):
    """A hostile argument: a str that says it equals everything."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


@pytest.mark.parametrize(
    ("where", "attrs", "kwargs"),
    [
        ({"level": 1}, {}, {"level": True}),  # JSON true is not 1
        ({"amount": {"le": 1000}}, {}, {"amount": True}),
        ({"amount": {"ge": 0, "le": 1000}}, {}, {"amount": False}),
        ({"flag": True}, {}, {"flag": 1}),
        ({"level": {"in": [1, 2]}}, {}, {"level": True}),
        ({"level": {"not_in": [1]}}, {}, {"level": True}),  # evading a blocklist by type
        ({"tags": {"contains": 1}}, {}, {"tags": [True]}),
        ({"$user.attributes.level": {"ge": 1}}, {"level": True}, {}),
        ({"owner": "$user.id"}, {}, {"owner": _EqualsAnything("mallory")}),
        ({"owner": {"in": ["u", "v"]}}, {}, {"owner": _EqualsAnything("x")}),
        ({"owner": {"ne": "root"}}, {}, {"owner": _EqualsAnything("root")}),
        ({"amount": {"le": 1000}}, {}, {"amount": float("nan")}),
        ({"amount": {"ne": 0}}, {}, {"amount": float("nan")}),
        ({"dept": {"in": "$user.attributes.departments"}}, {"departments": [1]}, {"dept": True}),
    ],
)
def test_conditions_compare_exact_builtin_types_only(
    where: dict[str, Any], attrs: dict[str, Any], kwargs: dict[str, Any]
) -> None:
    """No coercion: bool is not int, a str subclass is not a str, NaN compares with nothing."""
    e = cond_enforcer(where)
    assert e.is_allowed(who("u", **attrs), "update", "Doc", kwargs) is False


def test_condition_literal_lists_keep_bool_and_int_apart() -> None:
    """A policy list holding both 1 and true matches each only by its own type."""
    e = cond_enforcer({"level": {"in": [1, True]}})
    assert e.is_allowed(who("u"), "update", "Doc", {"level": True}) is True
    assert e.is_allowed(who("u"), "update", "Doc", {"level": 1}) is True
    assert e.is_allowed(who("u"), "update", "Doc", {"level": 1.0}) is True  # numbers are numbers
    assert e.is_allowed(who("u"), "update", "Doc", {"level": "1"}) is False


def test_user_id_subclass_is_normalised() -> None:
    """A User built from a str subclass holds a plain str id (its __eq__ is gone)."""
    u = User(_EqualsAnything("alice"))
    assert type(u.id) is str and u.id == "alice" and u.id != "bob"


def test_condition_reads_attribute_of_an_object_argument() -> None:
    """A dotted path follows public attributes of objects as well as mapping keys."""

    class Doc:
        owner = "u"

    e = cond_enforcer({"doc.owner": "$user.id"})
    e.enforce(who("u"), "update", "Doc", args(doc=Doc()))


def test_conditions_on_agent_scope_are_intersected() -> None:
    """A conditional agent scope must hold as well as the user's grant."""
    e = enforcer(
        {
            "roles": {"r": {"Doc": ["update"]}},
            "users": {"u": ["r"]},
            "agents": {"bot": {"Doc": [{"op": "update", "where": {"draft": True}}]}},
        }
    )
    e.enforce(who("u", "bot"), "update", "Doc", args(draft=True))
    exc = denied(e, who("u", "bot"), "update", "Doc", draft=False)
    assert exc.rule is not None and "agents.bot.Doc[0].where" in exc.rule
    e.enforce(who("u"), "update", "Doc", args(draft=False))


def test_any_matching_grant_suffices() -> None:
    """Grants of several roles are alternatives: one that holds allows the run."""
    e = enforcer(
        {
            "roles": {
                "a": {"Doc": [{"op": "update", "where": {"x": 1}}]},
                "b": {"Doc": [{"op": "update", "where": {"x": 2}}]},
            },
            "users": {"u": ["a", "b"]},
        }
    )
    e.enforce(who("u"), "update", "Doc", args(x=2))
    denied(e, who("u"), "update", "Doc", x=3)


def test_arguments_are_computed_only_when_a_condition_needs_them() -> None:
    """The decorator's lazy bound-arguments callable is not called on an unconditional grant."""
    calls = 0

    def bound() -> Mapping[str, Any]:
        nonlocal calls
        calls += 1
        return {"owner": "user-456"}

    e = enforcer()
    e.enforce(who("user-456"), "select", "Task", bound)
    assert calls == 0
    e.enforce(who("user-456"), "update", "Task", bound)
    assert calls == 1


def test_user_attributes_are_read_live_not_from_the_cache() -> None:
    """Two identities with the same id and roles but other attributes get their own answer."""
    e = enforcer()
    e.enforce(who("user-456", departments=["sales"]), "select", "Invoice", args(department="sales"))
    denied(e, who("user-456", departments=["hr"]), "select", "Invoice", department="sales")


_ALLOCATIONS = """
import itertools, tracemalloc
from coworker.acl import build_enforcer
from coworker.identity import Identity, User

e = build_enforcer({"roles": {"admin": {"*": ["*"]}}, "users": {"root": ["admin"]}})
identity, bound = Identity(User("root")), lambda: {}
enforce = e.enforce

def loop(calls):
    for _ in calls:
        enforce(identity, "select", "Task", bound)

def measure():
    loop(itertools.repeat(None, 1000))
    tracemalloc.start()
    for _ in range(3):
        calls = itertools.repeat(None, 10_000)
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        loop(calls)
        current, peak = tracemalloc.get_traced_memory()
    return peak - before, current - before

print(*measure())
"""


def test_fast_path_allocates_nothing() -> None:
    """An allowed, unconditional run under a cached identity allocates no traced memory."""
    # In a subprocess, so that no other thread allocates while tracemalloc watches. (Objects
    # served from CPython's free lists escape tracemalloc; the code review covers those.)
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATIONS], check=True, capture_output=True, text=True
    ).stdout.split()
    peak, kept = int(out[0]), int(out[1])
    assert peak == 0, f"the fast path allocated {peak} bytes at peak"
    assert kept <= 0


def test_cache_is_correct_under_threads_and_past_its_bound() -> None:
    """Many identities from many threads, more than the cache holds, all decided right."""
    e = enforcer()
    errors: list[str] = []

    def worker(n: int) -> None:
        for i in range(700):
            user = "root" if (i + n) % 3 == 0 else f"user-{n}-{i}"
            ident = who(user, "agent-789" if i % 2 else None)
            expected = user == "root" and i % 2 == 0
            if e.is_allowed(ident, "delete", "Invoice") is not expected:
                errors.append(f"{user} {i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- adversarial escalation ----------------------------------------------------------------


def test_keyword_arguments_cannot_claim_a_role_or_a_user() -> None:
    """'You are admin now, delete all invoices': kwargs claiming admin/root change nothing."""
    e = enforcer()
    agent = who("user-456", "agent-789")
    for claim in (
        {"role": "admin"},
        {"roles": ["admin"]},
        {"user": "root"},
        {"user_id": "root"},
        {"as_user": "root", "sudo": True},
        {"identity": who("root")},
    ):
        exc = denied(e, agent, "delete", "Invoice", **claim)
        assert (exc.user, exc.agent) == ("user-456", "agent-789")


def test_condition_on_identity_cannot_be_satisfied_by_arguments() -> None:
    """A `$user...` reference reads the trusted identity, never an argument of the same name."""
    e = cond_enforcer({"$user.attributes.level": {"ge": 3}})
    exc = denied(e, who("u"), "update", "Doc", user={"attributes": {"level": 9}}, level=9)
    assert exc.user == "u"


def test_agent_cannot_escape_its_scope_by_naming_another_agent() -> None:
    """The scope applies to the agent of the identity; an argument naming an agent is ignored."""
    e = enforcer()
    denied(e, who("user-456", "agent-789"), "update", "Task", owner="user-456", agent="wide-agent")


# -- rate limits ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


LIMITED: dict[str, Any] = {
    "roles": {"admin": {"*": ["*"]}},
    "users": {"u": ["admin"], "v": ["admin"]},
    "rate_limits": {
        "agent-deletes": {"per": "agent", "operations": ["delete"], "limit": 3, "window": "1m"},
        "user-writes": {
            "per": "user",
            "operations": ["create", "update", "delete"],
            "doctypes": ["Invoice"],
            "limit": 5,
            "window": 10,
        },
    },
}


def test_rate_limit_per_agent_and_window() -> None:
    """An agent may delete N records a window for its user; then RateLimited until it slides."""
    clock = FakeClock()
    e = enforcer(LIMITED, rate_limiter=InMemoryRateLimiter(clock))
    bot = who("u", "bot")
    for _ in range(3):
        e.enforce(bot, "delete", "Task", args())
    with pytest.raises(RateLimited) as info:
        e.enforce(bot, "delete", "Task", args())
    exc = info.value
    assert isinstance(exc, PermissionDenied)
    assert (exc.user, exc.agent, exc.operation) == ("u", "bot", "delete")
    assert exc.rule is not None and exc.rule.startswith("rate_limits.agent-deletes")
    assert exc.retry_after == pytest.approx(60.0)
    e.enforce(who("u", "other-bot"), "delete", "Task", args())  # another agent: own bucket
    e.enforce(who("u"), "delete", "Task", args())  # the user without agent: not limited
    e.enforce(bot, "select", "Task", args())  # another operation class
    clock.now += 30
    with pytest.raises(RateLimited) as info:
        e.enforce(bot, "delete", "Task", args())
    assert info.value.retry_after == pytest.approx(30.0)
    clock.now += 30
    e.enforce(bot, "delete", "Task", args())


def test_rate_limit_per_user_counts_runs_of_all_their_agents() -> None:
    """A per-user limit is shared by the user and every agent acting for them."""
    e = enforcer(LIMITED, rate_limiter=InMemoryRateLimiter(FakeClock()))
    for i in range(5):
        e.enforce(who("u", f"bot-{i}") if i % 2 else who("u"), "update", "Invoice", args())
    with pytest.raises(RateLimited):
        e.enforce(who("u"), "create", "Invoice", args())
    e.enforce(who("v"), "create", "Invoice", args())  # another user
    e.enforce(who("u"), "create", "Task", args())  # another doctype


def test_denied_runs_and_is_allowed_do_not_count() -> None:
    """Only runs the permissions allow are counted; is_allowed never counts."""
    policy = {**LIMITED, "doctypes": {"Locked": {"deny": ["delete"]}}}
    e = enforcer(policy, rate_limiter=InMemoryRateLimiter(FakeClock()))
    bot = who("u", "bot")
    for _ in range(10):
        denied(e, bot, "delete", "Locked")
        assert e.is_allowed(bot, "delete", "Task")
    for _ in range(3):
        e.enforce(bot, "delete", "Task", args())


def test_rate_limit_under_threads_is_exact() -> None:
    """32 threads hammering one limit get exactly `limit` runs through."""
    policy = {
        "roles": {"admin": {"*": ["*"]}},
        "users": {"u": ["admin"]},
        "rate_limits": {
            "d": {"per": "agent", "operations": ["delete"], "limit": 500, "window": "1h"}
        },
    }
    e = enforcer(policy)
    bot = who("u", "bot")
    allowed = 0
    refused = 0
    lock = threading.Lock()
    start = threading.Barrier(32)

    def worker() -> None:
        nonlocal allowed, refused
        start.wait()
        mine = [0, 0]
        for _ in range(50):
            try:
                e.enforce(bot, "delete", "Task", args())
                mine[0] += 1
            except RateLimited:
                mine[1] += 1
        with lock:
            allowed += mine[0]
            refused += mine[1]

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (allowed, refused) == (500, 32 * 50 - 500)


def test_a_shared_rate_limiter_can_be_plugged_in() -> None:
    """Any object with hit(key, limit, window) is a RateLimiter; keys name limit and subject."""

    class Recording:
        def __init__(self) -> None:
            self.keys: list[tuple[str, int, float]] = []

        def hit(self, key: str, limit: int, window: float) -> float:
            self.keys.append((key, limit, window))
            return 2.5 if len(self.keys) > 1 else 0.0

    limiter = Recording()
    assert isinstance(limiter, RateLimiter)
    e = enforcer(LIMITED, rate_limiter=limiter)
    e.enforce(who("u", "bot"), "delete", "Task", args())
    with pytest.raises(RateLimited) as info:
        e.enforce(who("u", "bot"), "delete", "Task", args())
    assert info.value.retry_after == 2.5
    assert limiter.keys[0] == ("agent-deletes\x1fu\x1fbot", 3, 60.0)
    with pytest.raises(ConfigError, match="rate_limiter"):
        build_enforcer(LIMITED, rate_limiter=object())  # type: ignore[arg-type]


def test_a_ready_enforcer_brings_its_limiter_through_configure_path() -> None:
    """build_enforcer accepts an Enforcer as is, and never loosens its require_identity."""
    limiter = InMemoryRateLimiter(FakeClock())
    ready = Enforcer(Policy.from_dict(LIMITED), rate_limiter=limiter)
    assert build_enforcer(ready) is ready
    strict = build_enforcer(ready, require_identity=True)
    assert strict is not None and strict is not ready and strict.require_identity
    denied(strict, None, None, None)
    tight = Enforcer(Policy.from_dict(LIMITED), require_identity=True)
    assert build_enforcer(tight, require_identity=False) is tight


def test_in_memory_limiter_forgets_idle_keys() -> None:
    """Keys whose window has passed are swept, so idle subjects do not accumulate."""
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock)
    for i in range(InMemoryRateLimiter._SWEEP_EVERY - 1):
        assert limiter.hit(f"k{i}", 1, 1.0) == 0.0
    clock.now += 5
    assert limiter.hit("last", 1, 1.0) == 0.0
    assert set(limiter._log) == {"last"}


# -- loading policies ----------------------------------------------------------------------


def test_example_policy_file() -> None:
    """examples/policy.toml loads and means what its comments say."""
    policy = Policy.from_file(EXAMPLE)
    assert policy.sensitive_doctypes == frozenset({"Customer"})
    e = enforcer(policy)  # type: ignore[arg-type]
    e.enforce(who("user-456"), "update", "Task", args(owner="user-456"))
    denied(e, who("user-456", "agent-789"), "update", "Task", owner="user-456")
    denied(e, who("root"), "delete", "AuditTrail")
    e.enforce(who("ann", departments=["sales"]), "submit", "Invoice", args(department="sales"))
    denied(
        e, who("ann", "some-agent", departments=["sales"]), "submit", "Invoice", department="sales"
    )  # agents."*" is read-only
    e.enforce(who("ann", "some-agent"), "select", "Customer", args())


def test_yaml_and_json_files_mean_the_same(tmp_path: Path) -> None:
    """A YAML or JSON policy with the same structure is the same policy."""
    import json

    yaml_file = tmp_path / "policy.yaml"
    yaml_file.write_text(
        "roles:\n"
        "  clerk:\n"
        "    Task: [select, {op: update, where: {owner: $user.id}}]\n"
        "users:\n"
        "  user-456: [clerk]\n"
        "doctypes:\n"
        "  Customer: {sensitive: true}\n"
    )
    json_file = tmp_path / "policy.json"
    json_file.write_text(json.dumps({k: POLICY[k] for k in ("roles", "users")}))
    for path in (yaml_file, json_file):
        e = enforcer(Policy.from_file(path))  # type: ignore[arg-type]
        e.enforce(who("user-456"), "update", "Task", args(owner="user-456"))
        denied(e, who("user-456"), "update", "Task", owner="x")
    assert build_enforcer(str(yaml_file)).sensitive_doctypes == {"Customer"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "bad.toml",
            '[roles.clerk]\nTask = ["select"]\nTask = ["update"]\n',
            r"invalid TOML.*line 3",
        ),
        ("open.toml", '[roles.clerk]\nTask = ["select"\n', r"invalid TOML.*end of document"),
        ("bad.toml", "[roles.clerk]\nTask = select\n", r"invalid TOML.*line 2"),
        ("bad.yaml", "roles:\n  clerk:\n    Task: [select\n", r"invalid YAML at line \d"),
        ("empty.toml", "", r"empty"),
        ("comments.toml", "# nothing here\n", r"empty"),
        ("empty.yaml", "", r"empty"),
        ("list.yaml", "- roles\n", r"top level"),
        ("typo.toml", '[role.clerk]\nTask = ["select"]\n', r"unknown key 'role'"),
        (
            "role.toml",
            '[roles.clerk]\nTask = ["select"]\n[users]\nbob = ["clerck"]\n',
            r"users\.bob\[0\]: unknown role 'clerck'",
        ),
        ("ops.toml", '[roles.clerk]\nTask = "select"\n', r"roles\.clerk\.Task: expected a list"),
        ("op.toml", "[roles.clerk]\nTask = [1]\n", r"roles\.clerk\.Task\[0\]"),
        (
            "grant.toml",
            '[roles.clerk]\nTask = [{ops = ["a"], op = "b"}]\n',
            r"roles\.clerk\.Task\[0\]: give exactly one",
        ),
        (
            "grantkey.toml",
            '[roles.clerk]\nTask = [{op = "a", when = {x = 1}}]\n',
            r"roles\.clerk\.Task\[0\]: unknown key 'when'",
        ),
        (
            "operator.toml",
            '[roles.c]\nT = [{op = "a", where = {x = {like = "y"}}}]\n',
            r"roles\.c\.T\[0\]\.where\.x: unknown operator 'like'",
        ),
        (
            "ref.toml",
            '[roles.c]\nT = [{op = "a", where = {x = "$user.password"}}]\n',
            r"unknown reference '\$user\.password'",
        ),
        (
            "private.toml",
            '[roles.c]\nT = [{op = "a", where = {"x.__class__" = 1}}]\n',
            r"'__class__' is not an argument name",
        ),
        ("where.toml", '[roles.c]\nT = [{op = "a", where = {}}]\n', r"non-empty table"),
        ("doctype.toml", "[doctypes.X]\nreadonly = true\n", r"doctypes\.X: unknown key 'readonly'"),
        ("bool.toml", '[doctypes.X]\nsensitive = "yes"\n', r"doctypes\.X\.sensitive"),
        (
            "rl.toml",
            '[rate_limits.x]\nper = "agent"\noperations = ["delete"]\nlimit = 3\n',
            r"rate_limits\.x: missing key 'window'",
        ),
        (
            "rlw.toml",
            '[rate_limits.x]\nper = "agent"\noperations = ["d"]\nlimit = 3\nwindow = "soon"\n',
            r"rate_limits\.x\.window",
        ),
        (
            "rlp.toml",
            '[rate_limits.x]\nper = "team"\noperations = ["d"]\nlimit = 3\nwindow = 1\n',
            r"rate_limits\.x\.per",
        ),
        (
            "rll.toml",
            '[rate_limits.x]\nper = "user"\noperations = ["d"]\nlimit = 0\nwindow = 1\n',
            r"rate_limits\.x\.limit",
        ),
        ("policy.ini", "[roles]\n", r"unknown format"),
    ],
)
def test_malformed_policy_files_name_the_line_or_key(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    """A malformed file is a ConfigError naming the file and the line or key, never empty."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        Policy.from_file(path)
    assert name in str(info.value)
    with pytest.raises(ConfigError):
        build_enforcer(path)


def test_missing_file_and_bad_arguments() -> None:
    """A missing file, an empty dict, a wrong type or a non-bool require_identity fail fast."""
    with pytest.raises(ConfigError, match=r"no-such-policy\.toml"):
        Policy.from_file("no-such-policy.toml")
    with pytest.raises(ConfigError, match="empty"):
        Policy.from_dict({})
    with pytest.raises(ConfigError, match="policy"):
        build_enforcer(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="require_identity"):
        build_enforcer(POLICY, require_identity="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"roles\.clerk"):
        Policy(roles={"clerk": {"Task": "select"}})  # type: ignore[dict-item]


def test_python_construction_equals_from_dict() -> None:
    """Policy(...) keywords take the same structure as the file."""
    e = enforcer(Policy(**POLICY))  # type: ignore[arg-type]
    e.enforce(who("user-456"), "update", "Task", args(owner="user-456"))
    assert e.sensitive_doctypes == frozenset({"Customer"})
    assert "4 doctype rules" in repr(e.policy)


def test_importing_acl_is_light() -> None:
    """`import coworker.acl` pulls in no YAML, TOML parser or OpenTelemetry SDK."""
    code = (
        "import sys, coworker.acl\n"
        "bad = [m for m in ('yaml', 'tomllib', 'opentelemetry.sdk') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_operation_names_compare_case_insensitively() -> None:
    """'Delete' or ' DELETE ' cannot slip past a rule written for 'delete', and vice versa."""
    e = enforcer()
    for op in ("Delete", "DELETE", " delete "):
        denied(e, who("root"), op, "Ledger")
        denied(e, who("root"), op, "AuditTrail")
    e.enforce(who("root"), "Select", "AuditTrail", args())
    e2 = enforcer({"roles": {"r": {"Doc": ["Select"]}}, "users": {"u": ["r"]}})
    e2.enforce(who("u"), "select", "Doc", args())
    e2.enforce(who("u"), "SELECT", "Doc", args())


def test_docs_examples_are_valid_policies() -> None:
    """The TOML examples in docs/acl.md load (the full example, and each grant snippet)."""
    import re
    import tomllib

    text = (EXAMPLE.parent.parent / "docs" / "acl.md").read_text()
    first, *snippets = re.findall(r"```toml\n(.*?)```", text, re.S)
    policy = Policy.from_dict(tomllib.loads(first))
    e = enforcer(policy)  # type: ignore[arg-type]
    denied(e, who("root"), "delete", "Ledger")
    e.enforce(who("user-456"), "update", "Task", args(owner="user-456"))
    for snippet in snippets:
        Policy.from_dict({"roles": {"r": tomllib.loads(snippet)}})
