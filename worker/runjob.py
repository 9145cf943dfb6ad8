"""The bridge between the queue, the database and the engine: claim a job row, run the engine with a
reporter that writes progress and metrics into the database, record the outcome. Nothing else."""
from __future__ import annotations

import datetime as dt
import logging
import socket
from pathlib import Path
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.settings import Settings, get_settings
from app.db.models import Artifact, Dataset, EpochMetric, Job, JobEvent, JobStatus
from app.db.session import session_factory
from worker.engine.callbacks import BatchProgress, Callbacks
from worker.engine.callbacks import EpochMetric as EngineEpoch
from worker.engine.files import sha256_file

log = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def add_event(s: Session, job_id: int, kind: str, data: dict) -> None:
    s.add(JobEvent(job_id=job_id, kind=kind, data=data))


class Reporter(Callbacks):
    """Engine callbacks -> rows. Batch progress is written at most every `interval` seconds; the cancel
    flag is read at most once a second."""

    def __init__(self, sessions: sessionmaker[Session], job_id: int, interval: float = 2.0):
        self.S, self.job_id, self.interval = sessions, job_id, interval
        self._last_write = 0.0
        self._last_poll = 0.0
        self._stop = False
        self.total_epochs = 0

    def _update(self, **values) -> None:
        with self.S() as s:
            s.execute(update(Job).where(Job.id == self.job_id).values(heartbeat_at=utcnow(), **values))
            s.commit()

    def on_start(self, info: dict) -> None:
        self.total_epochs = info["epochs"]
        self._update(total_epochs=info["epochs"], stage="decode")

    def on_message(self, message: str) -> None:
        with self.S() as s:
            add_event(s, self.job_id, "message", {"message": message})
            s.commit()

    def on_progress(self, p: BatchProgress) -> None:
        now = time.monotonic()
        if now - self._last_write < self.interval:
            return
        self._last_write = now
        self._update(progress=round(min(p.fraction, 0.999), 4), stage=p.stage, eta_seconds=round(p.eta, 1),
                     current_epoch=max(p.epoch - 1, 0) if p.stage in ("train", "val") else 0)

    def on_epoch_end(self, m: EngineEpoch) -> None:
        d = m.to_dict()
        with self.S() as s:
            existing = s.scalar(select(EpochMetric).where(EpochMetric.job_id == self.job_id,
                                                          EpochMetric.epoch == m.epoch))
            if existing is None:  # a resumed run may report an epoch again
                s.add(EpochMetric(job_id=self.job_id, **d))
            best = s.scalar(select(Job.best_val_acc).where(Job.id == self.job_id))
            values = dict(current_epoch=m.epoch, eta_seconds=round(m.eta, 1), heartbeat_at=utcnow(),
                          progress=round(min(m.elapsed / (m.elapsed + m.eta), 0.999), 4) if m.elapsed + m.eta else 0)
            if m.is_best or best is None:
                values["best_val_acc"] = m.val_acc
            s.execute(update(Job).where(Job.id == self.job_id).values(**values))
            add_event(s, self.job_id, "epoch", d)
            s.commit()
        self._last_write = time.monotonic()

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._last_poll >= 1.0:
            self._last_poll = now
            with self.S() as s:
                self._stop = bool(s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self._stop


def _finish(S: sessionmaker[Session], job_id: int, status: str, error: str | None = None,
            result: dict | None = None) -> None:
    with S() as s:
        values = dict(status=status, error=error, finished_at=utcnow(), heartbeat_at=utcnow(), stage=None)
        if status == JobStatus.succeeded.value:
            values.update(progress=1.0, eta_seconds=0.0)
        if result is not None:
            values["result"] = result
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        add_event(s, job_id, "status", {"status": status, "error": error})
        s.commit()


def execute(job_id: int, settings: Settings | None = None) -> str:
    """Run job `job_id` if it is still queued (idempotent: a second delivery finds it claimed)."""
    settings = settings or get_settings()
    S = session_factory(settings.db_url)
    with S() as s:
        claimed = s.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False))
            .values(status=JobStatus.running.value, started_at=utcnow(), heartbeat_at=utcnow(),
                    worker=socket.gethostname())
        ).rowcount
        if not claimed:
            job = s.get(Job, job_id)
            log.info("job %s not claimed (status %s)", job_id, job.status if job else "missing")
            return "skipped"
        add_event(s, job_id, "status", {"status": JobStatus.running.value, "error": None})
        s.commit()
        job = s.get(Job, job_id)
        dataset = s.get(Dataset, job.dataset_id)
        spec_data, data_rel = dict(job.spec), dataset.path

    from worker.engine.errors import GraftError
    from worker.engine.runner import run
    from worker.engine.spec import RunSpec

    out = settings.runs_dir / str(job_id)
    try:
        spec = RunSpec(**spec_data)
        result = run(spec, settings.data_dir / data_rel, out, Reporter(S, job_id, settings.progress_interval_s),
                     resume=(out / "checkpoints" / "last.pt").is_file(), cache_dir=settings.features_cache_dir)
    except GraftError as e:
        _finish(S, job_id, JobStatus.failed.value, str(e))
        return "failed"
    except Exception as e:  # a bug or an environment problem: say so, keep the worker alive
        log.exception("job %s crashed", job_id)
        _finish(S, job_id, JobStatus.failed.value, f"internal error: {type(e).__name__}: {e}. The worker log has "
                "the details; retry the job or report the problem.")
        return "failed"
    if result.status == "stopped":
        _finish(S, job_id, JobStatus.cancelled.value, "cancelled on request")
        return "cancelled"
    exports = _export(Reporter(S, job_id), out, result.val_files)
    with S() as s:
        for kind, name in (("model", "model.pt"), ("metrics", "metrics.json"), ("model_card", "model_card.json"),
                           ("torchscript", "model.torchscript.pt"), ("onnx", "model.onnx"),
                           ("confusion_matrix", "confusion_matrix.png")):
            p = out / name
            if p.is_file() and not s.scalar(select(Artifact.id).where(Artifact.job_id == job_id,
                                                                     Artifact.kind == kind)):
                s.add(Artifact(job_id=job_id, kind=kind, path=str(p.relative_to(settings.data_dir)),
                               size=p.stat().st_size, sha256=sha256_file(p)))
        s.commit()
    summary = result.summary()
    summary["report"] = result.report
    summary["exports"] = exports
    _finish(S, job_id, JobStatus.succeeded.value, None, summary)
    return "succeeded"


