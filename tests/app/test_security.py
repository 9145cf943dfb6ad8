"""Security properties of the web tier, checked route by route from the app's own route table (so a new
route is covered, or fails here, without editing this file's lists):

- tokens are stored as sha256 hex only and compared in constant time;
- every API operation and every page but /healthz, /login, /static/*, /docs, /openapi.json and
  /favicon.ico refuses anonymous requests (401, a redirect to /login, or the sign-in page; never data);
- another user's ids give 404 on every route that takes one, and change nothing;
- the session cookie is HttpOnly, SameSite=Strict, Path=/, and Secure over https;
- every state-changing route refuses a cookie session without the right X-CSRF-Token and changes
  nothing; a Bearer token needs no CSRF token;
- downloads never serve a file outside the data directory ('..', absolute paths, symbolic links);
- request size limits: a declared Content-Length above the limit is refused before the body is read, and
  a chunked body is counted as it streams and refused as soon as it passes the limit;
- sign-in links are one-time and expire; revoked and expired tokens stop working.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select, update
from support.db import db_url  # noqa: F401  (the parametrized sqlite/postgres fixture)
from support.paths import HYMENOPTERA
from support.web import dataset_zip

from app.api import deps
from app.api.routes import jobs as jobs_routes
from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import ApiToken, Artifact, Base, Dataset, Job, JobEvent
from app.main import create_app
from app.services import auth, passwords
from app.web.routes import router as web_router

CANARY = "canary-7f3a91"  # alice's dataset name: must never show up in an answer to anyone else
PUBLIC = {"/healthz", "/login", "/docs", "/openapi.json", "/favicon.ico"}  # and /static/*: no user data
ANONYMOUS_FORMS = {("POST", "/login"), ("POST", "/invite")}  # protected by their own form token, not a session
SSO = {"/login/oidc", "/login/oidc/callback"}  # steps of single sign-on: 404 while it is not configured
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------- fixtures and helpers


def _zip() -> bytes:
    return dataset_zip({"train": 3, "val": 2}, top="hymen")


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 100, 50)).save(buf, "JPEG")
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class World:
    settings: Settings
    app: object
    client: TestClient  # no credentials
    alice: dict[str, str]  # Bearer headers
    bob: dict[str, str]
    alice_token: str
    ds: int  # alice's dataset (used by her jobs)
    spare_ds: int  # alice's dataset without jobs (deletable)
    queued: int
    done: int  # succeeded, with every artifact and one mistake
    ws: int = 0  # alice's personal workspace
    alice_id: int = 0
    alice_token_id: int = 0  # the id of alice's API token (the tokens page revokes by id)

    def sessions(self):
        return self.app.state.sessions()

    def browser(self, name: str, base_url: str = "http://testserver") -> tuple[TestClient, str]:
        """A client signed in through a one-time link; returns it and its CSRF token."""
        c = TestClient(self.app, base_url=base_url)
        with self.sessions() as s:
            login = auth.create_token(s, auth.ensure_user(s, name), "link", kind="login", ttl=auth.LOGIN_TTL)
        r = c.get(f"/login?token={login}", follow_redirects=False)
        assert r.status_code == 303, r.text
        return c, deps.csrf_token_for(c.cookies[deps.SESSION_COOKIE])

    def snapshot(self) -> dict:
        """Everything a write could change: rows by table, job states, token hashes, files on disk."""
        with self.sessions() as s:
            counts = {t.name: s.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}
            jobs = sorted(s.execute(select(Job.id, Job.status, Job.cancel_requested)).all())
            tokens = sorted(s.scalars(select(ApiToken.token_hash)).all())
        files = sorted(str(p) for p in self.settings.data_dir.rglob("*")
                       if p.is_file() and not p.name.startswith("graft.db") and "broker" not in p.parts
                       and "thumbs" not in p.parts)
        return {"counts": counts, "jobs": jobs, "tokens": tokens, "files": files}


def _user(s, name: str) -> tuple[dict[str, str], str]:
    user = auth.create_user(s, name)
    token = auth.create_token(s, user, "tests")
    return {"Authorization": f"Bearer {token}"}, token


def _succeed(settings: Settings, s, job_id: int, ds: Dataset) -> None:
    run = settings.runs_dir / str(job_id)
    run.mkdir(parents=True, exist_ok=True)
    for kind, name, data in (("model", "model.pt", b"model-bytes"), ("torchscript", "model.torchscript.pt", b"ts"),
                             ("onnx", "model.onnx", b"onnx"), ("model_card", "model_card.json", b"{}"),
                             ("confusion_matrix", "confusion_matrix.png", _png())):
        (run / name).write_bytes(data)
        s.add(Artifact(job_id=job_id, kind=kind, path=str((run / name).relative_to(settings.data_dir)),
                       size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    val = next(p for p in sorted((settings.data_dir / ds.path).rglob("*.jpg")) if "val" in p.parts)
    report = {"accuracy": 0.5, "classes": ds.classes, "confusion_matrix": [[1, 1], [1, 1]], "images": 4,
              "mistakes": [{"file": str(val.relative_to(settings.data_dir / ds.path)), "true": "bees",
                            "predicted": "ants", "confidence": 0.9, "true_class_probability": 0.1}]}
    s.execute(update(Job).where(Job.id == job_id).values(
        status="succeeded", progress=1.0, finished_at=auth.utcnow(),
        result={"report": report, "exports": [{"format": f, "ok": True, "error": None}
                                              for f in ("pytorch", "torchscript", "onnx", "model_card")]}))
    s.add(JobEvent(job_id=job_id, kind="status", data={"status": "succeeded", "error": None}))
    s.commit()


def build_world(db: str, tmp_path: Path, **overrides) -> World:
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"the shared dataset {HYMENOPTERA} is missing")
    settings = Settings(data_dir=tmp_path / "data", database_url=db, **overrides)
    run_migrations(settings.db_url)
    app = create_app(settings)
    client = TestClient(app)
    with app.state.sessions() as s:
        alice, alice_token = _user(s, "alice")
        bob, _ = _user(s, "bob")
    zip_bytes = _zip()
    up = lambda name: client.post("/api/v1/datasets", headers=alice, data={"name": name},  # noqa: E731
                                  files={"file": ("d.zip", zip_bytes, "application/zip")})
    ds, spare = up(CANARY).json()["id"], up(CANARY + "-spare").json()["id"]
    job = lambda: client.post("/api/v1/jobs", headers=alice, json={"dataset_id": ds, "epochs": 2})  # noqa: E731
    queued, done = job().json()["id"], job().json()["id"]
    with app.state.sessions() as s:
        _succeed(settings, s, done, s.get(Dataset, ds))
        ws = s.get(Dataset, ds).workspace_id
        alice_id = auth.get_user(s, "alice").id
        token_id = s.scalar(select(ApiToken.id).where(ApiToken.token_hash == auth.hash_token(alice_token)))
    return World(settings, app, client, alice, bob, alice_token, ds, spare, queued, done, ws, alice_id, token_id)


@pytest.fixture
def world(tmp_path) -> World:
    return build_world(f"sqlite:///{tmp_path / 'sec.db'}", tmp_path)


def routes(app) -> list[tuple[str, str]]:
    """(method, path template) of every API operation (from the OpenAPI schema) and every page route."""
    out = set()
    for path, ops in app.openapi()["paths"].items():
        out |= {(m.upper(), path) for m in ops}
    for r in web_router.routes:
        out |= {(m, r.path) for m in r.methods if m != "HEAD"}
    out.add(("GET", app.openapi_url))
    return sorted(out)


def fill(path: str, w: World) -> str:
    """A path template with alice's real ids."""
    job = w.done
    return (path.replace("{dataset_id}", str(w.ds)).replace("{job_id}", str(job))
            .replace("{class_index}", "0").replace("{n}", "0").replace("{workspace_id}", str(w.ws))
            .replace("{user_id}", str(w.alice_id)).replace("{action}", "disable")
            .replace("{token_id}", str(w.alice_token_id)))


