"""The fold (coworker.audit.fold) against live flows: workflows, conversations, breaks,
retries, failures and concurrency on real SQLite files; a property test over random event
sequences; replay and listing on the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import coworker
from coworker import _flow_events
from coworker.audit.cli import _cmd_flow
from coworker.audit.fold import (
    FOLD_VERSION,
    FoldVersionError,
    fold,
    list_flows,
    replay,
)
from coworker.audit.store import InMemoryStore
from coworker.audit.store_sqlite import SQLiteStore
from coworker.audit.verify import verify_chain

ORDERS = coworker.workflow("orders", steps=["validate", "pay", "ship"])


@coworker.run(operation="create", doctype="Order")
def create_order() -> None:
    """An audited state change."""


@coworker.run(operation="read", doctype="Order")
def read_order() -> None:
    """Not audited (a plain read)."""


class Flaky:
    """An audited payment that fails the first ``failures`` times."""

    def __init__(self, failures: int) -> None:
        self.left = failures

    def __call__(self) -> None:
        @coworker.run(operation="submit", doctype="Payment", step="pay")
        def pay() -> None:
            if self.left > 0:
                self.left -= 1
                raise RuntimeError("card declined")

        pay()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    yield url


def assert_fold_is_live(store: Any, flow: coworker.Flow) -> None:
    """Flush, then the fold of the log equals what the live flow reported."""
    _flow_events.flush()
    live = _flow_events.live_state(flow.id)
    assert live is not None
    state = replay(store, flow.id)
    assert state.status == live["status"]
    assert state.current_step == live["current_step"]
    assert {s.step_id: {"attempts": s.attempts, "outcome": s.outcome} for s in state.steps} == (
        live["steps"]
    )
    if state.seal is None:  # the live head is the flow's latest record
        assert state.head is not None and state.head.seq == live["head_seq"]


def test_workflow_fold_equals_live_state_at_every_step(db: str) -> None:
    """Each step of a workflow with a failure and a retry: fold == live, then a valid seal."""
    coworker.configure(audit=db)
    store = SQLiteStore(db.removeprefix("sqlite:///"))
    pay = Flaky(failures=2)
    with coworker.acting_as("alice", "assistant"), ORDERS.start() as f:
        with f.step("validate"):
            create_order()
            assert_fold_is_live(store, f)
        coworker.force_flush()  # the step's outcome rides with the next record otherwise
        assert replay(store, f.id).step("validate").outcome == "completed"  # type: ignore[union-attr]
        for attempt in (1, 2):
            with pytest.raises(RuntimeError):
                pay()
            assert_fold_is_live(store, f)
            state = replay(store, f.id)
            assert state.status == "blocked"
            assert state.step("pay") is not None
            assert state.step("pay").attempts == attempt  # type: ignore[union-attr]
        pay()
        assert_fold_is_live(store, f)
        assert replay(store, f.id).status == "active"
        with f.step("ship"):
            read_order()
    assert_fold_is_live(store, f)
    state = replay(store, f.id)
    assert state.status == "completed"
    assert [(s.step_id, s.attempts, s.outcome) for s in state.steps] == [
        ("validate", 1, "completed"),
        ("pay", 3, "completed"),
        ("ship", 1, "completed"),
    ]
    assert [t.event for t in state.transitions if t.step_id == "pay"] == [
        "step-entered",
        "step-failed",
        "step-retried",
        "step-failed",
        "step-retried",
        "step-completed",
    ]
    assert state.users == ("alice",) and state.agents == ("assistant",)
    assert state.definition_id == "orders" and state.definition_steps == ORDERS.steps
    seal = state.seal
    assert seal is not None and seal.head_matches and seal.status_matches
    assert seal.head_seq == seal.seq - 1 and state.after_seal == 0
    assert verify_chain(store).ok
    store.close()


def test_failed_flow_is_sealed_failed_and_chain_verifies(db: str) -> None:
    """An exception out of the workflow block: step failed, flow failed, sealed."""
    coworker.configure(audit=db)
    with pytest.raises(KeyError), ORDERS.start() as f, f.step("validate"):
        create_order()
        raise KeyError("missing")
    coworker.force_flush()
    store = SQLiteStore(db.removeprefix("sqlite:///"))
    state = replay(store, f.id)
    assert state.status == "failed" and state.error_type == "KeyError"
    assert state.step("validate").outcome == "failed"  # type: ignore[union-attr]
    assert state.seal is not None and state.seal.status_matches
    assert_fold_is_live(store, f)
    assert verify_chain(store).ok
    store.close()


def test_conversation_break_links_flows_and_seals_the_old_one(db: str) -> None:
    """A topic change: the old flow is broken and sealed, the new one starts linked to it."""
    coworker.configure(audit=db, flow_events=["ai-conversation"])
    chat = coworker.conversation("chat-1")
    with coworker.acting_as("bob", "agent-1"):
        with chat.turn():
            read_order()
            first = chat.flow
        with chat.turn():
            coworker.break_flow("topic-change")
            create_order()
            second = chat.flow
    coworker.force_flush()
    store = SQLiteStore(db.removeprefix("sqlite:///"))
    old = replay(store, first.id)
    assert old.status == "broken"
    assert old.next_flow_id == second.id and old.next_break_reason == "topic-change"
    assert old.seal is not None and old.seal.head_matches and old.seal.status_matches
    assert [s.step_id for s in old.steps] == ["turn-1-read-1"]
    new = replay(store, second.id)
    assert new.status == "active" and new.previous_flow_id == first.id
    assert new.break_reason == "topic-change" and new.current_step == "turn-2-create-1"
    assert_fold_is_live(store, second)
    assert new.users == ("bob",)
    store.close()


def test_conversations_get_no_flow_events_by_default(db: str) -> None:
    """Only workflows are on by default: a conversation leaves its run records only."""
    coworker.configure(audit=db)
    chat = coworker.conversation("chat-2")
    with chat.turn():
        create_order()
    store = SQLiteStore(db.removeprefix("sqlite:///"))
    state = replay(store, chat.flow.id)
    assert state.events == 0 and state.runs == 1
    assert list_flows(store) == []
    store.close()


def test_threads_each_fold_equals_live_state(db: str) -> None:
    """Eight threads run workflows at once; every flow folds to its live state, seals hold."""
    coworker.configure(audit=db)
    flows: list[coworker.Flow] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            start.wait(timeout=30)
            pay = Flaky(failures=n % 2)
            with coworker.acting_as(f"user-{n}"), ORDERS.start() as f:
                flows.append(f)
                with f.step("validate"):
                    create_order()
                try:
                    pay()
                except RuntimeError:
                    pay()
                if n % 3 == 0:
                    raise ValueError("abandoned")
        except ValueError:
            pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    store = SQLiteStore(db.removeprefix("sqlite:///"))
    assert len(flows) == 8
    for f in flows:
        assert_fold_is_live(store, f)
        state = replay(store, f.id)
        assert state.seal is not None and state.seal.head_matches and state.seal.status_matches
        assert len(state.users) == 1 and state.users[0].startswith("user-")
    statuses = sorted(s.status for s in list_flows(store))
    assert statuses == sorted(replay(store, f.id).status for f in flows)
    assert statuses.count("failed") == 3  # n = 0, 3, 6
    assert verify_chain(store).ok
    store.close()


def test_asyncio_tasks_each_fold_equals_live_state(db: str) -> None:
    """Concurrent asyncio tasks in their own workflows interleave; each folds correctly."""
    coworker.configure(audit=db)

    @coworker.run(operation="update", doctype="Order")
    async def update(gate: asyncio.Event) -> None:
        await gate.wait()

    async def one(n: int, gate: asyncio.Event) -> coworker.Flow:
        with ORDERS.start() as f:
            async with f.step("validate"):
                await update(gate)
            async with f.step("ship"):
                await asyncio.sleep(0)
        return f

    async def main() -> list[coworker.Flow]:
        gate = asyncio.Event()
        tasks = [asyncio.create_task(one(n, gate)) for n in range(5)]
        await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(*tasks))

    flows = asyncio.run(main())
    store = SQLiteStore(db.removeprefix("sqlite:///"))
    for f in flows:
        assert_fold_is_live(store, f)
        state = replay(store, f.id)
        assert state.status == "completed" and [s.step_id for s in state.steps] == [
            "validate",
            "ship",
        ]
    store.close()


def test_replay_as_of_seq_and_time_go_back(db: str) -> None:
    """Replay as of an earlier seq or time shows the flow as it was then."""
    coworker.configure(audit=db)
    with ORDERS.start() as f:
        with f.step("validate"):
            create_order()
        coworker.force_flush()
        store = SQLiteStore(db.removeprefix("sqlite:///"))
        mid = replay(store, f.id)
        with pytest.raises(RuntimeError):
            Flaky(1)()
    coworker.force_flush()
    final = replay(store, f.id)
    assert final.status == "completed"
    assert mid.head is not None
    back = replay(store, f.id, as_of=mid.head.seq)
    assert (back.status, back.steps, back.head) == (mid.status, mid.steps, mid.head)
    assert back.transitions == mid.transitions
    at = next(t.at for t in final.transitions if t.seq == mid.head.seq)
    assert at is not None
    assert replay(store, f.id, as_of=at).transitions == mid.transitions
    moment = datetime(1990, 1, 1, tzinfo=UTC)
    with pytest.raises(LookupError):
        replay(store, f.id, as_of=moment)
    store.close()


def test_replay_reads_only_the_flows_records_through_the_index(db: str) -> None:
    """SQLite answers replay's query with the (flow_id, seq) index, not a scan."""
    import sqlite3

    coworker.configure(audit=db)
    with ORDERS.start(), coworker.step("validate"):
        create_order()
    conn = sqlite3.connect(db.removeprefix("sqlite:///"))
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT r.seq FROM audit_records r WHERE r.flow_id = ? ORDER BY r.seq",
        ("x",),
    ).fetchall()
    assert any("audit_records_flow" in str(row) for row in plan)
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT r.seq FROM audit_records r WHERE r.category = ? ORDER BY r.seq",
        ("flow",),
    ).fetchall()
    assert any("audit_records_category" in str(row) for row in plan)
    conn.close()


