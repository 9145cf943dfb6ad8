"""The REST API over a real database (SQLite and PostgreSQL), with real uploads of real images.

No worker runs: the broker is the filesystem transport under the data directory, so created jobs stay
queued; what a worker would write (metrics, events, artifacts, final statuses) is inserted directly.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from support.db import db_url  # noqa: F401  (the parametrized sqlite/postgres fixture)
from support.paths import HYMENOPTERA

from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import ApiToken, Artifact, Dataset, EpochMetric, Job, JobEvent
from app.main import create_app
from app.services import auth
from domain.spec import RunSpec

PER_SPLIT = {"train": 4, "val": 2}
CLASSES = ("ants", "bees")


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No GRAFT_* setting from the environment leaks in; no pretrained weights but the packaged ones."""
    for k in list(os.environ):
        if k.startswith("GRAFT_") and k not in ("GRAFT_OFFLINE", "GRAFT_TEST_PG_URL"):
            monkeypatch.delenv(k)
    empty = tmp_path / "torch-home"
    empty.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(empty))


@pytest.fixture(scope="session")
def image_files() -> list[tuple[str, bytes]]:
    """(relative path, bytes) of a few real images inside one wrapping folder: 4 train + 2 val per class."""
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"the shared dataset {HYMENOPTERA} is missing")
    out = []
    for split, n in PER_SPLIT.items():
        for cls in CLASSES:
            for f in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                out.append((f"hymen/{split}/{cls}/{f.name}", f.read_bytes()))
    return out


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="session")
def dataset_zip(image_files) -> bytes:
    return make_zip(image_files)


@dataclass
class Api:
    settings: Settings
    app: object
    client: TestClient

    def sessions(self):
        return self.app.state.sessions()

    def user(self, name: str) -> dict[str, str]:
        """A new user with an API token; returns the request headers that authenticate as them."""
        with self.sessions() as s:
            user = auth.create_user(s, name)
            token = auth.create_token(s, user, "tests")
        return {"Authorization": f"Bearer {token}"}

    def upload_zip(self, headers, data: bytes, filename="hymen.zip", **form):
        return self.client.post("/api/v1/datasets", headers=headers, data=form,
                                files={"file": (filename, data, "application/zip")})

    def upload_files(self, headers, files: list[tuple[str, bytes]], **form):
        return self.client.post("/api/v1/datasets", headers=headers, data=form,
                                files=[("files", (name, data, "image/jpeg")) for name, data in files])

    def count(self, model) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(model))

    def set_job(self, job_id: int, **values) -> None:
        with self.sessions() as s:
            s.execute(update(Job).where(Job.id == job_id).values(**values))
            s.commit()

    def add(self, *rows) -> list[int]:
        with self.sessions() as s:
            s.add_all(rows)
            s.commit()
            return [r.id for r in rows]


def build_api(db_url: str, tmp_path: Path, **overrides) -> Api:  # noqa: F811
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, **overrides)
    run_migrations(settings.db_url)
    app = create_app(settings)
    return Api(settings, app, TestClient(app))


@pytest.fixture
def api(db_url, tmp_path) -> Api:  # noqa: F811
    return build_api(db_url, tmp_path)


@pytest.fixture
def alice(api) -> dict[str, str]:
    return api.user("alice")


@pytest.fixture
def ds_id(api, alice, dataset_zip) -> int:
    r = api.upload_zip(alice, dataset_zip)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def create_job(api: Api, headers, dataset_id: int, **params) -> dict:
    r = api.client.post("/api/v1/jobs", headers=headers, json={"dataset_id": dataset_id, **params})
    assert r.status_code == 201, r.text
    return r.json()


def error_message(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    msg = body["error"]["message"]
    assert isinstance(msg, str) and len(msg) > 10, body
    return msg


def files_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if not p.is_dir()) if d.exists() else []


def api_routes(app) -> list[tuple[str, str]]:
    """Every (method, path) of the REST API, from its OpenAPI description, with ids filled in."""
    out = []
    for path, ops in app.openapi()["paths"].items():
        if path.startswith("/api/v1"):
            for m in sorted(ops):
                out.append((m.upper(), path.replace("{dataset_id}", "1").replace("{job_id}", "1")))
    return out


