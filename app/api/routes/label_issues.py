"""Wrong labels of a dataset: start a search, read its suspects, see their thumbnails."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.schemas import JobBrief, JobOut, errors
from app.core.errors import NotFound
from app.services import label_issues as service
from app.services import thumbs
from domain.results import LabelIssue
from domain.spec import LabelIssueSpec

router = APIRouter(prefix="/api/v1", tags=["label issues"], responses=errors(401, 422))
JPEG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/jpeg": {}}}}


class LabelIssueJobOut(JobBrief):
    """The newest search for wrong labels."""


class LabelIssueOut(LabelIssue):
    image_url: str = Field(description="A JPEG thumbnail of the image.")
    other_image_url: str | None = Field(None, description="A thumbnail of other_file (duplicates only).")


class LabelIssuesOut(BaseModel):
    dataset_id: int
    status: str = Field(description="The newest search's status: queued | running | succeeded | failed | cancelled.")
    job: LabelIssueJobOut = Field(description="The newest search (maybe still running).")
    result_job_id: int | None = Field(description="The search the issues come from: the newest that succeeded.")
    issues: list[LabelIssueOut] = Field(description="Most likely mislabelled first.")
    n_images: int | None = None
    n_classes: int | None = None
    n_flagged: int | None = Field(None, description="Suspects found (issues holds at most max_issues of them).")
    classes: list[str] | None = None
    method: str | None = None
    folds: int | None = None
    oof_acc: float | None = Field(None, description="Accuracy of the out-of-fold predictions against the given "
                                                    "labels.")
    backbone: str | None = None
    image_size: int | None = None
    cached: bool | None = None
    seconds: float | None = None
    device: str | None = None
    skipped: list[str] | None = None
    warnings: list[str] | None = None


@router.post("/datasets/{dataset_id}/label-issues", status_code=201, response_model=JobOut,
             responses=errors(400, 403, 404, 409, 503))
def start_label_issues(dataset_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser,
                       response: Response, body: LabelIssueSpec | None = None):
    """Look for images filed under the wrong class: the frozen features of every image (cached, shared with
    a backbone comparison or a `features` job of the same settings), linear classifiers cross-validated on
    them for out-of-fold class probabilities, confident learning to rank the suspects, and (near-)duplicates
    filed under different classes. Queued as a job (kind "label_issues"): follow it like any job; read the
    suspects with GET /api/v1/datasets/{dataset_id}/label-issues, and fix them with POST
    /api/v1/datasets/{dataset_id}/versions."""
    job = service.start(session, settings, user, dataset_id, body or LabelIssueSpec())
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return JobOut.model_validate(job)


@router.get("/datasets/{dataset_id}/label-issues", response_model=LabelIssuesOut, responses=errors(404))
def get_label_issues(dataset_id: int, session: SessionDep, user: CurrentUser):
    """The newest search for wrong labels of the dataset (`job`, `status`: maybe still running) and the suspects
    of the newest one that succeeded, most likely mislabelled first: each image by its path inside the dataset
    as uploaded, the class it is filed under (`given`), the one it probably belongs to (`suggested`), a score,
    the reason, and a thumbnail."""
    return service.view(session, user, dataset_id)


@router.get("/jobs/{job_id}/label-issues/{n}.jpg", response_class=Response, responses={**JPEG, **errors(404)})
def label_issue_image(job_id: int, n: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """A thumbnail of the n-th suspect (from 0) of a search for wrong labels."""
    job, it = service.issue(session, user, job_id, n)
    return _jpeg(thumbs.file_thumbnail(settings, job.dataset, it.file))


@router.get("/jobs/{job_id}/label-issues/{n}/other.jpg", response_class=Response,
            responses={**JPEG, **errors(404)})
def label_issue_other_image(job_id: int, n: int, session: SessionDep, settings: SettingsDep, user: CurrentUser):
    """A thumbnail of the image the n-th suspect duplicates (duplicates filed under another class only)."""
    job, it = service.issue(session, user, job_id, n)
    if it.other_file is None:
        raise NotFound(f"suspect {n} of job {job_id} is no duplicate: it has no other image")
    return _jpeg(thumbs.file_thumbnail(settings, job.dataset, it.other_file))


def _jpeg(data: bytes) -> Response:
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
