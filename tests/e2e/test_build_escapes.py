"""Build escapes, tried on the real platform (`lambdabus up` as processes, offline builds).

Each dependency-file escape is refused at upload (400, nothing stored). Then, on a platform
whose operator allows unsafe requirements on both the gateway and the builder, the same lines
reach uv, and the build sandbox is what stops them: a `git+file:` setup.py cannot touch the
host, `-r /etc/shadow` prints nothing of it, an internal `--index-url` never connects. Last, an
npm `postinstall` tries to write into another function's dependency environment and to read
`/root` and the data dir: every attempt fails, so does the build, and the victim's environment
digest is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lambdabus_events.models import ArtifactManifest
from lambdabus_platform.envdigest import tree_digest
from tests.e2e.conftest import Platform, platform_up
from tests.e2e.helpers import OFFLINE_ENV, WHEELHOUSE, http, status_of, wait_for, wait_running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

NS = "default"
ENTRY = "async def main(request):\n    return {'ok': True}\n"
VICTIM = (
    "import humanize\n\nasync def main(request):\n    return {'words': humanize.intword(1200000)}\n"
)


@dataclass
class Running:
    platform: Platform
    data_dir: Path
    created: list[str] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return self.platform.urls["gateway"]

    def upload(self, name: str, files: dict[str, str], **config: Any) -> tuple[int, Any]:
        return http(
            "POST",
            f"{self.gateway}/v1/namespaces/{NS}/functions",
            {"name": name, "source": {"files": files}, **config},
        )

    def functions(self) -> list[str]:
        status, body = http("GET", f"{self.gateway}/v1/namespaces/{NS}/functions")
        assert status == 200, body
        return [item["name"] for item in body["items"]]

    def build_failed(self, name: str, timeout: float = 90) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = status_of(self.platform, name)
            return st if st.get("image_status") == "error" else None

        st: dict[str, Any] = wait_for(check, timeout, f"{name}'s build to fail")
        return next(c for c in st["conditions"] if c["type"] == "BuildReady")

    def build_log(self, name: str) -> str:
        status, body = http("GET", f"{self.gateway}/v1/namespaces/{NS}/functions/{name}/build/logs")
        assert status == 200, body
        text = body if isinstance(body, str) else json.dumps(body)
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        return "\n".join(str(line.get("line", line)) for line in lines)

    def manifest(self, name: str) -> ArtifactManifest:
        (path,) = (self.data_dir / "builder" / "artifacts" / NS / name).glob("*/manifest.json")
        return ArtifactManifest.model_validate_json(path.read_text())


@contextlib.contextmanager
def running(data_dir: Path, **extra_env: str) -> Iterator[Running]:
    if not WHEELHOUSE.exists():
        pytest.fail("run `make fixtures` first: the examples' dependencies for offline builds")
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed: builds cannot be sandboxed here")
    env = {**OFFLINE_ENV, "LAMBDABUS_BUILDER_SANDBOX": "bubblewrap", **extra_env}
    with platform_up(data_dir, env=env) as platform:
        yield Running(platform, data_dir)
        platform.process.send_signal(signal.SIGTERM)
        platform.process.wait(60)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The platform as shipped: unsafe requirements refused at upload and at build."""
    with running(tmp_path_factory.mktemp("strict") / "state") as platform:
        yield platform


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """An operator who allows unsafe requirements on the gateway and the builder, and builds
    with an index (so the sandbox gets outbound network): only the sandbox stands in the way."""
    with running(
        tmp_path_factory.mktemp("lenient") / "state",
        LAMBDABUS_GATEWAY_ALLOW_UNSAFE_REQUIREMENTS="true",
        LAMBDABUS_BUILDER_ALLOW_UNSAFE_REQUIREMENTS="true",
        LAMBDABUS_BUILDER_NO_INDEX="false",
    ) as platform:
        yield platform