def request_kwargs(method: str, path: str, w: World) -> dict:
    """A well-formed body for the routes that take one (so a refusal is about credentials, not the body)."""
    if (method, path) == ("POST", "/api/v1/datasets"):
        return {"data": {"name": "new"}, "files": {"file": ("d.zip", _zip(), "application/zip")}}
    if (method, path) == ("POST", "/api/v1/jobs"):
        return {"json": {"dataset_id": w.ds, "epochs": 2}}
    if (method, path) == ("POST", "/api/v1/datasets/{dataset_id}/versions"):
        return {"json": {"remove": ["train/no/such.jpg"]}}
    if (method, path) == ("POST", "/api/v1/jobs/{job_id}/predict"):
        return {"files": [("files", ("a.jpg", _jpeg(), "image/jpeg"))]}
    if (method, path) == ("PUT", "/api/v1/jobs/{job_id}/operating-point"):
        return {"json": {"confidence_threshold": 0.5}}
    if (method, path) == ("PUT", "/api/v1/jobs/{job_id}/thresholds"):
        return {"json": {"thresholds": {"a": 0.5}}}
    if (method, path) == ("POST", "/api/v1/workspaces"):
        return {"json": {"name": "shared"}}
    if (method, path) == ("POST", "/api/v1/workspaces/{workspace_id}/members"):
        return {"json": {"username": "bob", "role": "viewer"}}
    forms = {"/workspaces": {"name": "shared"}, "/workspaces/switch": {"workspace_id": str(w.ws)},
             "/workspaces/{workspace_id}/members": {"username": "bob", "role": "viewer"},
             "/admin/users": {"name": "mallory"}, "/settings/tokens": {"name": "new"},
             "/login": {"username": "alice", "password": "x" * 12}, "/invite": {"token": "graft_x"}}
    if method == "POST" and path in forms:
        return {"data": forms[path]}
    return {}


def is_refusal(r) -> bool:
    if r.status_code == 401:
        return True
    return r.status_code in (302, 303, 307) and r.headers["location"].startswith("/login")


# ---------------------------------------------------------------- tokens at rest


