"""An async HTTP client for the Lambdabus gateway's management API.

It speaks HTTP only (never NATS): `LambdabusClient` owns one aiohttp session, turns every error
answer into an `ApiError`, and reads the lifecycle stream through `SSEDecoder`, a pure
server-sent-events parser.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import aiohttp
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

JsonObject = dict[str, Any]

USER_AGENT = "lambdabus-client/0.1.0"


class ClientSettings(BaseSettings):
    """Where the gateway is and which namespace commands act on (`LAMBDABUS_URL`, ...)."""

    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_", extra="ignore")

    url: str = "http://127.0.0.1:8080"
    namespace: str = "default"
    timeout: float = Field(default=30.0, gt=0, description="seconds per request")


class ApiError(Exception):
    """The gateway answered with an error, or could not be reached (`status` 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


_END_OF_LINE = re.compile(r"\r\n|\r|\n")


@dataclass(slots=True)
class SSEDecoder:
    """Incremental `text/event-stream` parser (the WHATWG rules a client needs).

    Feed it bytes as they arrive, in chunks of any size; it returns the events completed by
    each chunk. Lines starting with `:` are comments, several `data:` lines join with newlines,
    and a blank line dispatches the event (an event with no data is dropped).
    """

    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _buffer: str = ""
    _started: bool = False
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _last_id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        self._buffer += text
        events: list[ServerSentEvent] = []
        position = 0
        while (match := _END_OF_LINE.search(self._buffer, position)) is not None:
            if match.group() == "\r" and match.end() == len(self._buffer):
                break  # maybe the first half of a CRLF split across chunks
            event = self.feed_line(self._buffer[position : match.start()])
            if event is not None:
                events.append(event)
            position = match.end()
        self._buffer = self._buffer[position:]
        return events

    def feed_line(self, line: str) -> ServerSentEvent | None:
        """Process one line (without its line ending); return the event a blank line completes."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None  # `retry` and unknown fields are ignored

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent(data="\n".join(data), event=event or "message", id=self._last_id)


class LambdabusClient:
    """The management API of one gateway. Use as `async with LambdabusClient(url) as client:`."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> Self:
        return cls(settings.url, timeout=settings.timeout)

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": USER_AGENT},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- functions -------------------------------------------------------------------------

    async def create_function(
        self, namespace: str, spec: Mapping[str, Any], archive: bytes
    ) -> JsonObject:
        """Upload a new function (`spec` holds `name` and the settings to change). 409 if it exists."""
        return await self._json_object(
            "POST", _functions_path(namespace), data=_upload_form(spec, archive)
        )

    async def replace_function(
        self,
        namespace: str,
        spec: Mapping[str, Any],
        archive: bytes,
        *,
        if_match: str | None = None,
    ) -> JsonObject:
        """Upload a new source and spec for the existing function `spec["name"]`."""
        headers = {"If-Match": if_match} if if_match is not None else None
        return await self._json_object(
            "PUT",
            _function_path(namespace, _spec_name(spec)),
            data=_upload_form(spec, archive),
            headers=headers,
        )

    async def deploy_function(
        self, namespace: str, spec: Mapping[str, Any], archive: bytes
    ) -> tuple[Literal["created", "updated"], JsonObject]:
        """Create the function, or replace it if one of that name already exists."""
        try:
            return "created", await self.create_function(namespace, spec, archive)
        except ApiError as error:
            if error.status != 409:
                raise
        return "updated", await self.replace_function(namespace, spec, archive)

    async def list_functions(self, namespace: str) -> list[JsonObject]:
        answer = await self._json_object("GET", _functions_path(namespace))
        items = answer.get("items")
        if not isinstance(items, list):
            raise ApiError(200, "invalid_response", "the function list has no 'items' array")
        return items

    async def get_function(self, namespace: str, name: str) -> JsonObject:
        return await self._json_object("GET", _function_path(namespace, name))

    async def function_status(self, namespace: str, name: str) -> JsonObject:
        return await self._json_object("GET", _function_path(namespace, name) + "/status")

    async def delete_function(self, namespace: str, name: str) -> JsonObject:
        return await self._json_object("DELETE", _function_path(namespace, name))

    # -- lifecycle stream ------------------------------------------------------------------

    async def lifecycle(
        self,
        namespace: str | None = None,
        function: str | None = None,
        type: str | None = None,
        since: str | None = None,
    ) -> AsyncIterator[JsonObject]:
        """Lifecycle CloudEvents as the gateway streams them, until it closes the stream."""
        filters = {"namespace": namespace, "function": function, "type": type, "since": since}
        params = {key: value for key, value in filters.items() if value is not None}
        # No overall deadline on a tail; only connecting is bounded.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
        decoder = SSEDecoder()
        async with self._request(
            "GET",
            "/v1/lifecycle",
            params=params,
            headers={"Accept": "text/event-stream"},
            timeout=timeout,
        ) as response:
            async for chunk in response.content.iter_any():
                for event in decoder.feed(chunk):
                    yield _event_object(event)

    # -- plumbing --------------------------------------------------------------------------

    async def _json_object(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        async with self._request(method, path, **kwargs) as response:
            try:
                body = await response.json(content_type=None)
            except ValueError as exc:
                raise ApiError(
                    response.status, "invalid_response", f"{method} {path} did not answer JSON"
                ) from exc
        if not isinstance(body, dict):
            raise ApiError(
                response.status, "invalid_response", f"{method} {path} did not answer an object"
            )
        return body

    @asynccontextmanager
    async def _request(
        self, method: str, path: str, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; error answers and transport failures (also while the body is read)
        become `ApiError`s, so the caller only ever sees a successful response."""
        if self._session is None:
            raise RuntimeError("use LambdabusClient as an async context manager")
        try:
            async with self._session.request(method, self.url + path, **kwargs) as response:
                if response.status >= 400:
                    raise await _error_from(response)
                yield response
        except aiohttp.ClientConnectorError as exc:
            raise ApiError(
                0,
                "unreachable",
                f"the gateway at {self.url} is not reachable — is `lambdabus up` running?",
            ) from exc
        except TimeoutError as exc:
            raise ApiError(
                0, "timeout", f"the gateway at {self.url} did not answer within {self.timeout:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise ApiError(
                0, "connection_error", f"talking to the gateway at {self.url} failed: {exc}"
            ) from exc


async def _error_from(response: aiohttp.ClientResponse) -> ApiError:
    text = await response.text(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return ApiError(response.status, error["code"], str(error.get("message", "")))
    message = " ".join(text.split())[:200] or (response.reason or "no message")
    return ApiError(response.status, f"http_{response.status}", message)


def _event_object(event: ServerSentEvent) -> JsonObject:
    try:
        body = json.loads(event.data)
    except ValueError as exc:
        raise ApiError(
            200, "invalid_event", "the lifecycle stream sent data that is not JSON"
        ) from exc
    if not isinstance(body, dict):
        raise ApiError(200, "invalid_event", "the lifecycle stream sent data that is not an object")
    return body


def _upload_form(spec: Mapping[str, Any], archive: bytes) -> aiohttp.FormData:
    _spec_name(spec)
    form = aiohttp.FormData()
    form.add_field("spec", json.dumps(dict(spec)), content_type="application/json")
    form.add_field("archive", archive, filename="function.zip", content_type="application/zip")
    return form


def _spec_name(spec: Mapping[str, Any]) -> str:
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a function spec needs a 'name'")
    return name


def _functions_path(namespace: str) -> str:
    return f"/v1/namespaces/{quote(namespace, safe='')}/functions"


def _function_path(namespace: str, name: str) -> str:
    return f"{_functions_path(namespace)}/{quote(name, safe='')}"
