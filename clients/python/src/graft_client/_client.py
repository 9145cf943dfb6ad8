"""The client: :class:`Graft`."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal, Union

import httpx

from . import _packing
from ._progress import Progress
from ._tus import TusUploader
from .errors import ConnectionFailed, GraftError, error_for
from .models import BatchJob, Dataset, Job, Prediction

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_PART_SIZE = 100 * 1000 * 1000  # bytes per zip part of a folder's upload
MULTIPART_LIMIT = 64 * 1000 * 1000  # a batch's zip up to this size goes in one request, larger ones resumably


def _filename(disposition: str | None) -> str | None:
    """The file name of a Content-Disposition header, without any folder."""
    if not disposition:
        return None
    m = re.search(r"filename\*=(?:UTF-8'')?([^;]+)", disposition, re.I) or \
        re.search(r'filename="([^"]+)"', disposition, re.I) or re.search(r"filename=([^;]+)", disposition, re.I)
    if not m:
        return None
    from urllib.parse import unquote

    name = unquote(m.group(1).strip().strip('"')).replace("\\", "/").rsplit("/", 1)[-1]
    return name if name not in ("", ".", "..") else None


class Graft:
    """A client of a Graft server's REST API (``/api/v1``).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        token: an API token (``graft token create --name NAME``, or the Tokens page); default: the
            ``GRAFT_TOKEN`` environment variable.
        timeout: seconds to wait for each network operation (connecting, each read or write).
        progress: show progress bars (uploads, :meth:`Job.wait`); each call can override it.
        part_size: bytes per zip part when a folder is uploaded (each part is one resumable upload).
        chunk_size: bytes per request within a resumable upload.
        retries: how many times in a row a broken-off upload is resumed before giving up.
        transport: an ``httpx`` transport (for tests, proxies or an in-process app).

    Use it as a context manager (``with Graft(url, token) as g: ...``) or call :meth:`close`. Every error
    answer raises a :class:`~graft_client.GraftError` subclass with the server's message.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float | httpx.Timeout = 60.0,
                 progress: bool = True, part_size: int = DEFAULT_PART_SIZE, chunk_size: int = 32 << 20,
                 retries: int = 8, transport: httpx.BaseTransport | None = None, headers: dict[str, str] | None = None):
        token = token if token is not None else os.environ.get("GRAFT_TOKEN")
        all_headers = {"User-Agent": "graft-client/0.1", "Accept": "application/json", **(headers or {})}
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self.progress = progress
        self.part_size = part_size
        self._http = httpx.Client(base_url=self.url, headers=all_headers, timeout=timeout, transport=transport)
        self._tus = TusUploader(self._http, chunk_size=chunk_size, retries=retries)

    # ------------------------------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Closes the connections."""
        self._http.close()

    def __enter__(self) -> Graft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Graft({self.url!r})"

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request; an error answer raises its :class:`GraftError`, a failed connection ConnectionFailed."""
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"{method} {self.url}{path} failed: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise error_for(r)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    @contextlib.contextmanager
    def _stream(self, path: str, params: dict[str, Any] | None = None) -> Iterator[httpx.Response]:
        try:
            with self._http.stream("GET", path, params=params, follow_redirects=True) as r:
                if r.status_code >= 400:
                    r.read()
                    raise error_for(r)
                yield r
        except httpx.TransportError as e:
            raise ConnectionFailed(f"GET {self.url}{path} failed: {type(e).__name__}: {e}") from e

    def _download(self, path: str, dest: PathLike, params: dict[str, Any] | None = None,
                  default_name: str | None = None) -> Path:
        """Streams GET ``path`` into the file ``dest`` (or into the folder ``dest``, one that exists or a string
        ending in "/", under the server's name for it); the file appears only once it is complete."""
        as_folder = os.fspath(dest).endswith(("/", os.sep))
        target = Path(dest)
        with self._stream(path, params) as r:
            if as_folder or target.is_dir():
                name = _filename(r.headers.get("Content-Disposition")) or default_name or path.rsplit("/", 1)[-1]
                target = target / name
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    for block in r.iter_bytes(1 << 20):
                        f.write(block)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return target

    def _job_from(self, data: dict[str, Any]) -> Job:
        job: Job = (BatchJob if data.get("kind") == "batch_predict" else Job).model_validate(data)
        job._bind(self)
        return job

    def _dataset_from(self, data: dict[str, Any]) -> Dataset:
        ds = Dataset.model_validate(data)
        ds._bind(self)
        return ds

    # ------------------------------------------------------------------------------------------ datasets

    def datasets(self, workspace_id: int | None = None) -> list[Dataset]:
        """The datasets of every workspace you are a member of (or of one), newest first."""
        params = {"workspace_id": workspace_id} if workspace_id is not None else None
        return [self._dataset_from(d) for d in self._json("GET", "/api/v1/datasets", params=params)]

    def dataset(self, dataset_id: int) -> Dataset:
        """One dataset."""
        return self._dataset_from(self._json("GET", f"/api/v1/datasets/{int(dataset_id)}"))

    def upload(self, path: PathLike, filename: str | None = None, progress: bool | None = None) -> str:
        """Uploads one file resumably (tus 1.0, ``/api/v1/uploads``) and returns the upload's id."""
        p = Path(path)
        show = self.progress if progress is None else progress
        with Progress(p.stat().st_size, f"uploading {p.name}", enabled=show) as bar:
            return self._tus.upload(p, filename, bar)

    def upload_dataset(self, path_or_zip: PathLike, name: str | None = None, workspace_id: int | None = None, *,
                       part_size: int | None = None, progress: bool | None = None) -> Dataset:
        """Uploads a dataset and returns it, checked by the server's dataset doctor (its ``layout``,
        ``classes``, ``counts`` and ``warnings``).

        ``path_or_zip``: a folder (``train/`` and ``val/`` of one folder per class, or just one folder per
        class), packed here into zip parts of about ``part_size`` bytes (default: the client's, 100 MB),
        written one at a time to a temporary file; or a zip (or tar) file, sent as one part. Each part is a
        resumable upload (tus): a broken connection resumes where the server's bytes end. The parts are then
        made into one dataset named ``name`` (default: the folder's or file's name), in ``workspace_id``
        (default: your personal workspace).
        """
        src = Path(path_or_zip)
        show = self.progress if progress is None else progress
        size = part_size or self.part_size
        if src.is_dir():
            files = _packing.folder_files(src)
            if not files:
                raise GraftError(f"{src} has no files to upload")
            total = sum(f[2] for f in files)
            default_name = src.resolve().name
            ids: list[str] = []
            with tempfile.TemporaryDirectory(prefix="graft-upload-") as tmp, \
                    Progress(total, f"uploading {default_name}", enabled=show) as bar:
                groups = _packing.plan_parts(files, size)
                done = 0
                try:
                    for i, group in enumerate(groups, 1):
                        part = _packing.write_part(group, Path(tmp) / f"part-{i:05d}.zip")
                        try:
                            bar.note(f"part {i} of {len(groups)}")
                            ids.append(self._tus.upload(part, f"{default_name}-part{i}.zip", bar, done))
                            done += sum(f[2] for f in group)
                            bar.update_to(done)
                        finally:
                            part.unlink(missing_ok=True)
                except BaseException:
                    for uid in ids:  # the parts sent so far would count against your upload limit
                        self._tus.delete(uid)
                    raise
        elif src.is_file():
            default_name = src.name.removesuffix(".zip").removesuffix(".tar.gz").removesuffix(".tgz") \
                .removesuffix(".tar")
            with Progress(src.stat().st_size, f"uploading {src.name}", enabled=show) as bar:
                ids = [self._tus.upload(src, src.name, bar)]
        else:
            raise FileNotFoundError(f"{src} is neither a folder nor a file")
        body: dict[str, Any] = {"name": name if name is not None else default_name, "uploads": ids}
        if workspace_id is not None:
            body["workspace_id"] = workspace_id
        return self._dataset_from(self._json("POST", "/api/v1/datasets", json=body))

    # ------------------------------------------------------------------------------------------ jobs

    def jobs(self, status: str | None = None, dataset_id: int | None = None,
             workspace_id: int | None = None) -> list[Job]:
        """The jobs of every workspace you are a member of, newest first (optionally of one ``status``,
        dataset or workspace). Batch predictions come as :class:`BatchJob`."""
        params = {k: v for k, v in {"status": status, "dataset_id": dataset_id, "workspace_id": workspace_id}.items()
                  if v is not None}
        return [self._job_from(j) for j in self._json("GET", "/api/v1/jobs", params=params or None)]

    def job(self, job_id: int) -> Job:
        """One job (a :class:`BatchJob` for a batch prediction)."""
        return self._job_from(self._json("GET", f"/api/v1/jobs/{int(job_id)}"))

    def train(self, dataset_id: int | Dataset, strategy: str = "features", epochs: int | None = None,
              **spec: Any) -> Job:
        """Queues a training job on a dataset and returns it (``job.wait()`` waits for it).

        ``strategy``: ``features`` (a new head on frozen features), ``finetune_last:N``, ``full`` or
        ``two_stage``; ``epochs``: the most epochs (default: the strategy's). ``spec``: any other run parameter
        of the server (``backbone``, ``lr``, ``batch_size``, ``image_size``, ``augment``, ``seed``,
        ``workspace_id``...; see the API's JobCreate at ``/docs``). Unknown or invalid parameters raise
        :class:`~graft_client.ValidationError` naming them."""
        did = dataset_id.id if isinstance(dataset_id, Dataset) else int(dataset_id)
        body: dict[str, Any] = {"dataset_id": did, "strategy": strategy, **spec}
        if epochs is not None:
            body["epochs"] = epochs
        return self._job_from(self._json("POST", "/api/v1/jobs", json=body))

    # ------------------------------------------------------------------------------------------ predictions

    def predict(self, job_id: int | Job, paths: PathLike | Sequence[PathLike], explain: bool = False,
                top_k: int = 3, batch_size: int = 64) -> list[Prediction]:
        """Classifies images with a job's model: one :class:`Prediction` per path, in order (its top-k classes
        with calibrated probabilities, ``abstained`` and ``ood_score``, or the ``error`` that image met).
        ``explain=True`` adds ``heatmap_png`` (where the model looked). Sent ``batch_size`` images a request."""
        jid = job_id.id if isinstance(job_id, Job) else int(job_id)
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        out: list[Prediction] = []
        for s in range(0, len(items), max(1, batch_size)):
            chunk = [Path(p) for p in items[s:s + batch_size]]
            with contextlib.ExitStack() as stack:
                files: list[tuple[str, tuple[str, IO[bytes], str]]] = [
                    ("files", (p.name, stack.enter_context(open(p, "rb")), "application/octet-stream")) for p in chunk]
                data = self._json("POST", f"/api/v1/jobs/{jid}/predict",
                                  params={"explain": "true"} if explain else None, data={"top_k": str(top_k)},
                                  files=files)
            out.extend(Prediction.model_validate(r) for r in data["results"])
        return out

    def batch_predict(self, job_id: int | Job, folder_or_zip: PathLike, top_k: int = 3,
                      confidence_threshold: float | None = None, *,
                      via: Literal["auto", "multipart", "upload"] = "auto", progress: bool | None = None) -> BatchJob:
        """Starts a batch prediction over a folder of images, a zip of them, or an ``s3://bucket/prefix/`` the
        server can read; returns the :class:`BatchJob` (``.wait()``, then ``.results()``).

        A folder is packed into a zip (a temporary file). A zip up to 64 MB is sent in one request, a larger
        one as a resumable upload (``via`` forces either: ``"multipart"`` or ``"upload"``). ``top_k``: the classes
        listed per image; ``confidence_threshold``: abstain below it (default: the job's operating point)."""
        jid = job_id.id if isinstance(job_id, Job) else int(job_id)
        url = f"/api/v1/jobs/{jid}/batch-predict"
        show = self.progress if progress is None else progress
        source = os.fspath(folder_or_zip)
        options: dict[str, Any] = {}
        if top_k != 3:
            options["top_k"] = top_k
        if confidence_threshold is not None:
            options["confidence_threshold"] = confidence_threshold
        if source.startswith("s3://"):
            return self._batch(self._json("POST", url, json={"source": source, **options}))
        src = Path(source)
        with tempfile.TemporaryDirectory(prefix="graft-batch-") as tmp:
            if src.is_dir():
                files = _packing.folder_files(src)
                if not files:
                    raise GraftError(f"{src} has no files to predict")
                zpath = _packing.write_part(files, Path(tmp) / f"{src.resolve().name}.zip")
            elif src.is_file():
                if not zipfile.is_zipfile(src):
                    raise GraftError(f"{src} is not a zip file: give a folder of images or a zip of them")
                zpath = src
            else:
                raise FileNotFoundError(f"{src} is neither a folder nor a file")
            size = zpath.stat().st_size
            if via == "multipart" or (via == "auto" and size <= MULTIPART_LIMIT):
                with open(zpath, "rb") as f:
                    form = {k: str(v) for k, v in {"top_k": top_k, **options}.items()}
                    data = self._json("POST", url, data=form, files={"file": (zpath.name, f, "application/zip")})
            else:
                with Progress(size, f"uploading {zpath.name}", enabled=show) as bar:
                    upload_id = self._tus.upload(zpath, zpath.name, bar)
                data = self._json("POST", url, json={"upload_id": upload_id, **options})
        return self._batch(data)

    def _batch(self, data: dict[str, Any]) -> BatchJob:
        job = BatchJob.model_validate(data)
        job._bind(self)
        return job
