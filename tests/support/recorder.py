"""Engine callbacks that record what a run reported, and can stop it on cue."""
from __future__ import annotations

from pathlib import Path

from domain.callbacks import Callbacks


class Recorder(Callbacks):
    def __init__(self, stop_after_epoch: int | None = None, stop_in_batch: bool = False):
        self.epochs, self.progress, self.checkpoints, self.messages = [], [], [], []
        self.stop_after_epoch, self.stop_in_batch = stop_after_epoch, stop_in_batch
        self.started = None

    def on_start(self, info):
        self.started = info

    def on_message(self, message):
        self.messages.append(message)

    def on_progress(self, p):
        self.progress.append(p)

    def on_epoch_end(self, m):
        self.epochs.append(m)

    def on_checkpoint(self, path, kind):
        self.checkpoints.append((Path(path), kind))

    def should_stop(self):
        if self.stop_in_batch:
            return any(p.stage == "train" for p in self.progress)
        return self.stop_after_epoch is not None and len(self.epochs) >= self.stop_after_epoch
