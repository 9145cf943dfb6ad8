"""Searches for wrong labels ("label issues") of a dataset, and the suspects they found. Torch-free.

A search is a job like a backbone comparison (queued, claimed by a worker, progress and events, cancel,
delete) whose `kind` is "label_issues" and whose spec is a LabelIssueSpec; worker.labeljob runs the engine's
finder (worker/engine/labels.py) and stores its LabelIssueReport as the job's result. Each suspect names its
image by the path inside the dataset as uploaded (e.g. `train/8/00007.png`): the names a new version of the
dataset (app.services.versions) takes to relabel or remove it.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, NotFound, Unprocessable
from app.core.settings import Settings
from app.db.models import FINAL_STATUSES, Dataset, Job, JobKind, JobStatus, User
from app.services import access, lifecycle
from app.services import datasets as dataset_service
from app.services import jobs as job_service
from domain.catalog import CATALOG
from domain.results import LabelIssue, LabelIssueReport
from domain.spec import LabelIssueSpec

LABEL_ISSUES = JobKind.label_issues.value


def start(session: Session, settings: Settings, user: User, dataset_id: int, spec: LabelIssueSpec) -> Job:
    """Queue a search for the dataset's wrong labels (editors of its workspace; one at a time per dataset)."""
    ds = dataset_service.get_owned(session, user, dataset_id, access.EDIT, "looking for label issues")
    if ds.task == "multilabel":
        raise Unprocessable(f"dataset {ds.id} is multi-label: the search for wrong labels works on one class per "
                            "image (folder layouts), not on a labels.csv yet; a trained job's page lists the "
                            "validation images with a missed or a false label")
    running = session.scalar(select(Job.id).where(Job.dataset_id == ds.id, Job.kind == LABEL_ISSUES,
                                                  Job.status.not_in(FINAL_STATUSES)))
    if running is not None:
        raise Conflict(f"a search for label issues of dataset {ds.id} is already under way (job {running}): wait "
                       f"for it (GET /api/v1/datasets/{ds.id}/label-issues) or cancel it (POST "
                       f"/api/v1/jobs/{running}/cancel)", {"job_id": running})
    entry = CATALOG.get(spec.backbone)
    if entry is None:
        raise Unprocessable(f"unknown backbone {spec.backbone!r}: choose one of {', '.join(CATALOG)} "
                            "(GET /api/v1/backbones)")
    if not entry.weights_available():
        raise Unprocessable(f"pretrained weights for {spec.backbone} are not on this server: import them with "
                            f"`graft weights import FILE --backbone {spec.backbone}`, or pick a backbone whose "
                            "weights are available (GET /api/v1/backbones)", {"unavailable": [spec.backbone]})
    job = Job(owner_id=user.id, workspace_id=ds.workspace_id, dataset_id=ds.id, kind=LABEL_ISSUES,
              spec=spec.model_dump(), status=JobStatus.queued.value, total_epochs=0)
    lifecycle.create(session, job)
    job_service.enqueue(session, settings, job)
    return job


def latest(session: Session, user: User, ds: Dataset) -> tuple[Job | None, Job | None]:
    """(the dataset's newest search of any status, its newest succeeded search)."""
    return job_service.latest_of_kind(session, user, ds.id, LABEL_ISSUES)


def stored(job: Job | None) -> LabelIssueReport | None:
    """The search's stored report, typed (None: no job, no result yet, or an unreadable old one)."""
    return LabelIssueReport.from_stored(job.result) if job is not None else None


def image_url(job_id: int, n: int, other: bool = False) -> str:
    """The thumbnail of suspect `n` of the job (`other`: of the duplicate it was paired with)."""
    return f"/api/v1/jobs/{job_id}/label-issues/{n}{'/other' if other else ''}.jpg"


def issues_out(job: Job, report: LabelIssueReport) -> list[dict[str, Any]]:
    """The suspects, most likely mislabelled first, each with the URLs of its thumbnails."""
    return [{**it.model_dump(mode="json"), "image_url": image_url(job.id, n),
             "other_image_url": image_url(job.id, n, other=True) if it.other_file else None}
            for n, it in enumerate(report.issues)]


def issue(session: Session, user: User, job_id: int, n: int) -> tuple[Job, LabelIssue]:
    """Suspect `n` (from 0) of a search the user may see; 404 otherwise."""
    job = job_service.get_owned(session, user, job_id)
    report = stored(job) if job.kind == LABEL_ISSUES else None
    issues = report.issues if report is not None else []
    if not 0 <= n < len(issues):
        raise NotFound(f"job {job_id} has no suspect label number {n}"
                       + (f" (it has {len(issues)}, from 0)" if issues else ""))
    return job, issues[n]


REPORT_FIELDS = ("n_images", "n_classes", "n_flagged", "classes", "method", "folds", "oof_acc", "backbone",
                 "image_size", "cached", "seconds", "device", "skipped", "warnings")


def view(session: Session, user: User, dataset_id: int) -> dict[str, Any]:
    """What GET /api/v1/datasets/{id}/label-issues answers: the newest search (`job`, `status`) and the
    suspects of the newest one that succeeded (`result_job_id`), most likely mislabelled first."""
    ds = dataset_service.get_owned(session, user, dataset_id)
    newest, done = latest(session, user, ds)
    if newest is None:
        raise NotFound(f"dataset {ds.id} has not been searched for label issues yet: start a search with "
                       f"POST /api/v1/datasets/{ds.id}/label-issues")
    report = stored(done)
    out: dict[str, Any] = {"dataset_id": ds.id, "status": newest.status, "job": job_service.summary(newest),
                           "result_job_id": done.id if done is not None and report is not None else None,
                           "issues": issues_out(done, report) if done is not None and report is not None else []}
    if report is not None:
        out.update({k: getattr(report, k) for k in REPORT_FIELDS})
    return out
