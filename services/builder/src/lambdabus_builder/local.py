"""The local build backend: a directory per build on this machine, beside a dependency
environment shared by every build with the same dependencies.

Under the builder's state dir:
- `envs/<deps_key>/`: a virtualenv made by `uv venv` and filled by `uv pip install`, or a
  `node_modules` tree made by `npm install`, in the build sandbox (`buildbox`). Made in
  `envs/.tmp-<key>-<token>/env` (beside the build's scratch dir), sealed (the platform's,
  read-only) and renamed into place, so an environment that exists is complete and immutable;
  one per key at a time (a lock per key). `envs/<deps_key>.sha256` is its tree digest, recorded
  when it was sealed and copied into every manifest that uses it.
- `artifacts/<ns>/<name>/<uid>-<generation>/`: `code/` (the unpacked source, compiled in the
  sandbox, then sealed) and `manifest.json`, made as `<uid>-<generation>.partial-<token>/` and
  renamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import uv

from lambdabus_builder import process
from lambdabus_builder.backend import BuildLog, BuildRequest, BuildResult
from lambdabus_builder.buildbox import (
    BUILD_DIR,
    PATH,
    SCRATCH,
    TOOLS_DIR,
    build_step,
    install_prefix,
    network_env,
)
from lambdabus_builder.errors import BuildFailure
from lambdabus_builder.luna import install_luna_files, replaced_line
from lambdabus_builder.plan import (
    DEPENDENCY_FILES,
    NODE_LOCKFILE,
    Style,
    artifact_dir,
    dependency_bytes,
    deps_key,
    entrypoint_hint,
    env_dir,
    handler_of,
    lists_requirements,
    node_syntax_error,
    syntax_error_message,
    tail_message,
)
from lambdabus_builder.settings import BuilderSettings
from lambdabus_events.models import (
    ArtifactManifest,
    FunctionConfig,
    FunctionRecord,
    Runtime,
    command_path,
)
from lambdabus_platform.archive import ArchiveLimits, extract_archive
from lambdabus_platform.dependencies import (
    DEPENDENCY_FILE_LIMITS,
    DependencyError,
    check_dependency_files,
    lifecycle_scripts,
)
from lambdabus_platform.envdigest import tree_digest
from lambdabus_platform.errors import ArchiveError, PayloadTooLarge
from lambdabus_platform.sandbox import (
    NetworkMode,
    Sandbox,
    detect_sandbox,
    install_egress_rules,
)

logger = logging.getLogger("lambdabus.builder.local")
_CHECKER = Path(__file__).with_name("compilecheck.py")
_EXPORT_CHECKER = Path(__file__).with_name("exportcheck.js")
EXPORT_CHECK_SECONDS = 20  # loading a Node module runs its top level: bounded
_TMP_ENV = ".tmp-"
_PARTIAL = ".partial-"
_DIGEST = ".sha256"


class LocalBackend:
    """`BuildBackend` on the local disk (see the module docstring for the layout)."""

    def __init__(self, settings: BuilderSettings) -> None:
        self._settings = settings
        self._root = settings.state_dir.resolve()
        self._uv = uv.find_uv_bin()
        self._limits = ArchiveLimits(
            max_entries=settings.max_archive_entries,
            max_uncompressed=settings.max_uncompressed_bytes,
        )
        self._env_locks: dict[str, asyncio.Lock] = {}
        self._box: Sandbox | None = None
        self._box_lock = asyncio.Lock()

    @property
    def root(self) -> Path:
        return self._root

    def env_lock(self, key: str) -> asyncio.Lock:
        """Held while this process makes the environment `key` (or the collector removes it)."""
        return self._env_locks.setdefault(key, asyncio.Lock())

    async def sandbox(self) -> Sandbox:
        """The build sandbox of this machine, detected at first use."""
        async with self._box_lock:
            if self._box is None:
                box = await detect_sandbox(
                    self._settings.sandbox, setting="LAMBDABUS_BUILDER_SANDBOX"
                )
                if not box.enabled:
                    logger.warning("builds run UNSANDBOXED", extra={"reason": box.reason})
                elif box.outbound:
                    # builds with an index get outbound network: not to link-local addresses
                    # (cloud metadata) nor to this host's own addresses either
                    firewall = await install_egress_rules(box)
                    logger.info("egress rules for sandboxed builds", extra={"result": firewall})
                self._box = box
            return self._box

    async def recover(self) -> None:
        def clean() -> None:
            envs = self._root / "envs"
            for leftover in envs.glob(f"{_TMP_ENV}*") if envs.is_dir() else ():
                remove_tree(leftover)
            for leftover in self._root.glob(f"artifacts/*/*/*{_PARTIAL}*"):
                remove_tree(leftover)

        await asyncio.to_thread(clean)

    async def forget(self, namespace: str, name: str, uid: str) -> None:
        def remove() -> None:
            function_dir = self._root / "artifacts" / namespace / name
            for build in function_dir.glob(f"{uid}-*"):
                remove_tree(build)
            for empty in (function_dir, function_dir.parent):
                with contextlib.suppress(OSError):
                    empty.rmdir()

        await asyncio.to_thread(remove)

    async def adopt(
        self, record: FunctionRecord, generation: int, artifact: str
    ) -> BuildResult | None:
        """An earlier build's code linked (hard links: it is sealed, read-only) into this
        build's artifact directory, with a manifest of its own, sharing its environment: the
        earlier function may be deleted (and its artifact with it) while this one runs."""
        if not artifact.startswith("file://"):
            return None
        path = Path(artifact.removeprefix("file://"))
        final = artifact_dir(self._root, record.namespace, record.name, record.uid, generation)

        def link() -> BuildResult | None:
            try:
                manifest = ArtifactManifest.model_validate_json(path.read_bytes())
            except (OSError, ValueError):
                return None
            if (manifest.runtime, manifest.entrypoint, manifest.source_sha256) != (
                record.spec.runtime,
                record.source.entrypoint,
                record.source.sha256,
            ):
                return None
            code, env = Path(manifest.code_dir), Path(manifest.env_dir)
            touch_env(env)
            if not code.is_dir() or not env.is_dir():
                return None
            if path == final / "manifest.json":
                return BuildResult(artifact, True, manifest.deps_key)
            work = final.with_name(f"{final.name}{_PARTIAL}{secrets.token_hex(4)}")
            try:
                work.mkdir(parents=True)
                shutil.copytree(code, work / "code", symlinks=True, copy_function=_link_or_copy)
                mine = manifest.model_copy(update={"code_dir": str(final / "code")})
                (work / "manifest.json").write_text(mine.model_dump_json(indent=2) + "\n")
                seal(work / "code")
                if final.exists():
                    remove_tree(final)
                work.rename(final)
            except (OSError, shutil.Error, BuildFailure):
                remove_tree(work)
                return None
            return BuildResult(f"file://{final / 'manifest.json'}", True, manifest.deps_key)

        return await asyncio.to_thread(link)

    async def build(self, request: BuildRequest, log: BuildLog) -> BuildResult:
        record = request.record
        runtime = record.spec.runtime
        final = artifact_dir(
            self._root, record.namespace, record.name, record.uid, request.generation
        )
        work = final.with_name(f"{final.name}{_PARTIAL}{secrets.token_hex(4)}")
        code = work / "code"
        try:
            await log.write("system", f"unpacking the source ({len(request.archive)} bytes)")
            custom = runtime == "custom"
            entrypoint = command_path(record.spec.command) if custom else record.source.entrypoint
            try:
                style: Style
                if custom:
                    style, function = "custom", "main"
                else:
                    style, function = handler_of(runtime, entrypoint, record.spec.handler)
                await asyncio.to_thread(extract_archive, request.archive, code, self._limits)
            except (ArchiveError, PayloadTooLarge, ValueError) as exc:
                raise BuildFailure(
                    "InvalidSource", f"the source archive cannot be used: {exc}"
                ) from exc
            entry = code / entrypoint
            if entry.is_symlink() or not entry.is_file():
                raise BuildFailure(
                    "InvalidSource",
                    f"the archive has no {entrypoint} "
                    + ("(the program command[0] names)" if custom else "at its root"),
                )
            if _blank(entry):
                raise BuildFailure(
                    "InvalidSource",
                    f"{entrypoint} is empty: it must define the function's "
                    f"handler ({entrypoint_hint(style)})",
                )
            # -- LUNA's reserved files, Kyma's build preset
            if style == "luna":
                replaced = await asyncio.to_thread(install_luna_files, code)
                if replaced:
                    await log.write("system", replaced_line(replaced))
            await log.write("system", build_preset_line(record.spec))
            if record.spec.user_docker_commands:
                await log.write(
                    "system",
                    f"user_docker_commands ({len(record.spec.user_docker_commands)}) are run "
                    "by the kubernetes backend's image build only: not run here",
                )
            # --
            await self._check_dependencies(runtime, code, log)
            key = deps_key(runtime, self._dependency_bytes(runtime, code))
            env, cached, digest = await self._environment(runtime, key, code, log)
            if custom:
                # Any file may be the program (a PATCH may name another one): all executable.
                await log.write("system", f"custom program {entrypoint}: files made executable")
                await asyncio.to_thread(make_executable, code)
            else:
                await log.write("system", f"checking that {entrypoint} compiles")
            if runtime == "nodejs20":
                await self._check_node(code, entrypoint, log)
                if function != "main":
                    await self._check_node_export(code, entrypoint, work, env, log, function)
            elif not custom:
                await self._check_python(code, entrypoint, work, log, function)
            manifest = ArtifactManifest(
                runtime=runtime,
                entrypoint=entrypoint,
                style=style,
                code_dir=str(final / "code"),
                env_dir=str(env),
                source_sha256=record.source.sha256,
                deps_key=key,
                env_digest=digest,
                function=function,
            )
            (work / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
            await asyncio.to_thread(seal, code)
            if final.exists():  # a build of this generation interrupted after its rename
                await asyncio.to_thread(remove_tree, final)
            work.rename(final)
        except BaseException:
            await _discard(work)
            raise
        return BuildResult(f"file://{final / 'manifest.json'}", cached, key)

    # -- dependencies ---------------------------------------------------------------------

    async def _check_dependencies(self, runtime: Runtime, code: Path, log: BuildLog) -> None:
        """The gateway's upload rules again, before anything is installed."""
        files = {name: _read(code / name) for name in DEPENDENCY_FILE_LIMITS}
        try:
            check_dependency_files(
                runtime, files, allow_unsafe=self._settings.allow_unsafe_requirements
            )
        except DependencyError as exc:
            raise BuildFailure("InvalidDependencies", exc.message) from exc
        package = files.get("package.json")
        if runtime == "nodejs20" and package is not None:
            scripts = lifecycle_scripts(package)
            if scripts:
                await log.write(
                    "system",
                    f"package.json has install scripts ({', '.join(scripts)}): they run inside "
                    "the build sandbox, which sees only this build's directory",
                )

    @staticmethod
    def _dependency_bytes(runtime: Runtime, code: Path) -> bytes:
        if not DEPENDENCY_FILES[runtime]:
            return b""
        manifest = _read(code / DEPENDENCY_FILES[runtime])
        lockfile = _read(code / NODE_LOCKFILE) if runtime == "nodejs20" else None
        return dependency_bytes(runtime, manifest, lockfile)

    async def _environment(
        self, runtime: Runtime, key: str, code: Path, log: BuildLog
    ) -> tuple[Path, bool, str]:
        """The environment for `key`, whether it was there already, and its digest."""
        env = env_dir(self._root, key)
        touch_env(env)  # before looking: the garbage collector keeps what was touched
        if env.is_dir():
            await log.write("system", f"using cached dependencies {key}")
            await _log_reused(env, log)
            return env, True, await asyncio.to_thread(recorded_digest, env)
        async with self.env_lock(key):
            touch_env(env)
            if env.is_dir():  # another build made it while this one waited
                await log.write("system", f"using cached dependencies {key}")
                await _log_reused(env, log)
                return env, True, await asyncio.to_thread(recorded_digest, env)
            env.parent.mkdir(parents=True, exist_ok=True)
            stage = env.with_name(f"{_TMP_ENV}{key}-{secrets.token_hex(4)}")
            tmp = stage / "env"
            started = time.monotonic()
            try:
                steps = await self._steps(f"build/{key}", stage, log)
                if runtime == "nodejs20":
                    await self._node_env(tmp, code, log, steps)
                else:
                    await self._python_env(tmp, code, log, steps, install=runtime != "custom")
                await asyncio.to_thread(seal, tmp)
                try:
                    tmp.rename(env)
                except OSError:
                    if not env.is_dir():
                        raise
                    # another builder process made it first: this one is discarded below
            finally:
                await _discard(stage)
            touch_env(env)
            digest = await asyncio.to_thread(recorded_digest, env)
            await log.write(
                "system",
                f"dependencies {key} ready in {time.monotonic() - started:.2f} s ({digest})",
            )
            return env, False, digest

    async def _steps(self, key: str, stage: Path, log: BuildLog, inside: str = BUILD_DIR) -> _Steps:
        """How this build runs its tools: in the sandbox as the uid of `key` (the staging dir,
        seen as `inside`, and a scratch dir made its own), or on the host when there is no
        sandbox here."""
        box = await self.sandbox()
        scratch = stage / "scratch"
        stage.mkdir()
        scratch.mkdir()
        if not box.enabled:
            await log.write(
                "system",
                f"warning: the build runs without a sandbox ({box.reason}); its install "
                "scripts run with the builder's rights",
            )
            return _Steps(None, key, stage, scratch, str(stage))
        identity = box.identity(key)
        for path in (stage, scratch):
            os.chown(path, identity.uid, identity.gid)
        return _Steps(box, key, stage, scratch, inside, trust=self._settings.trust_env)

    async def _python_env(
        self, tmp: Path, code: Path, log: BuildLog, steps: _Steps, *, install: bool = True
    ) -> None:
        s = self._settings
        python = _resolve(s.python)
        common = ["--no-config", "--color", "never", "--no-python-downloads"]
        uv_bin = self._uv
        tool_env: dict[str, str] = {}
        local_links = [link for link in s.find_links if _is_local(link)]
        read_only = [*filter(None, [install_prefix(python)]), *map(_local_path, local_links)]
        files: dict[str, str] = {}
        if steps.sandboxed:
            uv_bin = f"{TOOLS_DIR}/uv"
            files[uv_bin] = str(Path(self._uv).resolve())
            tool_env["UV_CACHE_DIR"] = f"{SCRATCH}/uv-cache"  # per build: nothing shared
        elif s.uv_cache_dir is not None:
            common += ["--cache-dir", str(s.uv_cache_dir)]
        offline = s.no_index and len(local_links) == len(s.find_links)
        network: NetworkMode = "none" if offline else "outbound"
        await log.write("system", f"creating a virtualenv with {s.python}")
        venv = await steps.run(
            [uv_bin, "venv", *common, "--relocatable", "--python", python, steps.path(tmp)],
            cwd=tmp.parent,
            log=log,
            network=network,
            read_only=read_only,
            files=files,
            env=tool_env,
        )
        if venv.returncode != 0:
            raise BuildFailure(
                "RuntimeUnavailable",
                f"uv venv exited with {venv.returncode}: {tail_message(venv.stderr)}",
            )
        requirements = (_read(code / "requirements.txt") if install else None) or b""
        (tmp / "requirements.txt").write_bytes(requirements)  # what this environment holds
        if not lists_requirements(requirements):
            await log.write("system", "no requirements to install")
            return
        argv = [uv_bin, "pip", "install", *common, "--python", steps.path(tmp / "bin" / "python")]
        if s.index_url is not None:
            argv += ["--index-url", s.index_url]
        for url in s.extra_index_url:
            argv += ["--extra-index-url", url]
        for link in s.find_links:
            argv += ["--find-links", _local_path(link) if _is_local(link) else link]
        if s.no_index:
            argv.append("--no-index")
        if s.compile_bytecode:
            argv.append("--compile-bytecode")
        argv += ["-r", "requirements.txt"]
        await log.write("system", "installing requirements.txt with uv pip install")
        done = await steps.run(
            argv,
            cwd=tmp,
            log=log,
            network=network,
            read_only=read_only,
            files=files,
            env=tool_env,
        )
        if done.returncode != 0:
            raise BuildFailure(
                "DependencyInstallFailed",
                f"uv pip install exited with {done.returncode}: {tail_message(done.stderr)}",
            )

    async def _node_env(self, tmp: Path, code: Path, log: BuildLog, steps: _Steps) -> None:
        s = self._settings
        tmp.mkdir()
        package = _read(code / "package.json")
        if package is None:
            await log.write("system", "no package.json: no dependencies to install")
            (tmp / "node_modules").mkdir()
            return
        (tmp / "package.json").write_bytes(package)
        lock = _read(code / NODE_LOCKFILE)
        if lock is not None:
            (tmp / NODE_LOCKFILE).write_bytes(lock)
        steps.give(tmp, recursive=True)  # npm writes its lockfile and node_modules here
        argv = [s.npm, "install", "--omit=dev", "--no-audit", "--no-fund", "--no-update-notifier"]
        if s.npm_registry is not None:
            argv.append(f"--registry={s.npm_registry}")
        if s.npm_offline:
            argv.append("--offline")
        if steps.sandboxed:
            # npm needs a writable cache: a per-build one, seeded from the configured cache
            # when installing offline (the shared cache itself is never writable by a build)
            cache = steps.scratch / "npm-cache"
            if s.npm_offline and s.npm_cache is not None and s.npm_cache.is_dir():
                # shared content is linked only when the build runs as another uid than ours
                link = steps.box is not None and steps.box.switch_uid
                await asyncio.to_thread(_seed_cache, s.npm_cache.resolve(), cache, link)
            else:
                cache.mkdir()
            steps.give(cache, recursive=True)
            argv.append(f"--cache={SCRATCH}/npm-cache")
        elif s.npm_cache is not None:
            argv.append(f"--cache={s.npm_cache.resolve()}")
        node, npm = _resolve(s.node), _resolve(s.npm)
        read_only = [p for p in (install_prefix(node), install_prefix(npm)) if p is not None]
        await log.write("system", "installing package.json with npm install")
        done = await steps.run(
            argv,
            cwd=tmp,
            log=log,
            network="none" if s.npm_offline else "outbound",
            read_only=read_only,
            env={"PATH": f"{os.path.dirname(node)}:{PATH}", "npm_config_update_notifier": "false"},
        )
        if done.returncode != 0:
            raise BuildFailure(
                "DependencyInstallFailed",
                f"npm install exited with {done.returncode}: {tail_message(done.stderr)}",
            )
        require_real_dir(tmp)  # before anything here follows it
        (tmp / "node_modules").mkdir(exist_ok=True)  # npm makes none for no dependencies

    # -- checks ---------------------------------------------------------------------------

    async def _run_check(
        self,
        name: str,
        checker: Path,
        code: Path,
        work: Path,
        log: BuildLog,
        argv: Callable[[str], list[str]],
        *,
        read_only: list[str],
        env: dict[str, str] | None = None,
        announce: str | None = None,
    ) -> tuple[process.Completed, list[str]]:
        """Run a check tool (`checker`, as `argv(where the tool sees it)`) over `code` in the
        sandbox with no network, staged in `work/<name>`: its exit and its stdout lines (its
        stderr goes to the build log). `announce` is logged just before it runs."""
        lines: list[str] = []

        async def collect(stream: process.Stream, line: str) -> None:
            if stream == "stdout":
                lines.append(line)
            else:
                await log.write(stream, line)

        stage = work / name
        steps = await self._steps(f"{name}/{work.parent.name}", stage, log, inside=str(code))
        try:
            tool = str(checker)
            files: dict[str, str] = {}
            if steps.sandboxed:
                tool = f"{TOOLS_DIR}/{checker.name}"
                files[tool] = str(checker)
                steps.give(code, recursive=True)
            if announce is not None:
                await log.write("system", announce)
            done = await steps.run(
                argv(tool),
                cwd=code,
                log=log,
                network="none",
                read_only=read_only,
                files=files,
                env=env,
                on_line=collect,
                writable=code,
            )
        finally:
            await _discard(stage)
        return done, lines

    async def _check_python(
        self, code: Path, entrypoint: str, work: Path, log: BuildLog, function: str = "main"
    ) -> None:
        """Compile every .py file with the functions' interpreter, in the sandbox and with no
        site packages (nothing an installed package ships runs); the bytecode it writes spares
        the instances compiling at each cold start."""
        python = _resolve(self._settings.python)
        done, lines = await self._run_check(
            "check",
            _CHECKER,
            code,
            work,
            log,
            lambda checker: [python, "-I", "-S", checker, str(code), entrypoint, function],
            read_only=[p for p in (install_prefix(python),) if p is not None],
        )
        if done.returncode == 0:
            return
        try:
            error = json.loads(lines[-1])
            file, line, message = str(error["file"]), error.get("line"), str(error["message"])
            text = error.get("text")
        except (IndexError, ValueError, KeyError, TypeError):
            raise BuildFailure(
                "InternalError",
                f"the compile check exited with {done.returncode}: {tail_message(done.stderr)}",
            ) from None
        summary = syntax_error_message(file, line if isinstance(line, int) else None, message, None)
        await log.write("stderr", f"{error.get('error', 'SyntaxError')}: {summary}")
        if isinstance(text, str) and text.strip():
            await log.write("stderr", "    " + text.rstrip("\r\n"))
            offset = error.get("offset")
            if isinstance(offset, int) and offset > 0:
                await log.write("stderr", "    " + " " * (offset - 1) + "^")
        raise BuildFailure(
            "InvalidSource" if error.get("error") == "NoHandler" else "SyntaxError",
            syntax_error_message(file, line if isinstance(line, int) else None, message, text),
        )

    async def _check_node_export(
        self, code: Path, entrypoint: str, work: Path, env: Path, log: BuildLog, function: str
    ) -> None:
        """Kubeless's `--handler index.helloGet`: load the module in the sandbox (no network,
        its node_modules on NODE_PATH, a time limit) and fail the build when it exports no such
        function, naming what it does export. A module that does not load here is left for the
        instance to report, as before."""
        node = _resolve(self._settings.node)
        done, lines = await self._run_check(
            "exports",
            _EXPORT_CHECKER,
            code,
            work,
            log,
            lambda checker: [
                "timeout",
                str(EXPORT_CHECK_SECONDS),
                node,
                checker,
                str(code),
                entrypoint,
                function,
            ],
            read_only=[p for p in (install_prefix(node), str(env)) if p is not None],
            env={"NODE_PATH": str(env / "node_modules")},
            announce=f"checking that {entrypoint} exports {function}",
        )
        try:
            result = json.loads(lines[-1]) if done.returncode == 0 else None
        except (IndexError, ValueError):
            result = None
        if not isinstance(result, dict) or result.get("ok") is not False:
            if isinstance(result, dict) and result.get("ok") is None:
                await log.write(
                    "system",
                    f"{entrypoint} did not load in the build ({result.get('error')}); "
                    "the instance will report it",
                )
            return
        exported = [str(name) for name in result.get("exports") or []]
        module = entrypoint.rsplit(".", 1)[0].replace("/", ".")
        raise BuildFailure(
            "InvalidSource",
            f"the handler {module}.{function} does not exist: module {module} ({entrypoint}) "
            f"exports no function {function!r}; it exports: {', '.join(exported) or 'nothing'}",
        )

    async def _check_node(self, code: Path, entrypoint: str, log: BuildLog) -> None:
        done = await process.run(
            [self._settings.node, "--check", entrypoint], cwd=code, on_line=log.write
        )
        if done.returncode != 0:
            raise BuildFailure("SyntaxError", node_syntax_error(done.stderr, str(code)))


