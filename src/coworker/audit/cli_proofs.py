"""``coworker audit keygen | checkpoint | heads | prove | export | verify-bundle``, and the
``verify --checkpoint FILE --key PUBKEY`` check (:func:`check_checkpoints`).

Exit codes as the other audit commands: 0 success, 1 a proof or check fails (the output
names what), 2 a bad argument, key or unreachable store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from coworker.exceptions import AuditUnavailable, ConfigError

__all__ = ["check_checkpoints", "register"]

_URL_HELP = "audit store URL (default: COWORKER_AUDIT_URL or sqlite:///.coworker/audit.db)"


def register(subparsers: Any) -> None:
    """Add the proof subcommands to ``coworker audit``."""
    keygen = subparsers.add_parser(
        "keygen", help="make an Ed25519 log key (C2SP signed-note); prints the verifier key"
    )
    keygen.add_argument(
        "--name", required=True, metavar="ORIGIN", help="e.g. audit.example.com/prod"
    )
    keygen.add_argument("--out", required=True, metavar="KEYFILE", help="private key file (0600)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing KEYFILE")
    keygen.set_defaults(func=_cmd_keygen)

    cp = subparsers.add_parser("checkpoint", help="sign, store and print a checkpoint now")
    cp.add_argument("--url", default=None, help=_URL_HELP)
    cp.add_argument("--key", required=True, metavar="KEYFILE", help="the log's private key file")
    cp.add_argument("--out", default=None, metavar="FILE", help="also write it to FILE")
    cp.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="URL",
        help="a C2SP tlog-witness to ask for a cosignature (repeatable)",
    )
    cp.set_defaults(func=_cmd_checkpoint)

    heads = subparsers.add_parser(
        "heads",
        help="sign a checkpoint of every chain and print a heads note listing them all",
    )
    heads.add_argument("--url", default=None, help=_URL_HELP)
    heads.add_argument("--key", required=True, metavar="KEYFILE", help="the log's private key file")
    heads.add_argument("--out", default=None, metavar="FILE", help="also write it to FILE")
    heads.set_defaults(func=_cmd_heads)

    prove = subparsers.add_parser(
        "prove", help="a tlog-proof@v1 for a record, or a consistency proof between two trees"
    )
    prove.add_argument("seq", nargs="?", type=int, help="the record's seq")
    prove.add_argument("--url", default=None, help=_URL_HELP)
    prove.add_argument(
        "--checkpoint",
        default=None,
        metavar="FILE",
        help="prove against this checkpoint (default: the latest stored one)",
    )
    prove.add_argument(
        "--key", default=None, metavar="PUBKEY", help="verifier key (string or file) to check it"
    )
    prove.add_argument(
        "--consistency",
        nargs=2,
        metavar=("OLD", "NEW"),
        default=None,
        help="tree sizes or checkpoint files: print the RFC 9162 consistency proof",
    )
    prove.add_argument("--out", default=None, metavar="FILE", help="write the proof to FILE")
    prove.set_defaults(func=_cmd_prove)

    export = subparsers.add_parser(
        "export", help="a self-contained bundle: records, tlog-proofs, checkpoint, key"
    )
    export.add_argument("--out", required=True, metavar="BUNDLE", help="a directory or a .tar")
    export.add_argument("--url", default=None, help=_URL_HELP)
    export.add_argument("--key", required=True, metavar="PUBKEY", help="the log's verifier key")
    export.add_argument("--checkpoint", default=None, metavar="FILE")
    export.add_argument("--since", default=None, help="ISO 8601 time or a duration ago (2h, 7d)")
    export.add_argument("--until", default=None)
    export.add_argument("--flow-id", default=None)
    export.add_argument("--user", default=None)
    export.set_defaults(func=_cmd_export)

    vb = subparsers.add_parser(
        "verify-bundle", help="verify an exported bundle offline (no database, no network)"
    )
    vb.add_argument("bundle", metavar="BUNDLE")
    vb.add_argument("--key", default=None, metavar="PUBKEY", help="the log's verifier key")
    vb.add_argument(
        "--policy",
        default=None,
        metavar="FILE",
        help="a C2SP tlog-policy: the log key(s) and the witness quorum the checkpoint needs",
    )
    vb.add_argument("--json", action="store_true")
    vb.set_defaults(func=_cmd_verify_bundle)


def _fail(message: str, code: int = 2) -> int:
    print(f"coworker audit: {message}", file=sys.stderr)
    return code


def _open(url: str | None) -> Any:
    from coworker.audit.cli import open_existing_store

    return open_existing_store(url)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from coworker.audit.keys import generate_signer, write_signer

    try:
        signer = generate_signer(args.name)
        pub = write_signer(args.out, signer, force=args.force)
    except ConfigError as exc:
        return _fail(str(exc))
    print(signer.verifier.text)
    print(f"private key: {args.out} (mode 0600; keep it off the database host)", file=sys.stderr)
    print(f"verifier key: {pub}", file=sys.stderr)
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from coworker.audit.checkpointer import make_checkpoint
    from coworker.audit.keys import load_signer
    from coworker.audit.tlog import LogTree, TreeError

    try:
        signer = load_signer(args.key)
        store = _open(args.url)
        try:
            tree = LogTree(store)
            try:
                checkpoint, note = make_checkpoint(tree, signer)
                if args.witness:
                    from coworker.audit.checkpointer import cosign
                    from coworker.audit.witness import WitnessClient

                    witnesses = [WitnessClient(url) for url in args.witness]
                    note = cosign(tree, checkpoint, note, witnesses)
                    missing = len(witnesses) - (note.count(b"\n\xe2\x80\x94 ") - 1)
                    if missing > 0:
                        print(f"{missing} witness(es) did not cosign (see above)", file=sys.stderr)
            finally:
                tree.close()
        finally:
            store.close()
    except TreeError as exc:
        return _fail(str(exc), 1)
    except (AuditUnavailable, ConfigError) as exc:
        return _fail(str(exc))
    if args.out:
        Path(args.out).write_bytes(note)
    sys.stdout.write(note.decode())
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    from coworker.audit.checkpointer import make_checkpoint, make_heads
    from coworker.audit.keys import load_signer
    from coworker.audit.tlog import LogTree, TreeError
    from coworker.audit.urls import resolve_url, with_chain

    stores: list[Any] = []
    trees: dict[str, Any] = {}
    try:
        signer = load_signer(args.key)
        url = resolve_url(args.url)
        store = _open(url)
        stores.append(store)
        own = getattr(store, "chain", "") or ""
        listed = getattr(store, "chains", None)
        names = list(listed()) if callable(listed) else [own]
        checkpoints = {}
        for name in sorted({*names, own}, key=lambda c: (c != "", c)):
            chain_store = store if name == own else _open(with_chain(url, name))
            if chain_store is not store:
                stores.append(chain_store)
            trees[name] = LogTree(chain_store)
            checkpoints[name], _ = make_checkpoint(trees[name], signer)
        # Stored beside the URL's chain's checkpoints: a later run (or the checkpointer of
        # that chain) refuses a note that leaves out a chain this one lists.
        note = make_heads(signer, trees, checkpoints, trees[own].table)
    except TreeError as exc:
        return _fail(str(exc), 1)
    except (AuditUnavailable, ConfigError) as exc:
        return _fail(str(exc))
    finally:
        for tree in trees.values():
            tree.close()
        for s in stores:
            s.close()
    if args.out:
        Path(args.out).write_bytes(note)
    sys.stdout.write(note.decode())
    return 0


def _chain_key(verifier: Any, store: Any) -> Any:
    """The verifier of ``store``'s chain's checkpoints (signed under ``<origin>/chain/<name>``)
    from the store's verifier key, which is what an auditor holds."""
    from coworker.audit.checkpoint import chain_verifier

    return chain_verifier(verifier, getattr(store, "chain", "") or "")


