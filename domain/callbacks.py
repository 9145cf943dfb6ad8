"""The callback interface between the engine and whoever runs it (CLI progress bar, queue worker)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class EpochMetric:
    epoch: int  # 1-based, counted across phases
    phase: str
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    images_per_s: float  # training images per second in this epoch's training pass
    seconds: float  # this epoch, evaluation included
    elapsed: float  # since the run started
    eta: float  # estimated seconds left
    is_best: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchProgress:
    stage: str  # "decode", "features", "train" or "val"
    epoch: int  # 0 before the first epoch
    epochs: int
    done: int
    total: int
    elapsed: float
    eta: float
    fraction: float  # of the whole run, 0-1


class Callbacks:
    """Override what you need. `should_stop` is polled between batches: return True to cancel."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_message(self, message: str) -> None: ...

    def on_progress(self, p: BatchProgress) -> None: ...

    def on_epoch_end(self, m: EpochMetric) -> None: ...

    def on_checkpoint(self, path: Path, kind: str) -> None: ...

    def should_stop(self) -> bool:
        return False


class CallbackList(Callbacks):
    def __init__(self, *cbs: Callbacks | None) -> None:
        self.cbs = [c for c in cbs if c is not None]

    def on_start(self, info: dict[str, Any]) -> None:
        for c in self.cbs:
            c.on_start(info)

    def on_message(self, message: str) -> None:
        for c in self.cbs:
            c.on_message(message)

    def on_progress(self, p: BatchProgress) -> None:
        for c in self.cbs:
            c.on_progress(p)

    def on_epoch_end(self, m: EpochMetric) -> None:
        for c in self.cbs:
            c.on_epoch_end(m)

    def on_checkpoint(self, path: Path, kind: str) -> None:
        for c in self.cbs:
            c.on_checkpoint(path, kind)

    def should_stop(self) -> bool:
        return any(c.should_stop() for c in self.cbs)
