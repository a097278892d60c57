"""Witness cosignatures (C2SP tlog-witness, tlog-cosignature) and trust policies (C2SP
tlog-policy): a witness on another host, run by another party, cosigns each checkpoint
after checking that it extends the last one it saw, so that a log owner who rewrites or
forks the log (even one holding the log key) cannot get the new tree cosigned.

* :class:`WitnessClient` speaks ``POST <prefix>/add-checkpoint`` (tlog-witness v1): body
  ``old <size>``, the consistency proof lines, a blank line, the signed checkpoint; a 200
  answer is cosignature lines; 409 ``text/x.tlog.size`` tells the size the witness holds
  (the client retries once with a proof from that size). A 409 that cannot be resolved,
  403, 404, 422 are :class:`WitnessRefused`, named.
* :func:`parse_witness_key` reads a type 0x04 vkey (``name+id+base64(0x04 || key)``).
* :class:`Policy` is a parsed tlog-policy: logs, witnesses, groups, quorum;
  :meth:`Policy.check` verifies a checkpoint note against it.
"""

from __future__ import annotations

import base64
import http.client
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from coworker.audit.checkpoint import (
    ALG_COSIGNATURE,
    Checkpoint,
    CheckpointError,
    Note,
    NoteSignature,
    cosignature_key_id,
    open_checkpoint,
    parse_note,
    verify_cosignature,
)
from coworker.audit.keys import KeyFormatError, Verifier, is_valid_name, parse_verifier

__all__ = [
    "Policy",
    "PolicyError",
    "WitnessClient",
    "WitnessRefused",
    "add_cosignatures",
    "parse_policy",
    "parse_witness_key",
]

_MAX_PROOF_LINES: Final = 63


class WitnessRefused(RuntimeError):
    """A witness did not cosign: ``status`` is its HTTP status (409: it saw another tree)."""

    def __init__(self, url: str, status: int, detail: str) -> None:
        super().__init__(f"witness {url} refused ({status}): {detail}")
        self.url = url
        self.status = status


class PolicyError(ValueError):
    """A tlog-policy file is malformed, or a checkpoint does not satisfy it."""


def parse_witness_key(text: str) -> Verifier:
    """A witness verifier key: ``<name>+<hex id>+<base64(0x04 || 32-byte Ed25519 key)>``.

    Raises:
        KeyFormatError: malformed, not type 0x04, or the key id does not match.
    """
    parts = text.strip().split("+", 2)
    if len(parts) != 3 or not is_valid_name(parts[0]) or len(parts[1]) != 8:
        raise KeyFormatError(f"witness key {text[:60]!r} is not NAME+KEYID+KEY")
    name, hex_id, encoded = parts
    try:
        raw = base64.b64decode(encoded, validate=True)
        kid = int(hex_id, 16)
    except ValueError:
        raise KeyFormatError(f"witness key {name}: bad key id or base64") from None
    if len(raw) != 33 or raw[0] != ALG_COSIGNATURE:
        raise KeyFormatError(f"witness key {name}: not an Ed25519 cosignature key (type 0x04)")
    public = raw[1:]
    if cosignature_key_id(name, public) != kid:
        raise KeyFormatError(f"witness key {name}+{hex_id}: the key id does not match the key")
    return Verifier(name, kid, public)


