"""A rich progress bar and epoch table for the command line, driven by the engine's callbacks."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import TaskID

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from domain.callbacks import BatchProgress, Callbacks, EpochMetric

STAGES = {"decode": "decoding images", "features": "computing features", "train": "training", "val": "validating",
          "probe": "fitting linear classifiers", "advise": "measuring how far the images are from ImageNet",
          "folds": "cross-validating linear classifiers", "duplicates": "looking for duplicates",
          "search": "searching the head's parameters", "lr_find": "finding the learning rate"}


class RichCallbacks(Callbacks):
    def __init__(self, quiet: bool = False):
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console, transient=True, disable=quiet)
        self.task: TaskID | None = None
        self.key: tuple[str, int] | None = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def on_start(self, info: dict) -> None:
        counts = info["counts"]
        self.console.print(f"[bold]{len(info['classes'])} classes[/] ({info['layout']}): "
                           f"{sum(counts['train'].values())} train, {sum(counts['val'].values())} val images; "
                           f"device {info['device']}; phases {', '.join(info['phases'])}")

    def on_message(self, message: str) -> None:
        self.console.print(f"[dim]{escape(message)}[/]")

    def on_progress(self, p: BatchProgress) -> None:
        key = (p.stage, p.epoch)
        desc = STAGES.get(p.stage, p.stage) + (f" epoch {p.epoch}/{p.epochs}" if p.epoch else "")
        if key != self.key:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(desc, total=p.total)
            self.key = key
        if self.task is not None:
            self.progress.update(self.task, completed=p.done)

    def on_epoch_end(self, m: EpochMetric) -> None:
        self.console.print(
            f"epoch {m.epoch:>3} {escape('[' + m.phase + ']')} train loss {m.train_loss:.4f} acc {m.train_acc:.3f} | "
            f"val loss {m.val_loss:.4f} acc {m.val_acc:.3f} | lr {m.lr:.2e} | {m.images_per_s:.1f} img/s | "
            f"{m.seconds:.1f}s, eta {m.eta:.0f}s" + (" *" if m.is_best else ""))

    def print_summary(self, result) -> None:
        c = Console()
        c.print(f"[bold]{result.status}[/]: val acc {result.val_acc} (best epoch {result.best_epoch} of "
                f"{result.epochs_run}) in {result.seconds:.1f}s; model: {result.model_path}")
        if result.report:
            t = Table(title="per class (val)")
            for col in ("class", "precision", "recall", "f1", "support"):
                t.add_column(col)
            for name, r in result.report["per_class"].items():
                t.add_row(name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
            c.print(t)
        search = getattr(result, "search", None)
        if search is not None and search.trials:
            pruned = sum(t.state == "pruned" for t in search.trials)
            c.print(f"search: {len(search.trials)} trial(s) ({pruned} pruned) in {search.seconds:.1f}s; trained with "
                    f"trial {search.best_trial}'s " + ", ".join(f"{k} {v:.3g}" for k, v in search.best_params.items()))
        for rt in getattr(search, "lr_find", []):
            c.print(f"learning-rate range test of phase {escape(rt.phase)}: lr {rt.lr:.3g} ({rt.rule})")
        for s in result.skipped:
            c.print(f"[yellow]skipped[/] {escape(s)}")
