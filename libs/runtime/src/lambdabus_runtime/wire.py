"""HTTP/1.1 on the wire: parse a request head, read a body, encode and render a response.

Everything but `read_chunked` is pure. The parser is strict where a lenient one would let
requests be smuggled (bare CR/LF, obsolete line folding, both Transfer-Encoding and
Content-Length, a bad Content-Length) and lenient elsewhere (leading empty lines).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from lambdabus_runtime.response import Response

MAX_HEAD = 64 * 1024
CHUNKED = -1

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_FRAMING = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "upgrade"}
)
_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    417: "Expectation Failed",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
_JSON = json.JSONEncoder(separators=(",", ":"))

JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"
BINARY_TYPE = "application/octet-stream"


class HttpError(Exception):
    """A request the server answers itself, with `status` and an error body, then closes."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Head(NamedTuple):
    """A parsed request head. `headers` has lower-case names, repeated ones joined by ", "."""

    method: str
    target: str
    http10: bool
    headers: dict[str, str]
    raw: list[tuple[str, str]]


def parse_head(head: bytes) -> Head | None:
    """Parse a request line and header fields ending with an empty line.

    None when `head` is only empty lines (a client may send some between requests).
    """
    text = head.decode("latin-1")
    if text[0] in "\r\n":
        text = text.lstrip("\r\n")
        if not text:
            return None
    crlf = text.count("\r\n")
    if crlf != text.count("\r") or crlf != text.count("\n") or "\x00" in text:
        raise HttpError(400, "bad_request", "bare CR, LF or NUL in the request head")
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "bad_request", "malformed request line")
    method, target, version = parts
    if not method or method.strip(_TOKEN_CHARS) or not target:
        raise HttpError(400, "bad_request", "malformed request line")
    if version == "HTTP/1.1":
        http10 = False
    elif version == "HTTP/1.0":
        http10 = True
    elif version.startswith("HTTP/") and len(version) == 8:
        raise HttpError(505, "http_version_not_supported", f"{version} is not supported")
    else:
        raise HttpError(400, "bad_request", "malformed request line")
    if not target.isascii():
        target = target.encode("latin-1").decode("utf-8", "replace")
    headers: dict[str, str] = {}
    raw: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # Also rejects whitespace before the colon and obsolete line folding.
        if not colon or not name or name.strip(_TOKEN_CHARS):
            raise HttpError(400, "bad_request", f"malformed header line {line[:100]!r}")
        value = value.strip(" \t")
        key = name.lower()
        previous = headers.get(key)
        headers[key] = value if previous is None else f"{previous}, {value}"
        raw.append((name, value))
    return Head(method, target, http10, headers, raw)


def body_length(headers: dict[str, str]) -> int:
    """The Content-Length of a request, 0 without one, or `CHUNKED`."""
    encoding = headers.get("transfer-encoding")
    if encoding is not None:
        if "content-length" in headers:
            raise HttpError(400, "bad_request", "both Transfer-Encoding and Content-Length")
        if encoding.lower() != "chunked":
            raise HttpError(
                501, "not_implemented", f"Transfer-Encoding {encoding!r} is not supported"
            )
        return CHUNKED
    length = headers.get("content-length")
    if length is None:
        return 0
    if not (length.isascii() and length.isdigit()):
        values = {item.strip(" \t") for item in length.split(",")}
        length = values.pop()
        if values or not (length.isascii() and length.isdigit()):
            raise HttpError(400, "bad_request", "invalid Content-Length")
    return int(length)


def keeps_alive(head: Head) -> bool:
    """Whether the connection stays open after this request (HTTP/1.1 default: yes)."""
    value = head.headers.get("connection")
    if value is None:
        return not head.http10
    tokens = {token.strip(" \t") for token in value.lower().split(",")}
    if head.http10:
        return "keep-alive" in tokens
    return "close" not in tokens


