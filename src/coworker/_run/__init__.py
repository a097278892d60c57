"""The run machinery behind :func:`coworker.run` (private).

* :mod:`~coworker._run.spec`: what a decorated callable needs per call, computed once;
* :mod:`~coworker._run.lifecycle`: the one begin/end every wrapper kind uses, and :class:`Run`;
* :mod:`~coworker._run.wrappers`: a few lines per callable kind;
* :mod:`~coworker._run.generators`: real generators driving decorated generators;
* :mod:`~coworker._run.pickling`: pickling wrappers by reference;
* :mod:`~coworker._run.options`: ``run()`` and :class:`RunOptions`;
* :mod:`~coworker._run.otelctx`: the OTel current context at ContextVar cost.
"""

from __future__ import annotations

from coworker._run.generators import finish_abandoned
from coworker._run.lifecycle import Run, current_run
from coworker._run.options import RunOptions, run

__all__ = ["Run", "RunOptions", "current_run", "finish_abandoned", "run"]