def sse_events(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        ev = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            ev[key] = value
        if "event" in ev:
            events.append(ev)
    return events


# ---------------------------------------------------------------- health and authentication


def test_healthz_needs_no_token(api):
    r = api.client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_every_api_route_refuses_missing_invalid_and_malformed_authorization(api, alice):
    routes = api_routes(api.app)
    paths = {p for _, p in routes}
    assert {"/api/v1/backbones", "/api/v1/datasets", "/api/v1/datasets/1", "/api/v1/jobs", "/api/v1/jobs/1",
            "/api/v1/jobs/1/metrics", "/api/v1/jobs/1/cancel", "/api/v1/jobs/1/model",
            "/api/v1/jobs/1/events"} <= paths
    with api.sessions() as s:
        user = auth.get_user(s, "alice")
        expired = auth.create_token(s, user, "old", ttl=dt.timedelta(seconds=-1))
        session_kind = auth.create_token(s, user, "cookie", kind="session")
        revoked = auth.create_token(s, user, "gone")
        auth.revoke(s, revoked)
    cases = [
        ({}, "graft token create"),
        ({"Authorization": "Bearer graft_not-a-real-token"}, "graft token create"),
        ({"Authorization": f"Bearer {expired}"}, "graft token create"),
        ({"Authorization": f"Bearer {revoked}"}, "graft token create"),
        ({"Authorization": f"Bearer {session_kind}"}, "graft token create"),
        ({"Authorization": "Bearer " + "x" * 500}, "graft token create"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "Bearer <token>"),
        ({"Authorization": "Bearer"}, "Bearer <token>"),
        ({"Authorization": "Bearer    "}, "Bearer <token>"),
        ({"Authorization": alice["Authorization"].split(" ", 1)[1]}, "Bearer <token>"),  # token without scheme
    ]
    for method, path in routes:
        for headers, hint in cases:
            r = api.client.request(method, path, headers=headers, json={"dataset_id": 1})
            msg = error_message(r, 401)
            assert hint in msg, (method, path, headers, msg)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers.get("www-authenticate") == "Bearer"
    # the valid token works on the same routes
    assert api.client.get("/api/v1/datasets", headers=alice).status_code == 200


def test_backbones(api, alice):
    r = api.client.get("/api/v1/backbones", headers=alice)
    assert r.status_code == 200
    by_name = {b["name"]: b for b in r.json()}
    assert by_name["efficientnet_lite0"]["pretrained_available"] is True
    assert by_name["efficientnet_lite0"]["weights_url"] is None
    assert by_name["resnet18"]["pretrained_available"] is False
    assert by_name["resnet18"]["weights_file"] == "resnet18-f37072fd.pth"
    assert all(b["params"] > 0 and b["image_size"] > 0 and b["description"] for b in by_name.values())


# ---------------------------------------------------------------- datasets


def test_upload_zip_list_get_delete(api, alice, dataset_zip):
    r = api.upload_zip(alice, dataset_zip)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["name"] == "hymen"
    assert ds["classes"] == ["ants", "bees"]
    assert ds["counts"] == {"train": {"ants": 4, "bees": 4}, "val": {"ants": 2, "bees": 2}}
    assert ds["num_images"] == 12
    assert isinstance(ds["warnings"], list) and isinstance(ds["layout"], str) and ds["layout"]
    assert ds["size_bytes"] > 0
    stored = files_under(api.settings.datasets_dir)
    assert len(stored) == 12 and all(p.suffix == ".jpg" for p in stored)
    assert files_under(api.settings.uploads_dir) == []  # the uploaded zip is not kept

    r2 = api.upload_zip(alice, dataset_zip, name="second")
    assert r2.status_code == 201 and r2.json()["name"] == "second"

    listed = api.client.get("/api/v1/datasets", headers=alice).json()
    assert [d["id"] for d in listed] == [r2.json()["id"], ds["id"]]  # newest first
    got = api.client.get(f"/api/v1/datasets/{ds['id']}", headers=alice)
    assert got.status_code == 200 and got.json() == ds

    assert api.client.delete(f"/api/v1/datasets/{ds['id']}", headers=alice).status_code == 204
    assert len(files_under(api.settings.datasets_dir)) == 12  # only the second dataset's files remain
    error_message(api.client.get(f"/api/v1/datasets/{ds['id']}", headers=alice), 404)
    error_message(api.client.delete(f"/api/v1/datasets/{ds['id']}", headers=alice), 404)
    assert api.client.delete(f"/api/v1/datasets/{r2.json()['id']}", headers=alice).status_code == 204
    assert files_under(api.settings.datasets_dir) == []
    assert list(api.settings.datasets_dir.iterdir()) == []
    assert api.count(Dataset) == 0


def test_upload_folder_as_files(api, alice, image_files):
    r = api.upload_files(alice, image_files)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["name"] == "hymen"
    assert ds["classes"] == ["ants", "bees"]
    assert ds["counts"] == {"train": {"ants": 4, "bees": 4}, "val": {"ants": 2, "bees": 2}}
    (folder,) = api.settings.datasets_dir.iterdir()
    stored = {str(p.relative_to(folder)) for p in files_under(folder)}
    assert stored == {name for name, _ in image_files}  # the relative paths are kept
    named = api.upload_files(alice, image_files, name="my bugs")
    assert named.status_code == 201 and named.json()["name"] == "my bugs"


def test_delete_dataset_used_by_a_job_conflicts(api, alice, ds_id):
    job = create_job(api, alice, ds_id)
    msg = error_message(api.client.delete(f"/api/v1/datasets/{ds_id}", headers=alice), 409)
    assert "cancel" in msg
    assert api.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=alice).status_code == 200
    msg = error_message(api.client.delete(f"/api/v1/datasets/{ds_id}", headers=alice), 409)
    assert "delete those jobs first" in msg
    assert files_under(api.settings.datasets_dir)  # still there
    assert api.client.delete(f"/api/v1/jobs/{job['id']}", headers=alice).status_code == 204
    assert api.client.delete(f"/api/v1/datasets/{ds_id}", headers=alice).status_code == 204
    assert files_under(api.settings.datasets_dir) == []


