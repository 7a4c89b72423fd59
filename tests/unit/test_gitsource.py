"""Which repository URLs a git source may name, and what git's errors mean (pure parts)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from lambdabus_events.models import GitSource
from lambdabus_platform.gitsource import (
    GitClient,
    GitCredentials,
    GitPolicy,
    GitUrlRefused,
    address_problem,
    classify_git_error,
    parse_git_url,
)


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port"),
    [
        ("https://github.com/kyma-project/examples.git", "https", "github.com", 443),
        ("http://git.example.com:8080/repo", "http", "git.example.com", 8080),
        ("ssh://git@git.example.com:2222/repo.git", "ssh", "git.example.com", 2222),
        ("git@github.com:kyma-project/examples.git", "ssh", "github.com", 22),
    ],
)
def test_allowed_url_forms(url: str, scheme: str, host: str, port: int) -> None:
    parsed = parse_git_url(url)
    assert (parsed.scheme, parsed.host, parsed.port) == (scheme, host, port)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc",
        "/srv/repo.git",
        "git://github.com/x/y",
        "ext::sh -c touch% /tmp/pwned",
        "-uhttps://x",
        "https://user:pw@github.com/x/y",
        "https://token@github.com/x/y",
        "https:///nohost",
        "https://github.com:99999/x",
        "ftp://example.com/repo",
        "https://exa mple.com/repo",
    ],
)
def test_refused_url_forms(url: str) -> None:
    with pytest.raises(GitUrlRefused) as caught:
        parse_git_url(url)
    assert caught.value.status == 400
    assert caught.value.code == "git_url_refused"


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("192.168.0.10", "a private address"),
        ("172.16.5.4", "a private address"),
        ("100.64.0.1", "a private address"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("fd00::1", "a private address"),
        ("0.0.0.0", "an address that is not a public unicast one"),
        ("140.82.121.4", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_problem(address: str, refused: str | None) -> None:
    assert address_problem(address) == refused


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        ("fatal: Authentication failed for 'https://x/'", "auth"),
        ("fatal: could not read Username for 'http://x': terminal prompts disabled", "auth"),
        ("git@x: Permission denied (publickey).", "auth"),
        ("fatal: couldn't find remote ref refs/heads/nope", "unknown_ref"),
        ("fatal: remote error: upload-pack: not our ref 0123", "unknown_ref"),
        ("fatal: unable to access 'https://x/': Could not resolve host: x", "unreachable"),
        ("fatal: unable to access 'http://x/': Failed to connect to x port 80", "unreachable"),
    ],
)
def test_classify_git_error(stderr: str, reason: str) -> None:
    assert classify_git_error(stderr) == reason


def test_base_dir_stays_inside_the_repository() -> None:
    source = GitSource(url="https://x/y", reference="main", base_dir="functions/./hello/")
    assert source.base_dir == "/functions/hello"
    assert GitSource(url="https://x/y", reference="main").base_dir == "/"
    with pytest.raises(ValidationError):
        GitSource(url="https://x/y", reference="main", base_dir="../etc")
    with pytest.raises(ValidationError):
        GitSource(url="https://x/y", reference="--upload-pack=touch")
    with pytest.raises(ValidationError):
        GitSource(url="https://x/y", reference="a..b")


def test_ssh_key_is_a_private_file_and_known_hosts_make_checking_strict(tmp_path: Path) -> None:
    client = GitClient(GitPolicy())
    url = parse_git_url("git@git.example.com:org/repo.git")
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----"
    first = tmp_path / "a"
    first.mkdir()
    command = client._ssh(url, "140.82.121.4", GitCredentials("key", {"key": key}), first)
    assert stat.S_IMODE((first / "key").stat().st_mode) == 0o600
    assert (first / "key").read_text() == key + "\n"
    assert key not in command
    assert "HostName=140.82.121.4" in command  # pinned to the address checked
    assert "HostKeyAlias=git.example.com" in command
    assert "StrictHostKeyChecking=accept-new" in command
    second = tmp_path / "b"
    second.mkdir()
    strict = client._ssh(
        url, "140.82.121.4", GitCredentials("key", {"key": key, "known_hosts": "x y z"}), second
    )
    assert "StrictHostKeyChecking=yes" in strict
    assert (second / "known_hosts").read_text() == "x y z"


def test_credentials_are_not_in_their_repr() -> None:
    assert "hunter2" not in repr(GitCredentials("basic", {"username": "u", "password": "hunter2"}))
