"""Where the runtime SDK (`lambdabus_runtime`) is on this machine. It goes on an instance's
PYTHONPATH (or is run by node) and is never installed into a function's environment."""

from __future__ import annotations

import shutil

from lambdabus_deployer.plan import RuntimePaths
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_runtime.paths import node_server_path, runtime_pythonpath


def locate_runtime(settings: DeployerSettings) -> RuntimePaths:
    return RuntimePaths(
        pythonpath=settings.runtime_pythonpath or runtime_pythonpath(),
        node_server=str(settings.node_server) if settings.node_server else node_server_path(),
        node=shutil.which("node", path=settings.path),
    )