def _bundle_chain_key(verifier: Any, checkpoint: bytes | None) -> Any:
    """A bundle exported from a named chain carries that chain's checkpoint: verify it with
    the chain's key derived from the store's (never with a key the bundle brings)."""
    from coworker.audit.checkpoint import CheckpointError, chain_verifier, parse_note

    if checkpoint is None:
        return verifier
    try:
        origin = parse_note(checkpoint).text.split("\n", 1)[0]
    except CheckpointError:
        return verifier  # verify_bundle reports the malformed note
    prefix = f"{verifier.name}/chain/"
    if not origin.startswith(prefix):
        return verifier
    try:
        return chain_verifier(verifier, origin[len(prefix) :])
    except ValueError:
        return verifier


def _load_checkpoint(tree: Any, path: str | None, key: str | None) -> tuple[Any, bytes]:
    from coworker.audit.checkpoint import open_checkpoint, parse_checkpoint, parse_note
    from coworker.audit.keys import load_verifier

    if path is not None:
        note = Path(path).read_bytes()
    else:
        from coworker.audit.checkpointer import heads_key

        # Heads notes sit in the same table (under heads_key, "heads <origin>": a key name
        # never holds a space, so no origin starts so): they are not checkpoints.
        prefix = heads_key("")
        stored = [c for c in tree.table.checkpoints() if not c.origin.startswith(prefix)]
        if not stored:
            raise ConfigError("no checkpoint stored yet: run `coworker audit checkpoint --key ...`")
        note = stored[-1].note
    if key is not None:
        checkpoint, _ = open_checkpoint(note, _chain_key(load_verifier(key), tree.store))
    else:
        checkpoint = parse_checkpoint(parse_note(note).text)
    return checkpoint, note


