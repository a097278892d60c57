"""Access control end to end: real ``@coworker.run`` calls under ``coworker.configure(policy=...)``,
checked on the spans (OTel SDK in-memory exporter) and in the audit trail."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import StatusCode

import coworker
from coworker import attributes as attr
from coworker._state import SETTINGS
from coworker.acl import Enforcer
from coworker.exceptions import ConfigError, PermissionDenied, RateLimited

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"

POLICY: dict[str, Any] = {
    "roles": {
        "clerk": {
            "Invoice": ["select"],
            "Task": ["select", {"op": "update", "where": {"owner": "$user.id"}}],
        },
        "admin": {"*": ["*"]},
    },
    "users": {"user-456": ["clerk"], "root": ["admin"]},
    "agents": {"agent-789": {"Task": ["select"], "Invoice": ["select"]}},
    "doctypes": {"AuditTrail": {"allow": ["create", "select"]}, "Customer": {"sensitive": True}},
    "rate_limits": {
        "agent-deletes": {"per": "agent", "operations": ["delete"], "limit": 2, "window": "1m"}
    },
}

body_ran: list[str] = []


@pytest.fixture(autouse=True)
def _clear_body_log() -> Iterator[None]:
    body_ran.clear()
    yield
    body_ran.clear()


@pytest.fixture
def policy(spans: Any) -> Any:
    """coworker configured with POLICY; yields the in-memory span exporter."""
    coworker.configure(policy=POLICY, metrics=False)
    return spans


@coworker.run(operation="delete", doctype="Invoice")
def delete_invoice(invoice_id: str, **claims: Any) -> str:
    body_ran.append(f"delete {invoice_id}")
    return invoice_id


@coworker.run(operation="update", doctype="Task")
def update_task(task_id: str, owner: str) -> None:
    body_ran.append(f"update {task_id}")


@coworker.run(operation="select", doctype="Task")
def read_task(task_id: str) -> str:
    body_ran.append(f"select {task_id}")
    return task_id


@coworker.run(operation="delete", doctype="AuditTrail")
def delete_audit(record: int) -> None:
    body_ran.append("delete audit")


def only_span(exporter: Any, name: str) -> Any:
    (span,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


def assert_refused(span: Any, category: str, user: str | None, agent: str | None) -> None:
    """The span of a refused run: error status, audit category, who, the exception event."""
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attr.AUDITED] is True
    assert span.attributes[attr.AUDIT_CATEGORY] == category
    assert span.attributes.get(attr.USER_ID) == user
    assert span.attributes.get(attr.AGENT_ID) == agent
    expected = "RateLimited" if category == attr.CATEGORY_POLICY_VIOLATION else "PermissionDenied"
    assert span.attributes[attr.ERROR_TYPE] == f"coworker.exceptions.{expected}"
    (event,) = [e for e in span.events if e.name == attr.EXCEPTION_EVENT]
    assert "may not" in event.attributes[attr.EXCEPTION_MESSAGE]


def test_configure_installs_the_enforcer_and_sensitive_doctypes(spans: Any) -> None:
    """configure(policy=...) puts an Enforcer on the hot path and adds sensitive doctypes."""
    coworker.configure(policy=EXAMPLE, require_identity=True, metrics=False)
    assert isinstance(SETTINGS.policy, Enforcer)
    assert SETTINGS.policy.require_identity
    assert "Customer" in SETTINGS.sensitive_doctypes


def test_a_malformed_policy_fails_configure(tmp_path: Path, spans: Any) -> None:
    """configure(policy=<bad file>) raises ConfigError and installs nothing."""
    bad = tmp_path / "policy.toml"
    bad.write_text("[roles.clerk]\nTask = select\n")
    with pytest.raises(ConfigError, match="line 2"):
        coworker.configure(policy=bad, metrics=False)
    assert SETTINGS.policy is None


def test_without_a_policy_nothing_is_enforced(spans: Any) -> None:
    """No policy: today's behaviour, anonymous deletes run."""
    assert delete_invoice("INV-1") == "INV-1"
    assert body_ran == ["delete INV-1"]


def test_allowed_run_executes_and_is_ok(policy: Any) -> None:
    """An allowed run executes its body; its span is not an error."""
    with coworker.acting_as("root"):
        assert delete_invoice("INV-1") == "INV-1"
    span = only_span(policy, "delete Invoice")
    assert span.status.status_code is not StatusCode.ERROR
    assert span.attributes[attr.AUDIT_CATEGORY] == attr.CATEGORY_STATE_CHANGE
    assert body_ran == ["delete INV-1"]


