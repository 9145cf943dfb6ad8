"""Uploads -> dataset rows. The upload is streamed to disk under a size limit, a zip is checked entry by
entry before anything is extracted (zip slip, symlinks, bombs), the folder layout is read, and only then
is a row written. A refused upload leaves no files and no rows behind."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, Unprocessable
from app.core.settings import Settings
from app.db.models import FINAL_STATUSES, MAX_ID, Dataset, Job, User
from worker.engine.errors import DataError
from worker.engine.layout import discover

CHUNK = 1 << 20


def _copy_limited(src: BinaryIO, dst: Path, limit: int, what: str) -> int:
    n = 0
    with open(dst, "wb") as f:
        while chunk := src.read(CHUNK):
            n += len(chunk)
            if n > limit:
                raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes: upload a smaller "
                                      "dataset or raise GRAFT_MAX_UPLOAD_BYTES")
            f.write(chunk)
    return n


def _write_entry(target: Path, src: BinaryIO, limit: int, what: str, name: str) -> int:
    """One file of an upload; a path the file system cannot hold (a file where a folder is, a name too
    long) is the upload's fault: 400, not a server error."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return _copy_limited(src, target, limit, what)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
        raise BadRequest(f"refused the entry {name!r}: it clashes with another entry of the upload (a file and a "
                         f"folder of the same name, {e.strerror}); fix the folder and upload it again") from None
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        raise BadRequest(f"refused the entry {name!r}: its name is too long for the server's file system; "
                         "rename it and upload again") from None


def safe_relpath(name: str) -> PurePosixPath:
    """A relative path with no absolute root, drive, '..' or empty parts; raises BadRequest otherwise."""
    name = name.replace("\\", "/")
    p = PurePosixPath(name)
    if not name or p.is_absolute() or name.startswith("/") or (p.parts and ":" in p.parts[0]):
        raise BadRequest(f"refused the entry {name!r}: absolute paths are not allowed in an upload")
    if any(part in ("..", "") for part in name.rstrip("/").split("/")):
        raise BadRequest(f"refused the entry {name!r}: '..' in a path could write outside the dataset "
                         "(zip slip); re-create the archive from the dataset folder")
    return p


