"""An async HTTP client for the Lambdabus gateway's management API.

It speaks HTTP only (never NATS): `LambdabusClient` owns one aiohttp session, turns every error
answer into an `ApiError` (except a function's own answer to `invoke`), and reads the lifecycle
stream through `SSEDecoder` and log streams through `NDJSONDecoder`, two pure incremental parsers.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self
from urllib.parse import quote

import aiohttp
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

JsonObject = dict[str, Any]
DeployAction = Literal["created", "updated", "unchanged"]

USER_AGENT = "lambdabus-client/0.1.0"
NDJSON = "application/x-ndjson"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
CALLBACK_HEADER = "X-Callback-Url"


class ClientSettings(BaseSettings):
    """Where the gateway is and which namespace commands act on (`LAMBDABUS_URL`, ...)."""

    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_", extra="ignore")

    url: str = Field(default="http://127.0.0.1:8080", description="the gateway")
    namespace: str = Field(default="default", description="what commands act on (-n)")
    timeout: float = Field(default=30.0, gt=0, description="seconds per request")
    token: SecretStr | None = Field(default=None, description="API token (LAMBDABUS_TOKEN)")
    token_file: Path = Field(
        default=Path(".lambdabus/admin.token"),
        description="read when LAMBDABUS_TOKEN is not set: the admin token `lambdabus up` "
        "writes into its data directory",
    )

    def resolved_token(self) -> str | None:
        """LAMBDABUS_TOKEN, else the token file's first line when it is there."""
        if self.token is not None and self.token.get_secret_value().strip():
            return self.token.get_secret_value().strip()
        try:
            text = self.token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return text.strip() or None


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


@dataclass(slots=True)
class NDJSONDecoder:
    """Incremental `application/x-ndjson` parser: one JSON object per line.

    Feed it bytes in chunks of any size (a line, even a UTF-8 character, may straddle chunks);
    it returns the objects completed by each chunk. Blank lines (keepalives) are skipped; `close`
    returns an object left on a last line without a newline.
    """

    _buffer: bytes = b""

    def feed(self, chunk: bytes) -> list[JsonObject]:
        # Splitting bytes on b"\n" is safe: no multi-byte UTF-8 sequence contains that byte.
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        return [_ndjson_object(line) for line in lines if line.strip()]

    def close(self) -> list[JsonObject]:
        rest, self._buffer = self._buffer, b""
        return [_ndjson_object(rest)] if rest.strip() else []


class Invocation(NamedTuple):
    """A function's answer to `invoke`, whatever its status."""

    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes


