"""Catalog events on the wire through the official CloudEvents SDK (`cloudevents.core`).

The SDK encodes (JSON format, HTTP binary and structured modes); the catalog models validate.
Every decoder raises pydantic `ValidationError` for an event that is not a valid catalog event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import http
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import TypeAdapter, ValidationError

from lambdabus_events.catalog import AnyLifecycleEvent, LifecycleEvent

STRUCTURED_CONTENT_TYPE: Final = JSONFormat.CONTENT_TYPE  # application/cloudevents+json

_FORMAT: Final = JSONFormat()
_ADAPTER: TypeAdapter[AnyLifecycleEvent] = TypeAdapter(AnyLifecycleEvent)


def to_cloudevent(event: LifecycleEvent) -> CloudEvent:
    """The SDK's CloudEvent for a catalog event (`time` stays a datetime, `data` becomes JSON)."""
    attributes = event.model_dump(exclude={"data"}, exclude_none=True)
    return CloudEvent(attributes, event.data.model_dump(mode="json"))


def from_cloudevent(ce: BaseCloudEvent) -> LifecycleEvent:
    """Validate an SDK CloudEvent into the catalog model its `type` names (or ValidationError)."""
    raw: dict[str, Any] = {**ce.get_attributes(), "data": ce.get_data()}
    event: LifecycleEvent = _ADAPTER.validate_python(raw)
    return event


def to_json(event: LifecycleEvent) -> bytes:
    """Structured-mode JSON (the form stored on NATS); `parse_lifecycle` reads it back."""
    return _FORMAT.write(to_cloudevent(event))


def to_http_binary(event: LifecycleEvent) -> tuple[dict[str, str], bytes]:
    """HTTP binary mode: attributes as `ce-*` headers, `data` as the JSON body."""
    message = http.to_binary(to_cloudevent(event), _FORMAT)
    return message.headers, message.body


def to_http_structured(event: LifecycleEvent) -> tuple[dict[str, str], bytes]:
    """HTTP structured mode: the whole event as `application/cloudevents+json`."""
    message = http.to_structured(to_cloudevent(event), _FORMAT)
    return message.headers, message.body


def from_http(headers: Mapping[str, str], body: bytes) -> LifecycleEvent:
    """A catalog event from an HTTP message in either mode (binary if any `ce-*` header is present).

    What the SDK cannot decode (a body that is not a JSON object, a bad `time`, attributes
    failing the SDK's own checks) is reported as a `ValidationError` too, so callers handle one
    error type.
    """
    message = http.HTTPMessage(headers=dict(headers), body=body)
    try:
        ce = http.from_http(message, _FORMAT, CloudEvent)
    # The SDK lets json/dateutil errors through, aggregates its attribute checks in an
    # exception that is not a ValueError, and hits AttributeError on a JSON array body.
    except (ValueError, TypeError, AttributeError, BaseCloudEventException) as exc:
        problem = {"error": f"not a CloudEvent: {exc}"}
        raise ValidationError.from_exception_data(
            "CloudEvent", [{"type": "value_error", "loc": ("body",), "input": body, "ctx": problem}]
        ) from exc
    return from_cloudevent(ce)
