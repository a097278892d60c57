"""Who may write what: bearer tokens, token files and the identities each token may claim."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from coworker.exceptions import ConfigError

_log = logging.getLogger("coworker.ingest")

# -- who may write what ----------------------------------------------------------------------------
INGEST_TOKEN_FIELD: Final = "ingest_token"
"""Record field naming the bearer token (its ``name``, never the secret) that delivered an
ingested record; ``null`` when the server runs without authentication."""

SHARED_TOKEN_NAME: Final = "shared-token"
"""The token name recorded in single-secret mode (``--token-file`` / ``COWORKER_INGEST_TOKEN``)."""

_ANY: Final = "*"
_MIN_SECRET: Final = 16
_TOKEN_KEYS: Final = frozenset({"name", "secret", "secret_sha256", "services", "users", "agents"})


@dataclass(frozen=True)
class IngestToken:
    """One bearer token and what the records it delivers may claim.

    Attributes:
        name: recorded in every record the token delivers (``ingest_token``); not secret.
        digest: SHA-256 of the secret (the secret itself is not kept).
        services: the ``service.name`` values it may write for; ``None`` means any.
        users: the ``user.id`` values its records may carry; ``None`` means any (a record
            without a user id is always allowed: it claims nobody).
        agents: the same for ``gen_ai.agent.id``.
    """

    name: str
    digest: bytes
    services: frozenset[str] | None
    users: frozenset[str] | None = None
    agents: frozenset[str] | None = None

    @classmethod
    def shared(cls, secret: str) -> IngestToken:
        """The single-secret mode: one token that may write anything."""
        return cls(SHARED_TOKEN_NAME, _secret_digest(secret), None)

    @property
    def trusts_everything(self) -> bool:
        """``True`` when the token is limited to nothing."""
        return self.services is None and self.users is None and self.agents is None

    def refusal(self, fields: Mapping[str, Any]) -> str | None:
        """Why this token may not write a record with these fields, or ``None`` if it may."""
        for label, allowed, value in (
            ("service", self.services, fields.get("service")),
            ("user", self.users, fields.get("user_id")),
            ("agent", self.agents, fields.get("agent_id")),
        ):
            if allowed is None:
                continue
            if label == "service" and value is None:
                return f"token {self.name!r} may not write a span without service.name"
            if value is not None and value not in allowed:
                return f"token {self.name!r} may not write for {label} {_quote(value)}"
        return None


def _quote(value: Any) -> str:
    # repr() escapes control characters: the reason goes back to the client and into logs.
    return repr(str(value)[:80])


def _secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.strip().encode("utf-8")).digest()


def load_tokens(path: str | Path) -> list[IngestToken]:
    """Read a token file (TOML, or JSON when the name ends in ``.json``).

    The file holds ``[[tokens]]`` tables (JSON: ``{"tokens": [...]}``), each with ``name``,
    either ``secret`` (at least 16 characters) or ``secret_sha256`` (64 hex digits), a
    required ``services`` list (``["*"]`` for any service) and optional ``users`` and
    ``agents`` lists. See docs/ingest.md.

    Raises:
        ConfigError: the file cannot be read or is not a valid token file.
    """
    where = f"token file {str(path)!r}"
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        if str(path).lower().endswith(".json"):
            data = json.loads(raw)
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: needs a non-empty list of tokens ([[tokens]] tables)")
    tokens = [_token(entry, f"{where}, token {i + 1}") for i, entry in enumerate(entries)]
    names = [t.name for t in tokens]
    digests = [t.digest for t in tokens]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: token names must be unique")
    if len(set(digests)) != len(digests):
        raise ConfigError(f"{where}: two tokens have the same secret")
    plain = [e.get("name") for e in entries if isinstance(e, dict) and "secret" in e]
    with contextlib.suppress(OSError):
        if plain and Path(path).stat().st_mode & 0o077:
            _log.warning(
                "%s holds plain secrets (%s) and is readable by others than its owner: "
                "chmod 600 it, or use secret_sha256",
                where,
                ", ".join(map(str, plain)),
            )
    return tokens


def _token(entry: Any, where: str) -> IngestToken:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table/object")
    unknown = sorted(set(entry) - _TOKEN_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or not name.isprintable():
        raise ConfigError(f"{where}: name must be a non-empty printable string")
    secret, hashed = entry.get("secret"), entry.get("secret_sha256")
    if (secret is None) == (hashed is None):
        raise ConfigError(f"{where} ({name!r}): give exactly one of secret, secret_sha256")
    if secret is not None:
        if not isinstance(secret, str) or len(secret.strip()) < _MIN_SECRET:
            raise ConfigError(f"{where} ({name!r}): secret must be at least 16 characters")
        digest = _secret_digest(secret)
    else:
        try:
            digest = bytes.fromhex(hashed) if isinstance(hashed, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(f"{where} ({name!r}): secret_sha256 must be 64 hex digits")
    if "services" not in entry:
        raise ConfigError(f'{where} ({name!r}): services is required (["*"] for any)')
    return IngestToken(
        name,
        digest,
        _names(entry["services"], f"{where} ({name!r}) services"),
        _names(entry.get("users"), f"{where} ({name!r}) users"),
        _names(entry.get("agents"), f"{where} ({name!r}) agents"),
    )


def _names(value: Any, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: must be a list of non-empty strings")
    if not value:
        raise ConfigError(f"{where}: an empty list would refuse everything; remove the token")
    if _ANY in value:
        if len(value) != 1:
            raise ConfigError(f'{where}: "*" cannot be combined with names')
        return None
    return frozenset(value)
