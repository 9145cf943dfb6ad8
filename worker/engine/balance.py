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
