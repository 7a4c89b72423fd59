"""What a function sees of a request: `Request` (LUNA style) and `Event` (Kyma/Kubeless style).

Both are built from the parsed request without copying the body; everything derived from
it (JSON, query, CloudEvent) is computed on first access.

How a body becomes `data` (the Kyma `event["data"]` and the LUNA `request.event["data"]`):
a JSON content type (`application/json`, `*+json`) → the parsed value (invalid JSON → 400);
`application/octet-stream` → bytes; `application/x-www-form-urlencoded` (what `curl -d`
sends) whose body is a JSON object or array → the parsed value, as LUNA's `request.json` reads
it; any other content type, or none → str when the body is UTF-8 (or the charset it names),
else bytes; an empty body → None.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

_UNSET: Any = object()

# The CloudEvents attributes every Kyma event has, '' when the request does not carry them.
KYMA_CE_KEYS = ("ce-type", "ce-source", "ce-id", "ce-time", "ce-specversion")


class InvalidJSONError(ValueError):
    """The body is not valid JSON; if a function lets it escape, the caller gets a 400."""


class Headers(Mapping[str, str]):
    """Request headers: a read-only, case-insensitive mapping.

    Keys iterate in lower case; a header sent several times is joined with ", ".
    `raw` keeps the (name, value) pairs as sent.
    """

    __slots__ = ("_map", "raw")

    def __init__(self, lowered: dict[str, str], raw: list[tuple[str, str]]) -> None:
        self._map = lowered
        self.raw = raw

    def __getitem__(self, key: str) -> str:
        return self._map[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def getall(self, key: str) -> list[str]:
        """Every value of `key`, in the order sent."""
        key = key.lower()
        return [value for name, value in self.raw if name.lower() == key]

    def __repr__(self) -> str:
        return f"Headers({self._map!r})"


def _unquote(text: str) -> str:
    if "%" not in text:
        return text
    from urllib.parse import unquote

    return unquote(text)


class Request:
    """One HTTP request as a function sees it.

    `path` is the request path with a leading `/<ns>/<name>` cut off (the router forwards
    the original path), percent-decoded, so the function sees `/` or `/sub/path`.
    """

    __slots__ = (
        "_event",
        "_json",
        "_query_all",
        "body",
        "client",
        "headers",
        "method",
        "path",
        "query_string",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes,
        prefix: str = "",
        client: tuple[str, int] | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.client = client
        path, _, self.query_string = target.partition("?")
        if prefix and path.startswith(prefix):
            rest = path[len(prefix) :]
            if not rest:
                path = "/"
            elif rest[0] == "/":
                path = rest
        self.path = _unquote(path)
        self._json: Any = _UNSET
        self._query_all: dict[str, list[str]] | None = None
        self._event: Any = _UNSET

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path}>"

    @property
    def json(self) -> Any:
        """The body parsed as JSON, None when empty; `InvalidJSONError` when it is not JSON."""
        if self._json is _UNSET:
            if not self.body:
                self._json = None
            else:
                try:
                    self._json = json.loads(self.body)
                except ValueError as exc:  # JSONDecodeError or UnicodeDecodeError
                    raise InvalidJSONError(f"the body is not valid JSON: {exc}") from None
        return self._json

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.body.decode("utf-8", "replace")

    @property
    def query_all(self) -> dict[str, list[str]]:
        """Every value of every query parameter."""
        if self._query_all is None:
            result: dict[str, list[str]] = {}
            if self.query_string:
                from urllib.parse import parse_qsl

                for key, value in parse_qsl(self.query_string, keep_blank_values=True):
                    result.setdefault(key, []).append(value)
            self._query_all = result
        return self._query_all

    @property
    def query(self) -> dict[str, str]:
        """The first value of each query parameter."""
        return {key: values[0] for key, values in self.query_all.items()}

    @property
    def data(self) -> Any:
        """The body decoded by its content type (see the module docstring)."""
        return decode_data(self.body, self.headers.get("content-type"))

    @property
    def event(self) -> dict[str, Any] | None:
        """The CloudEvent of a binary-mode request (`ce-*` headers), else None.

        Its keys are the attributes without the `ce-` prefix (`id`, `source`, `type`,
        `specversion`, `time`, extensions...), `datacontenttype` from the Content-Type
        header when present, and `data` (decoded like `data`).
        """
        if self._event is _UNSET:
            event: dict[str, Any] | None = None
            structured = structured_event(self)
            if structured is not None:
                self._event = structured
                return structured
            for key, value in self.headers.items():
                if key.startswith("ce-") and len(key) > 3:
                    if event is None:
                        event = {}
                    event[key[3:]] = _unquote(value)
            if event is not None:
                content_type = self.headers.get("content-type")
                if content_type is not None:
                    event["datacontenttype"] = content_type
                event["data"] = self.data
            self._event = event
        return self._event  # type: ignore[no-any-return]


_FORM = "application/x-www-form-urlencoded"


def _is_json_type(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def decode_data(body: bytes, content_type: str | None) -> Any:
    """The body as a function's `data`: parsed JSON, str or bytes (see the module docstring)."""
    if not body:
        return None
    charset = "utf-8"
    if content_type:
        media_type, _, params = content_type.partition(";")
        media_type = media_type.strip().lower()
        if _is_json_type(media_type):
            try:
                return json.loads(body)
            except ValueError as exc:
                raise InvalidJSONError(f"the body is not valid JSON: {exc}") from None
        if media_type == "application/octet-stream":
            return body
        if media_type == _FORM and body.lstrip()[:1] in (b"{", b"["):
            # `curl -d '{...}'` labels JSON as a form; a form body never starts with { or [.
            try:
                return json.loads(body)
            except ValueError:
                pass
        for param in params.split(";"):
            pname, _, pvalue = param.partition("=")
            if pname.strip().lower() == "charset":
                charset = pvalue.strip().strip('"') or charset
    try:
        return body.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return body


