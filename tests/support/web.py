"""Helpers for tests that use the web app in-process: the page's CSRF token, the forms' hidden tokens, a
tiny dataset zip, an app on a real database, and an app served on a loopback port from a thread."""
from __future__ import annotations

import contextlib
import io
import re
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from fastapi.testclient import TestClient

from support.paths import HYMENOPTERA
from support.procs import free_port


def csrf_of(html: str) -> str:
    """The signed-in page's CSRF token (the meta tag every page carries)."""
    m = re.search(r'<meta name="csrf-token" content="([^"]*)"', html)
    assert m, "no csrf-token meta tag"
    return m.group(1)


def field_of(html: str, name: str) -> str:
    """The value of a form's hidden input `name`."""
    m = re.search(rf'<input type="hidden" name="{re.escape(name)}" value="([^"]*)"', html)
    assert m, f"no hidden field {name}"
    return m.group(1)


def folder_zip(folder: Path) -> bytes:
    """Every file under `folder`, zipped with paths relative to it (e.g. a labels.csv dataset)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    return buf.getvalue()


def dataset_zip(per_class: dict[str, int], top: str = "hymenoptera") -> bytes:
    """<top>/{train,val}/{ants,bees} with the first n images of each class (no wrapping folder: top="")."""
    if not HYMENOPTERA.is_dir():
        import pytest

        pytest.fail(f"the shared dataset {HYMENOPTERA} is missing (it is at ../shared from the repo root)")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split, n in per_class.items():
            for cls in ("ants", "bees"):
                for f in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                    zf.write(f, f"{top}/{split}/{cls}/{f.name}" if top else f"{split}/{cls}/{f.name}")
    return buf.getvalue()


def make_app(data_dir: Path, db_url: str, **overrides):
    """The web app on `db_url` (migrated) with its data under `data_dir`."""
    from app.core.settings import Settings
    from app.db.migrate import run_migrations
    from app.main import create_app

    settings = Settings(data_dir=data_dir, database_url=db_url, **overrides)
    settings.ensure_dirs()
    run_migrations(settings.db_url)
    return create_app(settings), settings


def sign_in_with_password(client: TestClient, username: str, password: str, follow: bool = False):
    """The sign-in form as a browser sends it: the page first (its form token), then the post."""
    page = client.get("/login")
    return client.post("/login", data={"username": username, "password": password,
                                       "form_token": field_of(page.text, "form_token"), "next": "/"},
                       follow_redirects=follow)


def tus_send(client: TestClient, headers: dict, data: bytes, name: str = "part.zip", chunk: int = 1 << 20) -> str:
    """A finished resumable upload of `data` (tus 1.0: creation, then PATCHes); returns its id."""
    import base64

    tus = {"Tus-Resumable": "1.0.0"}
    meta = f"filename {base64.b64encode(name.encode()).decode()}"
    r = client.post("/api/v1/uploads", headers={**headers, **tus, "Upload-Length": str(len(data)),
                                                "Upload-Metadata": meta})
    assert r.status_code == 201, r.text
    uid = r.json()["id"]
    for off in range(0, len(data), chunk):
        r = client.patch(f"/api/v1/uploads/{uid}", content=data[off:off + chunk],
                         headers={**headers, **tus, "Content-Type": "application/offset+octet-stream",
                                  "Upload-Offset": str(off)})
        assert r.status_code == 204, r.text
    return uid


@contextlib.contextmanager
def served_in_thread(app, start_s: float = 20) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port from a daemon thread: yields its base URL, stops it after."""
    import pytest
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the web app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
