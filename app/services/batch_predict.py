"""Batch predictions: a folder of unlabelled images through a training job's model, as a job. Torch-free.

A batch prediction is a job like a search for label issues (queued, claimed by a worker, progress and
events, cancel, delete) whose `kind` is "batch_predict". The web tier takes the images (a zip sent with the
request, a finished resumable upload of a zip or tar, or an S3 prefix), checks them as a dataset upload is
checked (app.services.archives: paths that escape, links, bombs; the limits), keeps the images only, and
puts them in the storage under `batch-inputs/<id>` before the job row exists, so that a worker on any host
finds them complete; the spec names them (`input_key`) and the model file (`model_key`). worker.batchjob
writes the results back to the storage as the job's artifacts: `results_csv` and `results_zip`
(GET /api/v1/jobs/{id}/results.csv and results.zip).

A batch job belongs to its training job's dataset and workspace (its `dataset_id` is the training job's), so
whoever may see the training job may see its batches, and editors start them.
"""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import AppError, BadRequest, Conflict, NotFound
from app.core.settings import Settings
from app.db.models import Artifact, Job, JobKind, JobStatus, User
from app.services import access, lifecycle, operating_point, storage, uploads
from app.services import jobs as job_service
from app.services.archives import TooLarge, copy_limited, extract_part, upload_too_large
from app.services.doctor import Problem, examples, plural, refuse
from app.services.imports import _fetch_s3
from domain.layout import IMAGE_EXTS, JUNK_NAMES

log = logging.getLogger(__name__)

BATCH = JobKind.batch_predict.value
RESULTS = {"csv": "results_csv", "zip": "results_zip"}  # GET .../results.<ext> -> artifact kind
INPUTS = storage.BATCH_INPUTS  # storage prefix of the images waiting for their job (deleted with it)


def max_images(settings: Settings) -> int:
    """Images per batch (GRAFT_MAX_BATCH_IMAGES)."""
    return settings.max_batch_images


def model_job(session: Session, user: User, job_id: int) -> tuple[Job, Artifact]:
    """The training job whose model the batch uses, and its model file: editors of its workspace only (403),
    a job they may see (404), a training run that succeeded with its model (409)."""
    job = job_service.get_owned(session, user, job_id, access.EDIT, "running batch predictions")
    if job.kind != JobKind.train.value:
        raise Conflict(f"job {job.id} is a {job.kind} job, not a training run: batch predictions use a trained "
                       "model (POST /api/v1/jobs/{id}/batch-predict with the id of a training job that succeeded)")
    if job.status != JobStatus.succeeded.value:
        raise Conflict(f"job {job.id} is {job.status}: batch predictions use its trained model, so it must have "
                       "succeeded first" + (" (follow it with GET /api/v1/jobs/" + str(job.id) + ")"
                                            if job.status in ("queued", "running") else ""))
    art = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "model"))
    if art is None:
        raise Conflict(f"job {job.id} has no model file: train again to run batch predictions")
    return job, art


def _junk(name: str) -> bool:
    return name in JUNK_NAMES or name.startswith(".")


def _keep_images(folder: Path) -> tuple[int, list[str]]:
    """Removes every file under `folder` that is not an image (and junk: __MACOSX/, dot files); returns (the
    images left, the relative names of the other files removed)."""
    n, other = 0, []
    for d, dirs, files in os.walk(folder):
        for x in [x for x in dirs if _junk(x)]:
            shutil.rmtree(Path(d) / x, ignore_errors=True)
        dirs[:] = [x for x in dirs if not _junk(x)]
        for f in files:
            p = Path(d) / f
            if not _junk(f) and not p.is_symlink() and p.suffix.lower() in IMAGE_EXTS:
                n += 1
                continue
            if not _junk(f):
                other.append(p.relative_to(folder).as_posix())
            p.unlink(missing_ok=True)
    return n, sorted(other)


def _from_file(upload: BinaryIO, folder: Path, settings: Settings) -> None:
    """A zip (or tar) sent with the request, streamed to disk under the upload limit, checked, extracted."""
    tmp = settings.uploads_dir / f"{uuid.uuid4().hex}.batch"
    try:
        try:
            copy_limited(upload, tmp, settings.max_upload_bytes)
        except TooLarge:
            raise upload_too_large(settings.max_upload_bytes) from None
        if not (zipfile.is_zipfile(tmp) or tarfile.is_tarfile(tmp)):
            refuse([Problem("the file is not a zip archive", "zip the folder of images and send the .zip in the "
                                                             "multipart field 'file'")], BadRequest)
        extract_part(tmp, folder, settings)
    finally:
        tmp.unlink(missing_ok=True)


def _from_upload(part: Path, upload_id: str, folder: Path, settings: Settings) -> None:
    try:
        extract_part(part, folder, settings)
    except AppError as e:
        e.message = f"upload {upload_id}: {e.message}"
        raise


def _from_source(source: str, folder: Path, settings: Settings) -> None:
    if not source.startswith("s3://"):
        raise BadRequest(f"source {source[:200]!r} is not an S3 prefix: write s3://bucket/prefix/ (or send a zip "
                         "in the multipart field 'file', or a resumable upload's id as upload_id)")
    _fetch_s3(source, folder, settings)  # the limits, paths that escape; 400 naming the bucket and the reason


