"""Uploads -> dataset rows. The upload is streamed to disk under a size limit, a zip is checked entry by
entry before anything is extracted (zip slip, symlinks, bombs), then the dataset doctor (app.services.doctor)
checks the folder and every image; only then is a row written. A refusal lists every problem found, each
with its fix, in one error, and leaves no files and no rows behind."""
from __future__ import annotations

import logging
import os
import shutil
import uuid
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import AppError, BadRequest, Conflict, NotFound, ServiceUnavailable, Unprocessable
from app.core.settings import Settings
from app.db.models import FINAL_STATUSES, Dataset, Job, JobKind, User
from app.services import access, storage, uploads, workspaces
from app.services.archives import (
    EntryProblems,
    TooLarge,
    check_zip,
    copy_limited,
    extract_part,
    extract_zip,
    upload_too_large,
    write_entry,
)
from app.services.doctor import Problem, diagnose, plural, refuse

log = logging.getLogger(__name__)


def register(session: Session, settings: Settings, user: User, name: str, folder: Path, workspace_id: int,
             parent: Dataset | None = None, version: int = 1, changes: dict | None = None,
             shared: dict[str, str] | None = None, trusted: frozenset[str] = frozenset()) -> Dataset:
    """The doctor checks `folder`, then it goes into storage and its row is written. A version (app.services.
    versions) names its parent, the files it shares with it ({relative path: key}) and the images the doctor
    passed in the parent (`trusted`, relative paths: hashed, not decoded again)."""
    verdict = diagnose(folder, settings, trusted)
    root_rel = verdict.root.relative_to(settings.data_dir)
    ds = Dataset(owner_id=user.id, workspace_id=workspace_id, name=name.strip() or folder.name, path=str(root_rel),
                 layout=verdict.layout, classes=verdict.classes, counts=verdict.counts, warnings=verdict.warnings,
                 num_images=verdict.num_images, size_bytes=verdict.size_bytes, task=verdict.task,
                 label_stats=verdict.label_stats, version=version, changes=changes,
                 parent_id=parent.id if parent else None, lineage_id=parent.family_id if parent else None)
    key, _ = storage.dataset_key(str(root_rel))
    st = storage.for_settings(settings)
    try:
        storage.adopt_tree(st, settings, folder, key, shared=shared)  # into object storage when there is one
        session.add(ds)
        session.commit()
    except BaseException:
        if not st.local:
            try:
                storage.forget_tree(st, settings, key)  # no dataset row: no files either
            except storage.StorageError:
                log.warning("could not remove the stored files of the failed upload %s", key)
        raise
    return ds


def check_name(name: str) -> None:
    if len(name.strip()) > Dataset.NAME_MAX:
        raise Unprocessable(f"the dataset name has {len(name.strip())} characters, more than the limit of "
                            f"{Dataset.NAME_MAX}: choose a shorter name")


def new_folder(settings: Settings) -> Path:
    settings.ensure_dirs()
    d = settings.datasets_dir / uuid.uuid4().hex
    d.mkdir()
    return d


def create_from_zip(session: Session, settings: Settings, user: User, name: str, upload: BinaryIO,
                    workspace_id: int | None = None) -> Dataset:
    """A zip of the dataset into the workspace (default: the user's personal one; editors only)."""
    check_name(name)
    wid = workspaces.target(session, user, workspace_id, "uploading a dataset").id
    settings.ensure_dirs()
    tmp_zip = settings.uploads_dir / f"{uuid.uuid4().hex}.zip"
    folder = None
    try:
        try:
            copy_limited(upload, tmp_zip, settings.max_upload_bytes)
        except TooLarge:
            raise upload_too_large(settings.max_upload_bytes) from None
        if not zipfile.is_zipfile(tmp_zip):
            refuse([Problem("the file is not a zip archive",
                            "zip the dataset folder (train/ and val/, or one folder per class) and upload the .zip")],
                   BadRequest)
        try:
            with zipfile.ZipFile(tmp_zip) as zf:
                infos = check_zip(zf, settings)
                folder = new_folder(settings)
                extract_zip(zf, infos, folder, settings)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error) as e:
            refuse([Problem(f"the zip archive is corrupt or uses an unsupported feature ({e})",
                            "create it again with a standard zip tool")], BadRequest)
        return register(session, settings, user, name, folder, wid)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        session.rollback()
        raise
    finally:
        tmp_zip.unlink(missing_ok=True)


