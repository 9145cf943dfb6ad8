from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.schemas import DatasetFromUploads, DatasetOut, DatasetVersionCreate, errors
from app.core.errors import BadRequest, PayloadTooLarge
from app.db.models import MAX_ID, Dataset
from app.services import access, imports, versions
from app.services import datasets as service

JSON_LIMIT = 1 << 20

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"], responses=errors(401, 422))

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "A name for the dataset"},
                "workspace_id": {"type": "integer", "description": "Where it goes (default: your personal "
                                                                   "workspace)"},
                "file": {"type": "string", "format": "binary",
                         "description": "A zip of train/ + val/ (or of one folder per class)"},
                "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "Or: the files of a folder, each named by its relative path"},
            },
        }}, "application/json": {"schema": DatasetFromUploads.model_json_schema()}},
    }
}


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=UPLOAD_BODY,
             responses=errors(400, 403, 404, 409, 413))
async def upload_dataset(request: Request, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """Upload a dataset as a zip (`file`) or as a folder (`files`, many, named by relative path), into the
    workspace `workspace_id` (a form field; default: your personal workspace; editors and owners only).
    Or, for a dataset of any size, send JSON `{"name": ..., "uploads": [ids], "workspace_id": ...}`: the ids of
    finished resumable uploads (tus, POST /api/v1/uploads), each a zip or tar of part of the dataset; they are
    extracted into one dataset, checked whole, then deleted (404: an unknown upload; 409: an unfinished one)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() == "application/json":
        raw = bytearray()
        async for chunk in request.stream():  # this path takes large multipart bodies: not a large JSON one
            raw += chunk
            if len(raw) > JSON_LIMIT:
                raise PayloadTooLarge(f"the JSON body is larger than {JSON_LIMIT} bytes: list fewer uploads")
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and "uploads" not in data and "source" not in data:
                raise BadRequest("send multipart/form-data with a zip in the field 'file' (or the folder's files in "
                                 "'files'), or JSON with the ids of finished resumable uploads, {\"name\": ..., "
                                 "\"uploads\": [...]}, or with a \"source\" to import from")
            body = DatasetFromUploads.model_validate(data)
        except json.JSONDecodeError as e:  # as FastAPI words it for a JSON body it parses itself
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": e.msg}}]) from None
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                          for err in e.errors(include_url=False)]) from None
        if body.source is not None:
            ds = await run_in_threadpool(imports.create_from_source, session, settings, user, body.name, body.source,
                                         body.workspace_id)
        else:
            ds = await run_in_threadpool(service.create_from_uploads, session, settings, user, body.name,
                                         body.uploads or [], body.workspace_id)
        return DatasetOut.model_validate(ds)
    if not ctype.startswith("multipart/form-data"):
        raise BadRequest("send multipart/form-data with a zip in the field 'file' (or the folder's files in 'files')")
    form = await request.form(max_files=200_000, max_fields=100)
    try:
        name = form.get("name")
        name = name if isinstance(name, str) else ""
        wid = _workspace_field(form.get("workspace_id"))
        zip_file = form.get("file")
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if isinstance(zip_file, UploadFile):
            # extraction and the image checks take seconds: keep them off the event loop
            ds = await run_in_threadpool(service.create_from_zip, session, settings, user,
                                         name or _stem(zip_file.filename), zip_file.file, wid)
        elif files:
            ds = await run_in_threadpool(service.create_from_files, session, settings, user,
                                         name or _top(files[0].filename),
                                         ((f.filename or "", f.file) for f in files), wid)
        else:
            raise BadRequest("no file: send the zip in the form field 'file', or a folder's files in 'files'")
    finally:
        await form.close()
    return DatasetOut.model_validate(ds)


def _workspace_field(value: object) -> int | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.isdigit() or not 1 <= int(value) <= MAX_ID:
        raise BadRequest("workspace_id must be a workspace's id (GET /api/v1/workspaces lists yours)")
    return int(value)


def _stem(filename: str | None) -> str:
    return (filename or "dataset").rsplit("/", 1)[-1].removesuffix(".zip")[:Dataset.NAME_MAX]


def _top(filename: str | None) -> str:
    return (filename or "dataset").replace("\\", "/").split("/", 1)[0][:Dataset.NAME_MAX]


@router.get("", response_model=list[DatasetOut])
def list_datasets(session: SessionDep, user: CurrentUser,
                  workspace_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None):
    """The datasets of every workspace you are a member of (or of one: `workspace_id`), newest first."""
    q = select(Dataset).where(access.visible_to(Dataset, user))
    if workspace_id is not None:
        q = q.where(Dataset.workspace_id == workspace_id)
    return [DatasetOut.model_validate(d) for d in session.scalars(q.order_by(Dataset.id.desc()))]


@router.get("/{dataset_id}", response_model=DatasetOut, responses=errors(404))
def get_dataset(dataset_id: int, session: SessionDep, user: CurrentUser):
    return DatasetOut.model_validate(service.get_owned(session, user, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=errors(403, 404, 409))
def delete_dataset(dataset_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    service.delete(session, settings, user, dataset_id)
    return Response(status_code=204)


@router.post("/{dataset_id}/versions", status_code=201, response_model=DatasetOut, responses=errors(400, 403, 404, 409))
def create_version(dataset_id: int, body: DatasetVersionCreate, session: SessionDep, settings: SettingsDep,
                   user: CurrentUser):
    """A new version of the dataset with images relabelled, removed or added (from finished resumable
    uploads laid out like the dataset); the dataset itself is not changed, and the version shares its
    unchanged images. Files not in the dataset, unknown classes and a file both relabelled and removed are
    refused (400, naming them); the doctor checks the result like an upload. A multi-label dataset (a
    labels.csv) takes `relabel` as {file: "label;label"} (its row's new labels) and `remove`; not `uploads`."""
    ds = versions.create_version(session, settings, user, dataset_id, body.relabel, body.remove, body.uploads,
                                 body.name)
    return DatasetOut.model_validate(ds)
