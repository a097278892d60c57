"""Ed25519 signer and verifier keys in the C2SP signed-note text encodings.

Spec: https://c2sp.org/signed-note (v1.0.0) "Verifier keys", and the signer encoding of
``golang.org/x/mod/sumdb/note``, so that our keys load unchanged in Go's ``note.NewSigner`` /
``note.NewVerifier`` and theirs in ours::

    verifier key  <name>+<hex key id>+<base64(0x01 || 32-byte public key)>
    signer key    PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || 32-byte seed)>
    key id        SHA-256(<name> || 0x0A || 0x01 || public key)[:4], big-endian uint32

``cryptography`` is imported on first use (the ``proofs`` extra), never by ``import coworker``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from coworker.exceptions import ConfigError

__all__ = [
    "ALG_ED25519",
    "KeyFormatError",
    "Signer",
    "Verifier",
    "generate_signer",
    "is_valid_name",
    "key_id",
    "load_signer",
    "load_verifier",
    "parse_signer",
    "parse_verifier",
    "write_signer",
]

ALG_ED25519: Final = 0x01
"""Signature type byte of Ed25519 note signatures."""

_PRIVATE_PREFIX: Final = "PRIVATE+KEY+"


class KeyFormatError(ConfigError):
    """A key string or key file is malformed or does not match its key id."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - the proofs extra is missing
        raise ConfigError(
            "signed checkpoints need the 'cryptography' package: "
            "pip install 'coworker-otel[proofs]'"
        ) from exc
    return ed25519


def is_valid_name(name: str) -> bool:
    """A key name: non-empty, no Unicode space and no ``+`` (signed-note "Format")."""
    return bool(name) and "+" not in name and not any(_is_space(c) for c in name)


def _is_space(c: str) -> bool:
    # Go's unicode.IsSpace: White_Space property; Python's str.isspace() is close but also
    # counts U+001C..U+001F, which are control characters and refused in notes anyway.
    return c.isspace() or unicodedata.category(c) == "Zs"


