"""Resumable uploads, tus 1.0 (https://tus.io/protocols/resumable-upload): create an upload with its
length, PATCH its bytes in as many requests as it takes, HEAD it after a broken connection to learn where to
resume. A finished upload (a zip or tar of part of a dataset) is made into a dataset by POST /api/v1/datasets
{"uploads": [...]}. Every request is authenticated; writes from a browser session carry X-CSRF-Token."""
from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.schemas import ErrorOut, errors
from app.core.errors import AppError
from app.services import uploads as service

TUS: dict[int | str, dict[str, Any]] = {412: {"model": ErrorOut, "description": "Tus-Resumable is missing or not 1.0.0"}}
MEDIA: dict[int | str, dict[str, Any]] = {415: {"model": ErrorOut, "description": "Content-Type is not application/offset+octet-stream"}}


class TusRoute(APIRoute):
    """Every answer, errors included, carries Tus-Resumable (errors keep the app's JSON error body)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def tus_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except (AppError, RequestValidationError) as e:
                on_error = request.app.exception_handlers.get(
                    AppError if isinstance(e, AppError) else RequestValidationError)
                if on_error is None:
                    raise
                response = await on_error(request, e)
            response.headers["Tus-Resumable"] = service.TUS_VERSION
            return response

        return tus_handler


router = APIRouter(prefix="/api/v1/uploads", tags=["uploads"], route_class=TusRoute,
                   responses=errors(401, 422))

TusResumable = Annotated[str | None, Header(description="Must be 1.0.0")]


def _location(upload_id: str) -> str:
    return f"{router.prefix}/{upload_id}"


@router.options("", status_code=204)
def upload_options(user: CurrentUser, settings: SettingsDep):
    """What this tus server supports: its version, extensions and the largest upload."""
    return Response(status_code=204, headers={"Tus-Version": service.TUS_VERSION,
                                              "Tus-Extension": service.EXTENSIONS,
                                              "Tus-Max-Size": str(settings.max_upload_bytes)})


@router.post("", status_code=201, responses={**errors(400, 413), **TUS})
def create_upload(user: CurrentUser, settings: SettingsDep, tus_resumable: TusResumable = None,
                  upload_length: Annotated[str | None, Header(description="The upload's size in bytes")] = None,
                  upload_metadata: Annotated[str | None, Header(description="Comma-separated 'key base64value' "
                                                                            "pairs, e.g. filename")] = None,
                  upload_defer_length: Annotated[str | None, Header(description="Not supported")] = None):
    """Creates an upload of `Upload-Length` bytes (at most GRAFT_MAX_UPLOAD_BYTES; all of your uploads held
    at once, at most GRAFT_MAX_USER_UPLOAD_BYTES). Answers 201 with its address in Location and its id in the
    body; send the bytes with PATCH."""
    service.check_version(tus_resumable)
    up = service.create(settings, user.id, upload_length, upload_metadata, upload_defer_length)
    return JSONResponse({"id": up.id, "location": _location(up.id), "length": up.length, "offset": 0,
                         "expires": up.expires_header}, status_code=201,
                        headers={"Location": _location(up.id), "Upload-Expires": up.expires_header})


# not in the OpenAPI schema: a HEAD answer has no body to describe (errors included), which schema-driven
# clients and checks cannot read; it is the tus protocol's, described with PATCH
@router.head("/{upload_id}", responses={**errors(404), **TUS}, include_in_schema=False)
def upload_offset(upload_id: str, user: CurrentUser, settings: SettingsDep, tus_resumable: TusResumable = None):
    """How many bytes of the upload the server has (Upload-Offset) of how many (Upload-Length)."""
    service.check_version(tus_resumable)
    up = service.get(settings, user.id, upload_id)
    headers = {"Upload-Offset": str(up.offset), "Upload-Length": str(up.length), "Cache-Control": "no-store",
               "Upload-Expires": up.expires_header}
    if up.metadata:
        headers["Upload-Metadata"] = up.metadata
    return Response(status_code=200, headers=headers)


# the body (application/offset+octet-stream, the raw bytes) is read as a stream, described below
@router.patch("/{upload_id}", status_code=204,
              responses={**errors(400, 404, 409, 413), **TUS, **MEDIA})
async def upload_bytes(upload_id: str, request: Request, user: CurrentUser, session: SessionDep,
                       settings: SettingsDep, tus_resumable: TusResumable = None,
                       upload_offset: Annotated[str | None, Header(description="Where these bytes go: the "
                                                                               "upload's offset")] = None):
    """Appends the body (Content-Type: application/offset+octet-stream) at `Upload-Offset`, which must be the
    upload's current offset (409 otherwise). Answers 204 with the new Upload-Offset. The body is streamed to
    disk; if the connection breaks, the bytes received are kept: `HEAD /api/v1/uploads/{upload_id}` (with
    Tus-Resumable: 1.0.0) answers 200 with Upload-Offset, the bytes the server has, and Upload-Length."""
    owner_id = user.id
    # the database is not needed while the body streams in: give the connection back to the pool
    await run_in_threadpool(session.close)
    service.check_version(tus_resumable)
    try:
        up = await service.write(settings, owner_id, upload_id, upload_offset, request.headers.get("content-type"),
                                 request.headers.get("content-length"), request.stream())
    except ClientDisconnect:
        return Response(status_code=400)  # nobody reads it; the bytes received are kept
    return Response(status_code=204, headers={"Upload-Offset": str(up.offset), "Upload-Expires": up.expires_header})


@router.delete("/{upload_id}", status_code=204, responses={**errors(404), **TUS})
def delete_upload(upload_id: str, user: CurrentUser, settings: SettingsDep, tus_resumable: TusResumable = None):
    """Termination: deletes the upload, finished or not."""
    service.check_version(tus_resumable)
    service.delete(settings, user.id, upload_id)
    return Response(status_code=204)
