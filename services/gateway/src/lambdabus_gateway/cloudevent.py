"""User CloudEvents as HTTP carries them (binary, structured and batch mode), read into the shape
of the JSON event format and checked against CloudEvents 1.0. Pure: no I/O.

Whatever mode an event came in, it is stored in structured mode: one JSON object holding the
attributes and `data` (a JSON value, or text) or `data_base64` (any other bytes).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final, Literal
from urllib.parse import unquote

from lambdabus_platform.subjects import event_subject

Mode = Literal["binary", "structured", "batch"]

STRUCTURED: Final = "application/cloudevents+json"
BATCH: Final = "application/cloudevents-batch+json"
CE_PREFIX: Final = "ce-"

REQUIRED: Final = ("specversion", "id", "source", "type")
OPTIONAL: Final = ("datacontenttype", "dataschema", "subject", "time")
CONTEXT: Final = frozenset(REQUIRED + OPTIONAL)
DATA_MEMBERS: Final = ("data", "data_base64")
# The longest NATS subject an event type may become (types are escaped into subject tokens).
MAX_TYPE_SUBJECT: Final = 1024
_INT32 = range(-(2**31), 2**31)

_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_TIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_MEDIA_TYPE = re.compile(
    rf'^{_TOKEN}/{_TOKEN}(?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|"(?:[^"\\]|\\.)*"))*\s*;?\s*$'
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_TYPES = ("application/xml", "application/x-www-form-urlencoded", "application/javascript")


@dataclass(frozen=True)
class Problem:
    """What is wrong with one event: the attribute at fault (`data`, `data_base64` for the
    payload; empty when the event as a whole is unreadable) and a message that says it."""

    attribute: str
    message: str


class NotCloudEvents(ValueError):
    """The request is in none of the CloudEvents HTTP modes this gateway reads."""


def detect_mode(content_type: str | None, has_ce_headers: bool) -> Mode:
    """The HTTP mode of a request, by its media type (the CloudEvents HTTP binding's rule):
    `application/cloudevents+json` is structured, `application/cloudevents-batch+json` a batch,
    any other type with `ce-*` headers binary. Raises NotCloudEvents otherwise."""
    media = media_type(content_type)
    if media == STRUCTURED:
        return "structured"
    if media == BATCH:
        return "batch"
    if media.startswith("application/cloudevents"):
        raise NotCloudEvents(
            f"Content-Type {content_type!r} is a CloudEvents format this gateway does not read: "
            f"send {STRUCTURED} (one event) or {BATCH} (a JSON array of events)"
        )
    if not has_ce_headers:
        shown = repr(content_type) if content_type else "none"
        raise NotCloudEvents(
            f"not a CloudEvent (Content-Type {shown}, no ce-* headers): send binary mode "
            f"(ce-specversion, ce-id, ce-source, ce-type headers and the data as the body), "
            f"structured mode ({STRUCTURED}) or a batch ({BATCH})"
        )
    return "binary"


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json_type(content_type: str | None) -> bool:
    media = media_type(content_type)
    return media == "application/json" or media.endswith("+json") or media == "text/json"


# -- reading the three modes -----------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN or Infinity (which JSON does not have)."""
    return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)


def structured_event(body: bytes) -> tuple[dict[str, Any], list[Problem]]:
    """A structured-mode body: one JSON object."""
    try:
        value = _loads(body)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}, [Problem("", f"the body is not valid JSON ({exc})")]
    if not isinstance(value, dict):
        return {}, [Problem("", f"a structured event is a JSON object, not {_json_kind(value)}")]
    return value, []


