"""Datasets imported from where the images already are, without uploading them:

- `s3://bucket/prefix/`: the objects under the prefix are fetched with the server's AWS_* credentials (the
  same variables as GRAFT_STORAGE_URL's) into a new dataset folder, then checked by the doctor as an upload.
- `/srv/...`: a folder on the server, for admins only, under one of GRAFT_IMPORT_ROOTS; it is copied (never
  linked: the dataset must not change under a job), symbolic links refused.

The same limits as uploads apply (GRAFT_MAX_EXTRACTED_BYTES, GRAFT_MAX_ZIP_ENTRIES), and a failed import
leaves nothing behind. Torch-free."""
from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from sqlalchemy.orm import Session

from app.core.errors import BadRequest, Forbidden
from app.core.settings import Settings
from app.db.models import User
from app.services import datasets, workspaces
from app.services.doctor import Problem, refuse


def create_from_source(session: Session, settings: Settings, user: User, name: str, source: str,
                       workspace_id: int | None = None):
    """A dataset from `source` (s3://bucket/prefix/ or a server folder), into the workspace."""
    datasets.check_name(name)
    wid = workspaces.target(session, user, workspace_id, "importing a dataset").id
    folder = datasets.new_folder(settings)
    try:
        if source.startswith("s3://"):
            default = _fetch_s3(source, folder, settings)
        elif source.startswith("/"):
            default = _copy_folder(source, folder, settings, user)
        else:
            raise BadRequest(f"source {source[:200]!r} is neither s3://bucket/prefix/ nor an absolute server folder")
        return datasets.register(session, settings, user, name or default, folder, wid)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        session.rollback()
        raise


def _limits(settings: Settings, count: int, total: int) -> None:
    if count > settings.max_zip_entries:
        raise BadRequest(f"the source holds more than {settings.max_zip_entries} files: import a smaller part, or "
                         "raise GRAFT_MAX_ZIP_ENTRIES")
    if total > settings.max_extracted_bytes:
        raise BadRequest(f"the source holds more than {settings.max_extracted_bytes} bytes: import a smaller part, "
                         "or raise GRAFT_MAX_EXTRACTED_BYTES")


def _fetch_s3(source: str, folder: Path, settings: Settings) -> str:
    u = urlparse(source)
    bucket, prefix = u.netloc, u.path.strip("/")
    if not bucket:
        raise BadRequest(f"source {source!r} names no bucket: write s3://bucket/prefix/")
    import boto3
    from boto3.exceptions import Boto3Error
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", config=Config(s3={"addressing_style": "path"}, connect_timeout=5,
                                              retries={"max_attempts": 3, "mode": "standard"}))
    root = folder.resolve()
    count = total = 0
    try:
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix
                                                                     else ""):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue
                count, total = count + 1, total + int(obj["Size"])
                _limits(settings, count, total)
                keys.append(obj["Key"])
        if not keys:
            raise BadRequest(f"bucket {bucket} has no objects under {prefix or '(the top)'}/: check the prefix")
        for key in keys:
            rel = PurePosixPath(key[len(prefix):].lstrip("/"))
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                refuse([Problem(f"object {key!r} has a path that leaves the dataset folder", "rename it")], BadRequest)
            target = (folder / rel).resolve()
            if not target.is_relative_to(root):
                refuse([Problem(f"object {key!r} has a path that leaves the dataset folder", "rename it")], BadRequest)
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "") or str(e)
        why = {"NoSuchBucket": "it does not exist", "AccessDenied": "access is denied to these credentials",
               "403": "access is denied to these credentials", "404": "it does not exist"}.get(code, code)
        raise BadRequest(f"cannot read bucket {bucket}: {why} (check the name and the server's AWS_* settings)",
                         {"bucket": bucket, "reason": code}) from None
    except (BotoCoreError, Boto3Error) as e:
        raise BadRequest(f"cannot read bucket {bucket}: {type(e).__name__}: {e}", {"bucket": bucket}) from None
    return PurePosixPath(prefix).name or bucket


def _copy_folder(source: str, folder: Path, settings: Settings, user: User) -> str:
    if not user.is_admin:
        raise Forbidden("only admins import server folders (others upload, or import from s3://)")
    roots = [Path(r).resolve() for r in settings.import_roots]
    if not roots:
        raise BadRequest("no server folder may be imported: an admin sets GRAFT_IMPORT_ROOTS (a JSON list of "
                         "folders) first")
    src = Path(source)
    if ".." in src.parts:
        raise BadRequest("the folder's path must not contain '..'")
    real = src.resolve()
    if not any(real.is_relative_to(r) for r in roots):
        raise BadRequest(f"{source} is outside the folders that may be imported ({', '.join(map(str, roots))}); "
                         "an admin adds its folder to GRAFT_IMPORT_ROOTS")
    if not real.is_dir():
        raise BadRequest(f"{source} is not a folder on the server")
    count = total = 0
    for p in sorted(real.rglob("*")):
        if p.is_symlink():
            refuse([Problem(f"{p.relative_to(real)} is a symbolic link", "copy the file it points to instead")],
                   BadRequest)
        if p.is_file():
            count, total = count + 1, total + p.stat().st_size
            _limits(settings, count, total)
    for p in sorted(real.rglob("*")):
        if p.is_file():
            target = folder / p.relative_to(real)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
    return real.name
