"""The local build backend on its own: real uv, npm and node, temp directories, no NATS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lambdabus_builder.backend import BuildRequest, BuildResult, LogStream
from lambdabus_builder.errors import BuildFailure
from lambdabus_builder.local import LocalBackend, installed_packages, seal
from lambdabus_builder.settings import BuilderSettings
from lambdabus_events.models import (
    ArtifactManifest,
    FunctionConfig,
    FunctionRecord,
    Runtime,
    SourceRef,
)
from lambdabus_platform.envdigest import tree_digest
from lambdabus_testing.wheels import WheelIndex
from tests.zips import make_zip

HELLO = "import tinydep\n\nasync def main(request):\n    return {'four': tinydep.double(2)}\n"
T0 = datetime(2025, 1, 1, tzinfo=UTC)


class MemoryLog:
    def __init__(self) -> None:
        self.lines: list[tuple[LogStream, str]] = []

    async def write(self, stream: LogStream, line: str) -> None:
        self.lines.append((stream, line))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def request(
    files: dict[str, str | bytes],
    *,
    name: str = "hello",
    uid: str = "u1",
    runtime: Runtime = "python3.11",
    entrypoint: str = "lambda_main.py",
    generation: int = 1,
) -> BuildRequest:
    archive = make_zip(files)
    record = FunctionRecord(
        namespace="default",
        name=name,
        uid=uid,
        generation=generation,
        spec=FunctionConfig(runtime=runtime),
        source=SourceRef(
            sha256=hashlib.sha256(archive).hexdigest(),
            size=len(archive),
            kind="archive",
            entrypoint=entrypoint,
            files=len(files),
        ),
        created_at=T0,
        updated_at=T0,
    )
    return BuildRequest(record, generation, archive)


@pytest.fixture
def settings(tmp_path: Path, wheel_index: WheelIndex) -> BuilderSettings:
    return BuilderSettings(
        state_dir=tmp_path / "builder",
        no_index=True,
        find_links=[str(wheel_index.path)],
        npm_offline=True,
    )


@pytest.fixture
def backend(settings: BuilderSettings) -> LocalBackend:
    return LocalBackend(settings)


async def output(*argv: str, env: dict[str, str] | None = None) -> str:
    """A command's stdout; it must succeed."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


def manifest_of(result: BuildResult) -> ArtifactManifest:
    assert result.artifact.startswith("file:///")
    path = Path(result.artifact.removeprefix("file://"))
    return ArtifactManifest.model_validate_json(path.read_text())


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".partial-" in p.name]


async def test_a_python_build_with_a_requirement(backend: LocalBackend) -> None:
    log = MemoryLog()
    result = await backend.build(
        request({"lambda_main.py": HELLO, "requirements.txt": "tinydep\n"}), log
    )
    assert not result.dependencies_cached
    manifest = manifest_of(result)
    assert (manifest.runtime, manifest.entrypoint, manifest.style) == (
        "python3.11",
        "lambda_main.py",
        "luna",
    )
    code, env = Path(manifest.code_dir), Path(manifest.env_dir)
    assert code == backend.root / "artifacts/default/hello/u1-1/code"
    assert (
        env == backend.root / "envs" / result.deps_key == backend.root / "envs" / manifest.deps_key
    )
    imported = await output(
        str(env / "bin" / "python"), "-c", "import tinydep; print(tinydep.double(21))"
    )
    assert imported == "42"
    # the code is read-only and compiled for the function's interpreter
    assert (code / "lambda_main.py").read_text() == HELLO
    for path in (code, code / "lambda_main.py"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0
    assert list((code / "__pycache__").glob("lambda_main.cpython-311.pyc"))
    # uv's own output is in the log, between the builder's steps
    text = log.text()
    assert "installing requirements.txt with uv pip install" in text
    assert "+ tinydep==1.0.0" in text
    order = [
        next(i for i, (_, line) in enumerate(log.lines) if needle in line)
        for needle in ("installing requirements.txt", "+ tinydep==1.0.0", "ready in", "compiles")
    ]
    assert order == sorted(order)
    assert leftovers(backend.root) == []


async def test_the_same_requirements_use_the_cached_environment(backend: LocalBackend) -> None:
    files: dict[str, str | bytes] = {"lambda_main.py": HELLO, "requirements.txt": "tinydep\n"}
    first = await backend.build(request(files), MemoryLog())
    log = MemoryLog()
    second = await backend.build(request(files, name="other", uid="u2"), log)
    assert second.dependencies_cached
    assert second.deps_key == first.deps_key
    assert ("system", f"using cached dependencies {first.deps_key}") in log.lines
    assert ("system", "reused packages: tinydep==1.0.0") in log.lines
    assert "uv" not in log.text()
    assert manifest_of(second).env_dir == manifest_of(first).env_dir


async def test_an_environment_is_sealed_and_its_digest_recorded(backend: LocalBackend) -> None:
    files: dict[str, str | bytes] = {"lambda_main.py": HELLO, "requirements.txt": "tinydep\n"}
    first = manifest_of(await backend.build(request(files), MemoryLog()))
    env = Path(first.env_dir)
    assert first.env_digest == tree_digest(env)
    assert (env.parent / f"{env.name}.sha256").read_text().strip() == first.env_digest
    for path in [env, *env.rglob("*")]:
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid()), path
        if not path.is_symlink():
            assert stat.S_IMODE(info.st_mode) & 0o222 == 0, path
    # a cache hit takes the recorded digest without hashing the tree again
    second = manifest_of(await backend.build(request(files, name="b", uid="u2"), MemoryLog()))
    assert second.env_digest == first.env_digest
    # an environment without a record (made before digests were kept) gets one on next use
    (env.parent / f"{env.name}.sha256").unlink()
    third = manifest_of(await backend.build(request(files, name="c", uid="u3"), MemoryLog()))
    assert third.env_digest == first.env_digest


