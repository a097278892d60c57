"""Self-contained audit bundles for compliance storage, and their offline verification.

A bundle is a directory or a ``.tar`` of it::

    manifest.json            format, origin, tree size, the records with their files
    checkpoint               the signed checkpoint every proof refers to (C2SP signed note)
    key.pub                  the log's verifier key (informational: the auditor brings theirs)
    records/<seq>.json       each selected record's canonical bytes, exactly as hashed
                             (and the erasure/purge records of erased payloads, ``related``)
    proofs/<seq>.tlog-proof  a C2SP tlog-proof@v1 for each record

:func:`verify_bundle` needs no database and no network: only the bundle and the verifier
key the auditor obtained out of band. It depends on :mod:`coworker.audit.proof` (and through
it on the checkpoint and Merkle modules), never on a store.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from coworker.audit.checkpoint import CheckpointError, open_checkpoint
from coworker.audit.keys import Verifier
from coworker.audit.merkle import ProofError
from coworker.audit.proof import encode_proof, verify_record_proof

__all__ = ["FORMAT", "BundleReport", "read_bundle", "verify_bundle", "write_bundle"]

FORMAT: Final = "coworker-audit-bundle/v1"


def _name(seq: int) -> str:
    return f"{seq:012d}"


def write_bundle(
    out: str | os.PathLike[str],
    records: Iterable[tuple[int, bytes]],
    proof_for: Callable[[int], list[bytes]],
    checkpoint: bytes,
    verifier: Verifier,
    *,
    filters: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    payloads: Mapping[int, tuple[str, int]] | None = None,
    related: Iterable[int] = (),
) -> int:
    """Write a bundle; a path ending in ``.tar`` becomes a tar file, anything else a directory.

    Args:
        out: the bundle path (must not exist).
        records: ``(seq, canonical bytes)`` of the selected records.
        proof_for: inclusion proof hashes of leaf index ``seq - 1`` in the checkpoint's tree.
        checkpoint: the signed checkpoint.
        verifier: the log's verifier key.
        filters: the selection, recorded in the manifest.
        progress: called with the number of records written so far.
        payloads: seq -> (``"erased (seq N, reason)"``, N) for selected records whose payload
            was erased or purged: the manifest says so, and verify-bundle checks that record
            N is in the bundle and names the seq.
        related: seqs among ``records`` that are not in the selection but explain it (the
            erasure and purge records); marked ``"related": true`` in the manifest.

    Returns:
        The number of records written.
    """
    target = Path(out)
    if target.exists():
        raise FileExistsError(f"{target} exists")
    cp, _ = open_checkpoint(checkpoint, verifier)
    files: dict[str, bytes] = {}
    entries = []
    extra = set(related)
    states = dict(payloads or {})
    for count, (seq, body) in enumerate(records, 1):
        if seq > cp.size:
            break
        rec, prf = f"records/{_name(seq)}.json", f"proofs/{_name(seq)}.tlog-proof"
        files[rec] = body
        files[prf] = encode_proof(seq - 1, proof_for(seq - 1), checkpoint)
        item: dict[str, Any] = {"seq": seq, "record": rec, "proof": prf}
        if seq in extra:
            item["related"] = True
        if seq in states:
            item["payload"], item["payload_record"] = states[seq]
        entries.append(item)
        if progress is not None:
            progress(count)
    manifest = {
        "format": FORMAT,
        "origin": cp.origin,
        "tree_size": cp.size,
        "verifier_key": verifier.text,
        "filters": dict(filters or {}),
        "records": entries,
    }
    files["checkpoint"] = checkpoint
    files["key.pub"] = (verifier.text + "\n").encode()
    files["manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    if target.suffix == ".tar":
        tmp = target.with_name(target.name + ".partial")
        with tarfile.open(tmp, "w") as tar:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, target)
    else:
        for name, data in files.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return len(entries)


def read_bundle(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """All files of a bundle (directory or tar) by their relative name (nothing is extracted
    to disk, so member names like ``../x`` cannot write anywhere).

    A bundle is what gets archived, so it must say one thing to every reader: a name given
    twice (tools disagree on which copy counts), an absolute name or one with ``..`` (it
    would extract outside the bundle), a link (its target is not in the bundle and can change
    after verification) or any member that is not a regular file or directory is refused.

    Raises:
        OSError: the path cannot be read.
        ValueError: it is neither a directory nor a tar file, or holds such a member.
    """
    source = Path(path)
    files: dict[str, bytes] = {}
    if source.is_dir():
        for p in sorted(source.rglob("*")):
            name = p.relative_to(source).as_posix()
            if p.is_symlink():
                raise ValueError(f"{source}: {name} is a symbolic link; a bundle holds files")
            if p.is_dir():
                continue
            if not p.is_file():
                raise ValueError(f"{source}: {name} is not a regular file")
            files[name] = p.read_bytes()
        return files
    try:
        with tarfile.open(source, "r") as tar:
            for member in tar.getmembers():
                name = _member_name(source, member.name)
                if member.issym() or member.islnk():
                    raise ValueError(f"{source}: member {name} is a link; a bundle holds files")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ValueError(f"{source}: member {name} is not a regular file")
                if name in files:
                    raise ValueError(f"{source}: member {name} is in the tar twice")
                fh = tar.extractfile(member)
                files[name] = fh.read() if fh is not None else b""
    except tarfile.TarError as exc:
        raise ValueError(f"{source}: neither a bundle directory nor a tar file ({exc})") from None
    return files


def _member_name(source: Path, raw: str) -> str:
    name = raw.removeprefix("./")
    parts = name.split("/")
    if not name or name.startswith("/") or ".." in parts or "\\" in name:
        raise ValueError(f"{source}: unsafe member name {raw[:80]!r} (outside the bundle)")
    return "/".join(p for p in parts if p not in ("", "."))


@dataclass
class BundleReport:
    """The result of :func:`verify_bundle`: ``ok`` and every failure, named."""

    records: int = 0
    tree_size: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No failure."""
        return not self.failures and self.records > 0


