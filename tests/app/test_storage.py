"""Object storage on a real S3 server (SeaweedFS, started by the tests): the storage operations, scratch
copies that are fetched once, complete or not at all, and evicted least recently used first; and the web
app with GRAFT_STORAGE_URL=s3://...: uploads go to the bucket, pages and downloads read from it, a deleted
dataset leaves nothing, and an unreachable storage answers 503 with nothing half-made."""
from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from support.web import dataset_zip, make_app

from app.db.models import Dataset
from app.services import auth, storage

pytestmark = pytest.mark.e2e


def _keys(b) -> list[str]:
    """This test's keys, without its prefix."""
    out = []
    for page in b["client"].get_paginator("list_objects_v2").paginate(Bucket=b["bucket"], Prefix=b["prefix"] + "/"):
        out += [o["Key"][len(b["prefix"]) + 1:] for o in page.get("Contents", [])]
    return sorted(out)


def test_storage_operations_and_scratch_copies(s3_bucket, tmp_path):  # noqa: F811
    st = storage.S3Storage(s3_bucket["url"])
    st.check()
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "one.txt").write_bytes(b"1" * 1000)
    (src / "a" / "b" / "two.txt").write_bytes(b"2" * 3000)
    assert st.put_tree(src, "datasets/x1") == 4000
    assert _keys(s3_bucket) == ["datasets/x1/a/b/two.txt", "datasets/x1/a/one.txt"]
    assert sorted(st.keys("datasets/x1")) == [("datasets/x1/a/b/two.txt", 3000), ("datasets/x1/a/one.txt", 1000)]
    assert st.size("datasets/x1/a/one.txt") == 1000 and st.size("datasets/x1/nope") is None
    assert st.open("datasets/x1/a/one.txt").read() == b"1" * 1000
    with pytest.raises(FileNotFoundError):
        st.get_file("datasets/x1/missing", tmp_path / "m")
    with pytest.raises(ValueError):
        st.put_file(src / "a" / "one.txt", "../escape")
    url = st.presign("datasets/x1/a/one.txt", "one.txt")
    import httpx

    assert httpx.get(url, timeout=10).content == b"1" * 1000

    # scratch copies: fetched once, then reused; complete or absent
    class S:
        data_dir = tmp_path / "worker"
        scratch_max_bytes = 6000

    first = storage.materialize_tree(st, "datasets/x1", S)
    assert (first / "a" / "b" / "two.txt").read_bytes() == b"2" * 3000 and (first / storage.DONE).is_file()
    (first / "a" / "one.txt").write_bytes(b"changed locally")  # proof that the second call does not refetch
    assert storage.materialize_tree(st, "datasets/x1", S) == first
    assert (first / "a" / "one.txt").read_bytes() == b"changed locally"
    st.put_tree(src, "datasets/x2")
    st.put_file(src / "a" / "b" / "two.txt", "runs/1/model.pt")
    second = storage.materialize_tree(st, "datasets/x2", S)  # 4000 + 4000 > 6000: x1 (older) goes
    assert second.is_dir() and not first.exists()
    model = storage.materialize_file(st, "runs/1/model.pt", S)
    assert model.read_bytes() == b"2" * 3000
    assert not second.exists() or model.exists()  # the newest copy is always kept
    # a fetch that fails leaves no partial folder behind
    with pytest.raises(FileNotFoundError):
        storage.materialize_tree(st, "datasets/none", S)
    assert not any(p.name.endswith(".partial") for p in (S.data_dir / "scratch").rglob("*"))
    storage.forget_tree(st, S, "datasets/x2")
    assert not any(k.startswith("datasets/x2/") for k in _keys(s3_bucket))


