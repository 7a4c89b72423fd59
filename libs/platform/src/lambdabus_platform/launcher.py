"""`lambdabus up`: the embedded platform on one machine — a nats-server with JetStream (store
under `.lambdabus/`) and the five services, each its own process, supervised.

Ready by their own word: nats-server says "Server is ready", each service logs a `listening`
line once it is connected and serving.

NATS has no anonymous access (see `natsauth`): the launcher declares the streams, KV buckets and
object store once as the `admin` user, whose key no service gets; each service is handed only
its own key (`LAMBDABUS_NATS_NKEY_SEED_FILE`) and inbox prefix, and does not declare. A service
that dies is restarted with back-off; but a port in use stops `up` with one line naming the port
and its setting (checked before start, and again when a service exits with EX_CONFIG, 78).
SIGTERM or SIGINT stops the services (SIGTERM, then SIGKILL after a grace period), then NATS.

`--replicas N` (`LAMBDABUS_UP_REPLICAS`) starts N processes of each service against the one
NATS, each supervised on its own: the first of each keeps the service's configured port, the
others take the next free ports (any free port with `--ephemeral-ports`) and are listed as
`<service>-<n>`; gateway n relays invocations to router n (mod N). Every replica has the id
`<service>-<n>` in the heartbeat registry, kept across its restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.natsserver import NatsServer, NatsServerError, run_nats_server
from lambdabus_platform.procs import die_with_parent
from lambdabus_platform.secretbox import KEY_FILE_NAME

SERVICES: tuple[str, ...] = ("gateway", "router", "builder", "deployer", "logs")
# The only services that hold the secrets key: the gateway seals, the deployer opens.
SECRETS_KEY_HOLDERS = frozenset({"gateway", "deployer"})
ADMIN_TOKEN_FILE = "admin.token"
_NATS_CREDENTIAL_VARS = tuple(
    f"LAMBDABUS_NATS_{name}"
    for name in (
        "URL",
        "USER",
        "PASSWORD",
        "TOKEN",
        "CREDS_FILE",
        "NKEY_SEED_FILE",
        "TLS_",
        "INBOX_PREFIX",
        "DECLARE",
    )
)


class UpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_UP_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".lambdabus"),
        description="NATS store, admin token, secrets key, credentials, service logs (--data-dir)",
    )
    host: str = Field(default="127.0.0.1", description="address every listener binds")
    nats_port: int = Field(default=4222, ge=-1, le=65535, description="-1: a free port")
    gateway_port: int = Field(default=8080, ge=0, le=65535, description="the management API")
    router_port: int = Field(default=8081, ge=0, le=65535, description="where functions answer")
    builder_port: int = Field(default=8082, ge=0, le=65535, description="healthz and metrics")
    deployer_port: int = Field(default=8083, ge=0, le=65535, description="healthz and metrics")
    logs_port: int = Field(default=8084, ge=0, le=65535, description="healthz and metrics")
    renew_admin_token: bool = Field(
        default=False, description="mint a new admin token if <data dir>/admin.token is gone"
    )
    ready_timeout: float = Field(
        default=60.0, gt=0, description="seconds the services have to become ready at start"
    )
    grace_seconds: float = Field(
        default=10.0, gt=0, description="seconds the services have to stop on Ctrl-C"
    )
    max_restart_delay: float = Field(
        default=10.0, gt=0, description="longest back-off before a crashed service restarts"
    )
    replicas: int = Field(
        default=1, ge=1, le=9, description="processes of each service (--replicas)"
    )

    def port(self, service: str) -> int:
        value: int = getattr(self, f"{service}_port")
        return value


@dataclass
class Child:
    service: str
    index: int = 0  # which replica of the service, from 0
    process: asyncio.subprocess.Process | None = None
    url: str | None = None
    port: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0

    @property
    def name(self) -> str:
        """`router` for the first replica, `router-2` for the second..."""
        return self.service if self.index == 0 else f"{self.service}-{self.index + 1}"

    @property
    def replica_id(self) -> str:
        return f"{self.service}-{self.index + 1}"


# A service that cannot start for a reason a restart does not cure (its port is taken) exits
# with this code (sysexits' EX_CONFIG); the launcher stops instead of restarting it.
EXIT_CONFIG = 78


def busy_ports(settings: UpSettings) -> list[str]:
    """One line for each fixed port already in use on the host: the port, its owner, and the
    setting that moves it. Ports 0 (and NATS -1) are picked by the servers and never busy."""
    wanted = [("nats", settings.nats_port)] + [(s, settings.port(s)) for s in SERVICES]
    lines = []
    for owner, port in wanted:
        if port <= 0:
            continue
        host = "127.0.0.1" if owner == "nats" else settings.host
        if port_in_use(host, port):
            lines.append(
                f"error: port {port} ({owner}) is already in use on {host}: set "
                f"LAMBDABUS_UP_{owner.upper()}_PORT to a free port, or run "
                "'lambdabus up --ephemeral-ports'"
            )
    return lines


def extra_ports(settings: UpSettings) -> dict[tuple[str, int], int]:
    """Ports of the replicas after the first, by (service, index): for a service on a fixed
    port, the next ports above every fixed one that are free on the host; 0 (the server picks)
    for a service on port 0."""
    fixed = [settings.port(s) for s in SERVICES if settings.port(s) > 0]
    taken = set(fixed)
    candidate = max(fixed, default=0) + 1
    ports: dict[tuple[str, int], int] = {}
    for index in range(1, settings.replicas):
        for service in SERVICES:
            if settings.port(service) == 0:
                ports[(service, index)] = 0
                continue
            while candidate in taken or port_in_use(settings.host, candidate):
                candidate += 1
                if candidate > 65535:
                    raise LambdabusError("no free port left for the replicas", code="no_port")
            ports[(service, index)] = candidate
            taken.add(candidate)
    return ports


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails because something holds it (as the servers bind:
    SO_REUSEADDR, so a socket in TIME_WAIT does not count)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def _human(line: dict[str, Any]) -> str:
    """One log line for a person: time, service, level, message, extra fields."""
    skip = {"ts", "service", "level", "msg", "logger"}
    extras = " ".join(f"{k}={v}" for k, v in line.items() if k not in skip)
    ts = str(line.get("ts", ""))[11:19]
    return f"{ts} {line.get('service', '?'):<8} {line.get('level', ''):<7} {line.get('msg', '')} {extras}".rstrip()


class Platform:
    def __init__(self, settings: UpSettings, *, out: TextIO, err: TextIO) -> None:
        self.settings = settings
        self.out = out
        self.err = err
        # By name, each service's replicas together: `router`, `router-2`, ...
        self.children = {
            c.name: c for c in (Child(s, i) for s in SERVICES for i in range(settings.replicas))
        }
        self.stopping = asyncio.Event()
        self.logs_dir = settings.data_dir / "logs"
        self.admin_token_path = settings.data_dir / ADMIN_TOKEN_FILE
        self.failure: str | None = None  # why a service cannot start, when no restart helps
        self.stop: asyncio.Event | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def replicas_of(self, service: str) -> list[Child]:
        return [c for c in self.children.values() if c.service == service]

    def env_for(self, child: Child | str, nats: NatsServer) -> dict[str, str]:
        """The environment of a replica (a service's name: its first)."""
        if isinstance(child, str):
            child = self.children[child]
        service = child.service
        # No NATS credentials of ours (or of the caller's environment) but the service's own;
        # the secrets key only for its holders, and only as the path of its 0600 file.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_NATS_CREDENTIAL_VARS) and not k.startswith("LAMBDABUS_SECRETS_")
        }
        if service in SECRETS_KEY_HOLDERS:
            env["LAMBDABUS_SECRETS_KEY_FILE"] = os.environ.get(
                "LAMBDABUS_SECRETS_KEY_FILE", str(self.settings.data_dir.resolve() / KEY_FILE_NAME)
            )
            if "LAMBDABUS_SECRETS_KEY" in os.environ:
                env["LAMBDABUS_SECRETS_KEY"] = os.environ["LAMBDABUS_SECRETS_KEY"]
        env.update(nats.env(service))
        prefix = f"LAMBDABUS_{service.upper()}_"
        env[prefix + "HOST"] = self.settings.host
        # A restarted service keeps the port it had, so the URLs printed at start stay true.
        env[prefix + "PORT"] = str(child.port if child.port else self.settings.port(service))
        # Replicas of a service share its state directory (the local backend's builders and
        # deployers work on one disk).
        env[prefix + "STATE_DIR"] = str(self.settings.data_dir.resolve() / service)
        env[prefix + "REPLICA_ID"] = child.replica_id
        env["PYTHONUNBUFFERED"] = "1"
        routers = self.replicas_of("router")
        router = routers[child.index % len(routers)]
        if service == "gateway" and router.url:
            env["LAMBDABUS_GATEWAY_ROUTER_URL"] = router.url
        if service == "gateway":  # it mints the first admin token, once, into this file
            env["LAMBDABUS_GATEWAY_BOOTSTRAP_TOKEN_FILE"] = str(self.admin_token_path.resolve())
            env["LAMBDABUS_GATEWAY_BOOTSTRAP_RENEW"] = str(self.settings.renew_admin_token).lower()
        return env

    def _admin_token(self) -> str | None:
        try:
            return self.admin_token_path.read_text().strip() or None
        except OSError:
            return None

    def _say_console(self, token_before: str | None) -> None:
        """Where the web console is; with the sign-in link when this start minted the token."""
        gateway = next((c.url for c in self.children.values() if c.service == "gateway"), None)
        if gateway is None:
            return
        self.say(f"console  {gateway}/ui/")
        token = self._admin_token()
        if token is not None and token != token_before:
            self.say(
                f"sign in to the console (this link holds the new admin token and is shown "
                f"this once): {gateway}/ui/#token={token}"
            )

    async def supervise(self, child: Child, nats: NatsServer) -> None:
        delay = 0.5
        log_path = self.logs_dir / f"{child.name}.log"
        while not self.stopping.is_set():
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"lambdabus_{child.service}",
                env=self.env_for(child, nats),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # signals reach it from us only, in order
                preexec_fn=die_with_parent(),  # and it goes if we are killed
            )
            child.process = process
            assert process.stderr is not None
            last = ""
            with log_path.open("a", encoding="utf-8") as log_file:
                while raw := await process.stderr.readline():
                    text = raw.decode(errors="replace").rstrip("\n")
                    log_file.write(text + "\n")
                    log_file.flush()
                    try:
                        line = json.loads(text)
                    except json.JSONDecodeError:
                        print(f"{child.name:<8} {text}", file=self.err, flush=True)
                        continue
                    if not isinstance(line, dict):
                        continue
                    if line.get("exit") == EXIT_CONFIG:
                        last = str(line.get("error") or line.get("msg") or "")
                        continue  # said once, by the launcher, when the process has gone
                    if line.get("event") == "listening" and not child.ready.is_set():
                        child.url = str(line.get("url"))
                        child.port = int(line.get("port") or 0)
                        child.ready.set()
                    if child.index:  # which replica said it
                        line["service"] = child.name
                    print(_human(line), file=self.err, flush=True)
            code = await process.wait()
            child.process = None
            if self.stopping.is_set():
                return
            if code == EXIT_CONFIG:  # it said why; a restart would say it again
                self.failure = self.failure or f"error: {child.name} cannot start: {last}"
                if self.stop is not None:
                    self.stop.set()
                return
            child.ready.clear()
            child.restarts += 1
            print(
                f"{child.name} exited with code {code}; restarting in {delay:.1f}s "
                f"(restart {child.restarts}, log: {log_path})",
                file=self.err,
                flush=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, self.settings.max_restart_delay)

    async def stop_children(self) -> None:
        self.stopping.set()
        running = [
            c.process for c in self.children.values() if c.process and c.process.returncode is None
        ]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if not running:
            return
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(p.wait()) for p in running], timeout=self.settings.grace_seconds
        )
        for process in running:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        for task in pending:
            await task

    async def stop_instances(self, nats: NatsServer) -> None:
        """The deliberate stop of the platform stops the functions too: a deployer's own
        graceful stop leaves its instances running for the next leader (an upgrade)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lambdabus_deployer",
            "--stop-instances",
            env=self.env_for("deployer", nats),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        if process.returncode:
            print(
                f"error: could not stop the function instances: {err.decode(errors='replace')}",
                file=self.err,
                flush=True,
            )

    async def run(self, stop: asyncio.Event) -> int:
        s = self.settings
        self.stop = stop
        busy = busy_ports(s)
        if busy:
            for line in busy:
                print(line, file=self.err, flush=True)
            return 1
        try:
            for (service, index), port in extra_ports(s).items():
                self.children[Child(service, index).name].port = port
        except LambdabusError as exc:
            print(f"error: {exc.message}", file=self.err, flush=True)
            return 1
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            nats_cm = run_nats_server(
                s.data_dir / "nats",
                host="127.0.0.1",  # NATS is for the platform's own processes only
                port=s.nats_port,
                log_path=self.logs_dir / "nats.log",
            )
            server = await nats_cm.__aenter__()
        except NatsServerError as exc:
            print(f"error: nats-server did not start: {exc}", file=self.err, flush=True)
            return 1
        came_up = False
        # The console's sign-in link carries the admin token: printed on the start that mints
        # it (the first, or --renew-admin-token), not on every start.
        token_before = self._admin_token()
        try:
            self.say(f"store    {s.data_dir / 'nats'}")
            self.say(f"nats     {server.url}")
            try:
                await declare(server)
            except LambdabusError as exc:
                print(f"error: cannot declare the NATS streams: {exc}", file=self.err, flush=True)
                return 1
            # The routers first: the gateways relay invocations to them and need their URLs.
            routers = self.replicas_of("router")
            tasks = [asyncio.create_task(self.supervise(r, server)) for r in routers]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(r.ready.wait() for r in routers)), s.ready_timeout
                )
            tasks += [
                asyncio.create_task(self.supervise(c, server))
                for c in self.children.values()
                if c.service != "router"
            ]
            waiting: asyncio.Future[Any] = asyncio.gather(
                *(c.ready.wait() for c in self.children.values())
            )
            stop_wait: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait(
                {waiting, stop_wait}, timeout=s.ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            came_up = waiting in done
            if came_up:
                for child in self.children.values():
                    self.say(f"{child.name:<8} {child.url}")
                if self.admin_token_path.exists():
                    self.say(
                        f"admin token in {self.admin_token_path} (the CLI reads it when run "
                        "here; elsewhere set LAMBDABUS_TOKEN)"
                    )
                self._say_console(token_before)
                self.say("lambdabus is up; Ctrl-C stops it")
            elif not stop.is_set():
                late = [c.name for c in self.children.values() if not c.ready.is_set()]
                print(
                    f"error: not ready after {s.ready_timeout:.0f}s: {', '.join(late)} (logs in {self.logs_dir})",
                    file=self.err,
                    flush=True,
                )
                stop.set()
            await stop.wait()
            waiting.cancel()
            stop_wait.cancel()
            if self.failure is not None:
                print(self.failure, file=self.err, flush=True)
                came_up = False
            self.say("stopping")
            await self.stop_children()
            await self.stop_instances(server)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await nats_cm.__aexit__(None, None, None)
        self.say("stopped")
        return 0 if came_up else 1


async def declare(server: NatsServer) -> None:
    """Streams, KV buckets and the object store, declared (or converged on the current
    settings) once, as `admin`: no service may create, change or delete them."""
    async with Bus.connect(server.settings(), name="launcher") as bus:
        await bus.declare()


def _replica_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of replicas from 1 to 9")
    return value


def main(
    argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    parser = argparse.ArgumentParser(
        prog="lambdabus up", description="Run the whole platform on this machine."
    )
    parser.add_argument("--data-dir", type=Path, help="state directory (default .lambdabus)")
    parser.add_argument(
        "--ephemeral-ports",
        action="store_true",
        help="let every server pick a free port (the URLs are printed once ready)",
    )
    parser.add_argument(
        "--replicas",
        type=_replica_count,
        metavar="N",
        help="run N processes of each service (default 1; LAMBDABUS_UP_REPLICAS)",
    )
    parser.add_argument(
        "--renew-admin-token",
        action="store_true",
        help="the admin token file is lost: mint a new one (the old bootstrap token is revoked)",
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.renew_admin_token:
        overrides["renew_admin_token"] = True
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.replicas is not None:
        overrides["replicas"] = args.replicas
    if args.ephemeral_ports:
        overrides["nats_port"] = -1
        overrides.update({f"{name}_port": 0 for name in SERVICES})
    try:
        settings = UpSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"LAMBDABUS_UP_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        print(f"error: {problems}", file=err or sys.stderr, flush=True)
        return 2
    platform = Platform(settings, out=out or sys.stdout, err=err or sys.stderr)

    async def _main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await platform.run(stop)

    return asyncio.run(_main())


if __name__ == "__main__":
    raise SystemExit(main())