class _Steps:
    """Runs one build's tools: in the sandbox (`box`) as the uid of `key`, seeing `stage`
    (writable) and `scratch` as /tmp; or on the host when `box` is None."""

    def __init__(
        self,
        box: Sandbox | None,
        key: str,
        stage: Path,
        scratch: Path,
        inside: str,
        *,
        trust: Mapping[str, str] | None = None,
    ) -> None:
        self.trust = trust or {}
        self.box = box
        self.key = key
        self.stage = stage
        self.scratch = scratch
        self.inside = inside  # where the sandbox sees the staging dir

    def path(self, host: Path) -> str:
        """Where a tool sees a host path under the staging dir."""
        if self.box is None or not host.is_relative_to(self.stage):
            return str(host)
        return str(Path(self.inside) / host.relative_to(self.stage))

    @property
    def sandboxed(self) -> bool:
        return self.box is not None

    def give(self, path: Path, *, recursive: bool = False) -> None:
        """Make `path` (and what is under it) the sandbox uid's, so the build may write there.
        Files with more than one link (a seeded cache's shared content) stay the platform's:
        the build may read them, never change them for the next build."""
        if self.box is None or not self.box.switch_uid:
            return
        identity = self.box.identity(self.key)
        os.lchown(path, identity.uid, identity.gid)
        if not recursive:
            return
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames:
                os.lchown(os.path.join(dirpath, name), identity.uid, identity.gid)
            for name in filenames:
                file = os.path.join(dirpath, name)
                if os.lstat(file).st_nlink == 1:
                    os.lchown(file, identity.uid, identity.gid)

    async def run(
        self,
        argv: list[str],
        *,
        cwd: Path,
        log: BuildLog,
        network: NetworkMode,
        read_only: list[str] | None = None,
        files: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        on_line: process.OnLine | None = None,
        writable: Path | None = None,
    ) -> process.Completed:
        if self.box is None:
            return await process.run(argv, cwd=cwd, on_line=on_line or log.write)
        if network != "none":
            trust_env, trust_paths = network_env(self.trust)
            env = {**trust_env, **(env or {})}
            read_only = [*(read_only or ()), *trust_paths]
        spec = build_step(
            argv,
            stage=str(writable or self.stage),
            stage_inside=str(writable) if writable is not None else self.inside,
            scratch=str(self.scratch),
            chdir=self.path(cwd),
            network=network,
            read_only=read_only or (),
            files=files,
            env=env,
        )
        return await process.run_sandboxed(
            self.box, spec, key=self.key, on_line=on_line or log.write
        )


