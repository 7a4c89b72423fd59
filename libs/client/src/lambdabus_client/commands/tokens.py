"""`token create|ls|rm`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from lambdabus_client.client import (
    ClientSettings,
    JsonObject,
    LambdabusClient,
)
from lambdabus_client.commands.common import (
    UsageError,
    format_age,
    format_event_time,
    print_data,
    render_table,
)


def token_rows(items: Sequence[JsonObject], now: datetime) -> list[list[str]]:
    rows = []
    for item in items:
        expires = item.get("expires")
        rows.append(
            [
                str(item.get("id", "?")),
                str(item.get("name", "?")),
                str(item.get("role", "?")),
                ",".join(map(str, item.get("namespaces") or [])),
                format_age(item.get("created"), now),
                "expired"
                if item.get("expired")
                else (format_event_time(expires) if expires else "never"),
            ]
        )
    return rows


async def _token(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        if args.action == "create":
            if args.expires_in is not None and args.expires_in < 1:
                raise UsageError("--expires-in must be at least 1 second")
            minted = await client.create_token(
                args.name, args.role, args.token_namespaces, args.expires_in
            )
            if output != "table":
                print_data(output, minted)
            else:
                print(
                    f"Created token {minted.get('id')} ({minted.get('role')} for "
                    f"{', '.join(map(str, minted.get('namespaces') or []))}"
                    f"{', expires ' + str(minted['expires']) if minted.get('expires') else ''}).",
                    file=sys.stderr,
                )
                print("Its secret is shown this once; keep it safe:", file=sys.stderr)
                print(minted.get("token", ""))
            return 0
        if args.action == "rm":
            record = await client.delete_token(args.id)
            if output != "table":
                print_data(output, record)
            else:
                print(f"Revoked token {args.id} ({record.get('name', '?')}).")
            return 0
        items = await client.list_tokens()
    if output != "table":
        print_data(output, {"items": items})
        return 0
    if not items:
        print("No tokens.")
        return 0
    rows = token_rows(items, datetime.now(UTC))
    print(render_table(["ID", "NAME", "ROLE", "NAMESPACES", "AGE", "EXPIRES"], rows))
    return 0
