"""The README's outside auditor, run as it is printed there: `lambdabus credentials audit`
gives the URL and the auditor's key file, and `examples/audit/audit.py` reads LIFECYCLE with
them (nats-py; any NATS client with nkey support does the same)."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lambdabus_events.catalog import FunctionDeleted, FunctionDeletedData, lifecycle_event
from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import NatsServer, run_nats_server

EXAMPLE = Path(__file__).parents[2] / "examples" / "audit" / "audit.py"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def up_dir(tmp_path: Path) -> AsyncIterator[tuple[Path, NatsServer]]:
    """A data dir as `lambdabus up` leaves it: NATS under `<dir>/nats`, streams declared."""
    async with run_nats_server(tmp_path / "nats") as server:
        async with Bus.connect(server.settings(), name="declare") as bus:
            await bus.declare()
        yield tmp_path, server


async def run(*argv: str) -> tuple[int, str, str]:
    """A command's exit code, stdout and stderr (without blocking the NATS server's loop)."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def cli(*args: str) -> tuple[int, str, str]:
    return await run(sys.executable, "-m", "lambdabus_client", *args)


async def test_an_outside_client_audits_with_the_printed_credentials(
    up_dir: tuple[Path, NatsServer],
) -> None:
    data_dir, server = up_dir
    uid = uuid.uuid4().hex
    event = lifecycle_event(
        FunctionDeleted,
        FunctionDeletedData(namespace="team-a", name="fn", uid=uid, generation=1),
        service="gateway",
        subject="team-a/fn",
        key=f"{uid}:deleted",
    )
    async with Bus.connect(server.settings("gateway"), name="gateway") as gateway:
        await gateway.publish_lifecycle(event)

    code, out, err = await cli("credentials", "audit", "--data-dir", str(data_dir), "-o", "json")
    assert code == 0, err
    access = json.loads(out)
    assert access["url"] == server.url
    assert Path(access["nkey_seed_file"]) == server.keys["auditor"].seed_file.resolve()

    _, table, _ = await cli("credentials", "audit", "--data-dir", str(data_dir))
    assert table.split() == ["url", server.url, "nkey", access["nkey_seed_file"]]

    code, out, err = await run(
        sys.executable, str(EXAMPLE), access["url"], access["nkey_seed_file"]
    )
    assert code == 0, err
    [line] = out.splitlines()
    assert line.split()[1:] == ["io.lambdabus.function.deleted", "team-a/fn", event.source]


async def test_no_credentials_before_the_first_start(tmp_path: Path) -> None:
    code, _, err = await cli("credentials", "audit", "--data-dir", str(tmp_path))
    assert code == 1
    assert "no_credentials" in err


def test_the_readme_shows_the_tested_example() -> None:
    """Where README.md shows the auditor example, it shows this file's code, as tested."""
    readme = (EXAMPLE.parents[2] / "README.md").read_text()
    blocks = readme.split("```python\n")[1:]
    shown = [b.split("```", 1)[0] for b in blocks if "_INBOX_auditor" in b]
    for block in shown:
        assert block == EXAMPLE.read_text()
