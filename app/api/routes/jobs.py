from __future__ import annotations

import asyncio
import bisect
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.schemas import EpochMetricOut, EvaluationOut, JobCreate, JobOut, MistakeOut, PredictOut, errors
from app.core.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from app.core.settings import Settings
from app.db.models import FINAL_STATUSES, MAX_ID, EpochMetric, Job, JobEvent, JobKind, JobStatus
from app.services import access, operating_point, storage
from app.services import jobs as service
from domain.exports import EXPORT_FORMATS, ExportName
from domain.results import RunSummary
from domain.spec import RunSpec

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], responses=errors(401, 422))

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


def _out(job: Job, settings: Settings) -> JobOut:
    """The API view of a job row, with what the row alone does not say (a running job whose worker is lost)."""
    stale, note = service.staleness(job, settings)
    return JobOut.model_validate(job).model_copy(update={"stale": stale, "status_note": note})


@router.post("", status_code=201, response_model=JobOut, responses=errors(400, 403, 404, 413, 503))
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """Queue a training job. Every parameter but dataset_id has a default (see RunSpec)."""
    spec = RunSpec(**body.model_dump(exclude={"dataset_id", "workspace_id"}))
    return _out(service.create(session, settings, user, body.dataset_id, spec, body.workspace_id), settings)


@router.get("", response_model=list[JobOut])
def list_jobs(session: SessionDep, settings: SettingsDep, user: CurrentUser, status: str | None = None,
              dataset_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
              workspace_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None):
    """The jobs of every workspace you are a member of (or of one: `workspace_id`), newest first."""
    q = select(Job).where(access.visible_to(Job, user))
    if workspace_id is not None:
        q = q.where(Job.workspace_id == workspace_id)
    if status:
        q = q.where(Job.status == status)
    if dataset_id is not None:
        q = q.where(Job.dataset_id == dataset_id)
    return [_out(j, settings) for j in session.scalars(q.order_by(Job.id.desc()))]


