"""Backbone leaderboard ("probe") and strategy advice of a dataset."""
from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.schemas import JobBrief, JobOut, errors
from app.core.errors import NotFound
from app.services import datasets as dataset_service
from app.services import probe as service
from domain.results import DomainGap, ProbeRow
from domain.spec import ProbeSpec

router = APIRouter(prefix="/api/v1/datasets", tags=["probe"], responses=errors(401, 422))


class AdviceOut(BaseModel):
    strategy: str
    reason: str
    epochs: int
    per_class: float
    smallest: int
    source: Literal["size", "measured"]
    domain: Literal["near", "distant"] | None
    measured: dict[str, Any] | None
    hint: str | None


class ProbeJobOut(JobBrief):
    """The newest backbone comparison."""


class ProbeOut(BaseModel):
    dataset_id: int
    job: ProbeJobOut
    result_job_id: int | None
    leaderboard: list[ProbeRow] = Field(description="Best val accuracy first; failed backbones last.")
    measured: DomainGap | None = Field(description="The advisor's measurement, when it ran.")
    seconds: float | None
    device: str | None
    advice: AdviceOut


@router.post("/{dataset_id}/probe", status_code=201, response_model=JobOut, responses=errors(400, 403, 404, 409, 503))
def start_probe(dataset_id: int, session: SessionDep, settings: SettingsDep, user: CurrentUser, response: Response,
                body: ProbeSpec | None = None):
    """Compare backbones on this dataset: for each (default: every one whose pretrained weights are on this
    server) the frozen features are computed (and cached: a later `features` job on the same dataset and
    backbone reuses them), a linear classifier is fitted on them, and the backbones are ranked by val accuracy.
    With `advise` (default), a short fine-tune of the last block on a sample then measures how far the images
    are from ImageNet, for the strategy advice. Queued as a job (kind "probe"): follow it like any job; read the
    result with GET /api/v1/datasets/{dataset_id}/probe."""
    job = service.start(session, settings, user, dataset_id, body or ProbeSpec())
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return JobOut.model_validate(job)


@router.get("/{dataset_id}/probe", response_model=ProbeOut, response_model_exclude_unset=True,
            responses=errors(404))
def get_probe(dataset_id: int, session: SessionDep, user: CurrentUser):
    """The newest backbone comparison of the dataset (`job`, maybe still running), the leaderboard of the newest
    one that succeeded (best val accuracy first, with the seconds each backbone took and the model's size),
    the advisor's measurement, and the strategy advice it gives."""
    v = service.view(session, user, dataset_id)
    if v["job"] is None:
        raise NotFound(f"dataset {dataset_id} has no backbone comparison yet: start one with "
                       f"POST /api/v1/datasets/{dataset_id}/probe")
    return v


@router.get("/{dataset_id}/advice", response_model=AdviceOut, responses=errors(404))
def get_advice(dataset_id: int, session: SessionDep, user: CurrentUser):
    """Which training strategy suits the dataset, with the reason in plain words: measured when a backbone
    comparison with the advisor has succeeded (`source` "measured"), else from the data size alone (`source`
    "size", with a `hint` on how to measure). A recommendation only: any strategy can be chosen."""
    ds = dataset_service.get_owned(session, user, dataset_id)
    _, done = service.latest(session, user, ds)
    return service.advice(ds, done).to_dict()
