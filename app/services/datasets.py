"""Uploads -> dataset rows. The upload is streamed to disk under a size limit, a zip is checked entry by
entry before anything is extracted (zip slip, symlinks, bombs), then the dataset doctor (app.services.doctor)
checks the folder and every image; only then is a row written. A refusal lists every problem found, each
with its fix, in one error, and leaves no files and no rows behind."""
from __future__ import annotations

import errno
import logging
import lzma
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import AppError, BadRequest, Conflict, NotFound, PayloadTooLarge, Unprocessable
from app.core.settings import Settings
from app.db.models import FINAL_STATUSES, Dataset, Job, JobKind, User
from app.services import access, storage, uploads, workspaces
from app.services.doctor import Problem, diagnose, examples, plural, refuse

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class _TooLarge(Exception):
    pass


class _ZipSource:
    """An entry being read: its decompression errors are the archive's fault (a corrupt zip), unlike the
    OSErrors of writing it out."""

    def __init__(self, f: IO[bytes]):
        self.f = f

    def read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise zipfile.BadZipFile(str(e) or e.__class__.__name__) from None


def _copy_limited(src: BinaryIO | _ZipSource, dst: Path, limit: int) -> int:
    n = 0
    with open(dst, "wb") as f:
        while chunk := src.read(CHUNK):
            n += len(chunk)
            if n > limit:
                raise _TooLarge
            f.write(chunk)
    return n


def _upload_too_large(limit: int) -> AppError:
    return PayloadTooLarge(f"the upload is larger than the limit of {limit} bytes: upload a smaller dataset or "
                           "raise GRAFT_MAX_UPLOAD_BYTES",
                           details=[Problem(f"the upload is larger than the limit of {limit} bytes",
                                            "upload a smaller dataset or raise GRAFT_MAX_UPLOAD_BYTES").as_dict()])


def _extracted_too_large(limit: int) -> AppError:
    p = Problem(f"the zip expands to more than {limit} bytes (a zip bomb?)",
                "upload a smaller dataset or raise GRAFT_MAX_EXTRACTED_BYTES")
    return BadRequest(p.text, details=[p.as_dict()])


def _write_entry(target: Path, src: BinaryIO | _ZipSource, limit: int) -> int:
    """One file of an upload. Raises _TooLarge past `limit`; OSError for a path the file system cannot hold."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return _copy_limited(src, target, limit)


class _EntryProblems:
    """The problems of an upload's entries (paths, links, clashes), collected item by item."""

    def __init__(self):
        self.by_kind: dict[str, list[str]] = defaultdict(list)

    def path(self, name: str) -> PurePosixPath | None:
        """A relative path with no absolute root, drive, '..' or empty parts; None (and noted) otherwise."""
        clean = name.replace("\\", "/")
        p = PurePosixPath(clean)
        if not clean or p.is_absolute() or clean.startswith("/") or (p.parts and ":" in p.parts[0]):
            self.by_kind["absolute"].append(name)
            return None
        if any(part in ("..", "") for part in clean.rstrip("/").split("/")):
            self.by_kind["dotdot"].append(name)
            return None
        return p

    def os_error(self, name: str, e: OSError) -> None:
        if isinstance(e, (FileExistsError, IsADirectoryError, NotADirectoryError)):
            self.by_kind["clash"].append(name)
        elif e.errno == errno.ENAMETOOLONG:
            self.by_kind["long"].append(name)
        else:
            raise e

    def problems(self) -> list[Problem]:
        k = self.by_kind
        out = []
        if k["absolute"]:
            out.append(Problem(f"refused {plural(len(k['absolute']), 'entry', 'entries')} with an absolute path "
                               f"({examples(map(repr, k['absolute']))}): absolute paths are not allowed in an upload",
                               "zip the dataset folder itself, so that the paths inside are relative",
                               k["absolute"]))
        if k["dotdot"]:
            out.append(Problem(f"refused {plural(len(k['dotdot']), 'entry', 'entries')} with '..' in the path "
                               f"({examples(map(repr, k['dotdot']))}): '..' could write outside the dataset "
                               "(zip slip)", "re-create the archive from the dataset folder", k["dotdot"]))
        if k["link"]:
            out.append(Problem(f"refused {plural(len(k['link']), 'symbolic link')} "
                               f"({examples(map(repr, k['link']))}): symbolic links are not allowed in an upload",
                               "replace each link by the file it points to (zip without --symlinks)", k["link"]))
        if k["encrypted"]:
            out.append(Problem(f"refused {plural(len(k['encrypted']), 'encrypted entry', 'encrypted entries')} "
                               f"({examples(map(repr, k['encrypted']))}): the server cannot read them",
                               "zip the dataset again without a password", k["encrypted"]))
        if k["clash"]:
            out.append(Problem(f"refused {plural(len(k['clash']), 'entry', 'entries')} "
                               f"({examples(map(repr, k['clash']))}): each clashes with another entry of the "
                               "upload, a file and a folder of the same name",
                               "rename one of each pair and upload again", k["clash"]))
        if k["long"]:
            out.append(Problem(f"refused {plural(len(k['long']), 'entry', 'entries')} whose name is too long for the "
                               f"server's file system ({examples(map(repr, k['long']))})",
                               "rename them shorter and upload again", k["long"]))
        if k["ratio"]:
            out.append(Problem(f"refused {plural(len(k['ratio']), 'entry', 'entries')} compressed far beyond what "
                               f"images allow (a zip bomb?): {examples(k['ratio'])}",
                               "upload a normally compressed zip, or raise GRAFT_MAX_ZIP_RATIO",
                               [n.rsplit(' (', 1)[0] for n in k["ratio"]]))
        return out


