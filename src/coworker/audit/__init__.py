"""The audit trail: records, the hash chain, stores, the exporter and verification.

Imported lazily (by ``coworker.configure`` and the CLI), never by ``import coworker``.
The names here are the public entry points; the submodules hold the details.
"""

from __future__ import annotations

from coworker.audit.correction import correct
from coworker.audit.store import AuditStore, Head, InMemoryStore, StoredRecord
from coworker.audit.urls import DEFAULT_AUDIT_URL, open_store
from coworker.audit.verify import VerifyReport, verify_chain

__all__ = [
    "DEFAULT_AUDIT_URL",
    "AuditStore",
    "Head",
    "InMemoryStore",
    "StoredRecord",
    "VerifyReport",
    "correct",
    "open_store",
    "verify_chain",
]
