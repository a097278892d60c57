"""``coworker audit status`` and ``coworker audit serve``: the shared-store commands.

``status`` shows the head of a store, when the newest record reached it and, for a
PostgreSQL store, the depth of the local spool and the time since it last shipped a record.
``serve`` runs the OTLP/HTTP ingest endpoint (:mod:`coworker.ingest`).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]

_TOKEN_ENV = "COWORKER_INGEST_TOKEN"


def register(subparsers: Any) -> None:
    """Add ``status`` and ``serve`` to the ``coworker audit`` subcommands."""
    url_help = "audit store URL (default: COWORKER_AUDIT_URL or sqlite:///.coworker/audit.db)"
    status = subparsers.add_parser(
        "status", help="head of the store, spool depth and time since the last shipped record"
    )
    status.add_argument("--url", default=None, help=url_help)
    status.add_argument(
        "--spool", default=None, help="spool file (default: the one the URL's store would use)"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=_cmd_status)

    serve = subparsers.add_parser(
        "serve", help="receive OTLP/HTTP traces and append their audit spans to a store"
    )
    serve.add_argument("--url", default=None, help=url_help)
    serve.add_argument(
        "--listen", default="127.0.0.1:4318", help="HOST:PORT to listen on (default %(default)s)"
    )
    serve.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the one bearer token clients must send (or env {_TOKEN_ENV}); "
        "single-secret mode: whoever holds it may write for every service and identity",
    )
    serve.add_argument(
        "--tokens-file",
        default=None,
        help="TOML/JSON file of named tokens, each limited to its services (and identities); "
        "see docs/ingest.md",
    )
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="accept requests without a token (only behind another authenticating proxy)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="largest request body, compressed or not (default 20 MiB); larger gets 413",
    )
    serve.add_argument(
        "--retry-after", type=int, default=5, help="seconds sent in Retry-After with a 503"
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=None,
        help="seconds a client has to send a whole request, headers and body (default 30); "
        "then the connection is closed",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open connections beyond this get 503 and are closed (default 512)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that decode requests beside the one that appends "
        "(default: one per core on a multi-core machine; 0 decodes in the server process)",
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as plain text (default) or one JSON object per line",
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(func=_cmd_serve)


def _cmd_status(args: argparse.Namespace) -> int:
    from coworker.audit.store import StoreNotFound
    from coworker.audit.urls import open_store, resolve_url
    from coworker.exceptions import AuditUnavailable, ConfigError

    url = resolve_url(args.url)
    out: dict[str, Any] = {"url": _redact(url), "reachable": False, "head": None}
    now = time.time()
    is_pg = url.split("://", 1)[0].lower().startswith(("postgresql", "postgres"))
    spool_path: Path | None = None
    store: Any = None
    try:
        if is_pg:
            from coworker.audit.store_postgres import PostgresStore
            from coworker.audit.store_postgres import spool_path as url_spool_path

            spool_path = Path(args.spool) if args.spool else url_spool_path(url)
            # Read-only (no DDL, no spool): a status check reads the spool, never ships it.
            store = PostgresStore(url, readonly=True)
        else:
            store = open_store(url, readonly=True)
        head = store.head()
        out["reachable"] = True
        if head is not None:
            out["head"] = {"seq": head.seq, "hash": head.hash_hex}
        last = getattr(store, "last_inserted_at", None)
        if last is not None:
            at = last()
            out["last_record_at"] = at
            out["seconds_since_last_record"] = None if at is None else round(now - at, 3)
    except (StoreNotFound, ConfigError) as exc:
        print(f"coworker audit status: {exc}", file=sys.stderr)
        return 2
    except AuditUnavailable as exc:
        out["error"] = str(exc)
    finally:
        if store is not None:
            store.close()
    if spool_path is not None:
        out["spool"] = _spool_status(spool_path, now)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        _print_status(out)
    return 0 if out["reachable"] else 1


def _spool_status(path: Path, now: float) -> dict[str, Any]:
    status: dict[str, Any] = {
        "path": str(path),
        "depth": 0,
        "oldest_spooled_at": None,
        "last_shipped_at": None,
    }
    if path.exists():
        from coworker.audit.spool import Spool

        try:
            s = Spool.read_status(path)
        except sqlite3.Error as exc:  # not (yet) a spool: say so, do not touch it
            status["error"] = f"cannot read the spool: {exc}"
        else:
            status.update(
                depth=s.depth,
                oldest_spooled_at=s.oldest_spooled_at,
                last_shipped_at=s.last_shipped_at,
            )
    for key, age in (
        ("oldest_spooled_at", "seconds_waiting"),
        ("last_shipped_at", "seconds_since_last_shipped"),
    ):
        at = status[key]
        status[age] = None if at is None else round(now - at, 3)
    return status


def _print_status(out: dict[str, Any]) -> None:
    from coworker._text import printable

    # printable(): paths, URLs and server errors reach a terminal with their controls escaped.
    print(f"store:   {printable(out['url'])}")
    if not out["reachable"]:
        print(f"         UNREACHABLE: {printable(out.get('error'))}")
    head = out["head"]
    if out["reachable"]:
        print(
            "head:    "
            + ("empty log" if head is None else f"seq {head['seq']} hash {head['hash']}")
        )
    if out.get("seconds_since_last_record") is not None:
        print(f"newest:  record written {_ago(out['seconds_since_last_record'])} ago")
    spool = out.get("spool")
    if spool is not None:
        line = f"spool:   {spool['depth']} record(s) waiting in {printable(spool['path'])}"
        if spool["seconds_waiting"] is not None:
            line += f", oldest for {_ago(spool['seconds_waiting'])}"
        print(line)
        if spool.get("error"):
            print(f"         {printable(spool['error'])}")
        shipped = spool["seconds_since_last_shipped"]
        print(
            "shipped: "
            + ("never (nothing spooled yet)" if shipped is None else f"{_ago(shipped)} ago")
        )


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def _cmd_serve(args: argparse.Namespace) -> int:
    from coworker.audit.urls import resolve_url
    from coworker.exceptions import ConfigError

    try:
        from coworker import ingest
    except ImportError as exc:
        print(
            f"coworker audit serve needs the server extra: pip install 'coworker-otel[server]' "
            f"({exc})",
            file=sys.stderr,
        )
        return 2
    try:
        host, port = ingest.parse_listen(args.listen)
        chosen = [o for o in ("token_file", "tokens_file", "no_auth") if getattr(args, o)]
        if len(chosen) > 1:
            names = " and ".join("--" + o.replace("_", "-") for o in chosen)
            raise ConfigError(f"{names} exclude each other")
        token = tokens = None
        if args.tokens_file:
            tokens = ingest.load_tokens(args.tokens_file)
        elif not args.no_auth:
            token = _read_token(args.token_file)
        ingest.serve(
            resolve_url(args.url),
            host=host,
            port=port,
            token=token,
            tokens=tokens,
            # `is None`, not `or`: --read-timeout 0 is an error, not the default.
            max_body_bytes=_given(args.max_body_bytes, ingest.DEFAULT_MAX_BODY_BYTES),
            retry_after=args.retry_after,
            read_timeout=_given(args.read_timeout, ingest.DEFAULT_READ_TIMEOUT),
            max_connections=_given(args.max_connections, ingest.DEFAULT_MAX_CONNECTIONS),
            log_format=args.log_format,
            log_level=args.log_level,
            decode_workers=args.workers,
        )
    except ConfigError as exc:
        print(f"coworker audit serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _read_token(path: str | None) -> str:
    from coworker.exceptions import ConfigError

    if path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file={path!r}: {exc}") from None
        source = f"--token-file={path!r}"
    else:
        token = os.environ.get(_TOKEN_ENV, "").strip()
        source = _TOKEN_ENV
    if not token:
        raise ConfigError(
            f"{source}: no bearer token; give --tokens-file (named tokens, each limited to "
            f"its services), --token-file or set {_TOKEN_ENV} "
            "(or --no-auth behind an authenticating proxy)"
        )
    if len(token) < 16:
        raise ConfigError(f"{source}: the token must be at least 16 characters")
    return token


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(":" + parts.password + "@", ":***@", 1)
    return url