@dataclass
class WitnessClient:
    """A tlog-witness submission prefix, e.g. ``http://witness.example:7380``.

    Attributes:
        url: the submission prefix.
        timeout: seconds per request.
        size: the tree size this witness last cosigned for us (learnt from a 409).
    """

    url: str
    timeout: float = 10.0
    size: int = 0

    def add_checkpoint(
        self, note: bytes, checkpoint: Checkpoint, proof_from: Callable[[int], list[bytes]]
    ) -> list[str]:
        """Ask for a cosignature of ``checkpoint``.

        Args:
            note: the signed checkpoint.
            checkpoint: its parsed body.
            proof_from: consistency proof from an older size to ``checkpoint.size``.

        Returns:
            The cosignature lines the witness returned (each ending in a newline).

        Raises:
            WitnessRefused: the witness refused (the status says why) or is unreachable.
        """
        for _attempt in range(2):
            old = min(self.size, checkpoint.size)
            proof = proof_from(old) if 0 < old < checkpoint.size else []
            status, ctype, body = self._post(old, proof, note)
            if status == 200:
                lines = _cosignature_lines(self.url, note, body)
                self.size = checkpoint.size
                return lines
            if status == 409 and ctype.startswith("text/x.tlog.size"):
                text = body.decode("ascii", "replace").strip()
                if not text.isdigit() or len(text) > 20:  # a tree size is a uint64
                    raise WitnessRefused(self.url, status, f"bad size {text[:20]!r}")
                held = int(text)
                if held > checkpoint.size or held == old:
                    raise WitnessRefused(
                        self.url, 409,
                        f"it holds a tree of {held} records for this log, ours has "
                        f"{checkpoint.size}: it was shown a different (longer) log",
                    )  # fmt: skip
                self.size = held
                continue
            meaning = {
                403: "the checkpoint's signature is not one it trusts",
                404: "it does not know this log (witnessctl add-log / add-key)",
                422: "the consistency proof does not verify: the log was rewritten or forked",
                400: "bad request",
            }.get(status, "unexpected answer")
            raise WitnessRefused(self.url, status, f"{meaning}: {body[:200]!r}")
        raise WitnessRefused(self.url, 409, "it keeps answering with a different tree size")

    def _post(self, old: int, proof: Sequence[bytes], note: bytes) -> tuple[int, str, bytes]:
        if len(proof) > _MAX_PROOF_LINES:
            raise WitnessRefused(self.url, 0, "consistency proof longer than 63 hashes")
        body = f"old {old}\n".encode()
        body += b"".join(base64.b64encode(h) + b"\n" for h in proof)
        body += b"\n" + note
        parts = urlsplit(self.url.rstrip("/") + "/add-checkpoint")
        conn_cls = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        try:
            conn = conn_cls(parts.netloc, timeout=self.timeout)
            try:
                conn.request("POST", parts.path, body=body)
                resp = conn.getresponse()
                return resp.status, resp.getheader("Content-Type") or "", resp.read(65536)
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as exc:
            raise WitnessRefused(self.url, 0, f"unreachable: {exc}") from None


def _cosignature_lines(url: str, note: bytes, body: bytes) -> list[str]:
    """The signature lines of a witness's answer, checked before they go near the note.

    A witness is another party: its answer must not make the stored and published note
    unreadable (a malformed line) or replace the log's own signature (a line under the log
    key's name and id), so such an answer is refused as a whole.
    """
    try:
        text = body.decode("utf-8")
        lines = text.splitlines(keepends=True)
        if not lines or any(not ln.startswith("\u2014 ") or not ln.endswith("\n") for ln in lines):
            raise CheckpointError("not signature lines")
        mine = parse_note(note).signatures
        own = {(sig.name, sig.key_id) for sig in mine}
        theirs = parse_note(note + body).signatures[len(mine) :]
    except (UnicodeDecodeError, CheckpointError) as exc:
        raise WitnessRefused(url, 200, f"the answer is not cosignature lines ({exc})") from None
    if any((sig.name, sig.key_id) in own for sig in theirs):
        raise WitnessRefused(url, 200, "the answer carries a signature of the log's own key")
    return lines


def add_cosignatures(note: bytes, lines: Sequence[str]) -> bytes:
    """The note with the cosignature lines appended (one per key; existing ones replaced)."""
    parsed = parse_note(note + "".join(lines).encode())
    seen: dict[tuple[str, int], int] = {}
    sigs: list[NoteSignature] = []
    for sig in parsed.signatures:
        key = (sig.name, sig.key_id)
        if key in seen:
            sigs[seen[key]] = sig
        else:
            seen[key] = len(sigs)
            sigs.append(sig)
    return Note(parsed.text, tuple(sigs)).encode()


@dataclass
class _Group:
    threshold: int
    members: list[str]