def test_a_failed_write_keeps_the_events_and_writes_them_later(tmp_path: Path) -> None:
    """The store refuses a write: the queued flow events are kept and written, in order,
    with the next successful write; nothing is lost."""
    store = SQLiteStore(tmp_path / "a.db")
    refuse = threading.Event()

    class Refusing:
        """A real store that refuses appends while ``refuse`` is set."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def append(self, entries: Any, payloads: Any = None) -> Any:
            if refuse.is_set():
                raise coworker.AuditUnavailable("disk full")
            return store.append(entries, payloads)

    coworker.configure(audit=Refusing())  # type: ignore[arg-type]
    with ORDERS.start() as f:
        with f.step("validate"):
            pass  # its events are queued
        refuse.set()
        with pytest.raises(coworker.AuditUnavailable), f.step("pay"):
            create_order()  # its record's write carries them: refused, they are put back
        refuse.clear()
        with f.step("ship"):
            create_order()
    coworker.force_flush()
    state = replay(store, f.id)
    assert [t.event for t in state.transitions] == [
        "flow-started",
        "step-entered",
        "step-completed",
        "step-entered",
        "step-failed",
        "step-entered",
        "step-completed",
        "flow-completed",
        "flow-sealed",
    ]
    assert state.status == "completed" and state.seal is not None and state.seal.head_matches
    coworker.shutdown()
    store.close()


def test_cli_flow_accepts_a_prefix_and_escapes_control_characters(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coworker audit flow PREFIX` prints the folded state with stored text escaped."""
    import argparse

    coworker.configure(audit=db)
    with coworker.acting_as("eve\x1b[2J\nforged"), ORDERS.start(id="flow-\x1b[31mred") as f:
        with f.step("validate"):
            create_order()
    coworker.shutdown()
    ns = argparse.Namespace(url=db, flow_id="flow-", as_of=None, json=False, newer_fold=False)
    assert _cmd_flow(ns) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "eve\\x1b[2J\\x0aforged" in out
    assert "completed" in out and "(matches)" in out
    ns.json = True
    ns.as_of = "2"
    assert _cmd_flow(ns) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flow_id"] == f.id and data["as_of"] == 2 and data["status"] == "active"


