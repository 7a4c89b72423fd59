"""Where the runtime lives on disk, for the deployer that starts instances."""

import os

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def runtime_pythonpath() -> str:
    """The directory to put on an instance's PYTHONPATH (the parent of this package)."""
    return os.path.dirname(_PACKAGE_DIR)


def node_server_path() -> str:
    """The Node.js server script: `node <this> --code DIR --entrypoint handler.js ...`."""
    return os.path.join(_PACKAGE_DIR, "node", "server.js")
