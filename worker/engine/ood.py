"""An out-of-distribution score on the model body's pooled features: the cosine distance from an image to its
k-th nearest training image (Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors").

Why k-NN and not Mahalanobis: Graft trains on small sets (tens of images per class), far fewer than the
feature dimension (768 to 2048), so a shared covariance is singular and its precision matrix is mostly the
shrinkage chosen to invert it; k-NN assumes no Gaussian class clusters, needs no inverse, and on L2-normalised
features was the stronger detector in Sun et al. Its cost is a bank of training features to store: at most
`MAX_BANK` rows, as float16 (1280 features x 2048 rows = 5 MiB for EfficientNet-Lite0), and one matrix
product per batch.

The score is 1 - cos(x, k-th nearest bank row), in [0, 2]; higher is further from the training images.
The threshold is a quantile of the val images' scores (by default the 95th: 5% of the in-distribution val
images are flagged), so it is in the units of this backbone and this data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import GraftNet

METHOD = "knn_cosine"
K = 10
MAX_BANK = 2048
QUANTILE = 0.95


def normalize(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.detach().float().cpu(), dim=1)


@dataclass
class KnnScorer:
    """The stored part of the detector: the bank of normalised training features, k and the threshold."""

    bank: torch.Tensor  # [rows, features] float16, L2-normalised
    k: int
    threshold: float
    _bank32: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def fit(cls, train_features: torch.Tensor, val_features: torch.Tensor, k: int = K, max_bank: int = MAX_BANK,
            quantile: float = QUANTILE, seed: int = 0) -> KnnScorer:
        """A bank of at most `max_bank` training feature rows (a seeded sample when there are more) and the
        `quantile` of the val images' scores as the threshold."""
        train = normalize(train_features)
        if len(train) == 0:
            raise ValueError("no training features to measure distances to")
        if len(train) > max_bank:
            g = torch.Generator().manual_seed(seed)
            train = train[torch.randperm(len(train), generator=g)[:max_bank]]
        scorer = cls(train.half(), min(k, len(train)), float("inf"))
        val = scorer.score(val_features)
        scorer.threshold = float(np.quantile(val.numpy(), quantile)) if len(val) else float("inf")
        return scorer

    def score(self, features: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        """The score of each row of `features` [n, d] (float32, CPU)."""
        bank = self._bank32 if self._bank32 is not None and self._bank32.device == features.device else None
        if bank is None:  # kept: a predictor scores every batch against the same bank
            bank = self._bank32 = self.bank.to(features.device, torch.float32)
        out = []
        for s in range(0, len(features), batch):
            x = F.normalize(features[s:s + batch].detach().float(), dim=1)
            sims = x @ bank.T
            kth = sims.topk(self.k, dim=1).values[:, -1]
            out.append((1.0 - kth).clamp_min(0.0).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def to_state(self) -> dict[str, Any]:
        """What the model file stores (plain containers and tensors: loads with weights_only=True)."""
        return {"method": METHOD, "k": self.k, "threshold": self.threshold, "bank": self.bank.contiguous()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> KnnScorer:
        if state.get("method") != METHOD:
            raise ValueError(f"unknown out-of-distribution method {state.get('method')!r}")
        return cls(state["bank"].half(), int(state["k"]), float(state["threshold"]))


@torch.inference_mode()
def body_features(model: GraftNet, batches, device: str | torch.device = "cpu") -> torch.Tensor:
    """The pooled features (`model.body(x)`) of batches of normalised images (x or (x, y) items): what a run
    whose body was trained must score with, since the cached features are the pretrained body's."""
    model.eval()
    out = []
    for item in batches:
        x = item[0] if isinstance(item, (tuple, list)) else item
        out.append(model.body(x.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
