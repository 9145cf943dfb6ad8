"""The parameter object of one training run.

Torch-free on purpose: the web form, the REST API and the CLI all build a `RunSpec`,
and the web tier must not import torch.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRATEGY_RE = re.compile(r"^(features|full|two_stage|finetune_last:(\d+))$")

# Learning rates that work for each strategy with AdamW (SGD gets 10x these, see `effective_lr`).
DEFAULT_LR = {"features": 3e-3, "finetune_last": 3e-4, "full": 3e-4, "two_stage": 3e-3}

# Epochs when `epochs` is left out. A `features` run trains its head on cached features (tenths of a second an
# epoch), so it trains until val loss stops improving (`patience`), with this many epochs at the most; the
# other strategies train DEFAULT_EPOCHS (early stopping still applies).
DEFAULT_EPOCHS = 10
UNTIL_PLATEAU_MAX_EPOCHS = {"features": 200}
# ... and waits at least this many epochs without improvement before it stops: with patience 5 the noise of a
# small val set stopped it 1-2 points below a linear probe on the same features (sign_language_digits slices)
UNTIL_PLATEAU_MIN_PATIENCE = 10
# Label smoothing when it is left out: 0.1 where backbone layers train; none for a head on frozen features,
# where it only holds the head's confidence back (measured: 1-3 points lower accuracy, and val loss stopped
# improving too early)
DEFAULT_LABEL_SMOOTHING = {"features": 0.0}
# class_weighting "auto": balanced when the largest class has more than this many times the train images of
# the smallest
AUTO_BALANCE_RATIO = 3.0
# The parameters a search may tune: the head's, on the cached features (worker/engine/search.py)
SearchParam = Literal["lr", "weight_decay", "dropout", "label_smoothing"]
SEARCHABLE: tuple[SearchParam, ...] = ("lr", "weight_decay", "dropout", "label_smoothing")


class SearchSpec(BaseModel):
    """A search for the parameters a run would otherwise need to be given ("models that do not need knobs"):
    the head's learning rate, weight decay, dropout and label smoothing tried on the cached frozen features
    (Optuna's TPE sampler seeded by the run's seed, trials that fall behind the median pruned), the first trial
    being the spec's own values; the run then trains with the best. Phases that unfreeze layers get their learning
    rate from a range test first (exponentially growing over `range_test_steps` mini-batches)."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(20, ge=1, le=200, description="Heads trained on the cached features, each with other "
                                                      "parameters (the first with the spec's own).")
    timeout_s: float | None = Field(None, gt=0, le=7 * 86400, description="Start no new trial after this many "
                                                                           "seconds (the trials done so far count).")
    params: list[SearchParam] = Field(
        default_factory=lambda: list(SEARCHABLE), min_length=1,
        description="Which of the head's parameters to search; the others keep the spec's values.")
    range_test_steps: int = Field(100, ge=10, le=1000, description="Mini-batches of the learning-rate range test "
                                                                   "of phases that unfreeze layers (lr 1e-7 to 1).")

    @field_validator("params")
    @classmethod
    def _unique_params(cls, v: list[SearchParam]) -> list[SearchParam]:
        return list(dict.fromkeys(v))


