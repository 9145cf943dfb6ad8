"""The state a run saves after every epoch (checkpoints/last.pt) and `resume=True` continues from.

On disk it stays the plain dict of CHECKPOINT_VERSION 1 (torch.save of `CheckpointState.to_dict()`), so the
checkpoints of earlier versions of this code load; `from_dict` fills what older files lack."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from domain.errors import CheckpointError

from .modelfile import atomic_save

CHECKPOINT_VERSION = 1


def model_state(model, body_touched: bool) -> dict:
    """The full model once any body layer has trained; before that only the head (the body is
    the pretrained one and is rebuilt on resume)."""
    if body_touched:
        return {"full": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    return {"head": {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}}


def load_model_state(model, st: dict) -> None:
    if "full" in st:
        model.load_state_dict(st["full"])
    else:
        model.head.load_state_dict(st["head"])


@dataclass
class Best:
    """The best epoch so far (lowest val loss) and its weights (a `model_state`)."""

    val_loss: float = float("inf")
    epoch: int | None = None
    val_acc: float | None = None
    state: dict | None = None

    def to_dict(self) -> dict:
        return {"val_loss": self.val_loss, "epoch": self.epoch, "state": self.state, "val_acc": self.val_acc}

    @classmethod
    def from_dict(cls, d: dict) -> Best:
        return cls(d["val_loss"], d["epoch"], d["val_acc"], d["state"])


@dataclass
class CheckpointState:
    """Where a run stands after an epoch: the next phase/epoch to train and everything needed to train it
    exactly as an uninterrupted run would (weights, optimizer, scheduler, RNG, history, the best epoch)."""

    spec: dict
    classes: list[str]
    epoch: int
    phase_index: int
    epoch_in_phase: int
    model: dict
    optimizer: dict
    scheduler: dict
    rng: dict
    best: Best
    scaler: dict | None = None
    history: list[dict] = field(default_factory=list)
    bad_epochs: int = 0
    body_touched: bool = False
    elapsed: float = 0.0
    train_seen: int = 0
    epoch_times: dict[str, list[float]] = field(default_factory=dict)
    accum: int = 1
    search: dict | None = None  # what spec.search chose (a SearchReport as JSON): a resumed run trains with it
    version: int = CHECKPOINT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["best"] = self.best.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointState:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["best"] = Best.from_dict(d["best"])
        kw.setdefault("accum", 1)
        return cls(**kw)


def save_checkpoint(state: CheckpointState, path: Path) -> None:
    atomic_save(state.to_dict(), path)


def load_checkpoint(path: Path, spec: dict, classes: list[str]) -> CheckpointState | None:
    """The checkpoint at `path`, or None when there is none; CheckpointError when it is unreadable or belongs
    to another run (other parameters, other classes)."""
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} is unreadable ({e}): delete it to start the run over") from e
    if ck.get("version") != CHECKPOINT_VERSION or ck.get("spec") != spec:
        raise CheckpointError(f"{path} belongs to a run with other parameters: use another --out "
                              "folder or delete the checkpoint to start over")
    if ck.get("classes") != classes:
        raise CheckpointError(f"{path} was trained on classes {ck.get('classes')}, the data now has "
                              f"{classes}: use another --out folder")
    return CheckpointState.from_dict(ck)
