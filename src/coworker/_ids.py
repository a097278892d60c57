"""Ids from coworker's private random generator.

Run ids and (through :class:`coworker._sdk.PrivateRandomIdGenerator`) span and trace ids come
from a private ``random.Random``, never from the application's global ``random`` state: a
program seeded with ``random.seed`` must behave the same with and without coworker. The
generator is reseeded in forked children so that siblings never repeat ids.
"""

from __future__ import annotations

import os
import random
import uuid
from typing import Final

__all__ = ["getrandbits", "seed", "uuid4"]

_RNG: Final = random.Random()
os.register_at_fork(after_in_child=_RNG.seed)

getrandbits: Final = _RNG.getrandbits
"""``getrandbits(k)`` of the private generator."""


def uuid4() -> str:
    """A random (version 4) UUID string from the private generator (flow ids)."""
    return str(uuid.UUID(int=getrandbits(128), version=4))


def seed(value: int | None) -> None:
    """Reseed the private generator: ``coworker.testing`` makes ids repeatable with it."""
    _RNG.seed(value)
