"""Pickling decorated functions by reference, never as their undecorated originals.

A plain function pickles by its ``__qualname__``; for a decorated one that name may lead to
the *undecorated* original (``audited = coworker.run(...)(raw)`` keeps ``raw``'s qualname),
which would silently drop the policy and the audit in the child process. So a
:class:`Wrapper` pickles by the name under which its module (or class) really holds *this*
wrapper, and unpickling checks that it gets a coworker wrapper back. A
:class:`BoundWrapper` (``obj.method``) pickles as ``getattr(obj, name)``.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from typing import Any

import wrapt

__all__ = ["BoundWrapper", "Wrapper"]


class BoundWrapper(wrapt.BoundFunctionWrapper):  # type: ignore[type-arg]
    """wrapt's bound wrapper (``obj.method``) that never hands out the undecorated function.

    * ``__func__`` is the decorated function, not the original: code that rebinds methods
      (``types.MethodType(obj.m.__func__, other)``) keeps the policy check and the audit.
    * It pickles like a bound method, as ``getattr(obj, name)`` (so ``pool.submit(obj.m)``
      works), with ``name`` the attribute under which the class holds the decorated function.
    """

    @property
    def __func__(self) -> Any:
        return self._self_parent

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any, ...]]:
        owner = self._self_instance
        if owner is None:  # Class.method: the function itself
            reduced: tuple[Any, tuple[Any, ...]] = self._self_parent.__reduce_ex__(protocol)
            return reduced
        classes = owner.__mro__ if isinstance(owner, type) else type(owner).__mro__
        for cls in classes:
            for key, value in vars(cls).items():
                if _holds(value, self._self_parent):
                    return getattr, (owner, key)
        raise pickle.PicklingError(
            f"cannot pickle {self._self_parent.__qualname__!r} bound to {owner!r}: its class "
            "does not hold this coworker.run function under any name"
        )


class Wrapper(wrapt.FunctionWrapper):  # type: ignore[type-arg]
    """wrapt's transparent proxy, plus pickling by reference like a plain function (so a
    decorated module-level function can still go to a ProcessPoolExecutor)."""

    __bound_function_wrapper__ = BoundWrapper

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[str, str]]:
        return _import_wrapper, (self.__module__, _binding_name(self))

    def __copy__(self) -> Wrapper:
        return self  # functions copy as themselves

    def __deepcopy__(self, memo: Any) -> Wrapper:
        return self


def _holds(value: Any, wrapper: Any) -> bool:
    """``value`` is ``wrapper``, or a classmethod/staticmethod around it (exact types: a
    wrapt proxy passes ``isinstance`` checks for what it wraps)."""
    return value is wrapper or (
        type(value) in (classmethod, staticmethod) and value.__func__ is wrapper
    )


def _binding_name(wrapper: Wrapper) -> str:
    """The dotted name under which ``wrapper``'s module holds exactly this wrapper."""
    module = sys.modules.get(wrapper.__module__)
    qualname = wrapper.__qualname__
    parent_path, _, leaf = qualname.rpartition(".")
    holder: Any = module
    if module is not None and parent_path and "<locals>" not in parent_path:
        for part in parent_path.split("."):
            holder = getattr(holder, part, None)
    candidates = [leaf] if holder is not None else []
    if holder is not None:
        candidates += [k for k in vars(holder) if k != leaf]
    for key in candidates:
        if _holds(vars(holder).get(key), wrapper):
            return f"{parent_path}.{key}" if holder is not module else key
    raise pickle.PicklingError(
        f"cannot pickle the coworker.run function {wrapper.__module__}.{qualname}: "
        "its module does not hold this decorated function under any name (pickling it by its "
        "qualified name would unpickle the undecorated original, without policy and audit)"
    )


def _import_wrapper(module: str, name: str) -> Any:
    """Unpickle a decorated function; refuse anything that is not a coworker wrapper."""
    obj = _import_by_name(module, name)
    if not isinstance(obj, Wrapper | BoundWrapper):
        raise pickle.UnpicklingError(
            f"{module}.{name} is not a coworker.run function in this process (a "
            f"{type(obj).__name__}); refusing to unpickle it without its policy and audit"
        )
    return obj


def _import_by_name(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
