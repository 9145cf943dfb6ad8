"""The bridge between the queue, the database and the engine: claim a job row, run the engine with a
reporter that writes progress and metrics into the database, record the outcome. Nothing else.

A claim is a conditional update (queued -> running) that also counts the attempt; (job id, attempt) then
identifies this run. Every write of a running job is conditional on that pair, and a heartbeat thread
renews `heartbeat_at` every few seconds: if the reaper (worker.reaper) took the job back because the
heartbeat was late, this run finds its row changed, stops, and writes nothing more. A worker that is shut
down (SIGTERM, Ctrl-C) stops its job at the next batch and puts it back in the queue."""
from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core.settings import Settings, get_settings
from app.db.models import Artifact, Dataset, Job, JobEvent, JobKind, JobStatus
from app.db.session import session_factory
from app.services import lifecycle, storage
from domain.exports import AFTER_TRAINING, EXPORT_FORMATS
from domain.files import sha256_file
from domain.results import RunSummary
from worker.attempt import (  # noqa: F401  (Heartbeat, Reporter, _finish, request_shutdown: imported from here)
    ACTIVE,
    TRAIN_SHARE,
    Attempt,
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
from worker.batchjob import run_batch_predict
from worker.labeljob import run_label_issues
from worker.probejob import run_probe

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
    import worker.engine.runner  # noqa: F401

    if shutting_down():  # a message taken while this worker stops: leave the job to another worker
        with S() as s:
            lifecycle.defer(s, job_id)
            s.commit()
        log.info("job %s left in the queue: this worker is shutting down", job_id)
        return "deferred"
    gpu = this_process_gpu(settings)  # chosen at the first job (None on a CPU-only host)
    if too_big_for_this_worker(S, job_id) or (gpu is not None and short_of_gpu_memory(S, job_id, gpu, settings)):
        return "deferred"
    with S() as s:
        # the worker's host and process: several workers may share a host
        job = lifecycle.claim(s, job_id, f"{socket.gethostname()}/{os.getpid()}", settings.max_attempts)
        if job is None:
            s.rollback()
            job = s.get(Job, job_id)
            log.info("job %s not claimed (status %s)", job_id, job.status if job else "missing")
            return "skipped"
        s.commit()
        attempt = job.attempts
        dataset = s.get(Dataset, job.dataset_id)
        if dataset is None:  # deleted meanwhile (a dataset with jobs cannot be deleted)
            ok = _finish(S, job_id, JobStatus.failed.value, f"dataset {job.dataset_id} is gone", attempt=attempt)
            return "failed" if ok else "superseded"
        spec_data, data_rel, kind = dict(job.spec), dataset.path, job.kind

    reporter = Reporter(S, job_id, settings.progress_interval_s, attempt=attempt)
    heartbeat = Heartbeat(reporter, settings.heartbeat_every_s)
    heartbeat.start()
    try:
        handler = JOB_KINDS.get(kind)
        if handler is None:
            ok = _finish(S, job_id, JobStatus.failed.value, f"this worker cannot run jobs of kind {kind!r} (it runs "
                         f"{', '.join(JOB_KINDS)}): upgrade the worker", attempt=attempt)
            return "failed" if ok else "superseded"
        try:  # with object storage: fetched once, then reused; only for the kinds that read it
            data_dir = dataset_dir(settings, data_rel) if kind in NEEDS_DATASET else None
        except (storage.StorageError, FileNotFoundError, ValueError) as e:
            ok = _finish(S, job_id, JobStatus.failed.value, f"the dataset's files could not be read from storage "
                         f"({e}): check GRAFT_STORAGE_URL and the AWS_* settings of this worker, then retry",
                         attempt=attempt)
            return "failed" if ok else "superseded"
        return handler(Attempt(S, job_id, attempt, reporter, heartbeat, spec_data, data_dir, settings))
    finally:
        heartbeat.stop()


def worker_devices() -> int:
    """The devices this worker advertises: $GRAFT_WORKER_DEVICES when set, else its GPUs (1 without any: CPU)."""
    env = os.environ.get("GRAFT_WORKER_DEVICES", "").strip()
    if env:
        return max(1, int(env))
    import torch

    return max(1, torch.cuda.device_count())


def worker_gpus() -> int:
    """The GPUs this worker's pool children spread over: the CUDA devices it sees, at most $GRAFT_WORKER_DEVICES
    when set; 0 on a CPU-only host. (torch.cuda.device_count() asks NVML and leaves CUDA uninitialised, so the
    `graft worker` process may call it before it forks its pool children.)"""
    import torch

    n = torch.cuda.device_count()
    env = os.environ.get("GRAFT_WORKER_DEVICES", "").strip()
    return min(n, max(1, int(env))) if n and env else n


def default_concurrency(jobs_per_gpu: int, gpus: int) -> int:
    """How many jobs `graft worker` runs at once without --concurrency: GRAFT_JOBS_PER_GPU on each of its
    `gpus`; 1 on a CPU-only host (jobs there would only share the same cores)."""
    return jobs_per_gpu * gpus if gpus > 0 else 1


def pool_index() -> int:
    """This process's index in its worker's pool: billiard numbers the prefork children 0..concurrency-1 and a
    child started in place of one that died takes the lowest free index, so the numbers stay 0..N-1; 0 in a solo
    worker (--concurrency 1) and outside a worker."""
    from billiard.process import current_process

    return int(getattr(current_process(), "index", 0) or 0)


_gpu: list = []  # [the GPU this process runs its jobs on (a torch.device), or None], once chosen


def this_process_gpu(settings: Settings):
    """The GPU this process runs its jobs on, chosen at its first job (worker.engine.device.use_gpu): pool child
    i takes GPU i modulo worker_gpus(), capped at its share of the memory with GRAFT_JOBS_PER_GPU > 1. None on a
    CPU-only host, where nothing is touched. (At the first job rather than in Celery's worker_process_init: a
    child that takes longer than 4 s to start, importing torch on a busy host, would be killed by Celery.)"""
    if not _gpu:
        gpus = worker_gpus()
        if gpus == 0:
            _gpu.append(None)
        else:
            from worker.engine.device import use_gpu

            _gpu.append(use_gpu(pool_index(), gpus, settings.jobs_per_gpu))
            log.info("pool child %d runs its jobs on %s (%d job(s) per GPU)", pool_index(), _gpu[0],
                     settings.jobs_per_gpu)
    return _gpu[0]


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def gpu_memory_wait(free_bytes: int, need_bytes: int, device: str) -> str | None:
    """Whether a GPU with `free_bytes` free may take a job that needs `need_bytes` (GRAFT_GPU_JOB_MIN_FREE_MB):
    None when it may, else why the job waits."""
    if free_bytes >= need_bytes:
        return None
    return (f"waiting for GPU memory: {_gib(free_bytes)} free on {device}, a job needs {_gib(need_bytes)} "
            "(GRAFT_GPU_JOB_MIN_FREE_MB)")


def _wait_in_queue(S, job_id: int, reason: Callable[[Job], str | None]) -> bool:
    """Leave a queued training job in the queue when `reason(job)` says why: its task is forgotten, as on
    shutdown, so that a reconciler sends it again (to another worker, or to this one later), and the job says
    why (once, not at every new delivery). True when it was left."""
    with S() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != JobStatus.queued.value or job.kind != JobKind.train.value:
            return False
        msg = reason(job)
        if msg is None:
            return False
        last = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())).first()
        if last is None or last.kind != "message" or last.data.get("message") != msg:
            add_event(s, job_id, "message", {"message": msg})
        lifecycle.defer(s, job_id)
        s.commit()
    log.info("job %s left in the queue: %s", job_id, msg)
    return True


