"""Decorated functions and bound methods pickle and copy like the originals."""

from __future__ import annotations

import copy
import pickle

import coworker


# Module level, so that pickle can find them by reference.
@coworker.run
def double(x: int) -> int:
    """Doubles."""
    return 2 * x


def test_decorated_module_level_function_pickles() -> None:
    """pickle round-trips a decorated module-level function by reference."""
    assert pickle.loads(pickle.dumps(double))(3) == 6


class _Svc:
    def __init__(self, k: int) -> None:
        self.k = k

    @coworker.run
    def work(self, x: int) -> int:
        return self.k * x


def test_decorated_bound_method_pickles() -> None:
    """pickle round-trips svc.work and _Svc.work like plain methods."""
    svc = _Svc(3)
    assert pickle.loads(pickle.dumps(svc.work))(2) == 6
    assert pickle.loads(pickle.dumps(_Svc.work))(svc, 2) == 6


def test_decorated_function_copies() -> None:
    """copy.copy and copy.deepcopy of a decorated function work like for a function."""
    assert copy.copy(double)(2) == 4
    assert copy.deepcopy(double)(2) == 4
