"""Page parts of the backbone comparison: the dataset page's "Compare backbones" card, the page of a probe job,
and the advice the new-job page shows. Never imports torch."""
from __future__ import annotations

from fastapi import Request
from sqlalchemy.orm import Session

from app.db.models import FINAL_STATUSES, Dataset, Job, JobStatus, User
from app.services import probe as probe_service
from app.web.render import render
from domain.advice import STRATEGIES


def dataset_context(session: Session, user: User, ds: Dataset) -> dict:
    """What the dataset page and the new-job page need: the newest probe, the newest leaderboard, the advice."""
    newest, done = probe_service.latest(session, user, ds)
    return {
        "probe_job": newest,
        "probe_done": done,
        "probe_active": newest is not None and newest.status not in FINAL_STATUSES,
        "leaderboard": probe_service.leaderboard(done),
        "measured": probe_service.measured(done),
        "advice": probe_service.advice(ds, done),
        "best_backbone": probe_service.best_backbone(done),
        "available_backbones": probe_service.available_backbones(),
    }


def job_page(request: Request, job: Job, user: User, can_edit: bool = True):
    """The page of a probe job: its progress while it runs, then its leaderboard and the advice."""
    ds = job.dataset
    result = probe_service.stored(job)
    done = job if job.status == JobStatus.succeeded.value else None
    return render(request, "probe_job.html", {
        "nav": "job", "job": job, "ds": ds, "result": result if result is not None else {}, "final": job.status in FINAL_STATUSES,
        "leaderboard": probe_service.leaderboard(job), "measured": probe_service.measured(job),
        "advice": probe_service.advice(ds, done) if done is not None else None, "strategies": STRATEGIES,
        "can_edit": can_edit,
        "page_data": {"id": job.id, "dataset_id": ds.id, "status": job.status, "final": job.status in FINAL_STATUSES},
    }, user=user)
