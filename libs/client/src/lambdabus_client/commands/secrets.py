"""`secret create|set|ls|rm`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lambdabus_client.client import (
    ClientSettings,
    LambdabusClient,
)
from lambdabus_client.commands.common import (
    UsageError,
    parse_assignments,
    print_data,
    render_table,
)


def secret_data(literals: Sequence[str], files: Sequence[str]) -> dict[str, str]:
    """A secret's data from `--from-literal KEY=VALUE` and `--from-file KEY=PATH` (as kubectl)."""
    data = parse_assignments(literals, "--from-literal")
    for pair in files:
        key, separator, path = pair.partition("=")
        if not separator or not key or not path:
            raise UsageError(f"--from-file {pair!r} is not KEY=PATH")
        try:
            data[key] = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--from-file {key}: cannot read {path} as text: {exc}") from exc
    if not data:
        raise UsageError("a secret needs at least one --from-literal or --from-file")
    return data


async def _secret(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        if args.action in ("create", "set"):
            data = secret_data(args.literals, args.files)
            if args.action == "create":
                info = await client.create_secret(namespace, args.name, data)
            else:
                info = await client.replace_secret(namespace, args.name, data)
            if output != "table":
                print_data(output, info)
            else:
                verb = "Created" if args.action == "create" else "Replaced"
                keys = ", ".join(map(str, info.get("keys") or []))
                print(f"{verb} secret {namespace}/{args.name} (keys: {keys}).")
            return 0
        if args.action == "rm":
            await client.delete_secret(namespace, args.name)
            if output == "table":
                print(f"Deleted secret {namespace}/{args.name}.")
            return 0
        items = await client.list_secrets(namespace)
    if output != "table":
        print_data(output, {"items": items})
        return 0
    if not items:
        print(f"No secrets in namespace {namespace}.")
        return 0
    rows = [[str(i.get("name", "")), ", ".join(map(str, i.get("keys") or []))] for i in items]
    print(render_table(["NAME", "KEYS"], rows))
    return 0
