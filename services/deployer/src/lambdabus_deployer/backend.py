"""What the deployer asks of a backend that runs instances (local processes, or Kubernetes).

The deployer decides *what* should run (a `DesiredRevision` per function) and owns the
deployment state; a backend makes it so and reports what it sees as `Observation`s, which the
deployer folds into state and events. `apply` is idempotent and returns at once: a rollout
proceeds in the background and is reported as it goes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from lambdabus_deployer.plan import DesiredRevision, Observation
from lambdabus_events.models import InstanceStarting, LogLine

# Awaited by the backend before it acts on what it reported (old instances are drained only
# after the state naming the new endpoints is written).
Reporter = Callable[[Observation], Awaitable[None]]
# Takes a line on its way to the LOGS stream; False when it was dropped (the store is behind).
LogSink = Callable[[LogLine], Awaitable[bool | None]]
# Says where an instance made of a pre-started runtime is about to listen (the routers holding
# requests for its function connect there first); best effort, never awaited for an answer.
Announcer = Callable[[InstanceStarting], Awaitable[None]]


class DeployBackend(Protocol):
    def functions(self) -> set[tuple[str, str]]:
        """(namespace, name) of every function the backend runs or is starting."""
        ...

    def current(self, namespace: str, name: str) -> DesiredRevision | None:
        """The revision last applied for a function, if the backend runs it."""
        ...

    async def apply(self, desired: DesiredRevision) -> None:
        """Converge the function on `desired`: start, scale, roll out, or nothing."""
        ...

    async def remove(self, namespace: str, name: str) -> None:
        """Stop every instance of the function and forget it; no report follows."""
        ...