def _cmd_prove(args: argparse.Namespace) -> int:
    from coworker.audit.checkpoint import CheckpointError
    from coworker.audit.merkle import ProofError
    from coworker.audit.proof import encode_consistency, encode_proof
    from coworker.audit.tlog import LogTree, TreeError

    if (args.seq is None) == (args.consistency is None):
        return _fail("give a SEQ or --consistency OLD NEW")
    try:
        store = _open(args.url)
        tree = LogTree(store)
        try:
            size = tree.sync()
            if args.consistency is not None:
                old, new = (_tree_point(tree, spec, args.key) for spec in args.consistency)
                if new.size > size:
                    return _fail(f"the log has {size} records, not {new.size}", 1)
                if old.size and tree.root(old.size) != old.root:
                    return _fail(f"the log does not contain the tree of size {old.size}", 1)
                if tree.root(new.size) != new.root:
                    return _fail(f"the log does not contain the tree of size {new.size}", 1)
                out = encode_consistency(old, new, tree.consistency(old.size, new.size)).encode()
            else:
                checkpoint, note = _load_checkpoint(tree, args.checkpoint, args.key)
                if not 1 <= args.seq <= checkpoint.size:
                    return _fail(
                        f"record {args.seq} is not in the checkpoint's tree of {checkpoint.size}", 1
                    )
                if checkpoint.size > size or tree.root(checkpoint.size) != checkpoint.root:
                    return _fail(
                        f"the log does not contain the checkpoint's tree of {checkpoint.size} "
                        "records (run `coworker audit verify --checkpoint`)",
                        1,
                    )
                out = encode_proof(
                    args.seq - 1, tree.inclusion(args.seq - 1, checkpoint.size), note
                )
        finally:
            tree.close()
            store.close()
    except (TreeError, ProofError, CheckpointError) as exc:
        return _fail(str(exc), 1)
    except (AuditUnavailable, ConfigError, OSError) as exc:
        return _fail(str(exc))
    if args.out:
        Path(args.out).write_bytes(out)
    else:
        sys.stdout.write(out.decode())
    return 0


def _tree_point(tree: Any, spec: str, key: str | None) -> Any:
    from coworker.audit.checkpoint import Checkpoint

    if spec.isdigit():
        size = int(spec)
        if size > tree.size:
            raise ConfigError(f"tree size {size}: the log has {tree.size} records")
        return Checkpoint("", size, tree.root(size))
    checkpoint, _ = _load_checkpoint(tree, spec, key)
    return checkpoint


def _cmd_export(args: argparse.Namespace) -> int:
    from coworker.audit.bundle import write_bundle
    from coworker.audit.checkpoint import CheckpointError
    from coworker.audit.keys import load_verifier
    from coworker.audit.query import parse_time, query
    from coworker.audit.tlog import LogTree, TreeError

    try:
        verifier = load_verifier(args.key)
        store = _open(args.url)
        verifier = _chain_key(verifier, store)
        tree = LogTree(store)
        try:
            size = tree.sync()
            checkpoint, note = _load_checkpoint(tree, args.checkpoint, args.key)
            if checkpoint.size > size or tree.root(checkpoint.size) != checkpoint.root:
                return _fail(
                    f"the log does not contain the checkpoint's tree of {checkpoint.size}", 1
                )
            filters = {
                k: v
                for k, v in {
                    "since": args.since, "until": args.until,
                    "flow_id": args.flow_id, "user": args.user,
                }.items()
                if v is not None
            }  # fmt: skip
            selected = [e.seq for e in query(store, **filters)]
            seqs = [seq for seq in selected if seq <= checkpoint.size]
            # Records after the checkpoint's tree have no proof yet: say so, never drop them
            # from the export silently.
            later = len(selected) - len(seqs)
            # The manifest states the selection as absolute times ("7d" means nothing a year
            # later), so that verify-bundle can check every record against it.
            filters.update(
                {k: parse_time(v) for k, v in filters.items() if k in ("since", "until")}
            )
            # Erased payloads travel as erased, with the record that erased them (issue 15).
            from coworker.audit.erasure import erased_payloads

            erased = {s: e for s, e in erased_payloads(store).items() if s in set(seqs)}
            related = {e.by_seq for e in erased.values() if e.by_seq <= checkpoint.size}
            related -= set(seqs)
            payloads = {
                s: (e.describe(), e.by_seq)
                for s, e in erased.items()
                if e.by_seq <= checkpoint.size
            }
            wanted = set(seqs) | related
            seqs = sorted(wanted)
            records = (
                (r.seq, r.body)
                for r in (store.iter_from(min(seqs)) if seqs else iter(()))
                if r.seq in wanted
            )
            progress = _progress(len(seqs))
            n = write_bundle(
                args.out,
                records,
                lambda index: tree.inclusion(index, checkpoint.size),
                note,
                verifier,
                filters=filters,
                progress=progress,
                payloads=payloads,
                related=related,
            )
        finally:
            tree.close()
            store.close()
    except (TreeError, CheckpointError) as exc:
        return _fail(str(exc), 1)
    except (AuditUnavailable, ConfigError, OSError) as exc:
        return _fail(str(exc))
    if progress is not None:
        sys.stderr.write("\n")
    print(f"exported {n} records with proofs against checkpoint {checkpoint.size} to {args.out}")
    if later:
        print(
            f"coworker audit: {later} selected record(s) after the checkpoint's tree of "
            f"{checkpoint.size} are NOT in the bundle (no proof yet): run `coworker audit "
            "checkpoint --key ...` and export again to include them",
            file=sys.stderr,
        )
    return 0 if n else 1


