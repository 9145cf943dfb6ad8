"""The server's errors as exceptions, one class per HTTP status.

Every Graft error answer is ``{"error": {"code": ..., "message": ..., "details": ...}}``; the exception carries
the ``message`` as :attr:`GraftError.detail`, the HTTP ``status``, the error ``code`` and the structured
``details`` (e.g. the fields a 422 names)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .models import Job

__all__ = ["AuthError", "Conflict", "ConnectionFailed", "Forbidden", "GraftError", "JobFailed", "NotFound",
           "ServerError", "TooLarge", "TooManyRequests", "Unavailable", "ValidationError", "error_for"]


class GraftError(Exception):
    """Base class of every error this client raises.

    Attributes:
        detail: the server's message (what is wrong and, mostly, how to fix it).
        status: the HTTP status (None when no answer came, e.g. a refused connection).
        code: the server's error code (``not_found``, ``conflict``, ``invalid``...), when it sent one.
        details: the server's structured details (a list of problems, an export's figures...), or None.
    """

    def __init__(self, detail: str, status: int | None = None, code: str | None = None, details: Any = None):
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return self.detail if self.status is None else f"{self.detail} (HTTP {self.status})"


class ValidationError(GraftError):
    """400 or 422: the request (its parameters, the uploaded data) is malformed or unusable."""


class AuthError(GraftError):
    """401: no valid token (create one with ``graft token create --name NAME`` or on the Tokens page)."""


class Forbidden(GraftError):
    """403: your role in the workspace does not allow this."""


class NotFound(GraftError):
    """404: no such object, or it belongs to someone else."""


class Conflict(GraftError):
    """409: the object's state does not allow this (e.g. a job not finished yet, an export that failed)."""


class TooLarge(GraftError):
    """413: the body or upload is larger than the server's limit."""


class TooManyRequests(GraftError):
    """429: throttled; :attr:`retry_after` says for how many seconds."""

    retry_after: float | None = None


class Unavailable(GraftError):
    """503: a backing service (the job queue, the inference service, storage) cannot be reached."""


class ServerError(GraftError):
    """Any other error status (500: the server's log has the details)."""


class ConnectionFailed(GraftError):
    """The server could not be reached, or the connection broke off (and retrying did not help)."""


class JobFailed(GraftError):
    """A job that was waited for ended failed or cancelled; :attr:`job` is the job as it ended, and
    :attr:`detail` the server's error for it."""

    def __init__(self, detail: str, job: Job):
        super().__init__(detail, None, job.status)
        self.job = job


_BY_STATUS: dict[int, type[GraftError]] = {400: ValidationError, 422: ValidationError, 401: AuthError,
                                           403: Forbidden, 404: NotFound, 409: Conflict, 413: TooLarge,
                                           429: TooManyRequests, 503: Unavailable}


def error_for(response: httpx.Response) -> GraftError:
    """The exception for an error answer (its body must have been read)."""
    status = response.status_code
    code: str | None = None
    details: Any = None
    message = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message = str(err.get("message") or "")
        code = err.get("code") if isinstance(err.get("code"), str) else None
        details = err.get("details")
    elif isinstance(body, dict) and "detail" in body:  # a plain FastAPI or proxy answer
        message = str(body["detail"])
    if not message:
        text = response.text.strip() if response.request.method != "HEAD" else ""
        message = text[:500] or f"{response.request.method} {response.request.url.path} answered {status} " \
                                f"{response.reason_phrase}".rstrip()
    cls = _BY_STATUS.get(status, ServerError)
    exc = cls(message, status, code, details)
    if isinstance(exc, TooManyRequests):
        try:
            exc.retry_after = float(response.headers.get("Retry-After", ""))
        except ValueError:
            exc.retry_after = None
    return exc
