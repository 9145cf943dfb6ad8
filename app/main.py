"""The FastAPI application: REST API under /api/v1, pages, static assets. Never imports torch."""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.routes import (
    backbones,
    batch_predict,
    compare,
    datasets,
    health,
    jobs,
    label_issues,
    metrics,
    probe,
    trust,
    uploads,
    workspaces,
)
from app.core.errors import AppError, TooManyRequests
from app.core.settings import Settings, get_settings
from app.db.session import session_factory
from app.services.metrics import Metrics

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def _error(status: int, code: str, message: str, details=None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "details": details}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, list]:
    problems = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":  # loc is ("body", <character position>)
            pos = e.get("loc", ("body", "?"))[-1]
            problems.append({"field": "", "problem": f"the body is not valid JSON at character {pos} "
                             f"({(e.get('ctx') or {}).get('error', e.get('msg', ''))})"})
            continue
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        problems.append({"field": loc, "problem": e.get("msg", "")})
    text = "; ".join(f"{p['field'] or 'body'}: {p['problem']}" for p in problems)
    return f"invalid request: {text}. Fix these fields and send it again", problems


class _BodyTooLarge(Exception):
    """Raised from `receive` when a body (chunked or lying about its length) grows past the limit."""


# the routes that take files (they read them only after authentication)
UPLOAD_PATHS = re.compile(r"/api/v1/(datasets|jobs/[^/]+/(batch-)?predict)/?$")
TUS_PATCH = re.compile(r"/api/v1/uploads/[^/]+/?$")  # a resumable upload's chunks (streamed to disk)


class UploadLimit:
    """Request size limits. The upload routes (POST UPLOAD_PATHS) take bodies up to `limit` bytes, every other
    request up to `small_limit` (FastAPI reads a JSON body into memory, and before authentication). A declared
    Content-Length above the limit is refused before anything is read; a body without one (chunked) or
    longer than it declared is counted as it streams in and refused as soon as it passes the limit."""

    def __init__(self, app, limit: int, small_limit: int = 1 << 20):
        self.app, self.limit, self.small_limit = app, limit, small_limit

    def _limit_for(self, scope) -> int:
        if scope.get("method") == "POST" and UPLOAD_PATHS.search(scope.get("path", "")) or \
                scope.get("method") == "PATCH" and TUS_PATCH.search(scope.get("path", "")):
            return self.limit
        return self.small_limit

    def _too_large(self, size: int | None, limit: int) -> JSONResponse:
        what = f"the request body ({size} bytes)" if size is not None else "the request body"
        hint = ("upload a smaller dataset or raise GRAFT_MAX_UPLOAD_BYTES" if limit == self.limit else
                "only dataset uploads and predictions may be larger")
        return _error(413, "too_large", f"{what} is larger than the limit of {limit} bytes: {hint}")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                await self._too_large(int(v), limit)(scope, receive, send)
                return
        received, exceeded, started = 0, False, False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def checked_send(message):
            nonlocal started
            if exceeded:  # whatever the app made of the broken-off body, the client gets the 413
                if not started:
                    started = True
                    await self._too_large(None, limit)(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, checked_send)
            if limit == self.limit and received and scope.get("app") is not None:  # an upload's bytes
                metrics = getattr(scope["app"].state, "metrics", None)
                if metrics is not None:
                    metrics.upload_bytes.inc(received)
        except _BodyTooLarge:
            if started:
                raise
            started = True
            await self._too_large(None, limit)(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    settings.use_weights_dir()
    # /docs is served by app.web.routes with the vendored Swagger UI (no CDN: closed networks)
    app = FastAPI(title="Graft", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Self-hosted transfer learning on images. Authenticate with `Authorization: "
                              "Bearer <token>` (create one with `graft token create --name NAME`).")
    app.state.settings = settings
    app.state.sessions = session_factory(settings.db_url)

    from app.web.render import SignInRequired, sign_in_page

    @app.exception_handler(SignInRequired)
    async def sign_in_required(request: Request, exc: SignInRequired):
        return sign_in_page(request)

    from app.services.storage import StorageError

    @app.exception_handler(StorageError)
    async def _storage_error(request: Request, exc: StorageError):
        return _error(503, "unavailable", f"{exc}: nothing was changed; try again, or check GRAFT_STORAGE_URL and "
                      "the AWS_* settings")

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError):
        resp = _error(exc.status, exc.code, exc.message, exc.details)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, TooManyRequests):
            resp.headers["Retry-After"] = str(exc.retry_after)
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, problems = _validation_message(exc)
        return _error(422, "invalid", msg, problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            from app.web.render import html_not_found, wants_html

            if wants_html(request):
                return html_not_found(request)
            return _error(404, "not_found", f"no such page or endpoint: {request.url.path}; the API is "
                          "described at /docs")
        if exc.status_code == 405:
            return _error(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal", "internal error: the server log has the details")

    # compare before jobs: its /api/v1/jobs/compare would otherwise match /api/v1/jobs/{job_id}
    for r in (health.router, metrics.router, backbones.router, workspaces.router, datasets.router, compare.router,
              probe.router, label_issues.router, trust.router, batch_predict.router, jobs.router, uploads.router):
        app.include_router(r)
    from app.web.routes import router as web_router

    app.include_router(web_router)
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes + (1 << 20))
    app.state.metrics = Metrics(app.state.sessions, settings.heartbeat_timeout_s)
    app.add_middleware(RequestMetrics)
    return app


class RequestMetrics:
    """Times every HTTP request by route template (so /api/v1/jobs/7 counts as /api/v1/jobs/{job_id})."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
            metrics = getattr(scope.get("app").state, "metrics", None) if scope.get("app") else None
            if metrics is not None:
                metrics.observe(scope["method"], path, status, started)


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory app.main:app_from_env`."""
    return create_app()
