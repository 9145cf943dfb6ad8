"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks"; fastai's
`lr_find`), for the phases of a search that unfreeze layers, which cannot be tried on cached features.

For up to `steps` mini-batches the learning rate grows exponentially from `start_lr` to `end_lr` while the model
trains; the loss is followed as an exponential moving average (debiased, beta 0.98) and the test stops once it
exceeds `diverge` times its minimum. The suggestion is a tenth of the rate at the smoothed minimum (fastai's
`lr_min`: the minimum itself is already where training turns unstable); the steepest descent is reported beside
it. A curve that never descends (its minimum among the first points) or is too short suggests nothing, and the
caller keeps its own rate.

Afterwards the model is exactly as before (weights, buffers, requires_grad flags, train/eval modes) and so is
every random number generator: the test changes nothing but the time.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from . import freeze
from .device import autocast, cpu_copy, rng_state, set_rng_state
from .loop import Weighting, loss_fn

START_LR = 1e-7
END_LR = 1.0
DIVERGE = 4.0  # stop once the smoothed loss exceeds this many times its minimum
BETA = 0.98  # of the loss's moving average
MIN_POINTS = 10  # fewer points before divergence: no suggestion


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)  # the highest group's learning rate at each step
    losses: list[float] = field(default_factory=list)  # the smoothed loss after it
    raw: list[float] = field(default_factory=list)  # the mini-batch's loss
    lr: float | None = None  # the suggestion (None: the curve suggests nothing)
    lr_min_loss: float | None = None
    lr_steepest: float | None = None
    diverged: bool = False
    seconds: float = 0.0


def suggest(lrs: list[float], losses: list[float]) -> tuple[float | None, float | None, float | None]:
    """(suggestion, rate at the minimum, rate at the steepest descent) of a smoothed range-test curve: a tenth
    of the rate at the minimum; None for all three when the curve is shorter than MIN_POINTS or its minimum lies
    among its first tenth (it never descended)."""
    n = len(lrs)
    if n < MIN_POINTS:
        return None, None, None
    i_min = min(range(n), key=lambda i: losses[i])
    if i_min < max(1, n // 10):
        return None, None, None
    # the slope along log(lr), by central differences up to the minimum
    slopes = [(losses[i + 1] - losses[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(1, i_min)]
    i_steep = 1 + min(range(len(slopes)), key=lambda k: slopes[k]) if slopes else i_min
    return max(lrs[0], lrs[i_min] / 10), lrs[i_min], lrs[i_steep]


def lr_range_test(model: torch.nn.Module, phase: freeze.Phase,
                  batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], *, optimizer: str = "adamw",
                  weight_decay: float = 0.0, label_smoothing: float = 0.0, class_weights: Weighting = None,
                  amp_dtype: torch.dtype | None = None, steps: int = 100, start_lr: float = START_LR,
                  end_lr: float = END_LR, diverge: float = DIVERGE,
                  should_stop: Callable[[], bool] = lambda: False) -> RangeTest:
    """Run the range test of `phase` (its trainable groups keep their ratios of learning rates; the rate
    reported is the highest group's) on `batches()` (model inputs and labels on the model's device, iterated
    again when they run out), and put everything back as it was."""
    device = next(model.parameters()).device
    state = cpu_copy(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = rng_state()
    t = time.perf_counter()
    out = RangeTest()
    try:
        groups = freeze.apply_phase(model, phase)
        mults = [phase.lr_for(g["name"], 1.0) for g in groups]
        ratios = [m / max(mults) for m in mults]
        pg = [{"params": g["params"], "lr": start_lr * r} for g, r in zip(groups, ratios)]
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(pg, lr=start_lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
            if optimizer == "sgd" else torch.optim.AdamW(pg, lr=start_lr, weight_decay=weight_decay))
        freeze.train_mode(model, phase)
        gamma = (end_lr / start_lr) ** (1 / max(1, steps - 1))
        avg, lowest = 0.0, math.inf
        it = iter(batches())
        for step in range(steps):
            lr = start_lr * gamma ** step
            for g, r in zip(opt.param_groups, ratios):
                g["lr"] = lr * r
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(batches())
                x, y = next(it)
            opt.zero_grad(set_to_none=True)
            with autocast(device, amp_dtype):
                logits = model(x)
            loss = loss_fn(logits.float(), y, label_smoothing, class_weights)
            loss.backward()
            opt.step()
            value = loss.item()
            if not math.isfinite(value):
                out.diverged = True
                break
            avg = BETA * avg + (1 - BETA) * value
            smooth = avg / (1 - BETA ** (step + 1))
            out.lrs.append(lr)
            out.losses.append(smooth)
            out.raw.append(value)
            lowest = min(lowest, smooth)
            if smooth > diverge * lowest:
                out.diverged = True
                break
            if should_stop():
                break
        del opt
    finally:
        model.load_state_dict(state)
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
            p.grad = None
        for n, m in model.named_modules():
            m.train(modes[n])
        set_rng_state(rng)
    out.lr, out.lr_min_loss, out.lr_steepest = suggest(out.lrs, out.losses)
    out.seconds = time.perf_counter() - t
    return out
