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
from coworker._scope import SCOPE, Block, Scope

__all__ = ["Agent", "Identity", "IdentityBlock", "User", "acting_as", "current_identity", "text"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


MAX_ID_CHARS = 512
"""Longest identity, flow, step, operation or doctype string: an id beyond it is a bug (or an
attack), and PostgreSQL cannot index it (its btree row limit is 2704 bytes)."""


def text(value: Any, what: str, max_chars: int | None = MAX_ID_CHARS) -> str:
    """``value`` as an exact, non-empty ``str`` that every audit store can hold.

    Everything that ends up in an audit record (identities, flow and step ids, operation,
    doctype, span names, attributes) passes here at the boundary where the application hands
    it over, so a bad value fails there with a clear error instead of in the store later.

    * A ``str`` subclass becomes a plain ``str``: a subclass can override ``__eq__`` and
      ``__hash__`` and so satisfy any policy comparison.
    * A lone surrogate (``"\\ud800"``, from a badly decoded byte string) is refused: it is not
      UTF-8, so no record could store it.

    * Longer than ``max_chars`` (:data:`MAX_ID_CHARS` by default) is refused.

    Args:
        value: the value given by the application.
        what: how the error message names it (``"user id"``).
        max_chars: the longest accepted value, ``None`` for no limit.

    Raises:
        ValueError: not a non-empty string, too long, or not encodable as UTF-8.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(
            f"{what} is {len(value)} characters long (at most {max_chars}): {value[:40]!r}..."
        )
    exact: str = str.__str__(value)  # an exact str copy of a subclass (itself if exact)
    if not exact.isascii():
        try:
            exact.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{what} {exact!r} cannot be encoded as UTF-8 (lone surrogate at index "
                f"{exc.start}): no audit record could hold it; decode the source bytes "
                "correctly (or with errors='replace') first"
            ) from None
    return exact


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
        object.__setattr__(self, "id", text(self.id, "User id"))
        roles = (self.roles,) if isinstance(self.roles, str) else self.roles
        object.__setattr__(self, "roles", tuple(text(r, "User role") for r in roles))


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
        object.__setattr__(self, "id", text(self.id, "Agent id"))
        if self.name is not None:
            object.__setattr__(self, "name", text(self.name, "Agent name"))


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
        if self.user is not None and not isinstance(self.user, User):
            raise TypeError(f"user must be a User or None, got {type(self.user).__name__}")
        if self.agent is not None and not isinstance(self.agent, Agent):
            raise TypeError(f"agent must be an Agent or None, got {type(self.agent).__name__}")
        if self.session is not None:
            object.__setattr__(self, "session", text(self.session, "session"))
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


class IdentityBlock(Block):
    """What :func:`acting_as` returns: a (sync or async) context manager whose ``as`` target
    is the :class:`~coworker.Identity`.

    Attributes:
        identity: the identity the block sets.
    """

    __slots__ = ("identity",)

    def __init__(self, identity: Identity) -> None:
        super().__init__()
        self.identity = identity

    def scope(self, current: Scope) -> Scope:
        """The current scope with this identity."""
        return Scope(current.cell, current.step, current.run, self.identity, current.turn, [None])

    def value(self) -> Identity:
        """The :class:`~coworker.Identity`."""
        return self.identity

    def __enter__(self) -> Identity:
        return super().__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> Identity:
        return self.__enter__()


def current_identity() -> Identity | None:
    """The identity set by the innermost :func:`acting_as`, or ``None``."""
    return SCOPE.get().identity


def acting_as(
    user: User | str | None,
    agent: Agent | str | None = None,
    *,
    agent_name: str | None = None,
    session: str | None = None,
    cost_center: str | None = None,  # usage (issue 16)
) -> IdentityBlock:
    """Run the block on behalf of ``user``, optionally through an AI ``agent``.

    Every run inside carries ``user.id``, ``gen_ai.agent.id``, ``gen_ai.agent.name`` and
    ``session.id``. A change of ``session`` within a flow breaks the flow (``new-session``).

    Returns:
        An :class:`IdentityBlock`, whose ``as`` target is the :class:`~coworker.Identity`.

    Args:
        user: a :class:`User` or a user id (``None`` for an anonymous block).
        agent: an :class:`Agent` or an agent id.
        agent_name: the agent's name when ``agent`` is given as an id.
        session: the session id.
        cost_center: who pays for the user's model usage (``docs/usage.md``); kept in
            ``User.attributes["cost_center"]``.
    """
    if isinstance(user, str):
        user = User(user)
    elif user is not None and not isinstance(user, User):
        raise TypeError(f"user must be a User, a user id or None, got {type(user).__name__}")
    if isinstance(agent, str):
        agent = Agent(agent, agent_name)
    elif agent is not None and not isinstance(agent, Agent):
        raise TypeError(f"agent must be an Agent, an agent id or None, got {type(agent).__name__}")
    elif agent is not None and agent_name is not None and agent.name is None:
        agent = Agent(agent.id, agent_name)
    if cost_center is not None:  # usage (issue 16)
        from coworker.usage_policy import with_cost_center

        user = with_cost_center(user, cost_center)
    return IdentityBlock(Identity(user, agent, session))
