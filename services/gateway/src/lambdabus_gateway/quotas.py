"""Per-namespace quotas: the defaults from settings, an operator's overrides in the `quotas`
KV bucket, and the check the gateway makes before storing a function (count and instances).
Concurrent invocations are the router's to count."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from lambdabus_events.models import FunctionRecord, Quota
from lambdabus_gateway.uploads import validation_error
from lambdabus_platform.bus import Kv
from lambdabus_platform.errors import PermanentError
from lambdabus_platform.registry import Registry
from lambdabus_platform.settings import QuotaSettings
from lambdabus_platform.subjects import namespace_key


class QuotaExceeded(PermanentError):
    status = 429
    code = "quota_exceeded"


def defaults_of(settings: QuotaSettings) -> Quota:
    return Quota(
        max_functions=settings.max_functions,
        max_instances=settings.max_instances,
        max_concurrent_invocations=settings.max_concurrent_invocations,
    )


@dataclass(frozen=True)
class Usage:
    functions: int
    instances: int


def usage_of(records: list[FunctionRecord], *, without: str | None = None) -> Usage:
    """What a namespace uses, leaving out the function `without` (the one being replaced)."""
    kept = [r for r in records if r.name != without]
    return Usage(functions=len(kept), instances=sum(r.spec.replicas for r in kept))


def quota_problem(
    namespace: str, quota: Quota, usage: Usage, *, adds_function: bool, replicas: int
) -> str | None:
    """Why storing a function with `replicas` (a new one when `adds_function`) would exceed
    the namespace's quota, with what to do about it; None when it fits. Pure."""
    ask = f"or ask an operator to raise the quota (PUT /v1/namespaces/{namespace}/quota)"
    limit = quota.max_functions
    if adds_function and limit is not None and usage.functions + 1 > limit:
        return (
            f"namespace {namespace} has {usage.functions} of at most {limit} functions: "
            f"delete functions it no longer needs, {ask}"
        )
    if quota.max_instances is not None and usage.instances + replicas > quota.max_instances:
        return (
            f"namespace {namespace} would run {usage.instances + replicas} instances (replicas "
            f"of all its functions) but its quota is {quota.max_instances}: lower replicas of "
            f"this or other functions, delete functions, {ask}"
        )
    return None


class Quotas:
    def __init__(
        self, *, kv: Kv, functions: Registry[FunctionRecord], settings: QuotaSettings
    ) -> None:
        self._kv = kv
        self._functions = functions
        self._defaults = defaults_of(settings)

    @property
    def defaults(self) -> Quota:
        return self._defaults

    async def override(self, namespace: str) -> Quota:
        entry = await self._kv.get(namespace_key(namespace))
        return Quota.model_validate_json(entry.value) if entry is not None else Quota()

    async def effective(self, namespace: str) -> Quota:
        return (await self.override(namespace)).over(self._defaults)

    async def set(self, namespace: str, body: object) -> Quota:
        try:
            quota = Quota.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc, prefix="quota") from exc
        await self._kv.put(namespace_key(namespace), quota.model_dump_json().encode())
        return quota

    async def check(self, namespace: str, name: str, *, adds_function: bool, replicas: int) -> None:
        """QuotaExceeded (429) when storing function `name` with `replicas` would go over."""
        quota = await self.effective(namespace)
        records = [v.value for v in await self._functions.in_namespace(namespace)]
        problem = quota_problem(
            namespace,
            quota,
            usage_of(records, without=name),
            adds_function=adds_function,
            replicas=replicas,
        )
        if problem:
            raise QuotaExceeded(problem, details={"quota": quota.model_dump()})
