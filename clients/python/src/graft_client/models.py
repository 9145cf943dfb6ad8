"""Typed views of what the server returns. They are lenient: fields this client does not know (a newer
server's) are kept, as attributes and in ``model_extra``; most fields have defaults.

:class:`Job` (and :class:`BatchJob`) and :class:`Dataset` are bound to the :class:`~graft_client.Graft` that
fetched them, so they can act: ``job.wait()``, ``job.download(...)``, ``dataset.train(...)``."""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ._progress import Progress
from .errors import JobFailed

if TYPE_CHECKING:
    from ._client import Graft, PathLike

__all__ = ["BatchJob", "BatchRow", "ClassProbability", "Dataset", "EpochMetric", "Evaluation", "ExportCheck",
           "Job", "Prediction", "FINAL_STATUSES"]

FINAL_STATUSES = ("succeeded", "failed", "cancelled")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())


class _Bound(_Model):
    """A model that remembers the client that fetched it."""

    _graft: Any = PrivateAttr(default=None)

    def _bind(self, graft: Graft) -> None:
        self._graft = graft

    @property
    def client(self) -> Graft:
        """The :class:`~graft_client.Graft` client this object came from."""
        if self._graft is None:
            raise RuntimeError(f"this {type(self).__name__} is not bound to a Graft client: get it from one "
                               "(e.g. graft.job(id))")
        graft: Graft = self._graft
        return graft


# ---------------------------------------------------------------------------------------------- datasets


class Dataset(_Bound):
    """A dataset, with what the server's dataset doctor found: its ``layout``, ``classes``, the image
    ``counts`` per split and class, and ``warnings`` (class imbalance, duplicates, unreadable images...)."""

    id: int
    name: str = ""
    workspace_id: int | None = None
    layout: str = ""
    classes: list[str] = Field(default_factory=list)
    counts: dict[str, dict[str, int]] = Field(default_factory=dict, description="{split: {class: images}}")
    warnings: list[str] = Field(default_factory=list)
    num_images: int = 0
    size_bytes: int = 0
    created_at: dt.datetime | None = None
    parent_id: int | None = None
    version: int = 1
    changes: dict[str, Any] | None = None

    def train(self, strategy: str = "features", epochs: int | None = None, **spec: Any) -> Job:
        """Starts a training job on this dataset: see :meth:`Graft.train`."""
        return self.client.train(self.id, strategy=strategy, epochs=epochs, **spec)


# ---------------------------------------------------------------------------------------------- jobs


class EpochMetric(_Model):
    """One epoch of a training run."""

    epoch: int
    phase: str = ""
    train_loss: float | None = None
    train_acc: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    lr: float | None = None
    images_per_s: float | None = None
    seconds: float | None = None
    elapsed: float | None = None
    eta: float | None = None
    is_best: bool = False


