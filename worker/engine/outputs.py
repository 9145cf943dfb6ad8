"""What a finished run leaves in its folder: model.pt (the best epoch), confusion_matrix.png and
metrics.json (the summary, the history and the evaluation report)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from domain.callbacks import Callbacks, EpochMetric
from domain.evaluate import confusion_png
from domain.results import SearchReport
from domain.spec import RunSpec

from .backbones import GraftNet, Preprocessing
from .balance import ClassWeighting, LabelWeighting
from .freeze import HEAD, Phase
from .modelfile import save_model_file
from .result import RunResult

log = logging.getLogger(__name__)


def effective_parameters(spec: RunSpec, max_epochs: int, pre: Preprocessing, weighting: ClassWeighting | LabelWeighting | None,
                         search: SearchReport | None = None, phases: list[Phase] | None = None) -> dict[str, Any]:
    """The parameters as a run applies them, where its spec leaves the choice to it (RunSummary.effective); with
    a search, the ones it chose, and the head's learning rate in each phase."""
    out = {"max_epochs": max_epochs, "until_plateau": spec.until_plateau,
            "early_stopping": f"val loss, patience {p}" if (p := spec.effective_patience()) is not None else "off",
            "lr": spec.effective_lr(), "label_smoothing": spec.effective_label_smoothing(), "image_size": pre.image_size,
            "class_weighting": weighting.describe() if weighting is not None else None}
    if search is not None:
        out.update(weight_decay=spec.weight_decay, dropout=spec.dropout, searched=sorted(search.best_params),
                   lr_by_phase={p.name: p.lr_for(HEAD, spec.effective_lr()) for p in phases or []})
    return out


def write_outputs(out: Path, model: GraftNet, pre: Preprocessing, spec: dict[str, Any], weights: str,
                  result: RunResult, history: list[EpochMetric], cb: Callbacks, trust: dict[str, Any] | None = None,
                  labels: dict[str, Any] | None = None) -> Path:
    """Write the run's files under `out` from `result` (its figures and report set) and the model as it is
    (the best epoch's weights loaded); say so to `cb`. Returns the model file's path."""
    report = result.report or {}
    hist = [h.to_dict() for h in history]
    metrics = {"val_acc": result.val_acc, "val_loss": result.val_loss, "best_epoch": result.best_epoch,
               "epochs_run": result.epochs_run, "max_epochs": result.max_epochs, "effective": result.effective,
               "report": report, "history": hist, "trust": result.trust}
    model_path = out / "model.pt"
    save_model_file(model_path, model, result.classes, pre, spec, metrics, weights, trust, labels)
    cb.on_checkpoint(model_path, "model")
    try:
        if report.get("task") != "multilabel":  # (a multi-label report has per-label confusion counts instead)
            confusion_png(report["confusion_matrix"], result.classes, out / "confusion_matrix.png")
    except Exception as e:  # a picture must never fail a finished run
        log.warning("could not draw the confusion matrix: %s", e)
    result.model_path = str(model_path)
    return model_path


def write_metrics(out: Path, result: RunResult, history: list[EpochMetric]) -> None:
    (out / "metrics.json").write_text(json.dumps(
        {**result.summary().to_json(), "history": [h.to_dict() for h in history], "report": result.report},
        indent=2))
