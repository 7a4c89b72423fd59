"""The command line of an instance, parsed without argparse (it would double the import time).

python -m lambdabus_runtime --code DIR --entrypoint FILE --function NS/NAME [--port 0]
    [--host 127.0.0.1] [--socket PATH] [--timeout SECONDS] [--memory MIB]
    [--runtime python3.11] [--max-body BYTES] [--handler FUNCTION] [--command JSON]
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

PROG = "python -m lambdabus_runtime"
DEFAULT_TIMEOUT = 180.0  # seconds, as Kubeless and Kyma
DEFAULT_MAX_BODY = 6 * 1024 * 1024
DEFAULT_RUNTIME = "python3.11"

USAGE = f"""usage: {PROG} --code DIR --entrypoint FILE --function NS/NAME [--port PORT]
       [--host HOST] [--socket PATH] [--timeout SECONDS] [--memory MIB] [--runtime NAME]
       [--max-body BYTES] [--handler FUNCTION] [--command JSON]

Serve one function over HTTP/1.1. Prints {{"event": "listening", "port": N}} (or
{{"event": "listening", "socket": PATH}}) on stdout once it accepts requests; SIGTERM drains
in-flight requests and exits 0; an exception while importing the entry point exits 3.
With LAMBDABUS_ENV_FILE set, the JSON object in that file is added to the environment
before the function is loaded (the sandbox passes the function's env this way).

options:
  --code DIR          the function's code directory (added to sys.path)
  --entrypoint FILE   lambda_main.py: async def main(request); handler.py: main(event, context)
  --function NS/NAME  the function's namespace and name; a leading /NS/NAME is cut from paths
  --port PORT         the port to bind, 0 for a free one (default 0)
  --host HOST         the address to bind (default 127.0.0.1)
  --socket PATH       listen on this Unix socket instead of TCP
  --timeout SECONDS   a call running longer gets 504 (default {DEFAULT_TIMEOUT:g})
  --memory MIB        the memory limit, passed to the function in its context
  --runtime NAME      the runtime name, passed to the function in its context (default {DEFAULT_RUNTIME})
  --max-body BYTES    a larger request body gets 413 (default {DEFAULT_MAX_BODY})
  --handler FUNCTION  the function to call in the entry point, as Kubeless's handler
                      `<module>.<function>` names it (default main)
  --command JSON      --runtime custom: the program (a path under --code) and its arguments,
                      as a JSON list; it must listen on $PORT and answer GET /healthz
  -h, --help          show this help and exit

The function's env may set FUNC_TIMEOUT (seconds, replaces --timeout) and FUNC_MEMFILE_MAX
(bytes, replaces --max-body), as Kubeless and Kyma runtimes read them.
"""


class UsageError(Exception):
    """The command line is wrong; the message says how."""


class Options:
    """The parsed command line."""

    __slots__ = (
        "code",
        "command",
        "entrypoint",
        "handler",
        "host",
        "max_body",
        "memory",
        "name",
        "namespace",
        "port",
        "runtime",
        "socket",
        "timeout",
    )

    def __init__(
        self,
        *,
        code: str,
        entrypoint: str,
        namespace: str,
        name: str,
        port: int = 0,
        host: str = "127.0.0.1",
        socket: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        memory: int | None = None,
        runtime: str = DEFAULT_RUNTIME,
        max_body: int = DEFAULT_MAX_BODY,
        handler: str = "main",
    ) -> None:
        self.code = code
        self.entrypoint = entrypoint
        self.namespace = namespace
        self.name = name
        self.port = port
        self.host = host
        self.socket = socket
        self.timeout = timeout
        self.memory = memory
        self.runtime = runtime
        self.max_body = max_body
        self.handler = handler
        self.command: list[str] = []


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError
    return value


def _command(text: str) -> list[str]:
    import json

    value = json.loads(text)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError
    return value


_OPTIONS = (
    "code",
    "entrypoint",
    "function",
    "port",
    "host",
    "socket",
    "timeout",
    "memory",
    "runtime",
    "max-body",
    "handler",
    "command",
)
_REQUIRED = ("code", "entrypoint", "function")


def _collect(argv: Sequence[str]) -> dict[str, str]:
    """`--key value` and `--key=value` pairs; the last one wins."""
    raw: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}")
        key, eq, text = arg[2:].partition("=")
        if key not in _OPTIONS:
            raise UsageError(f"unknown option --{key}")
        if not eq:
            i += 1
            if i == len(args):
                raise UsageError(f"--{key} needs a value")
            text = args[i]
        raw[key] = text
        i += 1
    missing = [f"--{key}" for key in _REQUIRED if key not in raw]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    return raw


def parse_args(argv: Sequence[str]) -> Options:
    """Parse `argv` (without the program name); raise `UsageError` if it is wrong."""
    raw = _collect(argv)
    namespace, _, name = raw["function"].partition("/")
    if not namespace or not name or "/" in name:
        raise UsageError(f"--function must be NS/NAME, not {raw['function']!r}")
    options = Options(
        code=raw["code"], entrypoint=raw["entrypoint"], namespace=namespace, name=name
    )
    key = ""
    try:
        for key, text in raw.items():
            if key == "port":
                options.port = _port(text)
            elif key == "host":
                options.host = text
            elif key == "socket":
                if not text.startswith("/"):
                    raise ValueError
                options.socket = text
            elif key == "timeout":
                options.timeout = _positive_float(text)
            elif key == "memory":
                options.memory = _positive_int(text)
            elif key == "runtime":
                options.runtime = text
            elif key == "max-body":
                options.max_body = _positive_int(text)
            elif key == "handler":
                if not text.isidentifier():
                    raise ValueError
                options.handler = text
            elif key == "command":
                options.command = _command(text)
    except ValueError:
        raise UsageError(f"invalid value for --{key}: {raw[key]!r}") from None
    return options


def apply_function_env(options: Options, env: Mapping[str, str]) -> str:
    """Kubeless's and Kyma's runtime knobs from the function's own env: FUNC_TIMEOUT (seconds)
    and FUNC_MEMFILE_MAX (bytes of a request body). What is wrong with them, or ''."""
    try:
        if env.get("FUNC_TIMEOUT"):
            options.timeout = _positive_float(env["FUNC_TIMEOUT"])
        if env.get("FUNC_MEMFILE_MAX"):
            options.max_body = _positive_int(env["FUNC_MEMFILE_MAX"])
    except ValueError:
        return "FUNC_TIMEOUT must be a positive number of seconds and FUNC_MEMFILE_MAX a positive number of bytes"
    return ""
