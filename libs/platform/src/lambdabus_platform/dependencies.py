"""Dependency file rules: which lines of a `requirements.txt` and which specs of a `package.json`
(and its `package-lock.json`) a build may install. Pure: reads only the given bytes.

Allowed by default is what a package index serves: a requirement by name (extras, version
specifiers, markers, `--hash`), an npm dependency by semver range, dist-tag or `npm:` alias.
Refused, unless the operator allows them (`allow_unsafe_requirements`): installer options
(`-e`, `-r`, `-c`, `--index-url`, `-f`, `--trusted-host`, ...), which read host files or reach
other indexes; `file:` and local paths; VCS and URL requirements, which fetch from anywhere and
run the fetched build scripts. The gateway checks them at upload and the builder again before
it installs anything (defence in depth). npm lifecycle scripts (`preinstall`, `install`,
`postinstall`, `prepare`) are allowed: they run inside the build sandbox.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lambdabus_platform.errors import InvalidRequest

__all__ = [
    "DEPENDENCY_FILE_LIMITS",
    "DependencyError",
    "DependencyProblem",
    "check_dependency_files",
    "lifecycle_scripts",
    "lockfile_problems",
    "package_json_problems",
    "requirements_problems",
]

KiB = 1024
MiB = 1024 * KiB

DEPENDENCY_FILE_LIMITS: Mapping[str, int] = {
    "requirements.txt": 1 * MiB,
    "package.json": 1 * MiB,
    "package-lock.json": 32 * MiB,
}
_FILES_OF: Mapping[str, tuple[str, ...]] = {
    "python3.11": ("requirements.txt",),
    "nodejs20": ("package.json", "package-lock.json"),
}
_ALLOW_HINT = "an operator can allow it with allow_unsafe_requirements"


@dataclass(frozen=True)
class DependencyProblem:
    """One refused line (requirements.txt, 1-based) or spec (package.json: `where` names it)."""

    file: str
    line: int | None
    where: str  # e.g. "dependencies.left-pad" for package.json; "" for requirements.txt
    text: str  # the offending line or spec, as written
    problem: str  # what it would do, and what to write instead

    def describe(self) -> str:
        place = f"{self.file}:{self.line}" if self.line is not None else self.file
        if self.where:
            place += f" ({self.where})"
        return f"{place}: {self.text!r} {self.problem}"


class DependencyError(InvalidRequest):
    """A dependency file with refused lines: 400 `invalid_dependencies`, naming each."""

    code = "invalid_dependencies"

    def __init__(self, problems: list[DependencyProblem]) -> None:
        shown = "; ".join(p.describe() for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(
            f"{shown}{more}. Dependencies are installed from the package index only: list "
            "them by name and version",
            details={
                "problems": [
                    {"file": p.file, "line": p.line, "where": p.where, "text": p.text[:200]}
                    for p in problems[:20]
                ]
            },
        )
        self.problems = problems


_URL_SCHEME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|git\+|file:)")


def check_dependency_files(
    runtime: str, files: Mapping[str, bytes | None], *, allow_unsafe: bool = False
) -> None:
    """Raise `DependencyError` if a dependency file of `runtime` in `files` (name → content,
    None or absent when the archive has none) has a refused line. With `allow_unsafe` only the
    size and encoding rules apply."""
    problems: list[DependencyProblem] = []
    for name in _FILES_OF.get(runtime, ()):
        data = files.get(name)
        if data is None:
            continue
        if name == "requirements.txt":
            problems += requirements_problems(data, allow_unsafe=allow_unsafe)
        elif name == "package.json":
            problems += package_json_problems(data, allow_unsafe=allow_unsafe)
        else:
            problems += lockfile_problems(data, allow_unsafe=allow_unsafe)
    if problems:
        raise DependencyError(problems)


# -- requirements.txt -------------------------------------------------------------------------

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_VERSION_CLAUSE = r"(?:~=|===|==|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_PLAIN = re.compile(
    rf"^(?P<name>{_NAME})\s*"
    rf"(?:\[\s*(?:{_NAME}(?:\s*,\s*{_NAME})*)?\s*\])?\s*"
    rf"(?:\(?\s*{_VERSION_CLAUSE}(?:\s*,\s*{_VERSION_CLAUSE})*\s*\)?)?\s*"
    r"(?:;(?P<marker>[^;]*))?$"
)
_HASH = re.compile(r"^--hash[=\s]\s*[A-Za-z0-9]+:[0-9A-Fa-f]+$")
_HASH_TAIL = re.compile(r"(?:\s+--hash(?:=|\s+)[A-Za-z0-9]+:[0-9A-Fa-f]+)+\s*$")
_COMMENT = re.compile(r"(^|\s+)#.*$")
_OPTION_NAMES = {
    "-e": "installs a local or VCS project and runs its build",
    "--editable": "installs a local or VCS project and runs its build",
    "-r": "reads another requirements file from the builder's disk",
    "--requirement": "reads another requirements file from the builder's disk",
    "-c": "reads a constraints file from the builder's disk",
    "--constraint": "reads a constraints file from the builder's disk",
    "-i": "replaces the package index the platform uses",
    "--index-url": "replaces the package index the platform uses",
    "--extra-index-url": "adds a package index the platform does not use",
    "-f": "adds a find-links location (a URL or a directory on the builder's disk)",
    "--find-links": "adds a find-links location (a URL or a directory on the builder's disk)",
    "--trusted-host": "turns off TLS verification for a host",
    "--no-index": "changes where packages come from",
}
_ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".zip", ".tar.bz2", ".tar.xz", ".tar", ".egg")
_VCS = ("git+", "hg+", "svn+", "bzr+")


def requirements_problems(data: bytes, *, allow_unsafe: bool = False) -> list[DependencyProblem]:
    """Every refused line of a requirements.txt (continuation lines joined, comments dropped)."""
    file = "requirements.txt"
    if len(data) > DEPENDENCY_FILE_LIMITS[file]:
        return [_too_large(file, len(data))]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [DependencyProblem(file, None, "", "", f"is not UTF-8 text ({exc.reason})")]
    problems: list[DependencyProblem] = []
    for number, line in _logical_lines(text):
        if "\x00" in line:
            problems.append(DependencyProblem(file, number, "", line, "contains a NUL byte"))
            continue
        line = _COMMENT.sub("", line).strip()
        if not line or allow_unsafe:
            continue
        problem = _requirement_problem(line)
        if problem is not None:
            problems.append(DependencyProblem(file, number, "", line, problem))
    return problems


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first physical line number, line) with backslash continuations joined, as pip does."""
    lines: list[tuple[int, str]] = []
    start, parts = 0, list[str]()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not parts:
            start = number
        if raw.endswith("\\") and not _COMMENT.search(raw.rstrip("\\")):
            parts.append(raw[:-1])
            continue
        parts.append(raw)
        lines.append((start, "".join(parts)))
        parts = []
    if parts:
        lines.append((start, "".join(parts)))
    return lines