def too_big_for_this_worker(S, job_id: int) -> bool:
    """A queued training job whose spec asks for more devices than this worker has is left in the queue for a
    worker that has them (_wait_in_queue). True when it was left."""
    def reason(job: Job) -> str | None:
        need, have = int((job.spec or {}).get("devices") or 1), worker_devices()
        if need <= have:
            return None
        return f"needs {need} devices; this worker has {have}: waiting in the queue for a worker with {need}"

    return _wait_in_queue(S, job_id, reason)


def short_of_gpu_memory(S, job_id: int, gpu, settings: Settings) -> bool:
    """A queued training job is left in the queue (_wait_in_queue) while this process's GPU has less free memory
    than GRAFT_GPU_JOB_MIN_FREE_MB (other jobs, this worker's or another program's, hold it). True when it was
    left."""
    need = settings.gpu_job_min_free_mb << 20
    if need <= 0:
        return False
    from worker.engine.device import free_gpu_bytes

    return _wait_in_queue(S, job_id, lambda job: gpu_memory_wait(free_gpu_bytes(gpu), need, str(gpu)))


def run_train(a: Attempt) -> str:
    """A training run (kind "train"): the engine's run, resumed from its checkpoint when there is one, then
    the exports, the artifacts and the typed summary as the job's result."""
    from domain.spec import RunSpec
    from worker.engine.runner import run

    S, job_id, settings, reporter = a.sessions, a.job_id, a.settings, a.reporter
    out = settings.runs_dir / str(job_id)
    st = storage.for_settings(settings)
    ckpt = out / "checkpoints" / "last.pt"
    ckpt_key = ckpt.relative_to(settings.data_dir).as_posix()
    if not st.local:  # the checkpoint lives in storage: a job resumed on another worker continues from it
        if not ckpt.is_file():
            try:
                st.get_file(ckpt_key, ckpt)
                reporter.on_message("resuming from the checkpoint in storage")
            except FileNotFoundError:
                pass
        reporter.checkpoint_sink = lambda path, kind: st.put_file(path, ckpt_key) if kind == "last" else None
    spec = RunSpec(**a.spec)
    cache: Any = settings.features_cache_dir  # a path, or a FeatureCache with a storage mirror
    if not st.local and spec.devices == 1:  # features in storage too: a resume elsewhere finds them
        from worker.engine.features import FeatureCache

        cache = FeatureCache(settings.features_cache_dir, StorageMirror(st))
    result, outcome = call_engine(S, job_id, a.attempt, "job", lambda: run(
        spec, a.data_dir, out, reporter, resume=(out / "checkpoints" / "last.pt").is_file(),
        cache_dir=cache, max_pixels=settings.max_image_pixels,
        store_bytes=settings.image_store_bytes))
    if result is None:
        return outcome
    if result.status == "stopped":
        return stopped(S, job_id, a.attempt, reporter, a.heartbeat, result.epochs_run)
    # early stopping ended it before its maximum: the epochs it ran are the job's epochs ("epoch 39 of 39")
    reporter._update(stage="export", progress=reporter._forward(1.0), eta_seconds=None,
                     current_epoch=result.epochs_run, total_epochs=result.epochs_run)
    exports = _export(reporter, out, result.val_files, result.classes, a.data_dir, settings.export_list)
    with S() as s:
        if not reporter._owns(s):
            return "superseded"
        files = [(f.artifact, f.file) for f in EXPORT_FORMATS.values()]
        for kind, name in files + [("metrics", "metrics.json"), ("confusion_matrix", "confusion_matrix.png"),
                                ("reliability", "reliability.png")]:
            p = out / name
            if p.is_file() and not s.scalar(select(Artifact.id).where(Artifact.job_id == job_id,
                                                                     Artifact.kind == kind)):
                key = p.relative_to(settings.data_dir).as_posix()
                st.put_file(p, key)  # (a no-op when the data directory is the storage)
                s.add(Artifact(job_id=job_id, kind=kind, path=key, size=p.stat().st_size, sha256=sha256_file(p)))
        s.commit()
    summary = RunSummary.model_validate({**result.summary().to_json(), "report": result.report, "exports": exports})
    ok = _finish(S, job_id, JobStatus.succeeded.value, None, summary.to_json(), attempt=a.attempt)
    if ok and not st.local:  # everything is in storage now; this worker's disk keeps only scratch copies
        shutil.rmtree(out, ignore_errors=True)
    return "succeeded" if ok else "superseded"


