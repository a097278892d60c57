"""Audit record fields and their canonical bytes (RFC 8785).

(Placeholder encoder: the audit issue replaces this module with the full record schema.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import rfc8785


def canonical(fields: Mapping[str, Any]) -> bytes:
    """RFC 8785 canonical JSON of ``fields``."""
    return rfc8785.dumps(dict(fields))
