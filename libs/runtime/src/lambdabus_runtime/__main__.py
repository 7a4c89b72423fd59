"""`python -m lambdabus_runtime`: serve one function (see `lambdabus_runtime.cli` for flags).

Only the command line is parsed at import; asyncio and the server are imported once the
flags are known, so `--help` and argument errors stay cheap.
"""

from __future__ import annotations

import sys

from lambdabus_runtime.cli import PROG, USAGE, UsageError, parse_args

EXIT_USAGE = 2


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
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)

    from lambdabus_runtime.server import run

    return run(options)


if __name__ == "__main__":
    sys.exit(main())
