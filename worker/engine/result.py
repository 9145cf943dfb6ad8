"""What `run()` returns: the finished run's figures, its history and where its model file is."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domain.callbacks import EpochMetric
from domain.results import RunSummary, SearchReport


@dataclass
class RunResult:
    status: str  # "completed", "early_stopped" or "stopped"
    classes: list[str]
    val_acc: float | None = None
    val_loss: float | None = None
    best_epoch: int | None = None
    epochs_run: int = 0
    seconds: float = 0.0
    train_images_per_s: float = 0.0
    model_path: str | None = None
    history: list[EpochMetric] = field(default_factory=list)
    report: dict[str, Any] | None = None  # domain.evaluate.evaluation(): an EvaluationReport as JSON
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    device: str = "cpu"
    counts: dict[str, dict[str, int]] | None = None
    val_files: list[str] = field(default_factory=list)  # absolute paths of the val images used
    max_epochs: int | None = None  # the most epochs it could have trained (early stopping ends it before)
    effective: dict[str, Any] = field(default_factory=dict)  # the parameters as applied (RunSummary.effective)
    search: SearchReport | None = None  # what spec.search tried and chose (stored as the summary's `search`)
    trust: dict[str, Any] | None = None  # calibration, abstain, ood (engine.trust.fit_trust's report)

    def summary(self) -> RunSummary:
        """The run's figures, typed (a job's stored result adds the report and the exports)."""
        return RunSummary.model_validate({
            "status": self.status,
            "val_acc": self.val_acc,
            "val_loss": self.val_loss,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "max_epochs": self.max_epochs,
            "effective": self.effective,
            "seconds": round(self.seconds, 3),
            "train_images_per_s": round(self.train_images_per_s, 2),
            "classes": self.classes,
            "counts": self.counts,
            "model_path": self.model_path,
            "device": self.device,
            "macro_f1": self.report["macro_f1"] if self.report else None,
            "skipped": self.skipped,
            "warnings": self.warnings,
            **({"search": self.search.model_dump(mode="json")} if self.search is not None else {}),
            "trust": self.trust,
        })