class LambdabusClient:
    """The management API of one gateway. Use as `async with LambdabusClient(url) as client:`."""

    def __init__(self, url: str, *, timeout: float = 30.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> Self:
        return cls(settings.url, timeout=settings.timeout, token=settings.resolved_token())

    async def __aenter__(self) -> Self:
        headers = {"User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), headers=headers
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
        self,
        namespace: str,
        spec: Mapping[str, Any],
        archive: bytes,
        *,
        filename: str = "function.zip",
        dependencies: bytes | None = None,
    ) -> tuple[DeployAction, JsonObject]:
        """Create the function, or replace it if one of that name already exists.

        "unchanged" means the gateway kept the function as it was (same source and settings,
        same generation), so nothing will be built or deployed.
        """
        try:
            return "created", await self._json_object(
                "POST",
                _functions_path(namespace),
                data=_upload_form(spec, archive, filename, dependencies),
            )
        except ApiError as error:
            if error.status != 409:
                raise
        status, record = await self._json_answer(
            "PUT",
            _function_path(namespace, _spec_name(spec)),
            data=_upload_form(spec, archive, filename, dependencies),
        )
        return ("unchanged" if status == 200 else "updated"), record

    async def list_functions(self, namespace: str, labels: Sequence[str] = ()) -> list[JsonObject]:
        """The namespace's functions; `labels` (`k=v` or `k`) keeps those that match all."""
        params = [("label", label) for label in labels]
        answer = await self._json_object("GET", _functions_path(namespace), params=params or None)
        items = answer.get("items")
        if not isinstance(items, list):
            raise ApiError(200, "invalid_response", "the function list has no 'items' array")
        return items

    async def get_function(self, namespace: str, name: str) -> JsonObject:
        return await self._json_object("GET", _function_path(namespace, name))

    async def patch_function(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> tuple[bool, JsonObject]:
        """Merge-patch the function's settings (RFC 7396); whether anything changed, and the
        record. The gateway rebuilds only when something that is built changed."""
        status, record = await self._json_answer(
            "PATCH",
            _function_path(namespace, name),
            data=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        return status == 202, record

    async def function_metrics(self, namespace: str, name: str) -> JsonObject:
        """Calls, errors, throttles, cold starts and percentiles over 1m, 5m and 1h."""
        return await self._json_object("GET", _function_path(namespace, name) + "/metrics")

    async def function_status(self, namespace: str, name: str) -> JsonObject:
        return await self._json_object("GET", _function_path(namespace, name) + "/status")

    async def sync_function(self, namespace: str, name: str) -> JsonObject:
        """Poll a git-sourced function's reference now; the record after it."""
        return await self._json_object("POST", _function_path(namespace, name) + "/sync")

    async def revisions(self, namespace: str, name: str) -> JsonObject:
        """The function's revisions, oldest first: `{"items": [...]}`."""
        return await self._json_object("GET", _function_path(namespace, name) + "/revisions")

    async def traffic(self, namespace: str, name: str) -> JsonObject:
        """The function's route and its status."""
        return await self._json_object("GET", _function_path(namespace, name) + "/traffic")

    async def set_traffic(
        self, namespace: str, name: str, targets: list[dict[str, Any]]
    ) -> JsonObject:
        """Replace the function's route; its status after."""
        return await self._json_object(
            "PUT",
            _function_path(namespace, name) + "/traffic",
            data=json.dumps({"traffic": targets}),
            headers={"Content-Type": "application/json"},
        )

    async def delete_function(self, namespace: str, name: str) -> JsonObject:
        return await self._json_object("DELETE", _function_path(namespace, name))

    async def history(self, namespace: str, name: str) -> list[JsonObject]:
        """The function's lifecycle events (structured CloudEvents), oldest first."""
        answer = await self._json_object("GET", _function_path(namespace, name) + "/history")
        items = answer.get("items")
        if not isinstance(items, list):
            raise ApiError(200, "invalid_response", "the history has no 'items' array")
        return items

    async def info(self) -> JsonObject:
        """The gateway's `router_url` (where functions are called) and `version`."""
        return await self._json_object("GET", "/v1/info")

    # -- tokens ----------------------------------------------------------------------------

    async def create_token(
        self,
        name: str,
        role: str,
        namespaces: Sequence[str],
        expires_in: int | None = None,
    ) -> JsonObject:
        """Mint a token (admin only); the answer's `token` is the secret, shown this once."""
        body: JsonObject = {
            "name": name,
            "role": role,
            "namespaces": list(namespaces),
            "expires_in": expires_in,
        }
        return await self._json_object("POST", "/v1/tokens", json=body)

    async def list_tokens(self) -> list[JsonObject]:
        return await self._items("GET", "/v1/tokens", "token list")

    async def delete_token(self, token_id: str) -> JsonObject:
        """Revoke a token: every gateway and router refuses it within a second."""
        return await self._json_object("DELETE", f"/v1/tokens/{quote(token_id, safe='')}")

    # -- secrets ---------------------------------------------------------------------------

    async def create_secret(self, namespace: str, name: str, data: Mapping[str, str]) -> JsonObject:
        """Create a secret; the answer names its keys, never its values."""
        body = {"name": name, "data": dict(data)}
        return await self._json_object("POST", _secrets_path(namespace), json=body)

    async def replace_secret(
        self, namespace: str, name: str, data: Mapping[str, str]
    ) -> JsonObject:
        path = f"{_secrets_path(namespace)}/{quote(name, safe='')}"
        return await self._json_object("PUT", path, json={"data": dict(data)})

    async def list_secrets(self, namespace: str) -> list[JsonObject]:
        return await self._items("GET", _secrets_path(namespace), "secret list")

    async def delete_secret(self, namespace: str, name: str) -> JsonObject:
        path = f"{_secrets_path(namespace)}/{quote(name, safe='')}"
        return await self._json_object("DELETE", path)

    # -- invoking --------------------------------------------------------------------------

    async def invoke(
        self,
        namespace: str,
        name: str,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Invocation:
        """Call the function through the gateway and return its answer, whatever the status.

        Only failing to get an answer at all raises `ApiError`; a platform error (no such
        function, no ready instance, ...) comes back as its JSON error answer, like the
        function's own errors. A `Content-Type` in `headers` wins over `content_type`.
        """
        sent = dict(headers or {})
        if content_type and not any(key.lower() == "content-type" for key in sent):
            sent["Content-Type"] = content_type
        # The gateway bounds an invocation by the function's own timeout.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
        async with self._request(
            "POST",
            _function_path(namespace, name) + "/invoke",
            data=body or None,
            headers=sent,
            timeout=timeout,
            allow_redirects=False,
            raise_for_status=False,
        ) as response:
            payload = await response.read()
        return Invocation(response.status, response.headers, payload)

    async def invoke_async(
        self,
        namespace: str,
        name: str,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        callback_url: str | None = None,
    ) -> JsonObject:
        """Queue an invocation (`Prefer: respond-async`); the answer holds `invocation_id`,
        which `get_invocation` reads the status and result of."""
        sent = dict(headers or {})
        if content_type and not any(key.lower() == "content-type" for key in sent):
            sent["Content-Type"] = content_type
        sent["Prefer"] = "respond-async"
        if callback_url is not None:
            sent[CALLBACK_HEADER] = callback_url
        return await self._json_object(
            "POST", _function_path(namespace, name) + "/invoke", data=body or None, headers=sent
        )

    async def get_invocation(self, namespace: str, invocation_id: str) -> JsonObject:
        """An asynchronous invocation: `status` queued|running|succeeded|failed, `result`,
        `error`, `attempts`."""
        return await self._json_object(
            "GET", f"{_namespace_path(namespace)}/invocations/{quote(invocation_id, safe='')}"
        )

    # -- events, triggers, dead letters ----------------------------------------------------

    async def publish(self, event: Mapping[str, Any]) -> JsonObject:
        """Publish one CloudEvent (structured mode); the answer says whether it was a
        duplicate of one stored already (`duplicates`)."""
        return await self._json_object(
            "POST",
            "/v1/events",
            data=json.dumps(dict(event)).encode(),
            headers={"Content-Type": STRUCTURED_CONTENT_TYPE},
        )

    async def publish_batch(self, events: Sequence[Mapping[str, Any]]) -> JsonObject:
        """Publish several CloudEvents at once; all are stored, or (one invalid) none."""
        return await self._json_object(
            "POST",
            "/v1/events",
            data=json.dumps([dict(event) for event in events]).encode(),
            headers={"Content-Type": BATCH_CONTENT_TYPE},
        )

    async def list_triggers(self, namespace: str) -> list[JsonObject]:
        return await self._items("GET", _triggers_path(namespace), "trigger list")

    async def create_trigger(self, namespace: str, spec: Mapping[str, Any]) -> JsonObject:
        """Create a trigger (`name`, `function`, `filter`, `delivery`); 409 if it exists."""
        return await self._json_object("POST", _triggers_path(namespace), json=dict(spec))

    async def get_trigger(self, namespace: str, name: str) -> JsonObject:
        return await self._json_object("GET", f"{_triggers_path(namespace)}/{quote(name, safe='')}")

    async def delete_trigger(self, namespace: str, name: str) -> JsonObject:
        return await self._json_object(
            "DELETE", f"{_triggers_path(namespace)}/{quote(name, safe='')}"
        )

    async def list_schedules(self, namespace: str) -> list[JsonObject]:
        return await self._items("GET", _schedules_path(namespace), "schedule list")

    async def create_schedule(self, namespace: str, spec: Mapping[str, Any]) -> JsonObject:
        """Create a schedule (`name`, `function`, `cron`, `timezone`, `data`); 409 if it exists."""
        return await self._json_object("POST", _schedules_path(namespace), json=dict(spec))

    async def delete_schedule(self, namespace: str, name: str) -> JsonObject:
        return await self._json_object(
            "DELETE", f"{_schedules_path(namespace)}/{quote(name, safe='')}"
        )

    async def list_deadletters(
        self,
        namespace: str,
        trigger: str | None = None,
        *,
        after: str | None = None,
        limit: int | None = None,
    ) -> JsonObject:
        """A page of dead letters, oldest first: `items`, and `next` (pass it as `after`) when
        there may be more."""
        params = {
            "trigger": trigger,
            "after": after,
            "limit": None if limit is None else str(limit),
        }
        query = {key: value for key, value in params.items() if value is not None}
        answer = await self._json_object(
            "GET", f"{_namespace_path(namespace)}/deadletters", params=query
        )
        if not isinstance(answer.get("items"), list):
            raise ApiError(200, "invalid_response", "the dead letter list has no 'items' array")
        return answer

    async def redrive(self, namespace: str, deadletter_id: str) -> JsonObject:
        """Send a dead letter's event to its trigger again; it leaves the list."""
        path = f"{_namespace_path(namespace)}/deadletters/{quote(deadletter_id, safe='')}/redrive"
        return await self._json_object("POST", path)

    # -- log streams -----------------------------------------------------------------------

    async def logs(
        self,
        namespace: str,
        name: str,
        *,
        build: bool = False,
        tail: int | None = None,
        since: str | None = None,
        follow: bool = False,
        invocation: str | None = None,
    ) -> AsyncGenerator[JsonObject, None]:
        """Runtime (or, with `build`, build) log lines as objects, oldest first; with `follow`
        the stream stays open for new lines until the gateway closes it. With `invocation`,
        only the lines written during that invocation."""
        params = {
            "tail": None if tail is None else str(tail),
            "since": since,
            "invocation": invocation,
        }
        query = {key: value for key, value in params.items() if value is not None}
        if follow:
            query["follow"] = "1"
        path = _function_path(namespace, name) + ("/build/logs" if build else "/logs")
        # Only connecting is bounded on a follow; otherwise each read is.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=None if follow else self.timeout
        )
        decoder = NDJSONDecoder()
        async with self._request(
            "GET", path, params=query, headers={"Accept": NDJSON}, timeout=timeout
        ) as response:
            async for chunk in response.content.iter_any():
                for entry in decoder.feed(chunk):
                    yield entry
            for entry in decoder.close():
                yield entry

    # -- lifecycle stream ------------------------------------------------------------------

    async def lifecycle(
        self,
        namespace: str | None = None,
        function: str | None = None,
        type: str | None = None,
        since: str | None = None,
    ) -> AsyncGenerator[JsonObject, None]:
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

    async def _items(self, method: str, path: str, what: str) -> list[JsonObject]:
        answer = await self._json_object(method, path)
        items = answer.get("items")
        if not isinstance(items, list):
            raise ApiError(200, "invalid_response", f"the {what} has no 'items' array")
        return items

    async def _json_object(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        _, body = await self._json_answer(method, path, **kwargs)
        return body

    async def _json_answer(self, method: str, path: str, **kwargs: Any) -> tuple[int, JsonObject]:
        """The status and JSON object of a successful answer."""
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
        return response.status, body

    @asynccontextmanager
    async def _request(
        self, method: str, path: str, *, raise_for_status: bool = True, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; error answers (unless `raise_for_status` is false) and transport
        failures (also while the body is read) become `ApiError`s, so the caller only ever sees
        a successful response."""
        if self._session is None:
            raise RuntimeError("use LambdabusClient as an async context manager")
        try:
            async with self._session.request(method, self.url + path, **kwargs) as response:
                if raise_for_status and response.status >= 400:
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


def _ndjson_object(line: bytes) -> JsonObject:
    try:
        body = json.loads(line)
    except ValueError as exc:
        raise ApiError(
            200, "invalid_response", "the log stream sent a line that is not JSON"
        ) from exc
    if not isinstance(body, dict):
        raise ApiError(200, "invalid_response", "the log stream sent a line that is not an object")
    return body


def _upload_form(
    spec: Mapping[str, Any],
    archive: bytes,
    filename: str = "function.zip",
    dependencies: bytes | None = None,
) -> aiohttp.FormData:
    """The multipart upload: `spec`, `archive` (a zip, a tar or one source file, named
    `filename`) and, as Kubeless's `--dependencies`, a `dependencies` file."""
    _spec_name(spec)
    form = aiohttp.FormData()
    form.add_field("spec", json.dumps(dict(spec)), content_type="application/json")
    kind = "application/zip" if filename.endswith(".zip") else "application/octet-stream"
    form.add_field("archive", archive, filename=filename, content_type=kind)
    if dependencies is not None:
        form.add_field(
            "dependencies",
            dependencies,
            filename="dependencies",
            content_type="application/octet-stream",
        )
    return form


def _spec_name(spec: Mapping[str, Any]) -> str:
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a function spec needs a 'name'")
    return name


def _namespace_path(namespace: str) -> str:
    return f"/v1/namespaces/{quote(namespace, safe='')}"


def _functions_path(namespace: str) -> str:
    return f"{_namespace_path(namespace)}/functions"


def _secrets_path(namespace: str) -> str:
    return f"{_namespace_path(namespace)}/secrets"


def _schedules_path(namespace: str) -> str:
    return f"{_namespace_path(namespace)}/schedules"


def _triggers_path(namespace: str) -> str:
    return f"{_namespace_path(namespace)}/triggers"


def _function_path(namespace: str, name: str) -> str:
    return f"{_functions_path(namespace)}/{quote(name, safe='')}"
