"""`lambdabus sync NAME`: look at a git-sourced function's reference now (it is polled anyway)."""

from __future__ import annotations

import argparse

from lambdabus_client.client import ClientSettings, LambdabusClient
from lambdabus_client.commands.common import print_data


async def _sync(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        record = await client.sync_function(settings.namespace, args.name)
    if output != "table":
        print_data(output, record)
        return 0
    source = record.get("source")
    git = source.get("git") if isinstance(source, dict) else None
    git = git if isinstance(git, dict) else {}
    commit = str(git.get("commit", ""))[:12] or "-"
    print(
        f"{settings.namespace}/{args.name}: generation {record.get('generation', '-')}, "
        f"commit {commit}"
    )
    if git.get("reason"):
        print(f"{git['reason']}: {git.get('message', '')}")
    return 1 if git.get("reason") == "SourceUpdateFailed" else 0
