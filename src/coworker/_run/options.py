"""``coworker.run``: one object, three forms (``@run``, ``@run(...)``, ``with run(...)``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar, overload

from coworker import attributes as attr
from coworker._run.lifecycle import Run, begin
from coworker._run.spec import Spec, attribute_text, span_name
from coworker._run.wrappers import decorate
from coworker._scope import SCOPE, AsyncContextMixin
from coworker.identity import text

__all__ = ["RunOptions", "run"]

_log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

Attributes = Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]] | None


class RunOptions(AsyncContextMixin):
    """What ``coworker.run(...)`` returns: the options of one run, usable as a decorator
    (``@coworker.run(operation="update")``) and as a sync or async context manager whose
    ``as`` target is the :class:`Run` (``with coworker.run("import batch") as r:``).

    One object may be entered again, nested, or shared by concurrent tasks. Not created
    directly: see :func:`run`.
    """

    __slots__ = (
        "_open",
        "_spec",
        "attributes",
        "capture_input",
        "capture_output",
        "doctype",
        "name",
        "operation",
        "state_changing",
        "step",
    )

    def __init__(
        self,
        name: str | None,
        operation: str | None,
        doctype: str | None,
        step: str | None,
        state_changing: bool | None,
        capture_input: bool,
        capture_output: bool,
        attributes: Attributes,
    ) -> None:
        for label, value in (
            ("name", name),
            ("operation", operation),
            ("doctype", doctype),
            ("step", step),
        ):
            if value is not None:
                text(value, f"coworker.run {label}=")
        if (
            attributes is not None
            and not callable(attributes)
            and not isinstance(attributes, Mapping)
        ):
            raise TypeError("coworker.run attributes= must be a dict or a callable")
        if isinstance(attributes, Mapping):
            reserved = sorted(attr.RESERVED_ATTRIBUTES.intersection(attributes))
            if reserved:
                raise ValueError(
                    f"coworker.run attributes= may not set {reserved}: identity, flow, run and "
                    "audit keys come from acting_as(), flow() and coworker itself"
                )
            # Checked here, at decoration: a value no audit record can hold fails at once.
            attributes = {
                text(k, "coworker.run attribute name"): (
                    attribute_text(v, k) if isinstance(v, str) else v
                )
                for k, v in attributes.items()
            }
        self.name = None if name is None else str.__str__(name)
        self.operation = None if operation is None else str.__str__(operation)
        self.doctype = None if doctype is None else str.__str__(doctype)
        self.step = None if step is None else str.__str__(step)
        self.state_changing = state_changing
        self.capture_input = capture_input
        self.capture_output = capture_output
        self.attributes = attributes
        self._spec: Spec | None = None
        self._open: list[Run] = []  # runs entered as a block and not exited yet

    def __call__(self, fn: F) -> F:
        """Decorate ``fn`` with these options."""
        return decorate(fn, self._spec_for)  # type: ignore[no-any-return]

    def _spec_for(self, target: Any, qualname: str) -> Spec:
        return Spec(self, target, qualname)

    def _block_spec(self) -> Spec:
        spec = self._spec
        if spec is None:
            spec = self._spec = Spec(self, None, self.name or "run")
            spec.span_name = self.name or span_name(self.operation, self.doctype, "run")
        return spec

    def __enter__(self) -> Run:
        r = begin(self._block_spec(), force=True)
        assert r is not None
        self._open.append(r)
        return r

    async def __aenter__(self) -> Run:
        return self.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        r = SCOPE.get().run
        if type(r) is Run and self._spec is not None and r.opened_by(self._spec):
            try:
                self._open.remove(r)
            except ValueError:
                pass
            else:
                r.end(exc)
                return
        # Exited out of order (blocks interleaved by hand, or across a generator's yield):
        # the context cannot be restored cleanly, but the run's span must still end, or its
        # audit record would never be written.
        mine = self._open.pop() if self._open else None
        _log.error(
            "coworker.run block %r exited out of order; %s",
            self._spec.span_name if self._spec else self.name,
            "its span is ended, the context left as it is" if mine else "no open run of it",
        )
        if mine is not None:
            mine.end_detached(exc)


@overload
def run(target: F, /) -> F: ...


@overload
def run(
    target: str | None = None,
    /,
    *,
    name: str | None = None,
    operation: str | None = None,
    doctype: str | None = None,
    step: str | None = None,
    state_changing: bool | None = None,
    capture_input: bool = False,
    capture_output: bool = False,
    attributes: Attributes = None,
    usage: Callable[[Any], Any] | None = None,  # usage (issue 16)
) -> RunOptions: ...


def run(
    target: Any = None,
    /,
    *,
    name: str | None = None,
    operation: str | None = None,
    doctype: str | None = None,
    step: str | None = None,
    state_changing: bool | None = None,
    capture_input: bool = False,
    capture_output: bool = False,
    attributes: Attributes = None,
    usage: Callable[[Any], Any] | None = None,  # usage (issue 16)
) -> Any:
    """Turn calls of a function into spans that carry flow, step, run, user and agent.

    Three forms::

        @coworker.run
        def f(): ...

        @coworker.run(operation="update", doctype="Invoice")
        def update_invoice(invoice_id, amount): ...

        with coworker.run("import batch", operation="import", doctype="Invoice") as r:
            ...

    Works on functions, coroutines, generators, async generators, methods, classmethods,
    staticmethods, ``functools.partial`` objects and other callables, and leaves their
    signature, names, docstring, arguments, return values and exceptions untouched.

    Args:
        target: the callable (bare ``@coworker.run``) or the span name (``run("name")``).
        name: span name; default ``"{operation} {doctype}"`` when both are given, else the
            callable's qualified name.
        operation: what the run does (``create``, ``update``, ``select``, ...); decides the
            audit classification together with ``doctype``.
        doctype: the kind of record it acts on (``Invoice``).
        step: the ``step.id`` of this run (shorthand for ``with coworker.step(...)``).
        state_changing: ``True`` forces the run into the audit trail as a state change;
            ``False`` keeps it out even if its operation is state-changing.
        capture_input: record the bound arguments (redacted, size-limited) as
            ``coworker.input``.
        capture_output: record the return value as ``coworker.output``.
        attributes: extra span attributes: a dict, or a callable receiving the call's bound
            arguments by name and returning a dict (keys ``operation`` / ``doctype`` set
            those of the run).
        usage: an extractor of token usage from the return value, recorded in the run
            (:func:`coworker.usage.openai_usage`, ``anthropic_usage``, ``auto_usage``, or
            any callable returning a :class:`coworker.usage.Usage`, a dict or ``None``).

    Returns:
        The wrapped callable (bare form), or a :class:`RunOptions`: a decorator and a
        (sync or async) context manager giving the :class:`Run`.

    Raises:
        coworker.PermissionDenied: at call time, when the configured policy refuses the run.
        coworker.AuditUnavailable: at call time, in fail-closed mode, when the intent record
            of a state-changing run cannot be written (the function does not run).
    """
    if target is not None and not isinstance(target, str):
        options = RunOptions(
            name,
            operation,
            doctype,
            step,
            state_changing,
            capture_input,
            capture_output,
            attributes,
        )
        return options(target)
    if target is not None:
        if name is not None:
            raise TypeError("coworker.run got the span name twice (positional and name=)")
        name = target
    options = RunOptions(
        name, operation, doctype, step, state_changing, capture_input, capture_output, attributes
    )
    if usage is not None:  # usage (issue 16): the run's body records extractor(result)
        from coworker.usage import with_usage

        return with_usage(options, usage)
    return options
