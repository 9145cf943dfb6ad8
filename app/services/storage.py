"""Where datasets, checkpoints, models, exports and pictures live: GRAFT_STORAGE_URL.

- `file:///srv/graft` (or unset: the data directory): the files themselves, as before. A key is a path
  relative to the root ("datasets/<id>/...", "runs/<job id>/model.pt"); nothing is copied.
- `s3://bucket/prefix`: an S3 bucket (AWS S3, MinIO, Ceph RGW, SeaweedFS...; boto3 reads the credentials,
  AWS_ENDPOINT_URL and AWS_DEFAULT_REGION from the standard variables). Every process then works on a local
  scratch copy under its own GRAFT_DATA_DIR: `materialize_tree`/`materialize_file` fetch a dataset or a
  model once and reuse it; the least recently used copies are evicted past GRAFT_SCRATCH_MAX_BYTES.

Keys are the same in both modes, so the rows (Dataset.path, Artifact.path) do not depend on the storage.
Torch-free; used by the web tier and by the worker bridge (never by the engine, which writes local files)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DONE = ".graft-complete"  # written last into a fetched folder: a folder without it is incomplete
# In object storage, a dataset version's files that are unchanged from its parent are not stored again:
# this object under the version's prefix maps their relative paths to the keys that hold them.
SHARED = ".graft-shared.json"
CHUNK = 1 << 20


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link of src at dest (no bytes copied), or a copy where links cannot be made."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


class StorageError(Exception):
    """The storage cannot be reached or refused the operation (the web answers 503 with this message)."""


def safe_key(key: str) -> str:
    """A relative key with no '..', no leading '/', no backslashes (the caller's keys, never a user's)."""
    p = PurePosixPath(key.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"bad storage key {key!r}")
    return str(p)


class Storage:
    """The operations every backend has."""

    url: str
    local: bool  # the files are on this host's disk (no scratch copies needed)

    def path(self, key: str) -> Path | None:
        """The file of `key` on this host, when the storage is local."""
        return None

    def put_file(self, src: Path, key: str) -> None:
        raise NotImplementedError

    def put_tree(self, src: Path, prefix: str, skip: frozenset[str] = frozenset()) -> int:
        """Every file under `src` at prefix/<relative path> (but those whose relative path is in `skip`);
        returns the bytes sent."""
        total = 0
        for p in sorted(src.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.name != DONE and p.relative_to(src).as_posix() not in skip:
                self.put_file(p, f"{prefix}/{p.relative_to(src).as_posix()}")
                total += p.stat().st_size
        return total

    def get_file(self, key: str, dest: Path) -> None:
        raise NotImplementedError

    def keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under prefix/."""
        raise NotImplementedError

    def open(self, key: str) -> IO[bytes]:
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def presign(self, key: str, filename: str, expires_s: int = 3600) -> str | None:
        return None

    def check(self) -> None:
        """Raise StorageError when the storage cannot be used."""


class LocalStorage(Storage):
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.url, self.local = self.root.as_uri(), True

    def path(self, key: str) -> Path:
        p = (self.root / safe_key(key)).resolve()
        if not p.is_relative_to(self.root):
            raise ValueError(f"bad storage key {key!r}")
        return p

    def put_file(self, src: Path, key: str) -> None:
        dest = self.path(key)
        if Path(src).resolve() == dest:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        link_or_copy(Path(src), tmp)  # stored files are never written again, so a hard link is a copy
        os.replace(tmp, dest)

    def put_tree(self, src: Path, prefix: str, skip: frozenset[str] = frozenset()) -> int:
        if Path(src).resolve() == self.path(prefix):
            return 0  # already there: the data directory is the storage
        return super().put_tree(src, prefix, skip)

    def get_file(self, key: str, dest: Path) -> None:
        src = self.path(key)
        if not src.is_file():
            raise FileNotFoundError(key)
        if src != Path(dest).resolve():
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)

    def keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self.path(prefix)
        for p in sorted(base.rglob("*")) if base.is_dir() else []:
            if p.is_file():
                yield p.relative_to(self.root).as_posix(), p.stat().st_size

    def open(self, key: str) -> IO[bytes]:
        return self.path(key).open("rb")

    def size(self, key: str) -> int | None:
        p = self.path(key)
        return p.stat().st_size if p.is_file() else None

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        p = self.path(prefix)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file():
            p.unlink(missing_ok=True)