def test_tokens_are_stored_as_sha256_hex_only(db_url, tmp_path):  # noqa: F811
    w = build_world(db_url, tmp_path)
    c, _ = w.browser("carol")
    session_token = c.cookies[deps.SESSION_COOKIE]
    with w.sessions() as s:
        carol = auth.get_user(s, "carol")
        login = auth.create_token(s, carol, "link", kind="login", ttl=auth.LOGIN_TTL)
        api = auth.create_token(s, carol, "script")
        raw = {"api": api, "login": login, "session": session_token, "alice": w.alice_token}
        rows = s.scalars(select(ApiToken)).all()
        stored = {r.token_hash for r in rows}
        assert all(HEX64.match(h) for h in stored), stored
        for token in raw.values():
            assert token.startswith("graft_") and len(token) > 40
            assert hashlib.sha256(token.encode()).hexdigest() in stored
        # the raw token is nowhere in the database: not in any column of any row of any table
        dump = []
        for table in Base.metadata.sorted_tables:
            for row in s.execute(select(table)).all():
                dump.extend(str(v) for v in row)
        text = "\n".join(dump)
        for kind, token in raw.items():
            assert token not in text, kind
            assert token[12:] not in text, kind  # not even the secret part after the visible prefix
    if db_url.startswith("sqlite:///"):  # nor in the file's bytes (free pages, journal)
        for f in Path(db_url.removeprefix("sqlite:///")).parent.glob("*.db*"):
            data = f.read_bytes()
            assert not any(t.encode() in data for t in raw.values()), f