class Job(_Bound):
    """A job: a training run (``kind`` "train"), or another kind (``probe``, ``label_issues``,
    ``batch_predict``). ``progress`` goes from 0 to 1; ``status`` is queued, running, succeeded, failed or
    cancelled; ``error`` says why a job failed; ``result`` holds the run's summary when it succeeded."""

    id: int
    workspace_id: int | None = None
    dataset_id: int | None = None
    dataset_version: int = 1
    kind: str = "train"
    status: str = "queued"
    progress: float = 0.0
    stage: str | None = None
    current_epoch: int = 0
    total_epochs: int = 0
    eta_seconds: float | None = None
    best_val_acc: float | None = None
    error: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    spec: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    stale: bool = False
    status_note: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in FINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def _absorb(self, fresh: Job) -> None:
        """Takes the fields of a newer copy of this job."""
        self.__dict__.update(fresh.__dict__)
        if fresh.__pydantic_extra__ is not None:
            self.__pydantic_extra__ = dict(fresh.__pydantic_extra__)
        self.__pydantic_fields_set__ = set(fresh.__pydantic_fields_set__)

    def refresh(self) -> Job:
        """Reads the job again from the server (in place; returns it)."""
        self._absorb(self.client.job(self.id))
        return self

    def cancel(self) -> Job:
        """Asks the server to cancel the job (queued: at once; running: within seconds). A finished job
        raises :class:`~graft_client.Conflict`."""
        self._absorb(self.client._job_from(self.client._json("POST", f"/api/v1/jobs/{self.id}/cancel")))
        return self

    def _describe(self) -> str:
        parts = [self.status]
        if self.stage:
            parts.append(self.stage)
        if self.total_epochs and self.kind == "train":
            parts.append(f"epoch {self.current_epoch}/{self.total_epochs}")
        if self.best_val_acc is not None:
            parts.append(f"val acc {self.best_val_acc:.3f}")
        if self.eta_seconds is not None and not self.finished:
            parts.append(f"eta {self.eta_seconds:.0f} s")
        return ", ".join(parts)

    def wait(self, timeout: float | None = None, poll: float = 2.0, progress: bool | None = None) -> Job:
        """Waits for the job to end, showing its progress (``progress=False``: silently; default: the
        client's setting), and returns it, finished (updated in place).

        Raises :class:`~graft_client.JobFailed` (with the server's error) when it failed or was cancelled,
        and :class:`TimeoutError` after ``timeout`` seconds (the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        show = self.client.progress if progress is None else progress
        with Progress(100, f"job {self.id}", unit="%", enabled=show) as bar:
            while True:
                self.refresh()
                bar.update_to(round(100 * max(0.0, min(1.0, self.progress)), 1))
                bar.note(self._describe())
                if self.finished:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id} did not finish within {timeout} s: it is {self._describe()}")
                time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        if self.status != "succeeded":
            why = self.error or self.status_note or ("cancelled" if self.status == "cancelled" else "no reason given")
            raise JobFailed(f"job {self.id} {self.status}: {why}", self)
        return self

    def metrics(self) -> list[EpochMetric]:
        """The job's epochs so far (losses, accuracies, learning rate, speed)."""
        return [EpochMetric.model_validate(m) for m in self.client._json("GET", f"/api/v1/jobs/{self.id}/metrics")]

    def evaluation(self) -> Evaluation:
        """The evaluation of a succeeded training job on its val set (accuracy, confusion matrix, per-class
        scores, most confident mistakes, the exports and their checks, calibration)."""
        return Evaluation.model_validate(self.client._json("GET", f"/api/v1/jobs/{self.id}/evaluation"))

    def download(self, path: PathLike = ".", format: str = "onnx") -> Path:
        """Downloads the trained model in ``format`` (``onnx``, ``pytorch``, ``torchscript``, ``model_card``, or
        another the server offers) to ``path``: a file, or a folder to put it in under the server's name for it
        (one that exists, or a string ending in "/"). Streamed to disk; returns the file's path. An export that
        failed its check raises :class:`~graft_client.Conflict` with the server's reason."""
        return self.client._download(f"/api/v1/jobs/{self.id}/model", path, params={"format": format})

    def predict(self, paths: PathLike | Sequence[PathLike], explain: bool = False, top_k: int = 3) -> list[Prediction]:
        """Classifies images with this job's model: see :meth:`Graft.predict`."""
        return self.client.predict(self.id, paths, explain=explain, top_k=top_k)

    def batch_predict(self, folder_or_zip: PathLike, top_k: int = 3, **kw: Any) -> BatchJob:
        """Starts a batch prediction with this job's model: see :meth:`Graft.batch_predict`."""
        return self.client.batch_predict(self.id, folder_or_zip, top_k=top_k, **kw)


class BatchJob(Job):
    """A batch prediction (``kind`` "batch_predict"): ``wait()`` for it, then read its :meth:`results` or
    download the CSV (:meth:`download_results`) and the images sorted into one folder per predicted class
    (:meth:`download_sorted`). Before it has finished, those raise :class:`~graft_client.Conflict`."""

    kind: str = "batch_predict"

    def wait(self, timeout: float | None = None, poll: float = 2.0, progress: bool | None = None) -> BatchJob:
        super().wait(timeout, poll, progress)
        return self

    def refresh(self) -> BatchJob:
        super().refresh()
        return self

    def results(self) -> list[BatchRow]:
        """The results CSV, parsed: one row per image, in the CSV's order."""
        r = self.client._request("GET", f"/api/v1/jobs/{self.id}/results.csv")
        return BatchRow.parse_csv(r.text)

    def download_results(self, path: PathLike = ".") -> Path:
        """Downloads the results CSV (``file,label,probability,abstained,top1,p1,...,error``) to ``path`` (a
        file, or a folder); returns the file's path."""
        return self.client._download(f"/api/v1/jobs/{self.id}/results.csv", path, default_name=f"batch-{self.id}.csv")

    def download_sorted(self, path: PathLike = ".") -> Path:
        """Downloads the zip of the images sorted into one folder per predicted class (plus ``abstained/``)
        to ``path`` (a file, or a folder); returns the file's path."""
        return self.client._download(f"/api/v1/jobs/{self.id}/results.zip", path, default_name=f"batch-{self.id}.zip")


