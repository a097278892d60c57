"""``coworker audit erase | hold | release`` (issue 15, docs/privacy.md).

``erase`` crypto-shreds one subject's payloads; ``hold`` puts a subject or a flow under legal
hold (erase is then refused), ``release`` lifts it. Holds, releases and erasures are records.

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

    for name, helptext in (
        ("hold", "put a subject or a flow under legal hold (erase is refused meanwhile)"),
        ("release", "release the legal holds on a subject or a flow"),
    ):
        cmd = subparsers.add_parser(name, help=helptext)
        target = cmd.add_mutually_exclusive_group(required=True)
        target.add_argument("--subject", default=None, help="a subject (user id by default)")
        target.add_argument("--flow-id", default=None, help="a flow id")
        cmd.add_argument("--reason", required=True, help="why (kept in the record)")
        cmd.add_argument("--by", default=None, help="who (kept in the record)")
        cmd.add_argument("--url", default=None, help=url_help)
        cmd.set_defaults(func=_cmd_hold if name == "hold" else _cmd_release)

    purge = subparsers.add_parser(
        "purge", help="delete payloads recorded before DATE that are past their retention floor"
    )
    purge.add_argument("--before", required=True, help="ISO 8601 date/time, or a duration ago")
    purge.add_argument(
        "--policy",
        default=None,
        metavar="CATEGORY=DURATION,...",
        help="retention floors (default: state-change=7y,authorization-failure=6y,default=6mo)",
    )
    purge.add_argument("--by", default=None, help="who purges (kept in the purge record)")
    purge.add_argument("--url", default=None, help=url_help)
    purge.set_defaults(func=_cmd_purge)


def _cmd_purge(args: argparse.Namespace) -> int:
    from coworker.audit.query import parse_time
    from coworker.audit.retention import PurgeRefused, purge

    try:
        before = parse_time(args.before)
        floors = _floors(args.policy)  # a bad policy is refused before the store is opened
        store = _open(args.url)
        try:
            result = purge(store, before, floors, by=args.by)
        finally:
            store.close()
    except PurgeRefused as exc:
        return _err(str(exc), 1)
    except (AuditUnavailable, ConfigError) as exc:
        return _err(str(exc), 2)
    if result.record is None:
        print(f"purged  nothing ({len(result.held)} payload(s) kept under legal hold)")
        return 0
    print(
        f"purged  {len(result.seqs)} payload(s) before {before}; purge record seq "
        f"{result.record.seq}; {len(result.held)} kept under legal hold"
    )
    return 0


def _floors(spec: str | None) -> Any:
    from coworker.audit.retention import parse_floors

    return parse_floors(spec)


def _open(url: str | None) -> Any:
    from coworker.audit.cli import open_existing_store
    from coworker.audit.urls import resolve_url

    return open_existing_store(resolve_url(url))


def _err(message: str, code: int) -> int:
    print(f"coworker audit: {printable(message)}", file=sys.stderr)
    return code


def _cmd_hold(args: argparse.Namespace) -> int:
    from coworker.audit.erasure import append_now, hold_entry

    if not args.reason.strip():
        return _err("--reason must not be empty", 2)
    entry = hold_entry(subject=args.subject, flow_id=args.flow_id, reason=args.reason, by=args.by)
    try:
        store = _open(args.url)
        try:
            record = append_now(store, entry)
        finally:
            store.close()
    except (AuditUnavailable, ConfigError, ValueError) as exc:
        return _err(str(exc), 2)
    what = f"subject {args.subject}" if args.subject else f"flow {args.flow_id}"
    print(f"hold  seq {record.seq} on {printable(what)}")
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from coworker.audit.erasure import append_now, release_entry, store_holds

    try:
        store = _open(args.url)
        try:
            holds = [
                seq
                for seq, hold in store_holds(store).items()
                if (args.subject is not None and hold.get("hold_subject") == args.subject)
                or (args.flow_id is not None and hold.get("hold_flow_id") == args.flow_id)
            ]
            if not holds:
                return _err("no active legal hold on that subject or flow", 1)
            record = append_now(store, release_entry(holds, reason=args.reason, by=args.by))
        finally:
            store.close()
    except (AuditUnavailable, ConfigError) as exc:
        return _err(str(exc), 2)
    print(f"released  hold(s) {', '.join(map(str, sorted(holds)))}; record seq {record.seq}")
    return 0


def _cmd_erase(args: argparse.Namespace) -> int:
    from coworker.audit.cli import open_existing_store
    from coworker.audit.erasure import ErasureRefused
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
    except ErasureRefused as exc:
        print(f"coworker audit: {printable(str(exc))}", file=sys.stderr)
        return 1
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
