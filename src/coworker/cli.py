"""The ``coworker`` command: ``coworker demo`` and ``coworker audit ...``.

One function per subcommand; subcommand groups that live with their feature register
themselves through a ``register(subparsers)`` function (see ``_AUDIT_COMMAND_MODULES``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# Modules that add ``coworker audit <name>`` subcommands via ``register(subparsers)``.
_AUDIT_COMMAND_MODULES = (
    "coworker.audit.cli",
    "coworker.audit.cli_shared",
    "coworker.audit.cli_proofs",
    "coworker.audit.cli_chains",
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coworker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the built-in sample app and print its trace tree")
    demo.add_argument(
        "--audit-url",
        default=None,
        help="audit store URL (default: COWORKER_AUDIT_URL or sqlite:///.coworker/audit.db)",
    )
    demo.add_argument("--no-audit", action="store_true", help="do not write an audit trail")
    demo.set_defaults(func=_cmd_demo)

    from coworker.audit.usage import register as register_usage  # usage (issue 16)

    register_usage(sub)
    audit = sub.add_parser("audit", help="verify, query and inspect the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    for name in _AUDIT_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(audit_sub)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from coworker import _demo

    return _demo.main(audit_url=args.audit_url, audit=not args.no_audit)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `coworker audit query --json | head`: the reader left; that is not an error. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