def create_from_files(session: Session, settings: Settings, user: User, name: str,
                      files: Iterable[tuple[str, BinaryIO]], workspace_id: int | None = None) -> Dataset:
    """A folder picked in the browser: many files, each with its relative path."""
    check_name(name)
    wid = workspaces.target(session, user, workspace_id, "uploading a dataset").id
    folder = new_folder(settings)
    try:
        found = EntryProblems()
        root = folder.resolve()
        total = 0
        count = 0
        for relname, fobj in files:
            count += 1
            rel = found.path(relname)
            if rel is None:
                continue
            target = folder / rel
            if not target.resolve().is_relative_to(root):
                found.by_kind["dotdot"].append(relname)
                continue
            try:
                total += write_entry(target, fobj, settings.max_upload_bytes - total)
            except TooLarge:
                raise upload_too_large(settings.max_upload_bytes) from None
            except OSError as e:
                found.os_error(relname, e)
        if count == 0:
            refuse([Problem("no files were uploaded", "pick the dataset folder")], BadRequest)
        if found.problems():
            refuse(found.problems(), BadRequest)
        return register(session, settings, user, name, folder, wid)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        session.rollback()
        raise


def get_owned(session: Session, user: User, dataset_id: int, need: str = access.VIEW,
              what: str = "this") -> Dataset:
    """A dataset the user may see (404 otherwise); with `need`, a role they must have there (403)."""
    ds = access.get_visible(session, Dataset, user, dataset_id, need, what)
    if ds is None:
        raise NotFound(f"dataset {dataset_id} not found: list yours with GET /api/v1/datasets")
    return ds


def delete(session: Session, settings: Settings, user: User, dataset_id: int) -> None:
    """Refused while jobs that are not finished use the dataset; finished jobs keep their models, so a
    dataset that has jobs is refused too (delete the jobs first). Its objects go before the rows: its own
    folder datasets/<id>/ (a version's holds only its own files and the list of those it shares with its
    parents, which it never deletes; a dataset with versions is refused), its thumbnails (thumbs/<id>/) and its
    remaining jobs' files; a storage that does not answer is a 503 that keeps the dataset (delete it again)."""
    ds = get_owned(session, user, dataset_id, access.EDIT, "deleting a dataset")
    active = session.scalar(select(func.count()).select_from(Job).where(Job.dataset_id == ds.id,
                                                                      Job.status.not_in(FINAL_STATUSES)))
    if active:
        raise Conflict(f"dataset {ds.id} is used by {active} queued or running job(s): cancel them first")
    versions = list(session.scalars(select(Dataset.id).where(Dataset.parent_id == ds.id).order_by(Dataset.id)))
    if versions:
        raise Conflict(f"dataset {ds.id} has {plural(len(versions), 'version')} made from it (dataset "
                       f"{', '.join(map(str, versions))}) that share its images: delete those first")
    used = session.scalar(select(func.count()).select_from(Job).where(Job.dataset_id == ds.id,
                                                                    Job.kind == JobKind.train.value))
    if used:
        raise Conflict(f"dataset {ds.id} has {used} job(s) whose models came from it: delete those jobs first")
    # comparisons, searches, batches whose training job was deleted: no model
    jobs = list(session.scalars(select(Job).where(Job.dataset_id == ds.id)))
    folder = settings.data_dir / Path(ds.path).parts[0] / Path(ds.path).parts[1]
    key, _ = storage.dataset_key(ds.path)
    mine = [key, f"{settings.thumbs_dir.name}/{folder.name}"] if key.startswith(
        f"{settings.datasets_dir.name}/") else []  # (never a folder that is not an upload's)
    st = storage.for_settings(settings)
    try:
        for prefix in [p for job in jobs for p in storage.job_prefixes(settings, job.id, job.spec)] + mine:
            storage.forget_tree(st, settings, prefix)
    except storage.StorageError as e:
        raise ServiceUnavailable(f"dataset {ds.id} was not deleted: its files could not be removed from the "
                                 f"storage ({e}). The dataset is kept; delete it again once the storage answers "
                                 "(check GRAFT_STORAGE_URL and the AWS_* settings)", {"dataset_id": ds.id}) from None
    for job in jobs:
        session.delete(job)
    session.flush()
    session.delete(ds)
    session.commit()
    for job in jobs:
        shutil.rmtree(settings.runs_dir / str(job.id), ignore_errors=True)
    if folder.resolve().is_relative_to(settings.datasets_dir.resolve()):
        shutil.rmtree(folder, ignore_errors=True)
    thumbs = settings.thumbs_dir / folder.name  # sample thumbnails of the dataset page
    if thumbs.resolve().is_relative_to(settings.thumbs_dir.resolve()):
        shutil.rmtree(thumbs, ignore_errors=True)