def _export(reporter: Reporter, out, val_files: list[str]) -> list[dict]:
    """TorchScript and ONNX (checked against PyTorch on the val images) next to model.pt. A failed export is
    recorded with its reason and figures; it never fails the job."""
    from worker.engine.export import export_all

    try:
        results = [r.to_dict() for r in export_all(out / "model.pt", out, [Path(p) for p in val_files])]
    except Exception as e:  # an exporter bug must not lose a trained model
        log.exception("exports failed")
        return [{"format": f, "path": None, "ok": False, "error": f"export crashed: {type(e).__name__}: {e}",
                 "parity": None} for f in ("torchscript", "onnx")]
    for r in results:
        if not r["ok"]:
            reporter.on_message(f"{r['format']} export failed: {r['error']}")
    return [{k: v for k, v in r.items() if k != "path"} for r in results]


def send_unsent_jobs(settings: Settings | None = None) -> int:
    """Enqueue every queued job that never reached the broker (no celery task id)."""
    from worker.celery_app import enqueue_job

    settings = settings or get_settings()
    S = session_factory(settings.db_url)
    with S() as s:
        ids = s.scalars(select(Job.id).where(Job.status == JobStatus.queued.value, Job.celery_task_id.is_(None),
                                             Job.cancel_requested.is_(False))).all()
        for jid in ids:
            task_id = enqueue_job(jid, settings)
            s.execute(update(Job).where(Job.id == jid).values(celery_task_id=task_id))
            s.commit()
    return len(ids)
