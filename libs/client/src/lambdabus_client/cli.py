"""The `lambdabus` command line: this module builds the parser and dispatches; each command group
lives in `lambdabus_client.commands` (deploy, invoke, functions, logs, events, triggers,
deadletters, tokens, secrets, credentials, init, completion). `lambdabus up` runs the whole
platform locally.

The exit contract: 0 on success; 1 when the platform refused or failed, with one line on stderr,
`error: <code>: <message>` (the gateway's `error.code`); 2 when the command line is wrong
(`error: usage: ...`, with the nearest command for a mistyped one). No traceback reaches the
user: anything unexpected is one `error: internal: ...` line and status 1. Rendering and
decisions are pure functions (`render_table`, `deploy_progress`, `merged_spec`, ...) so they can
be tested without I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from lambdabus_client.client import (
    ApiError,
    ClientSettings,
)
from lambdabus_client.commands.common import (
    _GLOBAL_OPTIONS_WITH_VALUE,
    Command,
    UsageError,
    _fail,
    _Parser,
    auth_hint,
    function_name,
)
from lambdabus_client.commands.completion import command_tree, completion_script
from lambdabus_client.commands.credentials import (
    _credentials,
)
from lambdabus_client.commands.deadletters import (
    _deadletters,
)
from lambdabus_client.commands.deploy import _deploy
from lambdabus_client.commands.events import (
    _events,
    _publish,
)
from lambdabus_client.commands.functions import (
    _describe,
    _history,
    _ls,
    _rm,
    _status,
    _update,
)
from lambdabus_client.commands.gitsync import _sync
from lambdabus_client.commands.init import RUNTIMES, STYLES, _init
from lambdabus_client.commands.invoke import (
    _invocation,
    _invoke,
)
from lambdabus_client.commands.logs import (
    _logs,
)
from lambdabus_client.commands.revisions import COMMANDS as REVISION_COMMANDS
from lambdabus_client.commands.revisions import add_parsers as add_revision_parsers
from lambdabus_client.commands.schedules import (
    _schedules,
)
from lambdabus_client.commands.secrets import (
    _secret,
)
from lambdabus_client.commands.tokens import (
    _token,
)
from lambdabus_client.commands.top import (
    _top,
)
from lambdabus_client.commands.triggers import (
    _triggers,
)
from lambdabus_client.packaging import PackagingError
from lambdabus_events import presets


def _version() -> str:
    try:
        return importlib.metadata.version("lambdabus-client")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before and after the command; SUPPRESS keeps a command's
    # parser from overwriting a value given before it.
    common = _Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="gateway URL (env LAMBDABUS_URL)")
    common.add_argument(
        "-n",
        "--namespace",
        default=argparse.SUPPRESS,
        help="namespace to act on (env LAMBDABUS_NAMESPACE)",
    )
    common.add_argument(
        "-o",
        "--output",
        choices=("table", "json", "yaml"),
        default=argparse.SUPPRESS,
        help="json or yaml print the API's answer instead of tables",
    )
    # `token create` has its own repeatable --namespace: it cannot take the global one.
    common_no_namespace = _Parser(add_help=False)
    common_no_namespace.add_argument("--url", default=argparse.SUPPRESS, help="gateway URL")
    common_no_namespace.add_argument(
        "-o", "--output", choices=("table", "json", "yaml"), default=argparse.SUPPRESS
    )
    parser = _Parser(prog="lambdabus", description="Lambdabus functions", parents=[common])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (e.g. source <(lambdabus completion bash))",
    )
    completion.add_argument("shell", choices=("bash", "zsh", "fish"))

    commands.add_parser(
        "up", help="run the whole platform locally (see 'lambdabus up --help')", add_help=False
    ).add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    deploy = commands.add_parser(
        "deploy",
        parents=[common],
        help="create or update a function from a directory, an archive or a source file",
    )
    deploy.add_argument(
        "source",
        metavar="FILE|DIR|ARCHIVE",
        type=Path,
        help="a directory (zipped), a .zip or .tar(.gz|.bz2|.xz), or one source file",
    )
    deploy.add_argument(
        "--handler",
        metavar="MODULE.FUNCTION",
        help="as Kubeless: helloget.foo calls foo in helloget.py (default: main in "
        "lambda_main.py, handler.py or handler.js)",
    )
    deploy.add_argument(
        "--dependencies",
        type=Path,
        metavar="FILE",
        help="a requirements.txt or package.json replacing the one in the source",
    )
    deploy.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label on the function (repeatable); 'lambdabus ls --label k=v' filters by it",
    )
    deploy.add_argument(
        "--name", required=True, type=function_name, help="function name (an RFC 1035 label)"
    )
    deploy.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    deploy.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="default: the function's current one, else detected (handler.js or package.json: "
        "nodejs20, otherwise python3.11)",
    )
    deploy.add_argument(
        "--replace",
        action="store_true",
        help="the given settings become the whole spec (default: they change the current one)",
    )
    deploy.add_argument("--replicas", type=int)
    deploy.add_argument("--timeout", type=float, help="seconds per invocation")
    deploy.add_argument(
        "--memory", help="MiB, or a quantity such as 256Mi or 1Gi; default: the preset's limit"
    )
    deploy.add_argument("--description")
    deploy.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        metavar="NAME",
        help="mount a secret of the namespace at /secrets/NAME/<key> (repeatable)",
    )
    deploy.add_argument(
        "--env-from",
        action="append",
        metavar="VAR=SECRET:KEY",
        help="set env var VAR from a key of a secret (repeatable)",
    )
    deploy.add_argument(
        "--invoke-auth", choices=("none", "token"), help="token: callers need a bearer token"
    )
    deploy.add_argument("--network", choices=("outbound", "none"), help="default: outbound")
    deploy.add_argument(
        "--cpu", type=int, metavar="MILLICORES", help="default: the resources preset's limit"
    )
    # -- Kyma presets
    deploy.add_argument(
        "--resources-preset",
        choices=presets.allowed("resources_preset"),
        help="memory and cpu (Kyma's values); default M",
    )
    deploy.add_argument(
        "--replicas-preset",
        choices=presets.allowed("replicas_preset"),
        help="min and max replicas (Kyma's values); default S",
    )
    deploy.add_argument(
        "--build-preset",
        choices=presets.allowed("build_preset"),
        help="build resources (Kyma's values); default normal",
    )
    deploy.add_argument(
        "--max-concurrency", type=int, metavar="N", help="at most N invocations at once"
    )
    deploy.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="return once uploaded instead of following the build and deployment",
    )
    deploy.add_argument(
        "--dry-run",
        action="store_true",
        help="upload and apply nothing: print what the function would become (with -o yaml and "
        "--backend kubernetes, its Kubernetes objects)",
    )
    deploy.add_argument(
        "--backend",
        choices=("local", "kubernetes"),
        default="local",
        help="with --dry-run: the backend to render for (default local: the spec only)",
    )
    deploy.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the function to be ready (default 300)",
    )

    invoke = commands.add_parser(
        "invoke", parents=[common], help="call a function and print its answer"
    )
    invoke.add_argument("name")
    body = invoke.add_mutually_exclusive_group()
    body.add_argument("--data", metavar="JSON", help="a JSON request body")
    body.add_argument("--data-file", metavar="FILE", help="send this file's bytes ('-': stdin)")
    invoke.add_argument(
        "--header", action="append", default=[], metavar="NAME:VALUE", help="repeatable"
    )
    invoke.add_argument(
        "--async",
        dest="run_async",
        action="store_true",
        help="queue it and print the invocation id (see 'lambdabus invocation ID')",
    )
    invoke.add_argument(
        "--callback-url", metavar="URL", help="with --async: where the result is posted"
    )

    invocation = commands.add_parser(
        "invocation",
        parents=[common],
        help="show an asynchronous invocation (exit status 1 when it failed)",
    )
    invocation.add_argument("id")
    invocation.add_argument("--wait", action="store_true", help="wait until it succeeded or failed")
    invocation.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long --wait waits (default 300)",
    )

    publish = commands.add_parser(
        "publish", parents=[common], help="publish a CloudEvent for triggers to deliver"
    )
    publish.add_argument("--type", required=True, help="e.g. com.example.order.created")
    publish.add_argument("--source", required=True, help="a URI-reference, e.g. /shop")
    publish.add_argument("--id", help="the event id (default: a new UUID)")
    publish.add_argument("--subject")
    publish.add_argument("--data", metavar="JSON", help="the event's data, as JSON")
    publish.add_argument(
        "--ext", action="append", default=[], metavar="NAME=VALUE", help="an extension attribute"
    )

    triggers = commands.add_parser(
        "triggers", parents=[common], help="list, create and remove triggers"
    )
    trigger_actions = triggers.add_subparsers(dest="action", metavar="ACTION", required=True)
    trigger_actions.add_parser("ls", parents=[common], help="list the namespace's triggers")
    create = trigger_actions.add_parser(
        "create", parents=[common], help="deliver matching events to a function"
    )
    create.add_argument("name")
    create.add_argument("--function", required=True)
    create.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="ATTRIBUTE=VALUE",
        help="repeatable; a value ending in * matches by prefix (default: every event)",
    )
    create.add_argument("--retries", type=int, help="attempts after the first (default 3)")
    create.add_argument("--backoff", choices=("exponential", "linear"))
    create.add_argument("--backoff-delay", type=float, metavar="SECONDS")
    create.add_argument("--timeout", type=float, metavar="SECONDS", help="per attempt")
    create.add_argument("--max-in-flight", type=int, metavar="N")
    trigger_rm = trigger_actions.add_parser("rm", parents=[common], help="delete a trigger")
    trigger_rm.add_argument("name")

    schedules = commands.add_parser(
        "schedules", parents=[common], help="list, create and remove schedules"
    )
    schedule_actions = schedules.add_subparsers(dest="action", metavar="ACTION", required=True)
    schedule_actions.add_parser("ls", parents=[common], help="list the namespace's schedules")
    schedule_create = schedule_actions.add_parser(
        "create", parents=[common], help="call a function at each tick of a cron expression"
    )
    schedule_create.add_argument("name")
    schedule_create.add_argument("--function", required=True)
    schedule_create.add_argument(
        "--cron", required=True, help="'*/5 * * * *', '@hourly' or '@every 30s'"
    )
    schedule_create.add_argument("--timezone", default="UTC", help="an IANA zone (default UTC)")
    schedule_create.add_argument("--data", metavar="JSON", help="the data of every tick")
    schedule_create.add_argument("--retries", type=int, help="attempts after the first")
    schedule_create.add_argument("--timeout", type=float, metavar="SECONDS", help="per attempt")
    schedule_rm = schedule_actions.add_parser("rm", parents=[common], help="delete a schedule")
    schedule_rm.add_argument("name")

    deadletters = commands.add_parser(
        "deadletters", parents=[common], help="list and redrive dead-lettered events"
    )
    deadletter_actions = deadletters.add_subparsers(dest="action", metavar="ACTION", required=True)
    deadletter_ls = deadletter_actions.add_parser(
        "ls", parents=[common], help="list dead letters, oldest first"
    )
    deadletter_ls.add_argument("--trigger", help="only this trigger's")
    deadletter_ls.add_argument("--after", metavar="ID", help="only those after this id")
    deadletter_ls.add_argument("--limit", type=int, metavar="N", help="at most N (default 100)")
    redrive = deadletter_actions.add_parser(
        "redrive", parents=[common], help="send a dead letter's event to its trigger again"
    )
    redrive.add_argument("id")

    logs = commands.add_parser("logs", parents=[common], help="show a function's log lines")
    logs.add_argument("name")
    logs.add_argument("--build", action="store_true", help="the build's logs, not the runtime's")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    logs.add_argument("--since", help="from an RFC 3339 time or a duration like 10m")
    logs.add_argument(
        "--invocation",
        metavar="ID",
        help="only the lines of one invocation (its X-Lambdabus-Invocation-Id, or an event's id)",
    )

    top = commands.add_parser(
        "top", parents=[common], help="calls, errors and latency of every function, refreshed"
    )
    top.add_argument("--once", action="store_true", help="print once and exit")
    top.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period"
    )

    history = commands.add_parser(
        "history", parents=[common], help="show a function's lifecycle events"
    )
    history.add_argument("name")

    commands.add_parser(
        "ls", parents=[common], help="list the functions of a namespace"
    ).add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only functions with this label (KEY alone: with the label at all); repeatable",
    )

    add_revision_parsers(commands, common)

    status = commands.add_parser("status", parents=[common], help="show a function's status")
    status.add_argument("name")

    sync = commands.add_parser(
        "sync",
        parents=[common],
        help="look at a git-sourced function's reference now; a new commit is a new version",
    )
    sync.add_argument("name")

    describe = commands.add_parser(
        "describe",
        parents=[common],
        help="show a function: spec, status, conditions, URL, triggers, recent events",
    )
    describe.add_argument("name")

    update = commands.add_parser(
        "update", parents=[common], help="change a function's settings (no rebuild unless needed)"
    )
    update.add_argument("name")
    update.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a variable (repeatable)",
    )
    update.add_argument("--replicas", type=int)
    update.add_argument("--memory", help="MiB, or a quantity such as 256Mi or 1Gi")
    update.add_argument("--timeout", type=float, help="seconds per invocation")
    update.add_argument("--description")
    # -- Kyma presets: a changed preset moves the fields that follow it
    for group in ("resources_preset", "replicas_preset", "build_preset"):
        update.add_argument(
            "--" + group.replace("_", "-"), choices=presets.allowed(group), help="Kyma's values"
        )

    init = commands.add_parser(
        "init", parents=[common], help="write a new function directory, ready to deploy"
    )
    init.add_argument("name", type=function_name)
    init.add_argument("--runtime", required=True, choices=RUNTIMES)
    init.add_argument(
        "--style", choices=STYLES, default="luna", help="handler style (default luna)"
    )
    init.add_argument("--dir", type=Path, help="where to write it (default: ./NAME)")

    remove = commands.add_parser("rm", parents=[common], help="delete a function")
    remove.add_argument("name")

    token = commands.add_parser(
        "token", parents=[common], help="mint, list and revoke API tokens (admin)"
    )
    token_actions = token.add_subparsers(dest="action", metavar="ACTION", required=True)
    token_create = token_actions.add_parser(
        "create", parents=[common_no_namespace], help="mint a token; prints its secret once"
    )
    token_create.add_argument("name")
    token_create.add_argument(
        "--role", required=True, choices=("admin", "developer", "viewer", "invoker", "auditor")
    )
    token_create.add_argument(
        "--namespace",
        "--ns",
        dest="token_namespaces",
        action="append",
        required=True,
        metavar="NS",
        help="repeatable; '*' for every namespace",
    )
    token_create.add_argument(
        "--expires-in", type=int, metavar="SECONDS", help="default: never expires"
    )
    token_actions.add_parser("ls", parents=[common], help="list tokens (never their secrets)")
    token_rm = token_actions.add_parser("rm", parents=[common], help="revoke a token")
    token_rm.add_argument("id")

    secret = commands.add_parser(
        "secret", parents=[common], help="create, replace, list and delete secrets"
    )
    secret_actions = secret.add_subparsers(dest="action", metavar="ACTION", required=True)
    for verb, text in (
        ("create", "create a secret (values are never shown again)"),
        ("set", "replace a secret's data; the functions using it roll out"),
    ):
        writer = secret_actions.add_parser(verb, parents=[common], help=text)
        writer.add_argument("name")
        writer.add_argument(
            "--from-literal", action="append", default=[], metavar="KEY=VALUE", dest="literals"
        )
        writer.add_argument(
            "--from-file", action="append", default=[], metavar="KEY=PATH", dest="files"
        )
    secret_actions.add_parser("ls", parents=[common], help="list secrets (key names only)")
    secret_rm = secret_actions.add_parser("rm", parents=[common], help="delete a secret")
    secret_rm.add_argument("name")

    credentials = commands.add_parser(
        "credentials", parents=[common], help="credentials for outside clients"
    )
    credential_kinds = credentials.add_subparsers(dest="kind", metavar="KIND", required=True)
    audit = credential_kinds.add_parser(
        "audit",
        parents=[common],
        help="the NATS URL and the auditor's key file: reads the LIFECYCLE stream, nothing else",
    )
    audit.add_argument(
        "--data-dir", type=Path, help="the data dir of 'lambdabus up' (default .lambdabus)"
    )
    events = commands.add_parser("events", parents=[common], help="tail lifecycle events")
    events.add_argument("--function", help="only events of this function")
    events.add_argument("--type", help="only this type, e.g. build.failed")
    events.add_argument("--since", help="replay from an RFC 3339 time or a duration like 10m")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status is 0 (done), 1 (the platform refused or failed) or 2
    (the command line is wrong). No traceback reaches the user: whatever else goes wrong is one
    `error: internal: ...` line and status 1."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the last resort of the exit contract
        return _fail("internal", f"{type(error).__name__}: {error}", 1)


def _main(arguments: list[str]) -> int:
    parser = build_parser()
    if not arguments:
        parser.print_help()
        return 0
    up_arguments = _up_arguments(arguments)
    if up_arguments is not None:
        return _up(up_arguments)

    try:
        args = parser.parse_args(arguments)
    except UsageError as error:
        hint = suggestion(arguments, parser)
        return _fail("usage", hint or str(error), 2)
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0

    if args.command == "completion":
        print(completion_script(args.shell, command_tree(parser)), end="")
        return 0
    overrides = {key: getattr(args, key) for key in ("url", "namespace") if hasattr(args, key)}
    try:
        settings = ClientSettings().model_copy(update=overrides)
    except ValidationError as error:
        problems = [
            f"LAMBDABUS_{'_'.join(map(str, item['loc'])).upper()}: {item['msg']}"
            for item in error.errors()
        ]
        return _fail("invalid_settings", "; ".join(problems), 2)
    output = getattr(args, "output", "table")

    if args.command == "up":  # only reached through unusual spellings; `up` parses its own
        return _up(args.rest)
    command = _COMMANDS[args.command]
    try:
        return asyncio.run(command(settings, args, output))
    except ApiError as error:
        return _fail(error.code, error.message + auth_hint(error.status, settings), 1)
    except (UsageError, PackagingError) as error:
        code = "usage" if isinstance(error, UsageError) else "invalid_source"
        return _fail(code, str(error), 2)
    except KeyboardInterrupt:
        # Ending a tail is how a tail is meant to end.
        return 0 if args.command == "events" or getattr(args, "follow", False) else 130
    except BrokenPipeError:
        # The reader went away (`lambdabus events | head`): not an error, and the flush at
        # interpreter exit must not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def suggestion(arguments: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """'unknown command 'X' (did you mean 'Y'?) ...' when the first word that is not an option is
    an unknown command close to a known one; '' otherwise."""
    words = [word for word in arguments if not word.startswith("-")]
    if not words:
        return ""
    known = list(command_tree(parser))
    if words[0] in known:
        return ""
    close = difflib.get_close_matches(words[0], known, n=1)
    if not close:
        return ""
    return f"unknown command '{words[0]}' (did you mean '{close[0]}'?; see 'lambdabus --help')"


def _up(arguments: list[str]) -> int:
    # Imported here: `up` pulls in the platform runner, which no other command needs.
    from lambdabus_client.up import main as up_main  # type: ignore[import-not-found,unused-ignore]

    status: int = up_main(arguments)
    return status


def _up_arguments(arguments: list[str]) -> list[str] | None:
    """The arguments after `up` when the command is `up` (they belong to `up`'s own parser)."""
    index = 0
    while index < len(arguments):
        token = arguments[index]
        if token in ("-h", "--help"):
            return None
        if token in _GLOBAL_OPTIONS_WITH_VALUE:
            index += 2
        elif token.startswith("-"):
            index += 1
        else:
            return arguments[index + 1 :] if token == "up" else None
    return None


_COMMANDS: dict[str, Command] = {
    "secret": _secret,
    "token": _token,
    "credentials": _credentials,
    "deploy": _deploy,
    "invoke": _invoke,
    "logs": _logs,
    "history": _history,
    "top": _top,
    "ls": _ls,
    "status": _status,
    "sync": _sync,
    "describe": _describe,
    "update": _update,
    "init": _init,
    "rm": _rm,
    "events": _events,
    "invocation": _invocation,
    "publish": _publish,
    "triggers": _triggers,
    "schedules": _schedules,
    "deadletters": _deadletters,
    **REVISION_COMMANDS,
}
