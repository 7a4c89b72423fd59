"""Pure rules of secrets and quotas: resolving a function's secrets into what it runs, the
API's checks of a secret body (no value ever in a message), and the quota arithmetic."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from lambdabus_client.commands.events import summarize_event
from lambdabus_deployer.plan import Failure, ResolvedSecrets, resolve_secrets
from lambdabus_events.models import FunctionConfig, FunctionRecord, Quota
from lambdabus_gateway.quotas import Usage, quota_problem, usage_of
from lambdabus_gateway.secrets import parse_secret_body
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.launcher import SERVICES, Platform, UpSettings
from lambdabus_platform.natskeys import ensure_keys
from lambdabus_platform.natsserver import NatsServer

SPEC = FunctionConfig(
    secrets=["db", "tls"],
    env_from={"DB_PASSWORD": {"secret": "db", "key": "password"}},  # type: ignore[dict-item]
)


def test_secrets_resolve_to_files_and_env() -> None:
    found = {"db": {"password": "pw", "user": "app"}, "tls": {"cert.pem": "C"}}
    resolved = resolve_secrets("ns", SPEC, found)
    assert isinstance(resolved, ResolvedSecrets)
    assert resolved.files == (
        ("db", (("password", b"pw"), ("user", b"app"))),
        ("tls", (("cert.pem", b"C"),)),
    )
    assert resolved.env == (("DB_PASSWORD", "pw"),)
    assert "pw" not in repr(resolved)


@pytest.mark.parametrize(
    ("found", "says"),
    [
        ({"db": {"password": "pw"}}, "secret tls does not exist in namespace ns"),
        ({"tls": {"x": "y"}}, "secret db does not exist in namespace ns"),
        ({"db": {"user": "hidden-value"}, "tls": {}}, "secret db has no key password"),
    ],
)
def test_a_missing_secret_or_key_is_secret_not_found(
    found: dict[str, dict[str, str]], says: str
) -> None:
    failure = resolve_secrets("ns", SPEC, found)
    assert isinstance(failure, Failure)
    assert failure.reason == "SecretNotFound"
    assert says in failure.message
    assert "hidden-value" not in failure.message


def test_no_secrets_resolve_to_nothing() -> None:
    assert resolve_secrets("ns", FunctionConfig(), {}) == ResolvedSecrets()


@pytest.mark.parametrize(
    "body",
    [
        {"name": "db", "data": {"k": 1}},
        {"name": "db", "data": {"bad key": "v"}},
        {"name": "db", "data": {"k": "x" * 70_000}},
        {"name": "DB", "data": {"k": "v"}},
        {"name": "db", "data": {"k": "v"}, "unknown": "v"},
        ["db"],
    ],
)
def test_a_bad_body_is_refused_without_its_values(body: Any) -> None:
    with pytest.raises(LambdabusError) as caught:
        parse_secret_body(body)
    assert caught.value.status in (400, 413)
    assert "xxxxxxxx" not in caught.value.message


def test_a_body_name_must_match_the_path() -> None:
    assert parse_secret_body({"data": {"k": "v"}}, name="db").name == "db"
    with pytest.raises(LambdabusError, match="does not match"):
        parse_secret_body({"name": "other", "data": {"k": "v"}}, name="db")


def _record(name: str, replicas: int) -> FunctionRecord:
    return FunctionRecord.model_validate(
        {
            "namespace": "ns",
            "name": name,
            "uid": name,
            "generation": 1,
            "spec": {"replicas": replicas},
            "source": {
                "sha256": "a" * 64,
                "size": 1,
                "kind": "inline",
                "entrypoint": "lambda_main.py",
                "files": 1,
            },
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
        }
    )


def test_quota_arithmetic() -> None:
    records = [_record("a", 2), _record("b", 3)]
    assert usage_of(records) == Usage(functions=2, instances=5)
    assert usage_of(records, without="b") == Usage(functions=1, instances=2)
    quota = Quota(max_functions=2, max_instances=6)
    full = quota_problem("ns", quota, usage_of(records), adds_function=True, replicas=1)
    assert full is not None
    assert "2 of at most 2 functions" in full
    assert "delete" in full
    too_many = quota_problem(
        "ns", quota, usage_of(records, without="a"), adds_function=False, replicas=4
    )
    assert too_many is not None
    assert "7 instances" in too_many
    assert "lower replicas" in too_many
    fits = quota_problem(
        "ns", quota, usage_of(records, without="a"), adds_function=False, replicas=3
    )
    assert fits is None


def test_an_override_takes_the_defaults_it_does_not_set() -> None:
    defaults = Quota(max_functions=100, max_instances=50, max_concurrent_invocations=1000)
    assert Quota(max_instances=5).over(defaults) == Quota(
        max_functions=100, max_instances=5, max_concurrent_invocations=1000
    )


def test_only_the_gateway_and_the_deployer_are_told_where_the_key_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMBDABUS_SECRETS_KEY", "c2VjcmV0")
    platform = Platform(UpSettings(data_dir=tmp_path), out=io.StringIO(), err=io.StringIO())
    keys = ensure_keys(tmp_path / "keys", SERVICES)
    nats = NatsServer(url="nats://127.0.0.1:1", port=1, process=None, keys=keys)  # type: ignore[arg-type]
    for service in ("gateway", "deployer"):
        env = platform.env_for(service, nats)
        assert env["LAMBDABUS_SECRETS_KEY_FILE"] == str(tmp_path.resolve() / "secrets.key")
        assert env["LAMBDABUS_SECRETS_KEY"] == "c2VjcmV0"
    for service in ("router", "builder", "logs"):
        env = platform.env_for(service, nats)
        assert not [k for k in env if k.startswith("LAMBDABUS_SECRETS_")], service


def test_the_cli_summarizes_a_secret_event_by_its_key_names() -> None:
    event = {
        "type": "io.lambdabus.secret.updated",
        "data": {"namespace": "ns", "name": "db", "keys": ["password", "user"], "version": 3},
    }
    assert summarize_event(event) == "version 3, keys password, user"
