"""The build backend interface: turn one function's source archive into an artifact the deployer
runs. `LocalBackend` (`local.py`) makes a directory on this machine; a Kubernetes backend would
make an image. The service around it owns queueing, build states, events and staleness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from lambdabus_events.models import FunctionRecord, ImageStatus

LogStream = Literal["stdout", "stderr", "system"]


class BuildLog(Protocol):
    """Where a build's log lines go (the LOGS stream, in the service)."""

    async def write(self, stream: LogStream, line: str) -> None: ...


class BuildProgress(Protocol):
    """Where a backend that sees a build's progress (the kubernetes one: its Job and pod) says
    so: written onto the running build's state (image status, Kyma's BuildReady reason)."""

    async def report(self, image_status: ImageStatus, reason: str, message: str) -> None: ...


@dataclass(frozen=True)
class BuildRequest:
    record: FunctionRecord  # what to build: namespace, name, uid, runtime, entry point
    generation: int  # the generation the build was scheduled for
    archive: bytes  # the source archive, verified against record.source.sha256
    progress: BuildProgress | None = None  # None: the backend's progress is not recorded


@dataclass(frozen=True)
class BuildResult:
    artifact: str  # the reference the deployer runs (`file://<manifest>` for the local backend)
    dependencies_cached: bool  # the dependency environment was there already
    deps_key: str
    reason: str = ""  # the BuildReady reason when it is the backend's (Kyma's JobFinished)
    message: str = ""


class BuildBackend(Protocol):
    async def recover(self) -> None:
        """Clear what builds interrupted by a stop left behind; called once before any build."""
        ...

    async def build(self, request: BuildRequest, log: BuildLog) -> BuildResult:
        """Build, writing progress to `log`. Raises `BuildFailure` when the source cannot be
        built as it is; cancelling the call stops the build and removes its partial results."""
        ...

    async def adopt(
        self, record: FunctionRecord, generation: int, artifact: str
    ) -> BuildResult | None:
        """The artifact of an earlier build of the same inputs (by any replica) made this
        build's, without building: None when it is gone or does not match (build it then)."""
        ...

    async def forget(self, namespace: str, name: str, uid: str) -> None:
        """Remove the artifacts of the function with `uid`; shared dependency caches stay."""
        ...