def test_lookup_compares_hashes_in_constant_time(world, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    with world.sessions() as s:
        row = auth.lookup(s, world.alice_token, ("api",))
        assert row is not None
    h = hashlib.sha256(world.alice_token.encode()).hexdigest()
    assert calls == [(h, h)]
    # and through a request
    calls.clear()
    assert world.client.get("/api/v1/datasets", headers=world.alice).status_code == 200
    assert (h, h) in calls


def test_csrf_token_is_compared_in_constant_time(world, monkeypatch):
    c, csrf = world.browser("carol")
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(deps.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    r = c.post("/api/v1/jobs", json={"dataset_id": 1}, headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 401
    assert ("wrong", csrf) in calls


# ---------------------------------------------------------------- anonymous requests


def test_every_route_refuses_anonymous_requests(world):
    all_routes = routes(world.app)
    assert len(all_routes) >= 20, all_routes
    public_seen = set()
    for method, path in all_routes:
        if path in PUBLIC:
            public_seen.add(path)
            continue
        if path in SSO:
            r = TestClient(world.app).request(method, path, follow_redirects=False)
            assert r.status_code == 404 and CANARY not in r.text, (method, path, r.status_code)
            continue
        url = fill(path, world)
        for headers in ({}, {"Accept": "text/html"}, {"Cookie": f"{deps.SESSION_COOKIE}=graft_forged"},
                        {"Authorization": "Bearer graft_forged"}):
            c = TestClient(world.app)  # no cookie jar carried between cases
            r = c.request(method, url, headers=headers, follow_redirects=False,
                          **request_kwargs(method, path, world))
            assert is_refusal(r), (method, url, headers, r.status_code, r.text[:300])
            assert CANARY not in r.text and b"model-bytes" not in r.content, (method, url)
            if r.status_code == 401 and r.headers["content-type"].startswith("text/html"):
                assert "Sign in" in r.text or "sign in" in r.text, (method, url)
            elif r.status_code == 401:
                assert r.json()["error"]["code"] == "unauthorized", (method, url, r.text)
            c.close()
    # the public routes are exactly these; none of them shows user data
    assert public_seen == PUBLIC, public_seen
    c = TestClient(world.app)
    for path in PUBLIC:
        r = c.get(path, follow_redirects=False)
        assert r.status_code in (200, 301), path
        assert CANARY not in r.text
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/static/app.css").status_code == 200
    # /static serves the static folder only
    for bad in ("/static/../app/main.py", "/static/..%2fapp%2fmain.py", "/static/%2e%2e/pyproject.toml"):
        r = c.get(bad)
        assert r.status_code == 404 and "create_app" not in r.text and "[project]" not in r.text, bad


# ---------------------------------------------------------------- ownership


def test_other_users_ids_are_not_found_everywhere(db_url, tmp_path):  # noqa: F811
    w = build_world(db_url, tmp_path)
    bob_browser, bob_csrf = w.browser("bob")
    before = w.snapshot()
    checked = 0
    for method, path in routes(w.app):
        if not re.search(r"\{(dataset_id|job_id)\}", path):
            continue
        for_api = path.startswith("/api/")
        for job in (w.queued, w.done):
            url = fill(path, w).replace(f"/jobs/{w.done}", f"/jobs/{job}")
            if for_api:  # bob's token
                r = w.client.request(method, url, headers=w.bob, **request_kwargs(method, path, w))
            else:  # bob's browser
                r = bob_browser.request(method, url, headers={"X-CSRF-Token": bob_csrf},
                                        **request_kwargs(method, path, w))
            assert r.status_code == 404, (method, url, r.status_code, r.text[:300])
            assert CANARY not in r.text and b"model-bytes" not in r.content, (method, url)
            checked += 1
    assert checked >= 2 * 14, checked
    # alice's dataset as the dataset of a new job, as a filter, as a page parameter
    assert w.client.post("/api/v1/jobs", headers=w.bob, json={"dataset_id": w.ds}).status_code == 404
    assert w.client.get(f"/api/v1/jobs?dataset_id={w.ds}", headers=w.bob).json() == []
    assert bob_browser.get(f"/jobs/new?dataset_id={w.ds}").status_code == 404
    # bob's lists show nothing of alice's
    for url in ("/api/v1/datasets", "/api/v1/jobs"):
        assert w.client.get(url, headers=w.bob).json() == []
    assert CANARY not in bob_browser.get("/").text
    assert w.snapshot() == before
    bob_browser.close()


# ---------------------------------------------------------------- cookie sessions


def test_session_cookie_attributes(world):
    for base, secure in (("http://testserver", False), ("https://testserver", True)):
        c = TestClient(world.app, base_url=base)
        with world.sessions() as s:
            login = auth.create_token(s, auth.get_user(s, "alice"), "link", kind="login", ttl=auth.LOGIN_TTL)
        r = c.get(f"/login?token={login}", follow_redirects=False)
        assert r.status_code == 303
        (cookie,) = [v for k, v in r.headers.multi_items() if k == "set-cookie"]
        attrs = {a.strip().split("=", 1)[0].lower(): (a.strip().split("=", 1) + [""])[1]
                 for a in cookie.split(";")[1:]}
        assert cookie.startswith(f"{deps.SESSION_COOKIE}=graft_")
        assert "httponly" in attrs
        assert attrs.get("samesite", "").lower() in ("strict", "lax")
        assert attrs.get("path") == "/"
        assert int(attrs["max-age"]) == world.settings.session_max_age_s
        assert ("secure" in attrs) is secure, (base, cookie)
        assert "domain" not in attrs  # host-only
        c.close()


# ---------------------------------------------------------------- CSRF


def _unsafe_routes(app) -> list[tuple[str, str]]:
    return [(m, p) for m, p in routes(app) if m in UNSAFE and (m, p) not in ANONYMOUS_FORMS]


def _write(w: World, method: str, path: str, client: TestClient, headers: dict) -> object:
    """Send the state-changing request, aimed at objects it would really change."""
    job = w.queued if path.endswith("/cancel") else w.done
    # spare_ds is deleted by a later write: the jobs that a write queues go to the other one
    ds = w.ds if path.endswith(("/probe", "/label-issues")) else w.spare_ds
    target = fill(path.replace("{dataset_id}", str(ds)).replace("{job_id}", str(job)), w)
    return client.request(method, target, headers=headers, follow_redirects=False,
                          **request_kwargs(method, path, w))


# in the order they are sent (the deletes after the writes that need their objects; sign-out last)
EXPECTED_WRITES = {("POST", "/api/v1/datasets"): 201, ("POST", "/api/v1/jobs"): 201,
                   ("POST", "/api/v1/datasets/{dataset_id}/probe"): 201,
                   ("POST", "/api/v1/datasets/{dataset_id}/label-issues"): 201,
                   ("POST", "/api/v1/datasets/{dataset_id}/versions"): 400,  # past auth: no such file
                   ("POST", "/api/v1/jobs/{job_id}/cancel"): 200,
                   ("POST", "/api/v1/jobs/{job_id}/predict"): 503,  # no inference service here: past auth
                   ("POST", "/api/v1/jobs/{job_id}/batch-predict"): 400,  # no images sent: past auth
                   # the job has no calibration to choose an operating point on: past auth
                   ("PUT", "/api/v1/jobs/{job_id}/operating-point"): 409,
                   ("PUT", "/api/v1/jobs/{job_id}/thresholds"): 409,  # not a multi-label model: past auth
                   ("DELETE", "/api/v1/datasets/{dataset_id}"): 204, ("DELETE", "/api/v1/jobs/{job_id}"): 204,
                   # alice is no admin, and her workspace is personal: refused past the CSRF check
                   ("POST", "/api/v1/workspaces"): 403, ("POST", "/api/v1/workspaces/{workspace_id}/members"): 409,
                   ("DELETE", "/api/v1/workspaces/{workspace_id}/members/{user_id}"): 409,
                   ("POST", "/workspaces"): 403, ("POST", "/workspaces/switch"): 303,
                   ("POST", "/workspaces/{workspace_id}/members"): 409, ("POST", "/admin/users"): 403,
                   ("POST", "/admin/users/{user_id}/{action}"): 403, ("POST", "/settings/tokens"): 201,
                   ("POST", "/settings/tokens/{token_id}/revoke"): 303,
                   # tus uploads: past the CSRF check, refused for the missing Tus-Resumable header
                   ("POST", "/api/v1/uploads"): 412, ("PATCH", "/api/v1/uploads/{upload_id}"): 412,
                   ("DELETE", "/api/v1/uploads/{upload_id}"): 412,
                   ("POST", "/logout"): 303}


def test_every_write_with_a_cookie_session_needs_the_csrf_token(world):
    unsafe = _unsafe_routes(world.app)
    assert set(unsafe) == set(EXPECTED_WRITES), unsafe  # a new state-changing route must be listed here
    c, csrf = world.browser("alice")
    _, bob_csrf = world.browser("bob")
    before = world.snapshot()
    for method, path in unsafe:
        for headers in ({}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": "0" * 40}, {"X-CSRF-Token": bob_csrf},
                        {"X-CSRF-Token": csrf[:-1]}, {"X-CSRF-Token": csrf.upper()}):
            r = _write(world, method, path, c, headers)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:300])
            assert world.snapshot() == before, (method, path, headers)
    # the session survived all that (the refused logout did not sign it out)
    assert c.get("/api/v1/datasets").status_code == 200
    # cross-site form posts carry no custom header: a csrf_token form field is only accepted by /logout
    r = c.post("/api/v1/jobs", data={"dataset_id": str(world.ds), "csrf_token": csrf})
    assert r.status_code == 401 and world.snapshot() == before
    # with the right token every write goes through (the refusals above were about the token alone)
    for method, path in EXPECTED_WRITES:
        r = _write(world, method, path, c, {"X-CSRF-Token": csrf})
        assert r.status_code == EXPECTED_WRITES[(method, path)], (method, path, r.status_code, r.text[:300])
    assert world.snapshot() != before
    assert c.get("/api/v1/datasets", follow_redirects=False).status_code == 401  # signed out last
    c.close()


def test_bearer_requests_need_no_csrf_token(world):
    for method, path in EXPECTED_WRITES:
        if not path.startswith("/api/"):  # pages take no bearer tokens
            continue
        r = _write(world, method, path, world.client, world.alice)
        assert r.status_code == EXPECTED_WRITES[(method, path)], (method, path, r.status_code, r.text[:300])


def test_logout_revokes_the_session(world):
    c, csrf = world.browser("alice")
    cookie = c.cookies[deps.SESSION_COOKIE]
    assert c.post("/logout", headers={"X-CSRF-Token": csrf}, follow_redirects=False).status_code == 303
    replay = TestClient(world.app, cookies={deps.SESSION_COOKIE: cookie})
    assert replay.get("/api/v1/datasets").status_code == 401
    assert replay.get("/").status_code == 401 and CANARY not in replay.get("/").text


# ---------------------------------------------------------------- downloads stay in the data directory


DOWNLOADS = {"model": "model?format=pytorch", "torchscript": "model?format=torchscript",
             "onnx": "model?format=onnx", "model_card": "model?format=model_card",
             "confusion_matrix": "confusion_matrix.png"}


def test_downloads_never_leave_the_data_directory(world, tmp_path):
    w, data = world, world.settings.data_dir
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"TOP-SECRET")
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    (outside_dir / "model.pt").write_bytes(b"TOP-SECRET")
    run = data / "runs" / str(w.done)
    (run / "link.pt").symlink_to(secret)
    (run / "dirlink").symlink_to(outside_dir, target_is_directory=True)
    rel_secret = Path("..") / secret.relative_to(tmp_path)  # data is tmp_path/data
    bad_paths = ["../secret.bin", str(rel_secret), f"runs/{w.done}/../../../secret.bin", str(secret), "/etc/passwd",
                 "../../../../../../etc/passwd", f"runs/{w.done}/link.pt", f"runs/{w.done}/dirlink/model.pt",
                 f"runs/{w.done}", ".", "", f"runs/{w.done}/missing.pt"]
    with w.sessions() as s:
        arts = {a.kind: a.id for a in s.scalars(select(Artifact).where(Artifact.job_id == w.done))}
    assert set(arts) == set(DOWNLOADS)
    for kind, suffix in DOWNLOADS.items():
        url = f"/api/v1/jobs/{w.done}/{suffix}"
        assert w.client.get(url, headers=w.alice).status_code == 200, url  # the real file is served
        for bad in bad_paths:
            with w.sessions() as s:
                original = s.get(Artifact, arts[kind]).path
                s.get(Artifact, arts[kind]).path = bad
                s.commit()
            r = w.client.get(url, headers=w.alice)
            assert r.status_code == 404, (url, bad, r.status_code)
            assert b"TOP-SECRET" not in r.content and b"root:" not in r.content, (url, bad)
            assert str(data) not in r.text and str(tmp_path) not in r.text  # no server paths in messages
            with w.sessions() as s:
                s.get(Artifact, arts[kind]).path = original
                s.commit()
    # the mistake thumbnails read files named in the job's report: only inside the dataset's folder
    with w.sessions() as s:
        job = s.get(Job, w.done)
        ds_dir = data / s.get(Dataset, w.ds).path
        result = job.result
    assert (ds_dir / "val").is_dir()
    (ds_dir / "val" / "link.jpg").symlink_to(secret)
    img = outside_dir / "x.jpg"
    img.write_bytes(_jpeg())
    for bad in ["../../../secret.bin", str(img), "/etc/passwd", f"../{ds_dir.name}/../../../outside/x.jpg",
                "val/link.jpg", "val", ""]:
        report = {**result["report"], "mistakes": [{**result["report"]["mistakes"][0], "file": bad}]}
        with w.sessions() as s:
            s.execute(update(Job).where(Job.id == w.done).values(result={**result, "report": report}))
            s.commit()
        r = w.client.get(f"/api/v1/jobs/{w.done}/mistakes/0.jpg", headers=w.alice)
        assert r.status_code == 404, (bad, r.status_code)
    with w.sessions() as s:  # and the real one works
        s.execute(update(Job).where(Job.id == w.done).values(result=result))
        s.commit()
    assert w.client.get(f"/api/v1/jobs/{w.done}/mistakes/0.jpg", headers=w.alice).status_code == 200
    # a dataset row whose folder points outside the datasets directory serves no sample thumbnails
    c, _ = w.browser("alice")
    assert c.get(f"/datasets/{w.ds}/samples/0/0.jpg").status_code == 200
    for bad in ("../outside", "datasets/../../outside", str(outside_dir), "datasets"):
        with w.sessions() as s:
            s.execute(update(Dataset).where(Dataset.id == w.spare_ds).values(path=bad))
            s.commit()
        r = c.get(f"/datasets/{w.spare_ds}/samples/0/0.jpg")
        assert r.status_code == 404, (bad, r.status_code)
    c.close()


