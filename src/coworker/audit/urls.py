"""Audit store URLs: ``sqlite:///relative.db``, ``sqlite:////abs.db``, ``memory://``,
``postgresql://...``, and which one applies when none is given."""

from __future__ import annotations

import os
from typing import Final
from urllib.parse import parse_qs, parse_qsl, urlsplit

from coworker import config
from coworker.audit.store import AuditStore, InMemoryStore
from coworker.exceptions import ConfigError

__all__ = ["DEFAULT_AUDIT_URL", "open_store", "resolve_url", "with_chain"]

DEFAULT_AUDIT_URL: Final = "sqlite:///" + config.DEFAULT_AUDIT_PATH.replace(os.sep, "/")
"""``sqlite:///.coworker/audit.db``: the embedded store in the working directory."""

_SQLITE_OPTIONS: Final = ("synchronous", "busy_timeout", "mode", "max_page_count", "chain")


def resolve_url(url: str | None = None) -> str:
    """The explicit ``url``, else ``COWORKER_AUDIT_URL``, else :data:`DEFAULT_AUDIT_URL`."""
    if url:
        return url
    return os.environ.get(config.COWORKER_AUDIT_URL) or DEFAULT_AUDIT_URL


def open_store(
    url: str | None = None, *, readonly: bool = False, create: bool = True
) -> AuditStore:
    """Open the audit store a URL names.

    Args:
        url: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (options:
            ``?synchronous=full|normal``, ``busy_timeout=SECONDS``, ``mode=ro``,
            ``max_page_count=N``, ``chain=NAME``), ``memory://`` (a new in-memory store), or
            ``postgresql://...`` (needs the ``postgres`` extra; ``?chain=NAME`` too). A URL
            without ``chain`` opens the default chain. ``None`` resolves through
            :func:`resolve_url`.
        readonly: open for reading only (the read commands): nothing is created, re-armed
            or written (SQLite ``mode=ro``; PostgreSQL without DDL, spool or writes).
        create: make a new, empty store when there is none at the URL (``False``: that is
            :class:`~coworker.audit.store.StoreNotFound`; read-only opens never create).

    Returns:
        An open store.

    Raises:
        ConfigError: the URL is malformed, or its backend is not installed.
        AuditUnavailable: the store cannot be opened.
        StoreNotFound: ``readonly`` or not ``create``, and there is no store at the URL.
    """
    url = resolve_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f"audit={url!r} is not an audit store URL; use sqlite:///path/audit.db, "
            "postgresql://..., or memory://"
        )
    scheme = scheme.lower()
    if scheme == "memory":
        return InMemoryStore()
    if scheme == "sqlite":
        return _open_sqlite(url, rest, readonly, create)
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        try:
            from coworker.audit.store_postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                f"audit={_redact(url)!r} needs PostgreSQL support: "
                "pip install 'coworker-otel[postgres]'"
            ) from exc
        return PostgresStore(url, readonly=readonly, create=create)
    raise ConfigError(
        f"audit={_redact(url)!r}: unknown scheme {scheme!r} (sqlite, postgresql, memory)"
    )


def _open_sqlite(url: str, rest: str, readonly: bool, create: bool) -> AuditStore:
    from coworker.audit.chain import chain_from_query
    from coworker.audit.store_sqlite import SQLiteStore

    # sqlite:///rel.db -> rest "/rel.db"; sqlite:////abs.db -> rest "//abs.db"
    parts = urlsplit("sqlite://" + rest)
    if parts.netloc:
        raise ConfigError(f"audit={url!r}: a sqlite URL has no host; use sqlite:///path")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path:
        raise ConfigError(f"audit={url!r}: the sqlite URL names no file")
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    try:
        chain = chain_from_query(
            [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "chain"]
        )
    except ValueError as exc:
        raise ConfigError(f"audit={url!r}: {exc}") from None
    unknown = set(options) - set(_SQLITE_OPTIONS)
    if unknown:
        raise ConfigError(f"audit={url!r}: unknown option(s) {sorted(unknown)}")
    try:
        busy = float(options.get("busy_timeout", "10"))
        pages = int(options["max_page_count"]) if "max_page_count" in options else None
    except ValueError as exc:
        raise ConfigError(f"audit={url!r}: {exc}") from None
    mode = options.get("mode", "rw")
    if mode not in ("rw", "ro"):
        raise ConfigError(f"audit={url!r}: mode must be rw or ro")
    return SQLiteStore(
        path,
        synchronous=options.get("synchronous", "FULL"),
        busy_timeout=busy,
        readonly=readonly or mode == "ro",
        create=create,
        max_page_count=pages,
        chain=chain,
    )


def with_chain(url: str, chain: str) -> str:
    """``url`` naming ``chain`` instead of the chain it names (``""``: the default chain).

    Any ``chain=`` query parameter is replaced; everything else is kept as written.
    """
    from urllib.parse import parse_qsl, urlencode

    from coworker.audit.chain import check_chain_name

    try:
        check_chain_name(chain)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if url.startswith("memory://"):
        if chain:
            raise ConfigError("memory:// holds the default chain only")
        return url
    # Split by hand: urlunsplit would turn sqlite:///rel.db into sqlite:/rel.db.
    base, _, rest = url.partition("?")
    query_text, hash_, fragment = rest.partition("#")
    query = [(k, v) for k, v in parse_qsl(query_text, keep_blank_values=True) if k != "chain"]
    if chain:
        query.append(("chain", chain))
    encoded = urlencode(query)
    return base + ("?" + encoded if encoded else "") + hash_ + fragment


def _redact(url: str) -> str:
    # Never echo a database password into an error message or a log.
    parts = urlsplit(url)
    if parts.password:
        return url.replace(":" + parts.password + "@", ":***@", 1)
    return url
