"""docker-compose.yml, checked without a Docker engine: parsed, held against the settings of
each service (every variable a real setting, every value valid, ports and paths in step), the
local backend's builder, deployer and router on one disk and one loopback, NATS credentials
per service as `natsauth` grants them; and the compose file's own one-shot `init` and
`nats-declare` commands run for real against a nats-server started with the config `init`
writes, each service then connecting with the key its container mounts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from lambdabus_builder.settings import BuilderSettings
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_gateway.settings import GatewaySettings
from lambdabus_logs.settings import LogsSettings
from lambdabus_platform import natssetup
from lambdabus_platform.bus import Bus
from lambdabus_platform.launcher import SECRETS_KEY_HOLDERS, SERVICES
from lambdabus_platform.natsauth import inbox_prefix
from lambdabus_platform.natsserver import find_binary
from lambdabus_platform.replicas import REPLICAS_BUCKET, Heartbeat
from lambdabus_platform.settings import NatsSettings, ServiceSettings
from lambdabus_router.settings import RouterSettings

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SETTINGS: dict[str, type[ServiceSettings]] = {
    "gateway": GatewaySettings,
    "router": RouterSettings,
    "builder": BuilderSettings,
    "deployer": DeployerSettings,
    "logs": LogsSettings,
}
LOCAL_BACKEND = ("builder", "deployer", "router")  # one disk, one loopback


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def env_of(compose: dict[str, Any], name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (services(compose)[name].get("environment") or {}).items()}


def mounts(compose: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Each volume of a service in the long form: type, source, target, subpath."""
    out = []
    for entry in services(compose)[name].get("volumes", []):
        if isinstance(entry, str):
            source, target, *_ = entry.split(":")
            out.append({"type": "volume", "source": source, "target": target, "subpath": None})
        else:
            out.append({**entry, "subpath": (entry.get("volume") or {}).get("subpath")})
    return out


def mount_of(compose: dict[str, Any], name: str, path: str) -> tuple[str, str, str]:
    """(volume, path inside the volume, mount target) of `path` in service `name`'s container."""
    best = max(
        (
            m
            for m in mounts(compose, name)
            if path == m["target"] or path.startswith(m["target"] + "/")
        ),
        key=lambda m: len(m["target"]),
        default=None,
    )
    assert best is not None, f"{path} of {name} is on no volume"
    inside = str(Path(best["subpath"] or "") / Path(path).relative_to(best["target"]))
    return best["source"], inside, best["target"]


