"""A tus 1.0 client (core protocol + creation) for Graft's resumable uploads, ``/api/v1/uploads``.

An upload is created with its length (``POST``, ``Upload-Length``, ``Upload-Metadata``); its bytes go in with
``PATCH`` at the server's offset, streamed from the file. When a connection breaks off, the server keeps the
bytes it received: ``HEAD`` says how many (``Upload-Offset``), and sending resumes from there."""
from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from ._progress import Progress
from .errors import ConnectionFailed, GraftError, error_for

TUS_VERSION = "1.0.0"
CONTENT_TYPE = "application/offset+octet-stream"
READ_SIZE = 256 * 1024
# answers after which sending again (from the server's offset) may succeed
_RETRY_STATUSES = {409, 423, 429, 500, 502, 503, 504}


class _Retry(Exception):
    def __init__(self, error: GraftError):
        super().__init__(str(error))
        self.error = error


def metadata(pairs: dict[str, str]) -> str:
    """The Upload-Metadata header: comma-separated ``key base64(value)`` pairs."""
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


class TusUploader:
    """Uploads files to a tus endpoint through ``http`` (an authenticated client with the server's base URL).

    ``chunk_size``: bytes per PATCH request; ``retries``: consecutive failures (broken connections, 5xx, 409)
    tolerated before giving up; ``retry_wait``: seconds before the first retry, doubling up to 30."""

    def __init__(self, http: httpx.Client, endpoint: str = "/api/v1/uploads", chunk_size: int = 32 << 20,
                 retries: int = 8, retry_wait: float = 0.5):
        self.http, self.endpoint = http, endpoint.rstrip("/")
        self.chunk_size, self.retries, self.retry_wait = max(1, chunk_size), retries, retry_wait

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"Tus-Resumable": TUS_VERSION, **extra}

    def create(self, length: int, meta: dict[str, str]) -> str:
        """A new upload of ``length`` bytes; returns its id."""
        try:
            r = self.http.post(self.endpoint, headers=self._headers(**{"Upload-Length": str(length),
                                                                       "Upload-Metadata": metadata(meta)}))
        except httpx.TransportError as e:
            raise ConnectionFailed(f"could not create the upload: {type(e).__name__}: {e}") from e
        if r.status_code != 201:
            raise error_for(r)
        try:
            upload_id = str(r.json()["id"])
        except (ValueError, KeyError, TypeError):
            upload_id = r.headers.get("Location", "").rstrip("/").rsplit("/", 1)[-1]
        if not upload_id:
            raise GraftError("the server created an upload but did not say its id or Location", r.status_code)
        return upload_id

    def offset(self, upload_id: str) -> int:
        """How many bytes of the upload the server has."""
        r = self.http.head(f"{self.endpoint}/{upload_id}", headers=self._headers())
        if r.status_code != 200:
            err = error_for(r)
            if r.status_code in _RETRY_STATUSES:
                raise _Retry(err)
            raise err
        return int(r.headers["Upload-Offset"])

    def _body(self, path: Path, offset: int, length: int, progress: Progress, base: int) -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(offset)
            sent = 0
            while sent < length:
                block = f.read(min(READ_SIZE, length - sent))
                if not block:
                    raise GraftError(f"{path} got shorter while it was being uploaded")
                sent += len(block)
                progress.update_to(base + offset + sent)
                yield block

    def _patch(self, upload_id: str, path: Path, offset: int, length: int, progress: Progress, base: int) -> int:
        headers = self._headers(**{"Upload-Offset": str(offset), "Content-Type": CONTENT_TYPE,
                                   "Content-Length": str(length)})
        r = self.http.patch(f"{self.endpoint}/{upload_id}", headers=headers,
                            content=self._body(path, offset, length, progress, base))
        if r.status_code != 204:
            err = error_for(r)
            if r.status_code in _RETRY_STATUSES:
                raise _Retry(err)
            raise err
        return int(r.headers.get("Upload-Offset", offset + length))

    def send(self, upload_id: str, path: Path, offset: int = 0, progress: Progress | None = None,
             base: int = 0) -> None:
        """Sends the file's bytes from ``offset`` to its end; after a broken connection (or an answer that
        a retry may mend), asks the server for its offset and goes on from there. ``base``: bytes already
        shown on ``progress`` before this file."""
        progress = progress or Progress(None, "", enabled=False)
        size = path.stat().st_size
        failures = 0
        ask = False  # ask the server for its offset first (after a failure)
        while True:
            try:
                if ask:
                    offset = self.offset(upload_id)
                    progress.update_to(base + offset)
                    ask = False
                if offset >= size:
                    return
                offset = self._patch(upload_id, path, offset, min(self.chunk_size, size - offset), progress, base)
                failures = 0
            except (httpx.TransportError, _Retry) as e:
                failures += 1
                ask = True
                if failures > self.retries:
                    if isinstance(e, _Retry):
                        raise e.error from None
                    raise ConnectionFailed(f"the upload {upload_id} broke off {failures} times in a row, at byte "
                                           f"{offset} of {size} ({type(e).__name__}: {e}); upload it again") from e
                time.sleep(min(30.0, self.retry_wait * 2 ** (failures - 1)))

    def upload(self, path: Path, filename: str | None = None, progress: Progress | None = None,
               base: int = 0) -> str:
        """Creates an upload for the file, sends it whole (resuming after broken connections) and returns its id."""
        path = Path(path)
        upload_id = self.create(path.stat().st_size, {"filename": filename or path.name})
        try:
            self.send(upload_id, path, 0, progress, base)
        except BaseException:
            self.delete(upload_id)  # it would hold its length against your limit until it expires
            raise
        return upload_id

    def delete(self, upload_id: str) -> None:
        """Termination: the server forgets the upload (best effort: errors are ignored)."""
        try:
            self.http.delete(f"{self.endpoint}/{upload_id}", headers=self._headers())
        except httpx.HTTPError:
            pass
