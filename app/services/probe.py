"""Backbone comparisons ("probes") of a dataset and the strategy advice built on them. Torch-free.

A probe is a job like any other (queued, claimed by a worker, progress and events, cancel, delete) whose
`kind` is "probe" and whose spec is a ProbeSpec; its result holds the leaderboard and the advisor's
measurement. The advice is computed when it is read, from that measurement and the dataset's counts.
"""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, Unprocessable
from app.core.settings import Settings
from app.db.models import FINAL_STATUSES, Dataset, Job, JobKind, JobStatus, User
from app.services import access, lifecycle
from app.services import datasets as dataset_service
from app.services import jobs as job_service
from domain.advice import Advice, recommend_strategy
from domain.catalog import CATALOG
from domain.results import DomainGap, ProbeResult, ProbeRow
from domain.spec import ProbeSpec

PROBE = JobKind.probe.value


def available_backbones() -> list[str]:
    return [e.name for e in CATALOG.values() if e.weights_available()]


def start(session: Session, settings: Settings, user: User, dataset_id: int, spec: ProbeSpec) -> Job:
    """Queue a probe of the dataset. The backbones are resolved now (default: every one whose pretrained
    weights are on this server), so that the job's record says what it compared."""
    ds = dataset_service.get_owned(session, user, dataset_id, access.EDIT, "comparing backbones")
    running = session.scalar(select(Job.id).where(Job.dataset_id == ds.id,
                                                  Job.kind == PROBE, Job.status.not_in(FINAL_STATUSES)))
    if running is not None:
        raise Conflict(f"a backbone comparison of dataset {ds.id} is already under way (job {running}): wait for "
                       f"it (GET /api/v1/datasets/{ds.id}/probe) or cancel it (POST /api/v1/jobs/{running}/cancel)",
                       {"job_id": running})
    names = spec.backbones
    if names is not None:
        unknown = [n for n in names if n not in CATALOG]
        if unknown:
            raise Unprocessable(f"unknown backbone(s) {', '.join(map(repr, unknown))}: choose from "
                                f"{', '.join(CATALOG)} (GET /api/v1/backbones)")
        missing = [n for n in names if not CATALOG[n].weights_available()]
        if missing and not spec.random_init:
            raise Unprocessable(
                f"pretrained weights for {', '.join(missing)} are not on this server: import them with "
                "`graft weights import FILE --backbone NAME`, leave them out, or set random_init=true to probe "
                "them from random weights", {"unavailable": missing})
    else:
        names = available_backbones()
        if not names:
            raise Unprocessable("no backbone has its pretrained weights on this server, so there is nothing to "
                                "compare: import some with `graft weights import FILE --backbone NAME` "
                                "(GET /api/v1/backbones lists them)")
    spec = spec.model_copy(update={"backbones": names})
    job = Job(owner_id=user.id, workspace_id=ds.workspace_id, dataset_id=ds.id, kind=PROBE, spec=spec.model_dump(), status=JobStatus.queued.value,
              total_epochs=0)
    lifecycle.create(session, job)
    job_service.enqueue(session, settings, job)
    return job


def latest(session: Session, user: User, ds: Dataset) -> tuple[Job | None, Job | None]:
    """(the dataset's newest probe of any status, its newest succeeded probe)."""
    return job_service.latest_of_kind(session, user, ds.id, PROBE)


def stored(job: Job | None) -> ProbeResult | None:
    """The probe job's stored result, typed (None: no job, no result yet, or an unreadable old one)."""
    return ProbeResult.from_stored(job.result) if job is not None else None


def leaderboard(job: Job | None) -> list[ProbeRow]:
    result = stored(job)
    return result.rows if result is not None else []


def measured(job: Job | None) -> DomainGap | None:
    result = stored(job)
    return result.measured if result is not None else None


def advice(ds: Dataset, done: Job | None) -> Advice:
    """The strategy advice for the dataset: measured when a probe with the advisor has succeeded, else by size."""
    m = measured(done)
    return recommend_strategy(ds.counts or {}, m.to_json() if m is not None else None)


def best_backbone(done: Job | None) -> str | None:
    """The top pretrained backbone of the leaderboard whose weights are (still) available, if any."""
    for r in leaderboard(done):
        if r.error is None and r.pretrained and r.backbone in CATALOG and CATALOG[r.backbone].weights_available():
            return r.backbone
    return None


def view(session: Session, user: User, dataset_id: int) -> dict:
    """What GET /api/v1/datasets/{id}/probe answers: the newest probe, the newest leaderboard and the advice."""
    ds = dataset_service.get_owned(session, user, dataset_id)
    newest, done = latest(session, user, ds)
    result = stored(done)
    return {
        "dataset_id": ds.id,
        "job": job_service.summary(newest),
        "result_job_id": done.id if done is not None else None,
        "leaderboard": leaderboard(done),
        "measured": measured(done),
        "seconds": result.seconds if result is not None and "seconds" in result.model_fields_set else None,
        "device": result.device if result is not None and "device" in result.model_fields_set else None,
        "advice": advice(ds, done).to_dict(),
    }
