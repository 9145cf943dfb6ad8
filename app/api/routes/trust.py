"""A job's operating point: the calibrated confidence below which its predictions abstain."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.schemas import errors
from app.services import operating_point as service

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], responses=errors(401, 422))


class OperatingPointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    confidence_threshold: float = Field(ge=0, le=1, description="Predictions whose calibrated top probability is "
                                                                "below this abstain (0: always answer).")


class OperatingPointOut(BaseModel):
    threshold: float
    coverage: float | None = Field(None, description="Share of the val images answered at this threshold.")
    accuracy_when_answered: float | None = None
    false_accept_rate: float | None = Field(None, description="Share of the dataset's images of no class (its "
                                                              "`_junk/` folder) still answered at this threshold; "
                                                              "null without such images.")
    default_threshold: float | None = Field(None, description="The threshold training chose.")
    set_by: str | None = None
    set_at: str | None = None


@router.put("/{job_id}/operating-point", response_model=OperatingPointOut, responses=errors(400, 403, 404, 409))
def put_operating_point(job_id: int, body: OperatingPointIn, session: SessionDep, settings: SettingsDep,
                        user: CurrentUser) -> Any:
    """Move the job's operating point along its val coverage-accuracy curve (GET .../evaluation, `abstain.curve`):
    used by every prediction through the API from now on and written into the model card (editors)."""
    return service.set_point(session, settings, user, job_id, body.confidence_threshold)


class LabelThresholdsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        min_length=1, description="Label -> threshold (0..1): a label is given when its probability is at or "
                                  "above it. Labels left out keep theirs.")


class LabelThresholdsOut(BaseModel):
    thresholds: dict[str, float] = Field(description="Every label's threshold now.")
    metrics: dict[str, float] | None = Field(None, description="micro_f1, macro_f1, mAP, subset_accuracy on the "
                                                               "val images at these thresholds.")
    default_thresholds: dict[str, float] | None = Field(None, description="The thresholds training tuned.")
    set_by: str | None = None
    set_at: str | None = None


@router.put("/{job_id}/thresholds", response_model=LabelThresholdsOut, responses=errors(400, 403, 404, 409))
def put_label_thresholds(job_id: int, body: LabelThresholdsIn, session: SessionDep, settings: SettingsDep,
                         user: CurrentUser) -> Any:
    """Move a multi-label job's per-label thresholds: used by every prediction through the API from now on and
    written into the model card (editors)."""
    return service.set_label_thresholds(session, settings, user, job_id, body.thresholds)