class S3Storage(Storage):
    def __init__(self, url: str):
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise ValueError(f"GRAFT_STORAGE_URL {url!r} is not s3://bucket[/prefix]")
        self.url, self.local = url, False
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # path-style addressing: MinIO, SeaweedFS and Ceph need it; AWS accepts it
                self._client = boto3.client("s3", config=Config(
                    s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=120,
                    retries={"max_attempts": 4, "mode": "standard"}))
            return self._client

    def _k(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kw)
        except Boto3Error as e:  # a managed transfer's failure (upload_file, download_file)
            raise StorageError(f"object storage {self.url} refused {what}: {e}") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(what) from None
            raise StorageError(f"object storage {self.url} refused {what}: {code or e}") from None
        except BotoCoreError as e:
            raise StorageError(f"object storage {self.url} cannot be reached ({type(e).__name__}: {e})") from None

    def put_file(self, src: Path, key: str) -> None:
        self._call(f"storing {key}", self.client.upload_file, str(src), self.bucket, self._k(key))

    def get_file(self, key: str, dest: Path) -> None:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        self._call(f"reading {key}", self.client.download_file, self.bucket, self._k(key), str(dest))

    def keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        full = self._k(prefix).rstrip("/") + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        cut = len(self.prefix) + 1 if self.prefix else 0
        for page in self._call(f"listing {prefix}", lambda: list(paginator.paginate(Bucket=self.bucket,
                                                                                    Prefix=full))):
            for obj in page.get("Contents", []):
                yield obj["Key"][cut:], int(obj["Size"])

    def open(self, key: str) -> IO[bytes]:
        return self._call(f"reading {key}", self.client.get_object, Bucket=self.bucket, Key=self._k(key))["Body"]

    def size(self, key: str) -> int | None:
        try:
            head = self._call(f"reading {key}", self.client.head_object, Bucket=self.bucket, Key=self._k(key))
        except FileNotFoundError:
            return None
        return int(head["ContentLength"])

    def delete_prefix(self, prefix: str) -> None:
        """Every object under prefix/ (listed page by page, deleted 1000 at a time: the S3 limit)."""
        batch = [{"Key": self._k(k)} for k, _ in self.keys(prefix)]
        for i in range(0, len(batch), 1000):
            out = self._call(f"deleting {prefix}", self.client.delete_objects, Bucket=self.bucket,
                             Delete={"Objects": batch[i:i + 1000], "Quiet": True})
            if out.get("Errors"):  # (a refusal per object comes back in the answer, not as an exception)
                e = out["Errors"][0]
                raise StorageError(f"object storage {self.url} refused deleting {len(out['Errors'])} object(s) "
                                   f"under {prefix} (e.g. {e.get('Key')}: {e.get('Code')})")

    def delete(self, key: str) -> None:
        self._call(f"deleting {key}", self.client.delete_object, Bucket=self.bucket, Key=self._k(key))

    def presign(self, key: str, filename: str, expires_s: int = 3600) -> str | None:
        return self._call(f"signing {key}", self.client.generate_presigned_url, "get_object", Params={
            "Bucket": self.bucket, "Key": self._k(key),
            "ResponseContentDisposition": f'attachment; filename="{filename}"'}, ExpiresIn=expires_s)

    def check(self) -> None:
        try:
            self._call(f"bucket {self.bucket}", self.client.head_bucket, Bucket=self.bucket)
        except FileNotFoundError:
            raise StorageError(f"the bucket {self.bucket} does not exist: create it, or run `graft migrate`, which "
                               "creates it") from None

    def ensure_bucket(self) -> bool:
        """Create the bucket when it is missing (`graft migrate`); True when it was made."""
        try:
            self._call(f"bucket {self.bucket}", self.client.head_bucket, Bucket=self.bucket)
            return False
        except FileNotFoundError:
            self._call(f"creating bucket {self.bucket}", self.client.create_bucket, Bucket=self.bucket)
            return True


