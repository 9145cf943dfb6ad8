"""Progress of a run: batch counts turned into BatchProgress events with the elapsed time, an ETA and a
fraction of the whole that never goes back; stopping on request between batches."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
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


def eta_after_features(phases: Sequence[_Phase], done: int, stage_t0: float, n_train: int, n_val: int,
                       expected: Mapping[int, int] | None = None) -> float:
    """Estimated seconds for all epochs, from the forward speed measured while computing features: an
    epoch on images costs about 3 forward passes per train image and one per val image. `expected`: the
    epochs a phase (by index) is expected to run when early stopping ends it before its maximum."""
    per_image = (time.perf_counter() - stage_t0) / max(done, 1)
    ex = expected or {}
    return sum(ex.get(i, p.epochs) * (FROZEN_EPOCH_S if p.backbone_frozen else (3 * n_train + n_val) * per_image)
               for i, p in enumerate(phases))


P = TypeVar("P", bound=_Phase)


def eta_after_epoch(phases: Sequence[P], epoch: int, estimate: Callable[[P], float],
                    expected: Mapping[int, int] | None = None) -> float:
    """Estimated seconds for the epochs after `epoch` (counted across phases). `expected`: the epochs a phase
    (by index) ran or is expected to run when early stopping ends it before its maximum (see
    `expected_epochs`); the next phase's epochs are numbered from there, as the run numbers them."""
    left, e = 0.0, 0
    ex = expected or {}
    for i, phase in enumerate(phases):
        for _ in range(min(phase.epochs, ex.get(i, phase.epochs))):
            e += 1
            if e > epoch:
                left += estimate(phase)
    return left


def expected_epochs(max_epochs: int, done: int, bad_epochs: int, patience: int | None, stopped: bool = False) -> int:
    """How many epochs a phase that trains until val loss stops improving will probably run, for the ETA:
    at least until `patience` epochs without improvement could end it, and not before a first guess of
    3 x patience epochs (measured: 25 to 32 epochs of a head on cached features with patience 10), never
    more than its maximum. `stopped`: early stopping has just ended it after `done` epochs."""
    if stopped:
        return done
    if patience is None:
        return max_epochs
    return min(max_epochs, max(done + patience - bad_epochs, 3 * patience))


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