def known_variables(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings class reads, nested settings classes included."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = set()
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            names |= known_variables(annotation)
        else:
            names.add((prefix + name).upper())
    return names


def test_every_service_runs_its_module_once_after_the_streams_are_declared(
    compose: dict[str, Any],
) -> None:
    defined = services(compose)
    for service in SERVICES:
        spec = defined[service]
        assert spec["command"] == ["python", "-m", f"lambdabus_{service}"]
        assert spec["depends_on"]["nats-declare"] == {"condition": "service_completed_successfully"}
    assert defined["nats-declare"]["command"][-1] == "declare"
    assert defined["nats"]["depends_on"]["init"] == {"condition": "service_completed_successfully"}
    assert set(compose["volumes"]) >= {
        m["source"] for s in defined for m in mounts(compose, s) if m["type"] == "volume"
    }


@pytest.mark.parametrize("service", SERVICES)
def test_every_variable_is_a_setting_of_its_service_with_a_valid_value(
    compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(compose, service)
    cls = SETTINGS[service]
    unknown = set(env) - known_variables(cls)
    assert unknown == set(), f"{service}: no such settings: {sorted(unknown)}"
    for name in list(os.environ):
        if name.startswith("LAMBDABUS_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = cls()  # raises on a value the service would refuse at start
    assert settings.host == "0.0.0.0"
    # the NATS user of the service: its own key, mounted alone, its own inbox, no declaring
    nats = settings.nats
    assert nats.url == "nats://nats:4222"
    assert nats.inbox_prefix == inbox_prefix(service)
    assert nats.declare is False
    assert nats.nkey_seed_file is not None
    volume, inside, _ = mount_of(compose, service, str(nats.nkey_seed_file))
    key_dir = natssetup.user_keys_dir(Path("."), service)
    assert (volume, inside) == ("nats-config", str(key_dir / f"{service}.nk"))
    # the secrets key: for its holders only
    holds = any(m["source"] == "secrets" for m in mounts(compose, service))
    assert holds == (service in SECRETS_KEY_HOLDERS)
    assert ("LAMBDABUS_SECRETS_KEY_FILE" in env) == (service in SECRETS_KEY_HOLDERS)


def _settings(compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in list(os.environ):
        if name.startswith("LAMBDABUS_"):
            monkeypatch.delenv(name)
    for name, value in env_of(compose, service).items():
        monkeypatch.setenv(name, value)
    return SETTINGS[service]()


def test_the_local_backend_shares_one_disk_and_one_loopback(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    defined = services(compose)
    builder = _settings(compose, "builder", monkeypatch)
    deployer = _settings(compose, "deployer", monkeypatch)
    router = _settings(compose, "router", monkeypatch)
    # the deployer's namespace is the builder's and the router's: instances on its loopback
    assert defined["builder"]["network_mode"] == "service:deployer"
    assert defined["router"]["network_mode"] == "service:deployer"
    assert "network_mode" not in defined["deployer"]
    ports = {builder.port, deployer.port, router.port}
    assert len(ports) == 3, "three listeners in one network namespace need three ports"
    # environments the builder writes are where the deployer reads them, at the same path
    build_volume, build_inside, build_target = mount_of(compose, "builder", str(builder.state_dir))
    assert mount_of(compose, "deployer", str(builder.state_dir)) == (
        build_volume,
        build_inside,
        build_target,
    )
    # the instances' Unix sockets are where the router connects to them
    sockets = str(deployer.sockets_dir)
    assert mount_of(compose, "router", sockets) == mount_of(compose, "deployer", sockets)
    assert mount_of(compose, "deployer", str(deployer.state_dir))[0] == build_volume
    # root, as the local backend runs instances under uids of their own
    for service in LOCAL_BACKEND:
        assert defined[service]["user"] == "0:0"
    assert defined["deployer"]["privileged"] is True
    assert deployer.sandbox == "bubblewrap"
    assert builder.sandbox == "bubblewrap"


def test_published_ports_are_the_services_ports(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    defined = services(compose)
    gateway = _settings(compose, "gateway", monkeypatch)
    router = _settings(compose, "router", monkeypatch)
    assert (gateway.port, router.port) == (8080, 8081)
    assert defined["gateway"]["ports"] == [f"{gateway.port}:{gateway.port}"]
    # the router listens in the deployer's namespace: its port is published there
    assert f"{router.port}:{router.port}" in defined["deployer"]["ports"]
    assert "ports" not in defined["router"]
    assert gateway.router_url == f"http://deployer:{router.port}"
    assert gateway.public_router_url == f"http://localhost:{router.port}"


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@contextlib.asynccontextmanager
async def nats_with(config: Path) -> AsyncIterator[str]:
    """nats-server on the given config, ready by its own word; its client URL."""
    process = await asyncio.create_subprocess_exec(
        find_binary(), "-c", str(config), stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    port = None
    try:
        async with asyncio.timeout(20):
            while line := await process.stderr.readline():
                if b"Listening for client connections on" in line:
                    port = int(line.rsplit(b":", 1)[1])
                if b"Server is ready" in line:
                    break
        assert port is not None, "nats-server did not start"
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()


async def test_init_and_declare_run_and_each_service_connects_with_its_mounted_key(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    defined = services(compose)
    command = defined["init"]["command"]
    assert command[:4] == ["python", "-m", "lambdabus_platform.natssetup", "config"]
    # init's own arguments, its directories moved under tmp_path and its port made free
    keys_dir = Path(_flag(command, "--dir"))
    assert mount_of(compose, "init", str(keys_dir)) == ("nats-config", ".", str(keys_dir))
    secrets_key = Path(_flag(command, "--secrets-key"))
    assert mount_of(compose, "init", str(secrets_key))[0] == "secrets"
    args = command[3:]
    args[args.index("--dir") + 1] = str(tmp_path / "nats-config")
    args[args.index("--store") + 1] = str(tmp_path / "data" / "jetstream")
    args[args.index("--port") + 1] = "-1"
    args[args.index("--http-port") + 1] = "-1"
    args[args.index("--secrets-key") + 1] = str(tmp_path / "secrets" / "secrets.key")
    assert natssetup.main([*args, "--host", "127.0.0.1"]) == 0
    assert (tmp_path / "secrets" / "secrets.key").stat().st_mode & 0o777 == 0o600
    # the server's config is where the nats container reads it
    server = defined["nats"]
    config_in_container = Path(_flag(server["command"], "-c"))
    volume, inside, _ = mount_of(compose, "nats", str(config_in_container))
    assert (volume, inside) == ("nats-config", str(natssetup.CONFIG_FILE))
    assert mount_of(compose, "nats", "/data/jetstream")[0] == "nats-data"

    async with nats_with(tmp_path / "nats-config" / natssetup.CONFIG_FILE) as url:

        def as_user(service: str) -> NatsSettings:
            env = env_of(compose, service)
            seed = Path(env["LAMBDABUS_NATS_NKEY_SEED_FILE"])
            _, inside, _ = mount_of(compose, service, str(seed))
            return NatsSettings(
                url=url,
                nkey_seed_file=tmp_path / "nats-config" / inside,
                inbox_prefix=env["LAMBDABUS_NATS_INBOX_PREFIX"],
                connect_wait_seconds=5,
            )

        await natssetup.declare(as_user("nats-declare"))
        for service in SERVICES:
            async with Bus.connect(as_user(service), name=service) as bus:
                await Heartbeat(bus.kv(REPLICAS_BUCKET), service, "compose", interval=1).beat()
        async with Bus.connect(as_user("gateway"), name="gateway") as bus:
            beats = await bus.kv(REPLICAS_BUCKET).values(">")
        assert {e.key for e in beats} == {f"{s}.compose" for s in SERVICES}
