"""The ``coworker audit verify | query | tree | correct | flow | flows`` subcommands.

Plain text with aligned columns on stdout; progress and errors on stderr. ``rich`` draws the
verify progress bar when it is installed and stderr is a terminal; otherwise a plain counter.
Exit codes: 0 success (log intact), 1 the log is not intact / nothing found, 2 the store
could not be opened or an argument is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TextIO

from coworker._text import json_text, printable
from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = ["register"]

_PROGRESS_MIN: Final = 50_000
"""Logs at least this long get a progress bar by default."""

_COLUMNS: Final = (
    ("SEQ", lambda e: str(e.seq)),
    ("TIME", lambda e: _short_time(e.fields.get("start") or e.fields.get("recorded_at"))),
    ("CATEGORY", lambda e: e.fields.get("category")),
    ("OPERATION", lambda e: e.fields.get("operation")),
    ("DOCTYPE", lambda e: e.fields.get("doctype")),
    ("OUTCOME", lambda e: e.status),
    ("USER", lambda e: e.fields.get("user_id")),
    ("AGENT", lambda e: e.fields.get("agent_id")),
    ("FLOW", lambda e: e.fields.get("flow_id")),
    ("STEP", lambda e: e.fields.get("step_id")),
    ("RUN", lambda e: e.fields.get("run_id")),
)


def register(subparsers: Any) -> None:
    """Add ``verify``, ``query``, ``tree`` and ``correct`` to ``coworker audit``.

    Args:
        subparsers: the ``add_subparsers()`` object of the ``coworker audit`` parser.
    """
    url_help = "audit store URL (default: COWORKER_AUDIT_URL or sqlite:///.coworker/audit.db)"

    verify = subparsers.add_parser(
        "verify", help="re-hash the audit log; name the first bad record"
    )
    verify.add_argument("--url", default=None, help=url_help)
    verify.add_argument(
        "--expected-head",
        metavar="SEQ:HASH",
        default=None,
        help="a head printed by an earlier verify: detects a cut-off or rewritten tail",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument(
        "--chain",
        default=None,
        metavar="NAME",
        help="verify this chain only (default: every chain of the store, each named in its "
        "findings)",
    )
    verify.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="FILE",
        help="a signed checkpoint kept outside the database (repeatable): the log must still "
        "contain its tree, else it is named rewritten, truncated or forked (needs --key)",
    )
    verify.add_argument(
        "--heads",
        default=None,
        metavar="FILE",
        help="a signed heads note kept outside the database: every chain it lists must still "
        "exist and contain its tree, else it is named vanished, rewritten or truncated "
        "(needs --key; not with --chain)",
    )
    verify.add_argument(
        "--key",
        default=None,
        metavar="PUBKEY",
        help="the log's verifier key for --checkpoint and --heads",
    )
    verify.add_argument(
        "--policy",
        default=None,
        metavar="FILE",
        help="a C2SP tlog-policy each --checkpoint must meet",
    )
    verify.add_argument(
        "--deep",
        action="store_true",
        help="also check the storage beneath the rows (SQLite: PRAGMA integrity_check, which "
        "finds an index edited to hide a record from queries; several times slower)",
    )
    progress = verify.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show progress on stderr",
    )
    progress.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never show progress"
    )
    verify.set_defaults(func=_cmd_verify)

    query = subparsers.add_parser("query", help="list audit records matching filters")
    query.add_argument("--url", default=None, help=url_help)
    query.add_argument("--flow-id", default=None)
    query.add_argument("--user", default=None, help="user.id")
    query.add_argument("--agent", default=None, help="gen_ai.agent.id")
    query.add_argument("--doctype", default=None)
    query.add_argument(
        "--operation", default=None, help="coworker.operation (any case: UPDATE is update)"
    )
    query.add_argument(
        "--category",
        default=None,
        help="state-change, authorization-failure, validation-violation, sensitive-read, "
        "policy-violation or ingest-conflict (anything else is an error)",
    )
    query.add_argument("--since", default=None, help="ISO 8601 time or a duration ago (2h, 7d)")
    query.add_argument("--until", default=None, help="ISO 8601 time or a duration ago")
    query.add_argument("--limit", type=int, default=None)
    query.add_argument("--json", action="store_true", help="one JSON object per line")
    query.set_defaults(func=_cmd_query)

    tree = subparsers.add_parser("tree", help="the execution tree of a flow, failures marked")
    tree.add_argument(
        "flow_id", metavar="FLOW_ID", help="a flow id, or a unique prefix of one (as printed)"
    )
    tree.add_argument("--url", default=None, help=url_help)
    tree.add_argument("--json", action="store_true", help="print the tree as one JSON object")
    tree.set_defaults(func=_cmd_tree)

    correct = subparsers.add_parser(
        "correct", help="append a correction of a record (the original stays)"
    )
    correct.add_argument("seq", type=int)
    correct.add_argument("--reason", required=True)
    correct.add_argument(
        "--by",
        default=None,
        help="user id making the correction (kept as corrected_by; the record keeps its user)",
    )
    correct.add_argument(
        "--set",
        dest="changes",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="corrected field value (repeatable)",
    )
    correct.add_argument("--url", default=None, help=url_help)
    correct.set_defaults(func=_cmd_correct)

    _register_flow_commands(subparsers, url_help)  # flows folded from the log (issue 14)
    from coworker.audit.cli_privacy import register_privacy

    register_privacy(subparsers, url_help)  # erase / hold / release (issue 15)


@contextmanager
def _store(url: str | None, *, readonly: bool) -> Iterator[Any]:
    from coworker.audit.urls import open_store, resolve_url

    # Read commands open read-only: a mistyped path is an error, never a new empty store.
    # `correct` writes, but only into a store that exists.
    store = open_store(resolve_url(url), readonly=readonly, create=False)
    try:
        yield store
    finally:
        store.close()


def open_existing_store(url: str | None) -> Any:
    """Open a store read-write for a command that adds to an existing log (``correct``,
    ``checkpoint``) or keeps its tree beside it (``prove``, ``export``).

    Nothing is created: a mistyped path must be an error (exit 2), not a new directory with
    an empty log (whose checkpoint of 0 records would then be signed).

    Raises:
        StoreNotFound: no store at that URL.
        AuditUnavailable: it cannot be opened.
        ConfigError: a malformed URL.
    """
    from coworker.audit.urls import open_store

    return open_store(url, create=False)


def _fail(message: str, code: int = 2) -> int:
    # Messages can quote stored values (verify details, flow ids): escaped like all output.
    print(f"coworker audit: {printable(message)}", file=sys.stderr)
    return code


def _parse_head(text: str) -> Any:
    from coworker.audit.store import Head

    seq, sep, digest = text.partition(":")
    try:
        if not sep:
            raise ValueError
        raw = bytes.fromhex(digest)
        if len(raw) != 32:
            raise ValueError
        return Head(int(seq), raw)
    except ValueError:
        raise ConfigError(f"--expected-head={text!r}: use SEQ:HASH (64 hex digits)") from None


def _progress(
    total: int, enabled: bool | None
) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    show = enabled if enabled is not None else (total >= _PROGRESS_MIN and sys.stderr.isatty())
    if not show or total == 0:
        return None, lambda: None
    if sys.stderr.isatty():
        try:
            from rich.progress import Progress
        except ImportError:
            pass
        else:
            from rich.console import Console

            bar = Progress(console=Console(file=sys.stderr), transient=True)
            task = bar.add_task("verifying", total=total)
            bar.start()
            return (lambda done: bar.update(task, completed=done)), bar.stop
    started = time.monotonic()

    def plain(done: int) -> None:
        rate = done / max(time.monotonic() - started, 1e-9)
        sys.stderr.write(f"\rverified {done}/{total} records ({rate:,.0f}/s)")
        sys.stderr.flush()

    def finish() -> None:
        sys.stderr.write("\n")

    return plain, finish


def _cmd_verify(args: argparse.Namespace) -> int:
    """Verify every chain of the store (or ``--chain``) and the chain registry; the worst
    exit code wins."""
    from coworker.audit.chain_registry import registrations
    from coworker.audit.cli_chains import vanished_chain, verify_registry
    from coworker.audit.urls import resolve_url, with_chain

    try:
        url = resolve_url(args.url)
        heads = _load_heads(args)
        if args.chain is not None:
            gone = vanished_chain(url, args.chain, args.json)
            if gone is not None:
                return gone
            return _verify_one(args, with_chain(url, args.chain), args.chain, False)
        with _store(url, readonly=True) as store:
            chains = store.chains() if hasattr(store, "chains") else [""]
            # Every named chain is registered in the default chain (chain_registry): one
            # deleted whole is still named there.
            known = registrations(store) if "" in chains else {}
    except (AuditUnavailable, ConfigError) as exc:
        return _fail(str(exc))
    named = [c for c in chains if c]
    # The default chain first, exactly as a store without named chains prints it; --expected-
    # head and --checkpoint are the default chain's (pass --chain for another's).
    code = _verify_one(args, url, "", bool(named)) if "" in chains or not named else 0
    for chain in named:
        one = argparse.Namespace(**{**vars(args), "expected_head": None, "checkpoint": []})
        code = max(code, _verify_one(one, with_chain(url, chain), chain, True))
    try:
        code = max(code, verify_registry(url, known, chains, args.json))
    except (AuditUnavailable, ConfigError) as exc:
        return _fail(str(exc))
    if heads is not None:
        try:
            code = max(code, _check_heads(url, chains, heads, args.json))
        except (AuditUnavailable, ConfigError) as exc:
            return _fail(str(exc))
    return code


def _load_heads(args: argparse.Namespace) -> dict[str, tuple[int, bytes]] | None:
    """The chains and trees of ``--heads FILE``, its signature checked with ``--key``."""
    from coworker.audit.checkpoint import CheckpointError, open_heads
    from coworker.audit.keys import KeyFormatError, load_verifier

    if args.heads is None:
        return None
    if not args.key:
        raise ConfigError("--heads needs --key PUBKEY (the log's verifier key)")
    if args.chain is not None:
        raise ConfigError("--heads covers every chain of the store; drop --chain")
    try:
        return open_heads(Path(args.heads).read_bytes(), load_verifier(args.key))
    except (CheckpointError, KeyFormatError, OSError) as exc:
        raise ConfigError(f"heads note {args.heads}: {exc}") from None


def _check_heads(url: str, chains: list[str], heads: dict[str, tuple[int, bytes]], js: bool) -> int:
    """Every chain a signed heads note lists must still be in the store, holding its tree.

    A chain deleted whole (its file or schema gone) leaves nothing for the per-chain checks
    to find: only a statement made before, outside the store, names it.
    """
    from coworker.audit.checkpoint import Checkpoint
    from coworker.audit.logcheck import check_log
    from coworker.audit.tlog import _chain_rows
    from coworker.audit.urls import with_chain

    code = 0
    results: list[dict[str, Any]] = []
    for chain in sorted(heads, key=lambda c: (c != "", c)):
        size, root = heads[chain]
        label = printable(chain) if chain else "(default)"
        if chain not in chains:
            status, detail = "vanished", "the store has no such chain (its file or schema is gone)"
        else:
            with _store(with_chain(url, chain), readonly=True) as store:
                report = check_log(_chain_rows(store, 1), [("heads", Checkpoint("", size, root))])
            (finding,) = report.findings
            status, detail = finding.status, finding.detail
        if status != "ok":
            code = 1
        results.append({"chain": chain, "size": size, "status": status, "detail": detail})
        if not js:
            mark = "OK  " if status == "ok" else "FAIL"
            print(f"{mark}  heads note: chain {label} (tree {size}): {status}")
            if status != "ok":
                print(f"      {printable(detail)}")
    if js:
        print(json.dumps({"heads": results}))
    return code


def _verify_one(args: argparse.Namespace, url: str, chain: str, label: bool) -> int:
    from coworker.audit.verify import verify_chain

    if label and not args.json:
        print(f"chain  {printable(chain) if chain else '(default)'}")
    try:
        expected = _parse_head(args.expected_head) if args.expected_head else None
        if args.checkpoint and not args.key:
            raise ConfigError("--checkpoint needs --key PUBKEY (the log's verifier key)")
        with _store(url, readonly=True) as store:
            head = store.head()
            progress, done = _progress(head.seq if head else 0, args.progress)
            try:
                report = verify_chain(
                    store,
                    expected_head=expected,
                    progress=progress,
                    deep=getattr(args, "deep", False),
                )
            finally:
                done()
            anchored = _check_checkpoints(store, args) if args.checkpoint else None
            from coworker.audit.erasure import erased_payloads

            erased = erased_payloads(store)
    except (AuditUnavailable, ConfigError) as exc:
        return _fail(str(exc))
    if anchored is not None:
        code, lines = anchored
        if args.json:
            print(json.dumps({**report.to_dict(), "checkpoints": lines}))
            return 1 if code or not report.ok else 0
        for line in lines:
            print(line)
        if code and report.ok:
            print("FAIL  the chain is self-consistent, but not the log the checkpoints signed")
            return 1
    if args.json:
        out = report.to_dict()
        out["chain"] = chain
        out["erased"] = [{"seq": s, "state": e.describe()} for s, e in sorted(erased.items())]
        print(json.dumps(out))
        return 0 if report.ok else 1
    for at, state in sorted(erased.items()):
        print(f"payload  #{at}: {printable(state.describe())}")
    if report.ok:
        if report.head is None:
            print("OK  empty log")
        else:
            print(f"OK  {report.checked} records intact")
            print(f"head  {report.head.seq}:{report.head.hash_hex}")
            print("      (keep this head; pass it as --expected-head to detect a cut-off tail)")
        for open_ in report.in_doubt:
            print(f"in-doubt  #{open_}: intent without an outcome (the run may not have finished)")
        return 0
    for problem in report.problems or (None,):
        seq = report.bad_seq if problem is None else problem.seq
        kind = report.kind if problem is None else problem.kind
        detail = report.detail if problem is None else problem.detail
        where = f"chain {printable(chain)} " if chain else ""
        print(f"FAIL  {where}{'-' if seq is None else f'seq {seq}'}: {printable(kind)}")
        print(f"      {printable(detail)}")
    if report.head is not None:
        print(f"intact up to  {report.head.seq}:{report.head.hash_hex}")
    return 1


def _check_checkpoints(store: Any, args: argparse.Namespace) -> tuple[int, list[str]]:
    from coworker.audit.cli_proofs import check_checkpoints

    return check_checkpoints(store, args.checkpoint, args.key, args.policy)


def _short_time(value: Any) -> str:
    # 2026-01-02T03:04:05.123456789Z -> 2026-01-02 03:04:05.123
    if not isinstance(value, str) or len(value) < 23:
        return str(value or "")
    return value[:10] + " " + value[11:23]


def _print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _cmd_query(args: argparse.Namespace) -> int:
    from coworker.audit.query import query

    try:
        with _store(args.url, readonly=True) as store:
            entries = query(
                store,
                flow_id=args.flow_id,
                user=args.user,
                agent=args.agent,
                doctype=args.doctype,
                operation=args.operation,
                category=args.category,
                since=args.since,
                until=args.until,
                limit=args.limit,
            )
            from coworker.audit.erasure import erased_payloads

            erased = erased_payloads(store)
            if args.json:
                for e in entries:
                    line = {"seq": e.seq, "status": e.status, **e.fields}
                    line["payload"] = _payload_view(store, e, erased)
                    print(json_text(line))
                return 0
            rows = [[name for name, _ in _COLUMNS] + ["PAYLOAD"]]
            # printable(): a stored id with a newline or an ANSI escape must not forge a row.
            rows += [
                [printable(get(e) or "-") for _, get in _COLUMNS]
                + [_payload_cell(_payload_view(store, e, erased))]
                for e in entries
            ]
    except (AuditUnavailable, ConfigError) as exc:
        return _fail(str(exc))
    if len(rows) == 1:
        print("no matching records", file=sys.stderr)
        return 0
    _print_table(rows, sys.stdout)
    return 0


def _payload_view(store: Any, entry: Any, erased: dict[int, Any]) -> str | None:
    # The captured input/output as text, "erased (seq N, reason)", or None (none captured).
    state = erased.get(entry.seq)
    if state is not None:
        return str(state.describe())
    if entry.fields.get("payload_digest") is None:
        return None
    plaintext = getattr(store, "plaintext", None)
    from coworker.audit.store import StoredRecord

    record = StoredRecord(entry.seq, b"", b"", json.dumps(entry.fields).encode(), entry.payload)
    data = plaintext(record) if plaintext is not None else entry.payload
    if data is None:
        return "unreadable (no payload or key, and no erasure record)"
    return bytes(data).decode("utf-8", "replace")


def _payload_cell(view: str | None) -> str:
    if view is None:
        return "-"
    return printable(view if view.startswith(("erased", "unreadable")) else "kept")


def _cmd_tree(args: argparse.Namespace) -> int:
    from coworker.audit.query import build_tree, query, render_tree, resolve_flow_id, tree_to_dict

    try:
        with _store(args.url, readonly=True) as store:
            flow_id = resolve_flow_id(store, args.flow_id)
            tree = build_tree(query(store, flow_id=flow_id), flow_id)
    except (AuditUnavailable, ConfigError) as exc:
        return _fail(str(exc))
    except LookupError as exc:
        return _fail(str(exc), 1)
    if tree.records == 0:
        return _fail(f"no audit records for flow {args.flow_id!r}", 1)
    if args.json:
        print(json_text(tree_to_dict(tree)))
    else:
        print(render_tree(tree))
    return 0


def _cmd_correct(args: argparse.Namespace) -> int:
    from coworker.audit.correction import correct

    changes: dict[str, Any] = {}
    for item in args.changes:
        key, sep, value = item.partition("=")
        if not sep or not key:
            return _fail(f"--set {item!r}: use FIELD=VALUE")
        if key in ("seq", "reason", "by", "store"):
            return _fail(f"--set {item!r}: {key!r} cannot be corrected (it names the correction)")
        changes[key] = value
    try:
        with _store(args.url, readonly=False) as store:
            record = correct(args.seq, args.reason, store=store, by=args.by, **changes)
    except (AuditUnavailable, ConfigError, LookupError) as exc:
        return _fail(str(exc))
    print(f"correction #{record.seq} appended for #{args.seq}  hash {record.hash.hex()}")
    return 0


# -- flows folded from the log (issue 14, docs/flows.md) ------------------------------------


def _register_flow_commands(subparsers: Any, url_help: str) -> None:
    """Add ``flow`` (one flow's folded state) and ``flows`` (flows with their status)."""
    one = subparsers.add_parser(
        "flow", help="a flow's state folded from the log: status, steps, transitions, seal"
    )
    one.add_argument(
        "flow_id", metavar="FLOW_ID", help="a flow id, or a unique prefix of one (as printed)"
    )
    one.add_argument(
        "--as-of",
        default=None,
        metavar="SEQ|TIME",
        help="replay up to this seq (inclusive) or time (ISO 8601, or 30m / 2h / 7d ago)",
    )
    one.add_argument(
        "--newer-fold",
        action="store_true",
        help="replay a flow sealed under an older fold version with this one",
    )
    one.add_argument("--url", default=None, help=url_help)
    one.add_argument("--json", action="store_true", help="print the state as one JSON object")
    one.set_defaults(func=_cmd_flow)

    many = subparsers.add_parser("flows", help="flows with their status folded from the log")
    many.add_argument(
        "--status", default=None, choices=("active", "blocked", "completed", "failed", "broken")
    )
    many.add_argument("--type", dest="flow_type", default=None, help="flow.type")
    many.add_argument(
        "--since", default=None, help="flows started at or after (ISO 8601, or 30m / 2h / 7d)"
    )
    many.add_argument("--url", default=None, help=url_help)
    many.add_argument("--json", action="store_true", help="one JSON object per line")
    many.set_defaults(func=_cmd_flows)


def _as_of(text: str | None) -> int | str | None:
    from coworker.audit.query import parse_time

    if text is None:
        return None
    if text.strip().isdigit():
        return int(text)
    return parse_time(text)


def _cmd_flow(args: argparse.Namespace) -> int:
    from coworker.audit.fold import FoldVersionError, replay
    from coworker.audit.query import resolve_flow_id

    try:
        as_of = _as_of(args.as_of)
        with _store(args.url, readonly=True) as store:
            flow_id = resolve_flow_id(store, args.flow_id)
            state = replay(store, flow_id, as_of, newer_fold=args.newer_fold)
    except (AuditUnavailable, ConfigError, FoldVersionError) as exc:
        return _fail(str(exc))
    except LookupError as exc:
        return _fail(str(exc), 1)
    if args.json:
        print(json_text(state.to_dict()))
        return 0
    p = printable
    out = sys.stdout
    out.write(f"flow      {p(state.flow_id)}  ({p(state.flow_type or '-')})\n")
    out.write(f"status    {p(state.status)}")
    if state.error_type:
        out.write(f"  ({p(state.error_type)})")
    if state.next_flow_id:
        out.write(f"  -> {p(state.next_flow_id)} ({p(state.next_break_reason)})")
    out.write("\n")
    if state.definition_id:
        out.write(f"workflow  {p(state.definition_id)}: {p(', '.join(state.definition_steps))}\n")
    if state.previous_flow_id:
        out.write(f"broke from {p(state.previous_flow_id)} ({p(state.break_reason)})\n")
    out.write(f"step      {p(state.current_step or '-')}\n")
    out.write(f"started   {_short_time(state.started_at) or '-'}\n")
    if state.ended_at:
        out.write(f"ended     {_short_time(state.ended_at)}\n")
    out.write(f"users     {p(', '.join(state.users) or '-')}\n")
    out.write(f"agents    {p(', '.join(state.agents) or '-')}\n")
    out.write(
        f"records   {state.records} ({state.events} flow events, {state.runs} runs, "
        f"{state.failed_runs} failed)\n"
    )
    if state.head is not None:
        out.write(f"head      {state.head.seq}:{state.head.hash}\n")
    seal = state.seal
    if seal is not None:
        verdict = {True: "matches", False: "DOES NOT MATCH", None: "unknown"}[seal.head_matches]
        out.write(f"sealed    seq {seal.seq}, head {seal.head_seq}:{seal.head_hash} ({verdict})")
        if seal.status_matches is False:
            out.write(f"; sealed status {p(seal.flow_status)} differs from the fold")
        out.write("\n")
        if state.after_seal:
            out.write(f"          {state.after_seal} records written after the seal\n")
    if state.as_of is not None:
        out.write(f"as of     {p(state.as_of)}\n")
    if state.steps:
        rows = [["STEP", "ATTEMPTS", "OUTCOME", "RUNS", "ERROR"]]
        rows += [
            [
                p(s.step_id),
                str(s.attempts),
                s.outcome,
                f"{s.runs} ({s.failed_runs} failed)" if s.failed_runs else str(s.runs),
                p(s.error_type or "-"),
            ]
            for s in state.steps
        ]
        out.write("\n")
        _print_table(rows, out)
    if state.transitions:
        rows = [["SEQ", "TIME", "EVENT", "STEP", "STATUS"]]
        rows += [
            [
                str(t.seq),
                _short_time(t.at),
                p(t.event),
                p(t.step_id or "-"),
                f"{t.status_from or '-'} -> {t.status_to}",
            ]
            for t in state.transitions
        ]
        out.write("\n")
        _print_table(rows, out)
    return 0


def _cmd_flows(args: argparse.Namespace) -> int:
    from coworker.audit.fold import FoldVersionError, list_flows
    from coworker.audit.query import parse_time

    try:
        since = parse_time(args.since) if args.since is not None else None
        with _store(args.url, readonly=True) as store:
            flows = list_flows(store, status=args.status, flow_type=args.flow_type, since=since)
    except (AuditUnavailable, ConfigError, FoldVersionError) as exc:
        return _fail(str(exc))
    if args.json:
        for f in flows:
            print(json_text(f.to_dict()))
        return 0
    if not flows:
        print("no matching flows", file=sys.stderr)
        return 0
    rows = [["FLOW", "TYPE", "STATUS", "STEP", "STARTED", "ENDED", "SEALED"]]
    rows += [
        [
            printable(f.flow_id),
            printable(f.flow_type or "-"),
            f.status,
            printable(f.current_step or "-"),
            _short_time(f.started_at) or "-",
            _short_time(f.ended_at) or "-",
            "yes" if f.sealed else "no",
        ]
        for f in flows
    ]
    _print_table(rows, sys.stdout)
    return 0
