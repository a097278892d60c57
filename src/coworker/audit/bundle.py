"""Self-contained audit bundles for compliance storage, and their offline verification.

A bundle is a directory or a ``.tar`` of it::

    manifest.json            format, origin, tree size, the records with their files
    checkpoint               the signed checkpoint every proof refers to (C2SP signed note)
    key.pub                  the log's verifier key (informational: the auditor brings theirs)
    records/<seq>.json       each selected record's canonical bytes, exactly as hashed
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

    Returns:
        The number of records written.
    """
    target = Path(out)
    if target.exists():
        raise FileExistsError(f"{target} exists")
    cp, _ = open_checkpoint(checkpoint, verifier)
    files: dict[str, bytes] = {}
    entries = []
    for count, (seq, body) in enumerate(records, 1):
        if seq > cp.size:
            break
        rec, prf = f"records/{_name(seq)}.json", f"proofs/{_name(seq)}.tlog-proof"
        files[rec] = body
        files[prf] = encode_proof(seq - 1, proof_for(seq - 1), checkpoint)
        entries.append({"seq": seq, "record": rec, "proof": prf})
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

    Raises:
        OSError: the path cannot be read.
        ValueError: it is neither a directory nor a tar file.
    """
    source = Path(path)
    files: dict[str, bytes] = {}
    if source.is_dir():
        for p in source.rglob("*"):
            if p.is_file():
                files[p.relative_to(source).as_posix()] = p.read_bytes()
        return files
    try:
        with tarfile.open(source, "r") as tar:
            for member in tar.getmembers():
                if member.isfile():
                    fh = tar.extractfile(member)
                    if fh is not None:
                        files[member.name.removeprefix("./")] = fh.read()
    except tarfile.TarError as exc:
        raise ValueError(f"{source}: neither a bundle directory nor a tar file ({exc})") from None
    return files


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
    listed: set[str] = set()
    entries = manifest.get("records")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        report.failures.append("manifest.json: 'records' is not a list of objects")
        return report
    for entry in entries:
        seq = entry.get("seq")
        rec, prf = entry.get("record"), entry.get("proof")
        listed.update((rec, prf))
        if not isinstance(seq, int) or rec not in files or prf not in files:
            report.failures.append(f"record {seq}: record or proof file missing")
            continue
        body = files[rec]
        try:
            fields = json.loads(body)
            if not isinstance(fields, dict) or fields.get("seq") != seq:
                raise ProofError(f"the record's own seq is {fields.get('seq')!r}")
            cp, _ = verify_record_proof(body, files[prf], verifier, seq=seq)
            if cp != checkpoint:
                raise ProofError("its proof refers to another checkpoint than the bundle's")
        except (ProofError, ValueError) as exc:
            report.failures.append(f"record {seq}: {exc}")
            continue
        report.records += 1
    extra = sorted(n for n in files if n.startswith(("records/", "proofs/")) and n not in listed)
    for name in extra:
        report.failures.append(f"{name}: not listed in the manifest")
    if not entries:
        report.failures.append("the bundle holds no records")
    return report
