"""The job lifecycle: every status change of a job row and every job event goes through here.

    create -> queued -> claim -> running -> finish -> succeeded | failed | cancelled
                          ^                 |
                          +---- release ----+  (this worker shuts down: back to the queue, the attempt
                          +---- reap -------+   does not count; its heartbeat went stale: re-queued, failed
                                               after max_attempts, or cancelled when a cancel was asked for)

The web tier calls `create` and `request_cancel` (both commit). The worker bridge (worker.attempt,
worker.runjob, worker.reaper) calls the others inside its own session and commits; each write by a run is
conditional on the row still belonging to that run (`owned`: running, same attempt), so a run that lost its
job (re-queued by the reaper, taken by another worker) writes nothing. Torch-free: app.db and SQL only.
The messages a user reads about these changes are written once, here."""
from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from app.db.models import FINAL_STATUSES, Job, JobEvent, JobStatus
from domain.clock import utcnow

# ---------------------------------------------------------------- the messages, written once

CANCELLED = "cancelled on request"
CANCELLED_LOST_WORKER = "cancelled on request (its worker had stopped responding)"


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _lost(timeout_s: float) -> str:
    if timeout_s <= 0:  # `graft serve` at start-up: its previous worker is gone
        return "stopped before the job finished"
    return f"stopped responding (no heartbeat for {_ago(timeout_s)})"


def lost_message(attempts: int, timeout_s: float) -> str:
    times = "once" if attempts == 1 else "twice" if attempts == 2 else f"{attempts} times"
    return (f"the worker running this job {_lost(timeout_s)} {times}: "
            f"it was killed, ran out of memory or lost its machine; Graft gave up after {attempts} attempt(s). "
            "The worker log says more; submit the job again (a smaller batch_size or image_size needs less "
            "memory)")


# ---------------------------------------------------------------- events and conditions


def record_event(s: Session, job_id: int, kind: str, data: dict[str, Any]) -> None:
    """Add a job event ("status", "message", "epoch") to the session (the caller commits)."""
    s.add(JobEvent(job_id=job_id, kind=kind, data=data))


def _status_event(s: Session, job_id: int, status: JobStatus | str, error: str | None = None) -> None:
    record_event(s, job_id, "status", {"status": JobStatus(status).value, "error": error})


def changed(s: Session, statement: Any) -> int:
    """Run an UPDATE; how many rows it changed (the conditional writes below test it)."""
    return cast("CursorResult[Any]", s.execute(statement)).rowcount


def last_sign_of_life():
    """The job's heartbeat; a row without one counts from its start (or creation)."""
    return func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)


def owned(job_id: int, attempt: int | None) -> tuple:
    """The WHERE clause of a write by run `attempt` of job `job_id` (any run when attempt is None)."""
    if attempt is None:
        return (Job.id == job_id,)
    return (Job.id == job_id, Job.status == JobStatus.running.value, Job.attempts == attempt)


# ---------------------------------------------------------------- the web tier (these commit)


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
    n = changed(session, update(Job).where(Job.id == job.id, Job.status == JobStatus.queued.value)
                        .values(error=error, **done))
    if not n:
        cutoff = now - dt.timedelta(seconds=heartbeat_timeout_s)
        error = CANCELLED_LOST_WORKER
        n = changed(session, update(Job).where(
            Job.id == job.id, Job.status == JobStatus.running.value, last_sign_of_life() < cutoff)
            .values(error=error, **done))
    if n:
        _status_event(session, job.id, JobStatus.cancelled, error)
    session.commit()
    return bool(n)


# ---------------------------------------------------------------- a worker's run (the caller commits)


def claim(s: Session, job_id: int, worker: str, max_attempts: int) -> Job | None:
    """queued -> running for this worker, counting an attempt; None when the job is not claimable (taken,
    cancelled, gone)."""
    now = utcnow()
    claimed = changed(s, update(Job).where(
        Job.id == job_id, Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False))
        .values(status=JobStatus.running.value, started_at=now, heartbeat_at=now, worker=worker,
                attempts=Job.attempts + 1))
    if not claimed:
        return None
    _status_event(s, job_id, JobStatus.running)
    job = s.get(Job, job_id)
    if job is not None and job.attempts > 1:
        record_event(s, job_id, "message", {"message": f"attempt {job.attempts} of {max_attempts}"})
    return job


def defer(s: Session, job_id: int) -> None:
    """A queued job's message was taken by a worker that is shutting down: forget the task, so that another
    worker's reconciler sends it again."""
    s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value).values(celery_task_id=None))


