"""Git sources: which repository URLs a function may name, and fetching one commit of one as a
zip of its `base_dir`, with the git CLI under a strict environment.

Pure part: `parse_git_url`, `address_problem`, `classify_git_error`. Shell: `GitClient`, which
resolves the host itself (and refuses it again when it now points somewhere refused: DNS
rebinding), pins the connection to the address it checked, and runs git with no system or user
config, no hooks, no prompts, no redirects and only the allowed protocols. Credentials come from
a secret and reach git through its environment (basic) or a 0600 file in a private temp dir
(key); never through argv or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from lambdabus_events.models import GitSource
from lambdabus_platform.errors import InvalidSpec, PermanentError

GitErrorReason = Literal["auth", "unknown_ref", "unreachable", "refused", "invalid_base_dir"]

_SCP_LIKE = re.compile(r"^(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/].*)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SCHEMES = ("https", "http", "ssh")
_DEFAULT_PORTS = {"https": 443, "http": 80, "ssh": 22}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class GitSourceError(PermanentError):
    """A git source that cannot be fetched; `reason` says why in one word (auth, unknown_ref,
    unreachable, refused, invalid_base_dir)."""

    status = 400
    code = "git_source_failed"

    def __init__(self, reason: GitErrorReason, message: str) -> None:
        super().__init__(message, details={"reason": reason})
        self.reason = reason


class GitUrlRefused(InvalidSpec):
    code = "git_url_refused"


@dataclass(frozen=True)
class GitUrl:
    scheme: Literal["https", "http", "ssh"]
    host: str
    port: int
    user: str | None


def parse_git_url(url: str) -> GitUrl:
    """The scheme, host and port of a repository URL, or `GitUrlRefused` for any other form
    (file://, git://, local paths, credentials in the URL, options disguised as URLs). Pure."""
    url = url.strip()
    if not url or url.startswith("-") or any(c.isspace() or ord(c) < 32 for c in url):
        raise GitUrlRefused(f"source.git.url {url!r} is not a repository URL")
    scp = _SCP_LIKE.match(url)
    if scp and "://" not in url:
        return GitUrl("ssh", scp["host"].lower(), 22, scp["user"])
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise GitUrlRefused(
            f"source.git.url {url!r}: only https://, http://, ssh:// and git@host:path "
            "URLs are allowed",
            details={"schemes": [*_SCHEMES, "scp-like"]},
        )
    if parts.password is not None or (parts.username is not None and parts.scheme != "ssh"):
        raise GitUrlRefused(
            "source.git.url must not carry credentials: put them in a secret and name it in "
            "source.git.auth"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise GitUrlRefused(f"source.git.url {url!r}: {exc}") from None
    if not parts.hostname:
        raise GitUrlRefused(f"source.git.url {url!r} names no host")
    scheme: Literal["https", "http", "ssh"] = parts.scheme  # type: ignore[assignment]
    return GitUrl(scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme], parts.username)


def address_problem(address: str) -> str | None:
    """Why a function's repository may not be at `address` (loopback, private, link-local, ...),
    or None. Pure."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return "an address that is not a public unicast one"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT):
        return "a private address"
    if ip.is_reserved:
        return "an address that is not a public unicast one"
    return None


def classify_git_error(stderr: str) -> GitErrorReason:
    """What git's error output means for a person: auth, unknown_ref or unreachable. Pure."""
    text = stderr.lower()
    auth_marks = (
        "authentication failed",
        "could not read username",
        "could not read password",
        "terminal prompts disabled",
        "permission denied",
        "returned error: 401",
        "returned error: 403",
        "access denied",
        "host key verification failed",
    )
    if any(mark in text for mark in auth_marks):
        return "auth"
    ref_marks = ("couldn't find remote ref", "not our ref", "no such remote ref", "bad object")
    if any(mark in text for mark in ref_marks):
        return "unknown_ref"
    return "unreachable"


@dataclass(frozen=True)
class GitPolicy:
    """The operator's settings for git sources."""

    allow_private: bool = False
    timeout: float = 120.0
    git: str = "git"


@dataclass(frozen=True)
class GitCredentials:
    """A secret's values for `source.git.auth`; never printed."""

    kind: Literal["basic", "key"]
    values: dict[str, str] = field(repr=False)


@dataclass(frozen=True)
class Fetched:
    commit: str
    archive: bytes  # a zip of base_dir at `commit`


async def check_host(url: GitUrl, policy: GitPolicy) -> str:
    """Resolve the URL's host and return the address to connect to; `GitUrlRefused` when any
    address it resolves to is refused (unless the operator allows private addresses)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise GitSourceError("unreachable", f"cannot resolve {url.host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise GitSourceError("unreachable", f"{url.host} resolves to no address")
    if not policy.allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem is not None:
                raise GitUrlRefused(
                    f"source.git.url: {url.host} resolves to {address}, {problem}; "
                    "repositories must be on public addresses",
                    details={"host": url.host, "address": address},
                )
    return addresses[0]


async def check_url(source: GitSource, policy: GitPolicy) -> GitUrl:
    """The API's check: the URL's form, then where its host points."""
    url = parse_git_url(source.url)
    await check_host(url, policy)
    return url


class GitClient:
    """Runs git for one source: `resolve` (the commit of the reference) and `fetch` (that
    commit's base_dir as a zip)."""

    def __init__(self, policy: GitPolicy) -> None:
        self._policy = policy

    async def resolve(self, source: GitSource, credentials: GitCredentials | None) -> str:
        """The commit `source.reference` names now: a branch, else a tag (peeled), else the
        reference itself when it is a full commit sha."""
        patterns = [
            f"refs/heads/{source.reference}",
            f"refs/tags/{source.reference}",
            f"refs/tags/{source.reference}^{{}}",
        ]
        with self._workdir() as work:
            out = await self._git(source, credentials, work, "ls-remote", "--", "URL", *patterns)
        refs: dict[str, str] = {}
        for line in out.decode(errors="replace").splitlines():
            sha, _, name = line.partition("\t")
            refs[name.strip()] = sha.strip()
        for name in (
            f"refs/heads/{source.reference}",
            f"refs/tags/{source.reference}^{{}}",
            f"refs/tags/{source.reference}",
        ):
            if name in refs:
                return refs[name]
        if _COMMIT.fullmatch(source.reference):
            return source.reference
        raise GitSourceError(
            "unknown_ref",
            f"the repository has no branch or tag {source.reference!r} (a commit must be "
            "given as its full 40-hex sha)",
        )

    async def fetch(
        self, source: GitSource, commit: str, credentials: GitCredentials | None
    ) -> Fetched:
        """A shallow fetch of `commit` into a private bare repository, then `git archive` of
        its base_dir: no checkout, so no hooks, filters or symlinks are followed on disk."""
        with self._workdir() as work:
            repo = work / "repo.git"
            await self._git(source, credentials, work, "init", "--bare", "-q", str(repo))
            fetch = ("fetch", "--depth=1", "--no-tags", "--no-write-fetch-head", "-q")
            await self._git(source, credentials, work, "-C", str(repo), *fetch, "URL", commit)
            tree = commit + ":" + source.base_dir.strip("/")
            try:
                archive = await self._git(
                    source, None, work, "-C", str(repo), "archive", "--format=zip", tree
                )
            except GitSourceError as exc:
                raise GitSourceError(
                    "invalid_base_dir",
                    f"commit {commit[:12]} has no directory {source.base_dir!r}",
                ) from exc
        return Fetched(commit, archive)

    @contextlib.contextmanager
    def _workdir(self) -> Iterator[Path]:
        path = Path(tempfile.mkdtemp(prefix="lambdabus-git-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    async def _git(
        self,
        source: GitSource,
        credentials: GitCredentials | None,
        work: Path,
        *args: str,
    ) -> bytes:
        url = parse_git_url(source.url)
        argv = [self._policy.git, *self._config(url)]
        env = self._env(url, work)
        uses_remote = "URL" in args
        if uses_remote:
            # Checked again here, right before connecting, and the connection pinned to the
            # address checked: a name that now resolves somewhere refused is refused.
            address = await check_host(url, self._policy)
            argv += self._pin(url, address)
            if url.scheme == "ssh":
                env["GIT_SSH_COMMAND"] = self._ssh(url, address, credentials, work)
            elif credentials is not None and credentials.kind == "basic":
                env["LAMBDABUS_GIT_USERNAME"] = credentials.values.get("username", "")
                env["LAMBDABUS_GIT_PASSWORD"] = credentials.values.get("password", "")
                argv += [
                    "-c",
                    'credential.helper=!f() { test "$1" = get || exit 0; '
                    'echo "username=$LAMBDABUS_GIT_USERNAME"; '
                    'echo "password=$LAMBDABUS_GIT_PASSWORD"; }; f',
                ]
        argv += [source.url if a == "URL" else a for a in args]
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=work,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(self._policy.timeout):
                out, err = await process.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise GitSourceError(
                "unreachable",
                f"git took longer than {self._policy.timeout:g} s talking to {url.host}",
            ) from None
        if process.returncode != 0:
            message = _last_lines(err.decode(errors="replace"))
            raise GitSourceError(classify_git_error(message), f"{url.host}: {message}")
        return out

    def _config(self, url: GitUrl) -> list[str]:
        config = [
            "protocol.allow=never",
            f"protocol.{url.scheme}.allow=always",
            "core.hooksPath=/dev/null",
            "core.fsmonitor=false",
            "http.followRedirects=false",
            "credential.helper=",
            "core.askPass=",
            "http.lowSpeedLimit=1000",
            "http.lowSpeedTime=30",
        ]
        return [arg for item in config for arg in ("-c", item)]

    def _pin(self, url: GitUrl, address: str) -> list[str]:
        if url.scheme in ("http", "https"):
            shown = f"[{address}]" if ":" in address else address
            return ["-c", f"http.curloptResolve={url.host}:{url.port}:{shown}"]
        return []

    def _ssh(
        self, url: GitUrl, address: str, credentials: GitCredentials | None, work: Path
    ) -> str:
        known_hosts = work / "known_hosts"
        options = [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            f"HostName={address}",
            "-o",
            f"HostKeyAlias={url.host}",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "IdentitiesOnly=yes",
        ]
        strict = "accept-new"
        if credentials is not None and credentials.kind == "key":
            key = work / "key"
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(credentials.values.get("key", "").rstrip("\n") + "\n")
            options += ["-i", str(key)]
            if credentials.values.get("known_hosts"):
                known_hosts.write_text(credentials.values["known_hosts"])
                strict = "yes"
        options += ["-o", f"StrictHostKeyChecking={strict}"]
        return " ".join(options)

    def _env(self, url: GitUrl, work: Path) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(work),
            "LANG": "C.UTF-8",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
            "GIT_PROTOCOL_FROM_USER": "0",
            "GIT_ALLOW_PROTOCOL": url.scheme,
        }


def _last_lines(text: str, limit: int = 4) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-limit:]) or "git failed without a message"