async def test_concurrent_builds_of_one_key_install_once(backend: LocalBackend) -> None:
    files: dict[str, str | bytes] = {"lambda_main.py": HELLO, "requirements.txt": "tinydep\n"}
    logs = [MemoryLog() for _ in range(3)]
    results = await asyncio.gather(
        *(
            backend.build(request(files, name=f"fn{i}", uid=f"u{i}"), log)
            for i, log in enumerate(logs)
        )
    )
    assert sorted(r.dependencies_cached for r in results) == [False, True, True]
    installs = sum("installing requirements.txt" in log.text() for log in logs)
    assert installs == 1


async def test_no_requirements_is_an_empty_environment(backend: LocalBackend) -> None:
    log = MemoryLog()
    result = await backend.build(
        request({"handler.py": "def main(e, c):\n    return 1\n"}, entrypoint="handler.py"), log
    )
    manifest = manifest_of(result)
    assert manifest.style == "kyma"
    assert (Path(manifest.env_dir) / "bin" / "python").exists()
    assert ("system", "no requirements to install") in log.lines


async def test_an_uninstallable_requirement_fails_and_leaves_no_environment(
    backend: LocalBackend,
) -> None:
    log = MemoryLog()
    with pytest.raises(BuildFailure) as caught:
        await backend.build(
            request({"lambda_main.py": HELLO, "requirements.txt": "nonexistent-pkg-xyz\n"}), log
        )
    assert caught.value.reason == "DependencyInstallFailed"
    assert "nonexistent-pkg-xyz" in caught.value.message
    assert "uv pip install exited with 1" in caught.value.message
    assert any(s == "stderr" and "nonexistent-pkg-xyz" in line for s, line in log.lines)
    assert list((backend.root / "envs").iterdir()) == []
    assert leftovers(backend.root) == []
    assert not (backend.root / "artifacts/default/hello/u1-1").exists()


async def test_a_syntax_error_names_file_and_line(backend: LocalBackend) -> None:
    source = "import os\n\nx = = 1\n"
    log = MemoryLog()
    with pytest.raises(BuildFailure) as caught:
        await backend.build(request({"lambda_main.py": HELLO, "lib/util.py": source}), log)
    assert caught.value.reason == "SyntaxError"
    assert caught.value.message == "lib/util.py:3: invalid syntax: x = = 1"
    assert ("stderr", "SyntaxError: lib/util.py:3: invalid syntax") in log.lines
    assert ("stderr", "    x = = 1") in log.lines
    assert leftovers(backend.root) == []


