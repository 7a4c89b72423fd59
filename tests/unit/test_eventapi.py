"""The AsyncAPI document: generated from the subscribers the services register, each naming the
catalog events its subject receives, and `--check` fails on drift."""

from __future__ import annotations

from pathlib import Path

from lambdabus_events.catalog import CATALOG
from lambdabus_platform import eventapi


def test_every_subscription_and_catalog_event_is_a_channel() -> None:
    doc = eventapi.document()
    channels = doc["channels"]
    for subscription in eventapi.SUBSCRIPTIONS.values():
        channel = channels[f"{subscription.service}:{subscription.durable}"]
        assert channel["address"] == subscription.subject
    for cls in CATALOG:
        assert f"lifecycle:{cls.EVENT_TYPE}" in channels
        assert cls.__name__ in doc["components"]["schemas"]


def test_subscribers_name_the_events_their_subject_receives() -> None:
    messages = eventapi.document()["components"]["messages"]
    builds = messages["deployer:deployer-builds:SubscribeMessage"]["payload"]["oneOf"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in builds} == {
        "BuildQueued",
        "BuildStarted",
        "BuildSucceeded",
        "BuildFailed",
    }
    audit = messages["logs:logs-audit:SubscribeMessage"]["payload"]["oneOf"]
    assert len(audit) == len(CATALOG)


def test_subject_matching() -> None:
    assert eventapi._matches("a.*.c", "a.b.c")
    assert not eventapi._matches("a.*.c", "a.b.c.d")
    assert eventapi._matches("a.>", "a.b.c")
    assert not eventapi._matches("a.>", "a")
    assert not eventapi._matches("a.b", "a.c")


def test_check_fails_on_drift(tmp_path: Path) -> None:
    target = tmp_path / "asyncapi.json"
    assert eventapi.main(["--check", "--target", str(target)]) == 1  # missing
    assert eventapi.main(["--target", str(target)]) == 0
    assert eventapi.main(["--check", "--target", str(target)]) == 0
    target.write_text(target.read_text().replace("logs-audit", "logs-other"))
    assert eventapi.main(["--check", "--target", str(target)]) == 1


def test_the_committed_document_is_current() -> None:
    committed = Path(__file__).resolve().parents[2] / "schemas" / "asyncapi.json"
    assert committed.read_text(encoding="utf-8") == eventapi.render()
