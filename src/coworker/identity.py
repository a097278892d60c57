"""Who acts: :class:`User`, :class:`Agent`, and how they map to span attributes.

The identity is set by the application's own trusted code with :func:`coworker.acting_as`; it is
never read from span attributes, function arguments or (unless configured) W3C baggage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from coworker import attributes as attr

__all__ = ["Agent", "Identity", "User"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class User:
    """The human on whose behalf a run happens.

    Attributes:
        id: stable user id (emitted as ``user.id``).
        roles: roles given by the application's identity source, added to the roles the
            policy assigns to ``id``.
        attributes: facts about the user that policy conditions may test (e.g.
            ``{"departments": ["sales"]}``). Never emitted on spans.
    """

    id: str
    roles: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"User id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.roles, tuple):
            object.__setattr__(self, "roles", tuple(self.roles))


@dataclass(frozen=True, slots=True)
class Agent:
    """An AI agent acting for a user; it never has more permissions than that user.

    Attributes:
        id: stable agent id (``gen_ai.agent.id``).
        name: human-readable name (``gen_ai.agent.name``).
    """

    id: str
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Agent id must be a non-empty string, got {self.id!r}")


@dataclass(frozen=True, slots=True)
class Identity:
    """The user, the agent acting for them, and the session: what :func:`acting_as` sets.

    ``span_attributes`` is computed once so that each run only merges a ready dict.
    """

    user: User | None
    agent: Agent | None = None
    session: str | None = None
    span_attributes: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        attrs: dict[str, str] = {}
        if self.user is not None:
            attrs[attr.USER_ID] = self.user.id
        if self.agent is not None:
            attrs[attr.AGENT_ID] = self.agent.id
            if self.agent.name:
                attrs[attr.AGENT_NAME] = self.agent.name
        if self.session is not None:
            attrs[attr.SESSION_ID] = self.session
        object.__setattr__(self, "span_attributes", MappingProxyType(attrs))

    @property
    def user_id(self) -> str | None:
        """The user id or ``None``."""
        return self.user.id if self.user is not None else None

    @property
    def agent_id(self) -> str | None:
        """The agent id or ``None``."""
        return self.agent.id if self.agent is not None else None