def test_denied_sync_run_never_executes(policy: Any) -> None:
    """A denial raises PermissionDenied before the body; the span is an audited error."""
    with coworker.acting_as("user-456"), pytest.raises(PermissionDenied) as info:
        delete_invoice("INV-1")
    assert (info.value.user, info.value.operation, info.value.doctype) == (
        "user-456",
        "delete",
        "Invoice",
    )
    assert body_ran == []
    assert_refused(
        only_span(policy, "delete Invoice"), attr.CATEGORY_AUTHORIZATION_FAILURE, "user-456", None
    )


def test_agent_is_narrowed_through_the_decorator(policy: Any) -> None:
    """The user may update their own task; their agent, scoped to select, may not."""
    with coworker.acting_as("user-456"):
        update_task("T-1", owner="user-456")
    with coworker.acting_as("user-456", "agent-789"), pytest.raises(PermissionDenied):
        update_task("T-1", owner="user-456")
    assert body_ran == ["update T-1"]
    spans = [s for s in policy.get_finished_spans() if s.name == "update Task"]
    assert [s.status.status_code is StatusCode.ERROR for s in spans] == [False, True]
    assert_refused(spans[1], attr.CATEGORY_AUTHORIZATION_FAILURE, "user-456", "agent-789")


def test_condition_on_bound_arguments_positional_or_keyword(policy: Any) -> None:
    """`where owner = $user.id` reads the bound argument however it was passed."""
    with coworker.acting_as("user-456"):
        update_task("T-1", "user-456")
        update_task(task_id="T-2", owner="user-456")
        with pytest.raises(PermissionDenied, match="where"):
            update_task("T-3", "someone-else")
    assert body_ran == ["update T-1", "update T-2"]


def test_doctype_rule_beats_admin_through_the_decorator(policy: Any) -> None:
    """Even root cannot delete an audit record."""
    with coworker.acting_as("root"), pytest.raises(PermissionDenied, match=r"doctypes\.AuditTrail"):
        delete_audit(1)
    assert body_ran == []
    assert_refused(
        only_span(policy, "delete AuditTrail"), attr.CATEGORY_AUTHORIZATION_FAILURE, "root", None
    )


def test_every_callable_kind_is_checked_before_its_body(policy: Any) -> None:
    """Async functions, generators (before the first item), async generators and the
    context-manager form are refused before any of their code runs."""

    @coworker.run(operation="delete", doctype="Invoice")
    async def adelete(invoice_id: str) -> None:
        body_ran.append("async")

    @coworker.run(operation="delete", doctype="Invoice")
    def gen_delete(ids: list[str]) -> Iterator[str]:
        body_ran.append("gen")
        yield from ids

    @coworker.run(operation="delete", doctype="Invoice")
    async def agen_delete(ids: list[str]) -> AsyncIterator[str]:
        body_ran.append("agen")
        for i in ids:
            yield i

    async def consume_agen() -> None:
        async for _ in agen_delete(["a"]):
            pass

    with coworker.acting_as("user-456", "agent-789"):
        with pytest.raises(PermissionDenied):
            asyncio.run(adelete("INV-1"))
        gen = gen_delete(["a", "b"])
        with pytest.raises(PermissionDenied):
            next(gen)
        with pytest.raises(PermissionDenied):
            asyncio.run(consume_agen())
        with (
            pytest.raises(PermissionDenied),
            coworker.run("bulk delete", operation="delete", doctype="Invoice"),
        ):
            body_ran.append("block")
    assert body_ran == []
    refused = list(policy.get_finished_spans())
    assert len(refused) == 4
    for span in refused:
        assert_refused(span, attr.CATEGORY_AUTHORIZATION_FAILURE, "user-456", "agent-789")


def test_rate_limited_runs_are_policy_violations(policy: Any) -> None:
    """The agent's third delete in a minute raises RateLimited, audited as policy-violation."""
    with coworker.acting_as("root", "deleter-bot"):
        delete_invoice("INV-1")
        delete_invoice("INV-2")
        with pytest.raises(RateLimited) as info:
            delete_invoice("INV-3")
    assert info.value.retry_after is not None and info.value.retry_after > 0
    assert body_ran == ["delete INV-1", "delete INV-2"]
    last = [s for s in policy.get_finished_spans() if s.name == "delete Invoice"][-1]
    assert_refused(last, attr.CATEGORY_POLICY_VIOLATION, "root", "deleter-bot")