@lru_cache(maxsize=8)
def _storage(url: str, data_dir: str) -> Storage:
    if url.startswith("s3://"):
        return S3Storage(url)
    if url.startswith("file://"):
        return LocalStorage(Path(urlparse(url).path))
    if not url:
        return LocalStorage(Path(data_dir))
    raise ValueError(f"GRAFT_STORAGE_URL {url!r}: use file:///path or s3://bucket/prefix")


def for_settings(settings: Any) -> Storage:
    """The storage of these settings (one client per URL and process)."""
    return _storage(settings.storage_url or "", str(settings.data_dir))


# ---------------------------------------------------------------- scratch copies on this host

_scratch_lock = threading.Lock()


def scratch_dir(settings: Any) -> Path:
    return Path(settings.data_dir) / "scratch"


def materialize_tree(storage: Storage, prefix: str, settings: Any) -> Path:
    """A local folder holding every object under prefix/ (the storage's own folder when it is local;
    otherwise a scratch copy fetched once, complete or not at all, and reused)."""
    if storage.local:
        p = storage.path(prefix)
        assert p is not None
        return p
    dest = scratch_dir(settings) / safe_key(prefix)
    with _scratch_lock:
        if (dest / DONE).is_file():
            os.utime(dest / DONE)  # recently used
            return dest
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        total = 0
        try:
            for key, size in storage.keys(prefix):
                rel = key[len(safe_key(prefix)) + 1:]
                storage.get_file(key, tmp / rel)
                total += size
            if (tmp / SHARED).is_file():
                total += _fetch_shared(storage, settings, json.loads((tmp / SHARED).read_text()), tmp)
            if total == 0 and not tmp.exists():
                raise FileNotFoundError(f"nothing in storage under {prefix}")
            (tmp / DONE).write_text(str(total))
            if dest.exists():
                shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    evict(settings, keep=dest)
    return dest


def _fetch_shared(storage: Storage, settings: Any, shared: dict[str, str], dest: Path) -> int:
    """The files a version shares with the datasets it was made from: hard links into this host's scratch
    copies of those where they are complete, fetched from the storage otherwise. Returns their bytes."""
    total = 0
    for rel, key in shared.items():
        src = scratch_dir(settings) / safe_key(key)
        home = scratch_dir(settings).joinpath(*PurePosixPath(safe_key(key)).parts[:2])
        if src.is_file() and (home / DONE).is_file():
            link_or_copy(src, dest / safe_key(rel))
        else:
            storage.get_file(key, dest / safe_key(rel))
        total += (dest / safe_key(rel)).stat().st_size
    return total


def shared_files(storage: Storage, prefix: str) -> dict[str, str]:
    """The files under prefix/ that are held under other keys: {relative path: key} (empty in local storage,
    where a version's unchanged files are hard links)."""
    if storage.local or storage.size(f"{prefix}/{SHARED}") is None:
        return {}
    with storage.open(f"{prefix}/{SHARED}") as f:
        return dict(json.load(f))


