"""`lambdabus up` and NATS credentials: keys made at first start (0600) and reused after, each
service process handed its own key and nothing else, NATS on loopback with no anonymous
access. (That the services work with their least permissions is what every other e2e test
shows: they all run under `lambdabus up`.)"""

from __future__ import annotations

import contextlib
import re
import socket
from pathlib import Path

import pytest

from tests.e2e.conftest import SERVICES, Platform, platform_up, stop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SEED_VARS = ("LAMBDABUS_NATS_NKEY_SEED_FILE", "LAMBDABUS_NATS_CREDS_FILE")


def service_environments(platform: Platform) -> dict[str, dict[str, str]]:
    """The environment of each service process below `lambdabus up`, by service."""
    found: dict[str, dict[str, str]] = {}
    for pid in platform.descendants():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            module = next((a.decode() for a in argv if a.startswith(b"lambdabus_")), None)
            if module is None or module.removeprefix("lambdabus_") not in SERVICES:
                continue
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
            found[module.removeprefix("lambdabus_")] = env
    return found


def public_keys(data_dir: Path) -> list[str]:
    return re.findall(r'nkey: "(U[A-Z0-9]+)"', (data_dir / "nats" / "nats.conf").read_text())


def test_each_service_gets_its_own_key_and_keys_are_reused(data_dir: Path) -> None:
    # The caller's own NATS credentials never reach a service.
    env = {"LAMBDABUS_NATS_USER": "operator", "LAMBDABUS_NATS_PASSWORD": "hunter2"}
    with platform_up(data_dir, env=env) as platform:
        environments = service_environments(platform)
        assert set(environments) == set(SERVICES)
        for service, service_env in environments.items():
            seed = Path(service_env["LAMBDABUS_NATS_NKEY_SEED_FILE"])
            assert seed.name == f"{service}.nk"
            assert service_env["LAMBDABUS_NATS_INBOX_PREFIX"] == f"_INBOX_{service}"
            assert service_env["LAMBDABUS_NATS_DECLARE"] == "false"
            assert "LAMBDABUS_NATS_USER" not in service_env
            assert "LAMBDABUS_NATS_PASSWORD" not in service_env
        credentials = data_dir / "nats" / "credentials"
        assert credentials.stat().st_mode & 0o777 == 0o700
        for seed in credentials.iterdir():
            assert seed.stat().st_mode & 0o777 == 0o600
        config = (data_dir / "nats" / "nats.conf").read_text()
        assert "no_auth_user" not in config
        assert 'listen: "127.0.0.1:' in config

        host, port = platform.urls["nats"].removeprefix("nats://").rsplit(":", 1)
        assert host == "127.0.0.1"
        with socket.create_connection((host, int(port)), timeout=5) as anonymous:
            anonymous.recv(4096)  # INFO
            anonymous.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
            answer = anonymous.recv(4096)
        assert b"Authorization Violation" in answer
        first_keys = public_keys(data_dir)
        assert len(first_keys) == len(SERVICES) + 2  # and the auditor and the admin
        code, left = stop(platform)
        assert (code, left) == (0, set())

    with platform_up(data_dir) as again:  # the second start uses the same keys
        assert public_keys(data_dir) == first_keys
        assert stop(again)[0] == 0
