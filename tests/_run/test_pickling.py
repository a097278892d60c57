"""Pickling and rebinding never strip the coworker.run wrapper (policy and audit stay)."""

from __future__ import annotations

import multiprocessing
import pickle
import sys
import types
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import coworker
from coworker import _setup

POLICY: dict[str, Any] = {
    "roles": {"clerk": {"Invoice": ["select"]}},
    "users": {"clerk-1": ["clerk"]},
}


def _raw_update(invoice_id: str) -> str:
    return f"updated {invoice_id}"


# Bound under another name than the function's own __qualname__ ("_raw_update").
audited_update = coworker.run(operation="update", doctype="Invoice")(_raw_update)


class Ledger:
    @coworker.run(operation="update", doctype="Invoice")
    def post(self, invoice_id: str) -> str:
        return f"posted {invoice_id}"

    alias = post  # the same decorated function under a second name

    @coworker.run
    @classmethod
    def opened(cls, invoice_id: str) -> str:
        return f"opened {invoice_id}"

    @coworker.run
    @staticmethod
    def checked(invoice_id: str) -> str:
        return f"checked {invoice_id}"

    @classmethod
    @coworker.run
    def closed(cls, invoice_id: str) -> str:
        return f"closed {invoice_id}"


class Other:
    pass


def _call_as_clerk(fn: Any, arg: str) -> str:
    with coworker.acting_as("clerk-1"):
        result: str = fn(arg)
        return result


def test_renamed_decorated_function_pickles_as_itself() -> None:
    """pickle round-trips `audited = coworker.run(...)(raw)` to the wrapper, not to raw."""
    assert pickle.loads(pickle.dumps(audited_update)) is audited_update
    coworker.configure(policy=POLICY, metrics=False)
    with coworker.acting_as("clerk-1"), pytest.raises(coworker.PermissionDenied):
        pickle.loads(pickle.dumps(audited_update))("INV-1")


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_process_pool_round_trip_keeps_the_policy(tmp_path: Any) -> None:
    """Through a ProcessPoolExecutor the child runs the wrapper: denied and audited there."""
    coworker.configure(policy=POLICY, metrics=False)
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        future = pool.submit(_call_as_clerk, audited_update, "INV-1")
        with pytest.raises(coworker.PermissionDenied):
            future.result(timeout=60)


def test_unpickling_refuses_an_undecorated_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the name resolves to an undecorated function when loading, loading fails."""
    data = pickle.dumps(audited_update)
    monkeypatch.setattr(sys.modules[__name__], "audited_update", _raw_update)
    with pytest.raises(pickle.UnpicklingError, match=r"not a coworker\.run function"):
        pickle.loads(data)


def test_unreachable_decorated_function_refuses_to_pickle() -> None:
    """A decorated function its module does not hold cannot be pickled by a wrong name."""
    hidden = coworker.run(operation="update", doctype="Invoice")(_raw_update)
    with pytest.raises(pickle.PicklingError, match="undecorated original"):
        pickle.dumps(hidden)


def test_bound_method_func_keeps_the_wrapper() -> None:
    """types.MethodType(obj.m.__func__, other) still goes through the policy."""
    coworker.configure(policy=POLICY, metrics=False)
    rebound = types.MethodType(Ledger().post.__func__, Other())
    with coworker.acting_as("clerk-1"), pytest.raises(coworker.PermissionDenied):
        rebound("INV-1")
    assert Ledger().post.__func__ is Ledger.__dict__["post"]


def test_bound_methods_pickle_by_attribute() -> None:
    """obj.m pickles as getattr(obj, name), under any name the class holds it by."""
    for bound in (Ledger().post, Ledger().alias):
        clone = pickle.loads(pickle.dumps(bound))
        assert clone("INV-2") == "posted INV-2"
        assert clone.__func__ is Ledger.__dict__["post"]
    coworker.configure(policy=POLICY, metrics=False)
    with coworker.acting_as("clerk-1"), pytest.raises(coworker.PermissionDenied):
        pickle.loads(pickle.dumps(Ledger().post))("INV-3")
    assert _setup.audit_store() is None  # no audit configured: only the policy acted


def test_classmethods_and_staticmethods_pickle() -> None:
    """Decorated classmethods and staticmethods, from the class or an instance, round-trip."""
    ledger = Ledger()
    for fn in (Ledger.opened, ledger.opened, Ledger.checked, ledger.checked, Ledger.closed):
        assert pickle.loads(pickle.dumps(fn))("I") == fn("I")
