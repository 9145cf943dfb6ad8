"""The trained-model file and atomic saving.

A model file holds everything needed to use the model later without Graft's run folder: the class
names, the backbone, the preprocessing, the run's parameters, the final metrics and the weights.
It loads with `torch.load(weights_only=True)` (plain containers and tensors only, no pickled code).
An optional `trust` entry (trust.TrustFit.state: temperature, confidence threshold, the OOD detector's bank)
makes predictions calibrated and able to abstain; files without it predict as before.
"""
from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from domain.errors import CheckpointError

from .backbones import GraftNet, Preprocessing, build_model

MODEL_FORMAT = "graft.model"
MODEL_FORMAT_VERSION = 1


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a reader (or a crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_model_file(path: Path, model: GraftNet, classes: list[str], pre: Preprocessing, spec: dict,
                    metrics: dict, weights: str, trust: dict | None = None, labels: dict | None = None) -> None:
    """`labels`: a multi-label model's {"task": "multilabel", "thresholds": [per class]} (kept at the top level)."""
    extra = {"trust": trust} if trust else {}
    extra.update(labels or {})
    atomic_save({
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "backbone": model.info.name,
        "classes": list(classes),
        "preprocessing": pre.to_dict(),
        "spec": spec,
        "metrics": metrics,
        "pretrained_weights": weights,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        **extra,
    }, path)


def read_model_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: give the model.pt written by `graft train`")
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable Graft model file ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a Graft model file (no '{MODEL_FORMAT}' header)")
    if meta.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer Graft: upgrade Graft to read it")
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GraftNet, dict]:
    """The model (eval mode, on `device`) and the file's metadata (classes, preprocessing, ...)."""
    meta = read_model_file(path)
    dropout = float(meta.get("spec", {}).get("dropout", 0.0))
    model = build_model(meta["backbone"], len(meta["classes"]), pretrained=False, dropout=dropout)
    try:
        model.load_state_dict(meta["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {meta['backbone']} ({e})") from e
    model.to(device).eval()
    return model, {k: v for k, v in meta.items() if k != "state_dict"}