def update_running(s: Session, job_id: int, attempt: int | None, **values: Any) -> bool:
    """Progress of a running job (stage, progress, ETA, epoch, best accuracy, heartbeat), if the row still
    belongs to run `attempt`. Returns whether it did."""
    return bool(changed(s, update(Job).where(*owned(job_id, attempt)).values(**values)))


def still_owned(s: Session, job_id: int, attempt: int | None) -> bool:
    return attempt is None or s.scalar(select(Job.id).where(*owned(job_id, attempt))) is not None


def finish(s: Session, job_id: int, status: str, error: str | None = None, result: dict | None = None,
           attempt: int | None = None) -> bool:
    """running -> succeeded | failed | cancelled with the outcome, if the row still belongs to run
    `attempt`. Returns whether it did."""
    now = utcnow()
    values: dict[str, Any] = dict(status=status, error=error, finished_at=now, heartbeat_at=now, stage=None)
    if status == JobStatus.succeeded.value:
        values.update(progress=1.0, eta_seconds=0.0)
    if result is not None:
        values["result"] = result
    if not changed(s, update(Job).where(*owned(job_id, attempt)).values(**values)):
        return False
    _status_event(s, job_id, status, error)
    return True


def release(s: Session, job_id: int, attempt: int, epoch: int) -> bool:
    """running -> queued: this worker is shutting down (the attempt does not count); the job continues from
    its last checkpoint on the next worker. False if the run no longer owns the job, or a cancel was asked
    for (then it is cancelled, not released). The job gets no task id: another worker's reconciler sends it."""
    n = changed(s, update(Job).where(*owned(job_id, attempt), Job.cancel_requested.is_(False)).values(
        status=JobStatus.queued.value, attempts=Job.attempts - 1, celery_task_id=None, stage=None,
        eta_seconds=None))
    if not n:
        return False
    after = f"after epoch {epoch}" if epoch else "from the start"
    record_event(s, job_id, "message", {"message": f"the worker is shutting down: job put back in the queue; "
                                                   f"it continues {after} on the next worker"})
    _status_event(s, job_id, JobStatus.queued)
    return True


# ---------------------------------------------------------------- the reaper (the caller commits)


def reap_stale(s: Session, job_id: int, attempts: int, cancel_requested: bool, worker: str | None,
               cutoff: dt.datetime, now: dt.datetime, max_attempts: int, timeout_s: float) -> str | None:
    """A running job whose heartbeat is older than `cutoff`: "cancelled" (a cancel was asked for),
    "failed" (its attempts are used up) or "requeued" (it resumes from its last checkpoint); None when the
    row changed meanwhile (it is no longer that run's, or its heartbeat came back)."""
    cond = (Job.id == job_id, Job.status == JobStatus.running.value, Job.attempts == attempts,
            last_sign_of_life() < cutoff)
    if cancel_requested:
        n = changed(s, update(Job).where(*cond).values(
            status=JobStatus.cancelled.value, error=CANCELLED_LOST_WORKER, finished_at=now, stage=None))
        if n:
            _status_event(s, job_id, JobStatus.cancelled, CANCELLED_LOST_WORKER)
        return "cancelled" if n else None
    if attempts >= max_attempts:
        error = lost_message(attempts, timeout_s)
        n = changed(s, update(Job).where(*cond, Job.cancel_requested.is_(False)).values(
            status=JobStatus.failed.value, error=error, finished_at=now, stage=None))
        if n:
            _status_event(s, job_id, JobStatus.failed, error)
        return "failed" if n else None
    # (a cancel that arrives meanwhile wins: the next round cancels it)
    n = changed(s, update(Job).where(*cond, Job.cancel_requested.is_(False)).values(
        status=JobStatus.queued.value, celery_task_id=None, stage=None, eta_seconds=None))
    if n:
        where = f" on {worker}" if worker else ""
        record_event(s, job_id, "message", {"message": (
            f"the worker running this job{where} {_lost(timeout_s)}: job re-queued after attempt "
            f"{attempts} of {max_attempts}; it resumes from its last checkpoint")})
        _status_event(s, job_id, JobStatus.queued)
    return "requeued" if n else None


def cancel_queued_with_request(s: Session, job_id: int, now: dt.datetime) -> bool:
    """A queued job with a cancel request (left by an older version or a crash) is cancelled, never run."""
    n = changed(s, update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value).values(
        status=JobStatus.cancelled.value, error=CANCELLED, finished_at=now))
    if n:
        _status_event(s, job_id, JobStatus.cancelled, CANCELLED)
    return bool(n)