class StorageMirror:
    """The feature cache's second home (worker.engine.features.Mirror): objects under features/ in storage."""

    def __init__(self, st: storage.Storage):
        self.st = st

    def fetch(self, name: str, dest: Path) -> bool:
        try:
            self.st.get_file(f"features/{name}", dest)
            return True
        except FileNotFoundError:
            return False

    def store(self, src: Path, name: str) -> None:
        self.st.put_file(src, f"features/{name}")

    def remove(self, name: str) -> None:
        self.st.delete(f"features/{name}")


def dataset_dir(settings: Settings, data_rel: str) -> Path:
    """A dataset's root folder on this host: in the storage itself, or a scratch copy fetched from it."""
    key, inner = storage.dataset_key(data_rel)
    return storage.materialize_tree(storage.for_settings(settings), key, settings).joinpath(*inner)


# the kinds whose handler reads the dataset (Attempt.data_dir): the others (a batch prediction: its model file
# and its own images) run without fetching it
NEEDS_DATASET = frozenset({JobKind.train.value, JobKind.probe.value, JobKind.label_issues.value})
# what a worker runs for each job kind (app.db.models.JobKind); a new kind adds its entry here
JOB_KINDS: dict[str, Callable[[Attempt], str]] = {JobKind.train.value: run_train, JobKind.probe.value: run_probe,
                                                  JobKind.label_issues.value: run_label_issues,
                                                  JobKind.batch_predict.value: run_batch_predict}