# ---------------------------------------------------------------- a dataset from resumable uploads (parts)



def _usage(folder: Path) -> tuple[int, int]:
    """(entries, bytes of the files) under `folder`, counted as the walk goes: a listing of a 200,000-image
    dataset held at once cost the web process about 100 MB."""
    entries = size = 0
    stack = [str(folder)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                entries += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    size += e.stat(follow_symlinks=False).st_size
    return entries, size


def create_from_uploads(session: Session, settings: Settings, user: User, name: str, upload_ids: list[str],
                        workspace_id: int | None = None) -> Dataset:
    """Finished resumable uploads (app.services.uploads), each a zip or tar of part of the dataset, extracted
    one after another into one folder that the doctor then checks whole. Unknown (or another user's) uploads
    are 404 and unfinished ones 409, before anything is touched; a refused part or dataset leaves no folder
    and no row, and its uploads are deleted; a created dataset's uploads are deleted too. The size and entry
    limits apply to all the parts together."""
    check_name(name)
    wid = workspaces.target(session, user, workspace_id, "uploading a dataset").id
    if not upload_ids:
        raise BadRequest("no uploads: list the ids of the finished uploads (POST /api/v1/uploads) in 'uploads'")
    if len(set(upload_ids)) != len(upload_ids):
        raise BadRequest("an upload is listed twice in 'uploads': list each part once")
    parts = [uploads.finished_part(settings, user.id, uid) for uid in upload_ids]
    folder = new_folder(settings)
    try:
        for i, (uid, part) in enumerate(zip(upload_ids, parts), 1):
            entries, used = _usage(folder)  # what the parts before took of the limits
            left = settings.model_copy(update={"max_extracted_bytes": max(1, settings.max_extracted_bytes - used),
                                               "max_zip_entries": max(1, settings.max_zip_entries - entries)})
            try:
                extract_part(part, folder, left)
            except AppError as e:
                e.message = f"part {i} of {len(parts)} (upload {uid}): {e.message}"
                raise
        tops = [p for p in folder.iterdir() if not p.name.startswith(".")]
        default = tops[0].name if len(tops) == 1 and tops[0].is_dir() else "dataset"
        ds = register(session, settings, user, name.strip() or default[:Dataset.NAME_MAX], folder, wid)
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        session.rollback()
        if isinstance(e, AppError):
            for uid in upload_ids:
                uploads.remove(settings, user.id, uid)
        raise
    for uid in upload_ids:
        uploads.remove(settings, user.id, uid)
    return ds