# -- pure fold over synthetic events ----------------------------------------------------------

_STEPS = ("a", "b", "c")
_EVENT = st.one_of(
    st.tuples(
        st.sampled_from(["step-entered", "step-completed", "step-failed"]), st.sampled_from(_STEPS)
    ),
    st.tuples(
        st.sampled_from(["run-ok", "run-failed", "flow-completed", "flow-failed"]), st.none()
    ),
    st.tuples(st.just("flow-broken"), st.none()),
)


def _entry(flow_id: str, event: str, step: str | None, user: str) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1,
        "kind": "outcome",
        "recorded_at": "2026-01-01T00:00:00.000000000Z",
        "flow_id": flow_id,
        "flow_type": "workflow",
        "step_id": step,
        "user_id": user,
    }
    if event.startswith("run-"):
        return {**base, "category": "state-change", "operation": "update",
                "outcome": "ok" if event == "run-ok" else "ValueError"}  # fmt: skip
    extra: dict[str, Any] = {"category": "flow", "operation": event, "flow_event_v": 1}
    extra["outcome"] = "ValueError" if event.endswith("failed") else "ok"
    if event == "flow-broken":
        extra.update(next_flow_id="next", break_reason="topic-change")
    return {**base, **extra}


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(_EVENT, st.sampled_from(["u1", "u2"]), st.booleans()), max_size=40),
)
def test_fold_is_deterministic_and_prefix_equals_replay_as_of(events: list[Any]) -> None:
    """Random event sequences (interleaved with another flow's): fold is deterministic, and
    folding the first k records equals replay as of the k-th record's seq."""
    store = InMemoryStore()
    store.append([_entry("f", "flow-started", None, "u1")])
    for (event, step), user, noise in events:
        store.append([_entry("f", event, step, user)])
        if noise:
            store.append([_entry("other", "step-failed", "a", "u9")])
    records = list(store.iter_from(1))
    whole = fold(records, "f")
    assert fold(list(store.iter_from(1)), "f") == whole
    assert whole.status in ("active", "blocked", "completed", "failed", "broken")
    assert "u9" not in whole.users
    for rec in records:
        prefix = [r for r in records if r.seq <= rec.seq]
        expect = fold(prefix, "f")
        got = replay(store, "f", as_of=rec.seq)
        assert got.transitions == expect.transitions and got.steps == expect.steps
        assert got.status == expect.status and got.head == expect.head
        assert got.users == expect.users


