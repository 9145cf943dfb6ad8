"""Progress of a run: batch counts turned into BatchProgress events with the elapsed time, an ETA and a
fraction of the whole that never goes back; stopping on request between batches."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from domain.callbacks import BatchProgress, Callbacks
from domain.errors import RunStopped

DECODE_SHARE = 0.05  # of the bar given to decoding the images, before any later stage is timed


class Progress:
    """Turns batch counts into BatchProgress events with elapsed time and an ETA."""

    def __init__(self, cb: Callbacks, t0: float, epochs: int):
        self.cb, self.t0, self.epochs = cb, t0, epochs
        self.eta = 0.0
        self.last = 0.0  # fractions only grow

    def __call__(self, stage: str, epoch: int, done: int, total: int, stage_t0: float, eta_after: float = 0.0):
        now = time.perf_counter()
        rate = (now - stage_t0) / max(done, 1)
        eta = rate * (total - done) + eta_after
        elapsed = now - self.t0
        fraction = elapsed / (elapsed + eta) if elapsed + eta > 0 else 0.0
        if stage == "decode":
            # the stages after decoding have not been timed yet, so a time-based share would overstate
            # it (seen: 81% after decoding, then back to 42% once features were being computed)
            fraction = DECODE_SHARE * done / max(total, 1)
        self.last = fraction = max(self.last, fraction)
        self.cb.on_progress(BatchProgress(stage, epoch, self.epochs, done, total, elapsed, eta, fraction))
        if self.cb.should_stop():
            raise RunStopped("stopped on request")


# ---------------------------------------------------------------- how long the rest of a run takes


class _Phase(Protocol):
    @property
    def epochs(self) -> int: ...
    @property
    def backbone_frozen(self) -> bool: ...


FROZEN_EPOCH_S = 0.05  # an epoch of the head on cached features: too short to matter in an ETA


def eta_after_features(phases: Sequence[_Phase], done: int, stage_t0: float, n_train: int, n_val: int) -> float:
    """Estimated seconds for all epochs, from the forward speed measured while computing features: an
    epoch on images costs about 3 forward passes per train image and one per val image."""
    per_image = (time.perf_counter() - stage_t0) / max(done, 1)
    return sum(p.epochs * (FROZEN_EPOCH_S if p.backbone_frozen else (3 * n_train + n_val) * per_image)
               for p in phases)


P = TypeVar("P", bound=_Phase)


def eta_after_epoch(phases: Sequence[P], epoch: int, estimate: Callable[[P], float]) -> float:
    """Estimated seconds for the epochs after `epoch` (counted across phases)."""
    left, e = 0.0, 0
    for phase in phases:
        for _ in range(phase.epochs):
            e += 1
            if e > epoch:
                left += estimate(phase)
    return left


def epoch_estimate(times: list[float] | None, frozen: bool, n_train: int, n_val: int,
                   image_seconds: float | None, feature_rate: float | None) -> float:
    """Seconds one epoch of a phase takes: the mean of the epochs of its kind so far, else a guess from the
    speed measured on the first batches (`image_seconds` per image) or while computing features."""
    if times:
        return sum(times) / len(times)
    if frozen:
        return FROZEN_EPOCH_S
    # forward+backward costs about 3x a forward pass; the val pass is one forward
    if image_seconds:
        return (n_train + n_val / 3) * image_seconds
    if feature_rate:
        return (3 * n_train + n_val) / feature_rate
    return 0.0
