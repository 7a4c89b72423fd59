"""The lifecycle catalog on the wire: CloudEvents SDK round trips, ids, validation, JSON Schemas."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from pydantic import ValidationError

from lambdabus_events import cloudevents_io, schemagen
from lambdabus_events.catalog import (
    CATALOG,
    BuildFailed,
    BuildFailedData,
    BuildQueued,
    BuildQueuedData,
    BuildStarted,
    BuildStartedData,
    BuildSucceeded,
    BuildSucceededData,
    DeliveryDeadlettered,
    DeliveryDeadletteredData,
    DeploymentData,
    DeploymentFailed,
    DeploymentReady,
    DeploymentScaled,
    DeploymentScaledData,
    DeploymentStarted,
    DeploymentStopped,
    FunctionCreated,
    FunctionCreatedData,
    FunctionDeleted,
    FunctionDeletedData,
    FunctionSpecSummary,
    FunctionUpdated,
    FunctionUpdatedData,
    LifecycleEvent,
    RevisionCreated,
    RevisionData,
    RevisionDeleted,
    RevisionReady,
    ScheduleCreated,
    ScheduleData,
    ScheduleDeleted,
    SecretCreated,
    SecretData,
    SecretDeleted,
    SecretUpdated,
    Service,
    TriggerCreated,
    TriggerData,
    TriggerDeleted,
    lifecycle_event,
    parse_lifecycle,
    schema_url,
)
from lambdabus_events.models import FunctionConfig, SourceRef, env_digest

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
TIME = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)

_REF: dict[str, Any] = {"namespace": "team-a", "name": "hello", "uid": "0b7c", "generation": 3}
_SOURCE = SourceRef(sha256="ab" * 32, size=1234, kind="archive", entrypoint="handler.py", files=2)
_SPEC = FunctionConfig(runtime="nodejs20", env={"GREETING": "hé / 100%"}, memory=1024)
_BUILD: dict[str, Any] = {**_REF, "source_sha256": "ab" * 32, "runtime": "python3.11"}
_DEPLOY = DeploymentData(**_REF, replicas=2, ready_replicas=1, reason="Scaling", message="1 of 2")
_SCALED = DeploymentScaledData(
    **_REF,
    replicas=4,
    ready_replicas=1,
    reason="Panic",
    message="1 -> 4 instances (Panic)",
    from_replicas=1,
    to_replicas=4,
)
_TRIGGER = TriggerData(
    namespace="team-a", name="on-upload", function="hello", filter={"type": "com.example.up"}
)
_SCHEDULE = ScheduleData(
    namespace="team-a", name="nightly", function="hello", cron="30 2 * * *", timezone="UTC"
)
_SECRET = SecretData(namespace="team-a", name="hello", keys=["password"], version=2)

# One (service, data) per catalog type; test_every_type_has_a_sample keeps it complete.
_REVISION = RevisionData(
    namespace="team-a", name="hello", uid="u-1", generation=3, revision="hello-00002"
)
SAMPLES: dict[type[LifecycleEvent], tuple[Service, Any]] = {
    FunctionCreated: (
        "gateway",
        FunctionCreatedData(
            **_REF, spec=FunctionSpecSummary.of(_SPEC, salt="test-salt"), source=_SOURCE
        ),
    ),
    FunctionUpdated: (
        "gateway",
        FunctionUpdatedData(
            **_REF,
            spec=FunctionSpecSummary.of(_SPEC, salt="test-salt"),
            source=_SOURCE,
            changes=["source", "config"],
        ),
    ),
    FunctionDeleted: ("gateway", FunctionDeletedData(**_REF)),
    BuildQueued: ("builder", BuildQueuedData(**_BUILD)),
    BuildStarted: ("builder", BuildStartedData(**_BUILD)),
    BuildSucceeded: (
        "builder",
        BuildSucceededData(
            **_BUILD, artifact="local:ab12", duration_seconds=1.25, dependencies_cached=True
        ),
    ),
    BuildFailed: (
        "builder",
        BuildFailedData(**_BUILD, reason="DependencyError", message='pip: "nope" not found'),
    ),
    DeploymentStarted: ("deployer", _DEPLOY),
    DeploymentReady: ("deployer", _DEPLOY),
    DeploymentFailed: ("deployer", _DEPLOY),
    DeploymentScaled: ("deployer", _SCALED),
    DeploymentStopped: ("deployer", _DEPLOY),
    TriggerCreated: ("gateway", _TRIGGER),
    TriggerDeleted: ("gateway", _TRIGGER),
    ScheduleCreated: ("gateway", _SCHEDULE),
    ScheduleDeleted: ("gateway", _SCHEDULE),
    SecretCreated: ("gateway", _SECRET),
    SecretUpdated: ("gateway", _SECRET),
    SecretDeleted: ("gateway", _SECRET),
    DeliveryDeadlettered: (
        "router",
        DeliveryDeadletteredData(
            namespace="team-a",
            trigger="on-upload",
            function="hello",
            event_id="e-1",
            event_source="/uploads",
            event_type="com.example.up",
            attempts=5,
            reason="HTTP 500",
        ),
    ),
    RevisionCreated: ("deployer", _REVISION),
    RevisionReady: ("deployer", _REVISION),
    RevisionDeleted: ("deployer", _REVISION),
}


def sample(cls: type[LifecycleEvent], *, key: str = "0b7c/3") -> LifecycleEvent:
    service, data = SAMPLES[cls]
    return lifecycle_event(cls, data, service=service, subject="team-a/hello", key=key, time=TIME)


def test_every_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(CATALOG)


# --- CloudEvents SDK round trips -------------------------------------------------------------


@pytest.mark.parametrize("cls", CATALOG, ids=lambda cls: cls.EVENT_TYPE)
def test_round_trips(cls: type[LifecycleEvent]) -> None:
    event = sample(cls)

    stored = cloudevents_io.to_json(event)
    assert json.loads(stored)["type"] == cls.EVENT_TYPE
    assert parse_lifecycle(stored) == event

    headers, body = cloudevents_io.to_http_binary(event)
    assert headers["ce-type"] == cls.EVENT_TYPE
    assert headers["ce-id"] == event.id
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == event.data.model_dump(mode="json")
    decoded = cloudevents_io.from_http(headers, body)
    assert type(decoded) is cls
    assert decoded == event

    headers, body = cloudevents_io.to_http_structured(event)
    assert headers == {"content-type": "application/cloudevents+json"}
    decoded = cloudevents_io.from_http(headers, body)
    assert type(decoded) is cls
    assert decoded == event

    assert cloudevents_io.from_cloudevent(cloudevents_io.to_cloudevent(event)) == event


def test_binary_mode_headers_are_case_insensitive_and_offsets_survive() -> None:
    event = sample(FunctionCreated).model_copy(
        update={"time": datetime(2025, 3, 4, 7, 6, 7, tzinfo=timezone(timedelta(hours=2)))}
    )
    headers, body = cloudevents_io.to_http_binary(event)
    title_cased = {name.title(): value for name, value in headers.items()}  # as proxies send them
    decoded = cloudevents_io.from_http(title_cased, body)
    assert decoded == event
    assert decoded.time.utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"content-type": "application/cloudevents+json"}, b"not json"),
        ({"content-type": "application/cloudevents+json"}, b"[1, 2]"),
        ({"content-type": "application/cloudevents+json"}, b'{"id": 7}'),
        ({"ce-id": "1", "ce-source": "/lambdabus/gateway", "ce-specversion": "1.0"}, b"{}"),
    ],
    ids=["not-json", "json-array", "bad-attributes", "binary-without-type"],
)
def test_from_http_reports_undecodable_messages_as_validation_errors(
    headers: dict[str, str], body: bytes
) -> None:
    with pytest.raises(ValidationError):
        cloudevents_io.from_http(headers, body)


def test_from_http_rejects_an_unknown_type_in_binary_mode() -> None:
    headers, body = cloudevents_io.to_http_binary(sample(FunctionDeleted))
    headers["ce-type"] = "io.lambdabus.function.renamed"
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        cloudevents_io.from_http(headers, body)


# --- ids and validation ----------------------------------------------------------------------


def test_ids_are_deterministic() -> None:
    first, again = sample(BuildSucceeded), sample(BuildSucceeded)
    assert first.id == again.id
    assert cloudevents_io.to_json(first) == cloudevents_io.to_json(again)
    assert sample(BuildSucceeded, key="0b7c/4").id != first.id
    assert sample(BuildFailed).id != first.id  # the type is part of the key


def _stored(cls: type[LifecycleEvent]) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(cloudevents_io.to_json(sample(cls)))
    return raw


def test_parse_lifecycle_rejects_an_unknown_type() -> None:
    raw = _stored(FunctionDeleted) | {"type": "io.lambdabus.function.renamed"}
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        parse_lifecycle(json.dumps(raw))


def test_parse_lifecycle_rejects_data_of_the_wrong_shape() -> None:
    # build.failed attributes carrying build.succeeded data: extra and missing fields.
    raw = _stored(BuildFailed) | {"data": _stored(BuildSucceeded)["data"]}
    with pytest.raises(ValidationError) as caught:
        parse_lifecycle(json.dumps(raw))
    problems = {(e["type"], e["loc"][-1]) for e in caught.value.errors()}
    assert ("missing", "reason") in problems
    assert ("extra_forbidden", "artifact") in problems


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("time", "2025-03-04T05:06:07"),  # no offset: not RFC 3339
        ("subject", "team-a"),  # not <namespace>/<name>
        ("subject", "team-a/Hello"),
        ("source", "/elsewhere/gateway"),
        ("id", ""),
    ],
)
def test_parse_lifecycle_rejects_bad_attributes(field: str, value: str) -> None:
    raw = _stored(FunctionDeleted) | {field: value}
    with pytest.raises(ValidationError) as caught:
        parse_lifecycle(json.dumps(raw))
    assert any(field in e["loc"] for e in caught.value.errors())


# --- JSON Schemas ----------------------------------------------------------------------------


def test_schemas_on_disk_are_up_to_date() -> None:
    rendered = schemagen.render_event_schemas()
    on_disk = {
        path.relative_to(SCHEMAS_DIR).as_posix(): path.read_text(encoding="utf-8")
        for path in (SCHEMAS_DIR / "events").glob("*.json")
    }
    assert on_disk == rendered, "event schemas drifted; run `make schemas`"


def test_rendering_is_deterministic_and_indexed() -> None:
    rendered = schemagen.render_event_schemas()
    assert schemagen.render_event_schemas() == rendered
    assert all(text.endswith("}\n") for text in rendered.values())
    index = json.loads(rendered["events/index.json"])
    assert index == {"types": {cls.EVENT_TYPE: f"{cls.EVENT_TYPE}.json" for cls in CATALOG}}
    listed = {f"events/{name}" for name in index["types"].values()}
    assert set(rendered) == {"events/index.json"} | listed


@pytest.mark.parametrize("cls", CATALOG, ids=lambda cls: cls.EVENT_TYPE)
def test_schema_describes_its_type(cls: type[LifecycleEvent]) -> None:
    schema = json.loads(schemagen.render_event_schemas()[f"events/{cls.EVENT_TYPE}.json"])
    Draft202012Validator.check_schema(schema)
    assert schema["$id"] == schema_url(cls.EVENT_TYPE)
    assert schema["properties"]["type"]["const"] == cls.EVENT_TYPE
    assert {"id", "source", "specversion", "type", "data"} <= set(schema["required"])
    data_ref = schema["properties"]["data"]["$ref"]
    data_schema = schema["$defs"][data_ref.removeprefix("#/$defs/")]
    assert set(data_schema["properties"]) == set(type(SAMPLES[cls][1]).model_fields)

    validator = Draft202012Validator(schema)
    event = sample(cls)
    assert event.dataschema == schema["$id"]
    validator.validate(json.loads(cloudevents_io.to_json(event)))
    other = next(other for other in CATALOG if other is not cls)
    assert not validator.is_valid(json.loads(cloudevents_io.to_json(sample(other))))
    wrong_data = json.loads(cloudevents_io.to_json(event))
    wrong_data["data"]["unexpected"] = 1
    assert not validator.is_valid(wrong_data)


def _copy_schemas(tmp_path: Path) -> Path:
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR / "events", root / "events")
    return root


def test_check_passes_on_a_faithful_copy(tmp_path: Path) -> None:
    assert schemagen.main(["--check", "--root", str(_copy_schemas(tmp_path))]) == 0


def test_check_names_each_drifted_file_and_write_repairs_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_schemas(tmp_path)
    altered = root / "events" / "io.lambdabus.build.failed.json"
    altered.write_text(altered.read_text(encoding="utf-8").replace("Reason", "Raison"))
    (root / "events" / "io.lambdabus.function.created.json").unlink()
    (root / "events" / "io.lambdabus.function.renamed.json").write_text("{}\n")

    assert schemagen.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"different: {altered}" in err
    assert "missing: " in err
    assert "function.created.json" in err
    assert "stale: " in err
    assert "function.renamed.json" in err
    assert "run `make schemas`" in err
    assert not (root / "events" / "io.lambdabus.function.created.json").exists()  # check only

    assert schemagen.main(["--root", str(root)]) == 0
    assert schemagen.main(["--check", "--root", str(root)]) == 0
    assert not (root / "events" / "io.lambdabus.function.renamed.json").exists()


def test_check_cli_exit_status(tmp_path: Path) -> None:
    root = _copy_schemas(tmp_path)
    command = [sys.executable, "-m", "lambdabus_events.schemagen", "--check", "--root", str(root)]
    assert subprocess.run(command, capture_output=True, check=False).returncode == 0
    index = root / "events" / "index.json"
    index.write_text(index.read_text(encoding="utf-8") + " ")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert f"different: {index}" in result.stderr


def test_function_events_carry_env_keys_and_a_digest_not_values() -> None:
    event = sample(FunctionCreated)
    raw = event.model_dump_json()
    assert "hé / 100%" not in raw
    spec = event.model_dump(mode="json")["data"]["spec"]
    assert spec["env_keys"] == ["GREETING"]
    assert "env" not in spec
    # keyed by the function's salt: equal for an equal env, unguessable without the salt
    assert spec["env_digest"] == env_digest({"GREETING": "hé / 100%"}, "test-salt")
    assert spec["env_digest"] != env_digest({"GREETING": "hé / 100%"}, "other-salt")
    plain = json.dumps([["GREETING", "hé / 100%"]], separators=(",", ":"), ensure_ascii=False)
    assert spec["env_digest"] != hashlib.sha256(plain.encode()).hexdigest()
    # an event stored before, with the values, is read back without them
    old = json.loads(raw)
    old["data"]["spec"] = {"runtime": "nodejs20", "env": {"GREETING": "hé / 100%"}}
    reread = parse_lifecycle(json.dumps(old))
    assert "hé / 100%" not in reread.model_dump_json()
    assert reread.model_dump()["data"]["spec"]["env_digest"] != spec["env_digest"]


def test_the_spec_summary_has_every_field_but_the_env() -> None:
    summary = set(FunctionSpecSummary.model_fields) - {"env_keys", "env_digest"}
    assert summary == set(FunctionConfig.model_fields) - {"env"}