def test_the_app_keeps_datasets_and_models_in_the_bucket(s3_bucket, tmp_path):  # noqa: F811
    app, settings = make_app(tmp_path / "web", f"sqlite:///{tmp_path / 'g.db'}", storage_url=s3_bucket["url"])
    c = TestClient(app)
    with app.state.sessions() as s:
        h = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "alice"), "t")}
    r = c.post("/api/v1/datasets", headers=h, data={"name": "bees"},
               files={"file": ("d.zip", dataset_zip({"train": 3, "val": 2}), "application/zip")})
    assert r.status_code == 201, r.text
    ds = r.json()
    keys = _keys(s3_bucket)
    assert len([k for k in keys if k.endswith(".jpg")]) == 10 and all(k.startswith("datasets/") for k in keys)
    # this host keeps only a scratch copy (bounded), not a second datasets folder
    assert not any(settings.datasets_dir.iterdir())
    # the dataset page's thumbnails come from the bucket, even after the scratch copies are gone
    import shutil

    shutil.rmtree(settings.data_dir / "scratch")
    page = TestClient(app)
    with app.state.sessions() as s:
        link = auth.create_token(s, auth.get_user(s, "alice"), "l", kind="login", ttl=auth.LOGIN_TTL)
    page.get(f"/login?token={link}")
    r = page.get(f"/datasets/{ds['id']}/samples/0/0.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    # the thumbnail itself is kept in the bucket: another web host shows it without fetching the dataset
    assert any(k.startswith("thumbs/") for k in _keys(s3_bucket))
    shutil.rmtree(settings.data_dir / "scratch")
    shutil.rmtree(settings.thumbs_dir)
    again = page.get(f"/datasets/{ds['id']}/samples/0/0.jpg")
    assert again.status_code == 200 and again.content == r.content
    assert not (settings.data_dir / "scratch" / "datasets").exists()
    # a model stored under runs/ downloads from the bucket (streamed, or a presigned redirect)
    job = c.post("/api/v1/jobs", headers=h, json={"dataset_id": ds["id"], "epochs": 1}).json()
    from app.db.models import Artifact, Job

    model_bytes = os.urandom(50_000)
    (tmp_path / "model.pt").write_bytes(model_bytes)
    st = storage.for_settings(settings)
    st.put_file(tmp_path / "model.pt", f"runs/{job['id']}/model.pt")
    with app.state.sessions() as s:
        s.add(Artifact(job_id=job["id"], kind="model", path=f"runs/{job['id']}/model.pt", size=len(model_bytes),
                       sha256="x" * 64))
        s.get(Job, job["id"]).status = "succeeded"
        s.commit()
    r = c.get(f"/api/v1/jobs/{job['id']}/model", headers=h)
    assert r.status_code == 200 and r.content == model_bytes and "attachment" in r.headers["content-disposition"]
    settings.storage_presign = True
    r = c.get(f"/api/v1/jobs/{job['id']}/model", headers=h, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].startswith(os.environ["AWS_ENDPOINT_URL"])
    import httpx

    assert httpx.get(r.headers["location"], timeout=10).content == model_bytes
    settings.storage_presign = False
    # deleting the dataset (once its job is gone) removes its objects
    with app.state.sessions() as s:
        s.delete(s.get(Job, job["id"]))
        s.commit()
    assert c.delete(f"/api/v1/datasets/{ds['id']}", headers=h).status_code == 204
    assert not any(k.startswith("datasets/") for k in _keys(s3_bucket))


def test_an_unreachable_storage_answers_503_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage._storage.cache_clear()
    app, settings = make_app(tmp_path / "web", f"sqlite:///{tmp_path / 'g.db'}", storage_url="s3://nowhere/graft")
    c = TestClient(app)
    with app.state.sessions() as s:
        h = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "alice"), "t")}
    r = c.post("/api/v1/datasets", headers=h, data={"name": "bees"},
               files={"file": ("d.zip", dataset_zip({"train": 2, "val": 1}), "application/zip")})
    assert r.status_code == 503 and "cannot be reached" in r.json()["error"]["message"], r.text
    with app.state.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0
    assert not any(settings.datasets_dir.iterdir())
    assert not (settings.data_dir / "scratch").exists() or not any((settings.data_dir / "scratch").rglob("*.jpg"))
    storage._storage.cache_clear()


def test_features_written_to_storage_are_found_by_another_worker(s3_bucket, tmp_path):  # noqa: F811
    """The feature cache's mirror (worker.runjob.StorageMirror): an entry one worker writes is in the bucket,
    and a second worker with an empty cache reads it from there instead of computing it."""
    import torch

    from worker.engine.features import FeatureCache
    from worker.runjob import StorageMirror

    st = storage.S3Storage(s3_bucket["url"])
    one = FeatureCache(tmp_path / "worker1", StorageMirror(st))
    feats = torch.randn(7, 5)
    one.save("abc123", feats)
    assert "features/abc123.pt" in _keys(s3_bucket)
    two = FeatureCache(tmp_path / "worker2", StorageMirror(st))
    got = two.load("abc123", (7, 5))
    assert got is not None and torch.equal(got, feats) and two.path("abc123").is_file()
    assert two.load("missing", (7, 5)) is None and two.load("abc123", (8, 5)) is None
    two.drop("abc123")
    assert "features/abc123.pt" not in _keys(s3_bucket)