def materialize_file(storage: Storage, key: str, settings: Any) -> Path:
    """A local copy of one object (the file itself when the storage is local)."""
    if storage.local:
        p = storage.path(key)
        assert p is not None
        return p
    dest = scratch_dir(settings) / "files" / safe_key(key)
    if dest.is_file():
        os.utime(dest)
        return dest
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        storage.get_file(key, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    evict(settings, keep=dest)
    return dest


def _entries(root: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, path) of the scratch copies: complete folders and single files."""
    out: list[tuple[float, int, Path]] = []
    if not root.is_dir():
        return out
    for done in root.rglob(DONE):
        folder = done.parent
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        out.append((done.stat().st_mtime, size, folder))
    files = root / "files"
    for p in files.rglob("*") if files.is_dir() else []:
        if p.is_file() and not p.name.endswith(".partial"):
            out.append((p.stat().st_mtime, p.stat().st_size, p))
    return out


def evict(settings: Any, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used scratch copies until they fit GRAFT_SCRATCH_MAX_BYTES."""
    limit = int(getattr(settings, "scratch_max_bytes", 0) or 0)
    if limit <= 0:
        return []
    with _scratch_lock:
        entries = sorted(_entries(scratch_dir(settings)))
        total = sum(size for _, size, _ in entries)
        gone = []
        for _, size, path in entries:
            if total <= limit:
                break
            if keep is not None and (path == keep or keep.is_relative_to(path)):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            total -= size
            gone.append(path)
            log.info("evicted the scratch copy %s (%d bytes)", path, size)
        return gone


def wait_for(storage: Storage, timeout_s: float = 30.0) -> None:
    """Block until the storage answers (a test or a container starting next to its S3 server)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            storage.check()
            return
        except StorageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def dataset_key(ds_path: str) -> tuple[str, tuple[str, ...]]:
    """(the key of a dataset's upload folder, "datasets/<id>", and the parts of its root inside it)."""
    parts = PurePosixPath(ds_path.replace("\\", "/")).parts
    if len(parts) < 2 or ".." in parts:
        raise ValueError(f"bad dataset path {ds_path!r}")
    return f"{parts[0]}/{parts[1]}", tuple(parts[2:])


def adopt_tree(storage: Storage, settings: Any, local_dir: Path, prefix: str,
               shared: dict[str, str] | None = None) -> None:
    """A folder made on this host (an upload, extracted and checked) goes into the storage under `prefix`.
    With object storage this host keeps it as a scratch copy (evicted like the others); with a local
    storage elsewhere the copy moves there (as hard links where it can). `shared`: {relative path: key} of
    files already in object storage under another key (a version's unchanged files), recorded, not sent."""
    if storage.local and storage.path(prefix) == Path(local_dir).resolve():
        return  # the data directory is the storage: already in place
    if shared and not storage.local:
        storage.put_tree(local_dir, prefix, skip=frozenset(shared))
        manifest = Path(local_dir) / SHARED
        manifest.write_text(json.dumps(shared, sort_keys=True))
        storage.put_file(manifest, f"{prefix}/{SHARED}")
    else:
        storage.put_tree(local_dir, prefix)
    if storage.local:
        shutil.rmtree(local_dir, ignore_errors=True)
        return
    dest = scratch_dir(settings) / safe_key(prefix)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _scratch_lock:
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(local_dir), dest)
        (dest / DONE).write_text("adopted")
    evict(settings, keep=dest)


def forget_tree(storage: Storage, settings: Any, prefix: str) -> None:
    """Delete a folder from the storage and this host's scratch copies of it (the folder, single files)."""
    storage.delete_prefix(prefix)
    shutil.rmtree(scratch_dir(settings) / safe_key(prefix), ignore_errors=True)
    shutil.rmtree(scratch_dir(settings) / "files" / safe_key(prefix), ignore_errors=True)


BATCH_INPUTS = "batch-inputs"  # a batch prediction's images, waiting for its job: batch-inputs/<hex>


def job_prefixes(settings: Any, job_id: int, spec: dict | None) -> list[str]:
    """The prefixes that hold a job's objects and no one else's: its run folder runs/<id>/ (model, exports,
    metrics, pictures, checkpoint, a batch's results) and a batch prediction's images (spec.input_key, there
    until its job has run: a batch cancelled while queued keeps them). Never a dataset's objects, another job's
    (a batch's model_key is its training job's), nor the feature cache (features/: keyed by content, shared)."""
    out = [(Path(settings.runs_dir) / str(int(job_id))).relative_to(settings.data_dir).as_posix()]
    key = str((spec or {}).get("input_key") or "")
    parts = PurePosixPath(key).parts
    if len(parts) == 2 and parts[0] == BATCH_INPUTS and parts[1].isalnum():
        out.append(key)
    return out