async def test_an_archive_that_is_not_a_zip_is_invalid_source(backend: LocalBackend) -> None:
    bad = request({"lambda_main.py": HELLO})
    with pytest.raises(BuildFailure) as caught:
        await backend.build(BuildRequest(bad.record, 1, b"not a zip"), MemoryLog())
    assert caught.value.reason == "InvalidSource"
    missing = request({"other.py": "x = 1\n"})
    with pytest.raises(BuildFailure, match=r"no lambda_main\.py at its root"):
        await backend.build(missing, MemoryLog())
    assert leftovers(backend.root) == []


async def test_a_cancelled_build_kills_its_tool_and_leaves_nothing(
    tmp_path: Path, settings: BuilderSettings
) -> None:
    # an "interpreter" that never answers uv's query holds the build in `uv venv`
    (tmp_path / "py" / "bin").mkdir(parents=True)
    slow = tmp_path / "py" / "bin" / "slow-python"
    seconds = f"60.{os.getpid()}"  # found by its argv: the sandbox may not write a pid file
    slow.write_text(f"#!/bin/sh\nexec sleep {seconds}\n")
    slow.chmod(0o755)
    backend = LocalBackend(settings.model_copy(update={"python": str(slow)}))
    log = MemoryLog()
    task = asyncio.create_task(backend.build(request({"lambda_main.py": HELLO}), log))
    pid = None
    for _ in range(1000):
        pid = _find(b"sleep\0" + seconds.encode() + b"\0")
        if pid is not None:
            break
        await asyncio.sleep(0.01)
    assert pid is not None, log.text()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)
    assert leftovers(backend.root) == []
    assert list((backend.root / "envs").iterdir()) == []


def _find(cmdline: bytes) -> int | None:
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if entry.read_bytes() == cmdline:
                return int(entry.parent.name)
        except OSError:
            continue
    return None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return "zombie"


async def test_forget_keeps_shared_environments_and_other_uids(backend: LocalBackend) -> None:
    files: dict[str, str | bytes] = {"lambda_main.py": HELLO, "requirements.txt": "tinydep\n"}
    old = await backend.build(request(files, uid="old"), MemoryLog())
    new = await backend.build(request(files, uid="new"), MemoryLog())
    await backend.forget("default", "hello", "old")
    assert not Path(manifest_of(new).code_dir).parent.with_name("old-1").exists()
    assert Path(manifest_of(new).code_dir).exists()
    assert Path(manifest_of(new).env_dir).is_dir()
    assert old.deps_key == new.deps_key
    await backend.forget("default", "hello", "new")
    assert not (backend.root / "artifacts/default").exists()
    assert (backend.root / "envs" / new.deps_key).is_dir()


async def test_recover_removes_what_an_interrupted_build_left(backend: LocalBackend) -> None:
    partial = backend.root / "artifacts/ns/fn/u-1.partial-abcd/code"
    partial.mkdir(parents=True)
    (partial / "x.py").write_text("x = 1\n")
    os.chmod(partial, 0o555)
    tmp_env = backend.root / "envs/.tmp-key-abcd"
    tmp_env.mkdir(parents=True)
    done_env = backend.root / "envs/key"
    done_env.mkdir()
    await backend.recover()
    assert leftovers(backend.root) == []
    assert done_env.is_dir()


