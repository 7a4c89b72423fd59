"""NATS user keys on disk: one nkey seed file per user (`<dir>/<user>.nk`, mode 0600, the
directory 0700), made at first start and reused after. The server config holds only the public
keys (`natsauth.render_authorization`); each service is handed only its own seed file.

nkeys rather than passwords: the seed never leaves the client (the server sends a nonce, the
client signs it), nats.conf holds no secret at all, and every NATS client library and the
`nats` CLI take a seed file as it is.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nkeys


class NatsKeyError(RuntimeError):
    pass


@dataclass(frozen=True)
class UserKey:
    user: str
    seed_file: Path
    public_key: str


def _public_key(seed: bytes) -> str:
    pair = nkeys.from_seed(bytearray(seed))
    try:
        return bytes(pair.public_key).decode()
    finally:
        pair.wipe()


def seed_file(directory: Path, user: str) -> Path:
    return directory / f"{user}.nk"


def ensure_keys(directory: Path, users: Iterable[str]) -> dict[str, UserKey]:
    """The key of each user, made (random, 0600) if its seed file does not exist yet."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    keys: dict[str, UserKey] = {}
    for user in users:
        path = seed_file(directory, user)
        if not path.exists():
            seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
            # O_EXCL: never overwrite a seed another process wrote meanwhile.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(bytes(seed) + b"\n")
        path.chmod(0o600)
        raw = path.read_bytes().strip()
        try:
            public = _public_key(raw)
        except Exception as exc:
            raise NatsKeyError(f"{path} does not hold a NATS user nkey seed: {exc!r}") from exc
        keys[user] = UserKey(user, path, public)
    return keys
