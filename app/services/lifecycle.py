"""The job lifecycle: every status change of a job row and every job event goes through here. Torch-free
(the web services and the worker bridge both use it); imports only app.db, app.core and the SQL layer.

    create -> queued --claim--> running --finish--> succeeded | failed | cancelled
                 ^                 |
                 +-- release/reap -+        (request_cancel / reap may cancel or fail a job, too)

A claim is a conditional update (queued -> running, no cancel asked for) that also counts the attempt;
(job id, attempt) then identifies the run, and every write of a running job is conditional on that pair
(`owned`): a run that lost its job (reaped, re-queued) finds nothing to update and writes nothing more.
A job is enqueued only after its row is committed (app.services.jobs.enqueue); the database is the record.
"""
from __future__ import annotations

import datetime as dt
import socket

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import FINAL_STATUSES, Job, JobEvent, JobStatus

__all__ = ["FINAL_STATUSES", "JobStatus", "utcnow", "record_event", "owned", "last_sign_of_life", "create",
           "claim", "defer", "update_run", "renew_heartbeat", "finish", "release", "request_cancel",
           "reap_one", "cancel_queued_with_request", "take_for_sending", "untake_for_sending",
           "CANCELLED", "CANCELLED_LOST_WORKER", "lost_message", "lost_phrase", "requeued_message",
           "released_message", "attempt_message"]

# the messages, written once
CANCELLED = "cancelled on request"
CANCELLED_LOST_WORKER = "cancelled on request (its worker had stopped responding)"


def attempt_message(attempt: int, max_attempts: int) -> str:
    return f"attempt {attempt} of {max_attempts}"


def released_message(epoch: int) -> str:
    after = f"after epoch {epoch}" if epoch else "from the start"
    return f"the worker is shutting down: job put back in the queue; it continues {after} on the next worker"


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def lost_phrase(timeout_s: float) -> str:
    if timeout_s <= 0:  # `graft serve` at start-up: its previous worker is gone
        return "stopped before the job finished"
    return f"stopped responding (no heartbeat for {_ago(timeout_s)})"


def lost_message(attempts: int, timeout_s: float) -> str:
    times = "once" if attempts == 1 else "twice" if attempts == 2 else f"{attempts} times"
    return (f"the worker running this job {lost_phrase(timeout_s)} {times}: "
            f"it was killed, ran out of memory or lost its machine; Graft gave up after {attempts} attempt(s). "
            "The worker log says more; submit the job again (a smaller batch_size or image_size needs less "
            "memory)")


def requeued_message(worker: str | None, timeout_s: float, attempts: int, max_attempts: int) -> str:
    where = f" on {worker}" if worker else ""
    return (f"the worker running this job{where} {lost_phrase(timeout_s)}: job re-queued after attempt "
            f"{attempts} of {max_attempts}; it resumes from its last checkpoint")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def record_event(s: Session, job_id: int, kind: str, data: dict) -> None:
    """Add a job event ("status", "message", "epoch") to the session (the caller commits)."""
    s.add(JobEvent(job_id=job_id, kind=kind, data=data))


def _status_event(s: Session, job_id: int, status: JobStatus | str, error: str | None = None) -> None:
    record_event(s, job_id, "status", {"status": JobStatus(status).value, "error": error})


def owned(job_id: int, attempt: int | None) -> tuple:
    """The WHERE clause of a write by run `attempt` of job `job_id` (any run when attempt is None)."""
    if attempt is None:
        return (Job.id == job_id,)
    return (Job.id == job_id, Job.status == JobStatus.running.value, Job.attempts == attempt)


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


# -- the worker bridge ------------------------------------------------------------------------------------

def defer(S: sessionmaker[Session], job_id: int) -> None:
    """A message taken while the worker shuts down: leave the queued job to another worker (no task id:
    a reconciler sends it again)."""
    with S() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value)
                  .values(celery_task_id=None))
        s.commit()


def claim(S: sessionmaker[Session], job_id: int, max_attempts: int) -> Job | None:
    """Claim the job for this worker (queued -> running, counting the attempt), or None when it is not
    queued or its cancel was asked for. The returned row is detached; its `attempts` names this run."""
    with S() as s:
        claimed = s.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False))
            .values(status=JobStatus.running.value, started_at=utcnow(), heartbeat_at=utcnow(),
                    worker=socket.gethostname(), attempts=Job.attempts + 1)
        ).rowcount
        if not claimed:
            return None
        _status_event(s, job_id, JobStatus.running)
        job = s.get(Job, job_id)
        if job.attempts > 1:
            record_event(s, job_id, "message", {"message": attempt_message(job.attempts, max_attempts)})
        s.commit()
        s.refresh(job)
        s.expunge(job)
        return job


def update_run(s: Session, job_id: int, attempt: int | None, **values) -> bool:
    """Write progress figures of run `attempt` (and renew its heartbeat) in session `s`, if the row still
    belongs to it. Does not commit. Returns whether it did."""
    return bool(s.execute(update(Job).where(*owned(job_id, attempt))
                          .values(heartbeat_at=utcnow(), **values)).rowcount)


