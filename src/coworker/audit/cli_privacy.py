"""``coworker audit erase``: crypto-shred one subject's payloads (issue 15, docs/privacy.md).

Exit codes: 0 erased, 1 refused, 2 the store could not be opened or an argument is wrong.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from coworker._text import printable
from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = ["register_privacy"]


def register_privacy(subparsers: Any, url_help: str) -> None:
    """Add ``erase`` to ``coworker audit``.

    Args:
        subparsers: the ``add_subparsers()`` object of the ``coworker audit`` parser.
        url_help: the shared ``--url`` help text.
    """
    erase = subparsers.add_parser(
        "erase",
        help="destroy a subject's payloads and data key; append an erasure record",
    )
    erase.add_argument("--subject", required=True, help="the subject (a user id by default)")
    erase.add_argument("--reason", required=True, help="why (kept in the erasure record)")
    erase.add_argument("--by", default=None, help="who erases (kept in the erasure record)")
    erase.add_argument("--url", default=None, help=url_help)
    erase.set_defaults(func=_cmd_erase)


def _cmd_erase(args: argparse.Namespace) -> int:
    from coworker.audit.cli import open_existing_store
    from coworker.audit.urls import resolve_url

    if not args.subject.strip() or not args.reason.strip():
        print("coworker audit: --subject and --reason must not be empty", file=sys.stderr)
        return 2
    try:
        store = open_existing_store(resolve_url(args.url))
    except (AuditUnavailable, ConfigError) as exc:
        print(f"coworker audit: {printable(str(exc))}", file=sys.stderr)
        return 2
    try:
        erase = getattr(store, "erase", None)
        if erase is None:
            print(
                f"coworker audit: this store ({type(store).__name__}) cannot erase payloads",
                file=sys.stderr,
            )
            return 2
        result = erase(args.subject, args.reason, by=args.by)
    except AuditUnavailable as exc:
        print(f"coworker audit: {printable(str(exc))}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(
        f"erased  {len(result.seqs)} payload(s) of {printable(args.subject)}; "
        f"erasure record seq {result.record.seq}"
    )
    if not result.wal_truncated:
        print(
            "warning  another process holds the log open: old pages stay in the -wal file "
            "until its next checkpoint",
            file=sys.stderr,
        )
    return 0