def safe_relpath(name: str) -> PurePosixPath:
    """A relative path with no absolute root, drive, '..' or empty parts; raises BadRequest otherwise."""
    found = _EntryProblems()
    p = found.path(name)
    if p is None:
        refuse(found.problems(), BadRequest)
    return p


def check_zip(zf: zipfile.ZipFile, settings: Settings) -> list[zipfile.ZipInfo]:
    """Every entry checked before extracting anything: paths, symlinks, sizes, ratios, count. Every problem
    found is reported in one BadRequest."""
    infos = zf.infolist()
    found = _EntryProblems()
    total = 0
    keep = []
    for info in infos:
        if found.path(info.filename) is None:
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            found.by_kind["link"].append(info.filename)
            continue
        if info.flag_bits & 0x1:
            found.by_kind["encrypted"].append(info.filename)
            continue
        if not info.is_dir():
            total += info.file_size
            if (info.compress_size and info.file_size > (1 << 20)
                    and info.file_size / info.compress_size > settings.max_zip_ratio):
                found.by_kind["ratio"].append(f"{info.filename} ({info.file_size / info.compress_size:.0f}:1, the "
                                              f"limit is {settings.max_zip_ratio:.0f}:1)")
                continue
        keep.append(info)
    problems = []
    if len(infos) > settings.max_zip_entries:
        problems.append(Problem(f"the zip has {len(infos)} entries, more than the limit of {settings.max_zip_entries} "
                                "(a zip bomb?)", "upload fewer files or raise GRAFT_MAX_ZIP_ENTRIES"))
    if total > settings.max_extracted_bytes:
        problems.append(Problem(f"the zip expands to {total} bytes, more than the limit of "
                                f"{settings.max_extracted_bytes} (a zip bomb?)",
                                "upload a smaller dataset or raise GRAFT_MAX_EXTRACTED_BYTES"))
    problems += found.problems()
    if problems:
        refuse(problems, BadRequest)
    return keep


def _extract(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path, settings: Settings) -> None:
    """Entries already checked by check_zip. Folders are created too, so that an empty class folder shows."""
    _extract_entries(((i.filename, i.is_dir(), partial(zf.open, i)) for i in infos), dest, settings)


def _extract_entries(entries: Iterable[tuple[str, bool, Callable[[], IO[bytes] | None]]], dest: Path,
                     settings: Settings) -> None:
    """(name, is a folder, open it) of an archive's checked entries into `dest`: the sizes are counted as they
    come out (a declared size may lie), names that would leave `dest` are refused, write errors named."""
    found = _EntryProblems()
    written = 0
    root = dest.resolve()
    for name, is_dir, open_entry in entries:
        target = dest / PurePosixPath(name.replace("\\", "/"))
        if not target.resolve().is_relative_to(root):
            found.by_kind["dotdot"].append(name)
            continue
        try:
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            src = open_entry()
            if src is not None:
                with src:
                    written += _write_entry(target, _ZipSource(src), settings.max_extracted_bytes - written)
        except _TooLarge:
            raise _extracted_too_large(settings.max_extracted_bytes) from None
        except OSError as e:
            found.os_error(name, e)
    if found.problems():
        refuse(found.problems(), BadRequest)


