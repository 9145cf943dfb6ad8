"""GET /api/v1/jobs/compare: two or more succeeded jobs of one dataset side by side. Included before the
jobs router, whose /{job_id} would otherwise take "compare" for an id."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import CurrentUser, SessionDep
from app.api.schemas import CompareOut, errors
from app.services import compare as service

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], responses=errors(401, 422))


@router.get("/compare", response_model=CompareOut, responses=errors(400, 404, 409))
def compare_jobs(session: SessionDep, user: CurrentUser,
                 ids: Annotated[list[str] | None, Query(
                     description="Job ids, comma-separated (or the parameter repeated): 2 to 8 succeeded jobs of "
                                 "one dataset; the first is the baseline.", examples=["3,5"])] = None):
    """Compare jobs trained on the same dataset: each job's parameters (`spec`), metrics with a bootstrap
    95% interval on val accuracy, per-epoch curves; the parameters that differ; per-class F1 and its
    difference from the baseline (the first job); and for each other job the difference in val accuracy
    from the baseline with its 95% interval (paired bootstrap over the same val images when both jobs
    stored per-image predictions, otherwise each val set resampled on its own) and a sentence saying
    whether it is real or within noise. 400: bad ids; 404: a job is not yours; 409: a job has not
    succeeded; 422: the jobs are on different datasets."""
    return service.compare(session, user, ids)
