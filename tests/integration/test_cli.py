"""The `lambdabus` CLI through a real gateway (over real HTTP, against the session's
nats-server): every read command's `-o json` and `-o yaml` parse, each refusal class has its exit
status and one `error: <code>: ...` line, usage errors exit 2, no traceback ever, and deploy
keeps the settings it is not given again."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from lambdabus_client.cli import main
from tests.integration.conftest import RunningGateway


async def cli(*args: str) -> int:
    """`main` calls asyncio.run, so it runs on a thread of its own beside the gateway's loop."""
    return await asyncio.to_thread(main, list(args))


@pytest.fixture
def function_dir(tmp_path: Path) -> Path:
    source = tmp_path / "fn"
    source.mkdir()
    (source / "lambda_main.py").write_text("async def main(request):\n    return {}\n")
    return source


@pytest.fixture
def admin(gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> RunningGateway:
    monkeypatch.setenv("LAMBDABUS_TOKEN", gateway.token)
    return gateway


def one_error_line(err: str, code: str) -> None:
    assert err.startswith(f"error: {code}:"), err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


async def test_every_read_command_prints_json_and_yaml_that_parse(
    admin: RunningGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = f"c{uuid.uuid4().hex[:8]}"
    base = ("--url", admin.url, "-n", ns)
    assert await cli(*base, "deploy", str(function_dir), "--name", "hello", "--no-wait") == 0
    assert await cli(*base, "triggers", "create", "t1", "--function", "hello") == 0
    assert await cli(*base, "secret", "create", "s1", "--from-literal", "k=v") == 0
    capsys.readouterr()
    reads = [
        ["ls"],
        ["status", "hello"],
        ["describe", "hello"],
        ["triggers", "ls"],
        ["deadletters", "ls"],
        ["token", "ls"],
        ["secret", "ls"],
    ]
    for read in reads:
        for output, parse in (("json", json.loads), ("yaml", yaml.safe_load)):
            code = await cli(*base, "-o", output, *read)
            out, err = capsys.readouterr()
            assert (code, err) == (0, ""), read
            assert isinstance(parse(out), dict), (read, output)
    capsys.readouterr()
    assert await cli(*base, "-o", "json", "describe", "hello") == 0
    described = json.loads(capsys.readouterr().out)
    assert described["function"]["name"] == "hello"
    assert [t["name"] for t in described["triggers"]] == ["t1"]
    assert described["url"].endswith(f"/{ns}/hello")


async def test_tables_fit_80_columns(
    admin: RunningGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = f"c{uuid.uuid4().hex[:8]}"
    base = ("--url", admin.url, "-n", ns)
    long_name = "a-long-function-name-for-tables"  # its tables have long messages
    assert await cli(*base, "deploy", str(function_dir), "--name", long_name, "--no-wait") == 0
    capsys.readouterr()
    for read in (["ls"], ["status", long_name], ["describe", long_name]):
        assert await cli(*base, *read) == 0
        out = capsys.readouterr().out
        # Every line but the URL (never cut: it is there to be copied) fits.
        lines = [line for line in out.splitlines() if not line.startswith("URL:")]
        assert max(map(len, lines)) <= 80, (read, out)


async def test_exit_status_of_each_refusal_class(
    gateway: RunningGateway,
    function_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    ns = f"c{uuid.uuid4().hex[:8]}"
    base = ("--url", gateway.url, "-n", ns)
    monkeypatch.delenv("LAMBDABUS_TOKEN", raising=False)
    monkeypatch.setenv("LAMBDABUS_TOKEN_FILE", str(tmp_path / "none" / "admin.token"))

    # 401: no token
    assert await cli(*base, "ls") == 1
    one_error_line(capsys.readouterr().err, "unauthenticated")

    # 403: a viewer may not deploy
    monkeypatch.setenv("LAMBDABUS_TOKEN", gateway.token)
    assert await cli("--url", gateway.url, "token", "create", "v", "--role", "viewer",
                     "--namespace", ns) == 0  # fmt: skip
    viewer = capsys.readouterr().out.strip()
    monkeypatch.setenv("LAMBDABUS_TOKEN", viewer)
    assert await cli(*base, "deploy", str(function_dir), "--name", "hello", "--no-wait") == 1
    one_error_line(capsys.readouterr().err, "forbidden")
    monkeypatch.setenv("LAMBDABUS_TOKEN", gateway.token)

    # 404: every command about one function answers function_not_found
    for command in (["logs", "nosuch"], ["history", "nosuch"], ["status", "nosuch"],
                    ["describe", "nosuch"], ["rm", "nosuch"],
                    ["update", "nosuch", "--replicas", "2"]):  # fmt: skip
        assert await cli(*base, *command) == 1, command
        captured = capsys.readouterr()
        one_error_line(captured.err, "function_not_found")
    # ... and `status` still says not_found, as the README promises
    assert await cli(*base, "status", "nosuch") == 1
    assert "Status:      not_found" in capsys.readouterr().out

    # 400: the platform refuses a setting
    assert await cli(*base, "deploy", str(function_dir), "--name", "hello",
                     "--memory", "lots", "--no-wait") == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: invalid"), err
    assert len(err.strip().splitlines()) == 1

    # 409: it exists already
    assert await cli(*base, "secret", "create", "s1", "--from-literal", "k=v") == 0
    assert await cli(*base, "secret", "create", "s1", "--from-literal", "k=v") == 1
    captured = capsys.readouterr()
    assert "already_exists" in captured.err.splitlines()[-1] or "exists" in captured.err

    # 2: usage errors, checked before any request
    for usage in (["deploy", str(function_dir), "--name", ""],
                  ["deploy", str(function_dir), "--name", "Bad_Name"],
                  ["deploy", str(function_dir)],
                  ["ls", "--output", "xml"],
                  ["update", "hello"],
                  ["frobnicate"]):  # fmt: skip
        assert await cli(*base, *usage) == 2, usage
        one_error_line(capsys.readouterr().err, "usage")


async def test_a_mistyped_command_suggests_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    assert await cli("delpoy", "x") == 2
    err = capsys.readouterr().err
    one_error_line(err, "usage")
    assert "did you mean 'deploy'?" in err
    assert await cli("stauts", "x") == 2
    assert "did you mean 'status'?" in capsys.readouterr().err


async def test_no_arguments_prints_the_help_and_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await cli() == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lambdabus")
    for command in ("deploy", "describe", "update", "init", "completion"):
        assert command in out
    assert await cli("--version") == 0
    assert capsys.readouterr().out.startswith("lambdabus ")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
async def test_completion_scripts(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await cli("completion", shell) == 0
    script = capsys.readouterr().out
    assert "deploy" in script
    assert "describe" in script
    if shell != "bash":
        return
    checked = await asyncio.to_thread(
        subprocess.run, ["bash", "-n"], input=script, text=True, check=False
    )
    assert checked.returncode == 0
    probe = (
        f"source /dev/stdin <<'EOF'\n{script}EOF\n"
        "complete -p lambdabus\n"
        'COMP_WORDS=(lambdabus triggers cr); COMP_CWORD=2; _lambdabus; echo "${COMPREPLY[@]}"\n'
        "COMP_WORDS=(lambdabus -n x deploy . --na); COMP_CWORD=5; _lambdabus; "
        'echo "${COMPREPLY[@]}"\n'
        'COMP_WORDS=(lambdabus des); COMP_CWORD=1; _lambdabus; echo "${COMPREPLY[@]}"\n'
    )
    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", probe], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "complete -o default -F _lambdabus lambdabus",
        "create",
        "--name --namespace",
        "describe",
    ]


async def test_redeploy_keeps_env_and_settings_and_replace_drops_them(
    admin: RunningGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = f"c{uuid.uuid4().hex[:8]}"
    base = ("--url", admin.url, "-n", ns)

    async def spec() -> dict[str, object]:
        capsys.readouterr()
        assert await cli(*base, "-o", "json", "describe", "hello") == 0
        answer: dict[str, object] = json.loads(capsys.readouterr().out)["function"]["spec"]
        return answer

    assert await cli(*base, "deploy", str(function_dir), "--name", "hello", "--env", "A=1",
                     "--replicas", "2", "--no-wait") == 0  # fmt: skip
    (function_dir / "lambda_main.py").write_text("async def main(request):\n    return {1: 1}\n")
    assert await cli(*base, "deploy", str(function_dir), "--name", "hello", "--no-wait") == 0
    kept = await spec()
    assert (kept["env"], kept["replicas"]) == ({"A": "1"}, 2)

    assert await cli(*base, "update", "hello", "--env", "B=2", "--timeout", "7") == 0
    assert "Updated" in capsys.readouterr().out
    updated = await spec()
    assert (updated["env"], updated["timeout"], updated["replicas"]) == (
        {"A": "1", "B": "2"},
        7.0,
        2,
    )

    assert await cli(*base, "deploy", str(function_dir), "--name", "hello", "--replace",
                     "--no-wait") == 0  # fmt: skip
    replaced = await spec()
    assert (replaced["env"], replaced["replicas"]) == ({}, 1)


async def test_deploy_detects_the_runtime_and_says_so(
    admin: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = f"c{uuid.uuid4().hex[:8]}"
    base = ("--url", admin.url, "-n", ns)
    assert await cli(*base, "init", "nodey", "--runtime", "nodejs20", "--dir",
                     str(tmp_path / "nodey")) == 0  # fmt: skip
    capsys.readouterr()
    assert await cli(*base, "deploy", str(tmp_path / "nodey"), "--name", "nodey", "--no-wait") == 0
    out = capsys.readouterr().out
    assert out.startswith("runtime nodejs20 (found handler.js")
    assert await cli(*base, "-o", "json", "describe", "nodey") == 0
    assert json.loads(capsys.readouterr().out)["function"]["spec"]["runtime"] == "nodejs20"


async def test_schedules_create_ls_rm_and_a_broken_cron(
    admin: RunningGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = f"c{uuid.uuid4().hex[:8]}"
    base = ("--url", admin.url, "-n", ns)
    assert await cli(*base, "deploy", str(function_dir), "--name", "hello", "--no-wait") == 0
    capsys.readouterr()

    created = await cli(
        *base, "schedules", "create", "nightly", "--function", "hello",
        "--cron", "30 2 * * *", "--timezone", "Europe/Berlin", "--data", '{"kind": "nightly"}',
    )  # fmt: skip
    out, _ = capsys.readouterr()
    assert created == 0
    assert out.strip() == (
        f"Created schedule {ns}/nightly: 30 2 * * * (Europe/Berlin) -> function hello."
    )
    assert await cli(*base, "schedules", "ls") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "FUNCTION", "CRON", "TIMEZONE", "DELIVERY", "AGE"]
    assert table[1].startswith("nightly")
    assert "30 2 * * *" in table[1]
    assert await cli(*base, "-o", "json", "schedules", "ls") == 0
    [item] = json.loads(capsys.readouterr().out)["items"]
    assert item["data"] == {"kind": "nightly"}

    broken = await cli(
        *base, "schedules", "create", "bad", "--function", "hello", "--cron", "61 * * * *"
    )
    _, err = capsys.readouterr()
    assert broken != 0
    one_error_line(err, "invalid_cron")
    assert "field 1 (minute)" in err

    assert await cli(*base, "schedules", "rm", "nightly") == 0
    assert capsys.readouterr().out.strip() == f"Deleted schedule {ns}/nightly."
    assert await cli(*base, "schedules", "ls") == 0
    assert capsys.readouterr().out.strip() == f"No schedules in namespace {ns}."