NPM_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "npm"
MS = "const ms = require('ms');\nexports.main = (e, c) => ({ t: ms('2 days') });\n"


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
@pytest.mark.skipif(not NPM_CACHE.is_dir(), reason="run `make fixtures` first")
async def test_a_node_build_from_the_offline_cache(settings: BuilderSettings) -> None:
    backend = LocalBackend(settings.model_copy(update={"npm_cache": NPM_CACHE}))
    package = {"name": "fn", "version": "1.0.0", "dependencies": {"ms": "2.1.3"}}
    files: dict[str, str | bytes] = {"handler.js": MS, "package.json": json.dumps(package)}
    log = MemoryLog()
    result = await backend.build(request(files, runtime="nodejs20", entrypoint="handler.js"), log)
    manifest = manifest_of(result)
    assert manifest.style == "node"
    modules = Path(manifest.env_dir) / "node_modules"
    ran = await output(
        "node",
        "-e",
        "console.log(require('ms')('1h'))",
        env={**os.environ, "NODE_PATH": str(modules)},
    )
    assert ran == "3600000"
    assert "installing package.json with npm install" in log.text()
    assert manifest.env_digest == tree_digest(manifest.env_dir)
    again = await backend.build(
        request(files, runtime="nodejs20", entrypoint="handler.js", uid="u2"), MemoryLog()
    )
    assert again.dependencies_cached


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
async def test_a_local_tarball_outside_the_build_is_not_visible_even_when_allowed(
    settings: BuilderSettings, npm_tarball: Path
) -> None:
    """The operator setting lets a file: spec through the checks; the build sandbox still
    shows npm nothing of the host outside the build."""
    backend = LocalBackend(settings.model_copy(update={"allow_unsafe_requirements": True}))
    if not (await backend.sandbox()).enabled:
        pytest.skip("no sandbox on this machine")
    npm_tarball.parent.chmod(0o755)  # readable by anyone: only the sandbox hides it
    package = {"name": "fn", "version": "1.0.0", "dependencies": {"tinydep": f"file:{npm_tarball}"}}
    req = request(
        {"handler.js": MS, "package.json": json.dumps(package)},
        runtime="nodejs20",
        entrypoint="handler.js",
    )
    with pytest.raises(BuildFailure) as caught:
        await backend.build(req, MemoryLog())
    assert caught.value.reason == "DependencyInstallFailed"
    assert "ENOENT" in caught.value.message
    assert str(npm_tarball) in caught.value.message


@pytest.mark.parametrize(
    ("requirements", "says"),
    [
        ("-r /etc/shadow\n", "requirements.txt:1: '-r /etc/shadow'"),
        ("tinydep\ngit+file:///tmp/repo\n", "requirements.txt:2: 'git+file:///tmp/repo'"),
        ("--index-url http://127.0.0.1:9/simple\ntinydep\n", "requirements.txt:1"),
    ],
)
async def test_refused_requirements_fail_before_anything_is_installed(
    backend: LocalBackend, requirements: str, says: str
) -> None:
    """The gateway's upload rules, checked again by the builder (defence in depth)."""
    log = MemoryLog()
    with pytest.raises(BuildFailure) as caught:
        await backend.build(
            request({"lambda_main.py": HELLO, "requirements.txt": requirements}), log
        )
    assert caught.value.reason == "InvalidDependencies"
    assert says in caught.value.message
    assert "uv" not in log.text()
    assert not (backend.root / "envs").exists() or list((backend.root / "envs").iterdir()) == []
    assert leftovers(backend.root) == []


async def test_a_refused_package_json_spec_fails_the_build(backend: LocalBackend) -> None:
    package = {"dependencies": {"x": "git+file:///tmp/repo"}}
    with pytest.raises(BuildFailure) as caught:
        await backend.build(
            request(
                {"handler.js": "exports.main = () => 1;\n", "package.json": json.dumps(package)},
                runtime="nodejs20",
                entrypoint="handler.js",
            ),
            MemoryLog(),
        )
    assert caught.value.reason == "InvalidDependencies"
    assert "dependencies.x" in caught.value.message


@pytest.mark.parametrize(
    ("entrypoint", "runtime", "content"),
    [
        ("lambda_main.py", "python3.11", ""),
        ("handler.py", "python3.11", "  \n\n\t\n"),
        ("handler.js", "nodejs20", "\n"),
    ],
)
async def test_an_empty_entry_point_is_a_build_error_naming_it(
    backend: LocalBackend, entrypoint: str, runtime: Runtime, content: str
) -> None:
    with pytest.raises(BuildFailure) as caught:
        await backend.build(
            request({entrypoint: content}, runtime=runtime, entrypoint=entrypoint), MemoryLog()
        )
    assert caught.value.reason == "InvalidSource"
    assert caught.value.message.startswith(f"{entrypoint} is empty")
    assert leftovers(backend.root) == []