def _requirement_problem(line: str) -> str | None:
    if "${" in line:
        return (
            "uses an environment variable, which the installer would expand from the builder's "
            "environment: write the value out"
        )
    if line.startswith("-"):
        option = re.split(r"[=\s]", line, maxsplit=1)[0]
        if _HASH.match(line):
            return "is a --hash without a requirement: put it on the requirement's line"
        does = _OPTION_NAMES.get(option if option.startswith("--") else option[:2])
        if does is None:
            what = (
                f"is an installer option ({option}); a requirements file may list only requirements"
            )
        else:
            what = f"is an installer option ({option}) that {does}"
        return f"{what}: refused ({_ALLOW_HINT})"
    requirement = _HASH_TAIL.sub("", line).strip()
    trailing = re.search(r"\s(--?[A-Za-z][\w-]*)", requirement)
    is_url = _URL_SCHEME.match(requirement) is not None  # refused below, with that reason
    if trailing is not None and not is_url:
        return (
            f"has an installer option after the requirement ({trailing.group(1)}); only --hash "
            f"may follow one ({_ALLOW_HINT})"
        )
    if _PLAIN.match(requirement) and not requirement.lower().endswith(_ARCHIVE_SUFFIXES):
        return None
    return _unplain_requirement(requirement)


def _unplain_requirement(requirement: str) -> str:
    lower = requirement.lower()
    if lower.startswith("file:"):
        return f"is a file: URL, which installs from the builder's disk: refused ({_ALLOW_HINT})"
    if lower.startswith(_VCS):
        return (
            "is a VCS requirement, which fetches a repository and runs its build scripts: "
            f"publish the package to the index and list it by name ({_ALLOW_HINT})"
        )
    if re.match(r"^[a-z][a-z0-9+.-]*://", lower):
        return (
            "is a URL requirement, which downloads from outside the package index: "
            f"list the package by name ({_ALLOW_HINT})"
        )
    if re.match(rf"^{_NAME}\s*(\[[^\]]*\])?\s*@", requirement):
        return (
            "is a direct reference (name @ URL), which installs from outside the package index: "
            f"list the package by name and version ({_ALLOW_HINT})"
        )
    if (
        requirement.startswith((".", "/", "~"))
        or "/" in requirement
        or "\\" in requirement
        or lower.endswith(_ARCHIVE_SUFFIXES)
    ):
        return (
            "is a local path, which installs from the builder's disk: list the package by name "
            f"({_ALLOW_HINT})"
        )
    return (
        "is not a requirement by name (name, [extras], version specifiers, ; markers, "
        "--hash): write it like 'requests>=2.31'"
    )