def verify_bundle(files: Mapping[str, bytes], verifier: Verifier) -> BundleReport:
    """Verify every record of a bundle against its checkpoint and the auditor's key.

    Args:
        files: the bundle's files (:func:`read_bundle`).
        verifier: the log's verifier key, from the auditor (the bundle's ``key.pub`` is not
            trusted).

    Returns:
        A report naming each failure (a record whose proof fails, a missing file, a
        checkpoint not signed by ``verifier``...).
    """
    report = BundleReport()
    try:
        manifest = json.loads(files["manifest.json"])
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            report.failures.append("manifest.json: not a coworker-audit-bundle/v1 manifest")
            return report
        checkpoint, _ = open_checkpoint(files["checkpoint"], verifier)
    except KeyError as exc:
        report.failures.append(f"missing file {exc.args[0]}")
        return report
    except (ValueError, CheckpointError) as exc:
        report.failures.append(f"checkpoint/manifest: {exc}")
        return report
    report.tree_size = checkpoint.size
    # The manifest describes the bundle to a reader: what it says must be what is proven.
    for key, value in (("origin", checkpoint.origin), ("tree_size", checkpoint.size)):
        if manifest.get(key) != value:
            report.failures.append(
                f"manifest.json: {key} {manifest.get(key)!r} is not the checkpoint's {value!r}"
            )
    filters = manifest.get("filters", {})
    if not isinstance(filters, dict):
        report.failures.append("manifest.json: 'filters' is not an object")
        filters = {}
    listed: set[str] = set()
    seqs: set[int] = set()
    related: dict[int, dict[str, Any]] = {}
    claims: list[tuple[int, Any]] = []
    entries = manifest.get("records")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        report.failures.append("manifest.json: 'records' is not a list of objects")
        return report
    for entry in entries:
        seq = entry.get("seq")
        rec, prf = entry.get("record"), entry.get("proof")
        if type(seq) is int and seq in seqs:
            report.failures.append(f"record {seq}: listed twice in the manifest")
            continue
        listed.update((rec, prf))
        if type(seq) is not int or rec not in files or prf not in files:
            report.failures.append(f"record {seq}: record or proof file missing")
            continue
        seqs.add(seq)
        body = files[rec]
        try:
            fields = json.loads(body)
            if not isinstance(fields, dict) or fields.get("seq") != seq:
                raise ProofError(f"the record's own seq is {fields.get('seq')!r}")
            cp, _ = verify_record_proof(body, files[prf], verifier, seq=seq)
            if cp != checkpoint:
                raise ProofError("its proof refers to another checkpoint than the bundle's")
            if entry.get("related") is True:
                # Outside the selection on purpose: it must be what explains a payload.
                if fields.get("kind") not in _RELATED_KINDS:
                    raise ProofError(f"a related record of kind {fields.get('kind')!r}")
                related[seq] = fields
            else:
                outside = _outside_selection(fields, filters)
                if outside is not None:
                    raise ProofError(f"not in the bundle's selection: {outside}")
            if "payload_record" in entry:
                claims.append((seq, entry.get("payload_record")))
        except (ProofError, ValueError) as exc:
            report.failures.append(f"record {seq}: {exc}")
            continue
        report.records += 1
    for seq, by in claims:
        # "erased (seq N, ...)": record N is in the bundle, proven, and names this seq.
        explaining = related.get(by) if type(by) is int else None
        names = (explaining or {}).get("erased_seqs") or (explaining or {}).get("purged_seqs")
        if explaining is None or seq not in (names or ()):
            report.failures.append(
                f"record {seq}: its payload is said to be erased by seq {by!r}, which the "
                "bundle does not hold or does not name it"
            )
    extra = sorted(n for n in files if n.startswith(("records/", "proofs/")) and n not in listed)
    for name in extra:
        report.failures.append(f"{name}: not listed in the manifest")
    if not entries:
        report.failures.append("the bundle holds no records")
    return report


_RELATED_KINDS: Final = frozenset({"erasure", "purge"})

# Manifest filter -> the record field it selects on; since/until are absolute RFC 3339 times
# (written so by ``coworker audit export``) compared with the record's start, as the query.
_SELECTION: Final = {"user": "user_id", "flow_id": "flow_id"}


def _outside_selection(fields: Mapping[str, Any], filters: Mapping[str, Any]) -> str | None:
    for name, field_name in _SELECTION.items():
        wanted = filters.get(name)
        got = fields.get(field_name)
        if wanted is not None and got != wanted:
            return f"its {field_name} is {got!r}, the selection's {name} {wanted!r}"
    since, until = filters.get("since"), filters.get("until")
    if since is not None or until is not None:
        moment = fields.get("start") or fields.get("recorded_at")
        if not isinstance(moment, str):
            return "it has no time, the selection has since/until"
        if isinstance(since, str) and moment < since:
            return f"its time {moment} is before the selection's since {since}"
        if isinstance(until, str) and moment >= until:
            return f"its time {moment} is not before the selection's until {until}"
    return None