def _sealed_store(**seal: Any) -> InMemoryStore:
    store = InMemoryStore()
    recs = store.append(
        [_entry("f", "flow-started", None, "u"), _entry("f", "flow-completed", None, "u")]
    )
    fields = {**_entry("f", "flow-sealed", None, "u"), "head_seq": recs[-1].seq,
              "head_hash": recs[-1].hash.hex(), "flow_status": "completed",
              "fold_version": FOLD_VERSION, **seal}  # fmt: skip
    store.append([fields])
    return store


def test_seal_naming_another_hash_or_status_is_reported() -> None:
    """A seal whose head hash or status does not match the fold says so."""
    assert replay(_sealed_store(), "f").seal.head_matches is True  # type: ignore[union-attr]
    bad = replay(_sealed_store(head_hash="00" * 32), "f").seal
    assert bad is not None and bad.head_matches is False
    lie = replay(_sealed_store(flow_status="failed"), "f").seal
    assert lie is not None and lie.status_matches is False


def test_replaying_a_seal_of_another_fold_version_must_be_asked_for() -> None:
    """A flow sealed under an older fold needs newer_fold=True; a newer one is refused."""
    old = _sealed_store(fold_version=FOLD_VERSION - 1)
    with pytest.raises(FoldVersionError, match="must be asked for"):
        replay(old, "f")
    state = replay(old, "f", newer_fold=True)
    assert state.seal is not None and state.seal.status_matches is None
    with pytest.raises(FoldVersionError, match="upgrade"):
        replay(_sealed_store(fold_version=FOLD_VERSION + 1), "f", newer_fold=True)
    store = InMemoryStore()
    store.append([{**_entry("f", "flow-started", None, "u"), "flow_event_v": 99}])
    with pytest.raises(FoldVersionError, match="upgrade"):
        replay(store, "f")


# -- PostgreSQL ------------------------------------------------------------------------------


def test_postgres_replay_and_listing_match_the_live_flows(tmp_path: Path) -> None:
    """On the real PostgreSQL server: replay and list_flows equal the live flows, through
    the flow_id and (added) category indexes."""
    from tests.pg import PGServer, import_psycopg, require_server

    import_psycopg()
    from coworker.audit.store_postgres import PostgresStore

    server = PGServer(require_server())
    try:
        url = server.schema_url()
        store = PostgresStore(url, spool=tmp_path / "spool.db")
        coworker.configure(audit=store)
        flows = []
        for n in range(3):
            try:
                with ORDERS.start() as f:
                    flows.append(f)
                    with f.step("validate"):
                        create_order()
                    if n == 1:
                        raise ValueError("no stock")
            except ValueError:
                pass
        coworker.shutdown()
        for f in flows:
            assert_fold_is_live(store, f)
            state = replay(store, f.id)
            assert state.seal is not None and state.seal.head_matches
        listed = {s.flow_id: s.status for s in list_flows(store)}
        assert listed == {flows[0].id: "completed", flows[1].id: "failed", flows[2].id: "completed"}
        import psycopg

        with psycopg.connect(server.url) as conn:
            names = {
                row[0]
                for row in conn.execute(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (store.schema,)
                )
            }
        assert {"records_flow", "records_category"} <= names
        store.close()
    finally:
        server.close()