STRUCTURED = "application/cloudevents+json"


def structured_event(request: Request) -> dict[str, Any] | None:
    """The CloudEvent of a structured-mode request (`application/cloudevents+json`, as the
    router delivers an event whose extensions are integers or booleans), in the shape of
    `Request.event`: attributes with their JSON types, `data` (`data_base64` decoded to bytes).
    None when the request is not one."""
    content_type = request.headers.get("content-type") or ""
    if content_type.partition(";")[0].strip().lower() != STRUCTURED:
        return None
    try:
        value = json.loads(request.body)
    except ValueError:
        return None
    if not isinstance(value, dict) or "specversion" not in value:
        return None
    event = {k: v for k, v in value.items() if k not in ("data", "data_base64")}
    encoded = value.get("data_base64")
    if isinstance(encoded, str):
        import base64

        event["data"] = base64.b64decode(encoded)
    else:
        event["data"] = value.get("data")
    return event


class Event(dict[str, Any]):
    """The Kyma/Kubeless event: a dict with `data`, the `ce-*` attributes, Kubeless's
    `event-id`, `event-type`, `event-time` and `event-namespace`, and `extensions`.

    `ce-type`, `ce-source`, `ce-id`, `ce-time` and `ce-specversion` are always present
    ('' when the request has no such header); other `ce-*` headers are added as sent. A
    structured-mode request gives the same keys from its JSON, integers and booleans kept.
    `extensions["request"]` is the `Request`.
    """

    @classmethod
    def from_request(cls, request: Request) -> Event:
        event = cls()
        structured = structured_event(request)
        event["data"] = request.data if structured is None else structured["data"]
        for key in KYMA_CE_KEYS:
            event[key] = ""
        if structured is not None:  # the attributes keep their types (5, true)
            for name, value in structured.items():
                if name not in ("data", "datacontenttype"):
                    event[f"ce-{name}"] = value
        for key, value in request.headers.items():
            if key.startswith("ce-"):
                event[key] = _unquote(value)
        kubeless_fields(event, request.headers)
        event["extensions"] = {"request": request}
        return event


def kubeless_fields(event: dict[str, Any], headers: Mapping[str, str]) -> None:
    """Kubeless's event keys, from its headers (`event-id`, `event-type`, `event-time`,
    `event-namespace`) when the caller sent them, else from the CloudEvent, else made up:
    a fresh id, the body's media type, now (RFC 3339, UTC, `Z`) and `http.lambdabus`."""
    media = (headers.get("content-type") or "").partition(";")[0].strip().lower()
    event["event-id"] = headers.get("event-id") or str(event.get("ce-id") or "") or _new_id()
    event["event-type"] = (
        headers.get("event-type") or str(event.get("ce-type") or "") or media or "none"
    )
    event["event-time"] = headers.get("event-time") or _utc(str(event.get("ce-time") or ""))
    event["event-namespace"] = (
        headers.get("event-namespace") or str(event.get("ce-source") or "") or "http.lambdabus"
    )


def _new_id() -> str:
    import uuid

    return str(uuid.uuid4())


def _utc(time: str) -> str:
    """`time` (RFC 3339) in UTC with a `Z`; now when it is empty or not a time."""
    from datetime import UTC, datetime

    moment = datetime.now(UTC)
    if time:
        try:
            parsed = datetime.fromisoformat(time)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                moment = parsed.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
