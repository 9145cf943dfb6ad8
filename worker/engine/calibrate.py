"""Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides the logits before the softmax, fitted
by minimising the negative log-likelihood of the val labels. It changes confidences, never the top class.

The reported figures are cross-fitted: the val set is split into folds, each fold's images get the temperature
fitted on the other folds, so the ECE "after" is measured on images the temperature never saw. The temperature
that is stored and applied is fitted on all the val images.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# log T is kept in this range (T from about 0.05 to 20): beyond it a val set is too small or degenerate to say
LOG_T_MIN, LOG_T_MAX = math.log(0.05), math.log(20.0)
MAX_FOLDS = 5


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of `labels` under softmax(logits / T): L-BFGS on log T (the NLL is
    smooth in it and has one minimum; optimising log T keeps T positive), clamped to [0.05, 20]."""
    z = logits.detach().double().cpu()
    y = labels.detach().long().cpu()
    if len(z) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(LOG_T_MIN, LOG_T_MAX).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    value = float(log_t.detach().clamp(LOG_T_MIN, LOG_T_MAX).exp())
    return value if math.isfinite(value) else 1.0


def fold_ids(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold number per image, stratified by class (each class's images dealt round-robin in a seeded order)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        out[idx] = (np.arange(len(idx)) + start) % folds
        start += len(idx)  # the next class starts where this one left off: folds stay the same size
    return out


def n_folds(n: int) -> int:
    """Up to MAX_FOLDS folds with at least 5 images each; 0 (no cross-fitting) under 10 images."""
    return min(MAX_FOLDS, n // 5) if n >= 10 else 0


def cross_fit(logits: torch.Tensor, labels: torch.Tensor, folds: int | None = None,
              seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold temperatures: per image the temperature fitted without its fold (an array [images]), and
    the folds' temperatures. Under 10 images there are no folds: every image gets the in-sample temperature
    (the figures are then optimistic; `fit_trust` says so)."""
    y = labels.detach().long().cpu()
    k = n_folds(len(y)) if folds is None else folds
    if k < 2:
        t = fit_temperature(logits, y)
        return np.full(len(y), t), [t]
    ids = fold_ids(y.numpy(), k, seed)
    per_image = np.ones(len(y))
    temps = []
    for f in range(k):
        held = torch.from_numpy(ids == f)
        t = fit_temperature(logits[~held], y[~held])
        per_image[held.numpy()] = t
        temps.append(t)
    return per_image, temps