def _resolve(program: str) -> str:
    """The real path of a program (a name is looked up on PATH), for binding it."""
    found = shutil.which(program) if os.sep not in program else program
    return os.path.realpath(found) if found else program


def _is_local(link: str) -> bool:
    return "://" not in link or link.startswith("file://")


def _local_path(link: str) -> str:
    """A find-links dir as uv will be given it (bound at that path: bwrap follows symlinks)."""
    return os.path.abspath(link.removeprefix("file://"))


def installed_packages(env: Path) -> list[str]:
    """The packages an environment holds: `name==version` of each Python distribution
    (`*.dist-info`), `name@version` of each top-level Node package (`node_modules`)."""
    found = set()
    for info in env.rglob("*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        if name and version:
            found.add(f"{name}=={version}")
    modules = env / "node_modules"
    if modules.is_dir():
        for manifest in [*modules.glob("*/package.json"), *modules.glob("@*/*/package.json")]:
            try:
                package = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(package, dict) and package.get("name") and package.get("version"):
                found.add(f"{package['name']}@{package['version']}")
    return sorted(found, key=str.lower)


async def _log_reused(env: Path, log: BuildLog) -> None:
    """The build log of a cached build names the packages it reused."""
    packages = await asyncio.to_thread(installed_packages, env)
    await log.write(
        "system", f"reused packages: {', '.join(packages)}" if packages else "reused no packages"
    )


def _seed_cache(source: Path, dest: Path, link: bool) -> None:
    """A private copy of an npm cache: with `link`, content files (immutable, named by their
    hash) are hard links, the rest (index buckets npm appends to) copied."""

    def copy(src: str, dst: str) -> None:
        if link and f"{os.sep}content-v2{os.sep}" in src:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=copy, symlinks=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _blank(path: Path) -> bool:
    """Whether a file holds nothing but white space."""
    with path.open("rb") as file:
        while chunk := file.read(64 * 1024):
            if chunk.strip():
                return False
    return True


def _read(path: Path, limit: int | None = None) -> bytes | None:
    """A file's bytes (the first `limit` of them), or None if it is not a readable file."""
    try:
        if not path.is_file():
            return None
        with path.open("rb") as file:
            return file.read(-1 if limit is None else limit)
    except OSError:
        return None


async def _discard(path: Path) -> None:
    """Remove a partial result, even while the build is being cancelled."""
    if path.exists():
        await asyncio.shield(asyncio.to_thread(remove_tree, path))


def require_real_dir(root: Path) -> None:
    """The build owned the dir that holds `root` and could have replaced it with a symlink (to
    a host dir the builder would then chown and make read-only) or another file: refuse."""
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode):
        raise BuildFailure(
            "DependencyInstallFailed",
            f"the build replaced its environment directory {root.name!r} with "
            f"{'a symlink' if stat.S_ISLNK(info.st_mode) else 'something else'}; "
            "install scripts may write inside it, never replace it",
        )


