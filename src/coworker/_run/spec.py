"""What one decorated callable needs per call, computed once at decoration time.

:class:`Spec` holds the span name, the static attributes, the audit operation key and the
lazily built argument binders; :func:`derive_attributes` applies an ``attributes=``
callable's result to one call (failing closed under a policy or an audit trail).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

from coworker import attributes as attr
from coworker._state import SETTINGS
from coworker.exceptions import PermissionDenied
from coworker.identity import Identity, text

if TYPE_CHECKING:
    from coworker._run.options import RunOptions

__all__ = [
    "Binder",
    "Kind",
    "Spec",
    "attribute_text",
    "bind",
    "check_arguments",
    "classify",
    "derive_attributes",
    "kind_of",
    "openinference_kind",
    "slug",
    "span_name",
]

_log = logging.getLogger(__name__)

Kind = Literal["function", "coroutine", "generator", "async generator"]

AttributesFn = Callable[[Mapping[str, Any]], Mapping[str, Any]]

_OPERATION_KEYS: Final = ("operation", attr.OPERATION)
_DOCTYPE_KEYS: Final = ("doctype", attr.DOCTYPE)


class Spec:
    """What one decorated callable (or one ``with run(...)``) needs per call, precomputed."""

    __slots__ = (
        "attributes_fn",
        "capture_input",
        "capture_output",
        "doctype",
        "explicit_name",
        "forced",
        "op_key",
        "operation",
        "own_gen_ai_op",
        "prebound",
        "short",
        "sig",
        "sig_bound",
        "span_name",
        "static_attrs",
        "step",
        "target",
    )

    def __init__(self, options: RunOptions, target: Any, qualname: str) -> None:
        self.operation = options.operation
        self.op_key = options.operation.lower() if options.operation else None
        self.doctype = options.doctype
        self.step = options.step
        self.forced = options.state_changing
        self.capture_input = options.capture_input
        self.capture_output = options.capture_output
        self.target = target
        # A bound method given directly (coworker.run(obj.method)): its signature already
        # lacks self, unlike a function that wrapt binds at attribute access.
        self.prebound = inspect.ismethod(target)
        self.sig: Binder | None = None
        self.sig_bound: Binder | None = None
        static: dict[str, Any] = {}
        self.attributes_fn: AttributesFn | None = None
        if callable(options.attributes):
            self.attributes_fn = options.attributes
        elif options.attributes:
            static.update(options.attributes)
        if options.operation:
            static[attr.OPERATION] = options.operation
        if options.doctype:
            static[attr.DOCTYPE] = options.doctype
        if target is not None:
            module = getattr(target, "__module__", None)
            static[attr.CODE_FUNCTION] = f"{module}.{qualname}" if module else qualname
        # The app names the GenAI operation itself: coworker adds no execute_tool/tool name,
        # and the OpenInference kind follows the app's operation.
        self.own_gen_ai_op = attr.GEN_AI_OPERATION_NAME in static
        if self.own_gen_ai_op:
            openinference_kind(static)
        self.static_attrs = static
        self.explicit_name = options.name is not None
        self.span_name = options.name or span_name(options.operation, options.doctype, qualname)
        self.short = slug(options.operation or qualname.rsplit(".", 1)[-1])

    def binder(self, instance: Any) -> Binder | None:
        """The binder for a call with this ``instance`` (built on first use)."""
        if self.target is None:
            return None
        if self.sig is None:
            sig = inspect.signature(self.target)
            params = list(sig.parameters.values())
            self.sig_bound = Binder(sig.replace(parameters=params[1:]) if params else sig)
            self.sig = Binder(sig)
        # wrapt passes the instance (or class) separately, and the arguments without it, for
        # obj.method(...), Class.method(obj, ...) and classmethods alike; staticmethods and
        # plain functions get instance=None.
        return self.sig_bound if not self.prebound and instance is not None else self.sig


def openinference_kind(attrs: dict[str, Any]) -> None:
    """Set the OpenInference span kind that the app's own ``gen_ai.operation.name`` implies
    (an LLM call, a tool, ...), unless the app set a kind itself."""
    if attr.OPENINFERENCE_SPAN_KIND not in attrs:
        op = attrs.get(attr.GEN_AI_OPERATION_NAME)
        kind = attr.OPENINFERENCE_KIND_OF_OPERATION.get(op) if isinstance(op, str) else None
        attrs[attr.OPENINFERENCE_SPAN_KIND] = kind or attr.OPENINFERENCE_CHAIN


def span_name(operation: str | None, doctype: str | None, qualname: str) -> str:
    """``"{operation} {doctype}"`` when both are given, else ``qualname``."""
    if operation and doctype:
        return f"{operation} {doctype}"
    return qualname


def slug(value: str) -> str:
    """``value`` as a lower-case step-id part (``"Update Invoice"`` → ``"update-invoice"``)."""
    out = "".join(c if c.isalnum() or c in "_." else "-" for c in value.lower()).strip("-")
    return out or "run"


def kind_of(target: Any) -> Kind:
    """The callable kind that decides the wrapper (for callable objects, from
    ``type(obj).__call__``)."""
    probe = target
    if not (
        inspect.isfunction(target)
        or inspect.ismethod(target)
        or isinstance(target, functools.partial)
    ) and callable(type(target)):
        probe = type(target).__call__
    if inspect.isasyncgenfunction(probe):
        return "async generator"
    if inspect.iscoroutinefunction(probe):
        return "coroutine"
    if inspect.isgeneratorfunction(probe):
        return "generator"
    return "function"


def classify(op_key: str | None, doctype: str | None, forced: bool | None) -> str | None:
    """The audit category a run starts with (``state-change``, ``sensitive-read`` or none)."""
    if forced:
        return attr.CATEGORY_STATE_CHANGE
    if op_key is None:
        return None
    s = SETTINGS
    if forced is None and op_key in s.state_changing:
        return attr.CATEGORY_STATE_CHANGE
    if doctype is not None and op_key in s.read_operations and doctype in s.sensitive_doctypes:
        return attr.CATEGORY_SENSITIVE_READ
    return None


class Binder:
    """Binds call arguments to parameter names; ~10x cheaper than ``Signature.bind`` for the
    common case (no positional-only, ``*args`` or ``**kwargs`` parameters), which policy
    conditions and ``attributes=`` callables hit on every call."""

    __slots__ = ("_positional", "defaults", "names", "signature", "simple")

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        params = list(signature.parameters.values())
        self.names = tuple(p.name for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not p.empty}
        self._positional = sum(1 for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
        self.simple = all(
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params
        ) and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[: self._positional])

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise the ``TypeError`` of arguments that do not fit (nothing built when the call
        passes exactly one value per parameter, positionally)."""
        if not (self.simple and not kwargs and len(args) == len(self.names)):
            self.bind(args, kwargs)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments by parameter name, defaults applied.

        Raises:
            TypeError: the arguments do not fit the signature.
        """
        if self.simple and len(args) <= self._positional:
            names = self.names
            if not kwargs and len(args) == len(names):
                return dict(zip(names, args, strict=True))  # the common all-positional call
            out = dict(zip(names, args, strict=False))
            for key, value in kwargs.items():
                if key in out or (key not in self.defaults and key not in names):
                    break  # duplicate or unknown: let Signature.bind explain
                out[key] = value
            else:
                if len(out) < len(names):
                    for key, value in self.defaults.items():
                        out.setdefault(key, value)
                if len(out) == len(names):
                    return {n: out[n] for n in names}
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)


def bind(
    spec: Spec, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The call's arguments by parameter name (without ``self``/``cls``)."""
    try:
        binder = spec.binder(instance)
        return {} if binder is None else binder.bind(args, kwargs)
    except (TypeError, ValueError):
        # Unbindable (the call itself will raise) or no signature (some builtins).
        return {"args": args, "kwargs": kwargs}


