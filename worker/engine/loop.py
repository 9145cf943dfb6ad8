"""The epoch loops: one epoch of the head on cached features, one epoch on images (micro-batches with
gradient accumulation, autocast, an optional GradScaler), predicting a set of images, and the out-of-memory
retry that reruns an epoch from its saved state with half the micro-batch."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from domain.errors import SpecError

from .device import cpu_copy, is_oom, rng_state, set_rng_state

log = logging.getLogger(__name__)

# called after each batch with (batches done, batches in all, the loop's start time, images seen)
OnBatch = Callable[[int, int, float, int], None]


class Shard(Protocol):
    """This process's share of a data-parallel run (worker.engine.distributed): `world` processes each take
    `part` of every micro-batch; `total` adds numbers up over all processes."""

    world: int

    def part(self, t: torch.Tensor) -> torch.Tensor: ...

    def total(self, *values: float) -> list[float]: ...


class MultiLabel:
    """The multi-label objective (issue 16): an image's label is an index into the dataset's label sets, whose
    multi-hot rows are `targets` [sets, classes]; the loss is binary cross-entropy per class averaged over the
    classes, each class's positives weighted by `pos_weight` (balance.py; None: 1). Passed where a multi-class
    run passes its class weights, so that every loop, the data-parallel runs and the searches take it as is."""

    def __init__(self, targets: torch.Tensor, pos_weight: torch.Tensor | None = None):
        self.targets, self.pos_weight = targets.float(), pos_weight

    def to(self, device: torch.device | str) -> MultiLabel:
        return MultiLabel(self.targets.to(device), None if self.pos_weight is None else self.pos_weight.to(device))

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weighted: bool = True
             ) -> torch.Tensor:
        t = self.targets.to(logits.device)[y.to(logits.device)]
        pw = self.pos_weight.to(logits.device) if weighted and self.pos_weight is not None else None
        per_image = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw, reduction="none").mean(1)
        return per_image.sum() if reduction == "sum" else per_image.mean()

    def hit_count(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images whose every label is right at 0.5 (the subset accuracy's count), as a tensor on the device."""
        t = self.targets.to(logits.device)[y.to(logits.device)] > 0.5
        return ((logits > 0) == t).all(1).sum()

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> int:
        return int(self.hit_count(logits, y).item())


Weighting = torch.Tensor | MultiLabel | None  # a multi-class run's class weights, or the multi-label objective


def hit_count(logits: torch.Tensor, y: torch.Tensor, weighting: Weighting = None) -> torch.Tensor:
    """Right answers in a batch, as a tensor on the device (no wait for the GPU): the top class (multi-class),
    every label at 0.5 (multi-label)."""
    if isinstance(weighting, MultiLabel):
        return weighting.hit_count(logits, y)
    return (logits.argmax(1) == y).sum()


def hits(logits: torch.Tensor, y: torch.Tensor, weighting: Weighting = None) -> int:
    return int(hit_count(logits, y, weighting).item())


def val_loss(logits: torch.Tensor, y: torch.Tensor, weighting: Weighting = None) -> float:
    """The unweighted loss that early stopping and the best epoch go by."""
    if isinstance(weighting, MultiLabel):
        return weighting.loss(logits.float(), y, weighted=False).item()
    return F.cross_entropy(logits.float(), y).item()


def loss_fn(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float, class_weights: Weighting,
            reduction: str = "mean") -> torch.Tensor:
    """The training loss: cross-entropy with label smoothing, each image's term times its class's weight
    (`class_weights`, see balance.py; None: 1). "mean" divides by the images, not by the weights, so that
    micro-batches and data-parallel parts add up to the whole batch's loss. A MultiLabel objective gives its
    own loss (no label smoothing)."""
    if isinstance(class_weights, MultiLabel):
        return class_weights.loss(logits, y, reduction)
    if class_weights is None:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction=reduction)
    per_image = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none") * class_weights[y]
    return per_image.sum() if reduction == "sum" else per_image.mean()


def micro_batch(batch_size: int, accum: int) -> int:
    """The batch that goes through the model at once: batch_size split into `accum` parts."""
    return max(1, math.ceil(batch_size / accum))


