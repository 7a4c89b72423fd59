"""The router's pure core: the tables it keeps from the `functions` and `deployments` KV buckets,
and the choice of an instance for one invocation. No I/O.

Tables are immutable from the reader's side: `apply` returns a new mapping, so a request that
looked up a state keeps a consistent one while the watcher moves on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from pydantic import ValidationError

from lambdabus_events.models import DeploymentState, FunctionRecord, Quota
from lambdabus_events.names import is_label

FunctionId = tuple[str, str]
Table = Mapping[FunctionId, DeploymentState]


def parse_key(key: str) -> FunctionId | None:
    """`<ns>.<name>` → `(ns, name)`; None for a key that is not two labels."""
    ns, dot, name = key.partition(".")
    if not dot or not is_label(ns) or not is_label(name):
        return None
    return ns, name


def decode(fid: FunctionId, value: bytes) -> DeploymentState | None:
    """The state a `deployments` value holds for `fid`; None for a deleted key, or for a value
    that is not a `DeploymentState` of that function (it routes nowhere rather than astray)."""
    if not value:
        return None
    try:
        state = DeploymentState.model_validate_json(value)
    except ValidationError:
        return None
    return state if (state.namespace, state.name) == fid else None


def apply(table: Table, key: str, value: bytes) -> Table:
    """The table after one `deployments` KV entry: a new mapping if it changed, `table` itself
    if not (a watch re-delivers current values). A key that is not `<ns>.<name>` changes
    nothing."""
    fid = parse_key(key)
    if fid is None:
        return table
    state = decode(fid, value)
    if state is None:
        if fid not in table:
            return table
        return {k: v for k, v in table.items() if k != fid}
    if table.get(fid) == state:
        return table
    return {**table, fid: state}


def load(entries: Iterable[tuple[str, bytes]]) -> Table:
    """A table from a snapshot of the bucket, in one pass."""
    table: dict[FunctionId, DeploymentState] = {}
    for key, value in entries:
        fid = parse_key(key)
        state = decode(fid, value) if fid is not None else None
        if fid is not None and state is not None:
            table[fid] = state
    return table


def load_known(entries: Iterable[tuple[str, bytes]]) -> frozenset[FunctionId]:
    """The set of existing functions from a snapshot of the `functions` bucket."""
    return frozenset(fid for key, value in entries if value and (fid := parse_key(key)) is not None)


def apply_known(known: frozenset[FunctionId], key: str, value: bytes) -> frozenset[FunctionId]:
    """The set of existing functions after one `functions` KV entry (present iff non-empty)."""
    fid = parse_key(key)
    if fid is None:
        return known
    if value:
        return known if fid in known else known | {fid}
    return known - {fid} if fid in known else known


def concurrency_of(value: bytes) -> int | None:
    """A function's `max_concurrency` from its `functions` KV value (None: unlimited, or a
    deleted key or a value that is not a record)."""
    if not value:
        return None
    try:
        return FunctionRecord.model_validate_json(value).spec.max_concurrency
    except ValidationError:
        return None


def autoscaled_of(value: bytes) -> tuple[bool, int]:
    """Whether a function's `functions` KV value has `spec.scale` (a request finding no
    instance is held while it wakes), and its per-instance `concurrency` (0: no limit)."""
    if not value:
        return False, 0
    try:
        spec = FunctionRecord.model_validate_json(value).spec
    except ValidationError:
        return False, 0
    return spec.scale is not None, spec.concurrency


def quota_concurrency(value: bytes) -> int | None:
    """A namespace's `max_concurrent_invocations` override from its `quotas` KV value."""
    if not value:
        return None
    try:
        return Quota.model_validate_json(value).max_concurrent_invocations
    except ValidationError:
        return None


def needs_token(value: bytes) -> bool:
    """Whether a `functions` value is a function whose spec says `invoke_auth: token`. A value
    that cannot be read counts as protected: unreadable fails closed."""
    if not value:
        return False
    try:
        record = json.loads(value)
        return bool(record["spec"].get("invoke_auth", "none") != "none")
    except (ValueError, KeyError, TypeError, AttributeError):
        return True


def load_protected(entries: Iterable[tuple[str, bytes]]) -> frozenset[FunctionId]:
    """The functions that need a token to be invoked, from a snapshot of `functions`."""
    return frozenset(
        fid for key, value in entries if (fid := parse_key(key)) is not None and needs_token(value)
    )


def apply_protected(
    protected: frozenset[FunctionId], key: str, value: bytes
) -> frozenset[FunctionId]:
    """The protected set after one `functions` KV entry."""
    fid = parse_key(key)
    if fid is None:
        return protected
    if needs_token(value):
        return protected if fid in protected else protected | {fid}
    return protected - {fid} if fid in protected else protected


def pick(
    endpoints: Sequence[str],
    counter: int,
    in_flight: Mapping[str, int] | None = None,
    *,
    exclude: str | None = None,
) -> str | None:
    """The endpoint for the next request, or None when there is none (besides `exclude`).

    With `in_flight` (requests now open per endpoint): the least loaded one, ties broken
    round-robin from `counter`, so a slow instance stops getting new work while it is busy.
    Without it: plain round-robin. O(1) while some endpoint is idle, O(n) otherwise.
    """
    n = len(endpoints)
    if n == 0:
        return None
    start = counter % n
    if in_flight is None:
        for i in range(n):
            endpoint = endpoints[(start + i) % n]
            if endpoint != exclude:
                return endpoint
        return None
    best: str | None = None
    best_load = 0
    for i in range(n):
        endpoint = endpoints[(start + i) % n]
        if endpoint == exclude:
            continue
        load = in_flight.get(endpoint, 0)
        if load == 0:
            return endpoint
        if best is None or load < best_load:
            best, best_load = endpoint, load
    return best