def batch_events(
    body: bytes,
) -> tuple[list[dict[str, Any]], list[tuple[int | None, Problem]]]:
    """A batch-mode body: a JSON array of structured events. Problems carry the event's index
    (None: the body as a whole)."""
    try:
        value = _loads(body)
    except ValueError as exc:
        return [], [(None, Problem("", f"the body is not valid JSON ({exc})"))]
    if not isinstance(value, list):
        kind = _json_kind(value)
        return [], [(None, Problem("", f"a batch is a JSON array of events, not {kind}"))]
    events: list[dict[str, Any]] = []
    problems: list[tuple[int | None, Problem]] = []
    for index, item in enumerate(value):
        if isinstance(item, dict):
            events.append(item)
        else:
            problems.append((index, Problem("", f"not a JSON object but {_json_kind(item)}")))
    return events, problems


def binary_event(
    headers: Iterable[tuple[str, str]], body: bytes
) -> tuple[dict[str, Any], list[Problem]]:
    """A binary-mode message: `ce-<name>` headers are the attributes (percent-decoded, as the
    HTTP binding says), `Content-Type` is `datacontenttype` and the body is the data: a JSON
    value when the type is JSON, text when it is textual UTF-8, otherwise `data_base64`."""
    event: dict[str, Any] = {}
    problems: list[Problem] = []
    content_type: str | None = None
    for key, value in headers:
        lower = key.lower()
        if lower == "content-type":
            content_type = value.strip()
            continue
        if not lower.startswith(CE_PREFIX):
            continue
        name = lower[len(CE_PREFIX) :]
        if name in DATA_MEMBERS:
            problems.append(
                Problem(name, f"'{name}' is not an attribute: in binary mode the body is the data")
            )
            continue
        if name in event:
            problems.append(Problem(name, f"attribute '{name}' is given twice (ce-{name})"))
            continue
        if not value.isascii():
            # The HTTP binding percent-encodes every byte outside printable ASCII; raw ones
            # reach us decoded by guesswork (latin-1 or surrogates), so their meaning is lost.
            problems.append(
                Problem(
                    name,
                    f"header ce-{name} holds bytes that are not ASCII: percent-encode the "
                    f"attribute's UTF-8 bytes (e.g. caf%C3%A9 for café)",
                )
            )
            continue
        try:
            event[name] = unquote(value.strip(), errors="strict")
        except UnicodeDecodeError:
            problems.append(
                Problem(name, f"attribute '{name}' is not percent-encoded UTF-8 (ce-{name})")
            )
    if content_type:
        event["datacontenttype"] = content_type
    if body:
        member, data, problem = _binary_data(body, content_type)
        if problem is not None:
            problems.append(problem)
        else:
            event[member] = data
    return event, problems


def _binary_data(body: bytes, content_type: str | None) -> tuple[str, Any, Problem | None]:
    media = media_type(content_type)
    if not media or is_json_type(content_type):
        try:
            return "data", _loads(body), None
        except ValueError as exc:
            if media:  # it says JSON and is not
                message = (
                    f"the body (the event's data) is not valid JSON ({exc}), "
                    f"though Content-Type {content_type!r} says it is"
                )
                return "data", None, Problem("data", message)
    elif _is_text(media, content_type or ""):
        try:
            return "data", body.decode("utf-8"), None
        except UnicodeDecodeError:
            pass  # kept as bytes
    return "data_base64", base64.b64encode(body).decode("ascii"), None


def _is_text(media: str, content_type: str) -> bool:
    if not (media.startswith("text/") or media.endswith("+xml") or media in _TEXT_TYPES):
        return False
    charset = re.search(r";\s*charset=\"?([^\";\s]+)", content_type, re.IGNORECASE)
    return charset is None or charset.group(1).lower() in ("utf-8", "utf8", "us-ascii")


# -- validation --------------------------------------------------------------------------------


# Events of these types come from the platform only: a user's would pass for a schedule's tick.
RESERVED_TYPE_PREFIX = "io.lambdabus."


