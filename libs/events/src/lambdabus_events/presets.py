"""Kyma's presets (pure): named groups of resource, replica and build-resource values.

A function names a preset per group (`resources_preset`, `replicas_preset`, `build_preset`;
default `M`, `S`, `normal` as Kyma's) and gets its values for every field of the group it does
not set itself. Which fields were set explicitly is kept (`preset_overrides`), so that a later
change of preset moves the fields that still follow it and leaves the overridden ones alone.

Units: cpu in millicores, memory in MiB (Kyma's `Mi`). Our `memory`/`cpu` are the limits an
instance runs under; the requests are kept for a scheduler (the local backend has none).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

ResourcesPreset = Literal["XS", "S", "M", "L", "XL"]
ReplicasPreset = Literal["S", "M", "L", "XL"]
BuildPreset = Literal["local-dev", "slow", "normal", "fast"]

DEFAULT_RESOURCES_PRESET: ResourcesPreset = "M"
DEFAULT_REPLICAS_PRESET: ReplicasPreset = "S"
DEFAULT_BUILD_PRESET: BuildPreset = "normal"


@dataclass(frozen=True)
class Resources:
    """Requests and limits: cpu in millicores, memory in MiB."""

    request_cpu: int
    request_memory: int
    limit_cpu: int
    limit_memory: int


# Kyma's tables ("Available presets"), value for value.
RESOURCES_PRESETS: Mapping[ResourcesPreset, Resources] = {
    "XS": Resources(10, 16, 25, 32),
    "S": Resources(25, 32, 50, 64),
    "M": Resources(50, 64, 100, 128),
    "L": Resources(100, 128, 200, 256),
    "XL": Resources(200, 256, 400, 512),
}
REPLICAS_PRESETS: Mapping[ReplicasPreset, tuple[int, int]] = {  # (min, max)
    "S": (1, 1),
    "M": (1, 2),
    "L": (1, 5),
    "XL": (1, 10),
}
BUILD_PRESETS: Mapping[BuildPreset, Resources] = {
    "local-dev": Resources(200, 200, 400, 400),
    "slow": Resources(400, 400, 700, 700),
    "normal": Resources(700, 700, 1100, 1100),
    "fast": Resources(1100, 1100, 1700, 1700),
}

PRESET_FIELDS: Mapping[str, tuple[str, ...]] = {
    "resources_preset": ("memory", "cpu", "memory_request", "cpu_request"),
    "replicas_preset": ("min_replicas", "max_replicas", "replicas"),
    "build_preset": ("build_resources",),
}
GOVERNED = tuple(field for fields in PRESET_FIELDS.values() for field in fields)
OVERRIDES_KEY = "preset_overrides"

_ALLOWED: Mapping[str, tuple[str, ...]] = {
    "resources_preset": get_args(ResourcesPreset),
    "replicas_preset": get_args(ReplicasPreset),
    "build_preset": get_args(BuildPreset),
}
_DEFAULTS: Mapping[str, str] = {
    "resources_preset": DEFAULT_RESOURCES_PRESET,
    "replicas_preset": DEFAULT_REPLICAS_PRESET,
    "build_preset": DEFAULT_BUILD_PRESET,
}


class UnknownPreset(ValueError):
    """A preset name that is not in its table; the message names the allowed ones."""


def allowed(group: str) -> tuple[str, ...]:
    """The preset names of a group (`resources_preset`, `replicas_preset`, `build_preset`)."""
    return _ALLOWED[group]


def preset_problem(group: str, value: object) -> str | None:
    """Why `value` is not a preset of `group` (naming the allowed values), or None."""
    allowed = _ALLOWED[group]
    if value in allowed:
        return None
    return f"unknown {group} {value!r}: must be one of {', '.join(allowed)}"


def _memory_mib(value: object) -> object:
    """A memory quantity as the spec accepts it ("64Mi", "1Gi", 64) in MiB, else unchanged."""
    if isinstance(value, str):
        text = value.strip()
        for unit, factor in (("Gi", 1024), ("G", 1024), ("Mi", 1), ("M", 1)):
            if text.endswith(unit) and text[: -len(unit)].isdigit():
                return int(text[: -len(unit)]) * factor
        if text.isdigit():
            return int(text)
    return value


def resolve(data: Mapping[str, Any]) -> dict[str, Any]:
    """A spec (as JSON) with every field a preset governs filled in: from the spec where it
    sets the field (or, in the stored form, where `preset_overrides` says it did), else from
    its preset. Also `preset_overrides`: the governed fields that were set explicitly.

    Rules beyond the tables: an explicit `replicas` (what runs today) without explicit
    `min_replicas`/`max_replicas` pins both to it; without an explicit `replicas`, it is
    `min_replicas` (autoscaling between min and max comes later). A request above an explicit
    limit is lowered to the limit. Raises `UnknownPreset` for a name not in its table."""
    out = dict(data)
    for group, default in _DEFAULTS.items():
        out.setdefault(group, default)
        problem = preset_problem(group, out[group])
        if problem:
            raise UnknownPreset(problem)
    stored = out.get(OVERRIDES_KEY)
    if isinstance(stored, list):
        explicit = {str(f) for f in stored} & set(GOVERNED)
    else:
        explicit = {f for f in GOVERNED if out.get(f) is not None}
    for field in GOVERNED:
        if field not in explicit:
            out.pop(field, None)

    res = RESOURCES_PRESETS[out["resources_preset"]]
    out.setdefault("memory", res.limit_memory)
    out.setdefault("cpu", res.limit_cpu)
    limit_memory, limit_cpu = _memory_mib(out["memory"]), out["cpu"]
    if "memory_request" not in out:
        memory_request = res.request_memory
        if isinstance(limit_memory, int):
            memory_request = min(memory_request, limit_memory)
        out["memory_request"] = memory_request
    if "cpu_request" not in out:
        cpu_request = res.request_cpu
        if isinstance(limit_cpu, int):
            cpu_request = min(cpu_request, limit_cpu)
        out["cpu_request"] = cpu_request

    low, high = REPLICAS_PRESETS[out["replicas_preset"]]
    if "replicas" in explicit and not {"min_replicas", "max_replicas"} & explicit:
        out["min_replicas"] = out["max_replicas"] = out["replicas"]
    out.setdefault("min_replicas", low)
    if "max_replicas" not in out:
        minimum = out["min_replicas"]
        out["max_replicas"] = max(high, minimum) if isinstance(minimum, int) else high
    out.setdefault("replicas", out["min_replicas"])

    build = BUILD_PRESETS[out["build_preset"]]
    out.setdefault(
        "build_resources",
        {
            "cpu_request": build.request_cpu,
            "memory_request": build.request_memory,
            "cpu": build.limit_cpu,
            "memory": build.limit_memory,
        },
    )
    out[OVERRIDES_KEY] = sorted(explicit)
    return out


def for_user(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A stored spec (as JSON) as a user would send it back: the fields that follow a preset
    and `preset_overrides` left out, so that sending it again keeps following the presets."""
    stored = spec.get(OVERRIDES_KEY)
    explicit = {str(f) for f in stored} if isinstance(stored, list) else set(GOVERNED)
    return {
        k: v for k, v in spec.items() if k != OVERRIDES_KEY and (k not in GOVERNED or k in explicit)
    }