class RunSpec(BaseModel):
    """Everything that describes one training run (not where its data or outputs live)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("efficientnet_lite0", description="Backbone name, see `graft backbones`.")
    pretrained: bool = Field(True, description="Start from ImageNet weights; False means random init.")
    strategy: str = Field(
        "features",
        description="features | finetune_last:N | full | two_stage",
    )
    epochs: int | None = Field(
        None, ge=1, le=1000, description="Total epochs, all phases together (with early stopping: the most). "
                                         "Default: features trains its head until val loss stops improving "
                                         "(patience), at most 200 epochs; the other strategies 10.")
    head_epochs: int | None = Field(
        None, ge=1, description="two_stage only: epochs of the first, head-only phase (default: half)."
    )
    lr: float | None = Field(None, gt=0, le=10, description="Base learning rate (default depends on strategy).")
    batch_size: int = Field(32, ge=1, le=4096)
    image_size: int | None = Field(None, ge=32, le=1024, description="Input size (default: the backbone's).")
    augment: Literal["none", "light", "standard"] = "light"
    feature_views: int = Field(
        2, ge=1, le=32, description="Frozen backbone: augmented views of each train image computed once."
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0, le=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float | None = Field(
        None, ge=0, le=100, description="Linear warm-up; default: 1 epoch for phases that unfreeze layers."
    )
    label_smoothing: float | None = Field(
        None, ge=0, lt=1, description="Default: 0.1; 0 for features (a head on frozen features).")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the new classifier.")
    patience: int | None = Field(5, ge=1, description="Early stopping on val loss; None disables it. A features "
                                                      "run with epochs left out waits at least 10 epochs.")
    class_weighting: Literal["auto", "balanced", "none"] = Field(
        "auto", description="balanced: each class weighs in the training loss in inverse proportion to its "
                            "train images; auto: balanced when the largest class has over 3x the train images "
                            "of the smallest, else none.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Used when the data has no val split.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    mixed_precision: bool = Field(True, description="bf16/fp16 autocast on CUDA (ignored on CPU).")
    max_train_images: int | None = Field(None, ge=2, description="Use at most this many train images.")
    devices: int = Field(
        1, ge=1, le=64, description="Train data-parallel on this many devices (GPUs; CPU processes without one): "
                                    "the same results as one device at the same global batch_size. A worker "
                                    "takes the job only if it has that many (GRAFT_WORKER_DEVICES). Phases that "
                                    "train the head on cached features run in one process."
    )
    search: SearchSpec | None = Field(
        None, description="Search the parameters instead of giving them: {\"trials\": 20} trains heads with other "
                          "lr, weight_decay, dropout and label_smoothing on the cached features (the first with "
                          "this spec's values) and trains with the best; phases that unfreeze layers take their "
                          "learning rate from a range test.")

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        m = STRATEGY_RE.match(v.strip())
        if not m:
            raise ValueError(
                f"unknown strategy {v!r}: use one of features, finetune_last:N (N >= 1), full, two_stage"
            )
        if m.group(2) is not None and int(m.group(2)) < 1:
            raise ValueError("finetune_last:N needs N >= 1 (the number of top layer groups to train)")
        return v.strip()

    @model_validator(mode="after")
    def _two_stage_epochs(self) -> RunSpec:
        if self.strategy == "two_stage" and self.max_epochs() < 2:
            raise ValueError("two_stage needs epochs >= 2 (one for the head, at least one to fine-tune)")
        if self.head_epochs is not None and self.strategy == "two_stage" and self.head_epochs >= self.max_epochs():
            raise ValueError("head_epochs must be smaller than epochs so that the second stage runs")
        return self

    @model_validator(mode="after")
    def _search_fits(self) -> RunSpec:
        if self.search is None:
            return self
        if self.devices > 1 and self.strategy_kind != "features":
            raise ValueError(f"search runs on one device (its learning-rate range test of {self.strategy}): set "
                             "devices to 1, or leave search out")
        if self.strategy_kind in ("finetune_last", "full") and "lr" not in self.search.params:
            raise ValueError(f"{self.strategy} trains no head on cached features: its search is the learning-rate "
                             "range test alone, so search.params must include lr")
        return self

    @property
    def strategy_kind(self) -> str:
        return self.strategy.split(":", 1)[0]

    @property
    def finetune_groups(self) -> int | None:
        return int(self.strategy.split(":", 1)[1]) if self.strategy.startswith("finetune_last:") else None

    @property
    def until_plateau(self) -> bool:
        """Epochs left to the run and a strategy that trains until val loss stops improving (features)."""
        return self.epochs is None and self.strategy_kind in UNTIL_PLATEAU_MAX_EPOCHS

    def max_epochs(self) -> int:
        """The epochs the run trains at the most: `epochs`, else the strategy's default."""
        if self.epochs is not None:
            return self.epochs
        return UNTIL_PLATEAU_MAX_EPOCHS.get(self.strategy_kind, DEFAULT_EPOCHS)

    def effective_patience(self) -> int | None:
        """Epochs without a better val loss after which the run stops (None: it never stops early)."""
        if self.patience is None or not self.until_plateau:
            return self.patience
        return max(self.patience, UNTIL_PLATEAU_MIN_PATIENCE)

    def effective_label_smoothing(self) -> float:
        if self.label_smoothing is not None:
            return self.label_smoothing
        return DEFAULT_LABEL_SMOOTHING.get(self.strategy_kind, 0.1)

    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        base = DEFAULT_LR[self.strategy_kind]
        return base * 10 if self.optimizer == "sgd" else base