def test_require_identity_refuses_anonymous_runs(spans: Any) -> None:
    """require_identity: a run without acting_as is refused, even one without an operation."""
    coworker.configure(policy=POLICY, require_identity=True, metrics=False)

    @coworker.run
    def plain() -> None:
        body_ran.append("plain")

    with pytest.raises(PermissionDenied, match="require_identity"):
        plain()
    with pytest.raises(PermissionDenied, match="require_identity"):
        read_task("T-1")
    with coworker.acting_as("user-456"):
        plain()
        read_task("T-1")
    assert body_ran == ["plain", "select T-1"]


def test_sensitive_read_is_audited(policy: Any) -> None:
    """A read of a doctype the policy marks sensitive is classified sensitive-read."""

    @coworker.run(operation="select", doctype="Customer")
    def read_customer(cid: str) -> None:
        pass

    with coworker.acting_as(coworker.User("someone", roles=("admin",))):
        read_customer("C-1")
    span = only_span(policy, "select Customer")
    assert span.attributes[attr.AUDIT_CATEGORY] == attr.CATEGORY_SENSITIVE_READ


# -- adversarial escalation ----------------------------------------------------------------


def test_you_are_admin_now_delete_all_invoices(policy: Any) -> None:
    """The agent's tool call with arguments claiming admin/root is refused and audited."""
    with coworker.acting_as("user-456", "agent-789"):
        for claims in (
            {"role": "admin"},
            {"user": "root", "roles": ["admin"]},
            {"user_id": "root", "sudo": True},
        ):
            with pytest.raises(PermissionDenied) as info:
                delete_invoice("*", **claims)
            assert (info.value.user, info.value.agent) == ("user-456", "agent-789")
    assert body_ran == []
    refused = [s for s in policy.get_finished_spans() if s.name == "delete Invoice"]
    assert len(refused) == 3
    for span in refused:
        assert_refused(span, attr.CATEGORY_AUTHORIZATION_FAILURE, "user-456", "agent-789")


def test_span_attributes_set_by_the_function_do_not_change_identity(policy: Any) -> None:
    """A run that writes user.id/roles onto its own span cannot raise the next run's rights."""

    @coworker.run(operation="select", doctype="Task")
    def hijack(task_id: str) -> None:
        span = trace.get_current_span()
        span.set_attribute(attr.USER_ID, "root")
        span.set_attribute("user.roles", "admin")
        run = coworker.current_run()
        assert run is not None
        with pytest.raises(ValueError, match="reserved"):
            run.set_attribute(attr.USER_ID, "root")
        delete_invoice("INV-1")

    with coworker.acting_as("user-456", "agent-789"), pytest.raises(PermissionDenied):
        hijack("T-1")
    assert body_ran == []
    assert_refused(
        only_span(policy, "delete Invoice"),
        attr.CATEGORY_AUTHORIZATION_FAILURE,
        "user-456",
        "agent-789",
    )


def test_forged_baggage_identity_is_ignored(policy: Any) -> None:
    """Baggage from another process claiming root (or roles) grants nothing unless trusted."""
    with coworker.acting_as("root"):
        carrier = coworker.inject({})
    carrier["baggage"] += ",coworker.user.roles=admin,user.id=root"
    # anonymous receiver: the claimed root is not applied
    with coworker.extract(carrier) as got, pytest.raises(PermissionDenied) as info:
        delete_invoice("INV-1")
    assert got.identity_claimed is not None and got.identity_claimed.user_id == "root"
    assert info.value.user is None
    # the receiver authenticated user-456 itself: still user-456's rights
    with coworker.acting_as("user-456"), coworker.extract(carrier), pytest.raises(PermissionDenied):
        delete_invoice("INV-1")
    # raw baggage in the current OTel context is never read for identity
    token = otel_context.attach(baggage.set_baggage("coworker.user.id", "root"))
    try:
        with coworker.acting_as("user-456"), pytest.raises(PermissionDenied):
            delete_invoice("INV-1")
    finally:
        otel_context.detach(token)
    assert body_ran == []


def test_trusted_baggage_carries_an_id_never_roles(policy: Any) -> None:
    """With trust_baggage_identity a caller's user id is used, with the policy's roles only."""
    with coworker.acting_as(coworker.User("user-456", roles=("admin",))):
        carrier = coworker.inject({})
        delete_invoice("INV-0")  # admin via the app's own identity source: allowed
    with coworker.extract(carrier, trust_identity=True), pytest.raises(PermissionDenied):
        delete_invoice("INV-1")  # the role did not travel; user-456 is a clerk
    assert body_ran == ["delete INV-0"]


