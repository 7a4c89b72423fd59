"""Who may build, and who may write a build's state: the pure rules of the build claim.

A queued or started build record carries a `BuildClaim`: the replica that builds it and the end
of its lease. The holder renews the lease while it works; once the lease has passed, any
replica may take the build over. Every write of a claimed record is a compare-and-set on its KV
revision, made only when these rules allow it, so two replicas never both build one source and
a replica that lost its claim never overwrites the new holder's state. No I/O here.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from lambdabus_events.models import BuildClaim, BuildState, FunctionRecord, build_recipe


@dataclass(frozen=True)
class Target:
    """What one build job builds: a function's source for a runtime, by uid and sha256."""

    uid: str
    source_sha256: str
    runtime: str
    recipe: str = ""  # `build_recipe` of the spec: its user_docker_commands

    @classmethod
    def of(cls, record: FunctionRecord) -> Target:
        return cls(
            record.uid,
            record.source.sha256,
            record.spec.runtime,
            build_recipe(record.spec.user_docker_commands),
        )


@cache
def replica_id() -> str:
    """This process's replica id: `<host>-<pid>-<random>` (the random part tells apart two
    builders in one process, as tests run them, and a pid reused after a restart)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def new_claim(holder: str, now: datetime, lease: float) -> BuildClaim:
    return BuildClaim(holder=holder, expires_at=now + timedelta(seconds=lease))


def expired(claim: BuildClaim, now: datetime) -> bool:
    return now >= claim.expires_at


def in_progress(state: BuildState) -> bool:
    return state.phase in ("queued", "started")


def target_of(state: BuildState) -> Target:
    return Target(state.uid, state.source_sha256, state.runtime, state.recipe)


@dataclass(frozen=True)
class Claimable:
    """Another replica may build this function now; `takeover_from` names the replica whose
    claim on an unfinished build ran out (None: there was no live claim to take over)."""

    takeover_from: str | None = None


@dataclass(frozen=True)
class HeldElsewhere:
    """A live claim of another replica: look again at `expires_at` if it is not renewed."""

    holder: str
    expires_at: datetime


def claim_status(state: BuildState, me: str, now: datetime) -> Claimable | HeldElsewhere:
    """Whether `me` may claim the unfinished build recorded in `state`."""
    claim = state.claim
    if not in_progress(state) or claim is None:
        return Claimable()
    if claim.holder == me:
        return Claimable()  # a claim of ours without a job: this process lost the job
    if expired(claim, now):
        return Claimable(takeover_from=claim.holder)
    return HeldElsewhere(claim.holder, claim.expires_at)


def holds(state: BuildState | None, me: str, target: Target) -> bool:
    """Whether `me` may write the record: it is `me`'s claim on the build of `target`. A replica
    whose claim was taken over, or whose build was replaced by another source or deleted, may
    not (its lease's expiry alone does not bar it: a write is a compare-and-set, and no other
    replica has claimed the build while the record still names `me`)."""
    return (
        state is not None
        and in_progress(state)
        and state.claim is not None
        and state.claim.holder == me
        and target_of(state) == target
    )


def renewed(state: BuildState, me: str, target: Target, now: datetime, lease: float) -> BuildState:
    """`state` with `me`'s lease running `lease` seconds from `now`. Raises `LostClaim` when the
    record is no longer `me`'s claim on `target`."""
    if not holds(state, me, target):
        raise LostClaim(state.claim.holder if state.claim is not None else None)
    return state.model_copy(update={"claim": new_claim(me, now, lease)})


def must_stop(last_expiry: datetime, now: datetime, lease: float) -> bool:
    """Whether a holder that has not renewed since its lease ran to `last_expiry` must stop
    building: a margin of a sixth of the lease before the end, so it stops before any other
    replica may take over (same host clock; across hosts, the skew must stay under it)."""
    return now >= last_expiry - timedelta(seconds=lease / 6)


class LostClaim(Exception):
    """The record no longer holds this replica's claim: stop building, write nothing."""

    def __init__(self, holder: str | None) -> None:
        super().__init__(f"the build is no longer ours (holder: {holder or 'none'})")
        self.holder = holder