def key_id(name: str, alg: int, public: bytes) -> int:
    """``SHA-256(name || 0x0A || alg || public)[:4]`` as a big-endian integer."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public).digest()
    return int.from_bytes(digest[:4], "big")


def _b64decode(text: str) -> bytes:
    # Strict standard base64 (RFC 4648 section 4), padding required, no whitespace.
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise KeyFormatError("not valid base64") from None
    if base64.b64encode(raw).decode() != text:
        raise KeyFormatError("not canonical base64")
    return raw


def _parse_id(text: str) -> int:
    if len(text) != 8 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise KeyFormatError(f"key id {text!r} is not 8 hex digits")
    return int(text, 16)


@dataclass(frozen=True)
class Verifier:
    """A public Ed25519 note key: checks signatures by ``(name, key_id)``.

    Attributes:
        name: the key name (for a log: its origin).
        key_id: the 32-bit key id.
        public: the 32-byte Ed25519 public key.
    """

    name: str
    key_id: int
    public: bytes
    _key: Any = field(default=None, compare=False, repr=False)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """``True`` when ``signature`` (64 bytes) is a valid Ed25519 signature of ``message``."""
        from cryptography.exceptions import InvalidSignature

        key = self._key or _crypto().Ed25519PublicKey.from_public_bytes(self.public)
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    @property
    def text(self) -> str:
        """The verifier key string ``<name>+<hex id>+<base64(0x01 || public)>``."""
        encoded = base64.b64encode(bytes([ALG_ED25519]) + self.public).decode()
        return f"{self.name}+{self.key_id:08x}+{encoded}"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Signer:
    """A private Ed25519 note key.

    Attributes:
        name: the key name (for a log: its origin).
        key_id: the 32-bit key id.
        seed: the 32-byte Ed25519 private seed (RFC 8032).
    """

    name: str
    key_id: int
    seed: bytes = field(repr=False)
    _key: Any = field(default=None, compare=False, repr=False)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        key = self._key or _crypto().Ed25519PrivateKey.from_private_bytes(self.seed)
        return bytes(key.sign(message))

    @property
    def verifier(self) -> Verifier:
        """The matching public key."""
        from cryptography.hazmat.primitives import serialization

        key = self._key or _crypto().Ed25519PrivateKey.from_private_bytes(self.seed)
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return Verifier(self.name, self.key_id, public)

    @property
    def text(self) -> str:
        """The signer key string ``PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>``."""
        encoded = base64.b64encode(bytes([ALG_ED25519]) + self.seed).decode()
        return f"{_PRIVATE_PREFIX}{self.name}+{self.key_id:08x}+{encoded}"


def _split_key(text: str, what: str) -> tuple[str, int, bytes]:
    parts = text.split("+", 2)  # base64 may contain "+"; name and id may not
    if len(parts) != 3:
        raise KeyFormatError(f"{what} must be NAME+KEYID+KEY, got {len(parts)} part(s)")
    name, hex_id, encoded = parts
    if not is_valid_name(name):
        raise KeyFormatError(f"{what}: {name!r} is not a valid key name")
    kid = _parse_id(hex_id)
    raw = _b64decode(encoded)
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise KeyFormatError(f"{what}: not an Ed25519 key (type byte 0x01 and 32 key bytes)")
    return name, kid, raw[1:]


def parse_verifier(text: str) -> Verifier:
    """Parse a verifier key string; the key id must match the name and key.

    Raises:
        KeyFormatError: malformed, not Ed25519, or the key id does not match.
    """
    name, kid, public = _split_key(text.strip(), "verifier key")
    if key_id(name, ALG_ED25519, public) != kid:
        raise KeyFormatError(f"verifier key {name}+{kid:08x}: the key id does not match the key")
    key = _crypto().Ed25519PublicKey.from_public_bytes(public)
    return Verifier(name, kid, public, key)


def parse_signer(text: str) -> Signer:
    """Parse a signer key string; the key id must match the derived public key.

    Raises:
        KeyFormatError: malformed, not Ed25519, or the key id does not match.
    """
    text = text.strip()
    if not text.startswith(_PRIVATE_PREFIX):
        raise KeyFormatError("a signer key starts with PRIVATE+KEY+")
    name, kid, seed = _split_key(text[len(_PRIVATE_PREFIX) :], "signer key")
    key = _crypto().Ed25519PrivateKey.from_private_bytes(seed)
    signer = Signer(name, kid, seed, key)
    if key_id(name, ALG_ED25519, signer.verifier.public) != kid:
        raise KeyFormatError(f"signer key {name}+{kid:08x}: the key id does not match the key")
    return signer


def generate_signer(name: str) -> Signer:
    """A new random Ed25519 signer named ``name``.

    Raises:
        KeyFormatError: ``name`` is not a valid key name.
    """
    if not is_valid_name(name):
        raise KeyFormatError(f"{name!r} is not a valid key name (non-empty, no spaces, no '+')")
    seed = os.urandom(32)
    key = _crypto().Ed25519PrivateKey.from_private_bytes(seed)
    public = Signer(name, 0, seed, key).verifier.public
    return Signer(name, key_id(name, ALG_ED25519, public), seed, key)


def write_signer(path: str | os.PathLike[str], signer: Signer, *, force: bool = False) -> Path:
    """Write the signer key to ``path`` (mode 0600, created exclusively unless ``force``)
    and the verifier key to ``path.pub``; return the ``.pub`` path.

    Raises:
        KeyFormatError: the file exists (and not ``force``) or cannot be written.
    """
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise KeyFormatError(
            f"{target} exists; refusing to overwrite a key (use --force)"
        ) from None
    except OSError as exc:
        raise KeyFormatError(f"cannot write {target}: {exc}") from None
    with os.fdopen(fd, "w") as fh:
        # O_CREAT's mode is masked by the umask and ignored for an existing file: set it.
        os.fchmod(fh.fileno(), 0o600)
        fh.write(signer.text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    pub = target.with_name(target.name + ".pub")
    pub.write_text(signer.verifier.text + "\n")
    return pub


def load_signer(path: str | os.PathLike[str]) -> Signer:
    """Read a signer key file; refuse one that others can read.

    Raises:
        KeyFormatError: missing, malformed, or readable by group/others.
    """
    target = Path(path)
    try:
        mode = target.stat().st_mode
        text = target.read_text()
    except OSError as exc:
        raise KeyFormatError(f"cannot read key file {target}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFormatError(
            f"key file {target} is readable by others (mode {mode & 0o777:o}); chmod 600"
        )
    return parse_signer(text)


def load_verifier(spec: str | os.PathLike[str]) -> Verifier:
    """A verifier key from its string or from a file holding it (e.g. ``KEYFILE.pub``).

    Raises:
        KeyFormatError: neither a valid key string nor a readable file with one.
    """
    text = os.fspath(spec)
    if not Path(text).is_file():
        return parse_verifier(text)
    try:
        content = Path(text).read_text()
    except OSError as exc:
        raise KeyFormatError(
            f"{text!r} is neither a verifier key nor a readable file: {exc}"
        ) from None
    return parse_verifier(content)