class ProbeSpec(BaseModel):
    """A backbone comparison ("probe"): frozen features of each backbone, a linear classifier on them, ranked
    by val accuracy; optionally the strategy advisor's measurement. The feature settings default to those of
    a default `features` run (RunSpec), so that such a run on the same data reuses the cached features."""

    model_config = ConfigDict(extra="forbid")

    backbones: list[str] | None = Field(
        None, max_length=64, description="Backbones to compare (default: every one whose pretrained weights are "
                                         "available here)."
    )
    random_init: bool = Field(False, description="Also probe each backbone from random weights (a baseline).")
    advise: bool = Field(True, description="Also measure how far the images are from ImageNet (a short "
                                           "fine-tune on a sample) to recommend a strategy.")
    image_size: int | None = Field(None, ge=32, le=1024, description="Input size (default: each backbone's).")
    augment: Literal["none", "light", "standard"] = RunSpec.model_fields["augment"].default
    feature_views: int = Field(RunSpec.model_fields["feature_views"].default, ge=1, le=32)
    val_fraction: float = Field(RunSpec.model_fields["val_fraction"].default, gt=0, lt=1)
    batch_size: int = Field(RunSpec.model_fields["batch_size"].default, ge=1, le=4096)
    seed: int = Field(RunSpec.model_fields["seed"].default, ge=0, le=2**31 - 1)

    @field_validator("backbones")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = list(dict.fromkeys(b.strip() for b in v if b.strip()))
        if not out:
            raise ValueError("name at least one backbone, or leave backbones out to compare every available one")
        return out


class LabelIssueSpec(BaseModel):
    """A search for wrong labels ("label issues"): frozen features of every image (train and val), linear
    classifiers cross-validated on them for out-of-fold class probabilities, confident learning (cleanlab)
    to rank the suspects, and pairs of (near-)duplicate images filed under different classes. The features
    are cached under the same keys as a probe's or a `features` run's with the same settings (backbone,
    image_size, augment, feature_views, val_fraction, seed), so whichever comes first computes them. By default
    every image is seen once, unaugmented (augment "none"): the cleanest out-of-fold probabilities and
    duplicates, for one feature pass; the val images' features are shared with every run of that backbone, size
    and split, the train images' with runs that use augment "none" too (augment "light" with feature_views 2 reads
    a default probe's instead)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(RunSpec.model_fields["backbone"].default, description="Backbone name, see `graft "
                                                                                 "backbones`.")
    image_size: int | None = Field(None, ge=32, le=1024, description="Input size (default: the backbone's).")
    augment: Literal["none", "light", "standard"] = Field(
        "none", description="The train images' views: none (one plain view each, like val images) or an "
                            "augmentation preset (then feature_views views of each).")
    feature_views: int = Field(1, ge=1, le=32, description="Augmented views of each train image (with augment "
                                                           "light or standard).")
    val_fraction: float = Field(RunSpec.model_fields["val_fraction"].default, gt=0, lt=1,
                                description="As in training: which images the cached features are keyed under.")
    batch_size: int = Field(RunSpec.model_fields["batch_size"].default, ge=1, le=4096)
    seed: int = Field(RunSpec.model_fields["seed"].default, ge=0, le=2**31 - 1)
    folds: int = Field(5, ge=2, le=20, description="Cross-validation folds: each image's class probabilities come "
                                                   "from a classifier that never saw it.")
    rank_by: Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"] = Field(
        "self_confidence", description="cleanlab's label quality score that orders the suspects.")
    duplicate_threshold: float = Field(0.9, gt=0, le=1, description="Cosine similarity of two images' features "
                                                                    "(centered on the mean image) from which they "
                                                                    "count as near-duplicates.")
    max_issues: int = Field(1000, ge=1, le=100_000, description="Report at most this many suspects (the likeliest).")
