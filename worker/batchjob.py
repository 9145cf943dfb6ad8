"""Running a claimed batch prediction (kind "batch_predict"): the images the web tier put in storage
(spec.input_key) through the training job's model file (spec.model_key), both fetched from the storage (a
worker on another host needs no shared disk), by the engine's worker/engine/batch.py with the same reporter,
heartbeat, cancel and shutdown handling as a training run (worker.runjob claims the row and calls this). The
CSV and the sorted zip go back to the storage as the job's artifacts `results_csv` and `results_zip`.

Progress: `progress` is the share of the images done; `current_epoch` and `total_epochs` hold the images done
and their total (a batch has no epochs), `eta_seconds` the time left."""
from __future__ import annotations

import logging
import shutil
import time

from sqlalchemy import select

from app.db.models import Artifact, JobStatus
from app.services import storage
from domain.callbacks import BatchProgress, Callbacks
from domain.files import sha256_file
from worker.attempt import Attempt, Reporter, _finish, call_engine, stopped

log = logging.getLogger(__name__)

RESULTS = {"results_csv": "results.csv", "results_zip": "results.zip"}  # artifact kind -> file name


class CountingReporter(Callbacks):
    """The reporter, with the images done and their total in current_epoch / total_epochs."""

    def __init__(self, reporter: Reporter):
        self.r = reporter
        self._last = 0.0

    def on_message(self, message: str) -> None:
        self.r.on_message(message)

    def on_progress(self, p: BatchProgress) -> None:
        now = time.monotonic()
        if now - self._last < self.r.interval and p.done < p.total:
            return
        self._last = now
        self.r._update(progress=self.r._forward(p.fraction), stage=p.stage, eta_seconds=round(p.eta, 1),
                       current_epoch=p.done, total_epochs=p.total)

    def should_stop(self) -> bool:
        return self.r.should_stop()


def _fail(a: Attempt, message: str) -> str:
    ok = _finish(a.sessions, a.job_id, JobStatus.failed.value, message, attempt=a.attempt)
    return "failed" if ok else "superseded"


def _forget_inputs(st: storage.Storage, a: Attempt, key: str) -> None:
    """The uploaded images, once the job has ended here (the sorted zip holds the readable ones)."""
    try:
        storage.forget_tree(st, a.settings, key)
    except (storage.StorageError, ValueError) as e:
        log.warning("job %s: could not remove its input images %s from storage: %s", a.job_id, key, e)


def run_batch_predict(a: Attempt) -> str:
    from worker.engine.batch import predict_folder

    S, job_id, settings, spec = a.sessions, a.job_id, a.settings, a.spec
    st = storage.for_settings(settings)
    input_key, model_key = str(spec.get("input_key") or ""), str(spec.get("model_key") or "")
    try:
        model = storage.materialize_file(st, model_key, settings)
        if not model.is_file():
            raise FileNotFoundError(model_key)
    except (FileNotFoundError, ValueError):
        return _fail(a, f"the model of job {spec.get('model_job_id')} is no longer in storage ({model_key}): was "
                        "that job deleted? Start the batch prediction from a training job that has its model")
    except storage.StorageError as e:
        return _fail(a, f"the model file could not be read from storage ({e}): check GRAFT_STORAGE_URL and the "
                        "AWS_* settings of this worker, then start the batch prediction again")
    try:
        images = storage.materialize_tree(st, input_key, settings)
        if not images.is_dir():
            raise FileNotFoundError(input_key)
    except (FileNotFoundError, ValueError):
        return _fail(a, f"the images of this batch are no longer in storage ({input_key}): upload them again")
    except storage.StorageError as e:
        return _fail(a, f"the images could not be read from storage ({e}): check GRAFT_STORAGE_URL and the AWS_* "
                        "settings of this worker, then start the batch prediction again")

    out = settings.runs_dir / str(job_id) / "results"
    threshold = spec.get("confidence_threshold")
    result, outcome = call_engine(S, job_id, a.attempt, "batch prediction job", lambda: predict_folder(
        model, images, out / RESULTS["results_csv"], zip_path=out / RESULTS["results_zip"],
        top_k=int(spec.get("top_k") or 3), confidence_threshold=float(threshold) if threshold is not None else None,
        callbacks=CountingReporter(a.reporter)))
    if result is None:
        if outcome == "failed":
            _forget_inputs(st, a, input_key)
        return outcome
    if result.status == "stopped":
        outcome = stopped(S, job_id, a.attempt, a.reporter, a.heartbeat, 0)
        if outcome == "cancelled":
            _forget_inputs(st, a, input_key)
        return outcome
    if result.images and not result.predicted:
        first = result.errors[0]["error"] if result.errors else "unreadable"
        outcome = _fail(a, f"none of the {result.images} image(s) could be read (e.g. {first}): send JPEG, PNG, "
                           "WebP, BMP, GIF or TIFF files")
        if outcome == "failed":
            _forget_inputs(st, a, input_key)
        return outcome
    a.reporter._update(stage="store", progress=a.reporter._forward(1.0), eta_seconds=None,
                       current_epoch=result.images, total_epochs=result.images)
    with S() as s:
        if not a.reporter._owns(s):
            return "superseded"
        for kind, name in RESULTS.items():
            p = out / name
            key = p.relative_to(settings.data_dir).as_posix()
            st.put_file(p, key)  # (a no-op when the data directory is the storage)
            if not s.scalar(select(Artifact.id).where(Artifact.job_id == job_id, Artifact.kind == kind)):
                s.add(Artifact(job_id=job_id, kind=kind, path=key, size=p.stat().st_size, sha256=sha256_file(p)))
        s.commit()
    summary = {**result.to_json(), "model_job_id": spec.get("model_job_id"),
               "results_csv": f"/api/v1/jobs/{job_id}/results.csv", "results_zip": f"/api/v1/jobs/{job_id}/results.zip"}
    ok = _finish(S, job_id, JobStatus.succeeded.value, None, summary, attempt=a.attempt)
    if ok:
        _forget_inputs(st, a, input_key)
        if not st.local:  # everything is in storage now; this worker's disk keeps no copy
            shutil.rmtree(out.parent, ignore_errors=True)
    return "succeeded" if ok else "superseded"
