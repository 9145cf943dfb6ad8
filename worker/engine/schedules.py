"""Learning-rate schedules as pure functions of the optimizer step: each returns the multiplier of the base
learning rate (what torch's LambdaLR takes), so they can be tested and plotted without a model."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch


def warmup(step: int, warm: int) -> float:
    """Linear warmup over the first `warm` steps (never 0: the first step already moves)."""
    return (step + 1) / (warm + 1)


def cosine(progress: float) -> float:
    """From 1 down to 0.01 along half a cosine; `progress` in [0, 1]."""
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def step_decay(progress: float) -> float:
    """x0.1 after a third and after two thirds of the phase."""
    return 0.1 ** min(2, int(progress * 3))


def constant(progress: float) -> float:
    return 1.0


DECAYS: dict[str, Callable[[float], float]] = {"cosine": cosine, "step": step_decay}


def multiplier(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """step -> learning-rate multiplier: `warmup_steps` of linear warmup, then the `kind` decay ("cosine",
    "step", anything else constant) over the rest of `total_steps`."""
    total = max(1, total_steps)
    decay = DECAYS.get(kind, constant)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup(step, warmup_steps)
        return decay(min(1.0, (step - warmup_steps) / max(1, total - warmup_steps)))

    return factor


def phase_scheduler(opt: torch.optim.Optimizer, kind: str, epochs: int, warmup_epochs: float,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler of one training phase (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, multiplier(kind, epochs * steps_per_epoch, int(round(warmup_epochs * steps_per_epoch))))
