"""API schemas (Pydantic), kept apart from the ORM models."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

from domain.spec import RunSpec


def _utc(t: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes (stored as UTC), PostgreSQL aware ones in the session's zone:
    the API always answers in UTC with an explicit offset, so clients never read them as local time."""
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


UTCDatetime = Annotated[dt.datetime, AfterValidator(_utc)]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    error: ErrorBody


ERROR_TEXT = {400: "The request is malformed or its content unusable", 401: "No valid token or session",
              404: "No such object, or it belongs to another user", 405: "Method not allowed",
              409: "The object's state does not allow this", 413: "The request body is larger than the limit",
              422: "Invalid parameters", 503: "A backing service (job queue, inference) cannot be reached"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses: every error answers {"error": {code, message, details}}."""
    return {c: {"model": ErrorOut, "description": ERROR_TEXT[c]} for c in codes}


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    warnings: list[str]
    num_images: int
    size_bytes: int
    created_at: UTCDatetime


class JobCreate(RunSpec):
    """The run's parameters (every field has a default) plus the dataset to train on."""

    dataset_id: int


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    dataset_id: int
    kind: str = "train"  # "train", or "probe" (a backbone comparison: spec is a ProbeSpec)
    status: str
    progress: float
    stage: str | None
    current_epoch: int
    total_epochs: int
    eta_seconds: float | None
    best_val_acc: float | None
    error: str | None
    cancel_requested: bool
    attempts: int = 0  # times a worker started the job (more than 1: it was recovered after a fault)
    spec: dict[str, Any]
    result: dict[str, Any] | None
    created_at: UTCDatetime
    started_at: UTCDatetime | None
    finished_at: UTCDatetime | None


    @field_validator("result")
    @classmethod
    def _lean_result(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # each val image's classes stay out of job listings (polled by the dashboard): they grow with the
        # val set; /evaluation and /jobs/compare serve them
        report = (v or {}).get("report")
        if isinstance(report, dict) and ("y_true" in report or "y_pred" in report):
            v = {**v, "report": {k: x for k, x in report.items() if k not in ("y_true", "y_pred")}}
        return v


class EpochMetricOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    epoch: int
    phase: str
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    images_per_s: float
    seconds: float
    elapsed: float
    eta: float
    is_best: bool


class BackboneOut(BaseModel):
    name: str
    description: str
    params: int
    image_size: int
    pretrained_available: bool
    weights_file: str
    weights_url: str | None