def renew_heartbeat(S: sessionmaker[Session], job_id: int, attempt: int | None) -> bool:
    with S() as s:
        n = update_run(s, job_id, attempt)
        s.commit()
    return n


def finish(S: sessionmaker[Session], job_id: int, status: JobStatus | str, error: str | None = None,
           result: dict | None = None, attempt: int | None = None) -> bool:
    """Record the outcome, if the row still belongs to run `attempt`. Returns whether it did."""
    status = JobStatus(status)
    with S() as s:
        values = dict(status=status.value, error=error, finished_at=utcnow(), heartbeat_at=utcnow(), stage=None)
        if status is JobStatus.succeeded:
            values.update(progress=1.0, eta_seconds=0.0)
        if result is not None:
            values["result"] = result
        if not s.execute(update(Job).where(*owned(job_id, attempt)).values(**values)).rowcount:
            return False
        _status_event(s, job_id, status, error)
        s.commit()
        return True


def release(S: sessionmaker[Session], job_id: int, attempt: int, epoch: int) -> bool:
    """The worker is shutting down: put the job back in the queue (the attempt does not count); it
    continues from its last checkpoint on the next worker. False if the run no longer owns the job, or a
    cancel was asked for (then it is cancelled, not released)."""
    with S() as s:
        n = s.execute(update(Job).where(*owned(job_id, attempt), Job.cancel_requested.is_(False)).values(
            status=JobStatus.queued.value, attempts=Job.attempts - 1, celery_task_id=None, stage=None,
            eta_seconds=None)).rowcount
        if not n:
            return False
        record_event(s, job_id, "message", {"message": released_message(epoch)})
        _status_event(s, job_id, JobStatus.queued)
        s.commit()
    # no task id: another worker's reconciler sends it (not this one: its consumer may still take it)
    return True


# -- the reaper ---------------------------------------------------------------------------------------------

def reap_one(S: sessionmaker[Session], jid: int, attempts: int, cancel_requested: bool, worker: str | None,
             cutoff: dt.datetime, now: dt.datetime, timeout_s: float, max_attempts: int) -> JobStatus | None:
    """A running job whose heartbeat is older than `cutoff` lost its worker: cancel it (cancel asked
    for), fail it (`max_attempts` reached) or re-queue it, if the row is still the one looked at (running,
    same attempt, heartbeat still old). Returns the new status, or None when the row had changed."""
    cond = (Job.id == jid, Job.status == JobStatus.running.value, Job.attempts == attempts,
            last_sign_of_life() < cutoff)
    with S() as s:
        if cancel_requested:
            status, error = JobStatus.cancelled, CANCELLED_LOST_WORKER
            n = s.execute(update(Job).where(*cond).values(
                status=status.value, error=error, finished_at=now, stage=None)).rowcount
        elif attempts >= max_attempts:
            status, error = JobStatus.failed, lost_message(attempts, timeout_s)
            n = s.execute(update(Job).where(*cond, Job.cancel_requested.is_(False)).values(
                status=status.value, error=error, finished_at=now, stage=None)).rowcount
        else:  # (a cancel that arrives meanwhile wins: the next round cancels it)
            status, error = JobStatus.queued, None
            n = s.execute(update(Job).where(*cond, Job.cancel_requested.is_(False)).values(
                status=status.value, celery_task_id=None, stage=None, eta_seconds=None)).rowcount
            if n:
                record_event(s, jid, "message", {"message": requeued_message(worker, timeout_s, attempts,
                                                                             max_attempts)})
        if n:
            _status_event(s, jid, status, error)
        s.commit()
    return status if n else None


def cancel_queued_with_request(S: sessionmaker[Session], now: dt.datetime) -> list[int]:
    """A queued job with a cancel request (left by an older version or a crash) is cancelled, never run."""
    done = []
    with S() as s:
        stuck = s.scalars(select(Job.id).where(Job.status == JobStatus.queued.value,
                                               Job.cancel_requested.is_(True))).all()
        for jid in stuck:
            if s.execute(update(Job).where(Job.id == jid, Job.status == JobStatus.queued.value).values(
                    status=JobStatus.cancelled.value, error=CANCELLED, finished_at=now)).rowcount:
                _status_event(s, jid, JobStatus.cancelled, CANCELLED)
                done.append(jid)
        s.commit()
    return done


def take_for_sending(S: sessionmaker[Session], jid: int, old_task_id: str | None, task_id: str) -> bool:
    """Give the queued job the new `task_id` if it still has `old_task_id` (so that two reconcilers never
    both send it). Commits; returns whether it did."""
    cond = Job.celery_task_id.is_(None) if old_task_id is None else Job.celery_task_id == old_task_id
    with S() as s:
        n = s.execute(update(Job).where(Job.id == jid, Job.status == JobStatus.queued.value,
                                        Job.cancel_requested.is_(False), cond)
                      .values(celery_task_id=task_id)).rowcount
        s.commit()
    return bool(n)


def untake_for_sending(S: sessionmaker[Session], jid: int, task_id: str) -> None:
    """The send failed: the row gets no task id again (the next round retries)."""
    with S() as s:
        s.execute(update(Job).where(Job.id == jid, Job.celery_task_id == task_id).values(celery_task_id=None))
        s.commit()