@dataclass
class Policy:
    """A parsed tlog-policy (https://c2sp.org/tlog-policy)."""

    logs: list[Verifier] = field(default_factory=list)
    witnesses: dict[str, Verifier] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)
    quorum: str = "none"

    def check(self, note_bytes: bytes, *, log: Verifier | None = None) -> tuple[Checkpoint, Note]:
        """Verify a checkpoint: signed by one of the policy's logs (or ``log``) and cosigned
        by a quorum of its witnesses.

        Raises:
            PolicyError: it is not (the message names the missing quorum).
        """
        candidates = [log] if log is not None else self.logs
        last: Exception | None = None
        for verifier in candidates:
            try:
                checkpoint, note = open_checkpoint(note_bytes, verifier)
                break
            except CheckpointError as exc:
                last = exc
        else:
            raise PolicyError(f"no log of the policy signed the checkpoint: {last}")
        cosigned: set[str] = set()
        for name, witness in self.witnesses.items():
            try:
                if verify_cosignature(note, witness) is not None:
                    cosigned.add(name)
            except CheckpointError as exc:
                raise PolicyError(str(exc)) from None
        if not self._satisfied(self.quorum, cosigned):
            have = ", ".join(sorted(cosigned)) or "none"
            raise PolicyError(f"quorum {self.quorum!r} not met (cosigned by: {have})")
        return checkpoint, note

    def _satisfied(self, name: str, cosigned: set[str]) -> bool:
        if name == "none":
            return True
        if name in self.witnesses:
            return name in cosigned
        group = self.groups[name]
        return sum(self._satisfied(m, cosigned) for m in group.members) >= group.threshold


def parse_policy(text: str) -> Policy:
    """Parse a tlog-policy file.

    Raises:
        PolicyError: malformed (unknown keyword, undefined or duplicate name, bad threshold,
            not exactly one quorum line, a key of the wrong type).
    """
    policy = Policy()
    quorums = 0
    keys: set[bytes] = set()
    for number, raw in enumerate(text.split("\n"), 1):
        if any(c < " " and c != "\t" for c in raw) or "\x7f" in raw:
            raise PolicyError(f"line {number}: control character")
        words = raw.replace("\t", " ").split()
        if not words or words[0].startswith("#"):
            continue
        kind, args = words[0], words[1:]
        try:
            if kind == "log" and 1 <= len(args) <= 2:
                v = parse_verifier(args[0])
                if v.public in keys:
                    raise PolicyError(f"line {number}: duplicate key")
                keys.add(v.public)
                policy.logs.append(v)
            elif kind == "witness" and 2 <= len(args) <= 3:
                name = args[0]
                if name in policy.witnesses or name in policy.groups or name == "none":
                    raise PolicyError(f"line {number}: name {name!r} defined twice")
                w = parse_witness_key(args[1])
                if w.public in keys:
                    raise PolicyError(f"line {number}: duplicate key")
                keys.add(w.public)
                policy.witnesses[name] = w
            elif kind == "group" and len(args) >= 3:
                name, k, members = args[0], args[1], args[2:]
                if name in policy.witnesses or name in policy.groups or name == "none":
                    raise PolicyError(f"line {number}: name {name!r} defined twice")
                if len(set(members)) != len(members):
                    raise PolicyError(f"line {number}: a member is listed twice")
                for m in members:
                    if m not in policy.witnesses and m not in policy.groups:
                        raise PolicyError(f"line {number}: {m!r} is not defined above")
                n = len(members)
                threshold = {"all": n, "any": 1}.get(k) or (int(k) if k.isdigit() else 0)
                if not 1 <= threshold <= n or (k.isdigit() and k != str(int(k))):
                    raise PolicyError(f"line {number}: threshold {k!r} must be all, any or 1..{n}")
                policy.groups[name] = _Group(threshold, members)
            elif kind == "quorum" and len(args) == 1:
                name = args[0]
                if name != "none" and name not in policy.witnesses and name not in policy.groups:
                    raise PolicyError(f"line {number}: quorum {name!r} is not defined above")
                policy.quorum = name
                quorums += 1
            else:
                raise PolicyError(f"line {number}: cannot read {raw.strip()[:60]!r}")
        except KeyFormatError as exc:
            raise PolicyError(f"line {number}: {exc}") from None
    if quorums != 1:
        raise PolicyError(f"a policy has exactly one quorum line, this one has {quorums}")
    return policy
