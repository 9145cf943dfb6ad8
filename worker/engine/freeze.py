"""Freeze strategies: small pure functions from a backbone's named layer groups to training phases.

A phase says how many epochs it runs, which groups train (the new head is the group "head"),
and each trainable group's learning-rate multiplier. Nothing here touches a tensor except
`apply_phase` and `train_mode`, which put a model into the state a phase asks for.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

HEAD = "head"


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    trainable: tuple[str, ...]
    lr_mults: dict[str, float] = field(default_factory=dict)
    lr_scale: float = 1.0  # multiplies the run's base learning rate
    warmup_epochs: float = 0.0

    @property
    def backbone_frozen(self) -> bool:
        return self.trainable == (HEAD,)

    def lr_for(self, group: str, base_lr: float) -> float:
        return base_lr * self.lr_scale * self.lr_mults.get(group, 1.0)


def features(groups: Sequence[str], epochs: int) -> list[Phase]:
    """Frozen backbone, new head only: the right choice for little data close to ImageNet."""
    return [Phase("head", epochs, (HEAD,), {HEAD: 1.0})]


def finetune_last(groups: Sequence[str], epochs: int, n: int, warmup: float = 0.0) -> list[Phase]:
    """Train the top `n` groups and the head; the lower, more generic layers stay frozen."""
    n = min(n, len(groups))
    top = tuple(groups[len(groups) - n:])
    return [Phase(f"finetune_last:{n}", epochs, top + (HEAD,), {g: 1.0 for g in top + (HEAD,)},
                  warmup_epochs=warmup)]


def full(groups: Sequence[str], epochs: int, warmup: float = 0.0) -> list[Phase]:
    """Everything trains at the same learning rate."""
    names = tuple(groups) + (HEAD,)
    return [Phase("full", epochs, names, {g: 1.0 for g in names}, warmup_epochs=warmup)]


def discriminative_mults(groups: Sequence[str], spread: float = 100.0) -> dict[str, float]:
    """The head gets 1, the lowest group 1/spread, geometrically in between (fastai's slice(lr/100, lr))."""
    names = list(groups) + [HEAD]
    k = len(names) - 1
    return {g: spread ** (-(k - i) / k) if k else 1.0 for i, g in enumerate(names)}


def two_stage(groups: Sequence[str], epochs: int, head_epochs: int | None = None,
              stage2_scale: float = 0.1, warmup: float = 0.0) -> list[Phase]:
    """First the head alone on a frozen backbone (its large early gradients never reach the
    pretrained layers), then everything with lower learning rates for lower groups."""
    if epochs < 2:
        raise ValueError("two_stage needs at least 2 epochs")
    h = head_epochs if head_epochs is not None else max(1, epochs // 2)
    h = min(max(1, h), epochs - 1)
    return [
        Phase("head", h, (HEAD,), {HEAD: 1.0}),
        Phase("unfreeze", epochs - h, tuple(groups) + (HEAD,), discriminative_mults(groups),
              lr_scale=stage2_scale, warmup_epochs=warmup),
    ]


def plan(strategy: str, groups: Sequence[str], epochs: int, head_epochs: int | None = None,
         warmup: float | None = None) -> list[Phase]:
    """Phases for a strategy string (as validated by RunSpec). `warmup=None` picks one epoch of
    warm-up for phases that unfreeze backbone layers and run at least 3 epochs."""
    kind, _, arg = strategy.partition(":")

    def w(n: int) -> float:
        return warmup if warmup is not None else (1.0 if n >= 3 else 0.0)

    if kind == "features":
        return features(groups, epochs)
    if kind == "finetune_last":
        return finetune_last(groups, epochs, int(arg), w(epochs))
    if kind == "full":
        return full(groups, epochs, w(epochs))
    if kind == "two_stage":
        phases = two_stage(groups, epochs, head_epochs)
        p2 = phases[1]
        return [phases[0], Phase(p2.name, p2.epochs, p2.trainable, p2.lr_mults, p2.lr_scale, w(p2.epochs))]
    raise ValueError(f"unknown strategy {strategy!r}")


# ---------------------------------------------------------------- applying a phase to a model


def _params(items) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for it in items:
        out.extend([it] if isinstance(it, nn.Parameter) else it.parameters())
    return out


def apply_phase(model, phase: Phase) -> list[dict]:
    """Set requires_grad per group and return the optimizer's parameter groups (one per trainable group)."""
    groups = model.groups()
    unknown = set(phase.trainable) - set(groups) - {HEAD}
    if unknown:
        raise ValueError(f"phase {phase.name} names unknown groups {sorted(unknown)}")
    param_groups = []
    for name, items in groups.items():
        on = name in phase.trainable
        ps = _params(items)
        for p in ps:
            p.requires_grad_(on)
        if on:
            param_groups.append({"name": name, "params": ps})
    for p in model.head.parameters():
        p.requires_grad_(True)
    param_groups.append({"name": HEAD, "params": list(model.head.parameters())})
    return param_groups


def train_mode(model, phase: Phase) -> None:
    """model.train(), except frozen groups, which stay in eval mode: their BatchNorm statistics
    must not drift and their dropout/stochastic depth must not fire."""
    model.train()
    for name, items in model.groups().items():
        if name not in phase.trainable:
            for it in items:
                if isinstance(it, nn.Module):
                    it.eval()