def _register(session: Session, settings: Settings, user: User, name: str, folder: Path,
              workspace_id: int) -> Dataset:
    verdict = diagnose(folder, settings)
    root_rel = verdict.root.relative_to(settings.data_dir)
    ds = Dataset(owner_id=user.id, workspace_id=workspace_id, name=name.strip() or folder.name, path=str(root_rel),
                 layout=verdict.layout, classes=verdict.classes, counts=verdict.counts, warnings=verdict.warnings,
                 num_images=verdict.num_images, size_bytes=verdict.size_bytes)
    key, _ = storage.dataset_key(str(root_rel))
    st = storage.for_settings(settings)
    try:
        storage.adopt_tree(st, settings, folder, key)  # into object storage when there is one
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


def _check_name(name: str) -> None:
    if len(name.strip()) > Dataset.NAME_MAX:
        raise Unprocessable(f"the dataset name has {len(name.strip())} characters, more than the limit of "
                            f"{Dataset.NAME_MAX}: choose a shorter name")


def _new_folder(settings: Settings) -> Path:
    settings.ensure_dirs()
    d = settings.datasets_dir / uuid.uuid4().hex
    d.mkdir()
    return d


def create_from_zip(session: Session, settings: Settings, user: User, name: str, upload: BinaryIO,
                    workspace_id: int | None = None) -> Dataset:
    """A zip of the dataset into the workspace (default: the user's personal one; editors only)."""
    _check_name(name)
    wid = workspaces.target(session, user, workspace_id, "uploading a dataset").id
    settings.ensure_dirs()
    tmp_zip = settings.uploads_dir / f"{uuid.uuid4().hex}.zip"
    folder = None
    try:
        try:
            _copy_limited(upload, tmp_zip, settings.max_upload_bytes)
        except _TooLarge:
            raise _upload_too_large(settings.max_upload_bytes) from None
        if not zipfile.is_zipfile(tmp_zip):
            refuse([Problem("the file is not a zip archive",
                            "zip the dataset folder (train/ and val/, or one folder per class) and upload the .zip")],
                   BadRequest)
        try:
            with zipfile.ZipFile(tmp_zip) as zf:
                infos = check_zip(zf, settings)
                folder = _new_folder(settings)
                _extract(zf, infos, folder, settings)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error) as e:
            refuse([Problem(f"the zip archive is corrupt or uses an unsupported feature ({e})",
                            "create it again with a standard zip tool")], BadRequest)
        return _register(session, settings, user, name, folder, wid)
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
    _check_name(name)
    wid = workspaces.target(session, user, workspace_id, "uploading a dataset").id
    folder = _new_folder(settings)
    try:
        found = _EntryProblems()
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
                total += _write_entry(target, fobj, settings.max_upload_bytes - total)
            except _TooLarge:
                raise _upload_too_large(settings.max_upload_bytes) from None
            except OSError as e:
                found.os_error(relname, e)
        if count == 0:
            refuse([Problem("no files were uploaded", "pick the dataset folder")], BadRequest)
        if found.problems():
            refuse(found.problems(), BadRequest)
        return _register(session, settings, user, name, folder, wid)
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
    dataset that has jobs is refused too (delete the jobs first). Files go after the row."""
    ds = get_owned(session, user, dataset_id, access.EDIT, "deleting a dataset")
    active = session.scalar(select(func.count()).select_from(Job).where(Job.dataset_id == ds.id,
                                                                      Job.status.not_in(FINAL_STATUSES)))
    if active:
        raise Conflict(f"dataset {ds.id} is used by {active} queued or running job(s): cancel them first")
    used = session.scalar(select(func.count()).select_from(Job).where(Job.dataset_id == ds.id, Job.kind != JobKind.probe.value))
    if used:
        raise Conflict(f"dataset {ds.id} has {used} job(s) whose models came from it: delete those jobs first")
    for probe in session.scalars(select(Job).where(Job.dataset_id == ds.id)):  # backbone comparisons: no model
        session.delete(probe)
    session.flush()
    folder = settings.data_dir / Path(ds.path).parts[0] / Path(ds.path).parts[1]
    key, _ = storage.dataset_key(ds.path)
    session.delete(ds)
    session.commit()
    storage.forget_tree(storage.for_settings(settings), settings, key)
    if folder.resolve().is_relative_to(settings.datasets_dir.resolve()):
        shutil.rmtree(folder, ignore_errors=True)
    thumbs = settings.thumbs_dir / folder.name  # sample thumbnails of the dataset page
    if thumbs.resolve().is_relative_to(settings.thumbs_dir.resolve()):
        shutil.rmtree(thumbs, ignore_errors=True)


# ---------------------------------------------------------------- a dataset from resumable uploads (parts)


def check_tar(tf: tarfile.TarFile, settings: Settings) -> list[tarfile.TarInfo]:
    """check_zip for a tar (plain, gz, bz2 or xz): relative paths only, regular files and folders only (no
    links, devices or fifos), the entry count and the total size under the limits."""
    found = _EntryProblems()
    special: list[str] = []
    keep, total, count = [], 0, 0
    for m in tf:
        count += 1
        if count > settings.max_zip_entries:
            break
        if found.path(m.name) is None:
            continue
        if m.issym() or m.islnk():
            found.by_kind["link"].append(m.name)
        elif not (m.isfile() or m.isdir()):
            special.append(m.name)
        else:
            total += m.size if m.isfile() else 0
            keep.append(m)
    problems = []
    if count > settings.max_zip_entries:
        problems.append(Problem(f"the archive has more than {settings.max_zip_entries} entries (a bomb?)",
                                "upload fewer files or raise GRAFT_MAX_ZIP_ENTRIES"))
    if total > settings.max_extracted_bytes:
        problems.append(Problem(f"the archive expands to {total} bytes, more than the limit of "
                                f"{settings.max_extracted_bytes}", "upload a smaller dataset or raise "
                                "GRAFT_MAX_EXTRACTED_BYTES"))
    problems += found.problems()
    if special:
        problems.append(Problem(f"refused {plural(len(special), 'entry', 'entries')} that are devices or pipes "
                                f"({examples(map(repr, special))}): only files and folders are allowed",
                                "archive the dataset folder's images only", special))
    if problems:
        refuse(problems, BadRequest)
    return keep


def _extract_tar(tf: tarfile.TarFile, infos: list[tarfile.TarInfo], dest: Path, settings: Settings) -> None:
    """_extract for a tar's entries already checked by check_tar."""
    _extract_entries(((m.name, m.isdir(), partial(tf.extractfile, m)) for m in infos), dest, settings)