def seal(root: Path) -> None:
    """Make a finished environment immutable: owned by this (platform) user, read-only."""
    require_real_dir(root)
    if os.geteuid() == 0:
        uid, gid = os.getuid(), os.getgid()
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, name), uid, gid)
        os.lchown(root, uid, gid)
    make_read_only(root)


def touch_env(env: Path) -> None:
    """Mark an environment used now: the garbage collector leaves it for its grace period."""
    with contextlib.suppress(OSError):
        os.utime(env)


def digest_path(env: Path) -> Path:
    """`envs/<key>.sha256`: the digest recorded when the environment was sealed."""
    return env.with_name(env.name + _DIGEST)


def recorded_digest(env: Path) -> str:
    """The digest recorded for `env`; recorded now (sealing it first) when there is none, for
    an environment made before digests were recorded or by a builder that stopped between the
    rename and the record."""
    path = digest_path(env)
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    seal(env)
    digest = tree_digest(env)
    tmp = path.with_name(f"{_TMP_ENV}{path.name}-{secrets.token_hex(4)}")
    tmp.write_text(digest + "\n")
    tmp.chmod(0o444)
    try:
        os.link(tmp, path)  # never replaces a digest another builder recorded first
    except FileExistsError:
        return path.read_text().strip()
    finally:
        tmp.unlink()
    return digest


