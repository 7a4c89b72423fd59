"""`GitClient` against a real git server (`git http-backend` on 127.0.0.1): resolving branches,
tags and commits, fetching a base_dir as a zip, Basic auth from credentials, and the reasons a
fetch fails; and the loopback refusal when the operator has not allowed private addresses."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from lambdabus_events.models import GitSource
from lambdabus_platform.gitsource import (
    GitClient,
    GitCredentials,
    GitPolicy,
    GitSourceError,
    GitUrlRefused,
)
from lambdabus_testing.gitserver import GitRepo, git_server

pytestmark = pytest.mark.timeout(60)

ALLOW_LOCAL = GitPolicy(allow_private=True, timeout=30)


def _names(archive: bytes) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return {i.filename: zf.read(i).decode() for i in zf.infolist() if not i.is_dir()}


async def test_resolve_and_fetch_branch_tag_and_commit(tmp_path: Path) -> None:
    repo = GitRepo.create(tmp_path / "srv", "fn")
    first = repo.commit({"fn/handler.py": "def main(e, c):\n    return 1\n", "README": "x"})
    repo.tag("v1")
    second = repo.commit({"fn/handler.py": "def main(e, c):\n    return 2\n"})
    client = GitClient(ALLOW_LOCAL)
    with git_server(tmp_path / "srv") as server:
        url = f"{server.url}/fn.git"
        branch = GitSource(url=url, reference="main", base_dir="/fn")
        assert await client.resolve(branch, None) == second
        fetched = await client.fetch(branch, second, None)
        assert _names(fetched.archive) == {"handler.py": "def main(e, c):\n    return 2\n"}

        tag = GitSource(url=url, reference="v1", base_dir="fn")
        assert await client.resolve(tag, None) == first  # the annotated tag, peeled
        assert "return 1" in _names((await client.fetch(tag, first, None)).archive)["handler.py"]

        pinned = GitSource(url=url, reference=first)
        assert await client.resolve(pinned, None) == first
        assert set(_names((await client.fetch(pinned, first, None)).archive)) == {
            "fn/handler.py",
            "README",
        }

        with pytest.raises(GitSourceError) as caught:
            await client.resolve(GitSource(url=url, reference="nope"), None)
        assert caught.value.reason == "unknown_ref"
        with pytest.raises(GitSourceError) as caught:
            await client.fetch(GitSource(url=url, reference="main", base_dir="/none"), second, None)
        assert caught.value.reason == "invalid_base_dir"


async def test_basic_auth_from_credentials(tmp_path: Path) -> None:
    repo = GitRepo.create(tmp_path / "srv", "private")
    commit = repo.commit({"handler.py": "def main(e, c):\n    return 1\n"})
    client = GitClient(ALLOW_LOCAL)
    with git_server(tmp_path / "srv", auth=("robot", "s3cret-pw")) as server:
        source = GitSource(url=f"{server.url}/private.git", reference="main")
        with pytest.raises(GitSourceError) as caught:
            await client.resolve(source, None)
        assert caught.value.reason == "auth"
        assert "s3cret" not in caught.value.message
        wrong = GitCredentials("basic", {"username": "robot", "password": "wrong"})
        with pytest.raises(GitSourceError) as caught:
            await client.resolve(source, wrong)
        assert caught.value.reason == "auth"
        right = GitCredentials("basic", {"username": "robot", "password": "s3cret-pw"})
        assert await client.resolve(source, right) == commit
        assert "handler.py" in _names((await client.fetch(source, commit, right)).archive)


async def test_unreachable_and_loopback_refused(tmp_path: Path) -> None:
    repo = GitRepo.create(tmp_path / "srv", "fn")
    repo.commit({"handler.py": "x = 1\n"})
    with git_server(tmp_path / "srv") as server:
        source = GitSource(url=f"{server.url}/fn.git", reference="main")
        with pytest.raises(GitUrlRefused) as refused:
            await GitClient(GitPolicy()).resolve(source, None)
        assert "loopback" in refused.value.message
        assert server.requests == []  # refused before any connection
        port = server.url.rsplit(":", 1)[1]
    gone = GitSource(url=f"http://127.0.0.1:{port}/fn.git", reference="main")
    with pytest.raises(GitSourceError) as caught:
        await GitClient(ALLOW_LOCAL).resolve(gone, None)
    assert caught.value.reason == "unreachable"
