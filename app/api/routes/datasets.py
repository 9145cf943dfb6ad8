from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.schemas import DatasetOut, errors
from app.core.errors import BadRequest
from app.db.models import MAX_ID, Dataset
from app.services import access
from app.services import datasets as service

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
        }}},
    }
}


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=UPLOAD_BODY,
             responses=errors(400, 403, 404, 409, 413))
async def upload_dataset(request: Request, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """Upload a dataset as a zip (`file`) or as a folder (`files`, many, named by relative path), into the
    workspace `workspace_id` (a form field; default: your personal workspace; editors and owners only)."""
    ctype = request.headers.get("content-type", "")
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
