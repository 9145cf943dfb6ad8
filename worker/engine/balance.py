"""Class weighting (`RunSpec.class_weighting`): whether a run weighs its classes in the training loss, and
with which weights. Balanced weights are sklearn's: a class weighs (train images) / (classes x its train
images), so every class adds up to the same share of the loss and the mean weight per train image is 1 (the
loss keeps its scale). The val loss, which early stopping and the best epoch go by, stays unweighted: it is
the loss on the val images as they come, comparable between runs."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from domain.spec import AUTO_BALANCE_RATIO


@dataclass(frozen=True)
class ClassWeighting:
    requested: str  # auto | balanced | none (the spec's)
    choice: str  # balanced | none (what the run uses)
    ratio: float  # train images of the largest class / of the smallest
    weights: list[float] | None  # per class index; None: no weighting

    def describe(self) -> str:
        """E.g. "balanced (largest/smallest = 5.2)"; "..., as asked" when the spec did not leave it to auto."""
        return f"{self.choice} (largest/smallest = {self.ratio:.1f}{'' if self.requested == 'auto' else ', as asked'})"

    def tensor(self, device: torch.device) -> torch.Tensor | None:
        return None if self.weights is None else torch.tensor(self.weights, dtype=torch.float32, device=device)


def class_weighting(requested: str, labels: Sequence[int], n_classes: int) -> ClassWeighting:
    """The weighting a run with `class_weighting=requested` uses on train images with these labels."""
    count = Counter(labels)
    counts = [count.get(c, 0) for c in range(n_classes)]
    present = [n for n in counts if n > 0]
    ratio = max(present) / min(present) if present else 1.0
    choice = requested if requested != "auto" else ("balanced" if ratio > AUTO_BALANCE_RATIO else "none")
    weights = ([len(labels) / (len(present) * n) if n else 0.0 for n in counts] if choice == "balanced"
               else None)
    return ClassWeighting(requested, choice, round(ratio, 4), weights)


@dataclass(frozen=True)
class LabelWeighting:
    """A multi-label run's weighting, said like a ClassWeighting (outputs.effective_parameters)."""

    text: str

    def describe(self) -> str:
        return self.text


MAX_POS_WEIGHT = 10.0
RARE_SHARE = 0.2  # auto: a label on fewer than this share of the train images gets its positives weighted


def label_weighting(requested: str, label_sets: Sequence[Sequence[int]], labels: Sequence[int], n_classes: int
                    ) -> tuple[list[float] | None, str]:
    """Multi-label runs: each class's positive weight (negatives / positives, at most MAX_POS_WEIGHT) in the
    binary cross-entropy, and what to say about it. `balanced` weighs every class so; `auto` only the rare
    ones (on under RARE_SHARE of the train images); `none` none. Returns (weights or None, description)."""
    n = len(labels)
    pos = [0] * n_classes
    for s in labels:
        for c in label_sets[s]:
            pos[c] += 1
    ratio = [min(MAX_POS_WEIGHT, (n - p) / p) if p else 1.0 for p in pos]
    if requested == "none" or not n:
        return None, "none (multi-label: every label's positives weigh 1)"
    rare = [c for c in range(n_classes) if pos[c] and pos[c] / n < RARE_SHARE]
    if requested == "auto" and not rare:
        return None, f"none (multi-label: no label is on fewer than {RARE_SHARE:.0%} of the train images)"
    weights = [max(1.0, ratio[c]) if (requested == "balanced" or c in rare) else 1.0 for c in range(n_classes)]
    how = "every label" if requested == "balanced" else f"{len(rare)} rare label(s)"
    return weights, (f"positive weights for {how} (negatives / positives, at most {MAX_POS_WEIGHT:.0f}; "
                     f"{'as asked' if requested == 'balanced' else 'auto'})")
