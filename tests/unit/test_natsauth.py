"""The permission table (pure): who may publish lifecycle events, who reads which bucket, and
the nats.conf block rendered from it."""

from __future__ import annotations

from pathlib import Path

import nkeys
import pytest
from faststream.nats.security import NatsNKey, NatsToken, NatsUserPassword
from pydantic import ValidationError

from lambdabus_events.catalog import CATALOG, TYPE_PREFIX
from lambdabus_platform.bus import connect_options
from lambdabus_platform.natsauth import (
    ACCESS,
    ADMIN,
    AUDITOR,
    SERVICE_USERS,
    USERS,
    inbox_prefix,
    permissions,
    render_authorization,
)
from lambdabus_platform.service import broker_security
from lambdabus_platform.settings import NatsSettings

OWNER = {
    "function": "gateway",
    "trigger": "gateway",
    "build": "builder",
    "deployment": "deployer",
    "revision": "deployer",
    "delivery": "router",
    "secret": "gateway",
    "schedule": "gateway",
}


def test_every_entity_of_the_event_catalog_has_an_owner() -> None:
    """A new lifecycle entity without a publisher would be refused by NATS at run time."""
    entities = {cls.EVENT_TYPE.removeprefix(TYPE_PREFIX).split(".")[0] for cls in CATALOG}
    assert entities == set(OWNER)


@pytest.mark.parametrize("entity", sorted(OWNER))
def test_only_the_owning_service_publishes_an_entitys_lifecycle_events(entity: str) -> None:
    subject = f"lambdabus.lifecycle.{entity}.>"
    publishers = {u for u in USERS if u != ADMIN and subject in permissions(u).publish}
    assert publishers == {OWNER[entity]}


def test_no_service_publishes_lifecycle_with_a_wildcard_entity() -> None:
    for user in (*SERVICE_USERS, AUDITOR):
        for subject in permissions(user).publish:
            assert not subject.startswith(("lambdabus.lifecycle.*", "lambdabus.lifecycle.>"))
            assert subject not in (">", "lambdabus.>")


@pytest.mark.parametrize(
    ("bucket", "readers"),
    [
        ("secrets", {"gateway", "deployer"}),
        ("tokens", {"gateway", "router"}),
        ("quotas", {"gateway", "router", "deployer"}),
    ],
)
def test_sensitive_buckets_are_readable_by_their_users_only(bucket: str, readers: set[str]) -> None:
    get = f"$JS.API.STREAM.MSG.GET.KV_{bucket}"
    assert {u for u in USERS if u != ADMIN and get in permissions(u).publish} == readers


def test_the_auditor_only_consumes_lifecycle() -> None:
    perms = permissions(AUDITOR)
    assert perms.subscribe == (f"{inbox_prefix(AUDITOR)}.>",)
    assert not perms.allow_responses
    for subject in perms.publish:
        assert subject.startswith(("$JS.API.", "$JS.ACK.")), subject
        assert "LIFECYCLE" in subject, subject
    # consumers by name only: the nameless create may name (and so reconfigure) any consumer
    assert "$JS.API.CONSUMER.CREATE.LIFECYCLE" not in perms.publish
    # and never a service's durable
    for name in ("builder", "deployer-builds", "deployer-functions", "logs-audit"):
        assert f"$JS.API.CONSUMER.MSG.NEXT.LIFECYCLE.{name}" in perms.publish_deny
        assert f"$JS.ACK.LIFECYCLE.{name}.>" in perms.publish_deny


def test_a_service_keeps_its_own_durables_and_not_the_others() -> None:
    logs = permissions("logs")
    assert "$JS.API.CONSUMER.MSG.NEXT.LIFECYCLE.logs-audit" not in logs.publish_deny
    assert "$JS.API.CONSUMER.MSG.NEXT.LIFECYCLE.builder" in logs.publish_deny


def test_every_user_has_its_own_inbox() -> None:
    for user in (*SERVICE_USERS, AUDITOR):
        perms = permissions(user)
        inboxes = [s for s in perms.subscribe if s.startswith("_INBOX")]
        assert inboxes == [f"{inbox_prefix(user)}.>"]
        assert not any(s.startswith("_INBOX") for s in perms.publish)


def test_only_the_logs_service_answers_requests() -> None:
    assert [u for u in USERS if permissions(u).allow_responses] == ["logs"]


def test_no_service_may_change_a_stream() -> None:
    for user in (*SERVICE_USERS, AUDITOR):
        for subject in permissions(user).publish:
            for verb in ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE"):
                assert verb not in subject, (user, subject)


def test_the_config_has_every_user_and_no_anonymous_access() -> None:
    keys = dict.fromkeys(ACCESS, "U" + "A" * 55)
    text = render_authorization(keys)
    assert text.count("nkey:") == len(ACCESS)
    assert "no_auth_user" not in text
    assert "allow_responses: true" in text


def test_a_malformed_key_is_not_rendered() -> None:
    with pytest.raises(ValueError, match="public nkey"):
        render_authorization({"gateway": 'U"]} ; users = [{user: x'})


def test_settings_carry_each_kind_of_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An operator of an external NATS gives credentials through the environment; the bus and
    FastStream's broker both connect with them."""
    seed = tmp_path / "svc.nk"
    monkeypatch.setenv("LAMBDABUS_NATS_NKEY_SEED_FILE", str(seed))
    monkeypatch.setenv("LAMBDABUS_NATS_INBOX_PREFIX", "_INBOX_svc")
    settings = NatsSettings()
    assert connect_options(settings) == {"inbox_prefix": "_INBOX_svc", "nkeys_seed": str(seed)}
    seed.write_bytes(nkeys.encode_seed(b"\x02" * 32, nkeys.PREFIX_BYTE_USER))
    assert isinstance(broker_security(settings), NatsNKey)

    monkeypatch.delenv("LAMBDABUS_NATS_NKEY_SEED_FILE")
    monkeypatch.setenv("LAMBDABUS_NATS_USER", "svc")
    monkeypatch.setenv("LAMBDABUS_NATS_PASSWORD", "pw")
    settings = NatsSettings()
    assert "pw" not in repr(settings)
    options = connect_options(settings)
    assert (options["user"], options["password"]) == ("svc", "pw")
    security = broker_security(settings)
    assert isinstance(security, NatsUserPassword)

    monkeypatch.delenv("LAMBDABUS_NATS_USER")
    monkeypatch.delenv("LAMBDABUS_NATS_PASSWORD")
    monkeypatch.setenv("LAMBDABUS_NATS_TOKEN", "tok")
    assert isinstance(broker_security(NatsSettings()), NatsToken)
    assert connect_options(NatsSettings())["token"] == "tok"


def test_an_inbox_prefix_with_wildcards_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDABUS_NATS_INBOX_PREFIX", "_INBOX.>")
    with pytest.raises(ValidationError):
        NatsSettings()


def test_autoscaling_rights_routers_report_and_wake_the_deployer_listens() -> None:
    router, deployer = permissions("router"), permissions("deployer")
    assert "$KV.function-load.>" in router.publish
    assert "lambdabus.wake.>" in router.publish
    assert "lambdabus.wake.>" in deployer.subscribe
    assert "$JS.API.DIRECT.GET.KV_function-load.>" in deployer.publish
    assert "$KV.function-load.>" not in deployer.publish  # it reads the samples only
    assert not deployer.allow_responses  # it answers no wake request
    others = [u for u in USERS if u != "deployer"]
    assert not any("lambdabus.wake.>" in permissions(u).subscribe for u in others)