# -- package.json -----------------------------------------------------------------------------

_DEPENDENCY_FIELDS = (
    "dependencies",
    "optionalDependencies",
    "peerDependencies",
    "devDependencies",
)
_LIFECYCLE = ("preinstall", "install", "postinstall", "preprepare", "prepare", "postprepare")
_NPM_NAME = re.compile(r"^(?:@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9._~-][a-z0-9._~-]*$", re.IGNORECASE)
_NPM_RANGE = re.compile(r"^[A-Za-z0-9.^~<>=|*+ \t-]*$")
_GIT_PREFIXES = ("git:", "git+", "github:", "gitlab:", "bitbucket:", "gist:")


def package_json_problems(data: bytes, *, allow_unsafe: bool = False) -> list[DependencyProblem]:
    """Every refused dependency spec of a package.json (all four dependency fields,
    `overrides`, `workspaces`)."""
    file = "package.json"
    document, problem = _json(file, data)
    if problem is not None:
        return [problem]
    assert isinstance(document, dict)
    problems: list[DependencyProblem] = []
    for field in _DEPENDENCY_FIELDS:
        specs = document.get(field)
        if specs is None:
            continue
        if not isinstance(specs, dict):
            problems.append(
                DependencyProblem(file, None, field, str(specs)[:80], "must be an object")
            )
            continue
        for name, spec in specs.items():
            where = f"{field}.{name}"
            if not _NPM_NAME.match(name):
                problems.append(
                    DependencyProblem(file, None, where, name, "is not an npm package name")
                )
            elif not isinstance(spec, str):
                problems.append(
                    DependencyProblem(file, None, where, str(spec)[:80], "must be a string")
                )
            elif not allow_unsafe and (why := npm_spec_problem(spec)) is not None:
                problems.append(DependencyProblem(file, None, where, spec, why))
    if not allow_unsafe:
        problems += _override_problems(document.get("overrides"), "overrides")
        if document.get("workspaces"):
            problems.append(
                DependencyProblem(
                    file,
                    None,
                    "workspaces",
                    json.dumps(document["workspaces"])[:80],
                    f"links local folders into the build: refused ({_ALLOW_HINT})",
                )
            )
    return problems


def _override_problems(value: Any, where: str) -> list[DependencyProblem]:
    if isinstance(value, str):
        if value.startswith("$"):  # a reference to a direct dependency's spec
            return []
        why = npm_spec_problem(value)
        return [] if why is None else [DependencyProblem("package.json", None, where, value, why)]
    if isinstance(value, dict):
        return [
            problem
            for key, child in value.items()
            for problem in _override_problems(child, f"{where}.{key}")
        ]
    return []


def npm_spec_problem(spec: str) -> str | None:
    """Why an npm dependency spec is refused, or None for a registry spec (range, tag, alias)."""
    value = spec.strip()
    lower = value.lower()
    if lower.startswith("npm:"):
        alias = value[4:]
        name, _, version = alias.rpartition("@") if alias.rfind("@") > 0 else (alias, "", "")
        if not _NPM_NAME.match(name):
            return "is an npm: alias of something that is not a package name"
        return npm_spec_problem(version)
    if lower.startswith(("file:", "link:")):
        return (
            "installs from a path on the builder's disk: publish the package to the registry "
            f"({_ALLOW_HINT})"
        )
    if lower.startswith(_GIT_PREFIXES):
        return (
            "fetches a git repository and runs its scripts: publish the package to the registry "
            f"and use a version range ({_ALLOW_HINT})"
        )
    if re.match(r"^[a-z][a-z0-9+.-]*:", lower):
        return f"downloads from a URL outside the registry: use a version range ({_ALLOW_HINT})"
    if value.startswith((".", "/", "~/")) or lower.endswith((".tgz", ".tar.gz", ".tar")):
        return f"installs from a path on the builder's disk: use a version range ({_ALLOW_HINT})"
    if "/" in value:
        return (
            "is a GitHub shorthand (user/repo), which fetches a git repository: use a version "
            f"range ({_ALLOW_HINT})"
        )
    if not _NPM_RANGE.match(value):
        return "is not a version range or dist-tag: write it like '^1.2.3'"
    return None


