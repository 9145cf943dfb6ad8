"""API schemas (Pydantic), kept apart from the ORM models."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from domain.clock import as_utc
from domain.results import EvaluationReport, ExportCheck, Mistake
from domain.spec import RunSpec

# the API always answers in UTC with an explicit offset, so clients never read times as local
UTCDatetime = Annotated[dt.datetime, AfterValidator(as_utc)]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    error: ErrorBody


ERROR_TEXT = {400: "The request is malformed or its content unusable", 401: "No valid token or session",
              403: "Your role in the workspace does not allow this", 429: "Too many failed attempts: wait",
              404: "No such object, or it belongs to another user", 405: "Method not allowed",
              409: "The object's state does not allow this", 413: "The request body is larger than the limit",
              422: "Invalid parameters", 503: "A backing service (job queue, inference) cannot be reached"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses: every error answers {"error": {code, message, details}}."""
    return {c: {"model": ErrorOut, "description": ERROR_TEXT[c]} for c in codes}


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    workspace_id: int
    name: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    warnings: list[str]
    num_images: int
    size_bytes: int
    created_at: UTCDatetime
    parent_id: int | None = Field(None, description="The dataset this version was made from (None: an upload)")
    version: int = Field(1, description="The number within its family of versions (1: the upload)")
    changes: dict[str, Any] | None = Field(None, description="What changed from the parent: relabelled "
                                           "[{file, from, to, new_file}], removed [files], added [files], counts")
    task: str = Field("multiclass", description="multiclass (one class per image: the folder layouts) or "
                      "multilabel (any number of labels per image: a labels.csv manifest)")
    label_stats: dict[str, Any] | None = Field(None, description="Multi-label only: labels_per_image (mean), "
                                               "no_label (images with none), images {train, val} (counts are per "
                                               "label), cooccurrence {labels, matrix: images with both labels}")


class DatasetVersionCreate(BaseModel):
    """Changes to a dataset, applied to a new version of it (the dataset itself never changes). Files are
    named by their path inside the dataset as uploaded, e.g. train/8/00007.png."""

    model_config = ConfigDict(extra="forbid")
    relabel: dict[Annotated[str, Field(min_length=1, max_length=1000)], Annotated[str, Field(min_length=1,
                  max_length=200)]] = Field(default_factory=dict, description="{file: its right class}")
    remove: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(
        default_factory=list, max_length=1_000_000, description="Files to leave out")
    uploads: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=10_000, description="Finished resumable uploads (zips or tars laid out "
                                                             "like the dataset) whose images are added")
    name: str | None = Field(None, max_length=1000, description="A name (default: the parent's)")


class DatasetFromUploads(BaseModel):
    """A dataset from finished resumable uploads (POST /api/v1/uploads), each a zip or tar of a part of it;
    or imported from where the images already are (`source`)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=1000, description="A name for the dataset (default: its top folder's)")
    uploads: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, min_length=1, max_length=10_000, description="The upload ids, in the order to extract them")
    source: str | None = Field(None, min_length=2, max_length=2000, description=(
        "Instead of uploads: s3://bucket/prefix/ (object storage, with the server's AWS_* credentials) or a "
        "folder on the server under GRAFT_IMPORT_ROOTS (admins only)"))
    workspace_id: int | None = Field(None, ge=1, le=2**31 - 1,
                                     description="Where it goes (default: your personal workspace)")

    @model_validator(mode="after")
    def _one_of(self) -> DatasetFromUploads:
        if (self.uploads is None) == (self.source is None):
            raise ValueError("give either uploads (resumable upload ids) or source (where the images are)")
        return self


class JobCreate(RunSpec):
    """The run's parameters (every field has a default) plus the dataset to train on."""

    dataset_id: int
    workspace_id: int | None = Field(None, description="Must be the dataset's workspace (the default).")