async def test_an_entry_point_without_main_is_a_build_error(backend: LocalBackend) -> None:
    with pytest.raises(BuildFailure) as caught:
        await backend.build(
            request({"lambda_main.py": "async def handler(request):\n    return 1\n"}),
            MemoryLog(),
        )
    assert caught.value.reason == "InvalidSource"
    assert caught.value.message.startswith("lambda_main.py: defines no main function")
    # any binding of main will do: an import, an assignment
    for source in ("from os import path as main\n", "def f(): pass\nmain = f\n"):
        await backend.build(request({"lambda_main.py": source}, uid=f"u{len(source)}"), MemoryLog())


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_a_node_syntax_error(backend: LocalBackend) -> None:
    req = request(
        {"handler.js": "exports.main = (e, c) => {\n  return 1\n};;; )\n"},
        runtime="nodejs20",
        entrypoint="handler.js",
    )
    log = MemoryLog()
    with pytest.raises(BuildFailure) as caught:
        await backend.build(req, log)
    assert caught.value.reason == "SyntaxError"
    assert caught.value.message.startswith("handler.js:3: SyntaxError: Unexpected token ')'")
    assert any(line.endswith("handler.js:3") for _, line in log.lines)


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
@pytest.mark.skipif(not NPM_CACHE.is_dir(), reason="run `make fixtures` first")
async def test_an_offline_node_build_cannot_change_the_shared_npm_cache(
    settings: BuilderSettings, tmp_path: Path
) -> None:
    """The build gets a private copy of the cache: its content files are links to the shared
    ones, which stay the platform's and read-only to the build."""
    shared = tmp_path / "npm-cache"
    shutil.copytree(NPM_CACHE, shared)
    os.chmod(tmp_path, 0o755)
    before = {p: p.read_bytes() for p in shared.rglob("*") if p.is_file()}
    backend = LocalBackend(settings.model_copy(update={"npm_cache": shared}))
    if not (await backend.sandbox()).enabled:
        pytest.skip("no sandbox on this machine: an unsandboxed build uses the cache itself")
    attack = (
        "const fs=require('fs'),path=require('path');"
        "function walk(d){for(const n of fs.readdirSync(d)){const p=path.join(d,n);"
        "if(fs.lstatSync(p).isDirectory())walk(p);"
        "else{try{fs.writeFileSync(p,'poisoned');console.log('WROTE '+p)}"
        "catch(e){console.log('BLOCKED '+e.code)}}}}"
        "walk('/tmp/npm-cache/_cacache/content-v2')"
    )
    package = {
        "name": "fn",
        "version": "1.0.0",
        "dependencies": {"ms": "2.1.3"},
        "attack": attack,
        "scripts": {"postinstall": "node -e \"eval(require('./package.json').attack)\""},
    }
    log = MemoryLog()
    await backend.build(
        request(
            {"handler.js": MS, "package.json": json.dumps(package)},
            runtime="nodejs20",
            entrypoint="handler.js",
        ),
        log,
    )
    if (await backend.sandbox()).switch_uid:  # as root: the content files are not the build's
        assert "BLOCKED EACCES" in log.text()
        assert "WROTE" not in log.text()
    after = {p: p.read_bytes() for p in shared.rglob("*") if p.is_file()}
    for path, content in before.items():
        if "content-v2" in str(path):
            assert after[path] == content, path


def test_an_environment_swapped_for_a_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    """A build owns the dir that holds its env: an install script can replace `env` with a
    link to a host dir. Sealing it would chown that dir to us and make it read-only."""
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "file").write_text("x")
    (host_dir / "file").chmod(0o644)
    env = tmp_path / "stage" / "env"
    env.parent.mkdir()
    env.symlink_to(host_dir)
    with pytest.raises(BuildFailure, match="with a symlink") as caught:
        seal(env)
    assert caught.value.reason == "DependencyInstallFailed"
    assert stat.S_IMODE((host_dir / "file").stat().st_mode) == 0o644
    assert stat.S_IMODE(host_dir.stat().st_mode) & 0o200


def test_installed_packages_of_python_and_node_environments(tmp_path: Path) -> None:
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / "humanize-4.9.0.dist-info").mkdir(parents=True)
    (site / "Tiny_Dep-1.0.0.dist-info").mkdir()
    modules = tmp_path / "node_modules"
    for name, version in (("ms", "2.1.3"), ("@scope/pkg", "0.1.0")):
        (modules / name).mkdir(parents=True)
        (modules / name / "package.json").write_text(
            f'{{"name": "{name}", "version": "{version}"}}'
        )
    (modules / "broken").mkdir()
    (modules / "broken" / "package.json").write_text("{")
    assert installed_packages(tmp_path) == [
        "@scope/pkg@0.1.0",
        "humanize==4.9.0",
        "ms@2.1.3",
        "Tiny_Dep==1.0.0",
    ]
    assert installed_packages(tmp_path / "nothing") == []