def check_arguments(
    spec: Spec, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Raise the ``TypeError`` the call itself would raise for arguments that do not fit.

    Raises:
        TypeError: named after the run, as Python names the function.
    """
    try:
        binder = spec.binder(instance)
    except (TypeError, ValueError):
        return  # no signature to check against
    if binder is not None:
        try:
            binder.check(args, kwargs)
        except TypeError as exc:
            raise TypeError(f"{spec.span_name}() {exc}") from None


def attribute_text(value: str, key: str) -> str:
    """An attribute's text value, exact ``str`` and UTF-8 (empty is allowed)."""
    return text(value, f"attribute {key!r}", None) if value else ""


def derive_attributes(
    spec: Spec,
    bound: dict[str, Any],
    attrs: dict[str, Any],
    op: str | None,
    doctype: str | None,
    name: str,
    identity: Identity | None = None,
) -> tuple[str | None, str | None, str]:
    """Apply what the ``attributes=`` callable returns for this call.

    While a policy or an audit trail is configured, the callable decides what they act on
    (the operation and doctype, hence the permission check and the audit classification), so
    any error in it refuses the run: :class:`~coworker.PermissionDenied` chained to the
    cause. Going ahead without them would fail open (an unchecked delete, a run that should
    be audited and is not). With neither, the callable only decorates a trace: its errors
    are logged and the run goes ahead.

    Returns:
        The call's operation, doctype and span name.

    Raises:
        PermissionDenied: the callable raised, returned something other than a mapping, or
            a value no audit record can hold, while a policy or audit trail is configured.
    """
    fn = spec.attributes_fn
    assert fn is not None
    try:
        derived = _derived(fn, bound)
    except Exception as exc:
        settings = SETTINGS
        if settings.policy is None and not settings.audit_records:
            # Tracing only: the callable is the app's code, and a bug there must not break
            # the call it merely observes.
            _log.exception("coworker.run attributes callable of %r failed; ignored", spec.span_name)
            return op, doctype, name
        raise PermissionDenied(
            f"{spec.span_name}: refused because its attributes= callable failed "
            f"({type(exc).__name__}: {exc}); the policy and the audit trail cannot decide "
            "without what it derives",
            user=identity.user_id if identity is not None else None,
            agent=identity.agent_id if identity is not None else None,
            operation=op,
            doctype=doctype,
            rule="attributes= callable failed (fail closed)",
        ) from exc
    for key, value in derived:
        if key in _OPERATION_KEYS:
            op = value
            attrs[attr.OPERATION] = op
        elif key in _DOCTYPE_KEYS:
            doctype = value
            attrs[attr.DOCTYPE] = doctype
        elif key in attr.RESERVED_ATTRIBUTES:
            # Identity, flow, run and audit keys come from coworker's own context only: an
            # attributes callable is often fed by call arguments, which must not forge them.
            _log.warning(
                "coworker.run attributes of %r may not set %r; ignored", spec.span_name, key
            )
        else:
            attrs[key] = value
    if op and doctype and not spec.explicit_name:
        name = f"{op} {doctype}"
    return op, doctype, name


def _derived(fn: AttributesFn, bound: dict[str, Any]) -> list[tuple[str, Any]]:
    # A read-only view: the same bound arguments are what the policy conditions check.
    extra = fn(MappingProxyType(bound))
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"it returned a {type(extra).__name__}, not a mapping")
    derived: list[tuple[str, Any]] = []
    for key, value in (extra or {}).items():
        if value is None:
            continue  # e.g. an optional argument: no attribute rather than "None"
        key = text(key, "attribute name")
        if key in _OPERATION_KEYS or key in _DOCTYPE_KEYS:
            value = text(value if isinstance(value, str) else str(value), key)
        elif isinstance(value, str):
            value = attribute_text(value, key)
        elif not isinstance(value, bool | int | float):
            value = attribute_text(str(value), key)
        derived.append((key, value))
    return derived
