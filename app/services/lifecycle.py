"""Job status changes made by the web tier: create (-> queued, with its status event) and request_cancel
(queued, or running on a worker that stopped responding: cancelled at once; otherwise the flag the worker
obeys). Torch-free; imports only app.db and the SQL layer. The worker's own writes (claim, progress, finish,
release) are in worker.attempt and worker.runjob, the reaper's in worker.reaper; `last_sign_of_life` is
shared with the reaper. A job is enqueued only after its row is committed (app.services.jobs)."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import func, update
from sqlalchemy.orm import Session

from app.db.models import FINAL_STATUSES, Job, JobEvent, JobStatus

# the messages, written once
CANCELLED = "cancelled on request"
CANCELLED_LOST_WORKER = "cancelled on request (its worker had stopped responding)"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def record_event(s: Session, job_id: int, kind: str, data: dict) -> None:
    """Add a job event ("status", "message", "epoch") to the session (the caller commits)."""
    s.add(JobEvent(job_id=job_id, kind=kind, data=data))


def _status_event(s: Session, job_id: int, status: JobStatus | str, error: str | None = None) -> None:
    record_event(s, job_id, "status", {"status": JobStatus(status).value, "error": error})


def last_sign_of_life():
    """The job's heartbeat; a row without one counts from its start (or creation)."""
    return func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)


# -- the web tier -----------------------------------------------------------------------------------------

def create(session: Session, job: Job) -> Job:
    """Save a new job row as queued, with its status event, and commit (the caller enqueues it after)."""
    job.status = JobStatus.queued.value
    session.add(job)
    session.flush()
    _status_event(session, job.id, JobStatus.queued)
    session.commit()
    return job


def request_cancel(session: Session, job: Job, heartbeat_timeout_s: float) -> bool:
    """Ask for the job's cancel. Queued: cancelled at once. Running with a heartbeat older than
    `heartbeat_timeout_s`: cancelled at once. Otherwise the flag only (the worker stops). Commits; returns
    whether the row was cancelled now."""
    now = utcnow()
    # the flag first: from then on no worker claims the job, and the reaper never re-queues it
    session.execute(update(Job).where(Job.id == job.id, Job.status.not_in(FINAL_STATUSES))
                    .values(cancel_requested=True))
    done = dict(status=JobStatus.cancelled.value, finished_at=now, stage=None)
    error = CANCELLED
    n = session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.queued.value)
                        .values(error=error, **done)).rowcount
    if not n:
        cutoff = now - dt.timedelta(seconds=heartbeat_timeout_s)
        error = CANCELLED_LOST_WORKER
        n = session.execute(update(Job).where(
            Job.id == job.id, Job.status == JobStatus.running.value, last_sign_of_life() < cutoff)
            .values(error=error, **done)).rowcount
    if n:
        _status_event(session, job.id, JobStatus.cancelled, error)
    session.commit()
    return bool(n)
