"""User CloudEvents on the router's side: read from EVENTS (structured JSON), sent to a function
in HTTP binary mode (structured mode when an extension attribute is an integer or a boolean,
which a header would make a string), and read back from a function's answer (a reply). Pure,
no I/O.

Binary mode (CloudEvents HTTP binding 1.0): every context attribute but `datacontenttype`
becomes a `ce-<name>` header, `datacontenttype` becomes `Content-Type`, and the body is the
event's data (`data` as JSON text, or a string as is, or the bytes of `data_base64`). Header
values are percent-encoded where HTTP cannot carry them (space, `"`, `%`, and every byte outside
printable ASCII), and decoded again when read.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote

STRUCTURED: Final = "application/cloudevents+json"
BATCH: Final = "application/cloudevents-batch+json"
REQUIRED: Final = ("id", "source", "specversion", "type")
_DATA_KEYS: Final = frozenset({"data", "data_base64"})
_NAME = re.compile(r"^[a-z0-9]{1,20}$")
# What a header value may carry unescaped: printable ASCII but space, `"` and `%`.
_HEADER_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_NEEDS_ESCAPE = re.compile(r"[^\x21\x23\x24\x26-\x7e]")
_KNOWN: Final = frozenset(
    {"id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time"}
)


class InvalidEvent(ValueError):
    """Not a CloudEvent the router can deliver or publish; the message says which rule broke."""


@dataclass(frozen=True, slots=True)
class UserEvent:
    """One CloudEvent: `structured` as stored, `attrs` its context attributes as strings (for
    matching and headers), and the data as an HTTP body with its content type."""

    structured: dict[str, Any]
    attrs: dict[str, str]
    body: bytes
    content_type: str | None

    @property
    def id(self) -> str:
        return self.attrs["id"]

    @property
    def source(self) -> str:
        return self.attrs["source"]

    @property
    def type(self) -> str:
        return self.attrs["type"]


def _attribute(name: str, value: object) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    raise InvalidEvent(f"attribute {name!r} must be a string, an integer or a boolean")


def is_json_type(content_type: str | None) -> bool:
    """JSON data: no content type (JSON format's default), `application/json`, `text/json`, or
    any `+json` media type."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def validate(event: object) -> dict[str, Any]:
    """The event as a structured-mode dict, checked against CloudEvents 1.0 (or InvalidEvent)."""
    if not isinstance(event, dict):
        raise InvalidEvent("a structured CloudEvent is a JSON object")
    for name in REQUIRED:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            raise InvalidEvent(f"attribute {name!r} is required and must be a non-empty string")
    if event["specversion"] != "1.0":
        raise InvalidEvent(f"specversion must be '1.0', not {event['specversion']!r}")
    if "data" in event and "data_base64" in event:
        raise InvalidEvent("an event has 'data' or 'data_base64', not both")
    for name in event:
        if name not in _KNOWN and name not in _DATA_KEYS and _NAME.fullmatch(name) is None:
            raise InvalidEvent(
                f"attribute name {name!r} must be 1 to 20 lowercase letters or digits"
            )
    return event


def from_structured(event: dict[str, Any]) -> UserEvent:
    """A `UserEvent` from a structured-mode dict (validated here)."""
    validate(event)
    attrs: dict[str, str] = {}
    for name, value in event.items():
        if name in _DATA_KEYS:
            continue
        if type(value) is str:  # nearly every attribute
            attrs[name] = value
        elif value is not None:
            attrs[name] = _attribute(name, value)
    content_type = attrs.pop("datacontenttype", None)
    body = b""
    if "data_base64" in event:
        encoded = event["data_base64"]
        if not isinstance(encoded, str):
            raise InvalidEvent("'data_base64' must be a string")
        try:
            body = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidEvent("'data_base64' is not valid base64") from exc
        content_type = content_type or "application/octet-stream"
    elif "data" in event and event["data"] is not None:
        data = event["data"]
        if isinstance(data, str) and not is_json_type(content_type):
            body = data.encode()
        else:
            body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
            content_type = content_type or "application/json"
    return UserEvent(event, attrs, body, content_type)


def parse_structured(raw: bytes) -> UserEvent:
    """A stored event (structured-mode JSON). A dead letter sent again (its `event` and
    `trigger_uid` fields, which no CloudEvent can carry) yields the event it holds."""
    try:
        event = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from exc
    if isinstance(event, dict) and "trigger_uid" in event and isinstance(event.get("event"), dict):
        event = event["event"]
    return from_structured(event)


def encode_header(value: str) -> str:
    if _NEEDS_ESCAPE.search(value) is None:  # the common case, ten times faster than quote
        return value
    return quote(value, safe=_HEADER_SAFE)


def binary_headers(event: UserEvent) -> list[tuple[str, str]]:
    """The `ce-*` headers (and `Content-Type`) of the event in HTTP binary mode."""
    headers = [(f"ce-{name}", encode_header(value)) for name, value in event.attrs.items()]
    if event.content_type:
        headers.append(("Content-Type", event.content_type))
    return headers


def typed_extensions(event: UserEvent) -> bool:
    """Whether an extension attribute is an integer or a boolean, which binary mode's string
    headers would turn into text."""
    return any(
        not isinstance(value, str) and value is not None
        for name, value in event.structured.items()
        if name not in _KNOWN and name not in _DATA_KEYS
    )


def delivery_request(event: UserEvent) -> tuple[list[tuple[str, str]], bytes]:
    """The headers and body a function receives for `event`: binary mode, or structured mode
    when an extension attribute is an integer or a boolean (so it reaches the function as one;
    the runtimes read both modes into the same `event`)."""
    if not typed_extensions(event):
        return binary_headers(event), event.body
    kept = {k: v for k, v in event.structured.items() if v is not None}
    body = json.dumps(kept, separators=(",", ":"), ensure_ascii=False).encode()
    return [("Content-Type", STRUCTURED)], body


# -- replies -----------------------------------------------------------------------------------


def reply_events(headers: Iterable[tuple[str, str]], body: bytes) -> list[dict[str, Any]]:
    """The CloudEvents a function's 2xx answer carries, as validated structured dicts: one in
    binary mode (`ce-*` headers), one in structured mode, a list in batch mode; none for an
    answer that is not an event. InvalidEvent for one that tries to be and is not."""
    ce: dict[str, str] = {}
    content_type: str | None = None
    for name, value in headers:
        lower = name.lower()
        if lower.startswith("ce-"):
            ce[lower[3:]] = unquote(value)
        elif lower == "content-type":
            content_type = value
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == STRUCTURED:
        return [validate(_json(body))]
    if media == BATCH:
        events = _json(body)
        if not isinstance(events, list):
            raise InvalidEvent("a batch of CloudEvents is a JSON array")
        return [validate(event) for event in events]
    if not ce:
        return []
    event: dict[str, Any] = dict(ce)
    if "datacontenttype" in event:
        raise InvalidEvent("binary mode carries datacontenttype as Content-Type, not a header")
    if content_type:
        event["datacontenttype"] = content_type
    if body:
        if is_json_type(content_type):
            event["data"] = _json(body)
        elif media.startswith("text/") or "charset=" in (content_type or "").lower():
            try:
                event["data"] = body.decode()
            except UnicodeDecodeError:
                event["data_base64"] = base64.b64encode(body).decode()
        else:
            event["data_base64"] = base64.b64encode(body).decode()
    return [validate(event)]


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"the body is not JSON: {exc}") from exc
