"""`top`: every function of a namespace with its calls, errors, throttles, cold starts and
latency percentiles, refreshed (Kubeless's `function top`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from lambdabus_client.client import ClientSettings, JsonObject, LambdabusClient
from lambdabus_client.commands.common import UsageError, print_data, render_table

_CLEAR = "\x1b[H\x1b[2J"


def _ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def top_rows(metrics: list[JsonObject], window: str) -> list[list[str]]:
    """One row per function: its numbers over `window`, and the calls of the other windows."""
    rows = []
    for item in metrics:
        windows = item.get("windows") if isinstance(item.get("windows"), dict) else {}
        assert isinstance(windows, dict)
        w = windows.get(window) or {}
        rows.append(
            [
                str(item.get("name", "?")),
                *(str(w.get(k, 0)) for k in ("calls", "errors", "throttles", "cold_starts")),
                *(_ms(w.get(f"p{q}_ms")) for q in (50, 95, 99)),
                *(str((windows.get(other) or {}).get("calls", 0)) for other in ("5m", "1h")),
            ]
        )
    return rows


HEADERS = ["NAME", "CALLS", "ERRORS", "THROTTLED", "COLD", "P50ms", "P95ms", "P99ms", "5m", "1h"]


async def _snapshot(client: LambdabusClient, namespace: str) -> list[JsonObject]:
    functions = await client.list_functions(namespace)
    names = sorted(str(f.get("name")) for f in functions)
    return list(await asyncio.gather(*(client.function_metrics(namespace, n) for n in names)))


async def _top(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be more than 0 seconds")
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        while True:
            metrics = await _snapshot(client, namespace)
            if output != "table":
                print_data(output, {"items": metrics})
            else:
                if not args.once and sys.stdout.isatty():
                    sys.stdout.write(_CLEAR)
                if not metrics:
                    print(f"No functions in namespace {namespace}.")
                else:
                    print(f"namespace {namespace}, last 1m (5m and 1h: calls)")
                    print(render_table(HEADERS, top_rows(metrics, "1m")), flush=True)
            if args.once:
                return 0
            await asyncio.sleep(args.interval)
