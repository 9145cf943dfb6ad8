"""Jobs: create (row first, commit, then enqueue the id), read, cancel, delete."""
from __future__ import annotations

import datetime as dt
import logging
import shutil

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.errors import Conflict, NotFound, ServiceUnavailable, Unprocessable
from app.core.settings import Settings, get_settings
from app.db.models import FINAL_STATUSES, Artifact, Job, JobKind, JobStatus, User
from app.services import access, lifecycle, storage
from app.services import datasets as dataset_service
from app.services.queue import enqueue_job
from domain.catalog import CATALOG
from domain.clock import as_utc, utcnow
from domain.spec import RunSpec

log = logging.getLogger(__name__)


def get_owned(session: Session, user: User, job_id: int, need: str = access.VIEW, what: str = "this") -> Job:
    """A job the user may see (404 otherwise); with `need`, a role they must have there (403)."""
    job = access.get_visible(session, Job, user, job_id, need, what)
    if job is None:
        raise NotFound(f"job {job_id} not found: list yours with GET /api/v1/jobs")
    return job


STALE_NOTE = "its worker stopped responding; it will resume when a worker takes it"


def staleness(job: Job, settings: Settings, now: dt.datetime | None = None) -> tuple[bool, str | None]:
    """(stale, status_note): a running job whose last sign of life (heartbeat, else start, else creation)
    is older than GRAFT_HEARTBEAT_TIMEOUT_S lost its worker; the reaper re-queues it at its next round."""
    if job.status != JobStatus.running.value:
        return False, None
    last = as_utc(job.heartbeat_at or job.started_at or job.created_at)
    if last is None:
        return False, None
    stale = ((now or utcnow()) - last).total_seconds() > settings.heartbeat_timeout_s
    return stale, STALE_NOTE if stale else None


def enqueue(session: Session, settings: Settings, job: Job) -> None:
    """Send the job id to the broker (after the row is committed). On broker trouble the job stays
    queued in the database (the record) and the caller gets a 503 that says so."""
    try:
        task_id = enqueue_job(job.id, settings)
    except Exception as e:  # kombu/redis raise many kinds; all mean "not enqueued"
        log.warning("could not enqueue job %s: %s", job.id, e)
        raise ServiceUnavailable(
            f"job {job.id} was saved but the job queue ({settings.broker.split('://')[0]}) cannot be reached "
            f"({type(e).__name__}); it stays queued and is sent when a worker next starts; check the broker "
            "(GRAFT_BROKER_URL)", {"job_id": job.id}) from None
    session.execute(update(Job).where(Job.id == job.id).values(celery_task_id=task_id))
    session.commit()
    job.celery_task_id = task_id


def create(session: Session, settings: Settings, user: User, dataset_id: int, spec: RunSpec,
           workspace_id: int | None = None) -> Job:
    """A training job on the dataset, in the dataset's workspace (editors only)."""
    ds = dataset_service.get_owned(session, user, dataset_id, access.EDIT, "training a model")
    if workspace_id is not None and workspace_id != ds.workspace_id:
        raise Unprocessable(f"dataset {ds.id} is in workspace {ds.workspace_id}, not {workspace_id}: a job runs "
                            "in its dataset's workspace (leave workspace_id out)",
                            {"dataset_workspace_id": ds.workspace_id})
    if spec.backbone not in CATALOG:
        raise Unprocessable(f"unknown backbone {spec.backbone!r}: choose one of {', '.join(CATALOG)}")
    if spec.pretrained and not CATALOG[spec.backbone].weights_available():
        raise Unprocessable(
            f"pretrained weights for {spec.backbone} are not on this server: import them with "
            f"`graft weights import FILE --backbone {spec.backbone}`, pick a backbone whose weights are "
            "available (GET /api/v1/backbones), or set pretrained=false")
    job = Job(owner_id=user.id, workspace_id=ds.workspace_id, dataset_id=ds.id, spec=spec.model_dump(),
              status=JobStatus.queued.value, total_epochs=spec.max_epochs())
    lifecycle.create(session, job)
    enqueue(session, settings, job)
    return job


