"""The CLI's reading of `lambdabus traffic` and `rollback` (pure)."""

from __future__ import annotations

import pytest

from lambdabus_client.commands.common import UsageError
from lambdabus_client.commands.revisions import parse_traffic, rollback_target


def test_traffic_split_and_tags() -> None:
    assert parse_traffic(["hello-00001=90", "@latest=10"], ["candidate=@latest"]) == [
        {"percent": 90, "revision": "hello-00001"},
        {"percent": 10, "latest": True, "tag": "candidate"},
    ]
    # a tag on a revision without a percent: an entry of 0%
    assert parse_traffic(["@latest=100"], ["old=hello-00001"]) == [
        {"percent": 100, "latest": True},
        {"percent": 0, "revision": "hello-00001", "tag": "old"},
    ]


@pytest.mark.parametrize(
    ("splits", "tags"),
    [
        (["hello-00001"], []),
        (["hello-00001=x"], []),
        (["@latest=5", "@latest=95"], []),
        ([], ["x"]),
    ],
)
def test_bad_traffic_is_a_usage_error(splits: list[str], tags: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_traffic(splits, tags)


def test_rollback_goes_to_the_ready_revision_before_the_latest_ready() -> None:
    items = [
        {"name": "hello-00001", "ready": True},
        {"name": "hello-00002", "ready": True},
        {"name": "hello-00003", "ready": False},
    ]
    assert rollback_target(items, None) == "hello-00001"
    assert rollback_target(items, "hello-00002") == "hello-00002"
    assert rollback_target([items[0], {**items[1], "ready": False}, items[1]], None) == (
        "hello-00001"
    )
    assert rollback_target([{**items[0], "ready": False}, items[1]], None) == "hello-00001"
    with pytest.raises(UsageError):
        rollback_target(items[:1], None)
