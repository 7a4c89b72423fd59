"""`python -m lambdabus_runtime`: serve one function (see `lambdabus_runtime.cli` for flags).

Only the command line is parsed at import; asyncio and the server are imported once the
flags are known, so `--help` and argument errors stay cheap.
"""

from __future__ import annotations

import os
import sys

from lambdabus_runtime.cli import PROG, USAGE, UsageError, apply_function_env, parse_args

EXIT_USAGE = 2
EXIT_ENV = 4
ENV_FILE = "LAMBDABUS_ENV_FILE"


def apply_env_file() -> str:
    """Add the function's env (a JSON object of strings in the file named by
    LAMBDABUS_ENV_FILE) to the environment, before its code is loaded; what went wrong."""
    path = os.environ.pop(ENV_FILE, "")
    if not path:
        return ""
    import json

    try:
        with open(path, "rb") as f:
            env = json.load(f)
    except (OSError, ValueError) as exc:
        return f"cannot read the function's env from {path}: {exc}"
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
        for k, v in env.items()
    ):
        return f"the function's env in {path} is not an object of strings"
    os.environ.update(env)
    return ""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        sys.stdout.write(USAGE)
        return 0
    try:
        options = parse_args(args)
    except UsageError as exc:
        sys.stderr.write(f"{USAGE.splitlines()[0]}\n{PROG}: error: {exc}\n")
        return EXIT_USAGE
    problem = apply_env_file() or apply_function_env(options, os.environ)
    if problem:
        sys.stderr.write(f"lambdabus-runtime: {problem}\n")
        return EXIT_ENV
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)

    if options.runtime == "custom":
        from lambdabus_runtime import relay

        return relay.run(options)
    from lambdabus_runtime.server import run

    return run(options)


if __name__ == "__main__":
    sys.exit(main())