def _assert_nothing_kept(api: Api) -> None:
    assert files_under(api.settings.datasets_dir) == []
    assert list(api.settings.datasets_dir.iterdir()) == []
    assert files_under(api.settings.uploads_dir) == []
    assert api.count(Dataset) == 0


def test_bad_uploads_are_refused_and_leave_nothing(api, alice, image_files, tmp_path):
    post = api.client.post
    # not a zip
    msg = error_message(api.upload_zip(alice, b"this is not a zip archive at all" * 10), 400)
    assert "not a zip" in msg
    # a truncated zip
    error_message(api.upload_zip(alice, make_zip(image_files)[:-100]), 400)
    # one class only
    one = [(n, d) for n, d in image_files if "/ants/" in n]
    msg = error_message(api.upload_zip(alice, make_zip(one)), 422)
    assert "class" in msg
    assert str(api.settings.data_dir) not in msg  # the server's paths stay private
    _assert_nothing_kept(api)
    error_message(api.upload_files(alice, one), 422)
    _assert_nothing_kept(api)
    # zip slip
    msg = error_message(api.upload_zip(alice, make_zip(image_files + [("../evil.txt", b"pwned")])), 400)
    assert "'..'" in msg
    msg = error_message(api.upload_zip(alice, make_zip(image_files + [("hymen/../../../evil.txt", b"x")])), 400)
    error_message(api.upload_zip(alice, make_zip(image_files + [("/tmp/evil.txt", b"pwned")])), 400)
    assert not [p for p in tmp_path.rglob("evil*")]
    assert not Path("/tmp/evil.txt").exists() or Path("/tmp/evil.txt").read_bytes() != b"pwned"
    # a symbolic link entry
    link = zipfile.ZipInfo("hymen/train/ants/link.jpg")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    msg = error_message(api.upload_zip(alice, make_zip(image_files + [(link, b"/etc/passwd")])), 400)
    assert "symbolic link" in msg
    # '..' in a folder upload's relative path
    msg = error_message(api.upload_files(alice, image_files + [("hymen/../../evil.jpg", b"x")]), 400)
    assert "'..'" in msg
    error_message(api.upload_files(alice, [("/abs/evil.jpg", b"x")] + image_files), 400)
    assert not [p for p in tmp_path.rglob("evil*")]
    # entries the file system cannot hold: a file where a folder is, a name too long
    msg = error_message(api.upload_zip(alice, make_zip(image_files + [("hymen/train/ants", b"x")])), 400)
    assert "clashes" in msg
    error_message(api.upload_files(alice, image_files + [(image_files[0][0] + "/x.jpg", b"x")]), 400)
    msg = error_message(api.upload_files(alice, image_files + [("hymen/train/ants/" + "q" * 300 + ".jpg", b"x")]),
                        400)
    assert "too long" in msg
    error_message(api.upload_zip(alice, make_zip(image_files + [("hymen/" + "q" * 300 + "/a.jpg", b"x")])), 400)
    # no file at all, or not multipart
    msg = error_message(post("/api/v1/datasets", headers=alice, data={"name": "x"}), 400)
    assert "'file'" in msg
    msg = error_message(post("/api/v1/datasets", headers=alice, json={"name": "x"}), 400)
    assert "multipart/form-data" in msg
    _assert_nothing_kept(api)


