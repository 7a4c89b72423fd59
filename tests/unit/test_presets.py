"""Kyma presets: resolution (tables, defaults, overrides), the stored form, merge patches, the
CLI's redeploy and the gateway's error for an unknown preset."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lambdabus_client.commands.deploy import merged_spec
from lambdabus_events import presets
from lambdabus_events.models import BuildResources, FunctionConfig, FunctionSpec
from lambdabus_gateway.functions import patched_spec
from lambdabus_gateway.uploads import parse_spec
from lambdabus_platform.errors import InvalidSpec

# Kyma's "Available presets" tables, copied by hand (not from the code under test).
RESOURCES = {  # request cpu, request memory, limit cpu, limit memory
    "XS": (10, 16, 25, 32),
    "S": (25, 32, 50, 64),
    "M": (50, 64, 100, 128),
    "L": (100, 128, 200, 256),
    "XL": (200, 256, 400, 512),
}
REPLICAS = {"S": (1, 1), "M": (1, 2), "L": (1, 5), "XL": (1, 10)}
BUILD = {
    "local-dev": (200, 200, 400, 400),
    "slow": (400, 400, 700, 700),
    "normal": (700, 700, 1100, 1100),
    "fast": (1100, 1100, 1700, 1700),
}


def config(**fields: Any) -> FunctionConfig:
    return FunctionConfig.model_validate(fields)


def test_defaults_are_kymas_m_s_and_normal() -> None:
    c = config()
    assert (c.resources_preset, c.replicas_preset, c.build_preset) == ("M", "S", "normal")
    assert (c.cpu_request, c.memory_request, c.cpu, c.memory) == RESOURCES["M"]
    assert (c.min_replicas, c.max_replicas, c.replicas) == (1, 1, 1)
    assert c.build_resources == BuildResources(
        cpu_request=700, memory_request=700, cpu=1100, memory=1100
    )
    assert c.preset_overrides == []


@pytest.mark.parametrize("name", list(RESOURCES))
def test_resources_presets_have_kymas_values(name: str) -> None:
    c = config(resources_preset=name)
    assert (c.cpu_request, c.memory_request, c.cpu, c.memory) == RESOURCES[name]


@pytest.mark.parametrize("name", list(REPLICAS))
def test_replicas_presets_store_min_and_max_and_run_min(name: str) -> None:
    c = config(replicas_preset=name)
    assert (c.min_replicas, c.max_replicas) == REPLICAS[name]
    assert c.replicas == REPLICAS[name][0]


@pytest.mark.parametrize("name", list(BUILD))
def test_build_presets_have_kymas_values(name: str) -> None:
    b = config(build_preset=name).build_resources
    assert (b.cpu_request, b.memory_request, b.cpu, b.memory) == BUILD[name]


def test_explicit_fields_override_the_preset_and_are_recorded() -> None:
    c = config(resources_preset="L", memory="1Gi", replicas_preset="M")
    assert (c.memory, c.cpu) == (1024, 200)  # memory set, cpu from L
    assert (c.memory_request, c.cpu_request) == (128, 100)
    assert c.preset_overrides == ["memory"]


def test_a_request_above_an_explicit_limit_is_lowered_to_it() -> None:
    c = config(resources_preset="XL", memory=100, cpu=150)
    assert (c.memory_request, c.memory, c.cpu_request, c.cpu) == (100, 100, 150, 150)


def test_an_explicit_request_above_its_limit_is_refused() -> None:
    with pytest.raises(ValidationError, match="more than its limit"):
        config(memory=64, memory_request=100)


def test_explicit_replicas_pins_min_and_max() -> None:
    c = config(replicas=3)
    assert (c.min_replicas, c.max_replicas, c.replicas) == (3, 3, 3)
    assert config(replicas=0).max_replicas == 0  # scaled to zero stays possible


def test_replicas_between_explicit_min_and_max() -> None:
    c = config(replicas_preset="L", replicas=3)
    assert (c.min_replicas, c.max_replicas, c.replicas) == (3, 3, 3)
    c = config(replicas_preset="L", min_replicas=2)
    assert (c.min_replicas, c.max_replicas, c.replicas) == (2, 5, 2)
    with pytest.raises(ValidationError, match="more than max_replicas"):
        config(min_replicas=4, max_replicas=2)


@pytest.mark.parametrize(
    "fields", [{"resources_preset": "XXL"}, {"replicas_preset": "XS"}, {"build_preset": "turbo"}]
)
def test_an_unknown_preset_is_a_400_naming_the_allowed_values(fields: dict[str, str]) -> None:
    (group,) = fields
    with pytest.raises(InvalidSpec) as caught:
        parse_spec({"name": "fn", **fields})
    error = caught.value
    assert (error.status, error.code) == (400, "unknown_preset")
    assert error.details == {"field": group, "allowed": list(presets.allowed(group))}
    assert f"spec.{group}" in error.message
    assert all(name in error.message for name in presets.allowed(group))


def test_a_spec_may_not_set_preset_overrides() -> None:
    with pytest.raises(InvalidSpec, match="set by the platform"):
        parse_spec({"name": "fn", "preset_overrides": []})


def test_the_stored_form_validates_to_itself() -> None:
    spec = parse_spec({"name": "fn", "resources_preset": "S", "cpu": 300, "replicas": 2})
    stored = FunctionConfig.model_validate(spec.model_dump(exclude={"name"}))
    again = FunctionConfig.model_validate(stored.model_dump(mode="json"))
    assert again == stored
    assert stored.preset_overrides == ["cpu", "replicas"]
    assert (stored.memory, stored.cpu, stored.min_replicas, stored.max_replicas) == (64, 300, 2, 2)


def test_a_patched_preset_moves_what_follows_it_and_keeps_the_overrides() -> None:
    current = config(resources_preset="S", cpu=300)
    moved = FunctionConfig.model_validate(patched_spec(current, {"resources_preset": "XL"}))
    assert (moved.memory, moved.cpu, moved.memory_request) == (512, 300, 256)
    assert moved.preset_overrides == ["cpu"]


def test_a_patch_sets_an_override_and_null_returns_it_to_the_preset() -> None:
    current = config(resources_preset="L")
    patched = FunctionConfig.model_validate(patched_spec(current, {"memory": 1000}))
    assert (patched.memory, patched.preset_overrides) == (1000, ["memory"])
    back = FunctionConfig.model_validate(patched_spec(patched, {"memory": None}))
    assert (back.memory, back.preset_overrides) == (256, [])


def test_a_redeploy_from_the_cli_keeps_overrides_and_lets_presets_move() -> None:
    stored = FunctionSpec.model_validate({"name": "fn", "timeout": 5, "cpu": 300})
    current = {"spec": stored.model_dump(mode="json")}
    sent = merged_spec(current, {"name": "fn", "resources_preset": "XL"}, replace=False)
    assert "preset_overrides" not in sent
    assert "memory" not in sent
    assert (sent["cpu"], sent["timeout"], sent["resources_preset"]) == (300, 5.0, "XL")
    again = parse_spec(sent)
    assert (again.memory, again.cpu, again.preset_overrides) == (512, 300, ["cpu"])
