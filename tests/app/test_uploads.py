"""Resumable uploads (tus 1.0) on a real database and real files: the protocol step by step (creation, HEAD,
PATCH in chunks, a wrong offset, a connection broken mid-body and resumed, termination, expiry), the limits,
other users' uploads, and datasets made of several parts (zips and a tar), with the bad parts refused whole.
Last, a real tus client (tuspy) against a real uvicorn server, its connection cut mid-upload."""
from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support.db import db_url  # noqa: F401  (fixture: sqlite and postgres)
from support.paths import HYMENOPTERA, ROOT
from support.web import make_app

from app.db.models import Dataset
from app.services import auth
from app.services import uploads as tus

V = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}


def bearer(app, name: str) -> dict[str, str]:
    with app.state.sessions() as s:
        user = auth.create_user(s, name)
        return {"Authorization": f"Bearer {auth.create_token(s, user, 'tests')}"}


def images(split: str, cls: str, start: int, stop: int) -> list[Path]:
    return sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[start:stop]


def part_zip(start: int, stop: int) -> bytes:
    """hymenoptera/{train,val}/{ants,bees}: images start..stop of each."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("train", "val"):
            for cls in ("ants", "bees"):
                for f in images(split, cls, start, stop):
                    zf.write(f, f"hymenoptera/{split}/{cls}/{f.name}")
    return buf.getvalue()


def part_tar(start: int, stop: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for split in ("train", "val"):
            for cls in ("ants", "bees"):
                for f in images(split, cls, start, stop):
                    tf.add(f, f"hymenoptera/{split}/{cls}/{f.name}")
    return buf.getvalue()


def create(c: TestClient, h: dict, length: int, name: str = "part.zip") -> str:
    meta = f"filename {base64.b64encode(name.encode()).decode()}"
    r = c.post("/api/v1/uploads", headers={**h, **V, "Upload-Length": str(length), "Upload-Metadata": meta})
    assert r.status_code == 201, r.text
    assert r.headers["Tus-Resumable"] == "1.0.0" and r.headers["Upload-Expires"].endswith("GMT")
    assert r.headers["Location"] == f"/api/v1/uploads/{r.json()['id']}"
    return r.json()["id"]


def patch(c: TestClient, h: dict, uid: str, offset: int, data: bytes):
    return c.patch(f"/api/v1/uploads/{uid}", headers={**h, **V, **OCTETS, "Upload-Offset": str(offset)},
                   content=data)


def head(c: TestClient, h: dict, uid: str):
    return c.head(f"/api/v1/uploads/{uid}", headers={**h, **V})


def send(c: TestClient, h: dict, data: bytes, chunk: int = 256 * 1024, name: str = "part.zip") -> str:
    uid = create(c, h, len(data), name)
    for off in range(0, len(data), chunk):
        r = patch(c, h, uid, off, data[off:off + chunk])
        assert r.status_code == 204, r.text
        assert int(r.headers["Upload-Offset"]) == min(len(data), off + chunk)
    return uid


def held_files(settings) -> list[Path]:
    return sorted(p for p in settings.tus_dir.rglob("*") if p.is_file() and p.name != ".lock")


def dataset_files(settings) -> list[Path]:
    return sorted(p for p in settings.datasets_dir.rglob("*") if p.is_file())


def cut_off_patch(app, headers: dict, uid: str, offset: int, data: bytes, sent: int) -> int:
    """A PATCH announcing all of `data` whose connection drops after `sent` bytes: the ASGI app is called
    directly, and receives http.disconnect in place of the rest. Returns the status it answered."""
    hdrs = [(k.lower().encode(), v.encode()) for k, v in {**headers, **V, **OCTETS, "Upload-Offset": str(offset),
                                                          "Content-Length": str(len(data))}.items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PATCH",
             "scheme": "http", "path": f"/api/v1/uploads/{uid}", "raw_path": f"/api/v1/uploads/{uid}".encode(),
             "query_string": b"", "headers": hdrs, "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "root_path": "", "app": app}
    messages = [{"type": "http.request", "body": data[:sent], "more_body": True}, {"type": "http.disconnect"}]
    status = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    asyncio.run(app(scope, receive, send))
    return status[0] if status else 0


@pytest.fixture
def web(tmp_path, db_url):  # noqa: F811
    app, settings = make_app(tmp_path / "data", db_url, max_upload_bytes=4 << 20, max_user_upload_bytes=6 << 20)
    c = TestClient(app)
    return c, app, settings, bearer(app, "alice"), bearer(app, "bob")


def test_the_tus_protocol_step_by_step(web):
    c, app, settings, alice, _ = web
    r = c.options("/api/v1/uploads", headers=alice)
    assert r.status_code == 204
    assert r.headers["Tus-Version"] == "1.0.0" and r.headers["Tus-Max-Size"] == str(4 << 20)
    assert set(r.headers["Tus-Extension"].split(",")) == {"creation", "expiration", "termination"}
    data = os.urandom(1_000_000)
    uid = create(c, alice, len(data))
    r = head(c, alice, uid)
    assert r.status_code == 200 and r.headers["Upload-Offset"] == "0"
    assert r.headers["Upload-Length"] == str(len(data)) and r.headers["Cache-Control"] == "no-store"
    assert base64.b64decode(r.headers["Upload-Metadata"].split(" ")[1]) == b"part.zip"
    # several chunks
    for off in (0, 300_000):
        r = patch(c, alice, uid, off, data[off:off + 300_000])
        assert r.status_code == 204 and r.headers["Upload-Offset"] == str(off + 300_000), r.text
    # a wrong offset: 409, nothing written
    for off in (0, 599_999, 700_000):
        r = patch(c, alice, uid, off, data[off:off + 10])
        assert r.status_code == 409 and "HEAD the upload" in r.json()["error"]["message"], r.text
        assert r.headers["Tus-Resumable"] == "1.0.0"
    assert head(c, alice, uid).headers["Upload-Offset"] == "600000"
    # the connection drops 123,457 bytes into a chunk: those bytes stay, the client resumes from HEAD's offset
    cut_off_patch(app, alice, uid, 600_000, data[600_000:], 123_457)
    off = int(head(c, alice, uid).headers["Upload-Offset"])
    assert off == 723_457
    r = patch(c, alice, uid, off, data[off:])
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(len(data))
    assert (settings.tus_dir / next(p.name for p in settings.tus_dir.iterdir()) / f"{uid}.bin").read_bytes() == data
    # no byte past Upload-Length
    assert patch(c, alice, uid, len(data), b"x").status_code == 413
    # the protocol's own refusals
    assert c.head(f"/api/v1/uploads/{uid}", headers=alice).status_code == 412
    r = c.post("/api/v1/uploads", headers={**alice, "Tus-Resumable": "0.2.2", "Upload-Length": "5"})
    assert r.status_code == 412 and "1.0.0" in r.json()["error"]["message"]
    r = c.patch(f"/api/v1/uploads/{uid}", headers={**alice, **V, "Upload-Offset": "0",
                                                   "Content-Type": "application/json"}, content=b"{}")
    assert r.status_code == 415
    for bad in ({}, {"Upload-Length": "-1"}, {"Upload-Length": "1e3"}, {"Upload-Defer-Length": "1"},
                {"Upload-Length": "5", "Upload-Metadata": "filename not-base64!"},
                {"Upload-Length": "5", "Upload-Metadata": "a b,a b"}):
        assert c.post("/api/v1/uploads", headers={**alice, **V, **bad}).status_code == 400, bad
    # termination
    r = c.delete(f"/api/v1/uploads/{uid}", headers={**alice, **V})
    assert r.status_code == 204
    assert head(c, alice, uid).status_code == 404 and held_files(settings) == []
    assert c.delete(f"/api/v1/uploads/{uid}", headers={**alice, **V}).status_code == 404
    for bad in ("nope", "0" * 32, "../../graft.db"):
        assert head(c, alice, bad).status_code in (404, 405), bad


def test_limits_owners_and_expiry(web):
    c, app, settings, alice, bob = web
    # per upload (the server says its limit) and per user (all the uploads held at once)
    r = c.post("/api/v1/uploads", headers={**alice, **V, "Upload-Length": str((4 << 20) + 1)})
    assert r.status_code == 413 and "GRAFT_MAX_UPLOAD_BYTES" in r.json()["error"]["message"]
    a = create(c, alice, 4 << 20)
    r = c.post("/api/v1/uploads", headers={**alice, **V, "Upload-Length": str(3 << 20)})
    assert r.status_code == 413 and "GRAFT_MAX_USER_UPLOAD_BYTES" in r.json()["error"]["message"]
    b = create(c, bob, 4 << 20)  # bob's limit is his own
    # another user's upload is not found, whatever the method; nothing of it changes
    assert patch(c, alice, a, 0, b"abc").status_code == 204
    for method in ("HEAD", "PATCH", "DELETE"):
        r = c.request(method, f"/api/v1/uploads/{a}", headers={**bob, **V, **OCTETS, "Upload-Offset": "3"},
                      content=b"xyz" if method == "PATCH" else None)
        assert r.status_code == 404, (method, r.status_code)
    r = c.post("/api/v1/datasets", headers=bob, json={"name": "x", "uploads": [a]})
    assert r.status_code == 404 and a in r.json()["error"]["message"]
    assert head(c, alice, a).headers["Upload-Offset"] == "3"
    # anonymous: 401
    assert c.head(f"/api/v1/uploads/{a}", headers=V).status_code == 401
    assert c.post("/api/v1/uploads", headers={**V, "Upload-Length": "5"}).status_code == 401
    # expiry: each upload says when it expires; an abandoned one is deleted by the cleanup
    expires = head(c, alice, a).headers["Upload-Expires"]
    assert expires.endswith("GMT")
    assert tus.cleanup_expired(settings) == 0
    assert tus.cleanup_expired(settings, now=time.time() + settings.upload_expiry_s + 5) == 2
    assert head(c, alice, a).status_code == 404 and head(c, bob, b).status_code == 404
    assert held_files(settings) == []
    # and it no longer counts against the user's limit
    create(c, alice, 4 << 20)


def test_a_dataset_from_two_zip_parts_and_a_tar_part(web):
    c, app, settings, alice, _ = web
    parts = [part_zip(0, 4), part_zip(4, 8), part_tar(8, 11)]
    ids = [send(c, alice, p, name=f"part{i}") for i, p in enumerate(parts)]
    # an unfinished part: 409 naming it, nothing changed
    unfinished = create(c, alice, 100)
    assert patch(c, alice, unfinished, 0, b"x" * 10).status_code == 204
    r = c.post("/api/v1/datasets", headers=alice, json={"name": "", "uploads": ids + [unfinished]})
    assert r.status_code == 409 and unfinished in r.json()["error"]["message"], r.text
    assert len(held_files(settings)) == 8 and dataset_files(settings) == []
    r = c.post("/api/v1/datasets", headers=alice, json={"uploads": ids})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["name"] == "hymenoptera" and ds["classes"] == ["ants", "bees"] and ds["layout"] == "train/ + val/"
    want = {split: {cls: len(images(split, cls, 0, 11)) for cls in ("ants", "bees")} for split in ("train", "val")}
    assert ds["counts"] == want and ds["num_images"] == sum(n for s in want.values() for n in s.values())
    assert len(dataset_files(settings)) == ds["num_images"]
    # the parts are gone (the unfinished upload stays); used again, they are not found
    assert len(held_files(settings)) == 2
    r = c.post("/api/v1/datasets", headers=alice, json={"uploads": ids[:1]})
    assert r.status_code == 404
    # bad bodies
    for body in ({"uploads": []}, {"uploads": [ids[0], ids[0]]}, {"name": "x"}, {"uploads": "abc"}):
        assert c.post("/api/v1/datasets", headers=alice, json=body).status_code in (400, 404, 422), body
    r = c.post("/api/v1/datasets", headers={**alice, "Content-Type": "application/json"}, content=b"{nope")
    assert r.status_code == 422


@pytest.mark.parametrize("bad", ["not an archive", "dotdot zip", "dotdot tar", "absolute tar", "link tar"])
def test_a_bad_part_is_refused_and_nothing_is_kept(web, bad):
    c, app, settings, alice, _ = web
    if bad == "not an archive":
        data = b"just some bytes, no archive " * 100
    elif bad == "dotdot zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("hymenoptera/train/ants/../../../../escaped.jpg", b"x")
        data = buf.getvalue()
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo({"dotdot tar": "../escaped.jpg", "absolute tar": "/tmp/escaped.jpg",
                                    "link tar": "hymenoptera/train/ants/link.jpg"}[bad])
            if bad == "link tar":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(info)
            else:
                info.size = 1
                tf.addfile(info, io.BytesIO(b"x"))
        data = buf.getvalue()
    good = send(c, alice, part_zip(0, 5))
    uid = send(c, alice, data)
    r = c.post("/api/v1/datasets", headers=alice, json={"name": "bad", "uploads": [good, uid]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(f"part 2 of 2 (upload {uid}): ") and err["details"], err
    assert err["details"][0]["fix"], err
    words = {"not an archive": "not a zip or tar", "dotdot zip": "'..'", "dotdot tar": "'..'",
             "absolute tar": "absolute path", "link tar": "symbolic link"}
    assert words[bad] in err["message"], err["message"]
    # nothing kept: no dataset folder, no row, no upload files, nothing escaped
    assert dataset_files(settings) == [] and list(settings.datasets_dir.iterdir()) == []
    assert held_files(settings) == []
    assert not (settings.data_dir.parent / "escaped.jpg").exists()
    with app.state.sessions() as s:
        assert s.query(Dataset).count() == 0


# ---------------------------------------------------------------- a real client against a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cut_connection(port: int, path: str, headers: dict, offset: int, data: bytes, sent: int) -> None:
    """A PATCH whose connection is closed after `sent` of the `len(data)` bytes it announced."""
    head_lines = [f"PATCH {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(data)}",
                  f"Upload-Offset: {offset}", "Tus-Resumable: 1.0.0", f"Content-Type: {OCTETS['Content-Type']}"]
    head_lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(("\r\n".join(head_lines) + "\r\n\r\n").encode() + data[:sent])
        time.sleep(0.3)
    # the server notices the closed connection and keeps what came


def test_a_real_tus_client_resumes_after_a_cut_connection(tmp_path):
    from tusclient import client as tus_client

    from app.core.settings import Settings
    from app.db.migrate import run_migrations

    data_dir = tmp_path / "data"
    db = f"sqlite:///{tmp_path / 'graft.db'}"
    settings = Settings(data_dir=data_dir, database_url=db)
    settings.ensure_dirs()
    run_migrations(db)
    app, _ = make_app(data_dir, db)
    h = bearer(app, "alice")
    port = _free_port()
    env = {**os.environ, "GRAFT_DATA_DIR": str(data_dir), "GRAFT_DATABASE_URL": db}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--port",
                             str(port), "--log-level", "warning"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        data = part_zip(0, 12)
        chunk = 64 * 1024
        assert len(data) > 6 * chunk
        client = tus_client.TusClient(f"{base}/api/v1/uploads", headers=h)
        up = client.uploader(file_stream=io.BytesIO(data), chunk_size=chunk, metadata={"filename": "part.zip"})
        for _ in range(3):  # three chunks, then the connection is cut in the middle of the fourth
            up.upload_chunk()
        assert up.offset == 3 * chunk
        path = "/" + up.url.split("/", 3)[3]
        _cut_connection(port, path, h, up.offset, data[up.offset:up.offset + chunk], 20_000)
        # the server keeps what came once it has seen the connection close (on a busy machine, after the test's
        # next request may have been answered): wait for that, then a new client (after a reload, say) asks the
        # server where to resume, and finishes
        import httpx

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            offset = int(httpx.head(f"{base}{path}", headers={**h, "Tus-Resumable": "1.0.0"}).headers["Upload-Offset"])
            if offset != 3 * chunk:
                break
            time.sleep(0.1)
        again = tus_client.TusClient(f"{base}/api/v1/uploads", headers=h)
        resumed = again.uploader(file_stream=io.BytesIO(data), url=up.url, chunk_size=chunk)
        assert resumed.offset == 3 * chunk + 20_000
        resumed.upload()
        assert resumed.offset == len(data)
        uid = up.url.rsplit("/", 1)[1]
        r = httpx.post(f"{base}/api/v1/datasets", headers=h, json={"name": "resumed", "uploads": [uid]}, timeout=60)
        assert r.status_code == 201, r.text
        assert r.json()["num_images"] == sum(len(images(s, k, 0, 12)) for s in ("train", "val")
                                             for k in ("ants", "bees"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