def cancel(session: Session, user: User, job_id: int, settings: Settings | None = None) -> Job:
    """Queued: cancelled at once (a worker that receives it later skips it). Running: the worker sees the
    flag within a second or two and stops; if its worker stopped responding (no heartbeat for
    GRAFT_HEARTBEAT_TIMEOUT_S), cancelled at once (were the worker only slow, it finds the row changed and
    stops). Finished: 409."""
    job = get_owned(session, user, job_id, access.EDIT, "cancelling a job")
    if job.status in FINAL_STATUSES:
        raise Conflict(f"job {job.id} already {job.status}: there is nothing to cancel")
    lifecycle.request_cancel(session, job, (settings or get_settings()).heartbeat_timeout_s)
    session.refresh(job)
    return job


def delete(session: Session, settings: Settings, user: User, job_id: int) -> None:
    """A finished job with its files: every object under its prefixes in the storage (storage.job_prefixes:
    its run folder, a batch's images; never its dataset's, another job's or the shared feature cache), then
    its row. The objects go first: a storage that does not answer is a 503 that keeps the job (deleting it
    again finishes), never a row gone with its files left behind."""
    job = get_owned(session, user, job_id, access.EDIT, "deleting a job")
    if job.status not in FINAL_STATUSES:
        raise Conflict(f"job {job.id} is {job.status}: cancel it first, then delete it")
    users = [j.id for j in session.scalars(select(Job).where(
        Job.dataset_id == job.dataset_id, Job.kind == JobKind.batch_predict.value, Job.status.not_in(FINAL_STATUSES)))
        if (j.spec or {}).get("model_job_id") == job.id]
    if users:
        raise Conflict(f"job {job.id}'s model is in use by batch prediction job(s) {', '.join(map(str, users))}, "
                       "which have not finished: wait for them or cancel them, then delete the job")
    forget_files(settings, job)
    session.delete(job)
    session.commit()
    run_dir = settings.runs_dir / str(job_id)  # this host's copy (with object storage: what a worker left here)
    if run_dir.resolve().is_relative_to(settings.runs_dir.resolve()):
        shutil.rmtree(run_dir, ignore_errors=True)


def forget_files(settings: Settings, job: Job) -> None:
    """Delete the job's objects from the storage (ServiceUnavailable when it cannot be reached). Every artifact
    a worker stores lies in the job's run folder, one of its prefixes."""
    st = storage.for_settings(settings)
    try:
        for prefix in storage.job_prefixes(settings, job.id, job.spec):
            storage.forget_tree(st, settings, prefix)
    except storage.StorageError as e:
        raise ServiceUnavailable(f"job {job.id} was not deleted: its files could not be removed from the storage "
                                 f"({e}). The job is kept; delete it again once the storage answers (check "
                                 "GRAFT_STORAGE_URL and the AWS_* settings)", {"job_id": job.id}) from None


def artifact(session: Session, user: User, job_id: int, kind: str) -> Artifact:
    job = get_owned(session, user, job_id)
    art = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == kind))
    if art is None:
        hint = "it has not finished yet" if job.status not in FINAL_STATUSES else f"it {job.status}"
        raise NotFound(f"job {job.id} has no {kind} file: {hint}")
    return art


def has_artifact(session: Session, job_id: int, kind: str) -> bool:
    """Whether the (already checked) job has a file of this kind."""
    return session.scalar(select(Artifact.id).where(Artifact.job_id == job_id, Artifact.kind == kind)) is not None


def latest_of_kind(session: Session, user: User, dataset_id: int, kind: str) -> tuple[Job | None, Job | None]:
    """(the dataset's newest job of `kind` that the user may see, any status; its newest that succeeded)."""
    q = select(Job).where(Job.dataset_id == dataset_id, access.visible_to(Job, user), Job.kind == kind)
    newest = session.scalars(q.order_by(Job.id.desc()).limit(1)).first()
    done = newest if newest is not None and newest.status == JobStatus.succeeded.value else \
        session.scalars(q.where(Job.status == JobStatus.succeeded.value).order_by(Job.id.desc()).limit(1)).first()
    return newest, done


def summary(job: Job | None) -> dict | None:
    """A job's state in a few fields: the `job` of the answers about a dataset's comparisons and searches."""
    if job is None:
        return None
    return {"id": job.id, "status": job.status, "progress": job.progress, "stage": job.stage,
            "eta_seconds": job.eta_seconds, "error": job.error, "spec": job.spec,
            "created_at": job.created_at, "finished_at": job.finished_at}