def _extract_part(path: Path, dest: Path, settings: Settings) -> None:
    """One part (a zip or a tar) into `dest`, with every check of a zip upload."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                _extract(zf, check_zip(zf, settings), dest, settings)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path, "r:*") as tf:
                _extract_tar(tf, check_tar(tf, settings), dest, settings)
        else:
            refuse([Problem("the part is not a zip or tar archive",
                            "send zips (or tars) of the dataset folder's files")], BadRequest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, NotImplementedError,
            zlib.error) as e:
        refuse([Problem(f"the archive is corrupt or uses an unsupported feature ({e})",
                        "create it again with a standard zip or tar tool")], BadRequest)


def create_from_uploads(session: Session, settings: Settings, user: User, name: str, upload_ids: list[str],
                        workspace_id: int | None = None) -> Dataset:
    """Finished resumable uploads (app.services.uploads), each a zip or tar of part of the dataset, extracted
    one after another into one folder that the doctor then checks whole. Unknown (or another user's) uploads
    are 404 and unfinished ones 409, before anything is touched; a refused part or dataset leaves no folder
    and no row, and its uploads are deleted; a created dataset's uploads are deleted too. The size and entry
    limits apply to all the parts together."""
    _check_name(name)
    wid = workspaces.target(session, user, workspace_id, "uploading a dataset").id
    if not upload_ids:
        raise BadRequest("no uploads: list the ids of the finished uploads (POST /api/v1/uploads) in 'uploads'")
    if len(set(upload_ids)) != len(upload_ids):
        raise BadRequest("an upload is listed twice in 'uploads': list each part once")
    parts = [uploads.finished_part(settings, user.id, uid) for uid in upload_ids]
    folder = _new_folder(settings)
    try:
        for i, (uid, part) in enumerate(zip(upload_ids, parts), 1):
            done = list(folder.rglob("*"))  # what the parts before took of the limits
            used = sum(p.stat().st_size for p in done if p.is_file())
            left = settings.model_copy(update={"max_extracted_bytes": max(1, settings.max_extracted_bytes - used),
                                               "max_zip_entries": max(1, settings.max_zip_entries - len(done))})
            try:
                _extract_part(part, folder, left)
            except AppError as e:
                e.message = f"part {i} of {len(parts)} (upload {uid}): {e.message}"
                raise
        tops = [p for p in folder.iterdir() if not p.name.startswith(".")]
        default = tops[0].name if len(tops) == 1 and tops[0].is_dir() else "dataset"
        ds = _register(session, settings, user, name.strip() or default[:Dataset.NAME_MAX], folder, wid)
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