def test_a_process_killed_mid_flow_folds_to_where_it_was(tmp_path: Path) -> None:
    """os._exit inside a step: what was durable folds to an active, unsealed flow whose
    step is still running (its step-entered rode with the run record)."""
    import subprocess
    import sys
    import textwrap

    db = tmp_path / "a.db"
    script = textwrap.dedent(
        f"""
        import os, coworker
        coworker.configure(audit="sqlite:///{db}")
        wf = coworker.workflow("w", steps=["one", "two"])
        @coworker.run(operation="create", doctype="D")
        def c(): pass
        with wf.start(id="crash-flow") as f:
            with f.step("one"):
                c()
            with f.step("two"):
                c()
                os._exit(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr
    store = SQLiteStore(db)
    state = replay(store, "crash-flow")
    assert state.status == "active" and state.seal is None and state.current_step == "two"
    assert [(s.step_id, s.outcome) for s in state.steps] == [
        ("one", "completed"),
        ("two", "running"),
    ]
    assert state.runs == 2 and verify_chain(store).ok
    store.close()


def test_cli_flows_lists_with_status_type_and_since_filters(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coworker audit flows` lists every flow with its folded status; filters narrow it."""
    import argparse

    from coworker.audit.cli import _cmd_flows

    coworker.configure(audit=db, flow_events="all")
    with ORDERS.start() as done:
        pass
    with pytest.raises(ValueError), coworker.flow("batch-job") as job:
        raise ValueError("bad row")
    coworker.shutdown()

    def run(**kw: Any) -> str:
        ns = argparse.Namespace(url=db, status=None, flow_type=None, since=None, json=False)
        for k, v in kw.items():
            setattr(ns, k, v)
        assert _cmd_flows(ns) == 0
        return capsys.readouterr().out

    table = run()
    assert done.id in table and job.id in table and "failed" in table
    lines = [json.loads(x) for x in run(status="failed", json=True).splitlines()]
    assert [x["flow_id"] for x in lines] == [job.id]
    assert [
        json.loads(x)["flow_id"] for x in run(flow_type="workflow", json=True).splitlines()
    ] == [done.id]
    assert run(since="2999-01-01", json=True) == ""


def test_unaudited_step_run_ends_normally_when_its_event_cannot_be_written(
    tmp_path: Path,
) -> None:
    """A plain read that opens a step returns (its span ends) while the store refuses the
    step outcome; the outcome stays queued and is written with the flow's next write."""
    store = SQLiteStore(tmp_path / "a.db")
    refuse = threading.Event()

    class Refusing:
        """A real store that refuses appends while ``refuse`` is set."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def append(self, entries: Any, payloads: Any = None) -> Any:
            if refuse.is_set():
                raise coworker.AuditUnavailable("disk full")
            return store.append(entries, payloads)

    @coworker.run(operation="read", doctype="Order", step="validate")
    def look() -> str:
        return "seen"

    coworker.configure(audit=Refusing())  # type: ignore[arg-type]
    with ORDERS.start() as f:
        refuse.set()
        assert look() == "seen"
        refuse.clear()
    coworker.force_flush()
    state = replay(store, f.id)
    assert [(s.step_id, s.outcome) for s in state.steps] == [("validate", "completed")]
    assert state.status == "completed" and state.seal is not None
    coworker.shutdown()
    store.close()


def test_the_seal_record_has_an_inclusion_proof(tmp_path: Path) -> None:
    """`coworker audit prove SEQ` on a flow's seal gives a tlog-proof checked against the
    signed checkpoint: the seal, and the head it names, are in the log."""
    import subprocess
    import sys

    key = tmp_path / "log.key"
    cli = [sys.executable, "-m", "coworker", "audit"]
    subprocess.run([*cli, "keygen", "--name", "audit.test/flows", "--out", str(key)], check=True)
    db = f"sqlite:///{tmp_path / 'a.db'}"
    coworker.configure(audit=db, checkpoint_key=str(key))
    with ORDERS.start() as f, f.step("validate"):
        create_order()
    coworker.shutdown()  # writes the last checkpoint
    store = SQLiteStore(tmp_path / "a.db")
    seal = replay(store, f.id).seal
    store.close()
    assert seal is not None and seal.head_matches
    done = subprocess.run(
        [*cli, "prove", str(seal.seq), "--url", db, "--key", f"{key}.pub"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.startswith("c2sp.org/tlog-proof@v1") and f"index {seal.seq - 1}" in done.stdout
    )