# ---------------------------------------------------------------- request size limits


def asgi_request(app, method: str, path: str, headers: dict[str, str], chunks, limit_chunks: int = 10_000):
    """Call the ASGI app directly with a body streamed in chunks (as a server gives a chunked body).
    Returns (status, body, number of chunks the app asked for)."""
    pulled = 0
    sent: list[dict] = []
    chunk_iter = iter(chunks)

    async def receive():
        nonlocal pulled
        try:
            chunk = next(chunk_iter)
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        assert pulled <= limit_chunks, "the app kept reading a body far past the limit"
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, pulled


def test_declared_content_length_above_the_limit_is_refused_unread(tmp_path):
    w = build_world(f"sqlite:///{tmp_path / 'sec.db'}", tmp_path, max_upload_bytes=2_000_000)
    limit = 2_000_000 + (1 << 20)
    cases = [("POST", "/api/v1/datasets", "multipart/form-data; boundary=x", limit + 1, w.alice),
             ("POST", "/api/v1/datasets", "multipart/form-data; boundary=x", 10**12, {}),
             ("POST", f"/api/v1/jobs/{w.done}/predict", "multipart/form-data; boundary=x", limit + 1, w.alice),
             ("POST", "/api/v1/jobs", "application/json", (1 << 20) + 1, w.alice),
             ("POST", "/api/v1/jobs", "application/json", (1 << 20) + 1, {}),  # before authentication
             # a multipart body is no way around the small limit on the other routes
             ("POST", "/api/v1/jobs", "multipart/form-data; boundary=x", (1 << 20) + 1, {}),
             ("POST", f"/api/v1/jobs/{w.queued}/cancel", "multipart/form-data; boundary=x", (1 << 20) + 1, w.alice),
             ("POST", "/logout", "application/x-www-form-urlencoded", (1 << 20) + 1, {})]
    for method, path, ctype, length, auth_headers in cases:
        headers = {**auth_headers, "content-type": ctype, "content-length": str(length)}
        status, body, pulled = asgi_request(w.app, method, path, headers, [b"x" * 65536] * 100)
        assert status == 413, (path, status, body[:200])
        assert pulled == 0, (path, pulled)  # not one byte read
        assert b'"too_large"' in body and b"larger than the limit" in body
    # the same through a client: 413 with the JSON error
    r = w.client.post("/api/v1/jobs", headers=w.alice, content=b"{" + b" " * (1 << 20) + b"}")
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    # at the limit it is read as usual
    r = w.client.post("/api/v1/jobs", headers={**w.alice, "content-type": "application/json"},
                      content=b'{"dataset_id": %d}' % w.ds + b" " * ((1 << 20) - 40))
    assert r.status_code == 201, r.text


