"""An attacker function tries to escape its sandbox, on the whole platform (`lambdabus up`, a
real nats-server, the deployer's real sandbox): from inside an instance of `attacker/probe`,
reaching NATS, the gateway, the other services' ports, the victim's instance (`victim/vault`,
which holds an env var) through its socket, the victim's files, the data dir and /root, and
seeing or signalling other processes. Each attempt is its own test.

The attacker gets the host-side facts (ports, paths, pids) from this test and reports what each
attempt gave: "ok"/"connected", or the errno name it failed with.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from lambdabus_platform.sandbox import DEFAULT_UID_BASE, DEFAULT_UID_COUNT, identity_for
from tests.e2e.conftest import SERVICES, Platform
from tests.e2e.helpers import cmdline, http, offline_platform, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

VICTIM_SECRET = "victim-env-value-7d1f"
VICTIM_PASSWORD = "victim-secret-value-3c9a"

VICTIM = {
    "lambda_main.py": (
        "import os\n"
        "\n"
        "async def main(request):\n"
        "    return {\n"
        "        'token': os.environ.get('VAULT_TOKEN'),\n"
        "        'password': os.environ.get('VAULT_PASSWORD'),\n"
        "        'file': open('/secrets/db/password').read(),\n"
        "        'uid': os.getuid(),\n"
        "    }\n"
    )
}

ATTACKER = {
    "lambda_main.py": """
import errno, os, signal, socket


def attempt(action):
    try:
        result = action()
    except socket.timeout:
        return "timed out"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc))
    return "ok" if result is None else result


def tcp(host, port):
    with socket.create_connection((host, port), timeout=2):
        return "connected"


