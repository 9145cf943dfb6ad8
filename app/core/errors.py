"""Domain errors of the web tier and the one place that maps them to HTTP statuses."""
from __future__ import annotations


class AppError(Exception):
    """Base: an error the user can fix. `status` is the HTTP status, `message` says what is wrong and how
    to fix it, `details` is optional structured data (e.g. a list of problems)."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: list | dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(AppError):
    """The request is malformed or its content unusable."""


class Unauthorized(AppError):
    """No valid credentials."""

    status = 401
    code = "unauthorized"


class Forbidden(AppError):
    """Signed in and allowed to see the object, but not to do this with it (e.g. a viewer deleting)."""

    status = 403
    code = "forbidden"


class TooManyRequests(AppError):
    """Throttled (repeated failed sign-ins): try again after `retry_after` seconds."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after: int, details: list | dict | None = None):
        super().__init__(message, details)
        self.retry_after = max(1, int(retry_after))


class NotFound(AppError):
    """No such object, or it belongs to someone else (the two are indistinguishable on purpose)."""

    status = 404
    code = "not_found"


class Conflict(AppError):
    """The object is in a state that does not allow this (e.g. cancelling a finished job)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(AppError):
    """The upload is bigger than the configured limit."""

    status = 413
    code = "too_large"


class Unprocessable(AppError):
    """Well-formed but unusable input (e.g. a dataset with one class)."""

    status = 422
    code = "invalid"


class ServiceUnavailable(AppError):
    """A backing service (the broker) cannot be reached right now."""

    status = 503
    code = "unavailable"
