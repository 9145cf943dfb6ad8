"""Batch predictions: a folder of images through a training job's model, as a job; its CSV and sorted zip."""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.routes.jobs import _send
from app.api.schemas import BatchPredictCreate, BatchPredictOptions, JobOut, errors
from app.core.errors import BadRequest
from app.services import batch_predict as service

router = APIRouter(prefix="/api/v1/jobs", tags=["batch predictions"], responses=errors(401, 422))

BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "A zip (or tar) of the images"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
        "confidence_threshold": {"type": "number", "minimum": 0, "maximum": 1}}}},
    "application/json": {"schema": BatchPredictCreate.model_json_schema()}}}}
FILE_FIELDS = ("top_k", "confidence_threshold")


def _options(data: dict[str, Any], model: type[BatchPredictOptions]) -> BatchPredictOptions:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in
                                      e.errors(include_url=False, include_context=False)]) from None


@router.post("/{job_id}/batch-predict", status_code=201, response_model=JobOut,
             responses=errors(400, 403, 404, 409, 413, 503), openapi_extra=BODY)
async def start_batch_predict(job_id: int, request: Request, response: Response, session: SessionDep,
                              settings: SettingsDep, user: CurrentUser):
    """Classify a folder of unlabelled images with the training job's model, as a job (kind "batch_predict";
    follow it like any job: GET /api/v1/jobs/{id}, its events, cancel, delete). Send the images as a zip in
    the multipart field `file` (with `top_k` and `confidence_threshold` as fields), or JSON with `upload_id`
    (a finished resumable upload of a zip or tar: POST /api/v1/uploads) or `source` (s3://bucket/prefix/,
    read with the server's AWS_* credentials). The archive is checked like a dataset upload; files that are not
    images are ignored. While it runs, `current_epoch` / `total_epochs` count the images done / in all. Its
    results: GET /api/v1/jobs/{id}/results.csv (file,label,probability,abstained,top1,p1,...,error) and
    GET /api/v1/jobs/{id}/results.zip (the images in one folder per predicted class, plus abstained/)."""
    # who may do this, and with which job, before the body is read
    await run_in_threadpool(service.model_job, session, user, job_id)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=len(FILE_FIELDS) + 1)
        try:
            f = form.get("file")
            if not isinstance(f, UploadFile):
                raise BadRequest("no zip: send the images as a zip in the multipart field 'file'")
            opts = _options({k: form.get(k) for k in FILE_FIELDS if form.get(k) not in (None, "")},
                            BatchPredictOptions)
            job = await run_in_threadpool(lambda: service.start(
                session, settings, user, job_id, top_k=opts.top_k, confidence_threshold=opts.confidence_threshold,
                upload=f.file, filename=f.filename))
        finally:
            await form.close()
    elif ctype == "application/json":
        try:
            data = json.loads(await request.body())
        except ValueError as e:
            raise BadRequest(f"the body is not valid JSON ({e}): send {{\"upload_id\": ...}} or "
                             "{\"source\": \"s3://bucket/prefix/\"}") from None
        body = _options(data, BatchPredictCreate)
        assert isinstance(body, BatchPredictCreate)
        job = await run_in_threadpool(lambda: service.start(
            session, settings, user, job_id, top_k=body.top_k, confidence_threshold=body.confidence_threshold,
            upload_id=body.upload_id, source=body.source))
    else:
        raise BadRequest("send the images as a zip in the multipart/form-data field 'file', or as JSON "
                         "{\"upload_id\": \"<a finished resumable upload>\"} or {\"source\": \"s3://bucket/prefix/\"}")
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return JobOut.model_validate(job)


def _results(job_id: int, ext: str, media_type: str, session, settings, user) -> Response:
    job, art = service.results(session, user, job_id, ext)
    return _send(settings, art, media_type, filename=f"graft-batch{job.id}-results.{ext}",
                 headers={"X-Checksum-SHA256": art.sha256})


@router.get("/{job_id}/results.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}, "description": "One row per image"},
                       **errors(404, 409, 503)})
def batch_results_csv(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """A batch prediction's CSV: `file` (its path inside the zip or prefix), `label` and `probability` (the most
    likely class and its calibrated probability), `abstained` (true: "none of these", the image is unlike the
    training images or the confidence is below the threshold), `top1`, `p1` ... `topK`, `pK`, and `error` (an
    unreadable image: its label is empty). 409 until the job has succeeded."""
    return _results(job_id, "csv", "text/csv", session, settings, user)


@router.get("/{job_id}/results.zip", response_class=Response,
            responses={200: {"content": {"application/zip": {}}, "description": "The images, sorted"},
                       **errors(404, 409, 503)})
def batch_results_zip(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """A batch prediction's images sorted into one folder per predicted class, plus `abstained/` (each under its
    path inside the zip or prefix sent; unreadable ones are left out). 409 until the job has succeeded."""
    return _results(job_id, "zip", "application/zip", session, settings, user)
