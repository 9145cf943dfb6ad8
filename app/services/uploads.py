"""Resumable uploads: a small tus 1.0 server (core protocol + the creation, expiration and termination
extensions). Each upload is two files under <uploads_dir>/tus/<owner id>/: <id>.bin, the bytes received so
far (its size is the offset), and <id>.json, who owns it, its length, metadata and expiry. Another user's
upload is not found (it is not even looked for in their folder). PATCH bodies are streamed to disk in small
writes, never held whole; the bytes of a broken-off PATCH stay, so the client resumes from HEAD's offset.
An upload not written to for `upload_expiry_s` is abandoned: refused as not found, and deleted by the
cleanup that runs on every creation (and by `cleanup_expired`)."""
from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

import anyio.to_thread

from app.core.errors import AppError, BadRequest, Conflict, NotFound, PayloadTooLarge
from app.core.settings import Settings

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,expiration,termination"
CONTENT_TYPE = "application/offset+octet-stream"
WRITE_AT = 1 << 20  # bytes buffered before each write to disk
_ID = re.compile(r"[0-9a-f]{32}")
_KEY = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")  # a token (RFC 7230) without spaces or commas
MAX_METADATA = 4096


class PreconditionFailed(AppError):
    """The client speaks another version of tus."""

    status = 412
    code = "precondition_failed"


class UnsupportedMediaType(AppError):
    status = 415
    code = "unsupported_media_type"


@dataclass
class Upload:
    id: str
    owner_id: int
    length: int
    offset: int
    metadata: str  # the Upload-Metadata header as sent (echoed by HEAD)
    expires: float  # a Unix time

    @property
    def finished(self) -> bool:
        return self.offset == self.length

    @property
    def expires_header(self) -> str:
        return formatdate(self.expires, usegmt=True)


def check_version(value: str | None) -> None:
    if value != TUS_VERSION:
        raise PreconditionFailed(f"send the header Tus-Resumable: {TUS_VERSION} (this server speaks tus "
                                 f"{TUS_VERSION}; got {value!r})")


def parse_size(value: str | None, header: str) -> int:
    if value is None or value == "":
        raise BadRequest(f"the {header} header is missing: send it (a number of bytes)")
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise BadRequest(f"the {header} header must be a number of bytes, not {value[:40]!r}")
    return int(value)