def test_upload_over_the_size_limit(db_url, tmp_path, dataset_zip, image_files):  # noqa: F811
    api = build_api(db_url, tmp_path, max_upload_bytes=20_000)
    alice = api.user("alice")
    assert len(dataset_zip) > 20_000
    msg = error_message(api.upload_zip(alice, dataset_zip), 413)
    assert "GRAFT_MAX_UPLOAD_BYTES" in msg
    _assert_nothing_kept(api)
    error_message(api.upload_files(alice, image_files), 413)
    _assert_nothing_kept(api)
    # a body declared larger than the limit (+1 MiB for the form) is refused before it is read
    big = os.urandom((1 << 20) + 30_000)
    msg = error_message(api.upload_zip(alice, big), 413)
    assert "larger than the limit" in msg
    _assert_nothing_kept(api)


def test_zip_expanding_beyond_the_extracted_limit_is_refused(db_url, tmp_path, image_files):  # noqa: F811
    api = build_api(db_url, tmp_path, max_extracted_bytes=50_000)
    alice = api.user("alice")
    msg = error_message(api.upload_zip(alice, make_zip(image_files)), 400)
    assert "GRAFT_MAX_EXTRACTED_BYTES" in msg
    _assert_nothing_kept(api)


# ---------------------------------------------------------------- jobs


def test_create_job_with_defaults_is_queued(api, alice, ds_id):
    job = create_job(api, alice, ds_id)
    assert job["status"] == "queued"
    assert job["dataset_id"] == ds_id
    assert job["spec"] == RunSpec().model_dump()
    # a default features job trains until val loss stops improving: its epochs are the most it may run
    assert job["total_epochs"] == RunSpec().max_epochs() == 200 and job["current_epoch"] == 0 and job["progress"] == 0
    assert job["result"] is None and job["error"] is None and job["cancel_requested"] is False
    # the job id was sent to this server's broker (the filesystem transport under data_dir)
    with api.sessions() as s:
        assert s.get(Job, job["id"]).celery_task_id
    queued = files_under(api.settings.broker_dir / "queue")
    assert len(queued) == 1, queued
    # explicit parameters are kept
    other = create_job(api, alice, ds_id, strategy="finetune_last:2", epochs=3, lr=0.01, augment="none")
    assert other["spec"]["strategy"] == "finetune_last:2" and other["spec"]["lr"] == 0.01
    assert other["total_epochs"] == 3
    assert len(files_under(api.settings.broker_dir / "queue")) == 2