def train_epoch_on_features(head, feats: torch.Tensor, labels: list[int], opt, sched, device: torch.device,
                            batch_size: int, label_smoothing: float, on_batch: OnBatch,
                            class_weights: Weighting = None):
    """One epoch of the head on precomputed features, in a random order (`class_weights`: see `loss_fn`).
    Returns (mean loss, accuracy, images seen, seconds)."""
    y_all = torch.tensor(labels)
    head.train()
    perm = torch.randperm(len(y_all))
    n_batches = math.ceil(len(perm) / batch_size)
    loss_sum, correct, seen = 0.0, 0, 0
    t = time.perf_counter()
    for b in range(n_batches):
        sel = perm[b * batch_size:(b + 1) * batch_size]
        x, y = feats[sel].to(device), y_all[sel].to(device)
        logits = head(x)
        loss = loss_fn(logits.float(), y, label_smoothing, class_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(y)
        correct += hits(logits, y, class_weights)
        seen += len(y)
        on_batch(b + 1, n_batches, t, seen)
    return loss_sum / seen, correct / seen, seen, time.perf_counter() - t


def train_epoch_on_images(model, loader, opt, sched, scaler, inputs: Callable, autocast: Callable, micro: int,
                          device: torch.device, label_smoothing: float, on_batch: OnBatch,
                          shard: Shard | None = None, class_weights: Weighting = None):
    """One optimizer step per batch of the loader; each batch goes through the model in micro-batches of
    `micro` images whose gradients add up to the whole batch's. The caller sets the train/eval modes.
    With `shard` (data-parallel: every process iterates the same global batches) this process trains on its
    part of each micro-batch, its loss scaled so that the gradients DistributedDataParallel averages are the
    whole batch's; the figures returned are those of all processes together. `class_weights`: see `loss_fn`.
    Returns (mean loss, accuracy, images seen, seconds). The loss and the right answers add up on the device:
    reading them every step would make the CPU wait for the GPU, so that the next batch's loading and
    augmentation could not overlap this one's step."""
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    correct_acc = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    t = time.perf_counter()
    for b, (x_all, y_all) in enumerate(loader):
        n = len(y_all)
        opt.zero_grad(set_to_none=True)
        for x, y in zip(x_all.split(micro), y_all.split(micro)):
            if shard is not None:
                x, y = shard.part(x), shard.part(y)  # may be empty: the process still joins the gradient sync
            x, y = inputs(x), y.to(device)
            with autocast():
                logits = model(x)
            if shard is not None:  # DDP averages over `world` processes: sum / n * world makes it the batch mean
                loss = loss_fn(logits.float(), y, label_smoothing, class_weights, reduction="sum")
                loss = loss * (shard.world / n)
            else:
                loss = loss_fn(logits.float(), y, label_smoothing, class_weights)
                if len(y) != n:
                    loss = loss * (len(y) / n)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_acc += loss.detach().double() * (n / (shard.world if shard is not None else 1))
            correct_acc += hit_count(logits, y, class_weights)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        seen += n
        on_batch(b + 1, len(loader), t, seen)
    loss_sum, correct = loss_acc.item(), int(correct_acc.item())
    if shard is not None:
        loss_sum, all_correct = shard.total(loss_sum, correct)
        correct = round(all_correct)
    return loss_sum / seen, correct / seen, seen, time.perf_counter() - t


@torch.inference_mode()
def predict(model, loader, inputs: Callable, autocast: Callable, micro: int,
            on_batch: Callable[[int, int, float], None] | None = None) -> torch.Tensor:
    """Logits for every image of the loader (float32, CPU), in eval mode."""
    model.eval()
    out = []
    t = time.perf_counter()
    for b, (x_all, _) in enumerate(loader):
        for x in x_all.split(micro):
            with autocast():
                out.append(model(inputs(x)).float())  # on the device until the end: no wait per batch
        if on_batch is not None:
            on_batch(b + 1, len(loader), t)
    return torch.cat(out).cpu()


def retry_on_oom(epoch: Callable[[int], object], model, opt, sched, scaler, device: torch.device,
                 batch_size: int, accum: int, on_message: Callable[[str], None]):
    """Run `epoch(micro)`. Out of GPU memory: restore the state of the epoch's start, halve the micro-batch
    (accumulating gradients so that every optimizer step still sees batch_size images), say so, and run the
    epoch again; give up at one image per micro-batch. Returns (epoch's result, accum used)."""
    snap = {"model": cpu_copy(model.state_dict()), "optimizer": cpu_copy(opt.state_dict()),
            "scheduler": cpu_copy(sched.state_dict()), "scaler": scaler.state_dict() if scaler else None,
            "rng": rng_state()}
    while True:
        try:
            return epoch(micro_batch(batch_size, accum)), accum
        except Exception as e:
            if not is_oom(e):
                raise
            detail = str(e).split("\n")[0][:200]
        # out of the except block, so that the failed step's tensors (held by the traceback) are freed
        before = micro_batch(batch_size, accum)
        if before <= 1:
            raise SpecError(f"out of memory even with one image at a time ({detail}): pick a smaller "
                            "image_size or backbone, or free the GPU")
        while micro_batch(batch_size, accum) == before:
            accum *= 2
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model.load_state_dict(snap["model"])
        opt.load_state_dict(snap["optimizer"])
        sched.load_state_dict(snap["scheduler"])
        if scaler is not None and snap["scaler"]:
            scaler.load_state_dict(snap["scaler"])
        set_rng_state(snap["rng"])
        msg = (f"out of memory at batch size {before}: retrying the epoch with batch {micro_batch(batch_size, accum)}"
               f" x {accum} accumulation")
        log.warning("%s (%s)", msg, detail)
        on_message(msg)
