"""Dependency file rules: each class of requirements.txt line and package.json spec, allowed or
refused, and what the operator setting changes."""

from __future__ import annotations

import json

import pytest

from lambdabus_platform.dependencies import (
    DEPENDENCY_FILE_LIMITS,
    DependencyError,
    check_dependency_files,
    lifecycle_scripts,
    lockfile_problems,
    npm_spec_problem,
    package_json_problems,
    requirements_problems,
)


def refused_line(line: str) -> str:
    """The problem of a one-line requirements.txt; it must be refused on line 1."""
    problems = requirements_problems(f"# a comment\n{line}\n".encode())
    assert [p.line for p in problems] == [2], problems
    assert problems[0].text == line.split(" #")[0].strip()
    assert requirements_problems(f"{line}\n".encode(), allow_unsafe=True) == []
    return problems[0].problem


@pytest.mark.parametrize(
    "line",
    [
        "requests",
        "requests>=2.31",
        "requests >= 2.31, < 3",
        "Flask[async]==3.0.*",
        "zope.interface~=6.0",
        "humanize==4.12.3 ; python_version >= '3.8'",
        "pkg==1.0 --hash=sha256:0123abcd --hash=sha256:ffee",
        "pkg (>=1.0)",
        "pkg  # a trailing comment",
        "",
        "   ",
        "# only a comment",
    ],
)
def test_requirements_by_name_are_allowed(line: str) -> None:
    assert requirements_problems(f"{line}\n".encode()) == []


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("-e git+https://example.com/x.git#egg=x", "-e"),
        ("--editable ./pkg", "--editable"),
        ("-e.", "-e"),
        ("-r /etc/shadow", "reads another requirements file"),
        ("-r/etc/shadow", "reads another requirements file"),
        ("--requirement=/etc/shadow", "reads another requirements file"),
        ("-c constraints.txt", "constraints"),
        ("--constraint /etc/passwd", "constraints"),
        ("--index-url http://127.0.0.1:4222/simple", "replaces the package index"),
        ("-i http://127.0.0.1:8080/", "replaces the package index"),
        ("--extra-index-url https://example.com/simple", "adds a package index"),
        ("-f /root", "find-links"),
        ("--find-links=http://127.0.0.1:1/", "find-links"),
        ("--trusted-host example.com", "TLS"),
        ("--no-index", "--no-index"),
        ("--pre", "may list only requirements"),
        ("--global-option=--x", "may list only requirements"),
    ],
)
def test_installer_options_are_refused(line: str, says: str) -> None:
    problem = refused_line(line)
    assert "installer option" in problem
    assert says in problem
    assert "allow_unsafe_requirements" in problem


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("file:///etc/passwd", "file: URL"),
        ("FILE:/tmp/pkg", "file: URL"),
        ("./pkg", "local path"),
        ("../pkg", "local path"),
        ("/opt/pkg", "local path"),
        ("~/pkg", "local path"),
        ("pkg/sub", "local path"),
        ("dist/x-1.0-py3-none-any.whl", "local path"),
        ("x-1.0-py3-none-any.whl", "local path"),
        ("x-1.0.tar.gz", "local path"),
        ("git+file:///tmp/repo", "VCS"),
        ("git+https://github.com/u/r.git@v1", "VCS"),
        ("hg+https://example.com/r", "VCS"),
        ("svn+svn://example.com/r", "VCS"),
        ("https://example.com/x-1.0-py3-none-any.whl", "URL requirement"),
        ("http://127.0.0.1:9000/x.tar.gz", "URL requirement"),
        ("x @ https://example.com/x.whl", "direct reference"),
        ("x[extra]@ file:///tmp/x", "direct reference"),
        ("x @ git+file:///tmp/repo", "direct reference"),
    ],
)
def test_paths_urls_and_vcs_are_refused(line: str, says: str) -> None:
    assert says in refused_line(line)


@pytest.mark.parametrize(
    "line",
    [
        "pkg==${VERSION}",
        "pkg; ${X}",
        "%%%",
        "pkg ==",
        "pkg -x",
        "pkg; python_version > '3' --index-url http://127.0.0.1/",
        "pkg --config-settings=--build-option=--evil",
        "pkg==1.0 --global-option=build_ext",
        # a name that starts like a URL scheme is still a name: options after it are refused
        'httpx; python_version>"3" --index-url http://127.0.0.1:8080/simple',
        'httpx; os_name=="posix" --global-option=--foo',
        "gitpython --index-url http://127.0.0.1/",
    ],
)
def test_anything_else_is_refused(line: str) -> None:
    refused_line(line)


def test_continuation_lines_are_joined_and_numbered_by_their_first_line() -> None:
    text = b"ok==1\n-r \\\n  /etc/shadow\nalso-ok\n"
    (problem,) = requirements_problems(text)
    assert problem.line == 2
    assert problem.text.startswith("-r")
    assert "requirements.txt:2" in problem.describe()


def test_every_bad_line_is_named() -> None:
    problems = requirements_problems(b"a\n-r x\nb\n--index-url http://x\n./c\n")
    assert [p.line for p in problems] == [2, 4, 5]


