"""Files LUNA reserves in a lambda's archive (`run.py`, `luna_lambda_tools/`): LUNA supplements
every archive with its own and ignores the lambda's. We do the same for LUNA-style functions
(entry point `lambda_main.py`): whatever the archive holds under those names is replaced by
ours, so `from luna_lambda_tools import StandaloneLambdaRequest` works unchanged.

Ours are small: the platform serves the function with its own runtime (`python -m
lambdabus_runtime`), so `run.py` only says so, and `luna_lambda_tools` names the runtime's
request class under LUNA's names (type hints: the runtime passes its request to `main`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

RESERVED = ("run.py", "luna_lambda_tools")

RUN_PY = '''"""run.py as Lambdabus supplies it to LUNA lambdas (LUNA reserves this name).

Lambdabus serves the lambda with its own runtime (`python -m lambdabus_runtime`), which calls
`main` of lambda_main.py; this file is not used to serve it."""

import sys

if __name__ == "__main__":
    sys.exit("this lambda is served by the Lambdabus runtime (python -m lambdabus_runtime)")
'''

TOOLS_INIT = '''"""luna_lambda_tools as Lambdabus supplies it to LUNA lambdas (LUNA reserves this name).

The request classes a LUNA lambda names in its type hints: the Lambdabus runtime's request
(`.json`, `.text`, `.headers`, `.query`, `.data`, `.event`)."""

from typing import Any

try:
    from lambdabus_runtime.request import Request as _Request
except ImportError:  # outside the runtime (an editor, a test): hints only
    _Request: Any = object

StandaloneLambdaRequest = _Request
HandlersLambdaRequest = _Request

__all__ = ["HandlersLambdaRequest", "StandaloneLambdaRequest"]
'''


def install_luna_files(code: Path) -> list[str]:
    """Put our `run.py` and `luna_lambda_tools/` into the unpacked code dir, replacing what the
    archive had there; the names it had (for the build log)."""
    replaced = []
    for name in RESERVED:
        path = code / name
        if path.is_symlink() or path.is_file():
            path.unlink()
            replaced.append(name)
        elif path.is_dir():
            shutil.rmtree(path)
            replaced.append(f"{name}/")
        elif os.path.lexists(path):
            path.unlink()
            replaced.append(name)
    (code / "run.py").write_text(RUN_PY)
    tools = code / "luna_lambda_tools"
    tools.mkdir()
    (tools / "__init__.py").write_text(TOOLS_INIT)
    return replaced


def replaced_line(replaced: list[str]) -> str:
    """The build log's line about the reserved files the archive had."""
    return (
        f"the archive's {' and '.join(replaced)} replaced by Lambdabus's own: LUNA reserves "
        f"{', '.join(RESERVED)}/ in a lambda's archive"
    )
