"""Errors of the platform: each carries a stable machine-readable code, an HTTP status and a
message that tells the caller what to fix. The HTTP layer maps them to responses in one place."""

from __future__ import annotations

from typing import Any


class LambdabusError(Exception):
    """Base error. `code` is stable and machine-readable; `message` says what to do."""

    status: int = 500
    code: str = "internal"
    temporary: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details or {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class PermanentError(LambdabusError):
    """Retrying the same request will fail the same way; the caller must change it."""


class TemporaryError(LambdabusError):
    """The platform could not do it now; retry after `retry_after` seconds."""

    status = 503
    code = "unavailable"
    temporary = True

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class InvalidRequest(PermanentError):
    status = 400
    code = "invalid_request"


class InvalidName(InvalidRequest):
    code = "invalid_name"


class InvalidSpec(InvalidRequest):
    code = "invalid_spec"


class ArchiveError(InvalidRequest):
    """A rejected upload archive; `code` names the rule it broke."""

    code = "invalid_archive"


class PayloadTooLarge(PermanentError):
    status = 413
    code = "payload_too_large"


class NotFound(PermanentError):
    status = 404
    code = "not_found"


class AlreadyExists(PermanentError):
    status = 409
    code = "already_exists"


class PreconditionFailed(PermanentError):
    status = 412
    code = "precondition_failed"


class Conflict(PermanentError):
    """A concurrent writer changed the record between read and write; read again and retry."""

    status = 409
    code = "conflict"


class Unauthenticated(PermanentError):
    """No token, or one that is malformed, unknown, revoked or expired: send a valid
    `Authorization: Bearer <token>`."""

    status = 401
    code = "unauthenticated"


class Forbidden(PermanentError):
    """The token is valid but its role or namespaces do not cover the request."""

    status = 403
    code = "forbidden"


class TooManyFailedAttempts(TemporaryError):
    """Too many failed authentication attempts from this address: wait `retry_after`."""

    status = 429
    code = "too_many_failed_attempts"
