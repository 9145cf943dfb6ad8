from __future__ import annotations

import asyncio
import json
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.schemas import EpochMetricOut, JobCreate, JobOut
from app.core.errors import NotFound
from app.db.models import FINAL_STATUSES, MAX_ID, EpochMetric, Job, JobEvent
from app.services import jobs as service
from worker.engine.spec import RunSpec

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


@router.post("", status_code=201, response_model=JobOut)
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """Queue a training job. Every parameter but dataset_id has a default (see RunSpec)."""
    spec = RunSpec(**body.model_dump(exclude={"dataset_id"}))
    return JobOut.model_validate(service.create(session, settings, user, body.dataset_id, spec))


@router.get("", response_model=list[JobOut])
def list_jobs(session: SessionDep, user: CurrentUser, status: str | None = None,
              dataset_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None):
    q = select(Job).where(Job.owner_id == user.id)
    if status:
        q = q.where(Job.status == status)
    if dataset_id is not None:
        q = q.where(Job.dataset_id == dataset_id)
    return [JobOut.model_validate(j) for j in session.scalars(q.order_by(Job.id.desc()))]


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: int, session: SessionDep, user: CurrentUser):
    return JobOut.model_validate(service.get_owned(session, user, job_id))


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """Delete a finished job with its files."""
    service.delete(session, settings, user, job_id)
    return Response(status_code=204)


@router.get("/{job_id}/metrics", response_model=list[EpochMetricOut])
def job_metrics(job_id: int, session: SessionDep, user: CurrentUser):
    job = service.get_owned(session, user, job_id)
    rows = session.scalars(select(EpochMetric).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch))
    return [EpochMetricOut.model_validate(r) for r in rows]


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: int, session: SessionDep, user: CurrentUser):
    """Queued jobs are cancelled at once; running ones stop within a few seconds."""
    return JobOut.model_validate(service.cancel(session, user, job_id))


@router.get("/{job_id}/model", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The model file"}})
def download_model(job_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """The trained model file (PyTorch; classes, preprocessing, parameters and metrics inside)."""
    art = service.artifact(session, user, job_id, "model")
    path = (settings.data_dir / art.path).resolve()
    if not path.is_relative_to(settings.data_dir.resolve()) or not path.is_file():
        raise NotFound(f"the model file of job {job_id} is missing on the server")
    job = session.get(Job, job_id)
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"graft-job{job_id}-{job.spec.get('backbone', 'model')}.pt",
                        headers={"X-Checksum-SHA256": art.sha256})


def _snapshot(job: Job) -> dict:
    return {"status": job.status, "progress": job.progress, "stage": job.stage, "current_epoch": job.current_epoch,
            "total_epochs": job.total_epochs, "eta_seconds": job.eta_seconds, "best_val_acc": job.best_val_acc,
            "error": job.error}


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}})
async def job_events(job_id: int, request: Request, session: SessionDep, user: CurrentUser,
                     last_event_id: str | None = Header(None)):
    """Server-sent events: `status`, `epoch` and `message` events carry ids (resume with Last-Event-ID);
    `progress` events (no id) carry the job's progress snapshot. The stream ends when the job has ended."""
    job = service.get_owned(session, user, job_id)
    try:
        after = min(max(int(last_event_id), 0), MAX_ID) if last_event_id else 0
    except ValueError:
        after = 0
    sessions = request.app.state.sessions

    def poll(after_id: int) -> tuple[list[tuple[int, str, dict]], dict]:
        with sessions() as s:
            rows = s.execute(select(JobEvent.id, JobEvent.kind, JobEvent.data)
                             .where(JobEvent.job_id == job.id, JobEvent.id > after_id)
                             .order_by(JobEvent.id).limit(500)).all()
            j = s.get(Job, job.id)
            return [tuple(r) for r in rows], (_snapshot(j) if j else {"status": "deleted"})

    async def stream() -> AsyncIterator[str]:
        last_id, last_snap, idle = after, None, 0.0
        yield "retry: 2000\n\n"
        while True:
            if await request.is_disconnected():
                return
            rows, snap = await run_in_threadpool(poll, last_id)
            for rid, kind, data in rows:
                last_id = rid
                yield f"id: {rid}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
            if snap != last_snap:
                last_snap = snap
                yield f"event: progress\ndata: {json.dumps(snap)}\n\n"
                idle = 0.0
            if snap.get("status") in FINAL_STATUSES + ("deleted",) and len(rows) < 500:
                yield "event: end\ndata: {}\n\n"
                return
            await asyncio.sleep(SSE_POLL_S)
            idle += SSE_POLL_S
            if idle >= SSE_KEEPALIVE_S:
                idle = 0.0
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
