"""`invoke` (call a function now or queue it) and `invocation` (an asynchronous one's record)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from lambdabus_client.client import (
    ClientSettings,
    Invocation,
    JsonObject,
    LambdabusClient,
)
from lambdabus_client.commands.common import (
    UsageError,
    _fail,
    _one_line,
    auth_hint,
    parse_headers,
    print_data,
)

FINISHED = frozenset({"succeeded", "failed"})


def invocation_lines(record: JsonObject) -> list[str]:
    """What `lambdabus invocation` prints about an asynchronous invocation."""
    lines = [
        f"Invocation:  {record.get('id', '-')}",
        f"Function:    {record.get('namespace', '-')}/{record.get('function', '-')}",
        f"Status:      {record.get('status', '-')}",
        f"Attempts:    {record.get('attempts', 0)}",
    ]
    if record.get("result_status") is not None:
        lines.append(f"HTTP status: {record['result_status']}")
    if record.get("error"):
        lines.append(f"Error:       {_one_line(str(record['error']))}")
    result = record.get("result")
    if result is not None:
        text = result if isinstance(result, str) else json.dumps(result, indent=2)
        lines.append("Result:")
        lines.extend(f"  {line}" for line in text.splitlines() or [""])
    return lines


def next_poll(delay: float) -> float:
    """The wait before the next status poll: from 0.2 s, growing by half, at most 2 s."""
    return min(max(delay, 0.1) * 1.5, 2.0)


def json_body(text: str) -> bytes:
    """`--data`: it must be JSON, sent as the compact UTF-8 text the user wrote."""
    try:
        json.loads(text)
    except ValueError as error:
        raise UsageError(f"--data is not valid JSON ({error})") from None
    return text.encode()


def guess_content_type(body: bytes) -> str:
    """The type of a `--data-file`: JSON if it parses, text if it is UTF-8, else bytes."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return "application/octet-stream"
    try:
        json.loads(text)
    except ValueError:
        return "text/plain; charset=utf-8"
    return "application/json"


def is_json_type(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def platform_error(answer: Invocation) -> tuple[str, str] | None:
    """`(code, message)` when the platform itself refused (no such function, no ready instance,
    timeout, ...), rather than the function answering an error: the platform marks its own
    answers with the `X-Lambdabus-Error` header."""
    if answer.status < 400 or "X-Lambdabus-Error" not in answer.headers:
        return None
    try:
        body = json.loads(answer.body)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("code"), str)):
        return None
    message = str(error.get("message", ""))
    retry_after = answer.headers.get("Retry-After")
    if retry_after:
        message = f"{message} (retry after {retry_after} s)"
    return error["code"], message


def render_body(body: bytes, content_type: str | None) -> str | bytes:
    """What `invoke` prints: JSON pretty-printed, other UTF-8 text as is, anything else as the
    raw bytes."""
    if is_json_type(content_type):
        try:
            return json.dumps(json.loads(body), indent=2, ensure_ascii=False) + "\n"
        except ValueError:
            pass  # claims JSON but is not: show what came
    try:
        return body.decode()
    except UnicodeDecodeError:
        return body


async def _invoke(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    headers = parse_headers(args.header)
    if args.callback_url is not None and not args.run_async:
        raise UsageError("--callback-url needs --async")
    body, content_type = b"", None
    if args.data is not None:
        body, content_type = json_body(args.data), "application/json"
    elif args.data_file is not None:
        body = await asyncio.to_thread(_read_data_file, args.data_file)
        content_type = guess_content_type(body)
    if args.run_async:
        async with LambdabusClient.from_settings(settings) as client:
            queued = await client.invoke_async(
                settings.namespace, args.name, body, content_type, headers, args.callback_url
            )
        if output != "table":
            print_data(output, queued)
        else:
            print(queued.get("invocation_id", ""))
        return 0
    async with LambdabusClient.from_settings(settings) as client:
        answer = await client.invoke(settings.namespace, args.name, body, content_type, headers)
    error = platform_error(answer)
    if error is not None:
        return _fail(error[0], error[1] + auth_hint(answer.status, settings), 1)
    rendered = render_body(answer.body, answer.headers.get("Content-Type"))
    if isinstance(rendered, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(rendered)
        sys.stdout.buffer.flush()
    elif rendered:
        print(rendered, end="" if rendered.endswith("\n") else "\n")
    if answer.status >= 400:
        sys.stdout.flush()
        return _fail(
            "function_error", f"{settings.namespace}/{args.name} answered {answer.status}", 1
        )
    return 0


def _read_data_file(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"--data-file {path}: {error.strerror or error}") from None


async def _invocation(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    if args.wait_timeout <= 0:
        raise UsageError("--wait-timeout must be more than 0 seconds")
    async with LambdabusClient.from_settings(settings) as client:
        record = await client.get_invocation(settings.namespace, args.id)
        if args.wait:
            delay = 0.2
            try:
                async with asyncio.timeout(args.wait_timeout):
                    while record.get("status") not in FINISHED:
                        await asyncio.sleep(delay)
                        delay = next_poll(delay)
                        record = await client.get_invocation(settings.namespace, args.id)
            except TimeoutError:
                return _fail(
                    "timeout",
                    f"invocation {args.id} is still {record.get('status')} after "
                    f"{args.wait_timeout:g} s",
                    1,
                )
    if output != "table":
        print_data(output, record)
    else:
        print("\n".join(invocation_lines(record)))
    if record.get("status") == "failed":
        sys.stdout.flush()
        return _fail("invocation_failed", str(record.get("error") or "it failed"), 1)
    return 0