def unix(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(path)
        return "connected"


def read(path):
    with open(path, "rb") as f:
        f.read(1)


def listdir(path):
    return sorted(os.listdir(path))


def kill(pid):
    os.kill(pid, signal.SIGKILL)


ACTIONS = {"tcp": tcp, "unix": unix, "read": read, "listdir": listdir, "kill": kill}


def main(request):
    plan = request.json or {}
    results = {name: attempt(lambda: ACTIONS[kind](*args)) for name, (kind, *args) in plan.items()}
    results["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    results["uid"] = os.getuid()
    results["env_has_victim_secret"] = any(
        "victim-env-value" in v or "victim-secret-value" in v for v in os.environ.values()
    )
    return results
"""
}

REFUSED = ("ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "ECONNRESET", "timed out")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "isolation")


def deploy(platform: Platform, ns: str, name: str, files: dict[str, str], **config: Any) -> None:
    status, body = http(
        "POST",
        f"{platform.urls['gateway']}/v1/namespaces/{ns}/functions",
        {"name": name, "source": {"files": files}, **config},
    )
    assert status == 202, body


def wait_running(platform: Platform, ns: str, name: str, timeout: float = 120) -> None:
    def check() -> bool:
        _, st = http(
            "GET", f"{platform.urls['gateway']}/v1/namespaces/{ns}/functions/{name}/status"
        )
        if st.get("image_status") == "error" or st.get("status") == "terminated":
            raise AssertionError(f"{ns}/{name} failed: {st}")
        return bool(st.get("status") == "running")

    wait_for(check, timeout, f"{ns}/{name} running")


def runtime_pids(function: str) -> list[int]:
    """Host pids of the instances of `function` (ns/name)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = cmdline(int(entry.name)).split(b"\0")
            if b"lambdabus_runtime" in argv and function.encode() in argv:
                pids.append(int(entry.name))
    return pids


def idle_pool_runtimes() -> list[int]:
    """Pre-started runtimes not yet any function's (`--pool` on their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = cmdline(int(entry.name)).split(b"\0")
            if b"lambdabus_runtime" in argv[:3] and b"--pool" in argv:
                pids.append(int(entry.name))
    return pids


def host_addresses() -> list[str]:
    """This machine's own non-loopback IPv4 addresses (the services may listen on them)."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False
    ).stdout
    addresses = [line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line]
    return [a for a in addresses if not a.startswith("127.")]


def host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.fixture(scope="module")
def attack(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Deploy the victim and the attacker, hand the attacker the host's facts, run it once."""
    status, body = http(
        "POST",
        f"{platform.urls['gateway']}/v1/namespaces/victim/secrets",
        {"name": "db", "data": {"password": VICTIM_PASSWORD}},
    )
    assert status == 201, body
    deploy(
        platform,
        "victim",
        "vault",
        VICTIM,
        env={"VAULT_TOKEN": VICTIM_SECRET},
        secrets=["db"],
        env_from={"VAULT_PASSWORD": {"secret": "db", "key": "password"}},
    )
    # A first function of the attacker's kind makes the pool of pre-started runtimes that the
    # attacker's instance is then made of (the sandbox must hold for those too).
    deploy(platform, "attacker", "warmup", {"lambda_main.py": "def main(request):\n    return 1\n"})
    wait_running(platform, "attacker", "warmup")
    wait_for(idle_pool_runtimes, 60, "a pre-started runtime in the pool")
    deploy(platform, "attacker", "probe", ATTACKER, timeout=60)
    wait_running(platform, "victim", "vault")
    wait_running(platform, "attacker", "probe")
    router = platform.urls["router"]
    victim_sees = http("POST", f"{router}/victim/vault", {})[1]
    assert victim_sees["token"] == VICTIM_SECRET
    assert victim_sees["password"] == victim_sees["file"] == VICTIM_PASSWORD

    victim_pids = wait_for(lambda: runtime_pids("victim/vault"), 30, "the victim's instance")
    attacker_pids = wait_for(lambda: runtime_pids("attacker/probe"), 30, "the attacker")
    victim_uid = host_uid(victim_pids[0])
    state = data_root(platform)
    victim_files = sorted(state.rglob("artifacts/victim/vault/*/code/lambda_main.py"))
    assert victim_files, "the victim's code is on the host"
    scratch = sorted(state.rglob("instances/vault-*"))
    assert scratch, "the victim's scratch dir is on the host"
    sockets = [
        p for p in Path("/run/lambdabus").glob("*/*/sock") if p.parent.stat().st_uid == victim_uid
    ] or sorted(Path("/run/lambdabus").glob("*/*/sock"))
    assert sockets, "the victim's socket is on the host"

    plan: dict[str, list[Any]] = {}
    for service in (*SERVICES, "nats"):
        port = urlsplit(platform.urls[service]).port
        assert port is not None
        plan[f"{service}@loopback"] = ["tcp", "127.0.0.1", port]
        plan[f"{service}@slirp-host"] = ["tcp", "10.0.2.2", port]
        for address in host_addresses():
            plan[f"{service}@{address}"] = ["tcp", address, port]
    for i, path in enumerate(sockets):
        plan[f"victim_socket{i}"] = ["unix", str(path)]
    plan["victim_code"] = ["read", str(victim_files[0])]
    plan["victim_scratch"] = ["listdir", str(scratch[0])]
    plan["data_dir"] = ["listdir", str(state)]
    plan["root_home"] = ["listdir", "/root"]
    plan["victim_secret_file"] = ["read", "/secrets/db/password"]
    plan["secrets_dir"] = ["listdir", "/secrets"]
    plan["repo"] = ["listdir", str(Path(__file__).resolve().parents[2])]
    plan["shadow"] = ["read", "/etc/shadow"]
    plan["kill_victim"] = ["kill", victim_pids[0]]
    plan["kill_deployer"] = ["kill", deployer_pid(platform)]

    status, answer = http("POST", f"{router}/attacker/probe", plan, timeout=120)
    assert status == 200, answer
    seen: dict[str, Any] = answer
    print("attack results:", {k: v for k, v in seen.items() if k != "pids"})
    seen["_victim_pids"] = victim_pids
    seen["_victim_uid"] = victim_uid
    seen["_attacker_uid"] = host_uid(attacker_pids[0])
    # Started from the pool: the runtime rewrote its command line with --function first.
    argv = cmdline(attacker_pids[0]).split(b"\0")
    seen["_attacker_pooled"] = argv[3:5] == [b"--function", b"attacker/probe"]
    seen["_plan"] = plan
    return seen


def data_root(platform: Platform) -> Path:
    """The platform's data dir (`up --data-dir`), from its command line."""
    argv = cmdline(platform.process.pid).split(b"\0")
    return Path(argv[argv.index(b"--data-dir") + 1].decode()).resolve()


def deployer_pid(platform: Platform) -> int:
    return next(p for p in platform.descendants() if b"lambdabus_deployer" in cmdline(p))


def attempts(seen: dict[str, Any], prefix: str) -> dict[str, Any]:
    found = {k: v for k, v in seen.items() if k.startswith(prefix)}
    assert found, f"no attempt named {prefix}*"
    return found


@pytest.mark.parametrize("service", ["nats", "gateway"])
def test_the_attacker_cannot_reach_nats_or_the_gateway(
    attack: dict[str, Any], service: str
) -> None:
    for name, result in attempts(attack, f"{service}@").items():
        assert result in REFUSED, name


@pytest.mark.parametrize("service", ["router", "builder", "deployer", "logs"])
def test_the_attacker_cannot_reach_the_other_services(attack: dict[str, Any], service: str) -> None:
    for name, result in attempts(attack, f"{service}@").items():
        assert result in REFUSED, name


def test_the_attacker_cannot_reach_the_victims_instance(attack: dict[str, Any]) -> None:
    for name, result in attempts(attack, "victim_socket").items():
        assert result in ("ENOENT", "EACCES", "ECONNREFUSED"), name


def test_the_attacker_cannot_read_the_victims_files(attack: dict[str, Any]) -> None:
    assert attack["victim_code"] == "ENOENT"
    assert attack["victim_scratch"] == "ENOENT"
    assert not attack["env_has_victim_secret"]


def test_the_attacker_cannot_read_the_victims_secret(attack: dict[str, Any]) -> None:
    assert attack["victim_secret_file"] == "ENOENT"
    assert attack["secrets_dir"] == "ENOENT"  # it uses no secret: nothing is mounted
    assert not attack["env_has_victim_secret"]


def test_the_attacker_cannot_see_the_data_dir_or_the_repo(attack: dict[str, Any]) -> None:
    assert attack["data_dir"] == "ENOENT"
    assert attack["repo"] == "ENOENT"


def test_the_attacker_cannot_read_root_or_host_secrets(attack: dict[str, Any]) -> None:
    # At most the Python installation its virtualenv runs on is there (read-only).
    assert attack["root_home"] in ("ENOENT", [".pyenv"])
    assert attack["shadow"] == "EACCES"


def test_the_attacker_cannot_see_or_signal_other_processes(
    attack: dict[str, Any], platform: Platform
) -> None:
    assert max(attack["pids"]) < 10  # its own pid namespace
    assert attack["kill_victim"] == "ESRCH"
    assert attack["kill_deployer"] == "ESRCH"
    assert all(Path(f"/proc/{pid}").exists() for pid in attack["_victim_pids"])
    router = platform.urls["router"]
    assert http("POST", f"{router}/victim/vault", {})[1]["token"] == VICTIM_SECRET


def test_attacker_and_victim_are_different_unprivileged_users_on_the_host(
    attack: dict[str, Any],
) -> None:
    if os.geteuid() != 0:
        pytest.skip("without root, every instance runs as the platform's own user")
    assert attack["_attacker_uid"] != 0
    assert attack["_victim_uid"] != 0
    assert attack["_attacker_uid"] != attack["_victim_uid"]
    # Its own uid from the sandbox range: the function's when its instance started afresh, or
    # that of the pre-started runtime it was made of (one per runtime, never another function's).
    fresh = identity_for("attacker/probe", DEFAULT_UID_BASE, DEFAULT_UID_COUNT).uid
    assert attack["_attacker_uid"] == attack["uid"]
    assert attack["_attacker_pooled"]  # the warm-up made the pool it was taken from
    assert attack["uid"] != fresh  # the pre-started runtime's own uid
    assert DEFAULT_UID_BASE <= attack["uid"] < DEFAULT_UID_BASE + DEFAULT_UID_COUNT
