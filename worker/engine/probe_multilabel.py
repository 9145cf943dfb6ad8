"""The backbone comparison on multi-label data (issue 16): a linear probe with one sigmoid output per label
(binary cross-entropy and an L2 penalty, fitted with L-BFGS on standardized features; the L2 strength chosen by
cross-validated loss over folds of images), scored on the val images by mAP, micro F1 and subset accuracy at
0.5. The leaderboard ranks such rows by mAP."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from domain import multilabel as ml

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
FOLDS = 3


def _lbfgs_bce(x: torch.Tensor, t: torch.Tensor, l2: float, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], t.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(t.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, t) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_multilabel_probe(x: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None = None, seed: int = 0,
                         l2_grid: Sequence[float] = L2_GRID) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(weight [labels, features], bias [labels], the chosen L2) of a linear multi-label classifier on raw
    features `x` [N, D] with multi-hot `targets` [N, labels]; `groups` names each row's image (folds never split
    one). Deterministic."""
    x64, t = x.double(), targets.double()
    groups = torch.arange(len(t)) if groups is None else groups.long()
    mu, sd = x64.mean(0), x64.std(0, unbiased=False).clamp_min(1e-6)
    xs = (x64 - mu) / sd
    images = sorted(set(groups.tolist()))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {images[j]: r % FOLDS for r, j in enumerate(order)}  # image -> its fold
    row_fold = torch.tensor([fold_of[g] for g in groups.tolist()])
    best = (np.inf, sorted(l2_grid)[len(l2_grid) // 2])
    if len(images) >= 2 * FOLDS and len(l2_grid) > 1:
        for l2 in l2_grid:
            losses = []
            for f in range(FOLDS):
                tr, te = row_fold != f, row_fold == f
                if not te.any() or not tr.any():
                    continue
                w, b = _lbfgs_bce(xs[tr], t[tr], l2, max_iter=100)
                losses.append(F.binary_cross_entropy_with_logits(xs[te] @ w + b, t[te]).item())
            if losses and float(np.mean(losses)) < best[0]:
                best = (float(np.mean(losses)), l2)
    w, b = _lbfgs_bce(xs, t, best[1])
    weight = (w / sd[:, None]).T.contiguous()
    bias = b - (mu / sd) @ w
    return weight.float(), bias.float(), float(best[1])


def scores(logits: torch.Tensor, targets: np.ndarray) -> dict[str, float]:
    """val_loss (BCE), mAP, micro F1 and subset accuracy at 0.5 of val logits against multi-hot targets."""
    p = ml.sigmoid(logits.detach().float().cpu().numpy())
    t = np.asarray(targets, dtype=bool)
    metrics, _ = ml.metrics_at(p, t, [str(i) for i in range(t.shape[1])], [ml.DEFAULT_THRESHOLD] * t.shape[1])
    loss = F.binary_cross_entropy_with_logits(logits.float().cpu(), torch.from_numpy(t.astype(np.float32))).item()
    return {"val_loss": loss, "mAP": metrics["mAP"], "micro_f1": metrics["micro_f1"],
            "val_acc": metrics["subset_accuracy"]}


Runner = Any  # a runner.Runner whose features are computed (not imported: the runner imports the probe's module)


def val_targets(r: Runner) -> torch.Tensor:
    return torch.from_numpy(ml.multi_hot(r.split.label_sets, r.val_labels, len(r.classes)))


def fit_for_run(r: Runner, x: torch.Tensor, groups: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The probe on a run's train features `x` (its views stacked: len(x) is a multiple of the train images)."""
    views = len(x) // max(1, len(r.train_labels))
    t = torch.from_numpy(ml.multi_hot(r.split.label_sets, r.train_labels * views, len(r.classes)).astype("float32"))
    return fit_multilabel_probe(x, t, groups, seed)


def prepare_finetune(r: Runner) -> Callable[[torch.Tensor], torch.Tensor]:
    """Set the run's multi-label objective (the domain gap's fine-tune trains with it) and return which val images
    a model's logits get right (every label, at 0.5)."""
    from .task import set_weighting

    set_weighting(r)
    val_t = val_targets(r)
    return lambda logits: ((logits.float().cpu() > 0) == val_t).all(1)