def validate_cloudevent(event: Mapping[str, Any]) -> list[Problem]:
    """Every way `event` (in the JSON format's shape) breaks CloudEvents 1.0, or breaks what
    the platform can store; empty when it is valid. A member whose value is null counts as
    absent, as the JSON format says."""
    problems: list[Problem] = []

    def add(attribute: str, message: str) -> None:
        problems.append(Problem(attribute, message))

    for name in REQUIRED:
        value = event.get(name)
        if value is None:
            add(name, f"attribute '{name}' is required")
        elif not isinstance(value, str):
            add(name, f"attribute '{name}' must be a string, not {_json_kind(value)}")
        elif value == "":
            add(name, f"attribute '{name}' must not be empty")
        elif name == "specversion" and value != "1.0":
            add(name, f"specversion {value!r} is not supported: send CloudEvents 1.0 ('1.0')")
        elif name == "source" and _CONTROL.search(value):
            add(name, "attribute 'source' must be a URI-reference, without control characters")
        elif name == "type" and len(event_subject(value)) > MAX_TYPE_SUBJECT:
            add(name, f"attribute 'type' is too long ({len(value)} characters)")
        elif name == "type" and value.startswith(RESERVED_TYPE_PREFIX):
            add(
                name,
                f"type {value!r} is reserved: types starting with {RESERVED_TYPE_PREFIX!r} are "
                "the platform's own (schedules, lifecycle); use a prefix of your own, "
                "e.g. 'com.example.'",
            )

    for name in OPTIONAL:
        value = event.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            add(name, f"attribute '{name}' must be a string, not {_json_kind(value)}")
        elif value == "":
            add(name, f"attribute '{name}' must not be empty when present")
        elif name == "time" and not is_rfc3339(value):
            add(name, f"time {value!r} is not an RFC 3339 timestamp (e.g. 2024-05-01T12:00:00Z)")
        elif name == "datacontenttype" and not _MEDIA_TYPE.fullmatch(value):
            add(name, f"datacontenttype {value!r} is not a media type (e.g. application/json)")
        elif name == "dataschema" and (not _SCHEME.match(value) or _CONTROL.search(value)):
            add(name, f"dataschema {value!r} is not an absolute URI")

    for name, value in event.items():
        if name in DATA_MEMBERS or value is None:
            continue
        if not _NAME.fullmatch(name):
            add(
                name,
                f"attribute name {name!r} is not allowed: attribute names are 1 to 20 "
                "lowercase letters (a-z) and digits",
            )
        elif name not in CONTEXT and not _extension_value_ok(value):
            add(
                name,
                f"extension attribute '{name}' must be a string, a boolean or a 32-bit "
                f"integer, not {_json_kind(value)}",
            )

    data_base64 = event.get("data_base64")
    if data_base64 is not None:
        if event.get("data") is not None:
            add("data_base64", "an event carries 'data' or 'data_base64', not both")
        elif not isinstance(data_base64, str) or not _is_base64(data_base64):
            add("data_base64", "data_base64 must be a base64 string (RFC 4648)")
    return problems


def is_rfc3339(value: str) -> bool:
    """An RFC 3339 `date-time`: date, time, and `Z` or a numeric offset."""
    match = _TIME.fullmatch(value)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    try:
        offset = UTC
        if match.group(9) is not None:
            hours, minutes = int(match.group(10)), int(match.group(11))
            if minutes > 59:
                return False
            sign = 1 if match.group(9) == "+" else -1
            offset = timezone(sign * timedelta(hours=hours, minutes=minutes))
        # A leap second (:60) is valid RFC 3339; datetime has no room for it.
        datetime(year, month, day, hour, minute, min(second, 59), tzinfo=offset)
    except ValueError:
        return False
    return second <= 60


def _extension_value_ok(value: Any) -> bool:
    if isinstance(value, bool | str):
        return True
    return isinstance(value, int) and value in _INT32


def _is_base64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The structured-mode JSON stored on NATS: attributes and data, null members left out."""
    kept = {name: value for name, value in event.items() if value is not None}
    return json.dumps(kept, ensure_ascii=False, separators=(",", ":")).encode()
