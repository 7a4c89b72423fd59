"""Errors of the builder: a build that cannot succeed as the function stands (`BuildFailure`, its
`reason` becomes `BuildState.reason`) versus a platform problem worth retrying later."""

from __future__ import annotations

from typing import Literal

from lambdabus_events.models import ImageStatus
from lambdabus_platform.errors import PermanentError

FailureReason = Literal[
    "InvalidSource",  # the archive cannot be fetched or extracted, or lacks its entry point
    "InvalidDependencies",  # a dependency file line the builder refuses to install
    "DependencyInstallFailed",  # uv or npm exited non-zero
    "SyntaxError",  # the code does not compile
    "BuildTimeout",  # the build took longer than `build_timeout`
    "RuntimeUnavailable",  # the builder machine lacks the runtime's tools (node, npm)
    "InternalError",  # a bug or a machine problem: see the builder's log
    # kubernetes backend (Kyma's BuildReady reasons)
    "JobFailed",  # the Kaniko Job failed (its message has Kaniko's last log lines)
    "JobNotFound",  # the Kaniko Job was deleted before it finished
    "KubernetesForbidden",  # RBAC refused the builder a verb (the message names it)
]


class BuildFailure(PermanentError):
    """The build failed for a reason the function's owner can act on (or a platform one, named
    `RuntimeUnavailable` / `InternalError`). Building the same source again fails the same way."""

    code = "build_failed"

    def __init__(
        self, reason: FailureReason, message: str, *, image_status: ImageStatus | None = None
    ) -> None:
        super().__init__(message, details={"reason": reason})
        self.reason: FailureReason = reason
        self.image_status = image_status  # None: `error`, as a failed build is
