"""The bridge between the queue, the database and the engine: claim a job row, run the engine with a
reporter that writes progress and metrics into the database, record the outcome. Nothing else.

A claim is a conditional update (queued -> running) that also counts the attempt; (job id, attempt) then
identifies this run. Every write of a running job is conditional on that pair, and a heartbeat thread
renews `heartbeat_at` every few seconds: if the reaper (worker.reaper) took the job back because the
heartbeat was late, this run finds its row changed, stops, and writes nothing more. A worker that is shut
down (SIGTERM, Ctrl-C) stops its job at the next batch and puts it back in the queue."""
from __future__ import annotations

import logging
import socket
from pathlib import Path

from sqlalchemy import select, update

from app.core.settings import Settings, get_settings
from app.db.models import Artifact, Dataset, Job, JobStatus
from app.db.session import session_factory
from domain.files import sha256_file
from domain.results import RunSummary
from worker.attempt import (  # noqa: F401  (Heartbeat, Reporter, _finish, request_shutdown: imported from here)
    ACTIVE,
    TRAIN_SHARE,
    Heartbeat,
    Reporter,
    _finish,
    _release,
    add_event,
    call_engine,
    owned,
    request_shutdown,
    shutting_down,
    stopped,
    utcnow,
)

log = logging.getLogger(__name__)


def execute(job_id: int, settings: Settings | None = None) -> str:
    """Run job `job_id` if it is still queued (idempotent: a second delivery finds it claimed)."""
    ACTIVE.add(job_id)
    try:
        return _execute(job_id, settings or get_settings())
    finally:
        ACTIVE.discard(job_id)


def _execute(job_id: int, settings: Settings) -> str:
    S = session_factory(settings.db_url)
    # import the engine (torch: seconds) before the claim, so that the job's heartbeat starts right after it
    from domain.spec import RunSpec
    from worker.engine.runner import run

    if shutting_down():  # a message taken while this worker stops: leave the job to another worker
        with S() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value)
                      .values(celery_task_id=None))
            s.commit()
        log.info("job %s left in the queue: this worker is shutting down", job_id)
        return "deferred"
    with S() as s:
        claimed = s.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False))
            .values(status=JobStatus.running.value, started_at=utcnow(), heartbeat_at=utcnow(),
                    worker=socket.gethostname(), attempts=Job.attempts + 1)
        ).rowcount
        if not claimed:
            job = s.get(Job, job_id)
            log.info("job %s not claimed (status %s)", job_id, job.status if job else "missing")
            return "skipped"
        add_event(s, job_id, "status", {"status": JobStatus.running.value, "error": None})
        job = s.get(Job, job_id)
        attempt = job.attempts
        if attempt > 1:
            add_event(s, job_id, "message", {"message": f"attempt {attempt} of {settings.max_attempts}"})
        s.commit()
        dataset = s.get(Dataset, job.dataset_id)
        spec_data, data_rel, kind = dict(job.spec), dataset.path, job.kind

    out = settings.runs_dir / str(job_id)
    reporter = Reporter(S, job_id, settings.progress_interval_s, attempt=attempt)
    heartbeat = Heartbeat(reporter, settings.heartbeat_every_s)
    heartbeat.start()
    try:
        if kind == "probe":  # a backbone comparison (worker.probejob)
            from worker.probejob import run_probe

            return run_probe(S, job_id, attempt, reporter, heartbeat, spec_data, settings.data_dir / data_rel,
                             settings)
        result, outcome = call_engine(S, job_id, attempt, "job", lambda: run(
            RunSpec(**spec_data), settings.data_dir / data_rel, out, reporter,
            resume=(out / "checkpoints" / "last.pt").is_file(), cache_dir=settings.features_cache_dir,
            max_pixels=settings.max_image_pixels))
        if outcome is not None:
            return outcome
        if result.status == "stopped":
            return stopped(S, job_id, attempt, reporter, heartbeat, result.epochs_run)
        reporter._update(stage="export", progress=reporter._forward(1.0), eta_seconds=None)
        exports = _export(reporter, out, result.val_files)
        with S() as s:
            if not reporter._owns(s):
                return "superseded"
            for kind, name in (("model", "model.pt"), ("metrics", "metrics.json"), ("model_card", "model_card.json"),
                               ("torchscript", "model.torchscript.pt"), ("onnx", "model.onnx"),
                               ("confusion_matrix", "confusion_matrix.png")):
                p = out / name
                if p.is_file() and not s.scalar(select(Artifact.id).where(Artifact.job_id == job_id,
                                                                         Artifact.kind == kind)):
                    s.add(Artifact(job_id=job_id, kind=kind, path=str(p.relative_to(settings.data_dir)),
                                   size=p.stat().st_size, sha256=sha256_file(p)))
            s.commit()
        summary = RunSummary.model_validate({**result.summary().to_json(), "report": result.report,
                                             "exports": exports})
        ok = _finish(S, job_id, JobStatus.succeeded.value, None, summary.to_json(), attempt=attempt)
        return "succeeded" if ok else "superseded"
    finally:
        heartbeat.stop()


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
    from worker.reaper import send_unsent

    settings = settings or get_settings()
    return len(send_unsent(session_factory(settings.db_url), settings))
