"""`lambdabus up`: runs the embedded platform (see `lambdabus_platform.launcher`)."""

from __future__ import annotations

from lambdabus_platform.launcher import main

__all__ = ["main"]