class JobBrief(BaseModel):
    """A job in a few fields: what a dataset's probe or label-issue search shows of the job behind it."""

    id: int
    status: str
    progress: float
    stage: str | None
    eta_seconds: float | None
    error: str | None
    spec: dict[str, Any]
    created_at: UTCDatetime
    finished_at: UTCDatetime | None


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    workspace_id: int
    dataset_id: int
    dataset_version: int = Field(1, description="The version of the dataset the job trained on (1: as uploaded; "
                                 "later versions come from POST /api/v1/datasets/{id}/versions)")
    kind: str = "train"  # train | probe (ProbeSpec) | label_issues (LabelIssueSpec) | batch_predict (app.services.batch_predict)
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
    stale: bool = Field(False, description="True when the job is running but its worker has sent no heartbeat "
                        "for longer than GRAFT_HEARTBEAT_TIMEOUT_S: it is re-queued at the next reconcile round and "
                        "resumes from its last checkpoint; its ETA is meaningless meanwhile")
    status_note: str | None = Field(None, description="A sentence about the status that the status alone does "
                                    "not say (a stale job: its worker stopped responding), or null")

    @field_validator("result")
    @classmethod
    def _lean_result(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # each val image's classes stay out of job listings (polled by the dashboard): they grow with the
        # val set; /evaluation and /jobs/compare serve them
        report = (v or {}).get("report")
        if v is not None and isinstance(report, dict) and ("y_true" in report or "y_pred" in report):
            v = {**v, "report": {k: x for k, x in report.items() if k not in ("y_true", "y_pred")}}
        # a label-issue search's suspects (up to max_issues) likewise: GET /api/v1/datasets/{id}/label-issues
        if v is not None and isinstance(v.get("issues"), list):
            v = {**v, "issues": [], "n_issues": len(v["issues"])}
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


# ---------------------------------------------------------------- results: evaluation, predictions, comparison


class MistakeOut(Mistake):
    image_url: str = Field(description="A thumbnail of the image (GET).")


class EvaluationOut(EvaluationReport):
    """GET /api/v1/jobs/{id}/evaluation: the evaluation report on the val set, with links and the exports."""

    job_id: int
    mistakes: list[MistakeOut] = Field(default_factory=list,  # type: ignore[assignment]
                                       description="Most confident mistakes first.")
    confusion_matrix_png: str = Field(description="The confusion matrix as a picture (GET).")
    exports: list[ExportCheck] = Field(default_factory=list)
    calibration: dict[str, Any] | None = Field(
        None, description="Temperature scaling fitted on the val set: temperature, ece_before, ece_after (cross-"
                          "fitted: each val image's calibrated confidence comes from a temperature fitted without "
                          "it), bins_before/bins_after (the reliability diagram's bins). Every probability Graft "
                          "returns for this job is calibrated. Absent for jobs trained before it was fitted.")
    abstain: dict[str, Any] | None = Field(
        None, description="The operating point below which predictions abstain: threshold (calibrated "
                          "confidence), coverage (share of val images answered), accuracy_when_answered, the "
                          "coverage-accuracy curve it was chosen on, and false_accept_rate (share of the dataset's "
                          "images of no class, its `_junk/` folder, still answered; only when it has one).")
    ood: dict[str, Any] | None = Field(
        None, description="The out-of-distribution check on the frozen features (method, threshold, the share of "
                          "val images it flags); `junk` (images, flagged, abstained, false_accept_rate) is null unless the "
                          "dataset has images of no class (a `_junk/` folder beside train/ and val/) to measure it on.")
    reliability_png: str | None = Field(None, description="The reliability diagram, before and after (GET).")


class ClassProbability(BaseModel):
    class_: str = Field(alias="class", serialization_alias="class")
    probability: float

    model_config = ConfigDict(populate_by_name=True)


class Prediction(BaseModel):
    """One image: its top-k classes, or why it could not be classified (that image alone fails)."""

    model_config = ConfigDict(extra="allow")
    file: str
    top: list[ClassProbability] | None = Field(None, description="Most probable first (calibrated "
                                                                 "probabilities when the job has a temperature).")
    error: str | None = None
    abstained: bool | None = Field(None, description="True when the model does not answer: the image is unlike "
                                   "the training images (ood_score above the job's threshold) or its calibrated "
                                   "confidence is below the job's operating point.")
    ood_score: float | None = Field(None, description="Out-of-distribution score (distance to the training "
                                    "images' features; higher: less like them); null for older models.")
    abstain_reason: str | None = None
    heatmap_png: str | None = Field(None, description="With explain=true: a base64 grayscale PNG at the image's "
                                    "size, brighter where the evidence for the top class is (Grad-CAM).")
    labels: list[ClassProbability] | None = Field(None, description="Multi-label models: the labels at or above "
                                                  "their thresholds, most probable first (maybe none).")
    probabilities: dict[str, float] | None = Field(None, description="Multi-label models: every label's "
                                                   "probability (sigmoid).")


class PredictOut(BaseModel):
    job_id: int
    results: list[Prediction] = Field(description="One per image sent, in order.")


class CompareMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    val_acc: float
    val_acc_low: float = Field(description="Bootstrap 95% interval of val accuracy.")
    val_acc_high: float
    val_images: int
    val_right: int
    macro_f1: float | None = None
    micro_f1: float | None = Field(None, description="Multi-label jobs: micro F1, with micro_f1_low/high (95%).")
    mAP: float | None = Field(None, description="Multi-label jobs: mean average precision, with mAP_low/high.")
    val_loss: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    seconds: float | None = None
    device: str | None = None
    top_k: dict[str, float] = Field(default_factory=dict)


class CompareJob(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    status: str
    created_at: str | None = Field(None, description="ISO 8601, UTC.")
    finished_at: str | None = None
    spec: dict[str, Any]
    metrics: CompareMetrics
    per_image: bool = Field(description="Whether per-image predictions are stored (paired comparison).")
    val_set: str | None = None
    curves: list[dict[str, Any]] = Field(description="Per-epoch train and val loss and accuracy.")


class CompareParameter(BaseModel):
    name: str
    values: list[Any]
    text: list[str]
    differs: bool


class CompareClass(BaseModel):
    model_config = ConfigDict(extra="allow")
    class_: str = Field(alias="class", serialization_alias="class")
    support: int | None = None
    f1: list[float | None]
    diff: list[float | None] = Field(description="F1 minus the baseline's (None for the baseline).")


class CompareDifference(BaseModel):
    """One job against the baseline: its val accuracy minus the baseline's, with a 95% interval."""

    model_config = ConfigDict(extra="allow")
    job_id: int
    baseline_id: int
    method: str = Field(description="paired (same val images, per-image predictions) | independent")
    difference: float
    low: float
    high: float
    images: int
    real: bool = Field(description="Whether the interval excludes zero.")
    sentence: str
    multilabel: dict[str, Any] | None = Field(None, description="Multi-label jobs on the same val images: paired "
                                              "bootstrap differences in micro_f1 and mAP ({diff, low, high, real}).")


class CompareOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    dataset: dict[str, Any]
    baseline_id: int
    jobs: list[CompareJob]
    parameters: list[CompareParameter]
    differing_parameters: list[str]
    per_class: list[CompareClass]
    comparisons: list[CompareDifference]
    bootstrap: dict[str, Any]


class BatchPredictOptions(BaseModel):
    """How a batch prediction answers (the multipart form's fields besides `file`)."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(3, ge=1, le=100, description="Classes per image in the CSV (top1, p1, ... topK, pK)")
    confidence_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Abstain below this calibrated confidence (default: the training job's "
                                          "operating point, else the model file's)")


class BatchPredictCreate(BatchPredictOptions):
    """A batch prediction of images already on their way: a finished resumable upload (POST /api/v1/uploads) of
    a zip or tar, or a prefix in S3 read with the server's AWS_* credentials. (A zip can be sent as the
    multipart field `file` instead.)"""

    upload_id: str | None = Field(None, min_length=1, max_length=64, description="A finished resumable upload "
                                  "of a zip or tar of the images")
    source: str | None = Field(None, min_length=2, max_length=2000, description="s3://bucket/prefix/: every "
                               "image under the prefix")

    @model_validator(mode="after")
    def _one_of(self) -> BatchPredictCreate:
        if (self.upload_id is None) == (self.source is None):
            raise ValueError("give either upload_id (a finished resumable upload of a zip or tar) or source "
                             "(s3://bucket/prefix/), or send a zip as the multipart field 'file'")
        return self