def test_create_job_refuses_bad_parameters(api, alice, ds_id):
    post = lambda body: api.client.post("/api/v1/jobs", headers=alice, json=body)  # noqa: E731
    msg = error_message(post({"dataset_id": ds_id, "epochs": 0}), 422)
    assert "epochs" in msg
    msg = error_message(post({"dataset_id": ds_id, "strategy": "x"}), 422)
    assert "unknown strategy 'x'" in msg
    msg = error_message(post({"dataset_id": ds_id, "strategy": "two_stage", "epochs": 1}), 422)
    assert "two_stage" in msg
    msg = error_message(post({"dataset_id": ds_id, "backbone": "nope"}), 422)
    assert "unknown backbone 'nope'" in msg and "efficientnet_lite0" in msg
    msg = error_message(post({"dataset_id": ds_id, "colour": "red"}), 422)
    assert "colour" in msg
    msg = error_message(post({}), 422)
    assert "dataset_id" in msg
    msg = error_message(post({"dataset_id": ds_id, "backbone": "resnet18"}), 422)
    assert "graft weights import" in msg and "resnet18" in msg
    msg = error_message(post({"dataset_id": 999_999}), 404)
    assert "dataset 999999" in msg
    bob = api.user("bob")
    error_message(api.client.post("/api/v1/jobs", headers=bob, json={"dataset_id": ds_id}), 404)
    assert api.count(Job) == 0
    # without pretrained weights resnet18 is fine
    assert create_job(api, alice, ds_id, backbone="resnet18", pretrained=False)["status"] == "queued"


def test_jobs_list_get_metrics_cancel_delete(api, alice, ds_id):
    a = create_job(api, alice, ds_id)
    b = create_job(api, alice, ds_id, epochs=2)
    listed = api.client.get("/api/v1/jobs", headers=alice).json()
    assert [j["id"] for j in listed] == [b["id"], a["id"]]
    got = api.client.get(f"/api/v1/jobs/{a['id']}", headers=alice)
    assert got.status_code == 200 and got.json()["id"] == a["id"] and got.json()["spec"] == a["spec"]
    error_message(api.client.get("/api/v1/jobs/999999", headers=alice), 404)

    # metrics as a worker writes them, inserted out of order
    assert api.client.get(f"/api/v1/jobs/{a['id']}/metrics", headers=alice).json() == []
    row = dict(phase="head", train_loss=0.7, train_acc=0.5, val_loss=0.6, val_acc=0.75, lr=1e-3, images_per_s=50.0,
               seconds=1.5, elapsed=3.0, eta=10.0)
    api.add(EpochMetric(job_id=a["id"], epoch=2, is_best=True, **row),
            EpochMetric(job_id=a["id"], epoch=1, is_best=False, **{**row, "val_acc": 0.5}))
    m = api.client.get(f"/api/v1/jobs/{a['id']}/metrics", headers=alice)
    assert m.status_code == 200
    assert [(x["epoch"], x["val_acc"], x["is_best"], x["phase"]) for x in m.json()] == [
        (1, 0.5, False, "head"), (2, 0.75, True, "head")]
    assert api.client.get(f"/api/v1/jobs/{b['id']}/metrics", headers=alice).json() == []

    # a queued job cannot be deleted; it is cancelled at once, and only once
    assert "cancel it first" in error_message(api.client.delete(f"/api/v1/jobs/{a['id']}", headers=alice), 409)
    c = api.client.post(f"/api/v1/jobs/{a['id']}/cancel", headers=alice)
    assert c.status_code == 200, c.text
    assert c.json()["status"] == "cancelled" and c.json()["cancel_requested"] is True
    assert c.json()["finished_at"] is not None
    msg = error_message(api.client.post(f"/api/v1/jobs/{a['id']}/cancel", headers=alice), 409)
    assert "already cancelled" in msg
    assert [j["id"] for j in api.client.get("/api/v1/jobs?status=cancelled", headers=alice).json()] == [a["id"]]
    assert [j["id"] for j in api.client.get("/api/v1/jobs?status=queued", headers=alice).json()] == [b["id"]]
    assert api.client.get(f"/api/v1/jobs?dataset_id={ds_id + 1}", headers=alice).json() == []

    # a running job: cancel only asks the worker
    api.set_job(b["id"], status="running")
    c = api.client.post(f"/api/v1/jobs/{b['id']}/cancel", headers=alice)
    assert c.status_code == 200 and c.json()["status"] == "running" and c.json()["cancel_requested"] is True

    # a finished job is deleted with its run folder, metrics and events
    run_dir = api.settings.runs_dir / str(a["id"])
    run_dir.mkdir(parents=True)
    (run_dir / "log.txt").write_text("x")
    assert api.client.delete(f"/api/v1/jobs/{a['id']}", headers=alice).status_code == 204
    assert not run_dir.exists()
    error_message(api.client.get(f"/api/v1/jobs/{a['id']}", headers=alice), 404)
    with api.sessions() as s:
        assert s.scalar(select(func.count()).select_from(EpochMetric).where(EpochMetric.job_id == a["id"])) == 0
        assert s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == a["id"])) == 0


