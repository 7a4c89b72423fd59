"""Secrets at rest: AES-256-GCM under one platform key, shared by the gateway (writes) and the
deployer (reads); no other service ever holds the key.

A sealed value is `v1:` + base64(nonce ‖ ciphertext ‖ tag). The associated data is the
secret's identity (`<namespace>/<name>`), so a ciphertext copied onto another secret's key does
not decrypt. The key comes from a setting (base64 of 32 bytes) or from a key file that the first
process to need it creates (0600, linked into place atomically: two processes racing never make
two keys, and nobody ever reads a half-written one).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.settings import SecretsSettings

KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = b"v1:"
KEY_FILE_NAME = "secrets.key"


class SecretKeyError(LambdabusError):
    """The secrets key is missing, malformed or not the one the data was sealed with."""

    status = 500
    code = "secrets_key"


@dataclass(frozen=True)
class SecretBox:
    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise SecretKeyError(f"the secrets key must be {KEY_BYTES} bytes")

    def __repr__(self) -> str:  # never print the key
        return "SecretBox(<key>)"

    def seal(self, plaintext: bytes, identity: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self.key).encrypt(nonce, plaintext, identity.encode())
        return PREFIX + base64.b64encode(nonce + sealed)

    def open(self, sealed: bytes, identity: str) -> bytes:
        """The plaintext; SecretKeyError when the key or the identity is not the sealing one."""
        if not sealed.startswith(PREFIX):
            raise SecretKeyError(f"secret {identity}: not a sealed value")
        try:
            raw = base64.b64decode(sealed[len(PREFIX) :], validate=True)
            return AESGCM(self.key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], identity.encode())
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretKeyError(
                f"secret {identity} cannot be decrypted: the secrets key is not the one it was "
                "stored with (check LAMBDABUS_SECRETS_KEY / LAMBDABUS_SECRETS_KEY_FILE)"
            ) from None


def parse_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise SecretKeyError("the secrets key is not base64") from None
    if len(key) != KEY_BYTES:
        raise SecretKeyError(f"the secrets key must be base64 of {KEY_BYTES} bytes")
    return key


def load_or_create_key_file(path: Path) -> bytes:
    """The key in `path`; created (0600) if missing. Safe against concurrent first starts:
    the key is written to a private temporary file (O_EXCL) and hard-linked into place, which
    fails if another process got there first; then everyone reads the one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SecretKeyError(
            f"the secrets key file {path} is readable by others (mode {mode:o}); chmod 600 it"
        )
    return parse_key(path.read_text())


def open_secret_box(settings: SecretsSettings, data_dir: Path) -> SecretBox:
    """The box from the settings: the key itself, else the key file (created when missing;
    `secrets.key` in `data_dir` unless a path is set)."""
    if settings.key is not None:
        return SecretBox(parse_key(settings.key.get_secret_value()))
    return SecretBox(load_or_create_key_file(settings.key_file or data_dir / KEY_FILE_NAME))
