"""The usage ledger end to end: real runs under coworker.configure(audit=...) on a real SQLite
file and the real PostgreSQL server; roll-ups across nested runs, retries, breaks and threads;
report totals equal the sum of the records; the seeds' cost-center example; budgets."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import coworker
from coworker import attributes as a
from coworker.audit.urls import open_store
from coworker.audit.usage import format_table, report, usage_records
from coworker.audit.verify import verify_chain
from coworker.cli import main

STORES = ("sqlite", "postgres")


@pytest.fixture(autouse=True)
def _fresh_pricing() -> Iterator[None]:
    """Each test prices with a fresh default pricing (its once-per-model warnings anew)."""
    from coworker.pricing import set_pricing

    set_pricing(None)
    yield
    set_pricing(None)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Any]:
    """A fresh database on the real server (skips, or fails under CI, without it)."""
    from tests.pg import PGServer, require_server

    server = PGServer(require_server())
    yield server
    server.close()


@pytest.fixture(params=STORES)
def audit_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, then a fresh schema on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    server = request.getfixturevalue("pg_server")
    url: str = server.schema_url()
    return url


def _records(url: str) -> list[dict[str, Any]]:
    coworker.force_flush()
    store = open_store(url)
    try:
        return list(usage_records(store.iter_from(1)))
    finally:
        store.close()


def _all(url: str) -> list[Any]:
    store = open_store(url)
    try:
        return list(store.iter_from(1))
    finally:
        store.close()


@coworker.run(operation="chat")
def _llm(tokens: int) -> None:
    coworker.record_usage(model="gpt-4o", input_tokens=tokens, output_tokens=tokens // 10)


def test_rollups_across_nested_runs_retries_breaks_and_threads(audit_url: str, spans: Any) -> None:
    """Every record_usage call is one ledger record, whatever the nesting, retry, flow break
    or thread; the report's totals per flow, user and run equal the sum of the calls."""
    coworker.configure(audit=audit_url, metrics=False)
    calls: list[int] = []

    def llm(n: int) -> None:
        calls.append(n)
        _llm(n)

    attempts = {"n": 0}

    @coworker.run(operation="update", doctype="Invoice")
    def flaky() -> None:
        llm(300)  # spent even when the attempt fails afterwards
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise TimeoutError("upstream")

    with coworker.acting_as("u1", "agent-1"), coworker.flow("ai-conversation") as conv:
        with coworker.run("turn"):
            llm(1000)
            with coworker.run("inner"):
                llm(200)
        for _ in range(2):  # the application's retry
            try:
                flaky()
            except TimeoutError:
                continue
            break
        first_flow = coworker.current_flow()
        assert first_flow is not None
        coworker.break_flow("topic-change")
        with coworker.run("turn-2"):
            barrier = threading.Barrier(4)

            def worker() -> None:
                barrier.wait()
                for _ in range(25):
                    coworker.record_usage(model="gpt-4o", input_tokens=10, output_tokens=1)

            threads = [
                threading.Thread(target=contextvars.copy_context().run, args=(worker,))
                for _ in range(4)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert conv is not None
    records = _records(audit_url)
    assert len(records) == len(calls) + 100
    assert sum(r["input_tokens"] for r in records) == sum(calls) + 1000
    by_flow = report(_all_ledger := _all(audit_url), by="flow", pricing_version="recorded")
    assert len(by_flow.rows) == 2
    assert (
        sum(r.tokens["input_tokens"] for r in by_flow.rows)
        == by_flow.total.tokens["input_tokens"]
        == sum(calls) + 1000
    )
    first = next(r for r in by_flow.rows if r.key == first_flow.id)
    assert first.tokens["input_tokens"] == 1000 + 200 + 300 + 300
    # The threads' run: 100 calls, totals on its span exactly (no lost update).
    (turn2,) = [s for s in spans.get_finished_spans() if s.name == "turn-2"]
    assert turn2.attributes[a.GEN_AI_USAGE_INPUT_TOKENS] == 1000
    assert turn2.attributes[a.GEN_AI_USAGE_OUTPUT_TOKENS] == 100
    # Recorded and recomputed costs agree (same pricing), and the totals are the sums.
    recomputed = report(_all_ledger, by="user")
    recorded_sum = sum(Decimal(r["cost_amount"]) for r in records)
    assert recomputed.total.cost == {"USD": recorded_sum} == by_flow.total.cost
    assert {r["user_id"] for r in records} == {"u1"}
    assert {r["agent_id"] for r in records} == {"agent-1"}
    # Same chain as every other record, and it verifies.
    coworker.shutdown()
    store = open_store(audit_url)
    try:
        assert verify_chain(store).ok
    finally:
        store.close()


def test_usage_of_a_failed_run_is_in_the_ledger(audit_url: str, spans: Any) -> None:
    """Tokens are spent even when the run then fails: the record is there, outcome and all."""
    coworker.configure(audit=audit_url, metrics=False)

    @coworker.run(operation="chat")
    def fails() -> None:
        coworker.record_usage(model="gpt-4o", input_tokens=7, output_tokens=1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fails()
    (rec,) = _records(audit_url)
    assert rec["input_tokens"] == 7 and rec["outcome"] == "RuntimeError"


COST_CENTER_POLICY = {
    "roles": {"sales": {"Customer": ["read"], "Invoice": ["read"], "Campaign": ["create"]}},
    "users": {"sales-rep-1": ["sales"], "sales-rep-2": ["sales"], "sales-rep-3": ["sales"]},
    "doctypes": {
        "Campaign": {"cost_center": "marketing", "owner_pays": True},
        "Invoice": {"cost_center": "finance"},
    },
    "usage": {"cost_centers": {"sales-rep-2": "sales"}, "default_cost_center": "shared"},
}


def test_seed_cost_center_example(audit_url: str, spans: Any) -> None:
    """A Sales user's conversation reads Customer and Invoice and creates a Campaign: the
    Campaign's usage goes to marketing (owner pays), the reads to the user's center."""
    coworker.configure(audit=audit_url, policy=COST_CENTER_POLICY, metrics=False)

    @coworker.run(operation="read", doctype="Customer")
    def read_customer() -> None:
        coworker.record_usage(model="gpt-4o", input_tokens=100, output_tokens=10)

    @coworker.run(operation="read", doctype="Invoice")
    def read_invoice() -> None:
        coworker.record_usage(model="gpt-4o", input_tokens=200, output_tokens=20)

    @coworker.run(operation="create", doctype="Campaign")
    def create_campaign() -> None:
        coworker.record_usage(model="gpt-4o", input_tokens=400, output_tokens=40)

    def conversation() -> None:
        with coworker.flow("ai-conversation"):
            read_customer()
            read_invoice()
            create_campaign()

    # 1. acting_as(cost_center=...) names the user's center.
    with coworker.acting_as("sales-rep-1", "assistant", cost_center="sales"):
        conversation()
    # 2. The policy's [usage] cost_centers table names it.
    with coworker.acting_as("sales-rep-2", "assistant"):
        conversation()
    # 3. Nobody names one: the doctype's own center, then the default.
    with coworker.acting_as("sales-rep-3", "assistant"):
        read_customer()
        read_invoice()
    recs = [(r["user_id"], r["doctype"], r["cost_center"]) for r in _records(audit_url)]
    assert recs == [
        ("sales-rep-1", "Customer", "sales"),
        ("sales-rep-1", "Invoice", "sales"),
        ("sales-rep-1", "Campaign", "marketing"),
        ("sales-rep-2", "Customer", "sales"),
        ("sales-rep-2", "Invoice", "sales"),
        ("sales-rep-2", "Campaign", "marketing"),
        ("sales-rep-3", "Customer", "shared"),
        ("sales-rep-3", "Invoice", "finance"),
    ]
    rep = report(_all(audit_url), by="cost-center", pricing_version="recorded")
    tokens = {r.key: r.tokens["input_tokens"] for r in rep.rows}
    assert tokens == {"finance": 200, "marketing": 800, "sales": 600, "shared": 100}
    assert rep.total.tokens["input_tokens"] == sum(tokens.values())


def test_report_cli_table_and_json_totals(
    audit_url: str, spans: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``coworker usage report``: table with a TOTAL line, JSON whose total is the sum,
    hostile values escaped, --since/--until filter, unknown pricing versions refused."""
    coworker.configure(audit=audit_url, metrics=False)
    with coworker.acting_as("evil\x1b[2Juser"):
        _llm(100)
    with coworker.acting_as("bob"):
        _llm(50)
        with pytest.warns(coworker.usage.UsageWarning):
            with coworker.run("local"):
                coworker.record_usage(model="in-house", input_tokens=5, output_tokens=1)
    coworker.shutdown()
    assert main(["usage", "report", "--by", "user", "--url", audit_url]) == 0
    table = capsys.readouterr().out
    assert "\x1b" not in table and "TOTAL" in table and "1 unpriced" in table
    assert main(["usage", "report", "--by", "model", "--url", audit_url, "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["total"]["input_tokens"] == sum(r["input_tokens"] for r in data["rows"]) == 155
    assert data["total"]["unpriced_records"] == 1
    assert main(["usage", "report", "--by", "user", "--url", audit_url, "--json",
                 "--since", "2999-01-01"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["total"]["records"] == 0
    assert main(["usage", "report", "--by", "user", "--url", audit_url,
                 "--pricing-version", "genai-prices 0.0.1"]) == 2  # fmt: skip
    assert "not available here" in capsys.readouterr().err


def test_report_recomputes_with_a_new_pricing(tmp_path: Path, spans: Any) -> None:
    """Prices change: --pricing FILE recomputes from tokens; 'recorded' keeps the old cost."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    coworker.configure(audit=url, metrics=False)
    _llm(1_000_000)
    coworker.shutdown()
    prices = tmp_path / "pricing.toml"
    prices.write_text(
        'version = "v2"\n[[models]]\nmodel = "gpt-4o"\ninput_mtok = 1\noutput_mtok = 1\n'
    )
    from coworker.pricing import Pricing

    records = _all(url)
    new = report(records, by="model", pricing=Pricing.from_file(prices))
    old = report(records, by="model", pricing_version="recorded")
    assert new.total.cost == {"USD": Decimal("1.1")}
    assert old.total.cost == {"USD": Decimal("3.5")}  # 1M x 2.5 + 100k x 10
    assert "v2" in new.pricing_version
    assert "pricing:" in format_table(new)


BUDGET_POLICY = {
    "roles": {"u": {"*": ["*"]}},
    "users": {"u1": ["u"], "u2": ["u"]},
    "usage": {"budgets": {"daily": {"per": "user", "window": "1d", "max_tokens": 1000}}},
}


def test_budget_refuses_the_next_run_and_is_audited(tmp_path: Path, spans: Any) -> None:
    """Over the cap, the next run is refused before its body with BudgetExceeded (a
    PermissionDenied), audited as a policy violation; another user is unaffected."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    coworker.configure(audit=url, policy=BUDGET_POLICY, metrics=False)
    ran: list[str] = []

    @coworker.run(operation="chat", doctype="Chat")
    def chat(n: int) -> None:
        ran.append("body")
        coworker.record_usage(model="gpt-4o", input_tokens=n, output_tokens=0)

    with coworker.acting_as("u1"):
        chat(600)
        chat(600)  # now 1200 >= 1000
        with pytest.raises(coworker.BudgetExceeded) as info:
            chat(1)
    assert isinstance(info.value, coworker.PermissionDenied)
    assert info.value.rule == "usage.budgets.daily" and info.value.user == "u1"
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 86400
    assert ran == ["body", "body"]
    with coworker.acting_as("u2"):
        chat(1)
    coworker.shutdown()
    refusals = [r.fields() for r in _all(url) if r.fields().get("category") == "policy-violation"]
    assert len(refusals) == 1
    assert refusals[0]["user_id"] == "u1"
    assert refusals[0]["error_type"] == "coworker.exceptions.BudgetExceeded"


def test_budget_config_errors_are_clear() -> None:
    """A budget without a cap, with an unknown key or bad window fails at load."""
    from coworker.exceptions import ConfigError

    for spec, match in [
        ({"per": "user"}, "max_tokens or max_cost"),
        ({"per": "team", "max_tokens": 1}, "per"),
        ({"per": "user", "max_tokens": 1, "window": "-1h"}, "window"),
        ({"per": "user", "max_cost": "NaN"}, "max_cost"),
        ({"per": "user", "max_tokens": True}, "max_tokens"),
        ({"per": "user", "max_tokens": 1, "cap": 2}, "unknown"),
    ]:
        with pytest.raises(ConfigError, match=match):
            coworker.Policy.from_dict({"usage": {"budgets": {"b": spec}}})
    with pytest.raises(ConfigError, match="owner_pays"):
        coworker.Policy.from_dict({"doctypes": {"X": {"owner_pays": True}}})


def test_a_long_agent_loop_loses_no_usage_record(tmp_path: Path, spans: Any) -> None:
    """300 model calls in one run (over the SDK's 128 events per span): 300 ledger records."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    coworker.configure(audit=url, metrics=False)
    with coworker.run("agent loop"):
        for i in range(300):
            coworker.record_usage(model="gpt-4o", input_tokens=i, output_tokens=1)
    records = _records(url)
    assert len(records) == 300
    assert sorted(r["input_tokens"] for r in records) == list(range(300))
    assert [r["usage_index"] for r in records] == list(range(300))


def test_without_an_audit_trail_nothing_is_buffered(spans: Any) -> None:
    """No pipeline: the span totals only; no per-call buffer left behind."""
    from coworker import usage

    coworker.configure(metrics=False)
    with coworker.run("x") as r:
        coworker.record_usage(model="gpt-4o", input_tokens=3, output_tokens=1)
        assert usage.take_pending(r.span) is None


def test_usage_records_are_not_run_outcomes(tmp_path: Path, spans: Any) -> None:
    """Usage records have their own kind: the flow fold counts one run (not one per usage
    call), and an intent is never paired with a usage record as its outcome."""
    from coworker.audit.fold import replay

    url = f"sqlite:///{tmp_path / 'a.db'}"
    coworker.configure(audit=url, metrics=False)
    with coworker.flow("workflow") as flow:

        @coworker.run(operation="update", doctype="Invoice")
        def update() -> None:
            coworker.record_usage(model="gpt-4o", input_tokens=5, output_tokens=1)
            coworker.record_usage(model="gpt-4o", input_tokens=6, output_tokens=1)

        update()
    coworker.shutdown()
    store = open_store(url)
    try:
        assert replay(store, flow.id).runs == 1
    finally:
        store.close()
    records = [r.fields() for r in _all(url)]
    assert [r["kind"] for r in records if r["category"] == "usage"] == ["usage", "usage"]


def test_audit_query_and_tree_know_usage_records(tmp_path: Path, spans: Any) -> None:
    """``audit query --category usage`` lists the ledger; ``audit tree`` shows runs only (a
    non-audited run's usage record is not a run node)."""
    from coworker.audit.query import build_tree, query

    url = f"sqlite:///{tmp_path / 'a.db'}"
    coworker.configure(audit=url, metrics=False)
    with coworker.flow("ai-conversation") as flow:
        _llm(10)  # "chat": not audited itself, but its usage is recorded

        @coworker.run(operation="update", doctype="Invoice")
        def update() -> None:
            coworker.record_usage(model="gpt-4o", input_tokens=5, output_tokens=1)

        update()
    coworker.shutdown()
    store = open_store(url)
    try:
        usage = list(query(store, category="usage"))
        assert len(usage) == 2
        tree = build_tree(query(store, flow_id=flow.id), flow.id)
        names = [n.entry.fields["name"] for s in tree.steps for n in s.runs]
        assert names == ["update Invoice"]
    finally:
        store.close()


def test_a_run_calling_several_models_has_one_record_per_call_at_its_own_price(
    tmp_path: Path, spans: Any
) -> None:
    """The direct ledger: each call its own record, model and cost (the call's own rates);
    recomputing with today's pricing gives the same per-model costs."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    coworker.configure(audit=url, metrics=False)
    with coworker.run("agent", operation="chat"):
        big = coworker.record_usage(model="gpt-4o", input_tokens=1000, output_tokens=100)
        small = coworker.record_usage(model="gpt-4o-mini", input_tokens=1000, output_tokens=100)
    coworker.shutdown()
    records = _records(url)
    assert [(r["model"], r["usage_index"]) for r in records] == [
        ("gpt-4o", 0),
        ("gpt-4o-mini", 1),
    ]
    assert big is not None and small is not None
    assert [Decimal(r["cost_amount"]) for r in records] == [big.amount, small.amount]
    assert big.amount != small.amount
    rows = {row.key: row for row in report(_all(url), by="model").rows}
    assert rows["gpt-4o"].cost == {"USD": big.amount}
    assert rows["gpt-4o-mini"].cost == {"USD": small.amount}