def test_model_download(api, alice, ds_id):
    job = create_job(api, alice, ds_id)
    jid = job["id"]
    msg = error_message(api.client.get(f"/api/v1/jobs/{jid}/model", headers=alice), 404)
    assert "not finished" in msg

    payload = os.urandom(4096)
    rel = Path("runs") / str(jid) / "model.pt"
    (api.settings.data_dir / rel).parent.mkdir(parents=True)
    (api.settings.data_dir / rel).write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    (art_id,) = api.add(Artifact(job_id=jid, kind="model", path=str(rel), size=len(payload), sha256=sha))
    api.set_job(jid, status="succeeded", progress=1.0)
    r = api.client.get(f"/api/v1/jobs/{jid}/model", headers=alice)
    assert r.status_code == 200, r.text
    assert r.content == payload
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-checksum-sha256"] == sha
    assert f"graft-job{jid}-efficientnet_lite0.pt" in r.headers["content-disposition"]

    # paths that lead outside the data directory are never served
    outside = api.settings.data_dir.parent / "secret.pt"
    outside.write_bytes(b"secret")
    link = api.settings.data_dir / "runs" / str(jid) / "link.pt"
    link.symlink_to(outside)
    for bad in ("../../etc/passwd", "/etc/passwd", "../secret.pt", str(outside), "runs/../../secret.pt",
                f"runs/{jid}/link.pt", f"runs/{jid}/missing.pt", "runs"):
        with api.sessions() as s:
            s.get(Artifact, art_id).path = bad
            s.commit()
        r = api.client.get(f"/api/v1/jobs/{jid}/model", headers=alice)
        msg = error_message(r, 404)
        assert "missing" in msg and b"secret" not in r.content and b"root:" not in r.content, bad