def _multipart_stream(total: int, chunk: int = 64 * 1024):
    head = (b"--bnd\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.zip\"\r\n"
            b"Content-Type: application/zip\r\n\r\n")
    yield head
    sent = 0
    while sent < total:
        yield b"\0" * chunk
        sent += chunk
    yield b"\r\n--bnd--\r\n"


def test_chunked_bodies_are_counted_and_cut_off_at_the_limit(tmp_path):
    w = build_world(f"sqlite:///{tmp_path / 'sec.db'}", tmp_path, max_upload_bytes=2_000_000)
    limit = 2_000_000 + (1 << 20)
    chunk = 64 * 1024
    before = w.snapshot()
    # no Content-Length, a multipart upload ten times the limit: refused once the limit is passed
    headers = {**w.alice, "content-type": "multipart/form-data; boundary=bnd", "transfer-encoding": "chunked"}
    status, body, pulled = asgi_request(w.app, "POST", "/api/v1/datasets", headers,
                                        _multipart_stream(10 * limit, chunk))
    assert status == 413, body[:300]
    assert b'"too_large"' in body
    assert pulled * chunk <= limit + 2 * chunk, pulled  # it stopped reading right after the limit
    # a Content-Length that lies (small declared, endless body) is cut off the same way
    headers = {**w.alice, "content-type": "multipart/form-data; boundary=bnd", "content-length": "1000"}
    status, body, pulled = asgi_request(w.app, "POST", "/api/v1/datasets", headers,
                                        _multipart_stream(10 * limit, chunk))
    assert status == 413 and pulled * chunk <= limit + 2 * chunk, (status, pulled)
    # a JSON body: the small limit, also before authentication
    for auth_headers in (w.alice, {}):
        headers = {**auth_headers, "content-type": "application/json", "transfer-encoding": "chunked"}
        status, body, pulled = asgi_request(w.app, "POST", "/api/v1/jobs", headers,
                                            [b"[" + b"0," * (chunk // 2 - 1)] + [b"0," * (chunk // 2)] * 1000)
        assert status == 413, (status, body[:300])
        assert pulled * chunk <= (1 << 20) + 2 * chunk, pulled
    # a multipart body to a route that takes no files: the small limit too
    headers = {"content-type": "multipart/form-data; boundary=bnd", "transfer-encoding": "chunked"}
    status, body, pulled = asgi_request(w.app, "POST", "/api/v1/jobs", headers, _multipart_stream(10 * limit, chunk))
    assert status == 413 and pulled * chunk <= (1 << 20) + 2 * chunk, (status, pulled)
    assert w.snapshot() == before  # nothing stored, nothing left behind
    assert not any(w.settings.uploads_dir.iterdir())
    # an upload under the limit, chunked, still works
    headers = {**w.alice, "content-type": "multipart/form-data; boundary=bnd", "transfer-encoding": "chunked"}
    data = _zip()
    parts = [b"--bnd\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.zip\"\r\n"
             b"Content-Type: application/zip\r\n\r\n"] + [data[i:i + chunk] for i in range(0, len(data), chunk)] + [
        b"\r\n--bnd--\r\n"]
    status, body, _ = asgi_request(w.app, "POST", "/api/v1/datasets", headers, parts)
    assert status == 201, body[:300]


# ---------------------------------------------------------------- many event streams


def test_many_event_streams_neither_hold_connections_nor_multiply_polls(world, monkeypatch):
    """40 SSE clients on one job (more than the connection pool holds): a plain request still gets a
    connection at once, and the job is polled once per interval for all of them."""
    polls = []
    real_poll = jobs_routes._Feed._poll
    monkeypatch.setattr(jobs_routes._Feed, "_poll", lambda self, after: polls.append(after) or real_poll(self, after))
    monkeypatch.setattr(jobs_routes, "SSE_POLL_S", 0.1)
    n, seconds = 40, 1.0

    def scope(path: str) -> dict:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                "headers": [(b"authorization", world.alice["Authorization"].encode())],
                "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}

    async def scenario() -> tuple[list[int], int, float]:
        gone = asyncio.Event()
        starts: list[int] = []

        async def watcher():
            async def receive():
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(m):
                if m["type"] == "http.response.start":
                    starts.append(m["status"])

            await world.app(scope(f"/api/v1/jobs/{world.queued}/events"), receive, send)

        tasks = [asyncio.create_task(watcher()) for _ in range(n)]
        t = time.monotonic()
        while len(starts) < n and time.monotonic() - t < 15:
            await asyncio.sleep(0.02)
        await asyncio.sleep(seconds)
        sent: list[dict] = []

        async def receive_plain():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send_plain(m):
            sent.append(m)

        t = time.monotonic()
        await asyncio.wait_for(world.app(scope(f"/api/v1/jobs/{world.queued}"), receive_plain, send_plain), 10)
        plain_s = time.monotonic() - t
        gone.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return starts, sent[0]["status"], plain_s

    starts, status, plain_s = asyncio.run(scenario())
    assert starts == [200] * n
    assert status == 200 and plain_s < 5, plain_s
    assert len(polls) <= 3 * seconds / 0.1, len(polls)  # one client alone polls 10 times a second
    assert jobs_routes._feeds(world.app) == {}  # the last client gone, the feed is gone


# ---------------------------------------------------------------- token lifetimes


def test_sign_in_links_are_one_time_and_expire(world):
    with world.sessions() as s:
        alice = auth.get_user(s, "alice")
        link = auth.create_token(s, alice, "link", kind="login", ttl=auth.LOGIN_TTL)
        expired = auth.create_token(s, alice, "old link", kind="login", ttl=auth.LOGIN_TTL)
        s.execute(update(ApiToken).where(ApiToken.token_hash == auth.hash_token(expired))
                  .values(expires_at=auth.utcnow() - dt.timedelta(seconds=1)))
        s.commit()
    c = TestClient(world.app)
    # a sign-in link is not an API token, nor a session
    assert c.get("/api/v1/datasets", headers={"Authorization": f"Bearer {link}"}).status_code == 401
    assert TestClient(world.app, cookies={deps.SESSION_COOKIE: link}).get("/").status_code == 401
    r = c.get(f"/login?token={link}", follow_redirects=False)
    assert r.status_code == 303 and deps.SESSION_COOKIE in r.headers["set-cookie"]
    for token in (link, expired):  # used once already; expired
        fresh = TestClient(world.app)
        r = fresh.get(f"/login?token={token}", follow_redirects=False)
        assert r.status_code == 401 and "does not work" in r.text
        # (the page's sign-in form sets its own form-token cookie; never a session)
        assert deps.SESSION_COOKIE not in r.headers.get("set-cookie", "") and deps.SESSION_COOKIE not in fresh.cookies
    with world.sessions() as s:  # spent: the row is gone; the expired one never became a session
        assert s.scalar(select(ApiToken).where(ApiToken.token_hash == auth.hash_token(link))) is None
        assert s.scalar(select(func.count()).select_from(ApiToken).where(ApiToken.kind == "session")) == 1


def test_expired_sessions_and_tokens_are_refused(world):
    c, _ = world.browser("alice")
    assert c.get("/").status_code == 200
    cookie = c.cookies[deps.SESSION_COOKIE]
    with world.sessions() as s:
        s.execute(update(ApiToken).where(ApiToken.token_hash.in_([auth.hash_token(cookie),
                                                                   auth.hash_token(world.alice_token)]))
                  .values(expires_at=auth.utcnow() - dt.timedelta(seconds=1)))
        s.commit()
    r = c.get("/")
    assert r.status_code == 401 and CANARY not in r.text
    assert c.get("/api/v1/datasets").status_code == 401
    assert world.client.get("/api/v1/datasets", headers=world.alice).status_code == 401
    # a naive timestamp (as SQLite hands back) in the past is just as expired
    with world.sessions() as s:
        s.execute(update(ApiToken).where(ApiToken.token_hash == auth.hash_token(world.alice_token))
                  .values(expires_at=dt.datetime.utcnow() - dt.timedelta(minutes=1)))
        s.commit()
    assert world.client.get("/api/v1/datasets", headers=world.alice).status_code == 401


def test_a_revoked_token_stops_working(world):
    with world.sessions() as s:
        token = auth.create_token(s, auth.get_user(s, "alice"), "temp")
    headers = {"Authorization": f"Bearer {token}"}
    assert world.client.get("/api/v1/datasets", headers=headers).status_code == 200
    with world.sessions() as s:
        auth.revoke(s, token)
    r = world.client.get("/api/v1/datasets", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert world.client.get("/api/v1/datasets", headers=world.alice).status_code == 200  # others unaffected


# ---------------------------------------------------------------- anonymous forms and workspace roles


def test_anonymous_forms_need_their_form_token_and_change_nothing(world):
    """The sign-in and invite forms carry no session: a post without the token of the page (a cross-site
    form) is refused and signs nobody in, even with the right password."""
    with world.sessions() as s:
        alice = auth.get_user(s, "alice")
        alice.password_hash = passwords.hash_password("a long passphrase")
        s.commit()
    before = world.snapshot()
    for method, path in ANONYMOUS_FORMS:
        data = {"username": "alice", "password": "a long passphrase", "password_confirm": "a long passphrase",
                "token": "graft_x", "form_token": "forged-form-token-0123456789"}
        c = TestClient(world.app)
        r = c.request(method, path, data=data, follow_redirects=False)
        assert r.status_code in (400, 401), (path, r.status_code)
        assert deps.SESSION_COOKIE not in c.cookies
    assert world.snapshot() == before


def test_a_viewer_reads_and_cannot_write_and_outsiders_see_nothing(db_url, tmp_path):  # noqa: F811
    """alice's data moved into a shared workspace where bob is a viewer and carol is not a member: every route
    that reads answers bob, every route that changes a dataset or job answers him 403 with what his role
    allows (predicting is reading), and carol gets 404 on every route, as before."""
    from app.db.models import Membership, Role, Workspace

    w = build_world(db_url, tmp_path)
    with w.sessions() as s:
        shared = Workspace(name="team")
        s.add(shared)
        s.flush()
        bob = auth.get_user(s, "bob")
        s.add_all([Membership(workspace_id=shared.id, user_id=auth.get_user(s, "alice").id, role=Role.owner.value),
                   Membership(workspace_id=shared.id, user_id=bob.id, role=Role.viewer.value)])
        s.execute(update(Dataset).values(workspace_id=shared.id))
        s.execute(update(Job).values(workspace_id=shared.id))
        carol, _ = _user(s, "carol")
        s.commit()
    before = w.snapshot()
    reads = writes = 0
    for method, path in routes(w.app):
        if not path.startswith("/api/v1/") or not re.search(r"\{(dataset_id|job_id)\}", path):
            continue
        url = fill(path, w)
        r = w.client.request(method, url, headers=w.bob, **request_kwargs(method, path, w))
        if method in UNSAFE and not path.endswith("/predict"):
            assert r.status_code == 403, (method, url, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["code"] == "forbidden" and "viewer" in err["message"] and "editor" in err["message"], err
            writes += 1
        else:
            # (a 404 may only say that the thing does not exist yet, e.g. no backbone comparison)
            hidden = r.status_code == 404 and "not found" in r.json()["error"]["message"]
            assert r.status_code != 403 and not hidden, (method, url, r.status_code, r.text[:300])
            reads += 1
        r = w.client.request(method, url, headers=carol, **request_kwargs(method, path, w))
        assert r.status_code == 404, (method, url, r.status_code)
        assert CANARY not in r.text
    assert reads >= 8 and writes >= 4, (reads, writes)
    # a new job on the shared dataset, an upload into the workspace: refused for the viewer
    r = w.client.post("/api/v1/jobs", headers=w.bob, json={"dataset_id": w.ds})
    assert r.status_code == 403
    r = w.client.post("/api/v1/datasets", headers=w.bob, data={"name": "x", "workspace_id": str(shared.id)},
                      files={"file": ("d.zip", _zip(), "application/zip")})
    assert r.status_code == 403 and "uploading a dataset" in r.json()["error"]["message"]
    r = w.client.post("/api/v1/datasets", headers=carol, data={"name": "x", "workspace_id": str(shared.id)},
                      files={"file": ("d.zip", _zip(), "application/zip")})
    assert r.status_code == 404
    assert w.snapshot() == before
    # lists: bob sees the shared data, carol nothing
    assert {d["id"] for d in w.client.get("/api/v1/datasets", headers=w.bob).json()} == {w.ds, w.spare_ds}
    assert w.client.get("/api/v1/datasets", headers=carol).json() == []
    assert [x["id"] for x in w.client.get("/api/v1/workspaces", headers=carol).json()] != [shared.id]
    # made an editor, bob may train
    with w.sessions() as s:
        s.execute(update(Membership).where(Membership.user_id == bob.id, Membership.workspace_id == shared.id)
                  .values(role=Role.editor.value))
        s.commit()
    r = w.client.post("/api/v1/jobs", headers=w.bob, json={"dataset_id": w.ds, "epochs": 2})
    assert r.status_code == 201 and r.json()["workspace_id"] == shared.id
