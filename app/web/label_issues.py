"""Page parts of the search for wrong labels: the dataset page's "Label issues" card and the review page
(`/datasets/{id}/label-issues` for the newest search, `/jobs/{id}` for one search), where each suspect is
accepted, relabelled, removed or kept, and the choices become a new version of the dataset. Never imports
torch."""
from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from app.api.deps import SessionDep
from app.db.models import FINAL_STATUSES, Dataset, Job, JobStatus, User
from app.services import access
from app.services import datasets as dataset_service
from app.services import label_issues as service
from app.web.render import SignedIn, _not_found, page_object, render

router = APIRouter(include_in_schema=False)

REASONS = {"confident_learning": "the cross-validated classifiers are confident of another class",
           "exact_duplicate": "the same file is filed under another class",
           "near_duplicate": "a near-identical image is filed under another class"}


def dataset_context(session: Session, user: User, ds: Dataset) -> dict:
    """What the dataset page's card needs: the newest search, and the suspects of the newest that succeeded."""
    newest, done = service.latest(session, user, ds)
    report = service.stored(done)
    return {"label_job": newest, "label_done": done if report is not None else None,
            "label_active": newest is not None and newest.status not in FINAL_STATUSES,
            "label_suspects": len(report.issues) if report is not None else 0}


@router.get("/datasets/{dataset_id}/label-issues")
def review_page(dataset_id: str, request: Request, session: SessionDep, user: SignedIn):
    """The newest search of the dataset: its progress while it runs, then the newest suspects to review."""
    ds = page_object(dataset_service.get_owned, session, user, dataset_id)
    if ds is None:
        return _not_found(request, user, f"dataset {dataset_id}")
    newest, done = service.latest(session, user, ds)
    return _page(request, session, user, ds, newest, done)


def job_page(request: Request, session: Session, job: Job, user: User):
    """The page of one search (its job page): the same review page, for that search's suspects."""
    return _page(request, session, user, job.dataset, job, job if job.status == JobStatus.succeeded.value else None)


def _page(request: Request, session: Session, user: User, ds: Dataset, job: Job | None, done: Job | None):
    report = service.stored(done)
    issues = service.issues_out(done, report) if done is not None and report is not None else []
    can_edit = access.allows(access.role_of(session, user, ds.workspace_id), access.EDIT)
    final = job is None or job.status in FINAL_STATUSES
    return render(request, "label_issues.html", {
        "nav": "dataset", "ds": ds, "job": job, "done": done, "report": report, "issues": issues,
        "reasons": REASONS, "final": final, "can_edit": can_edit,
        "page_data": {"dataset_id": ds.id, "job_id": job.id if job is not None else None,
                      "status": job.status if job is not None else None, "final": final, "can_edit": can_edit,
                      "classes": list(ds.classes),
                      "issues": [{"file": i["file"], "given": i["given"], "suggested": i["suggested"]}
                                 for i in issues]},
    }, user=user)