def _progress(total: int) -> Any:
    if total < 10_000 or not sys.stderr.isatty():
        return None

    def show(done: int) -> None:
        if done % 1000 == 0 or done == total:
            sys.stderr.write(f"\rexported {done}/{total} records")
            sys.stderr.flush()

    return show


def _cmd_verify_bundle(args: argparse.Namespace) -> int:
    from coworker.audit.bundle import read_bundle, verify_bundle
    from coworker.audit.keys import load_verifier

    try:
        policy = _policy(args.policy)
        if args.key is None and (policy is None or len(policy.logs) != 1):
            raise ConfigError("give --key PUBKEY (or a --policy with one log line)")
        verifier = load_verifier(args.key) if args.key else policy.logs[0]
        files = read_bundle(args.bundle)
    except (ConfigError, OSError, ValueError) as exc:
        return _fail(str(exc))
    verifier = _bundle_chain_key(verifier, files.get("checkpoint"))
    report = verify_bundle(files, verifier)
    if policy is not None and "checkpoint" in files:
        from coworker.audit.witness import PolicyError

        try:
            policy.check(files["checkpoint"], log=verifier)
        except PolicyError as exc:
            report.failures.append(f"checkpoint: {exc}")
    if args.json:
        print(json.dumps({"ok": report.ok, "records": report.records, "failures": report.failures}))
    elif report.ok:
        print(
            f"OK  {report.records} records proven in the tree of {report.tree_size} "
            f"({verifier.name})"
        )
    else:
        for failure in report.failures:
            print(f"FAIL  {failure}")
    return 0 if report.ok else 1


def _policy(path: str | None) -> Any:
    if path is None:
        return None
    from coworker.audit.witness import PolicyError, parse_policy

    try:
        return parse_policy(Path(path).read_text())
    except PolicyError as exc:
        raise ConfigError(f"policy {path}: {exc}") from None


def check_checkpoints(
    store: Any, files: list[str], key: str, policy: str | None = None
) -> tuple[int, list[str]]:
    """The ``verify --checkpoint FILE... --key PUBKEY`` check: re-hash the log and compare
    its tree with each checkpoint.

    Returns:
        ``(exit code, output lines)``.

    Raises:
        ConfigError: the key or a checkpoint file is unusable, or a checkpoint is not signed
            by the key (for its origin).
    """
    from coworker.audit.checkpoint import CheckpointError, open_checkpoint
    from coworker.audit.keys import load_verifier
    from coworker.audit.logcheck import check_log
    from coworker.audit.tlog import _chain_rows
    from coworker.audit.witness import PolicyError

    verifier = _chain_key(load_verifier(key), store)
    rules = _policy(policy)
    checkpoints = []
    for path in files:
        try:
            data = Path(path).read_bytes()
            checkpoint, _ = open_checkpoint(data, verifier)
            if rules is not None:
                rules.check(data, log=verifier)
        except (CheckpointError, PolicyError, OSError) as exc:
            raise ConfigError(f"checkpoint {path}: {exc}") from None
        checkpoints.append((path, checkpoint))
    report = check_log(_chain_rows(store, 1), checkpoints)
    lines = []
    for f in report.findings:
        mark = "OK  " if f.status == "ok" else "FAIL"
        lines.append(f"{mark}  checkpoint {f.label} (tree {f.checkpoint.size}): {f.status}")
        if f.status != "ok":
            lines.append(f"      {f.detail}")
    return (0 if report.ok else 1), lines
