"""The OpenTelemetry current context, read and swapped as cheaply as the API allows.

``opentelemetry.context.attach/detach/get_current`` each go through two Python layers (the
API function, then the runtime context object) before reaching a ``ContextVar``. A decorated
generator swaps that context twice per item, so with the default runtime context
(``ContextVarsRuntimeContext``, what ``OTEL_PYTHON_CONTEXT`` selects unless changed) this
module uses its ``ContextVar`` directly; with any other runtime context it falls back to the
API functions. Both give the same values and tokens.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

__all__ = ["attach", "detach", "get_current", "reset", "with_span"]

_log = logging.getLogger(__name__)


def _runtime_var() -> contextvars.ContextVar[Context] | None:
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is not ContextVarsRuntimeContext:
        return None
    var = getattr(runtime, "_current_context", None)
    return var if isinstance(var, contextvars.ContextVar) else None


_VAR: Final = _runtime_var()

get_current: Callable[[], Context]
"""The current OTel context."""
attach: Callable[[Context], Any]
"""Make a context current; returns the token for :func:`detach`."""
reset: Callable[[Any], None]
"""Like :func:`detach`, but raises ``ValueError`` for a token of another context (for
callers that handle that themselves)."""

if _VAR is not None:
    get_current = _VAR.get
    attach = _VAR.set
    _reset = reset = _VAR.reset

    def detach(token: Any) -> None:
        """Restore the context ``token`` replaced (logged, never raised, like the API)."""
        try:
            _reset(token)
        except Exception:
            _log.exception("Failed to detach context")

else:  # pragma: no cover - a custom OTEL_PYTHON_CONTEXT
    get_current = otel_context.get_current
    attach = otel_context.attach
    detach = otel_context.detach

    def reset(token: Any) -> None:
        """The API's detach (which logs instead of raising)."""
        otel_context.detach(token)


# The key under which the OTel API keeps the current span, read through the public API
# (it is a private, per-process name).
_SPAN_KEY: Final = next(iter(trace.set_span_in_context(trace.INVALID_SPAN, Context())))
_new_context: Final = Context


def with_span(span: trace.Span, parent: Context | None) -> Context:
    """``trace.set_span_in_context(span, parent)``: ``parent`` (or the current context)
    with ``span`` as its span, without the API's three Python layers."""
    values = (get_current() if parent is None else parent).copy()
    values[_SPAN_KEY] = span
    return _new_context(values)
