"""Git-sourced functions on a running platform (`lambdabus up`, every service its own process)
with a real git server (`git http-backend` on 127.0.0.1, allowed by the operator setting): a
function builds from a branch's base_dir; a new commit is picked up by `sync` and rolls out; a
deleted branch is `SourceUpdateFailed` while the last commit keeps serving; a private repository
is read with Basic credentials from a secret; refused URLs are a 400 that stores nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lambdabus_testing.gitserver import GitRepo, GitServer, git, git_server
from tests.e2e.conftest import Platform
from tests.e2e.helpers import cli, http, offline_platform, status_of, wait_for, wait_running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FUNCTIONS = "/v1/namespaces/default/functions"


def handler(version: int) -> str:
    return f"def main(event, context):\n    return {{'version': {version}}}\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    with git_server(tmp_path_factory.mktemp("git") / "srv") as running:
        yield running


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(
        tmp_path_factory,
        "git",
        LAMBDABUS_GATEWAY_GIT_ALLOW_PRIVATE="true",
        LAMBDABUS_GATEWAY_GIT_POLL_INTERVAL="2",
    )


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_git_function_builds_and_sync_picks_up_a_new_commit(
    platform: Platform, server: GitServer
) -> None:
    gateway, router = platform.urls["gateway"], platform.urls["router"]
    repo = GitRepo.create(server.root, "functions")
    first = repo.commit({"hello/handler.py": handler(1), "other/handler.py": handler(99)})
    spec = {
        "name": "from-git",
        "source": {
            "git": {"url": f"{server.url}/functions.git", "reference": "main", "base_dir": "hello"}
        },
    }
    status, body = http("POST", gateway + FUNCTIONS, spec)
    assert status == 202, body
    assert body["source"]["kind"] == "git"
    assert body["source"]["git"]["commit"] == first
    wait_running(platform, "from-git")
    assert http("POST", f"{router}/default/from-git", {}) == (200, {"version": 1})
    config = _condition(status_of(platform, "from-git"), "ConfigurationReady")
    assert (config["status"], config["reason"]) == ("True", "SourceUpdated")
    assert first[:12] in config["message"]

    # Nothing new: sync changes nothing.
    status, body = http("POST", f"{gateway}{FUNCTIONS}/from-git/sync")
    assert (status, body["generation"]) == (200, 1), body

    second = repo.commit({"hello/handler.py": handler(2)})
    synced = cli(platform, "sync", "from-git")
    assert synced.returncode == 0, synced.stderr + synced.stdout
    assert f"generation 2, commit {second[:12]}" in synced.stdout
    assert "SourceUpdated" in synced.stdout

    def serves_v2() -> bool:
        return http("POST", f"{router}/default/from-git", {}) == (200, {"version": 2})

    wait_for(serves_v2, 90, "the new commit serving")

    # The branch is gone: the poll fails and says why; the last good commit keeps serving.
    git("update-ref", "-d", "refs/heads/main", cwd=repo.bare)
    synced = cli(platform, "sync", "from-git")
    assert synced.returncode == 1, synced.stderr + synced.stdout  # the sync failed: say so
    assert "SourceUpdateFailed" in synced.stdout
    config = _condition(status_of(platform, "from-git"), "ConfigurationReady")
    assert (config["status"], config["reason"]) == ("False", "SourceUpdateFailed")
    assert "no branch or tag 'main'" in config["message"]
    assert http("POST", f"{router}/default/from-git", {}) == (200, {"version": 2})


def test_a_new_tag_commit_is_picked_up_by_the_poll(platform: Platform, server: GitServer) -> None:
    gateway, router = platform.urls["gateway"], platform.urls["router"]
    repo = GitRepo.create(server.root, "polled")
    repo.commit({"handler.py": handler(1)})
    repo.tag("v1")
    source = {"git": {"url": f"{server.url}/polled.git", "reference": "release"}}
    git("push", "-q", "origin", "HEAD:refs/heads/release", cwd=repo.work)
    status, body = http("POST", gateway + FUNCTIONS, {"name": "polled", "source": source})
    assert status == 202, body
    wait_running(platform, "polled")
    repo.commit({"handler.py": handler(3)}, branch="release")  # no sync: the poll finds it

    def serves_v3() -> bool:
        return http("POST", f"{router}/default/polled", {}) == (200, {"version": 3})

    wait_for(serves_v3, 90, "the polled commit serving")
    _, record = http("GET", f"{gateway}{FUNCTIONS}/polled")
    assert record["generation"] == 2


def test_private_repository_with_basic_auth_from_a_secret(
    platform: Platform, tmp_path: Path
) -> None:
    gateway, router = platform.urls["gateway"], platform.urls["router"]
    with git_server(tmp_path / "srv", auth=("robot", "pw-7f3a9")) as private:
        repo = GitRepo.create(private.root, "private")
        repo.commit({"handler.py": handler(7)})
        source = {"git": {"url": f"{private.url}/private.git", "reference": "main"}}
        status, body = http("POST", gateway + FUNCTIONS, {"name": "private-git", "source": source})
        assert (status, body["error"]["code"]) == (400, "git_source_failed"), body
        assert body["error"]["details"]["reason"] == "auth"

        secret = {"name": "git-robot", "data": {"username": "robot", "password": "pw-7f3a9"}}
        assert http("POST", f"{gateway}/v1/namespaces/default/secrets", secret)[0] == 201
        with_auth = {"git": {**source["git"], "auth": {"type": "basic", "secret": "git-robot"}}}
        status, body = http(
            "POST", gateway + FUNCTIONS, {"name": "private-git", "source": with_auth}
        )
        assert status == 202, body
        assert "pw-7f3a9" not in str(body)
    wait_running(platform, "private-git")
    assert http("POST", f"{router}/default/private-git", {}) == (200, {"version": 7})


@pytest.mark.parametrize(
    "url",
    ["file:///etc", "git://127.0.0.1/repo.git", "https://user:pw@example.com/r.git", "/srv/r.git"],
)
def test_refused_url_is_a_400_and_nothing_is_stored(platform: Platform, url: str) -> None:
    gateway = platform.urls["gateway"]
    spec = {"name": "refused-git", "source": {"git": {"url": url, "reference": "main"}}}
    status, body = http("POST", gateway + FUNCTIONS, spec)
    assert (status, body["error"]["code"]) == (400, "git_url_refused"), body
    assert http("GET", f"{gateway}{FUNCTIONS}/refused-git")[0] == 404
