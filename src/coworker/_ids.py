"""Ids from coworker's private random generator.

Run ids and (through :class:`coworker._sdk.PrivateRandomIdGenerator`) span and trace ids come
from a private ``random.Random``, never from the application's global ``random`` state: a
program seeded with ``random.seed`` must behave the same with and without coworker. The
generator is reseeded in forked children so that siblings never repeat ids.
"""

from __future__ import annotations

import os
import random
from typing import Final

__all__ = ["getrandbits"]

_RNG: Final = random.Random()
os.register_at_fork(after_in_child=_RNG.seed)

getrandbits: Final = _RNG.getrandbits
"""``getrandbits(k)`` of the private generator."""