def _export(reporter: Reporter, out, val_files: list[str], classes: list[str] | None = None,
            data_dir=None, formats: list[str] | tuple[str, ...] = AFTER_TRAINING) -> list[dict]:
    """The `formats` (GRAFT_EXPORT_FORMATS; default AFTER_TRAINING) next to model.pt, each checked in its runtime on the val images (labelled by
    their class folder, `val/<class>/file`: accuracies) and int8 calibrated on the dataset's train images. A
    failed export is recorded with its reason and figures; it never fails the job."""
    from worker.engine.export import export_all

    paths = [Path(p) for p in val_files]
    index = {c: i for i, c in enumerate(classes or [])}
    labels = [index.get(p.parent.name) for p in paths]
    train: list[Path] = []
    if data_dir is not None:
        try:
            from domain.layout import discover

            train = [p for p, _ in discover(Path(data_dir)).train]
        except Exception as e:  # calibration falls back to the val images
            log.warning("no train images for the int8 calibration: %s", e)
    try:
        results = [r.to_dict() for r in export_all(out / "model.pt", out, paths, formats=formats,
                                                   check_labels=labels, calibration_paths=train)]
    except Exception as e:  # an exporter bug must not lose a trained model
        log.exception("exports failed")
        return [{"format": f, "path": None, "ok": False, "error": f"export crashed: {type(e).__name__}: {e}",
                 "parity": None} for f in formats]
    for r in results:
        if not r["ok"]:
            reporter.on_message(f"{r['format']} export failed: {r['error']}")
    return [{k: v for k, v in r.items() if k != "path"} for r in results]


def send_unsent_jobs(settings: Settings | None = None) -> int:
    """Enqueue every queued job that never reached the broker (no celery task id)."""
    from worker.reaper import send_unsent

    settings = settings or get_settings()
    return len(send_unsent(session_factory(settings.db_url), settings))