def lifecycle_scripts(data: bytes) -> list[str]:
    """The install lifecycle scripts a package.json defines (they run in the build sandbox)."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return []
    scripts = document.get("scripts") if isinstance(document, dict) else None
    if not isinstance(scripts, dict):
        return []
    return [name for name in _LIFECYCLE if isinstance(scripts.get(name), str)]


# -- package-lock.json ------------------------------------------------------------------------


def lockfile_problems(data: bytes, *, allow_unsafe: bool = False) -> list[DependencyProblem]:
    """Refused entries of a package-lock.json: links, and `resolved` locations that are not
    http(s) URLs or that point at this machine."""
    file = "package-lock.json"
    document, problem = _json(file, data)
    if problem is not None:
        return [problem]
    if allow_unsafe:
        return []
    assert isinstance(document, dict)
    problems: list[DependencyProblem] = []
    for section in ("packages", "dependencies"):
        entries = document.get(section)
        if isinstance(entries, dict):
            _lock_entries(entries, f"{section}", problems)
    return problems


def _lock_entries(entries: dict[str, Any], where: str, problems: list[DependencyProblem]) -> None:
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            continue
        here = f"{where}.{key}" if key else f'{where}.""'
        if entry.get("link") is True:
            problems.append(
                DependencyProblem(
                    "package-lock.json",
                    None,
                    here,
                    str(entry.get("resolved", "")),
                    f"links a local folder: refused ({_ALLOW_HINT})",
                )
            )
        resolved = entry.get("resolved")
        if (
            entry.get("link") is not True
            and isinstance(resolved, str)
            and (why := _resolved_problem(resolved)) is not None
        ):
            problems.append(DependencyProblem("package-lock.json", None, here, resolved, why))
        version = entry.get("version")
        if key and isinstance(version, str) and ":" in version:
            why = npm_spec_problem(version)
            if why is not None:
                problems.append(DependencyProblem("package-lock.json", None, here, version, why))
        nested = entry.get("dependencies")
        if where.startswith("dependencies") and isinstance(nested, dict):
            _lock_entries(nested, f"{here}.dependencies", problems)


def _resolved_problem(resolved: str) -> str | None:
    parts = urlsplit(resolved)
    if parts.scheme not in ("http", "https"):
        return f"is not downloaded from a registry over http(s): refused ({_ALLOW_HINT})"
    if internal_host(parts.hostname or ""):
        return f"points at this machine or a link-local address: refused ({_ALLOW_HINT})"
    return None


def internal_host(host: str) -> bool:
    """Whether a URL host names this machine or a link-local address (IP literals and
    `localhost` only; private networks stay allowed, for registry mirrors. The build sandbox's
    network has no route to the host's loopback whatever the name resolves to)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local or address.is_unspecified


# -- shared -----------------------------------------------------------------------------------


def _too_large(file: str, size: int) -> DependencyProblem:
    return DependencyProblem(
        file,
        None,
        "",
        "",
        f"is {size} bytes, more than the limit of {DEPENDENCY_FILE_LIMITS[file]} bytes",
    )


def _json(file: str, data: bytes) -> tuple[object, DependencyProblem | None]:
    if len(data) > DEPENDENCY_FILE_LIMITS[file]:
        return None, _too_large(file, len(data))
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        return None, DependencyProblem(file, None, "", "", f"is not UTF-8 text ({exc.reason})")
    except ValueError as exc:
        return None, DependencyProblem(file, None, "", "", f"is not valid JSON ({exc})")
    if not isinstance(document, dict):
        return None, DependencyProblem(file, None, "", "", "must be a JSON object")
    return document, None
