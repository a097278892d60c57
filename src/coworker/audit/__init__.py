"""The audit trail: records, the hash chain, stores, the exporter and verification.

Imported lazily (by ``coworker.configure`` and the CLI), never by ``import coworker``. The
names below are the public entry points, loaded on first use so that importing one submodule
(``coworker.audit.store``, say) does not load the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coworker.audit.correction import correct
    from coworker.audit.fold import FlowState, list_flows, replay
    from coworker.audit.store import AuditStore, Head, InMemoryStore, StoredRecord
    from coworker.audit.urls import DEFAULT_AUDIT_URL, open_store
    from coworker.audit.verify import VerifyReport, verify_chain

__all__ = [
    "DEFAULT_AUDIT_URL",
    "AuditStore",
    "FlowState",
    "Head",
    "InMemoryStore",
    "StoredRecord",
    "VerifyReport",
    "correct",
    "list_flows",
    "open_store",
    "replay",
    "verify_chain",
]

_LAZY = {
    "DEFAULT_AUDIT_URL": "coworker.audit.urls",
    "AuditStore": "coworker.audit.store",
    "Head": "coworker.audit.store",
    "InMemoryStore": "coworker.audit.store",
    "StoredRecord": "coworker.audit.store",
    "VerifyReport": "coworker.audit.verify",
    "correct": "coworker.audit.correction",
    "FlowState": "coworker.audit.fold",
    "list_flows": "coworker.audit.fold",
    "replay": "coworker.audit.fold",
    "open_store": "coworker.audit.urls",
    "verify_chain": "coworker.audit.verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'coworker.audit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