class Listener:
    """A TCP listener on the host's loopback that counts the connections it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may read and write, outside the platform's data dir: so that only
    the sandbox, not file permissions, keeps a build out of it."""
    path = Path(tempfile.mkdtemp(prefix="lambdabus-escape-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def git_repo(path: Path, marker: Path) -> Path:
    """A git repository of a package whose setup.py writes `marker` when it runs."""
    path.mkdir()
    (path / "setup.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('setup.py ran here')\n"
        "from setuptools import setup\n"
        "setup(name='evil', version='1.0')\n"
    )
    for argv in (
        ["git", "init", "-q"],
        ["git", "add", "setup.py"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "evil"],
    ):
        subprocess.run(argv, cwd=path, check=True, capture_output=True)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            os.chmod(os.path.join(dirpath, name), 0o755)
    path.chmod(0o755)
    return path


# -- refused at upload -------------------------------------------------------------------------


def test_escape_lines_are_refused_at_upload_and_nothing_is_stored(
    strict: Running, listener: Listener
) -> None:
    cases = {
        "gitfile": ("git+file:///tmp/repo\n", "VCS requirement"),
        "shadow": ("-r /etc/shadow\n", "-r /etc/shadow"),
        "index": (f"--index-url http://127.0.0.1:{listener.port}/simple\nhumanize\n", "index"),
    }
    for name, (requirements, says) in cases.items():
        status, body = strict.upload(
            name, {"lambda_main.py": ENTRY, "requirements.txt": requirements}
        )
        assert status == 400, body
        assert body["error"]["code"] == "invalid_dependencies"
        assert "requirements.txt:1" in body["error"]["message"]
        assert says in body["error"]["message"]
    assert strict.functions() == []
    assert listener.connections == 0
    assert not list((strict.data_dir / "builder").glob("artifacts/*/*"))


def test_an_empty_or_handlerless_entry_point_is_a_build_error_naming_it(strict: Running) -> None:
    cases = {
        "empty": ("", "lambda_main.py is empty"),
        "nomain": ("def handler(request):\n    return 1\n", "lambda_main.py: defines no main"),
        "broken": ("async def main(request):\n    return = 1\n", "lambda_main.py:2"),
    }
    for name, (source, _) in cases.items():
        status, body = strict.upload(name, {"lambda_main.py": source})
        assert status == 202, body
    for name, (_, says) in cases.items():
        build = strict.build_failed(name)
        assert build["reason"] in ("InvalidSource", "SyntaxError"), build
        assert build["message"].startswith(says), build
        st = status_of(strict.platform, name)
        assert st["status"] == "waiting", st  # never started, so no crash loop
        assert http("DELETE", f"{strict.gateway}/v1/namespaces/{NS}/functions/{name}")[0] == 202


# -- let through by the operator: the sandbox stops them -----------------------------------


def test_a_git_file_setup_py_cannot_touch_the_host(lenient: Running, open_dir: Path) -> None:
    marker = open_dir / "marker"
    repo = git_repo(open_dir / "repo", marker)
    status, body = lenient.upload(
        "gitfile", {"lambda_main.py": ENTRY, "requirements.txt": f"evil @ git+file://{repo}\n"}
    )
    assert status == 202, body
    build = lenient.build_failed("gitfile")
    assert build["reason"] == "DependencyInstallFailed"
    assert not marker.exists()
    assert not list(open_dir.glob("marker*"))
    print(f"\ngit+file: {build['message']}")


def test_r_etc_shadow_shows_nothing_of_it(lenient: Running) -> None:
    status, body = lenient.upload(
        "shadow", {"lambda_main.py": ENTRY, "requirements.txt": "-r /etc/shadow\n"}
    )
    assert status == 202, body
    build = lenient.build_failed("shadow")
    assert build["reason"] == "DependencyInstallFailed"
    log = lenient.build_log("shadow")
    assert "/etc/shadow" in log  # uv says what it could not read ...
    assert "Permission denied" in log or "No such file" in log, log
    secret_lines = [line for line in Path("/etc/shadow").read_text().splitlines() if line.strip()]
    assert secret_lines, "/etc/shadow is empty: nothing to check"
    for line in secret_lines:  # ... and nothing of what it holds
        assert line not in log
        assert line.split(":")[1] not in log or line.split(":")[1] in ("", "*", "!", "!*")
    assert "root:" not in log
    print(f"\n-r /etc/shadow: {build['message']}")


def test_an_internal_index_url_never_connects(lenient: Running, listener: Listener) -> None:
    requirements = (
        f"--index-url http://127.0.0.1:{listener.port}/simple\n"
        f"--extra-index-url http://10.0.2.2:{listener.port}/simple\n"  # slirp's alias of the host
        "lambdabus-internal-only-pkg\n"
    )
    status, body = lenient.upload(
        "index", {"lambda_main.py": ENTRY, "requirements.txt": requirements}
    )
    assert status == 202, body
    build = lenient.build_failed("index", timeout=120)
    assert build["reason"] == "DependencyInstallFailed"
    assert listener.connections == 0
    print(f"\n--index-url 127.0.0.1: {build['message']}")


# -- postinstall against another function's environment ----------------------------------------

ATTACK = """
const fs = require('fs');
const outcomes = [];
function attempt(what, fn) {
  try {
    const got = fn();
    console.log('ESCAPED ' + what + ' ' + String(got).slice(0, 200));
    outcomes.push(true);
  } catch (e) {
    console.log('BLOCKED ' + what + ': ' + (e.code || e.message));
    outcomes.push(false);
  }
}
attempt('write-into-victim-env', () => fs.writeFileSync(VICTIM_ENV + '/evil.pth', 'import os\\n'));
attempt('change-victim-package', () => fs.appendFileSync(VICTIM_FILE, '\\nEVIL = 1\\n'));
attempt('chmod-victim-env', () => fs.chmodSync(VICTIM_ENV, 0o777));
attempt('list-root', () => fs.readdirSync('/root').join(','));
attempt('read-root-file', () => fs.readFileSync('/root/.bashrc', 'utf8'));
attempt('list-data-dir', () => fs.readdirSync(DATA_DIR).join(','));
attempt('read-victim-manifest', () => fs.readFileSync(MANIFEST, 'utf8'));
attempt('read-shadow', () => fs.readFileSync('/etc/shadow', 'utf8'));
if (outcomes.some((escaped) => !escaped)) process.exit(1);
"""


def test_a_postinstall_cannot_change_another_functions_environment(strict: Running) -> None:
    status, body = strict.upload(
        "victim", {"lambda_main.py": VICTIM, "requirements.txt": "humanize==4.12.3\n"}
    )
    assert status == 202, body
    wait_running(strict.platform, "victim")
    manifest = strict.manifest("victim")
    env = Path(manifest.env_dir)
    assert manifest.env_digest == tree_digest(env)
    victim_file = next(env.glob("lib/python3*/site-packages/humanize/__init__.py"))
    manifest_file = next((strict.data_dir / "builder" / "artifacts").rglob("manifest.json"))
    constants = {
        "VICTIM_ENV": str(env),
        "VICTIM_FILE": str(victim_file),
        "DATA_DIR": str(strict.data_dir),
        "MANIFEST": str(manifest_file),
    }
    script = "".join(f"const {k} = {json.dumps(v)};\n" for k, v in constants.items()) + ATTACK
    package = {
        "name": "attacker",
        "version": "1.0.0",
        "attack": script,
        "scripts": {"postinstall": "node -e \"eval(require('./package.json').attack)\""},
    }
    status, body = strict.upload(
        "attacker",
        {"handler.js": "exports.main = () => 1;\n", "package.json": json.dumps(package)},
        runtime="nodejs20",
    )
    assert status == 202, body
    build = strict.build_failed("attacker")
    assert build["reason"] == "DependencyInstallFailed"

    def attack_output() -> str | None:
        text = strict.build_log("attacker")
        return text if "read-shadow" in text else None

    log: str = wait_for(attack_output, 20, "the attack's output in the build log")
    assert "install scripts (postinstall)" in log  # the builder says they run sandboxed
    for what in (
        "write-into-victim-env",
        "change-victim-package",
        "chmod-victim-env",
        "list-root",
        "read-root-file",
        "list-data-dir",
        "read-victim-manifest",
        "read-shadow",
    ):
        assert f"BLOCKED {what}" in log, log
        assert f"ESCAPED {what}" not in log, log
    # the victim's environment is what its build recorded, and it still answers
    assert tree_digest(env) == manifest.env_digest
    assert not (env / "evil.pth").exists()
    assert "EVIL" not in victim_file.read_text()
    status, answer = http("GET", f"{strict.platform.urls['router']}/{NS}/victim")
    assert (status, answer) == (200, {"words": "1.2 million"})
    print("\npostinstall: " + "; ".join(line for line in log.splitlines() if "BLOCKED" in line))
