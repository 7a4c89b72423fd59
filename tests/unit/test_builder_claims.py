"""The build claim's pure rules: who may build, who may write, when a holder must stop."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta

import pytest

from lambdabus_builder.claims import (
    Claimable,
    HeldElsewhere,
    LostClaim,
    Target,
    claim_status,
    expired,
    holds,
    must_stop,
    new_claim,
    renewed,
    replica_id,
)
from lambdabus_builder.plan import Build, Skip, decide, inputs_key
from lambdabus_events.models import (
    BuildClaim,
    BuildState,
    FunctionConfig,
    FunctionRecord,
    SourceRef,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SHA = "a" * 64
TARGET = Target("u1", SHA, "python3.11")
A, B = "host-1-aaaaaa", "host-2-bbbbbb"
LEASE = 10.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def state(phase: str = "started", claim: BuildClaim | None = None, **fields: object) -> BuildState:
    base: dict[str, object] = {
        "namespace": "default",
        "name": "hello",
        "uid": "u1",
        "generation": 1,
        "phase": phase,
        "source_sha256": SHA,
        "runtime": "python3.11",
        "updated_at": T0,
        "claim": claim,
    }
    if phase == "succeeded":
        base["artifact"] = "file:///x/manifest.json"
    return BuildState.model_validate(base | fields)


def record() -> FunctionRecord:
    return FunctionRecord(
        namespace="default",
        name="hello",
        uid="u1",
        generation=1,
        spec=FunctionConfig(),
        source=SourceRef(sha256=SHA, size=10, kind="inline", entrypoint="lambda_main.py", files=1),
        created_at=T0,
        updated_at=T0,
    )


def test_replica_id_names_host_and_process_and_is_stable() -> None:
    me = replica_id()
    assert me.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    assert replica_id() == me


def test_a_claim_expires_at_the_end_of_its_lease() -> None:
    claim = new_claim(A, T0, LEASE)
    assert claim == BuildClaim(holder=A, expires_at=at(10))
    assert not expired(claim, at(9.999))
    assert expired(claim, at(10))


def test_a_live_claim_of_another_replica_is_theirs_until_it_runs_out() -> None:
    claimed = state(claim=new_claim(A, T0, LEASE))
    assert claim_status(claimed, B, at(5)) == HeldElsewhere(A, at(10))
    assert claim_status(claimed, B, at(10)) == Claimable(takeover_from=A)
    assert claim_status(claimed, A, at(5)) == Claimable()  # ours, but no job: lost in a restart


def test_an_unclaimed_or_finished_build_is_claimable_without_a_takeover() -> None:
    assert claim_status(state("started"), B, T0) == Claimable()
    assert claim_status(state("succeeded", new_claim(A, T0, LEASE)), B, T0) == Claimable()


def test_only_the_holder_of_a_claim_on_the_same_source_may_write() -> None:
    mine = state(claim=new_claim(A, T0, LEASE))
    assert holds(mine, A, TARGET)
    assert not holds(mine, B, TARGET)  # taken over
    assert not holds(mine, A, Target("u1", "b" * 64, "python3.11"))  # another source now
    assert not holds(mine, A, Target("u2", SHA, "python3.11"))  # another function now
    assert not holds(state("started"), A, TARGET)  # released
    assert not holds(state("succeeded", new_claim(A, T0, LEASE)), A, TARGET)  # finished
    assert not holds(None, A, TARGET)  # deleted
    # a lapsed lease alone does not bar the holder: a write is a compare-and-set, and nobody
    # took the build over while the record still names it
    assert holds(mine, A, TARGET)


def test_renewing_moves_the_lease_on_and_refuses_a_lost_claim() -> None:
    mine = state(claim=new_claim(A, T0, LEASE))
    assert renewed(mine, A, TARGET, at(3), LEASE).claim == BuildClaim(holder=A, expires_at=at(13))
    with pytest.raises(LostClaim) as lost:
        renewed(state(claim=new_claim(B, at(11), LEASE)), A, TARGET, at(12), LEASE)
    assert lost.value.holder == B


def test_a_holder_that_cannot_renew_stops_before_another_may_take_over() -> None:
    expiry = at(10)
    assert not must_stop(expiry, at(8.3), LEASE)
    assert must_stop(expiry, at(8.34), LEASE)  # a sixth of the lease before its end
    assert must_stop(expiry, at(10), LEASE)


def test_decide_leaves_a_live_claim_alone_and_takes_over_a_lapsed_one() -> None:
    claimed = state(claim=new_claim(A, T0, LEASE))
    waiting = decide(record(), claimed, None, me=B, now=at(5))
    assert waiting == Skip(f"replica {A} builds this source", recheck_at=at(10))
    taking = decide(record(), claimed, None, me=B, now=at(10.5))
    assert isinstance(taking, Build)
    assert taking.takeover_from == A
    interrupted = decide(record(), state("queued"), None, me=B, now=T0)
    assert isinstance(interrupted, Build)
    assert interrupted.takeover_from is None


def test_a_new_source_is_built_whoever_claims_the_old_one() -> None:
    other = state(claim=new_claim(A, T0, LEASE), source_sha256="b" * 64)
    action = decide(record(), other, None, me=B, now=at(1))
    assert isinstance(action, Build)
    assert action.why == "new source"


def test_inputs_key_covers_runtime_entrypoint_and_source() -> None:
    key = inputs_key("python3.11", "lambda_main.py", SHA)
    assert len(key) == 64
    assert key == inputs_key("python3.11", "lambda_main.py", SHA)
    assert key != inputs_key("nodejs20", "lambda_main.py", SHA)
    assert key != inputs_key("python3.11", "handler.py", SHA)
    assert key != inputs_key("python3.11", "lambda_main.py", "b" * 64)
    # the handler is checked by the build and recorded in it; a custom program likewise
    assert key != inputs_key("python3.11", "lambda_main.py", SHA, "helloget.bar")
    assert inputs_key("python3.11", "a.py", SHA, "a.foo") != inputs_key(
        "python3.11", "a.py", SHA, "a.bar"
    )
    assert inputs_key("custom", "x", SHA, None, ["./a"]) != inputs_key(
        "custom", "x", SHA, None, ["./b"]
    )