def test_size_encoding_and_nul_are_checked_even_when_unsafe_is_allowed() -> None:
    big = b"a\n" * (DEPENDENCY_FILE_LIMITS["requirements.txt"] // 2 + 1)
    for data, says in [(big, "limit"), (b"\xff\xfe\n", "UTF-8"), (b"a\x00b\n", "NUL")]:
        (problem,) = requirements_problems(data, allow_unsafe=True)
        assert says in problem.problem


# -- package.json ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "^1.2.3",
        "~1.2",
        "1.x || >=2.5.0 <3",
        "*",
        "",
        "latest",
        "next",
        "1.0.0-beta.1",
        "npm:@s/p@^2",
    ],
)
def test_registry_specs_are_allowed(spec: str) -> None:
    assert npm_spec_problem(spec) is None


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("file:../lib", "path on the builder's disk"),
        ("file:/etc", "path on the builder's disk"),
        ("link:../lib", "path on the builder's disk"),
        ("./lib.tgz", "path on the builder's disk"),
        ("/tmp/x.tgz", "path on the builder's disk"),
        ("git+file:///tmp/repo", "git repository"),
        ("git+ssh://git@github.com/u/r.git", "git repository"),
        ("git://github.com/u/r.git", "git repository"),
        ("github:user/repo", "git repository"),
        ("gitlab:user/repo", "git repository"),
        ("bitbucket:user/repo", "git repository"),
        ("gist:abc123", "git repository"),
        ("user/repo", "GitHub shorthand"),
        ("user/repo#semver:^1", "GitHub shorthand"),
        ("https://example.com/x.tgz", "URL"),
        ("http://127.0.0.1:4873/x.tgz", "URL"),
        ("npm:x@file:../y", "path on the builder's disk"),
        ("1.0.0; rm -rf x", "not a version range"),
        ("~/lib", "path on the builder's disk"),
    ],
)
def test_non_registry_specs_are_refused(spec: str, says: str) -> None:
    problem = npm_spec_problem(spec)
    assert problem is not None
    assert says in problem


def test_package_json_names_each_refused_field() -> None:
    package = {
        "name": "fn",
        "dependencies": {"ok": "^1", "bad": "file:../x"},
        "devDependencies": {"dev": "github:u/r"},
        "optionalDependencies": {"opt": "https://x/y.tgz"},
        "peerDependencies": {"peer": "link:../p"},
        "overrides": {"ok": "$ok", "deep": {"x": "git+https://x/y"}},
        "workspaces": ["packages/*"],
    }
    problems = package_json_problems(json.dumps(package).encode())
    assert [p.where for p in problems] == [
        "dependencies.bad",
        "optionalDependencies.opt",
        "peerDependencies.peer",
        "devDependencies.dev",
        "overrides.deep.x",
        "workspaces",
    ]
    assert package_json_problems(json.dumps(package).encode(), allow_unsafe=True) == []


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"dependencies": []}', "must be an object"),
        (b'{"dependencies": {"x": 1}}', "must be a string"),
        (b'{"dependencies": {"../x": "1"}}', "not an npm package name"),
    ],
)
def test_malformed_package_json(data: bytes, says: str) -> None:
    (problem,) = package_json_problems(data, allow_unsafe=True)
    assert says in problem.problem


def test_lifecycle_scripts_are_listed_not_refused() -> None:
    package = {
        "dependencies": {"a": "^1"},
        "scripts": {"postinstall": "node x.js", "test": "jest", "prepare": "tsc"},
    }
    data = json.dumps(package).encode()
    assert package_json_problems(data) == []
    assert lifecycle_scripts(data) == ["postinstall", "prepare"]
    assert lifecycle_scripts(b"nonsense") == []


def test_lockfile_resolved_locations() -> None:
    lock = {
        "lockfileVersion": 3,
        "packages": {
            "": {"name": "fn"},
            "node_modules/ok": {"resolved": "https://registry.npmjs.org/ok/-/ok-1.0.0.tgz"},
            "node_modules/mirror": {"resolved": "http://10.1.2.3:4873/mirror/-/m-1.tgz"},
            "node_modules/local": {"resolved": "http://127.0.0.1:4873/l/-/l-1.tgz"},
            "node_modules/named": {"resolved": "http://localhost:4873/n/-/n-1.tgz"},
            "node_modules/meta": {"resolved": "http://169.254.169.254/latest/x.tgz"},
            "node_modules/disk": {"resolved": "file:../disk.tgz"},
            "node_modules/git": {"resolved": "git+ssh://git@github.com/u/r.git#abc"},
            "node_modules/linked": {"resolved": "../linked", "link": True},
        },
        "dependencies": {"old": {"version": "git+https://x/y.git#abc"}},
    }
    problems = lockfile_problems(json.dumps(lock).encode())
    assert [p.where for p in problems] == [
        "packages.node_modules/local",
        "packages.node_modules/named",
        "packages.node_modules/meta",
        "packages.node_modules/disk",
        "packages.node_modules/git",
        "packages.node_modules/linked",
        "dependencies.old",
    ]
    assert lockfile_problems(json.dumps(lock).encode(), allow_unsafe=True) == []


def test_check_dependency_files_raises_a_400_naming_the_line() -> None:
    with pytest.raises(DependencyError) as caught:
        check_dependency_files(
            "python3.11", {"requirements.txt": b"ok\n-r /etc/shadow\n", "package.json": b"x"}
        )
    error = caught.value
    assert (error.status, error.code) == (400, "invalid_dependencies")
    assert "requirements.txt:2" in error.message
    assert "-r /etc/shadow" in error.message
    assert error.details["problems"][0]["line"] == 2
    # each runtime checks only its own files
    check_dependency_files("nodejs20", {"requirements.txt": b"-r /etc/shadow\n"})
    check_dependency_files("python3.11", {"requirements.txt": None})
    with pytest.raises(DependencyError, match=r"package-lock\.json"):
        check_dependency_files(
            "nodejs20",
            {"package.json": b"{}", "package-lock.json": b'{"packages": {"x": {"link": true}}}'},
        )
    check_dependency_files(
        "python3.11", {"requirements.txt": b"-r /etc/shadow\n"}, allow_unsafe=True
    )
