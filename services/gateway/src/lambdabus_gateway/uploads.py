"""Reading a function upload from an HTTP request: multipart (`archive` + `spec`) or JSON with
inline `source`. Enforces the body limits while reading, before anything is stored."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web
from pydantic import ValidationError

from lambdabus_events import presets
from lambdabus_events.models import RUNTIMES, FunctionConfig, FunctionSpec, GitSource
from lambdabus_events.names import label_problem
from lambdabus_platform.errors import InvalidName, InvalidRequest, InvalidSpec, PayloadTooLarge

_CHUNK = 64 * 1024
MAX_DEPENDENCIES_PART = 1024 * 1024  # the dependency file limits apply after; this bounds reading


@dataclass(frozen=True)
class Upload:
    """What a create or replace request carries. `archive` is None when the source is kept."""

    fields: dict[str, Any]
    archive: bytes | None
    inline_files: dict[str, str] | None
    # Kubeless: the file name the `archive` part was sent with (a single source file needs it),
    # and a `dependencies` part (requirements.txt or package.json) that replaces the archive's.
    archive_name: str | None = None
    dependencies: bytes | None = None
    git: GitSource | None = None


def validation_error(exc: ValidationError, *, prefix: str = "spec") -> InvalidRequest:
    """Turn a pydantic error into one that names every bad field."""
    problems = []
    runtime_bad = name_bad = False
    preset_bad = ""
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"{prefix}.{loc}: unknown field; remove it")
            continue
        if err["loc"] and err["loc"][0] == "runtime":
            runtime_bad = True
            problems.append(
                f"{prefix}.runtime: must be one of {', '.join(RUNTIMES)} (got {err.get('input')!r})"
            )
            continue
        if err["loc"] and err["loc"][0] in presets.PRESET_FIELDS:
            group = str(err["loc"][0])
            problems.append(f"{prefix}.{group}: {presets.preset_problem(group, err.get('input'))}")
            preset_bad = preset_bad or group
            continue
        if err["loc"] and err["loc"][0] == "name":
            name_bad = True
            value = err.get("input")
            problem = label_problem(value) if isinstance(value, str) else "must be a string"
            problems.append(f"{prefix}.name: {value!r} {problem}")
            continue
        problems.append(f"{prefix}.{loc}: {err['msg']}")
    message = "; ".join(problems)
    if runtime_bad:
        return InvalidSpec(
            message, code="unsupported_runtime", details={"runtimes": list(RUNTIMES)}
        )
    if name_bad:
        return InvalidName(message)
    if preset_bad:
        return InvalidSpec(
            message,
            code="unknown_preset",
            details={"field": preset_bad, "allowed": list(presets.allowed(preset_bad))},
        )
    return InvalidSpec(
        message, details={"fields": [".".join(map(str, e["loc"])) for e in exc.errors()]}
    )


def parse_spec(fields: dict[str, Any]) -> FunctionSpec:
    refuse_platform_fields(fields)
    try:
        return FunctionSpec.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def parse_config(fields: dict[str, Any]) -> FunctionConfig:
    try:
        return FunctionConfig.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def refuse_platform_fields(fields: dict[str, Any]) -> None:
    """A spec may not set what the platform derives (`preset_overrides`)."""
    if presets.OVERRIDES_KEY in fields:
        raise InvalidSpec(
            f"spec.{presets.OVERRIDES_KEY}: set by the platform (the preset fields the spec "
            "sets itself); remove it",
            details={"fields": [presets.OVERRIDES_KEY]},
        )


def _check_length(request: web.Request, limit: int) -> None:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"upload is {request.content_length} bytes; the limit is {limit} bytes. "
            "Trim the archive (leave out dependencies: they are installed at build time)",
            details={"limit": limit},
        )


async def _read_part(part: BodyPartReader, limit: int, what: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(
                f"{what} passes the limit of {limit} bytes; trim it", details={"limit": limit}
            )
    return bytes(data)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSpec(f"{what} is not valid JSON: {exc}", code="malformed_json") from exc
    if not isinstance(value, dict):
        raise InvalidSpec(
            f"{what} must be a JSON object, got {type(value).__name__}", code="malformed_json"
        )
    return value


def _git_source(source: dict[str, Any]) -> GitSource:
    if set(source) != {"git"} or not isinstance(source["git"], dict):
        raise InvalidSpec(
            'source must be {"git": {"url": ..., "reference": ...}} or {"files": {...}}',
            code="invalid_source",
        )
    try:
        return GitSource.model_validate(source["git"])
    except ValidationError as exc:
        raise validation_error(exc, prefix="source.git") from exc


def _inline_files(source: Any) -> dict[str, str]:
    files = source.get("files") if isinstance(source, dict) else None
    if not isinstance(source, dict) or set(source) != {"files"} or not isinstance(files, dict):
        raise InvalidSpec(
            'source must be {"files": {"<path>": "<text>", ...}}', code="invalid_source"
        )
    bad = [k for k, v in files.items() if not isinstance(v, str)]
    if bad:
        raise InvalidSpec(
            f"source.files.{bad[0]}: the content must be a string of text", code="invalid_source"
        )
    return dict(files)


async def read_upload(
    request: web.Request, *, max_upload: int, max_spec: int, require_source: bool
) -> Upload:
    """Read a create/replace body. Raises a 4xx platform error for every malformed input."""
    _check_length(request, max_upload)
    ctype = request.content_type
    if ctype == "multipart/form-data":
        return await _read_multipart(request, max_upload, max_spec, require_source)
    if ctype in ("application/json", ""):
        body = await read_body(request, max_upload)
        fields = _json_object(body, "the request body")
        inline = None
        if "source" in fields:
            source = fields.pop("source")
            if isinstance(source, dict) and "git" in source:
                return Upload(fields, None, None, git=_git_source(source))
            inline = _inline_files(source)
        elif require_source:
            raise InvalidSpec(
                'a JSON upload needs "source": {"files": {...}}; or send multipart with an "archive" part',
                code="missing_source",
            )
        return Upload(fields, None, inline)
    raise InvalidRequest(
        f"unsupported content type {ctype!r}: send multipart/form-data (archive + spec) or application/json",
        code="unsupported_media_type",
        status=415,
    )


async def read_body(request: web.Request, limit: int, what: str = "body") -> bytes:
    """The whole request body, or a 413 as soon as it passes `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"{what} is {request.content_length} bytes; the limit is {limit} bytes",
            details={"limit": limit},
        )
    data = bytearray()
    async for chunk in request.content.iter_chunked(_CHUNK):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(
                f"{what} passes the limit of {limit} bytes", details={"limit": limit}
            )
    return bytes(data)


async def _read_multipart(
    request: web.Request, max_upload: int, max_spec: int, require_source: bool
) -> Upload:
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise InvalidRequest(
            f"malformed multipart body: {exc}", code="malformed_multipart"
        ) from exc
    fields: dict[str, Any] | None = None
    archive: bytes | None = None
    archive_name: str | None = None
    dependencies: bytes | None = None
    while True:
        try:
            part = await reader.next()
        except ValueError as exc:
            raise InvalidRequest(
                f"malformed multipart body: {exc}", code="malformed_multipart"
            ) from exc
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart is not supported", code="malformed_multipart")
        if part.name == "archive":
            if archive is not None:
                raise InvalidRequest("more than one 'archive' part", code="malformed_multipart")
            archive = await _read_part(part, max_upload, "the archive")
            archive_name = part.filename
        elif part.name == "dependencies":
            if dependencies is not None:
                raise InvalidRequest(
                    "more than one 'dependencies' part", code="malformed_multipart"
                )
            dependencies = await _read_part(part, MAX_DEPENDENCIES_PART, "the dependencies part")
        elif part.name == "spec":
            if fields is not None:
                raise InvalidRequest("more than one 'spec' part", code="malformed_multipart")
            fields = _json_object(await _read_part(part, max_spec, "the spec"), "the 'spec' part")
        else:
            raise InvalidRequest(
                f"unexpected part {part.name!r}: send 'archive' (a zip, a tar or a source file), "
                "'spec' (JSON) and optionally 'dependencies' (requirements.txt or package.json)",
                code="malformed_multipart",
            )
    if fields is None:
        raise InvalidSpec(
            "the 'spec' part is missing: send the function's spec as JSON", code="missing_spec"
        )
    if archive is None and require_source:
        raise InvalidSpec(
            "the 'archive' part is missing: send the function's zip", code="missing_source"
        )
    if dependencies is not None and archive is None:
        raise InvalidSpec(
            "the 'dependencies' part replaces the archive's dependency file: send the "
            "'archive' part with it",
            code="missing_source",
        )
    return Upload(fields, archive, None, archive_name, dependencies)