def make_executable(root: Path) -> None:
    """chmod a+x every regular file under `root` that its owner can read (runtime custom)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | 0o555)


def make_read_only(root: Path) -> None:
    """chmod a-w everything under `root` (files first, then their directories)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~0o222)
    os.chmod(root, stat.S_IMODE(os.stat(root).st_mode) & ~0o222)


def build_preset_line(spec: FunctionConfig) -> str:
    """The build log's line about the build resources (Kyma's build preset)."""
    res = spec.build_resources
    how = "set in the spec" if "build_resources" in spec.preset_overrides else "the preset's"
    return (
        f"build preset {spec.build_preset}: {res.cpu_request}m/{res.memory_request}Mi requested, "
        f"{res.cpu}m/{res.memory}Mi limit ({how}); kept for a cluster backend: local build "
        "steps are not limited by them"
    )


def remove_tree(root: Path) -> None:
    """Remove a tree, read-only parts included."""
    if not root.exists() and not root.is_symlink():
        return
    if root.is_dir() and not root.is_symlink():
        os.chmod(root, stat.S_IMODE(os.stat(root).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
        for dirpath, dirnames, _ in os.walk(root):
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    os.chmod(
                        path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IWUSR | stat.S_IXUSR
                    )
        shutil.rmtree(root)
    else:
        root.unlink()


__all__ = [
    "LocalBackend",
    "digest_path",
    "make_read_only",
    "recorded_digest",
    "remove_tree",
    "seal",
    "touch_env",
]