# ---------------------------------------------------------------------------------------------- predictions


class ClassProbability(_Model):
    """A class and its (calibrated, when the job has a temperature) probability."""

    label: str = Field(alias="class")
    probability: float


class Prediction(_Model):
    """One image's answer: its top-k classes, whether the model abstained (and why), its out-of-distribution
    score; or ``error``, why that image alone could not be classified."""

    file: str
    top: list[ClassProbability] | None = None
    error: str | None = None
    abstained: bool | None = None
    ood_score: float | None = None
    abstain_reason: str | None = None
    heatmap_png: str | None = Field(None, description="With explain=True: a base64 grayscale PNG (Grad-CAM)")

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.top)

    @property
    def label(self) -> str | None:
        """The most probable class (None if the image failed)."""
        return self.top[0].label if self.top else None

    @property
    def probability(self) -> float | None:
        """The most probable class's probability."""
        return self.top[0].probability if self.top else None


def _float(v: str | None) -> float | None:
    if v is None or v.strip() == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None


def _bool(v: str | None) -> bool | None:
    if v is None or v.strip() == "":
        return None
    return v.strip().lower() in ("1", "true", "yes", "y", "t")


class BatchRow(_Model):
    """One row of a batch prediction's results: the image, its class and probability, whether the model
    abstained, the top-k classes, or the ``error`` that image alone met."""

    file: str
    label: str | None = None
    probability: float | None = None
    abstained: bool | None = None
    top: list[ClassProbability] = Field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.error

    @classmethod
    def from_csv_row(cls, row: dict[str, str | None]) -> BatchRow:
        """A row of the CSV (``csv.DictReader``'s dict): top1/p1, top2/p2... become ``top``; columns this
        client does not know are kept as extra fields (as text)."""
        top: list[ClassProbability] = []
        k = 1
        while f"top{k}" in row:
            name, p = row.get(f"top{k}"), _float(row.get(f"p{k}"))
            if name:
                top.append(ClassProbability(label=name, probability=p if p is not None else float("nan")))
            k += 1
        known = {"file", "label", "probability", "abstained", "error"} | \
            {f"top{i}" for i in range(1, k)} | {f"p{i}" for i in range(1, k)}
        extra = {key: value for key, value in row.items() if key and key not in known}
        return cls(file=row.get("file") or "", label=row.get("label") or None,
                   probability=_float(row.get("probability")), abstained=_bool(row.get("abstained")), top=top,
                   error=row.get("error") or None, **extra)

    @classmethod
    def parse_csv(cls, text: str) -> list[BatchRow]:
        """Every row of a results CSV."""
        import csv
        import io

        return [cls.from_csv_row(row) for row in csv.DictReader(io.StringIO(text))]


# ---------------------------------------------------------------------------------------------- evaluation


class ExportCheck(_Model):
    """One export of a trained model: whether it is offered (``ok``), why not (``error``), and its figures
    against the PyTorch model (``parity``: images, max_abs_prob_diff, top1_agreement)."""

    format: str
    ok: bool = True
    error: str | None = None
    parity: dict[str, Any] | None = None


class Evaluation(_Model):
    """How good a job's model is on its val set."""

    job_id: int
    accuracy: float | None = None
    macro_f1: float | None = None
    classes: list[str] = Field(default_factory=list)
    confusion_matrix: list[list[int]] = Field(default_factory=list, description="Rows: true class")
    per_class: dict[str, dict[str, Any]] = Field(default_factory=dict)
    top_k: dict[str, float] = Field(default_factory=dict)
    images: int = 0
    mistakes: list[dict[str, Any]] = Field(default_factory=list, description="Most confident mistakes first")
    exports: list[ExportCheck] = Field(default_factory=list)
    calibration: dict[str, Any] | None = None
    abstain: dict[str, Any] | None = None
    ood: dict[str, Any] | None = None
    confusion_matrix_png: str | None = None
    reliability_png: str | None = None