def parse_metadata(header: str | None) -> dict[str, str]:
    """Upload-Metadata: comma-separated `key base64value` pairs (the value may be absent)."""
    if not header:
        return {}
    if len(header) > MAX_METADATA:
        raise BadRequest(f"the Upload-Metadata header is longer than {MAX_METADATA} characters")
    out: dict[str, str] = {}
    for pair in header.split(","):
        key, _, value = pair.strip().partition(" ")
        if not _KEY.fullmatch(key) or key in out:
            raise BadRequest(f"Upload-Metadata: {key[:40]!r} is not a valid key, or is repeated: send "
                             "comma-separated 'key base64value' pairs")
        try:
            out[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            raise BadRequest(f"Upload-Metadata: the value of {key!r} is not base64") from None
    return out


def _dir(settings: Settings, owner_id: int) -> Path:
    return settings.tus_dir / str(int(owner_id))


def _files(settings: Settings, owner_id: int, upload_id: str) -> tuple[Path, Path]:
    d = _dir(settings, owner_id)
    return d / f"{upload_id}.bin", d / f"{upload_id}.json"


def _read_info(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _write_info(path: Path, info: dict) -> None:
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


@contextlib.contextmanager
def _user_lock(settings: Settings, owner_id: int) -> Iterator[None]:
    """Serializes a user's creations (the per-user limit is checked and spent under it)."""
    d = _dir(settings, owner_id)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _remove(settings: Settings, owner_id: int, upload_id: str) -> None:
    for p in _files(settings, owner_id, upload_id):
        p.unlink(missing_ok=True)


def cleanup_expired(settings: Settings, now: float | None = None) -> int:
    """Deletes every upload whose expiry has passed (and stray data files without their record); returns
    how many uploads were deleted."""
    now = time.time() if now is None else now
    removed = 0
    if not settings.tus_dir.is_dir():
        return 0
    for d in settings.tus_dir.iterdir():
        if not (d.is_dir() and d.name.isdigit()):
            continue
        for info_path in d.glob("*.json"):
            info = _read_info(info_path)
            if info is None or float(info.get("expires", 0)) < now:
                _remove(settings, int(d.name), info_path.stem)
                removed += 1
        for p in list(d.glob("*.bin")) + list(d.glob("*.tmp")):
            with contextlib.suppress(OSError):
                if not p.with_suffix(".json").exists() and p.stat().st_mtime < now - settings.upload_expiry_s:
                    p.unlink()
    return removed


def _load(settings: Settings, owner_id: int, upload_id: str, now: float | None = None) -> Upload:
    missing = NotFound(f"upload {upload_id[:40]} not found (it may have expired, been deleted or made into a "
                       "dataset): create it again with POST /api/v1/uploads")
    if not _ID.fullmatch(upload_id):
        raise missing
    data, info_path = _files(settings, owner_id, upload_id)
    info = _read_info(info_path)
    if info is None or info.get("owner_id") != owner_id:
        raise missing
    try:
        offset = data.stat().st_size
    except OSError:
        raise missing from None
    up = Upload(upload_id, owner_id, int(info["length"]), offset, str(info.get("metadata", "")),
                float(info["expires"]))
    if up.expires < (time.time() if now is None else now):
        _remove(settings, owner_id, upload_id)
        raise missing
    return up


def held_bytes(settings: Settings, owner_id: int) -> int:
    """The total length of the user's uploads (unfinished, or finished and not yet made into a dataset)."""
    total = 0
    now = time.time()
    for info_path in _dir(settings, owner_id).glob("*.json"):
        info = _read_info(info_path)
        if info is not None and float(info.get("expires", 0)) >= now:
            total += int(info.get("length", 0))
    return total


def create(settings: Settings, owner_id: int, length_header: str | None, metadata_header: str | None,
           defer_length: str | None = None) -> Upload:
    if defer_length is not None:
        raise BadRequest("Upload-Defer-Length is not supported: send Upload-Length, the size in bytes")
    length = parse_size(length_header, "Upload-Length")
    if length > settings.max_upload_bytes:
        raise PayloadTooLarge(f"Upload-Length {length} is larger than the limit of {settings.max_upload_bytes} "
                              "bytes per upload: send the dataset in smaller parts, or raise GRAFT_MAX_UPLOAD_BYTES")
    meta = parse_metadata(metadata_header)
    cleanup_expired(settings)
    with _user_lock(settings, owner_id):
        held = held_bytes(settings, owner_id)
        if held + length > settings.max_user_upload_bytes:
            raise PayloadTooLarge(
                f"your uploads would hold {held + length} bytes, more than the limit of "
                f"{settings.max_user_upload_bytes} per user ({held} are held by unfinished uploads or ones not "
                "yet made into a dataset): finish or delete those first, or raise GRAFT_MAX_USER_UPLOAD_BYTES")
        upload_id = uuid.uuid4().hex
        data, info_path = _files(settings, owner_id, upload_id)
        data.touch(exist_ok=False)
        expires = time.time() + settings.upload_expiry_s
        _write_info(info_path, {"id": upload_id, "owner_id": owner_id, "length": length,
                                "metadata": metadata_header or "", "meta": meta, "created": time.time(),
                                "expires": expires})
    return Upload(upload_id, owner_id, length, 0, metadata_header or "", expires)


def get(settings: Settings, owner_id: int, upload_id: str) -> Upload:
    return _load(settings, owner_id, upload_id)


def delete(settings: Settings, owner_id: int, upload_id: str) -> None:
    """Termination: the upload's files go, finished or not."""
    _load(settings, owner_id, upload_id)
    _remove(settings, owner_id, upload_id)


def _touch(settings: Settings, up: Upload) -> None:
    """Pushes the expiry back after a write (unless the upload was deleted meanwhile)."""
    data, info_path = _files(settings, up.owner_id, up.id)
    info = _read_info(info_path)
    if info is None or not data.exists():
        return
    up.expires = info["expires"] = time.time() + settings.upload_expiry_s
    _write_info(info_path, info)


async def write(settings: Settings, owner_id: int, upload_id: str, offset_header: str | None,
                content_type: str | None, content_length: str | None, body: AsyncIterator[bytes]) -> Upload:
    """PATCH: appends the body at Upload-Offset, which must be the upload's offset (409 otherwise). The
    bytes that arrive are kept even when the connection breaks off (the exception then propagates)."""
    if (content_type or "").split(";")[0].strip().lower() != CONTENT_TYPE:
        raise UnsupportedMediaType(f"send the bytes with Content-Type: {CONTENT_TYPE}")
    offset = parse_size(offset_header, "Upload-Offset")
    up = await anyio.to_thread.run_sync(_load, settings, owner_id, upload_id)
    data, _ = _files(settings, owner_id, upload_id)
    try:
        fd = os.open(data, os.O_WRONLY)
    except OSError:
        raise NotFound(f"upload {upload_id} not found: create it again with POST /api/v1/uploads") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"upload {upload_id} is being written by another request: retry in a moment") from None
        up.offset = os.fstat(fd).st_size
        if offset != up.offset:
            raise Conflict(f"Upload-Offset {offset} is not the upload's offset, {up.offset}: HEAD the upload and "
                           "send the bytes from its Upload-Offset")
        room = up.length - up.offset
        if content_length is not None and content_length.isdigit() and int(content_length) > room:
            raise PayloadTooLarge(f"the body ({content_length} bytes) goes past the Upload-Length {up.length} "
                                  f"(at offset {up.offset}, {room} bytes are left)")
        os.lseek(fd, up.offset, os.SEEK_SET)
        buf = bytearray()
        try:
            async for chunk in body:
                if len(chunk) > room - len(buf):
                    raise PayloadTooLarge(f"the body goes past the Upload-Length {up.length}: send at most "
                                          f"{room} bytes from offset {up.offset}")
                buf += chunk
                if len(buf) >= WRITE_AT:
                    await anyio.to_thread.run_sync(_write_all, fd, bytes(buf))
                    up.offset += len(buf)
                    room -= len(buf)
                    buf.clear()
        finally:
            if buf:
                await anyio.to_thread.run_sync(_write_all, fd, bytes(buf))
                up.offset += len(buf)
            await anyio.to_thread.run_sync(_touch, settings, up)
    finally:
        os.close(fd)  # releases the lock
    return up


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def finished_part(settings: Settings, owner_id: int, upload_id: str) -> Path:
    """The data file of a finished upload (404 if unknown or another user's, 409 if not finished)."""
    up = _load(settings, owner_id, upload_id)
    if not up.finished:
        raise Conflict(f"upload {upload_id} is not finished ({up.offset} of {up.length} bytes received): "
                       "finish sending it (HEAD it for its offset, then PATCH the rest), then try again")
    return _files(settings, owner_id, upload_id)[0]


def remove(settings: Settings, owner_id: int, upload_id: str) -> None:
    _remove(settings, owner_id, upload_id)
