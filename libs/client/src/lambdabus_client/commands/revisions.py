"""`revisions`, `traffic` and `rollback`: a function's immutable revisions and how its traffic
splits among them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lambdabus_client.client import ClientSettings, JsonObject, LambdabusClient
from lambdabus_client.commands.common import UsageError, print_data, render_table

LATEST = "@latest"


def parse_traffic(splits: Sequence[str], tags: Sequence[str]) -> list[dict[str, Any]]:
    """`hello-00001=90 @latest=10` and `--tag candidate=@latest` → the route's entries. A tag on
    a revision with no percent adds an entry of 0%."""
    targets: list[dict[str, Any]] = []
    by_target: dict[str, dict[str, Any]] = {}
    for split in splits:
        target, eq, percent = split.partition("=")
        if not eq or not target or not percent.isdigit():
            raise UsageError(f"traffic {split!r}: use REVISION=PERCENT or @latest=PERCENT")
        if target in by_target:
            raise UsageError(f"traffic names {target} twice")
        entry: dict[str, Any] = {"percent": int(percent)}
        entry.update({"latest": True} if target == LATEST else {"revision": target})
        by_target[target] = entry
        targets.append(entry)
    for tag in tags:
        name, eq, target = tag.partition("=")
        if not eq or not name or not target:
            raise UsageError(f"--tag {tag!r}: use TAG=REVISION or TAG=@latest")
        entry = by_target.get(target) or {}
        if not entry:
            entry = {
                "percent": 0,
                **({"latest": True} if target == LATEST else {"revision": target}),
            }
            by_target[target] = entry
            targets.append(entry)
        if "tag" in entry:
            raise UsageError(f"{target} has two tags; one entry carries one tag")
        entry["tag"] = name
    return targets


def rollback_target(items: Sequence[JsonObject], wanted: str | None) -> str:
    """The revision a rollback sends everything to: `wanted`, or the revision before the latest
    ready one (the newest ready one before it; an older one that is not ready at this instant,
    say between two health checks, when none is)."""
    if wanted:
        return wanted
    names = [str(item["name"]) for item in items]
    ready = [i for i, item in enumerate(items) if item.get("ready")]
    latest = ready[-1] if ready else len(items) - 1
    older = [i for i in ready if i < latest] or list(range(latest))
    if not older:
        raise UsageError("no revision before the latest ready one to roll back to")
    return names[older[-1]]


def _route_lines(route: JsonObject) -> list[str]:
    lines = [
        f"Latest created: {route.get('latest_created_revision') or '-'}",
        f"Latest ready:   {route.get('latest_ready_revision') or '-'}",
    ]
    effective = route.get("effective") or {}
    for name, percent in sorted(effective.items()):
        lines.append(f"  {percent:>3}%  {name}")
    for tag, url in sorted((route.get("urls") or {}).items()):
        lines.append(f"URL {tag}: {url}")
    for condition in route.get("conditions") or []:
        if condition.get("status") != "True":
            lines.append(
                f"{condition.get('type')}: {condition.get('status')} {condition.get('message', '')}"
            )
    return lines


async def _revisions(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        answer = await client.revisions(settings.namespace, args.name)
    if output != "table":
        print_data(output, answer)
        return 0
    rows = [
        [
            str(item.get("name")),
            str(item.get("generation")),
            "yes" if item.get("ready") else "no",
            f"{item.get('traffic_percent', 0)}%",
            ",".join(item.get("tags") or []) or "-",
            str(item.get("created", ""))[:19],
        ]
        for item in answer.get("items") or []
    ]
    print(render_table(["REVISION", "GENERATION", "READY", "TRAFFIC", "TAGS", "CREATED"], rows))
    return 0


async def _traffic(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        if args.split or args.tag:
            route = await client.set_traffic(
                settings.namespace, args.name, parse_traffic(args.split, args.tag)
            )
        else:
            route = await client.traffic(settings.namespace, args.name)
    if output != "table":
        print_data(output, route)
    else:
        print("\n".join(_route_lines(route)))
    return 0


async def _rollback(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        items = (await client.revisions(settings.namespace, args.name)).get("items") or []
        target = rollback_target(items, args.revision)
        route = await client.set_traffic(
            settings.namespace, args.name, [{"revision": target, "percent": 100}]
        )
    if output != "table":
        print_data(output, route)
    else:
        print(f"Rolled {settings.namespace}/{args.name} back: 100% to {target}.")
    return 0


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    revisions = commands.add_parser(
        "revisions", parents=[common], help="list a function's revisions and their traffic"
    )
    revisions.add_argument("name")
    traffic = commands.add_parser(
        "traffic",
        parents=[common],
        help="show or set how a function's traffic splits among its revisions",
    )
    traffic.add_argument("name")
    traffic.add_argument(
        "split", nargs="*", help="REVISION=PERCENT or @latest=PERCENT (percents sum to 100)"
    )
    traffic.add_argument(
        "--tag",
        action="append",
        default=[],
        help="TAG=REVISION or TAG=@latest: serve it at /{ns}/{name}@TAG",
    )
    rollback = commands.add_parser(
        "rollback",
        parents=[common],
        help="send 100%% of a function's traffic to a revision (the previous ready one)",
    )
    rollback.add_argument("name")
    rollback.add_argument("revision", nargs="?")


COMMANDS = {"revisions": _revisions, "traffic": _traffic, "rollback": _rollback}