def check_zip(zf: zipfile.ZipFile, settings: Settings) -> list[zipfile.ZipInfo]:
    """Every entry checked before extracting anything: paths, symlinks, sizes, ratios, count."""
    infos = zf.infolist()
    if len(infos) > settings.max_zip_entries:
        raise BadRequest(f"the zip has {len(infos)} entries, more than the limit of {settings.max_zip_entries}")
    total = 0
    files = []
    for info in infos:
        safe_relpath(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise BadRequest(f"refused the entry {info.filename!r}: symbolic links are not allowed in an upload")
        if info.is_dir():
            continue
        total += info.file_size
        if total > settings.max_extracted_bytes:
            raise BadRequest(f"the zip expands to more than {settings.max_extracted_bytes} bytes (a zip bomb?): "
                             "upload a smaller dataset or raise GRAFT_MAX_EXTRACTED_BYTES")
        if info.compress_size and info.file_size > (1 << 20) and info.file_size / info.compress_size > settings.max_zip_ratio:
            raise BadRequest(f"refused the entry {info.filename!r}: compression ratio "
                             f"{info.file_size / info.compress_size:.0f}:1 is above {settings.max_zip_ratio:.0f}:1 "
                             "(a zip bomb?)")
        files.append(info)
    return files


def _extract(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path, settings: Settings) -> None:
    written = 0
    for info in infos:
        target = dest / safe_relpath(info.filename)
        if not target.resolve().is_relative_to(dest.resolve()):
            raise BadRequest(f"refused the entry {info.filename!r}: it points outside the dataset")
        with zf.open(info) as src:
            # the declared size may lie: count what really comes out
            written += _write_entry(target, src, settings.max_extracted_bytes - written, "the extracted zip",
                                    info.filename)


def _register(session: Session, settings: Settings, user: User, name: str, folder: Path) -> Dataset:
    try:
        split = discover(folder)
    except DataError as e:  # said in the upload's own terms, without the server's paths
        raise Unprocessable(str(e).replace(str(folder) + os.sep, "").replace(str(folder), "the upload")) from None
    rel = folder.relative_to(settings.data_dir)
    root_rel = split.root.relative_to(settings.data_dir)
    size = sum(p.stat().st_size for p, _ in split.train + split.val)
    ds = Dataset(owner_id=user.id, name=name.strip() or folder.name, path=str(root_rel), layout=split.layout,
                 classes=split.classes, counts=split.counts(), warnings=split.warnings,
                 num_images=len(split.train) + len(split.val), size_bytes=size)
    session.add(ds)
    session.commit()
    return ds


def _check_name(name: str) -> None:
    if len(name.strip()) > Dataset.NAME_MAX:
        raise Unprocessable(f"the dataset name has {len(name.strip())} characters, more than the limit of "
                            f"{Dataset.NAME_MAX}: choose a shorter name")


def _new_folder(settings: Settings) -> Path:
    settings.ensure_dirs()
    d = settings.datasets_dir / uuid.uuid4().hex
    d.mkdir()
    return d


def create_from_zip(session: Session, settings: Settings, user: User, name: str, upload: BinaryIO) -> Dataset:
    _check_name(name)
    settings.ensure_dirs()
    tmp_zip = settings.uploads_dir / f"{uuid.uuid4().hex}.zip"
    folder = None
    try:
        _copy_limited(upload, tmp_zip, settings.max_upload_bytes, "the upload")
        if not zipfile.is_zipfile(tmp_zip):
            raise BadRequest("the file is not a zip archive: zip the dataset folder (train/ and val/, or one "
                             "folder per class) and upload the .zip")
        try:
            with zipfile.ZipFile(tmp_zip) as zf:
                infos = check_zip(zf, settings)
                folder = _new_folder(settings)
                _extract(zf, infos, folder, settings)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as e:
            raise BadRequest(f"the zip archive is corrupt or uses an unsupported feature ({e}): "
                             "create it again with a standard zip tool") from None
        return _register(session, settings, user, name, folder)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        session.rollback()
        raise
    finally:
        tmp_zip.unlink(missing_ok=True)


def create_from_files(session: Session, settings: Settings, user: User, name: str,
                      files: Iterable[tuple[str, BinaryIO]]) -> Dataset:
    """A folder picked in the browser: many files, each with its relative path."""
    _check_name(name)
    folder = _new_folder(settings)
    try:
        total = 0
        count = 0
        for relname, fobj in files:
            target = folder / safe_relpath(relname)
            if not target.resolve().is_relative_to(folder.resolve()):
                raise BadRequest(f"refused the file {relname!r}: it points outside the dataset")
            total += _write_entry(target, fobj, settings.max_upload_bytes - total, "the upload", relname)
            count += 1
        if count == 0:
            raise BadRequest("no files were uploaded: pick the dataset folder")
        return _register(session, settings, user, name, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        session.rollback()
        raise


def get_owned(session: Session, user: User, dataset_id: int) -> Dataset:
    ds = session.get(Dataset, dataset_id) if 1 <= dataset_id <= MAX_ID else None
    if ds is None or ds.owner_id != user.id:
        raise NotFound(f"dataset {dataset_id} not found: list yours with GET /api/v1/datasets")
    return ds


def delete(session: Session, settings: Settings, user: User, dataset_id: int) -> None:
    """Refused while jobs that are not finished use the dataset; finished jobs keep their models, so a
    dataset that has jobs is refused too (delete the jobs first). Files go after the row."""
    ds = get_owned(session, user, dataset_id)
    active = session.scalar(select(func.count()).select_from(Job).where(Job.dataset_id == ds.id,
                                                                      Job.status.not_in(FINAL_STATUSES)))
    if active:
        raise Conflict(f"dataset {ds.id} is used by {active} queued or running job(s): cancel them first")
    used = session.scalar(select(func.count()).select_from(Job).where(Job.dataset_id == ds.id))
    if used:
        raise Conflict(f"dataset {ds.id} has {used} job(s) whose models came from it: delete those jobs first")
    folder = settings.data_dir / Path(ds.path).parts[0] / Path(ds.path).parts[1]
    session.delete(ds)
    session.commit()
    if folder.resolve().is_relative_to(settings.datasets_dir.resolve()):
        shutil.rmtree(folder, ignore_errors=True)
    thumbs = settings.thumbs_dir / folder.name  # sample thumbnails of the dataset page
    if thumbs.resolve().is_relative_to(settings.thumbs_dir.resolve()):
        shutil.rmtree(thumbs, ignore_errors=True)
