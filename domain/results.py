"""What the engine hands back, typed: the run summary (a train job's stored result), the evaluation report,
the export checks and a backbone comparison's leaderboard. Torch-free and Pydantic, so that the engine
produces them, the worker bridge stores them as JSON (`model_dump(mode="json")`), and the web tier reads them
back (`RunSummary.from_stored(job.result)`) and uses them as response models, so `/docs` shows every field.

Stored results outlive the code that wrote them: every model accepts the fields of older (or newer) versions
(`extra="allow"`, defaults for fields added later), and `from_stored` reads a missing or unreadable result as
None instead of failing a page.
"""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound="Result")


class Result(BaseModel):
    """Base of the stored results: tolerant of fields it does not know."""

    model_config = ConfigDict(extra="allow")

    @classmethod
    def from_stored(cls: type[M], data: object) -> M | None:
        """The stored JSON as this model, or None when there is none or it does not fit (an old row)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls.model_validate(data)
        except ValidationError:
            return None

    def to_json(self) -> dict[str, Any]:
        """The JSON to store (a job's `result` column, metrics.json): the fields that were given, so that a
        stored result reads back as the same JSON."""
        return self.model_dump(mode="json", exclude_unset=True)


# ---------------------------------------------------------------- evaluation


class ClassScores(Result):
    precision: float
    recall: float
    f1: float
    support: int


class Mistake(Result):
    """A misclassified val image (most confident mistakes first)."""

    file: str = Field(description="The image's path relative to the dataset folder.")
    true: str
    predicted: str
    confidence: float = Field(description="The predicted class's probability.")
    true_class_probability: float | None = None


class LabelScores(Result):
    """A multi-label model's figures for one label at its threshold (cross-fitted), with its confusion counts."""

    precision: float
    recall: float
    f1: float
    ap: float | None = Field(None, description="Average precision (null without positives in val).")
    support: int = Field(description="Val images that carry the label.")
    threshold: float = Field(description="The label's threshold kept for predictions (tuned for F1 on val).")
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0


class LabelMistake(Result):
    """A val image with a missed or a false label (most confident error first)."""

    file: str
    true: list[str]
    predicted: list[str]
    missed: list[str] = Field(description="Labels it carries that the model did not give.")
    false: list[str] = Field(description="Labels the model gave that it does not carry.")
    probabilities: dict[str, float] = Field(default_factory=dict)
    confidence: float = Field(description="The worst error's confidence (a false label's probability, or one "
                                          "minus a missed label's).")


class EvaluationReport(Result):
    """How good the model is on the val set. Multi-label models (`task` "multilabel") give `metrics`,
    `per_label`, `thresholds` and `label_mistakes`; their `accuracy` is the subset accuracy."""

    accuracy: float
    task: str = Field("multiclass", description="multiclass | multilabel")
    metrics: dict[str, float] | None = Field(None, description="Multi-label: micro_f1, macro_f1, mAP, "
                                                                "subset_accuracy at the tuned thresholds "
                                                                "(cross-fitted).")
    metrics_at_half: dict[str, float] | None = Field(None, description="Multi-label: the same at 0.5 for every label.")
    per_label: dict[str, LabelScores] | None = None
    thresholds: dict[str, float] | None = Field(None, description="Multi-label: each label's threshold.")
    thresholds_cross_fitted: bool | None = None
    label_mistakes: list[LabelMistake] | None = None
    macro_f1: float | None = None
    confusion_matrix: list[list[int]] = Field(default_factory=list,
                                              description="Rows: true class; columns: predicted class.")
    classes: list[str] = Field(default_factory=list)
    per_class: dict[str, ClassScores] = Field(default_factory=dict)
    top_k: dict[str, float] = Field(default_factory=dict, description="top3/top5 accuracy (more than 5 classes).")
    mistakes: list[Mistake] = Field(default_factory=list)
    images: int = 0
    val_set: str | None = Field(None, description="Id of the set of val images (see y_true, y_pred).")
    y_true: list[int] = Field(default_factory=list, description="True class index of each val image, in sorted "
                                                                 "file order.")
    y_pred: list[int] = Field(default_factory=list, description="Predicted class index, same order.")


# ---------------------------------------------------------------- exports


class Parity(Result):
    """An export checked against the PyTorch model on the val images."""

    images: int
    max_abs_prob_diff: float
    top1_agreement: float


class ExportCheck(Result):
    """One export of a trained model, checked in its own runtime on the val images right after training:
    whether it is offered, and why not, with its figures (None in results from before they were measured)."""

    format: str
    ok: bool
    error: str | None = None
    parity: Parity | None = None
    accuracy: float | None = Field(None, description="Val accuracy of the export in its own runtime, on raw "
                                                     "decoded images (its preprocessing inside).")
    reference_accuracy: float | None = Field(None, description="The PyTorch model's val accuracy on the same "
                                                               "images through Graft's own preprocessing.")
    latency_ms: float | None = Field(None, description="Batch-1 latency on the worker (median, one thread), "
                                                       "preprocessing included.")
    size_bytes: int | None = None
    seconds: float | None = Field(None, description="Time it took to write and check this export.")
    tolerance: dict[str, float] | None = Field(None, description="What the check allowed: max_prob_diff, "
                                                                 "min_top1_agreement (on the images that are not "
                                                                 "near ties).")
    note: str | None = None


# ---------------------------------------------------------------- a training run


class RunSummary(Result):
    """A finished run: the figures of its best epoch, what it saw, and (in a job's stored result) the
    evaluation report and the exports."""

    status: str = Field("completed", description="completed | early_stopped | stopped")
    val_acc: float | None = None
    val_loss: float | None = None
    best_epoch: int | None = None
    epochs_run: int = Field(0, description="Epochs trained; with status early_stopped, the epoch it stopped at.")
    max_epochs: int | None = Field(None, description="The most epochs the run could train (the spec's epochs, "
                                                     "else the strategy's default).")
    effective: dict[str, Any] = Field(
        default_factory=dict, description="The parameters as the run applied them, where the spec leaves a "
                                          "choice to it: max_epochs, early_stopping, lr, image_size, "
                                          "class_weighting (e.g. \"balanced (largest/smallest = 5.2)\").")
    seconds: float = 0.0
    train_images_per_s: float = 0.0
    classes: list[str] = Field(default_factory=list)
    counts: dict[str, dict[str, int]] | None = Field(None, description="Images per split and class.")
    model_path: str | None = None
    device: str = "cpu"
    macro_f1: float | None = None
    skipped: list[str] = Field(default_factory=list, description="Images that could not be used, by name.")
    warnings: list[str] = Field(default_factory=list)
    report: EvaluationReport | None = None
    exports: list[ExportCheck] = Field(default_factory=list)
    trust: dict[str, Any] | None = Field(
        None, description="Calibration (temperature, ece_before, ece_after, reliability bins), abstention (the "
                          "default threshold, its coverage and accuracy, the coverage-accuracy curve) and the "
                          "out-of-distribution check, fitted on the val set (worker/engine/trust.py).")


# ---------------------------------------------------------------- a backbone comparison


class ProbeRow(Result):
    """One backbone on the leaderboard: a linear probe on its frozen features (or why it could not run)."""

    backbone: str
    pretrained: bool = True
    rank: int | None = Field(None, description="1 = best val accuracy; None for a backbone that failed.")
    val_acc: float | None = None
    val_loss: float | None = None
    seconds: float | None = None
    feature_seconds: float | None = None
    fit_seconds: float | None = None
    images_per_s: float | None = None
    params: int | None = None
    size_mb: float | None = None
    weights: str | None = None
    image_size: int | None = None
    feature_dim: int | None = None
    cached: bool | None = None
    l2: float | None = None
    cv_acc: float | None = None
    mAP: float | None = Field(None, description="Multi-label data: the probe's val mAP (the leaderboard's order); "
                                                "val_acc is then the subset accuracy at 0.5.")
    micro_f1: float | None = None
    train_images: int | None = None
    val_images: int | None = None
    skipped: list[str] = Field(default_factory=list)
    error: str | None = None


class DomainGap(Result):
    """The advisor's measurement: a linear probe against a short fine-tune of the last block on a sample."""

    backbone: str
    probe_acc: float
    finetune_acc: float
    gain: float | None = None
    stderr: float | None = None
    val_images: int | None = None
    train_images: int | None = None
    image_size: int | None = None
    epochs: int | None = None
    finetuned: str | list[str] | None = None
    seconds: float = 0.0


class ProbeResult(Result):
    """A backbone comparison: the ranked leaderboard and, when asked for, the domain-gap measurement."""

    status: str = Field("completed", description="completed | stopped")
    classes: list[str] = Field(default_factory=list)
    counts: dict[str, dict[str, int]] = Field(default_factory=dict)
    layout: str = ""
    rows: list[ProbeRow] = Field(default_factory=list, description="Best first; failed backbones last.")
    measured: DomainGap | None = None
    seconds: float = 0.0
    device: str = "cpu"
    warnings: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- a search for wrong labels


class LabelIssue(Result):
    """An image whose label is probably wrong."""

    file: str = Field(description="The image's path relative to the dataset folder (e.g. train/8/00007.png).")
    given: str = Field(description="The class it is filed under.")
    suggested: str = Field(description="The class it probably belongs to.")
    score: float = Field(ge=0, le=1, description="How likely the label is wrong: higher first.")
    reason: str = Field(description="confident_learning (the cross-validated classifier is confident of another "
                                    "class) | exact_duplicate | near_duplicate (of other_file, filed under "
                                    "another class)")
    split: str | None = Field(None, description="train | val")
    given_probability: float | None = Field(None, description="Out-of-fold probability of the given class.")
    suggested_probability: float | None = Field(None, description="Out-of-fold probability of the suggested one.")
    other_file: str | None = Field(None, description="The duplicate with another label (duplicates only).")
    similarity: float | None = Field(None, description="Cosine similarity of the two images' features "
                                                       "(duplicates only).")


class LabelIssueReport(Result):
    """The suspects of a search for wrong labels, most likely mislabelled first."""

    status: str = Field("completed", description="completed | stopped")
    issues: list[LabelIssue] = Field(default_factory=list, description="Most likely mislabelled first.")
    n_images: int = 0
    n_classes: int = 0
    n_flagged: int = Field(0, description="Suspects found (issues holds at most max_issues of them).")
    classes: list[str] = Field(default_factory=list)
    counts: dict[str, dict[str, int]] = Field(default_factory=dict)
    layout: str = ""
    method: str = ""
    folds: int = 0
    oof_acc: float | None = Field(None, description="Accuracy of the out-of-fold predictions against the given "
                                                    "labels.")
    l2: float | None = None
    backbone: str = ""
    image_size: int | None = None
    cached: bool | None = Field(None, description="Every feature came from the cache.")
    feature_seconds: float | None = None
    seconds: float = 0.0
    device: str = "cpu"
    skipped: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- a search of a run's parameters


class SearchTrial(Result):
    """One trial of a run's search: a head trained on the cached features with these parameters."""

    number: int = Field(description="0-based, in the order they ran; trial 0 has the spec's own values.")
    params: dict[str, float] = Field(default_factory=dict, description="lr, weight_decay, dropout, label_smoothing.")
    state: str = Field("complete", description="complete | pruned (its best val loss fell behind the median of "
                                               "the earlier trials at the same epoch)")
    val_loss: float | None = Field(None, description="Of its best epoch (pruned: the best before it was stopped).")
    val_acc: float | None = None
    best_epoch: int | None = None
    epochs: int = Field(0, description="Epochs it trained.")
    seconds: float = 0.0
    spec_values: bool = Field(False, description="The spec's own values (the first trial).")


class LrRangeTest(Result):
    """The learning-rate range test of a phase that unfreezes layers: the smoothed training loss while the
    learning rate grew exponentially, and the rate the phase trains with."""

    phase: str
    lrs: list[float] = Field(default_factory=list, description="The highest group's (the head's) learning rate "
                                                                "at each step.")
    losses: list[float] = Field(default_factory=list, description="The smoothed training loss after each step.")
    lr: float = Field(description="The phase's learning rate (its head's; lower groups keep their ratios).")
    lr_min_loss: float | None = Field(None, description="Where the smoothed loss was lowest.")
    lr_steepest: float | None = Field(None, description="Where it fell fastest.")
    rule: str = Field("min_loss/10", description="min_loss/10 | kept (the curve never descended: the spec's rate)")
    diverged: bool = False
    steps: int = 0
    seconds: float = 0.0


class SearchReport(Result):
    """What a run's search tried and chose (RunSpec.search), stored in the run's summary as `search`."""

    trials_asked: int = 0
    trials: list[SearchTrial] = Field(default_factory=list, description="In the order they ran.")
    best_trial: int | None = None
    best_params: dict[str, float] = Field(default_factory=dict, description="The parameters the run trained with.")
    best_val_loss: float | None = None
    best_val_acc: float | None = None
    space: dict[str, list[float | str]] = Field(default_factory=dict, description="Each searched parameter's "
                                                                                  "[low, high, log|linear].")
    seconds: float = 0.0
    timed_out: bool = Field(False, description="timeout_s ended the search before every trial ran.")
    lr_find: list[LrRangeTest] = Field(default_factory=list, description="The range tests of the phases that "
                                                                         "unfreeze layers.")

    @classmethod
    def of(cls, summary: RunSummary) -> SearchReport | None:
        """The search of a run summary (its field `search`), or None for a run without one."""
        return cls.from_stored((summary.model_extra or {}).get("search"))
