"""``coworker audit adopt-chains`` and the chain registry part of ``coworker audit verify``.

The registry (:mod:`coworker.audit.chain_registry`) anchors every named chain in the default
chain; verify checks each registered chain is still there and names chains the registry does
not know; ``adopt-chains`` registers the named chains of a store made before the registry.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from coworker._text import printable
from coworker.exceptions import AuditUnavailable, ConfigError

if TYPE_CHECKING:
    from coworker.audit.chain_registry import Registration

__all__ = ["register", "vanished_chain", "verify_registry"]


def register(subparsers: Any) -> None:
    """Add ``adopt-chains`` to ``coworker audit``.

    Args:
        subparsers: the ``add_subparsers()`` object of the ``coworker audit`` parser.
    """
    adopt = subparsers.add_parser(
        "adopt-chains",
        help="register the store's named chains that the chain registry does not name yet "
        "(stores made before it)",
    )
    adopt.add_argument(
        "--url",
        default=None,
        help="audit store URL (default: COWORKER_AUDIT_URL or sqlite:///.coworker/audit.db)",
    )
    adopt.set_defaults(func=_cmd_adopt)

    retire = subparsers.add_parser(
        "retire-chain",
        help="retire a named chain on purpose: seal it (a last record in the chain; nothing is "
        "appended after it) and record the sealed head in the registry; once its file or "
        "schema is removed, verify says retired. Run it again to complete an interrupted one",
    )
    retire.add_argument("name", help="the chain")
    retire.add_argument("--reason", required=True, help="why (kept in the record)")
    retire.add_argument(
        "--url",
        default=None,
        help="audit store URL (default: COWORKER_AUDIT_URL or sqlite:///.coworker/audit.db)",
    )
    retire.set_defaults(func=_cmd_retire)


def _cmd_retire(args: argparse.Namespace) -> int:
    import sys

    from coworker.audit.chain_seal import retire
    from coworker.audit.urls import open_store, resolve_url, with_chain

    try:
        store = open_store(with_chain(resolve_url(args.url), args.name), readonly=True)
        try:
            _, head = retire(store, args.reason)
        finally:
            store.close()
    except (AuditUnavailable, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"retired  chain {printable(args.name)}: sealed at seq {head.seq if head else 0}; its "
        "file or schema may now be removed"
    )
    return 0


def _cmd_adopt(args: argparse.Namespace) -> int:
    import sys

    from coworker.audit.chain_registry import adopt, registrations
    from coworker.audit.urls import open_store, resolve_url, with_chain

    try:
        url = resolve_url(args.url)
        reader = open_store(url, readonly=True, create=False)
        try:
            present = list(getattr(reader, "chains", lambda: [""])())
            known = registrations(reader) if "" in present else {}
        finally:
            reader.close()
        todo = [n for n in present if n and n not in known]
        for name in todo:
            # create=False: a chain that vanished since the listing is an error, never made
            # again (and registered) empty.
            store = open_store(with_chain(url, name), create=False)
            try:
                adopt(store)
                head = store.head()
            finally:
                store.close()
            print(f"adopted  chain {printable(name)} (head {head.seq if head else 0})")
    except (AuditUnavailable, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not todo:
        print("OK  every named chain is registered")
    return 0


def verify_registry(
    url: str, known: Mapping[str, Registration], present: list[str], js: bool
) -> int:
    """Print what the chain registry (``known``: :func:`registrations` of the default chain)
    says about the chains ``present``; return 1 when a chain vanished or is not anchored.

    Prints nothing for a store with no named chain and no registration.
    """
    from coworker.audit.chain_check import check_registry
    from coworker.audit.store import Head
    from coworker.audit.urls import open_store, with_chain

    if not known and not any(present):
        return 0

    def head_at(chain: str, seq: int) -> Head | None:
        with _closing(open_store(with_chain(url, chain), readonly=True, create=False)) as s:
            for record in s.iter_from(seq):
                return Head(record.seq, record.hash)
        return None

    def count(chain: str) -> int:
        with _closing(open_store(with_chain(url, chain), readonly=True, create=False)) as s:
            return int(s.count())

    def sealed(chain: str) -> Head | None:
        from coworker.audit.chain_seal import sealed_head

        with _closing(open_store(with_chain(url, chain), readonly=True, create=False)) as s:
            return sealed_head(s)

    checks = check_registry(known, present, head_at, count, sealed)
    code = 0 if all(c.ok for c in checks) else 1
    if js:
        print(json.dumps({"registry": [c.to_dict() for c in checks]}))
        return code
    for check in checks:
        if check.status == "registered":
            continue
        mark = "OK  " if check.ok else "FAIL"
        print(f"{mark}  chain {printable(check.name)}: {check.status}")
        print(f"      {printable(check.detail)}")
    registered = sum(c.status == "registered" for c in checks)
    if code == 0:
        print(f"OK  chain registry: {registered} named chain(s) registered, all present")
    return code


def vanished_chain(url: str, chain: str, js: bool) -> int | None:
    """For ``verify --chain NAME``: print ``vanished`` and return 1 when the registry names
    ``chain`` but the store has no such chain; ``None`` otherwise (verify it as usual)."""
    from coworker.audit.chain_check import check_registry
    from coworker.audit.chain_registry import registrations
    from coworker.audit.urls import open_store

    if not chain:
        return None
    try:
        store = open_store(url, readonly=True, create=False)
    except AuditUnavailable:
        return None  # no default chain: no registry (the chain's own open says what is wrong)
    with _closing(store):
        present = list(getattr(store, "chains", lambda: [""])())
        known = registrations(store) if "" in present else {}
    if chain not in known or chain in present:
        return None
    (check,) = check_registry({chain: known[chain]}, [], lambda c, s: None, lambda c: 0)
    if js:
        print(json.dumps({"registry": [check.to_dict()]}))
    else:
        print(f"FAIL  chain {printable(chain)}: {check.status}")
        print(f"      {printable(check.detail)}")
    return 1


class _closing:
    """``contextlib.closing`` for any store (typed loosely: stores share no base class)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __enter__(self) -> Any:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()