# -- the audit trail -----------------------------------------------------------------------


def test_denials_are_audit_records_with_user_and_agent(tmp_path: Path, spans: Any) -> None:
    """Refused and rate-limited runs are in the audit store with user, agent and category."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    coworker.configure(policy=POLICY, audit=url, metrics=False)
    with coworker.acting_as("user-456", "agent-789"), pytest.raises(PermissionDenied):
        delete_invoice("INV-1", role="admin")
    with coworker.acting_as("root", "deleter-bot"):
        delete_invoice("INV-2")
        delete_invoice("INV-3")
        with pytest.raises(RateLimited):
            delete_invoice("INV-4")
    coworker.force_flush()
    coworker.shutdown()

    from coworker.audit import open_store

    store = open_store(url)
    try:
        rows = [r.fields() for r in store.iter_from()]
    finally:
        store.close()
    outcomes = [r for r in rows if r.get("kind", "outcome") == "outcome"]
    summary = [
        (r["category"], r["user_id"], r["agent_id"], r["operation"], r["doctype"]) for r in outcomes
    ]
    assert summary == [
        ("authorization-failure", "user-456", "agent-789", "delete", "Invoice"),
        ("state-change", "root", "deleter-bot", "delete", "Invoice"),
        ("state-change", "root", "deleter-bot", "delete", "Invoice"),
        ("policy-violation", "root", "deleter-bot", "delete", "Invoice"),
    ]
    assert outcomes[0]["error_type"] == "coworker.exceptions.PermissionDenied"
    assert outcomes[3]["error_type"] == "coworker.exceptions.RateLimited"
    assert body_ran == ["delete INV-2", "delete INV-3"]


def test_configure_accepts_an_enforcer_with_a_shared_rate_limiter(spans: Any) -> None:
    """configure(policy=Enforcer(..., rate_limiter=...)) plugs in a shared limiter backend."""

    class Exhausted:
        def hit(self, key: str, limit: int, window: float) -> float:
            return 12.0

    enforcer = Enforcer(coworker.Policy.from_dict(POLICY), rate_limiter=Exhausted())
    coworker.configure(policy=enforcer, metrics=False)
    assert SETTINGS.policy is enforcer
    with coworker.acting_as("root", "bot"), pytest.raises(RateLimited) as info:
        delete_invoice("INV-1")
    assert info.value.retry_after == 12.0
    assert body_ran == []


_NO_SDK_POLICY = """
import asyncio, sys, coworker
from opentelemetry import trace
coworker.configure(policy={"roles": {"clerk": {"Invoice": ["select"]}},
                           "users": {"u1": ["clerk"]}})
ran = []

@coworker.run(operation="delete", doctype="Invoice")
def delete():
    ran.append("delete")

@coworker.run(operation="select", doctype="Invoice")
def select():
    ran.append("select")

@coworker.run(operation="delete", doctype="Invoice")
def delete_many():
    ran.append("gen")
    yield 1

with coworker.acting_as("u1", "agent-1"):
    select()
    for fn in (delete, lambda: list(delete_many())):
        try:
            fn()
        except coworker.PermissionDenied as exc:
            ran.append(type(exc).__name__)
