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
    return apply_env(env, f"the function's env in {path}")


def apply_env(env: object, what: str) -> str:
    """Add `env` (a JSON object of strings) to the environment; what is wrong with it."""
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
        for k, v in env.items()
    ):
        return f"{what} is not an object of strings"
    os.environ.update(env)
    return ""


def pooled() -> int:
    """`--pool`: a runtime started before it knows its function (the deployer's pool). The
    server and what it imports are loaded now; then one JSON line on stdin, the control
    channel, says which function to serve: `{"argv": [...flags...], "env": {...},
    "rlimits": [[resource, value], ...]}` (its code is already at the path `--code` names);
    the rlimits are set (soft and hard) before anything of the function is loaded. Stdin is closed after that line: a specialised
    runtime serves that one function until it exits. EOF before the line (the deployer is
    gone): exit 0, having served nothing."""
    import json
    import resource

    from lambdabus_runtime import server  # noqa: F401 - the import is the point of the pool

    line = sys.stdin.buffer.readline()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if not line.strip():
        return 0
    try:
        message = json.loads(line)
        argv, env = message["argv"], message["env"]
        limits = [(int(res), int(value)) for res, value in message.get("rlimits", [])]
    except (ValueError, KeyError, TypeError) as exc:
        sys.stderr.write(f"lambdabus-runtime: a pool message that is not valid: {exc}\n")
        return EXIT_USAGE
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        sys.stderr.write("lambdabus-runtime: a pool message whose argv is not strings\n")
        return EXIT_USAGE
    try:
        for res, value in limits:  # before any of the function's code: it cannot raise them
            resource.setrlimit(res, (value, value))
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"lambdabus-runtime: cannot set the function's limits: {exc}\n")
        return EXIT_ENV
    problem = apply_env(env, "the function's env")
    if problem:
        sys.stderr.write(f"lambdabus-runtime: {problem}\n")
        return EXIT_ENV
    retitle(argv)
    return main(argv)


def retitle(argv: list[str]) -> None:
    """Show the function's flags in /proc/<pid>/cmdline (`ps`), as a runtime started for it
    would: they overwrite the argv area, which the pool pads for them (what setproctitle
    does). `--function NS/NAME` first, so that it survives a cut; best effort."""
    flags = list(argv)
    if "--function" in flags[:-1]:
        at = flags.index("--function")
        flags = ["--function", flags[at + 1], *flags[:at], *flags[at + 2 :]]
    try:
        with open("/proc/self/cmdline", "rb") as f:
            words = f.read().split(b"\0")
        head = words[: words.index(b"-m") + 2]  # <python> -m lambdabus_runtime
        set_title([*head, *(a.encode() for a in flags)])
    except (OSError, ValueError, IndexError):
        pass


def set_title(words: list[bytes]) -> None:
    """Write `words` as this process's command line, over its argv area (cut to fit)."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
    title = b"\0".join(words) + b"\0"
    size = end - start
    if len(title) > size:
        title = title[: title.rindex(b"\0", 0, size) + 1]
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        mem.write(title.ljust(size, b"\0"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--pool"]:
        return pooled()
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