@router.get("/{job_id}", response_model=JobOut, responses=errors(404))
def get_job(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    return _out(service.get_owned(session, user, job_id), settings)


@router.delete("/{job_id}", status_code=204, responses=errors(403, 404, 409))
def delete_job(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """Delete a finished job with its files."""
    service.delete(session, settings, user, job_id)
    return Response(status_code=204)


@router.get("/{job_id}/metrics", response_model=list[EpochMetricOut], responses=errors(404))
def job_metrics(job_id: int, session: SessionDep, user: CurrentUser):
    job = service.get_owned(session, user, job_id)
    rows = session.scalars(select(EpochMetric).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch))
    return [EpochMetricOut.model_validate(r) for r in rows]


@router.post("/{job_id}/cancel", response_model=JobOut, responses=errors(403, 404, 409))
def cancel_job(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """Queued jobs are cancelled at once; running ones stop within a few seconds (at once if their worker
    stopped responding)."""
    return _out(service.cancel(session, user, job_id, settings), settings)


def _artifact_file(settings, art) -> Path:
    """The artifact's file on this host (with object storage: only for a check; `_send` streams instead)."""
    st = storage.for_settings(settings)
    try:
        path = st.path(art.path) if st.local else None
    except ValueError:
        path = None
    if st.local and (path is None or not path.is_file()):
        raise NotFound(f"the {art.kind} file of job {art.job_id} is missing on the server")
    return path if path is not None else Path(art.path)


def _send(settings, art, media_type: str, filename: str | None = None, headers: dict | None = None) -> Response:
    """An artifact as a download: the file itself (local storage), a stream from object storage, or a
    redirect to a presigned URL (GRAFT_STORAGE_PRESIGN=1)."""
    st = storage.for_settings(settings)
    if st.local:
        return FileResponse(_artifact_file(settings, art), media_type=media_type, filename=filename,
                            headers=headers)
    try:
        if settings.storage_presign:
            url = st.presign(art.path, filename or Path(art.path).name)
            if url:
                return RedirectResponse(url, status_code=307, headers=headers)
        size = st.size(art.path)
        if size is None:
            raise NotFound(f"the {art.kind} file of job {art.job_id} is missing in storage")
        body = st.open(art.path)
    except storage.StorageError as e:
        raise ServiceUnavailable(str(e)) from None

    def chunks():
        try:
            while True:
                block = body.read(1 << 20)
                if not block:
                    return
                yield block
        finally:
            body.close()

    extra = {"Content-Length": str(size), **(headers or {})}
    if filename:
        extra["Content-Disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(chunks(), media_type=media_type, headers=extra)


@router.get("/{job_id}/model", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The model file"},
                       **errors(404, 409)})
def download_model(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser,
                   format: ExportName = ExportName("pytorch")):
    """The trained model: `pytorch` (state dict with classes, preprocessing, parameters and metrics inside),
    `torchscript`, `onnx`, `onnx_fp16`, `onnx_int8`, `openvino` (a zip of the IR), or the `model_card` alone.
    Every export takes raw images (uint8 NHWC RGB, any size) and does the preprocessing inside; each was checked
    on the val images in its own runtime (its figures are in GET .../evaluation `exports`), and one that failed
    its check answers 409. The files carry the model card (with a usage snippet) inside."""
    fmt = EXPORT_FORMATS[format.value]
    job = service.get_owned(session, user, job_id)
    summary = RunSummary.from_stored(job.result)
    failed = next((e for e in summary.exports if e.format == fmt.name and not e.ok), None) if summary else None
    if failed is not None:
        raise Conflict(f"the {fmt.name} export of job {job_id} failed: {failed.error}", failed.to_json())
    art = service.artifact(session, user, job_id, fmt.artifact)
    return _send(settings, art, "application/json" if fmt.name == "model_card" else "application/octet-stream",
                 filename=f"graft-job{job_id}-{job.spec.get('backbone', 'model')}{fmt.suffix}",
                 headers={"X-Checksum-SHA256": art.sha256})


@router.get("/{job_id}/evaluation", response_model=EvaluationOut, response_model_exclude_unset=True,
            responses=errors(404))
def job_evaluation(job_id: int, session: SessionDep, user: CurrentUser) -> EvaluationOut:
    """How good the model is on the val set: accuracy, confusion matrix (rows = true class), per-class
    precision/recall/F1/support, top-k accuracy (more than 5 classes), the most confident mistakes
    (each with an image URL), the exports with their ONNX parity figures, and each val image's true and
    predicted class index (`y_true`, `y_pred`, in sorted file order; `val_set` identifies those files).
    Multi-label models (`task` "multilabel"): `metrics` (micro_f1, macro_f1, mAP, subset_accuracy at the tuned
    thresholds, cross-fitted), `metrics_at_half`, `per_label` (precision, recall, F1, AP, support, threshold and
    confusion counts), `thresholds`, `label_mistakes` (missed and false labels), `y_true`/`y_pred` as label bit
    masks, `scores` (each val image's probabilities) and `label_thresholds` when an editor moved them."""
    job = service.get_owned(session, user, job_id)
    if job.kind == JobKind.probe.value:
        raise NotFound(f"job {job_id} compares backbones and trains no model, so it has no evaluation: its "
                       f"leaderboard is at GET /api/v1/datasets/{job.dataset_id}/probe")
    if job.kind == JobKind.label_issues.value:
        raise NotFound(f"job {job_id} looks for wrong labels and trains no model, so it has no evaluation: its "
                       f"suspects are at GET /api/v1/datasets/{job.dataset_id}/label-issues")
    summary = RunSummary.from_stored(job.result)
    report = summary.report if summary is not None else None
    if job.status != JobStatus.succeeded.value or report is None:
        raise NotFound(f"job {job_id} has no evaluation: it is {job.status}; evaluations come with success")
    mistakes = [MistakeOut(**m.to_json(), image_url=f"/api/v1/jobs/{job_id}/mistakes/{i}.jpg")
                for i, m in enumerate(report.mistakes)]
    trust = (summary.trust if summary is not None else None) or {}
    extra = {k: trust[k] for k in ("calibration", "abstain", "ood") if trust.get(k) is not None}
    op = trust.get("operating_point")
    if isinstance(op, dict) and "abstain" in extra:  # an editor moved it (PUT .../operating-point)
        extra["abstain"] = {**extra["abstain"], **{k: op.get(k) for k in ("threshold", "coverage",
                                                                          "accuracy_when_answered")},
                            "default_threshold": extra["abstain"].get("threshold"), "operating_point": op}
    junk = (trust.get("ood") or {}).get("junk")
    if isinstance(junk, dict) and "abstain" in extra:  # measured on the dataset's images of no class (_junk/)
        extra["abstain"]["false_accept_rate"] = (op or {}).get("false_accept_rate", junk.get("false_accept_rate"))
    if trust.get("calibration") and service.has_artifact(session, job_id, "reliability"):
        extra["reliability_png"] = f"/api/v1/jobs/{job_id}/reliability.png"
    moved = (job.result or {}).get("label_thresholds")
    if report.task == "multilabel" and isinstance(moved, dict):  # an editor moved them (PUT .../thresholds)
        extra["label_thresholds"] = moved
    return EvaluationOut(**{k: v for k, v in report.to_json().items() if k != "mistakes"}, job_id=job_id,
                         mistakes=mistakes, confusion_matrix_png=f"/api/v1/jobs/{job_id}/confusion_matrix.png",
                         exports=summary.exports if summary is not None else [], **extra)


@router.get("/{job_id}/confusion_matrix.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}, **errors(404)})
def confusion_matrix_png(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    art = service.artifact(session, user, job_id, "confusion_matrix")
    return _send(settings, art, "image/png")


@router.get("/{job_id}/reliability.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}, **errors(404)})
def reliability_png(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """The reliability diagram of the job's val set: confidence against accuracy, before and after calibration."""
    art = service.artifact(session, user, job_id, "reliability")
    return _send(settings, art, "image/png")


@router.get("/{job_id}/mistakes/{n}.jpg", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **errors(404)})
def mistake_image(job_id: int, n: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """A thumbnail of the n-th misclassified val image (multi-label: of the n-th image with a missed or a false
    label)."""
    job = service.get_owned(session, user, job_id)
    summary = RunSummary.from_stored(job.result)
    report = summary.report if summary is not None else None
    mistakes: list[Any] = [] if report is None else (report.label_mistakes or []) if report.task == "multilabel" \
        else report.mistakes
    if not 0 <= n < len(mistakes):
        raise NotFound(f"job {job_id} has no misclassified image number {n}")
    from app.services import thumbs

    return Response(thumbs.file_thumbnail(settings, job.dataset, mistakes[n].file), media_type="image/jpeg")


@router.post("/{job_id}/predict", response_model=PredictOut, response_model_exclude_unset=True,
             responses=errors(400, 404, 413, 503), openapi_extra={"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "default": 3}}}}}}})
async def predict(job_id: int, request: Request, session: SessionDep, settings: SettingsDep, user: CurrentUser,
                  explain: bool = False):
    """Classify one or more images (multipart field `files`, repeated) with the job's model: per image the
    top-k classes with calibrated probabilities, `abstained` and `ood_score` (models trained with trust data),
    or an error for that image alone. `?explain=true` adds `heatmap_png` to each result: where the model looked
    (Grad-CAM), a base64 grayscale PNG at the image's width and height. A multi-label model's results add
    `labels` (those at or above their thresholds, most probable first; maybe none) and `probabilities`."""
    art = service.artifact(session, user, job_id, "model")
    _artifact_file(settings, art)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest("send multipart/form-data with the images in the field 'files'")
    form = await request.form(max_files=settings.max_predict_images + 1, max_fields=10)
    try:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise BadRequest("no images: send them in the multipart field 'files'")
        if len(files) > settings.max_predict_images:
            raise BadRequest(f"{len(files)} images is more than {settings.max_predict_images} per request: split them")
        top_k = form.get("top_k") or "3"
        payload = [("files", (f.filename or f"image{i}", await f.read(), "application/octet-stream"))
                   for i, f in enumerate(files)]
    finally:
        await form.close()
    form_data = {"model": art.path, "top_k": str(top_k), "explain": "true" if explain else ""}
    job = service.get_owned(session, user, job_id)
    threshold = operating_point.confidence_threshold(job)
    if threshold is not None:  # the operating point an editor chose (else the model file's default)
        form_data["confidence_threshold"] = str(threshold)
    moved = operating_point.label_thresholds(job)
    if moved is not None:  # a multi-label job's thresholds an editor moved (else the model file's)
        form_data["label_thresholds"] = ",".join(repr(x) for x in moved)
    if not settings.inference_url:
        raise ServiceUnavailable("no inference service is configured: run `graft inference` and set "
                                 "GRAFT_INFERENCE_URL (graft serve does both)")
    import httpx

    try:
        async with httpx.AsyncClient(base_url=settings.inference_url, timeout=300) as client:
            r = await client.post("/predict", data=form_data, files=payload)
    except httpx.HTTPError as e:
        raise ServiceUnavailable(f"the inference service at {settings.inference_url} cannot be reached "
                                 f"({type(e).__name__}): start it with `graft inference`") from None
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code != 200:
        msg = (body.get("error") or {}).get("message", f"status {r.status_code}")
        raise ServiceUnavailable(f"the inference service failed: {msg}")
    return PredictOut.model_validate({"job_id": job_id, "results": body["results"]})


def _snapshot(job: Job, settings: Settings) -> dict:
    stale, note = service.staleness(job, settings)
    return {"status": job.status, "progress": job.progress, "stage": job.stage, "current_epoch": job.current_epoch,
            "total_epochs": job.total_epochs, "eta_seconds": job.eta_seconds, "best_val_acc": job.best_val_acc,
            "error": job.error, "stale": stale, "status_note": note}


class _Feed:
    """The events and progress snapshot of one job, polled from the database at most once per SSE_POLL_S
    for all of its SSE clients in this process: a hundred watchers of a job cost about what one costs."""

    BATCH = 500

    def __init__(self, sessions, job_id: int, settings: Settings):
        self.sessions, self.job_id, self.settings = sessions, job_id, settings
        self.rows: list[tuple[int, str, dict]] = []  # the job's stored events so far, in id order
        self.snap: dict = {}
        self.more = True  # the last poll stopped at BATCH rows: more are waiting
        self.polled_at = -1e9
        self.clients = 0
        self._lock = asyncio.Lock()

    def _poll(self, after_id: int) -> tuple[list[tuple[int, str, dict]], dict]:
        with self.sessions() as s:
            rows = s.execute(select(JobEvent.id, JobEvent.kind, JobEvent.data)
                             .where(JobEvent.job_id == self.job_id, JobEvent.id > after_id)
                             .order_by(JobEvent.id).limit(self.BATCH)).all()
            j = s.get(Job, self.job_id)
            return [tuple(r) for r in rows], (_snapshot(j, self.settings) if j else {"status": "deleted"})

    async def refresh(self) -> None:
        async with self._lock:  # the clients that wait here get the result of the poll under way
            if time.monotonic() - self.polled_at < SSE_POLL_S * 0.8:
                return
            rows, snap = await run_in_threadpool(self._poll, self.rows[-1][0] if self.rows else 0)
            self.rows = self.rows + rows  # a new list: clients iterating the old one are not disturbed
            self.snap, self.more, self.polled_at = snap, len(rows) >= self.BATCH, time.monotonic()


def _feeds(app) -> dict[int, _Feed]:
    """This app's feeds by job id (made on first use; the event loop is the only one to touch them)."""
    feeds = getattr(app.state, "sse_feeds", None)
    if feeds is None:
        feeds = app.state.sse_feeds = {}
    return feeds


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}, **errors(404)})
async def job_events(job_id: int, request: Request, session: SessionDep, user: CurrentUser,
                     last_event_id: str | None = Header(None)):
    """Server-sent events: `status`, `epoch` and `message` events carry ids (resume with Last-Event-ID);
    `progress` events (no id) carry the job's progress snapshot. The stream ends when the job has ended."""
    job = service.get_owned(session, user, job_id)
    try:
        after = min(max(int(last_event_id), 0), MAX_ID) if last_event_id else 0
    except ValueError:
        after = 0
    job_id = job.id
    # the stream lasts as long as the job: give the request's connection back to the pool now, or a few
    # dozen watchers exhaust the pool and every other request waits
    session.close()
    feeds = _feeds(request.app)

    async def stream() -> AsyncIterator[str]:
        feed = feeds.get(job_id) or feeds.setdefault(job_id, _Feed(request.app.state.sessions, job_id,
                                                                        request.app.state.settings))
        feed.clients += 1
        try:
            last_id, last_snap, idle = after, None, 0.0
            yield "retry: 2000\n\n"
            while True:
                if await request.is_disconnected():
                    return
                await feed.refresh()
                rows, snap, more = feed.rows, feed.snap, feed.more
                for rid, kind, data in rows[bisect.bisect_right(rows, last_id, key=lambda r: r[0]):]:
                    last_id = rid
                    yield f"id: {rid}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
                if snap != last_snap:
                    last_snap = snap
                    yield f"event: progress\ndata: {json.dumps(snap)}\n\n"
                    idle = 0.0
                if snap.get("status") in FINAL_STATUSES + ("deleted",) and not more:
                    yield "event: end\ndata: {}\n\n"
                    return
                await asyncio.sleep(SSE_POLL_S)
                idle += SSE_POLL_S
                if idle >= SSE_KEEPALIVE_S:
                    idle = 0.0
                    yield ": keep-alive\n\n"
        finally:
            feed.clients -= 1
            if feed.clients == 0 and feeds.get(job_id) is feed:
                del feeds[job_id]

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
