"""What `lambdabus up` does for NATS, as two one-shot commands for a NATS that runs apart (the
containers of `docker-compose.yml`):

- `python -m lambdabus_platform.natssetup config --dir D`: an nkey per user of `natsauth.USERS`
  (made once, kept after) under `D/credentials/<user>/<user>.nk`, each user's in a directory of
  its own so a container mounts only its own key; and `D/server/nats.conf`, the server config
  with JetStream (`sync_interval: always`) and the `authorization` block (no anonymous access);
  with `--secrets-key F`, the secrets key file too (made once, 0600, by this one process, so
  the gateway and the deployer find it and neither races the other to make it).
- `python -m lambdabus_platform.natssetup declare`: the streams, KV buckets and object store,
  declared as `admin` (LAMBDABUS_NATS_* settings), which no service may do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.natsauth import USERS, render_authorization
from lambdabus_platform.natskeys import UserKey, ensure_keys
from lambdabus_platform.natsserver import render_config
from lambdabus_platform.secretbox import load_or_create_key_file
from lambdabus_platform.settings import NatsSettings

CONFIG_FILE = Path("server") / "nats.conf"


def user_keys_dir(directory: Path, user: str) -> Path:
    """Where `config` puts one user's seed file, alone: `<dir>/credentials/<user>/`."""
    return directory / "credentials" / user


def write_config(
    directory: Path, *, store_dir: Path, host: str, port: int, http_port: int | None
) -> dict[str, UserKey]:
    """Make the users' keys (once) and write the server config; the keys, by user."""
    keys: dict[str, UserKey] = {}
    for user in USERS:
        keys.update(ensure_keys(user_keys_dir(directory, user), [user]))
    config = directory / CONFIG_FILE
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        render_config(
            host=host,
            port=port,
            store_dir=store_dir,
            http_port=http_port,
            authorization=render_authorization({u: k.public_key for u, k in keys.items()}),
        )
    )
    config.chmod(0o644)  # public keys and permissions only: the server's user must read it
    return keys


async def declare(settings: NatsSettings) -> None:
    async with Bus.connect(settings, name="declare") as bus:
        await bus.declare()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lambdabus_platform.natssetup")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="users' keys and the server config")
    config.add_argument("--dir", type=Path, required=True, help="where keys and config go")
    config.add_argument("--store", type=Path, required=True, help="JetStream store directory")
    config.add_argument("--host", default="0.0.0.0", help="address the server listens on")
    config.add_argument("--port", type=int, default=4222)
    config.add_argument("--http-port", type=int, default=None, help="the monitoring port")
    config.add_argument("--secrets-key", type=Path, default=None, help="make this key file")
    commands.add_parser("declare", help="declare streams and buckets as admin (LAMBDABUS_NATS_*)")
    args = parser.parse_args(argv)
    if args.command == "config":
        keys = write_config(
            args.dir,
            store_dir=args.store,
            host=args.host,
            port=args.port,
            http_port=args.http_port,
        )
        print(f"wrote {args.dir / CONFIG_FILE} and the keys of {', '.join(keys)}")
        if args.secrets_key is not None:
            load_or_create_key_file(args.secrets_key)
            print(f"secrets key in {args.secrets_key}")
        return 0
    try:
        asyncio.run(declare(NatsSettings()))
    except LambdabusError as exc:
        print(f"error: cannot declare the NATS streams: {exc}", file=sys.stderr)
        return 1
    print("declared the streams, KV buckets and object store")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