async def read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    """Read a chunked body (discarding extensions and trailers); 413 past `max_body` bytes."""
    parts: list[bytes] = []
    total = 0
    try:
        while True:
            line = await reader.readuntil(b"\r\n")
            size_text = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not size_text or len(size_text) > 16 or size_text.strip(_HEX_DIGITS):
                raise HttpError(400, "bad_request", "malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > max_body:
                raise HttpError(413, "body_too_large", f"the body exceeds {max_body} bytes")
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise HttpError(400, "bad_request", "a chunk does not end with CRLF")
            parts.append(chunk[:-2])
        trailers = 0
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            trailers += len(line)
            if trailers > MAX_HEAD:
                raise HttpError(431, "headers_too_large", "the trailers are too large")
    except asyncio.LimitOverrunError:
        raise HttpError(400, "bad_request", "a chunk size line is too long") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def json_bytes(value: Any) -> bytes:
    """Compact, ASCII-only JSON."""
    return _JSON.encode(value).encode("ascii")


def error_body(code: str, message: str) -> bytes:
    return json_bytes({"error": {"code": code, "message": message}})


def _header_block(headers: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> tuple[str, str | None]:
    """The function's headers as `Name: value\r\n` lines, and its Content-Type if it set one."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    lines: list[str] = []
    content_type: str | None = None
    for name, value in pairs:
        text = value if isinstance(value, str) else str(value)
        if not isinstance(name, str) or not name or name.strip(_TOKEN_CHARS):
            raise ValueError(f"invalid response header name {name!r}")
        if "\r" in text or "\n" in text or "\x00" in text:
            raise ValueError(f"invalid value for response header {name!r}")
        text.encode("latin-1")  # raises UnicodeEncodeError (a ValueError) when not sendable
        key = name.lower()
        if key == "content-type":
            content_type = text
        elif key not in _FRAMING:
            lines.append(f"{name}: {text}\r\n")
    return "".join(lines), content_type


def encode_result(result: Any) -> tuple[int, str, bytes]:
    """A function's return value as (status, header lines, body).

    dict/list (and other JSON values) → JSON, str → text, bytes → octet-stream,
    None → 204, `Response` → its status and headers. Raises TypeError or ValueError
    when the value cannot be sent.
    """
    if type(result) is dict:
        return 200, "Content-Type: application/json\r\n", json_bytes(result)
    status = 200
    extra = ""
    content_type: str | None = None
    if isinstance(result, Response):
        status = result.status
        if result.headers:
            extra, content_type = _header_block(result.headers)
        body = result.body
    elif result is None:
        return 204, "", b""
    else:
        body = result
    if body is None:
        payload = b""
    elif isinstance(body, bytes | bytearray | memoryview):
        payload = bytes(body)
        content_type = content_type or BINARY_TYPE
    elif isinstance(body, str):
        payload = body.encode("utf-8")
        content_type = content_type or TEXT_TYPE
    else:
        payload = json_bytes(body)
        content_type = content_type or JSON_TYPE
    if content_type is not None:
        extra = f"Content-Type: {content_type}\r\n{extra}"
    return status, extra, payload


_date_second = -1
_date_text = ""
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date() -> str:
    """The current IMF-fixdate, formatted at most once a second."""
    global _date_second, _date_text
    now = int(time.time())
    if now != _date_second:
        t = time.gmtime(now)
        _date_text = (
            f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
        )
        _date_second = now
    return _date_text


def _reason(status: int) -> str:
    reason = _REASONS.get(status)
    if reason is None:
        from http import HTTPStatus

        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    return reason


def render_head(
    status: int,
    header_lines: str,
    length: int,
    *,
    keep_alive: bool,
    http10: bool = False,
) -> bytes:
    """The status line and headers of a response whose body is `length` bytes."""
    framing = "" if status == 204 or status == 304 else f"Content-Length: {length}\r\n"
    if keep_alive:
        connection = "Connection: keep-alive\r\n" if http10 else ""
    else:
        connection = "Connection: close\r\n"
    return (
        f"HTTP/1.1 {status} {_reason(status)}\r\nDate: {http_date()}\r\n"
        f"{framing}{header_lines}{connection}\r\n"
    ).encode("latin-1")


def render_error(error: HttpError, *, keep_alive: bool = False) -> bytes:
    """A whole error response: `{"error": {"code", "message"}}`."""
    body = error_body(error.code, error.message)
    head = render_head(
        error.status, "Content-Type: application/json\r\n", len(body), keep_alive=keep_alive
    )
    return head + body