def start(session: Session, settings: Settings, user: User, job_id: int, *, top_k: int = 3,
          confidence_threshold: float | None = None, upload: BinaryIO | None = None, filename: str | None = None,
          upload_id: str | None = None, source: str | None = None) -> Job:
    """Queue a batch prediction with job `job_id`'s model over the images of one of `upload` (a zip or tar),
    `upload_id` (a finished resumable upload) or `source` (s3://bucket/prefix/). A refusal keeps nothing."""
    train, model = model_job(session, user, job_id)
    if sum(x is not None for x in (upload, upload_id, source)) != 1:
        raise BadRequest("send the images one way: a zip in the multipart field 'file', or JSON with upload_id "
                         "(a finished resumable upload) or source (s3://bucket/prefix/)")
    # a finished resumable upload (404 unknown or another user's, 409 unfinished): deleted once used, or once
    # its content was refused
    part = uploads.finished_part(settings, user.id, upload_id) if upload_id is not None else None
    settings.ensure_dirs()
    st = storage.for_settings(settings)
    key = f"{INPUTS}/{uuid.uuid4().hex}"
    # in a local storage the images are extracted where they are kept (nothing is copied after)
    folder = st.path(key) if st.local else settings.uploads_dir / f"batch-{key.rsplit('/', 1)[1]}"
    assert folder is not None
    folder.mkdir(parents=True)
    stored = False
    try:
        if upload is not None:
            _from_file(upload, folder, settings)
            origin = f"upload {filename[:200]}" if filename else "upload"
        elif part is not None and upload_id is not None:
            _from_upload(part, upload_id, folder, settings)
            origin = f"resumable upload {upload_id}"
        else:
            assert source is not None
            _from_source(source, folder, settings)
            origin = source
        n, other = _keep_images(folder)
        if n == 0:
            refuse([Problem("no images were found in what was sent" + (
                f" (only {plural(len(other), 'other file')}: {examples(other)})" if other else ""),
                f"send files ending in {', '.join(sorted(IMAGE_EXTS))} (in folders or not)", other)], BadRequest)
        if n > max_images(settings):
            raise BadRequest(f"{n} images is more than the limit of {max_images(settings)} per batch: split them "
                             "into several batches, or raise GRAFT_MAX_BATCH_IMAGES", {"images": n})
        threshold = confidence_threshold if confidence_threshold is not None else \
            operating_point.confidence_threshold(train)
        if st.local:
            storage.adopt_tree(st, settings, folder, key)  # (already in place when the data directory is the storage)
        else:  # into object storage; no scratch copy is kept here: a worker fetches them
            stored = True
            st.put_tree(folder, key)
            shutil.rmtree(folder, ignore_errors=True)
        spec = {"model_job_id": train.id, "model_key": model.path, "input_key": key, "top_k": int(top_k),
                "confidence_threshold": threshold, "images": n, "ignored": len(other), "source": origin}
        job = Job(owner_id=user.id, workspace_id=train.workspace_id, dataset_id=train.dataset_id, kind=BATCH,
                  spec=spec, status=JobStatus.queued.value, total_epochs=n)
        lifecycle.create(session, job)
    except BaseException as e:
        session.rollback()
        shutil.rmtree(folder, ignore_errors=True)
        if part is not None and upload_id is not None and isinstance(e, AppError):
            uploads.remove(settings, user.id, upload_id)
        if stored and not st.local:
            try:
                storage.forget_tree(st, settings, key)
            except storage.StorageError:
                log.warning("could not remove the stored images of the refused batch %s", key)
        raise
    if part is not None and upload_id is not None:
        uploads.remove(settings, user.id, upload_id)
    if other:
        lifecycle.record_event(session, job.id, "message", {"message": (
            f"ignored {len(other)} file(s) that are not images: {examples(other)}")})
        session.commit()
    job_service.enqueue(session, settings, job)
    return job


def results(session: Session, user: User, job_id: int, ext: str) -> tuple[Job, Artifact]:
    """A batch job's results file (`ext`: csv or zip): 404 for a job the user may not see or that is no
    batch prediction, 409 while it has not succeeded."""
    job = job_service.get_owned(session, user, job_id)
    if job.kind != BATCH:
        raise NotFound(f"job {job.id} is a {job.kind} job, not a batch prediction: results.{ext} belongs to the "
                       "jobs that POST /api/v1/jobs/{id}/batch-predict starts")
    if job.status != JobStatus.succeeded.value:
        why = {"queued": "it is waiting for a worker", "running": f"it is running ({job.progress:.0%} done)",
               "failed": f"it failed ({job.error}): there are no results", "cancelled": "it was cancelled: "
               "there are no results; start a new batch"}.get(job.status, job.status)
        raise Conflict(f"batch prediction job {job.id} has not finished: {why}. Its results.{ext} is ready once it "
                       f"has succeeded (follow it with GET /api/v1/jobs/{job.id})",
                       {"status": job.status, "progress": job.progress})
    art = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == RESULTS[ext]))
    if art is None:
        raise NotFound(f"the results.{ext} of job {job.id} is missing on the server")
    return job, art


def runs_of(session: Session, user: User, train: Job, limit: int = 20) -> list[Job]:
    """The newest batch predictions made with the training job's model that the user may see."""
    q = select(Job).where(Job.dataset_id == train.dataset_id, Job.kind == BATCH, access.visible_to(Job, user))
    jobs = [j for j in session.scalars(q.order_by(Job.id.desc())) if (j.spec or {}).get("model_job_id") == train.id]
    return jobs[:limit]