def test_events_stream_of_a_finished_job(api, alice, ds_id):
    jid = create_job(api, alice, ds_id, epochs=2)["id"]
    api.add(JobEvent(job_id=jid, kind="status", data={"status": "running", "error": None}),
            JobEvent(job_id=jid, kind="epoch", data={"epoch": 1, "val_acc": 0.5}),
            JobEvent(job_id=jid, kind="message", data={"message": "hello"}),
            JobEvent(job_id=jid, kind="epoch", data={"epoch": 2, "val_acc": 0.75}),
            JobEvent(job_id=jid, kind="status", data={"status": "succeeded", "error": None}))
    api.set_job(jid, status="succeeded", progress=1.0, current_epoch=2, best_val_acc=0.75,
                finished_at=dt.datetime.now(dt.UTC))

    r = api.client.get(f"/api/v1/jobs/{jid}/events", headers=alice)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith("retry: ")
    events = sse_events(r.text)
    stored = [e for e in events if "id" in e]
    ids = [int(e["id"]) for e in stored]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == 6
    assert [(e["event"], json.loads(e["data"]).get("status") or json.loads(e["data"]).get("epoch")
             or json.loads(e["data"]).get("message")) for e in stored] == [
        ("status", "queued"), ("status", "running"), ("epoch", 1), ("message", "hello"), ("epoch", 2),
        ("status", "succeeded")]
    progress = [json.loads(e["data"]) for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["status"] == "succeeded" and progress[-1]["best_val_acc"] == 0.75
    assert events[-1]["event"] == "end"

    # resuming: only the events after Last-Event-ID
    r = api.client.get(f"/api/v1/jobs/{jid}/events", headers={**alice, "Last-Event-ID": str(ids[2])})
    later = [e for e in sse_events(r.text) if "id" in e]
    assert [int(e["id"]) for e in later] == ids[3:]
    assert sse_events(r.text)[-1]["event"] == "end"
    r = api.client.get(f"/api/v1/jobs/{jid}/events", headers={**alice, "Last-Event-ID": str(ids[-1])})
    assert [e["event"] for e in sse_events(r.text)] == ["progress", "end"]
    r = api.client.get(f"/api/v1/jobs/{jid}/events", headers={**alice, "Last-Event-ID": "garbage"})
    assert len([e for e in sse_events(r.text) if "id" in e]) == 6
    r = api.client.get(f"/api/v1/jobs/{jid}/events", headers={**alice, "Last-Event-ID": "9" * 30})
    assert [e["event"] for e in sse_events(r.text)] == ["progress", "end"]
    r = api.client.get(f"/api/v1/jobs/{jid}/events", headers={**alice, "Last-Event-ID": "-3"})
    assert len([e for e in sse_events(r.text) if "id" in e]) == 6

    # the finished job can be deleted
    assert api.client.delete(f"/api/v1/jobs/{jid}", headers=alice).status_code == 204
    error_message(api.client.get(f"/api/v1/jobs/{jid}/events", headers=alice), 404)


# ---------------------------------------------------------------- ownership and errors


def test_other_users_objects_are_invisible(api, alice, ds_id, dataset_zip):
    jid = create_job(api, alice, ds_id)["id"]
    rel = Path("runs") / str(jid) / "model.pt"
    (api.settings.data_dir / rel).parent.mkdir(parents=True)
    (api.settings.data_dir / rel).write_bytes(b"model")
    api.add(Artifact(job_id=jid, kind="model", path=str(rel), size=5, sha256="0" * 64))
    bob = api.user("bob")
    bob_ds = api.upload_zip(bob, dataset_zip).json()["id"]
    bob_job = create_job(api, bob, bob_ds)["id"]

    for method, path in [("GET", f"/api/v1/datasets/{ds_id}"), ("DELETE", f"/api/v1/datasets/{ds_id}"),
                         ("GET", f"/api/v1/jobs/{jid}"), ("DELETE", f"/api/v1/jobs/{jid}"),
                         ("GET", f"/api/v1/jobs/{jid}/metrics"), ("GET", f"/api/v1/jobs/{jid}/events"),
                         ("POST", f"/api/v1/jobs/{jid}/cancel"), ("GET", f"/api/v1/jobs/{jid}/model")]:
        msg = error_message(api.client.request(method, path, headers=bob), 404)
        assert "not found" in msg, (method, path)
    error_message(api.client.post("/api/v1/jobs", headers=bob, json={"dataset_id": ds_id}), 404)
    # the same 404 as for an object that does not exist at all
    assert (api.client.get(f"/api/v1/jobs/{jid}", headers=bob).json()["error"]["message"]
            == f"job {jid} not found: list yours with GET /api/v1/jobs")

    assert [d["id"] for d in api.client.get("/api/v1/datasets", headers=bob).json()] == [bob_ds]
    assert [j["id"] for j in api.client.get("/api/v1/jobs", headers=bob).json()] == [bob_job]
    assert [d["id"] for d in api.client.get("/api/v1/datasets", headers=alice).json()] == [ds_id]
    assert [j["id"] for j in api.client.get("/api/v1/jobs", headers=alice).json()] == [jid]
    assert api.client.get(f"/api/v1/jobs?dataset_id={ds_id}", headers=bob).json() == []
    # alice's objects are untouched
    j = api.client.get(f"/api/v1/jobs/{jid}", headers=alice).json()
    assert j["status"] == "queued" and j["cancel_requested"] is False
    assert api.client.get(f"/api/v1/datasets/{ds_id}", headers=alice).status_code == 200


def test_errors_are_json(api, alice):
    msg = error_message(api.client.get("/api/v1/nope", headers=alice), 404)
    assert "/api/v1/nope" in msg
    error_message(api.client.get("/api/v1/nope"), 404)
    error_message(api.client.get("/no/such/page"), 404)
    msg = error_message(api.client.get("/api/v1/jobs/abc", headers=alice), 422)
    assert "job_id" in msg
    assert api.client.get("/api/v1/jobs/abc", headers=alice).json()["error"]["details"][0]["field"] == "job_id"
    msg = error_message(api.client.get("/api/v1/jobs?dataset_id=x", headers=alice), 422)
    assert "dataset_id" in msg
    r = api.client.post("/api/v1/jobs", headers={**alice, "Content-Type": "application/json"}, content=b"{not json")
    assert "not valid JSON at character 1" in error_message(r, 422)
    error_message(api.client.put("/api/v1/jobs", headers=alice, json={}), 405)
    with api.sessions() as s:  # tokens are stored hashed
        assert all(len(t.token_hash) == 64 and t.token_hash not in alice["Authorization"]
                   for t in s.scalars(select(ApiToken)))


def test_ids_beyond_the_database_range_are_not_found(api, alice, ds_id):
    jid = create_job(api, alice, ds_id)["id"]
    for big in (2**31, 2**63, 10**20):
        for method, path in [("GET", f"/api/v1/datasets/{big}"), ("DELETE", f"/api/v1/datasets/{big}"),
                             ("GET", f"/api/v1/jobs/{big}"), ("GET", f"/api/v1/jobs/{big}/events"),
                             ("POST", f"/api/v1/jobs/{big}/cancel"), ("GET", f"/api/v1/jobs/{big}/model")]:
            error_message(api.client.request(method, path, headers=alice), 404)
        error_message(api.client.post("/api/v1/jobs", headers=alice, json={"dataset_id": big}), 404)
        assert "dataset_id" in error_message(api.client.get(f"/api/v1/jobs?dataset_id={big}", headers=alice), 422)
    error_message(api.client.get("/api/v1/jobs/0", headers=alice), 404)
    error_message(api.client.get("/api/v1/datasets/-1", headers=alice), 404)
    assert [j["id"] for j in api.client.get(f"/api/v1/jobs?dataset_id={ds_id}", headers=alice).json()] == [jid]


def test_dataset_names_longer_than_the_column_are_refused_or_cut(api, alice, dataset_zip, image_files):
    msg = error_message(api.upload_zip(alice, dataset_zip, name="x" * 201), 422)
    assert "shorter name" in msg
    error_message(api.upload_files(alice, image_files, name="x" * 201), 422)
    _assert_nothing_kept(api)
    r = api.upload_zip(alice, dataset_zip, filename="y" * 300 + ".zip")  # a name taken from the file is cut
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "y" * 200
    assert api.upload_zip(alice, dataset_zip, name="  " + "z" * 200 + "  ").json()["name"] == "z" * 200


def test_timestamps_are_utc_with_an_offset(api, alice, ds_id):
    job = create_job(api, alice, ds_id)
    api.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=alice)
    ds = api.client.get(f"/api/v1/datasets/{ds_id}", headers=alice).json()
    job = api.client.get(f"/api/v1/jobs/{job['id']}", headers=alice).json()
    now = dt.datetime.now(dt.UTC)
    for value in (ds["created_at"], job["created_at"], job["finished_at"]):
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        assert t.utcoffset() == dt.timedelta(0), value
        assert abs((now - t).total_seconds()) < 120, value


def test_a_job_may_search_its_parameters(api, alice, ds_id):
    job = create_job(api, alice, ds_id, search={"trials": 2})
    assert job["status"] == "queued" and job["spec"]["search"]["trials"] == 2
    assert RunSpec.model_validate(job["spec"]).search.params == ["lr", "weight_decay", "dropout", "label_smoothing"]
    assert RunSpec.model_validate(create_job(api, alice, ds_id)["spec"]).search is None  # no search unless asked
    post = lambda body: api.client.post("/api/v1/jobs", headers=alice, json={"dataset_id": ds_id, **body})  # noqa: E731
    assert "trials" in error_message(post({"search": {"trials": 0}}), 422)
    assert "set devices to 1" in error_message(post({"strategy": "full", "devices": 2, "search": {}}), 422)
