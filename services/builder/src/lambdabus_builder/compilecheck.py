"""Run by a function's own interpreter (`<env>/bin/python -I compilecheck.py <code_dir>`): compile
every `.py` file under the code directory, writing the bytecode caches that the read-only code
directory could not get at import time, and print the first error as one JSON line.

Standard library only, and no import of the builder: it runs outside the builder's environment.
"""

from __future__ import annotations

import json
import os
import py_compile
import sys


def check(root: str) -> dict[str, object] | None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            try:
                py_compile.compile(path, doraise=True)
            except py_compile.PyCompileError as exc:
                error = exc.exc_value
                return {
                    "file": os.path.relpath(path, root),
                    "line": getattr(error, "lineno", None),
                    "offset": getattr(error, "offset", None),
                    "message": getattr(error, "msg", None) or str(error),
                    "text": getattr(error, "text", None),
                    "error": exc.exc_type_name,
                }
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: compilecheck.py CODE_DIR", file=sys.stderr)
        return 2
    error = check(argv[1])
    if error is None:
        return 0
    print(json.dumps(error))
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