print(ran, type(trace.get_tracer_provider()).__name__, "opentelemetry.sdk" in sys.modules)
"""


def test_policy_enforced_without_any_sdk() -> None:
    """OTEL_SDK_DISABLED: no provider and no spans, but every callable kind is still checked."""
    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    out = subprocess.run(
        [sys.executable, "-c", _NO_SDK_POLICY],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    assert out.stdout.split("] ")[0] + "]" == ("['select', 'PermissionDenied', 'PermissionDenied']")
    assert out.stdout.split("] ")[1].split()[0] == "ProxyTracerProvider"


# -- deriving what the policy needs fails closed (issue 9) ----------------------------------


def _records(url: str) -> list[dict[str, Any]]:
    from coworker.audit import open_store

    coworker.force_flush()
    store = open_store(url)
    try:
        return [r.fields() for r in store.iter_from()]
    finally:
        store.close()


def _broken_doctype(args: Any) -> dict[str, Any]:
    raise KeyError("doctype_field")


def test_failing_attributes_callable_is_an_audited_denial(tmp_path: Path, spans: Any) -> None:
    """An attributes= callable that raises refuses the run (even for an admin past a
    deny rule), before the body, audited, with the original error chained."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    coworker.configure(
        policy={
            "roles": {"admin": {"*": ["*"]}},
            "users": {"root": ["admin"]},
            "doctypes": {"Ledger": {"deny": ["delete"]}},
        },
        audit=url,
        metrics=False,
    )

    @coworker.run(operation="delete", attributes=_broken_doctype)
    def delete(entry_id: str) -> None:
        body_ran.append(entry_id)

    with coworker.acting_as("root"), pytest.raises(PermissionDenied) as info:
        delete("L-1")
    with pytest.raises(PermissionDenied):
        delete("L-2")  # anonymous: refused too, never run unchecked
    assert body_ran == []
    assert isinstance(info.value.__cause__, KeyError)
    assert "attributes= callable failed" in str(info.value)
    summary = [(r["category"], r["user_id"], r["error_type"]) for r in _records(url)]
    assert summary == [
        ("authorization-failure", "root", "coworker.exceptions.PermissionDenied"),
        ("authorization-failure", None, "coworker.exceptions.PermissionDenied"),
    ]


def test_attributes_callable_returning_junk_is_a_denial(spans: Any) -> None:
    """A non-mapping result, or a doctype no record can hold, is refused under a policy."""
    coworker.configure(policy=POLICY, metrics=False)

    @coworker.run(operation="select", attributes=lambda a: ["Invoice"])
    def listed() -> None:
        body_ran.append("listed")

    @coworker.run(operation="select", attributes=lambda a: {"doctype": a["d"]})
    def surrogate(d: str) -> None:
        body_ran.append("surrogate")

    with coworker.acting_as("root"):
        with pytest.raises(PermissionDenied, match="not a mapping"):
            listed()
        with pytest.raises(PermissionDenied, match="UTF-8") as info:
            surrogate("Inv\ud800")
    assert isinstance(info.value.__cause__, ValueError)
    assert body_ran == []


def test_failing_attributes_callable_refused_without_sdk() -> None:
    """No SDK provider at all: the policy-only path fails closed too."""
    code = """
import coworker
coworker.configure(policy={"roles": {"admin": {"*": ["*"]}}, "users": {"root": ["admin"],},
                           "doctypes": {"Ledger": {"deny": ["delete"]}}}, metrics=False)
ran = []
def broken(a):
    raise RuntimeError("boom")
@coworker.run(operation="delete", attributes=broken)
def delete():
    ran.append(1)
with coworker.acting_as("root"):
    try:
        delete()
    except coworker.PermissionDenied as exc:
        print("denied", type(exc.__cause__).__name__, ran)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", "OTEL_SDK_DISABLED": "true"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["denied", "RuntimeError", "[]"]


def test_surrogate_attribute_under_raise_fails_before_the_body(tmp_path: Path, spans: Any) -> None:
    """With an audit trail (raise policy) an attribute value no record can hold is refused
    before the body runs; a static one fails at decoration."""
    coworker.configure(audit=f"sqlite:///{tmp_path / 'a.db'}", metrics=False)

    @coworker.run(operation="update", doctype="Invoice", attributes=lambda a: {"note": a["n"]})
    def update(n: str) -> None:
        body_ran.append(n)

    with pytest.raises(PermissionDenied, match="UTF-8"):
        update("x\udcff")
    update("fine")
    assert body_ran == ["fine"]
    with pytest.raises(ValueError, match="UTF-8"):
        coworker.run(attributes={"note": "x\ud800"})
    with pytest.raises(ValueError, match="UTF-8"):
        coworker.run(operation="update", doctype="Inv\ud800")


def test_attributes_callable_cannot_change_what_the_policy_checks(policy: Any) -> None:
    """The attributes= callable gets a read-only view: rewriting `owner` to the caller's id
    (so `owner = $user.id` holds) is an error, and the run is refused."""

    def rewrite(args: Any) -> dict[str, Any]:
        args["owner"] = "user-456"
        return {}

    @coworker.run(operation="update", doctype="Task", attributes=rewrite)
    def update_task(owner: str) -> None:
        body_ran.append(owner)

    with coworker.acting_as("user-456"), pytest.raises(PermissionDenied) as info:
        update_task(owner="someone-else")
    assert isinstance(info.value.__cause__, TypeError)
    assert body_ran == []
