"""Deleting with object storage, on a real S3 server (SeaweedFS, started by the tests), the bucket listed
directly: a deleted job's objects (model, metrics, checkpoint, a cancelled batch's uploaded images) are gone
and nothing else is (another job's, the dataset's, the shared feature cache); a deleted dataset version takes
its own objects, never its parent's; a deleted dataset takes its folder and its thumbnails; a storage that does
not answer is a 503 that keeps the row, and deleting again once it answers finishes."""
from __future__ import annotations

import io
import zipfile

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.paths import HYMENOPTERA
from support.web import dataset_zip, make_app

from app.db.models import Artifact, Dataset, Job
from app.services import auth, storage

pytestmark = pytest.mark.e2e


def _keys(b, under: str = "") -> list[str]:
    """This test's keys under `under`, without the test's prefix."""
    out = []
    for page in b["client"].get_paginator("list_objects_v2").paginate(Bucket=b["bucket"],
                                                                      Prefix=f"{b['prefix']}/{under}"):
        out += [o["Key"][len(b["prefix"]) + 1:] for o in page.get("Contents", [])]
    return sorted(out)


def _site(tmp_path, url: str):
    app, settings = make_app(tmp_path / "web", f"sqlite:///{tmp_path / 'g.db'}", storage_url=url)
    with app.state.sessions() as s:
        h = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "alice"), "t")}
    c = TestClient(app, headers=h)
    r = c.post("/api/v1/datasets", data={"name": "bees"},
               files={"file": ("d.zip", dataset_zip({"train": 3, "val": 2}, top=""), "application/zip")})
    assert r.status_code == 201, r.text
    return c, app, settings, r.json()


def _trained(c, app, settings, dataset_id: int) -> int:
    """A succeeded training job with its files in the bucket, as a worker leaves them."""
    job = c.post("/api/v1/jobs", json={"dataset_id": dataset_id, "epochs": 1}).json()
    src = settings.data_dir / "f.bin"
    src.write_bytes(b"x" * 100)
    st = storage.for_settings(settings)
    with app.state.sessions() as s:
        for name in ("model.pt", "metrics.json", "confusion_matrix.png"):
            st.put_file(src, f"runs/{job['id']}/{name}")
            s.add(Artifact(job_id=job["id"], kind=name.split(".")[0], path=f"runs/{job['id']}/{name}", size=100,
                           sha256="x" * 64))
        st.put_file(src, f"runs/{job['id']}/checkpoints/last.pt")
        s.get(Job, job["id"]).status = "succeeded"
        s.commit()
    return int(job["id"])


def _images_zip(n: int = 2) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            img = io.BytesIO()
            Image.new("RGB", (24, 24), (40 * i, 90, 200)).save(img, "PNG")
            zf.writestr(f"imgs/{i}.png", img.getvalue())
    return buf.getvalue()


def test_deleting_a_job_removes_its_objects_and_nothing_else(s3_bucket, tmp_path):  # noqa: F811
    c, app, settings, ds = _site(tmp_path, s3_bucket["url"])
    a, b = _trained(c, app, settings, ds["id"]), _trained(c, app, settings, ds["id"])
    st = storage.for_settings(settings)
    src = settings.data_dir / "f.bin"
    st.put_file(src, "features/abc123.pt")  # the feature cache: keyed by content, shared by jobs
    st.put_file(src, f"runs/{a}0/model.pt")  # a job whose id starts with a's: not under a's prefix
    # a batch prediction cancelled while it waited keeps its uploaded images until it is deleted
    r = c.post(f"/api/v1/jobs/{b}/batch-predict", files={"file": ("i.zip", _images_zip(), "application/zip")})
    assert r.status_code == 201, r.text
    batch, inputs = r.json()["id"], r.json()["spec"]["input_key"]
    assert len(_keys(s3_bucket, inputs + "/")) == 2
    r = c.delete(f"/api/v1/jobs/{b}")  # its model is the queued batch's: kept while the batch may still run
    assert r.status_code == 409 and f"batch prediction job(s) {batch}" in r.json()["error"]["message"], r.text
    assert c.post(f"/api/v1/jobs/{batch}/cancel").json()["status"] == "cancelled"
    before = _keys(s3_bucket)

    assert c.delete(f"/api/v1/jobs/{a}").status_code == 204
    assert not _keys(s3_bucket, f"runs/{a}/")
    assert _keys(s3_bucket) == [k for k in before if not k.startswith(f"runs/{a}/")]
    assert len(_keys(s3_bucket, f"runs/{b}/")) == 4 and _keys(s3_bucket, "features/") == ["features/abc123.pt"]
    assert c.delete(f"/api/v1/jobs/{batch}").status_code == 204
    assert not _keys(s3_bucket, inputs + "/") and not _keys(s3_bucket, f"runs/{batch}/")
    assert f"runs/{b}/model.pt" in _keys(s3_bucket)  # the batch's model is its training job's: kept
    with app.state.sessions() as s:
        assert s.get(Job, a) is None and s.get(Job, batch) is None and s.get(Job, b) is not None

    # a version shares its parent's unchanged images: deleting it removes its own objects, not those
    ds_key, inner = storage.dataset_key(app.state.sessions().get(Dataset, ds["id"]).path)
    ant = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))[0].name
    r = c.post(f"/api/v1/datasets/{ds['id']}/versions", json={"relabel": {f"train/ants/{ant}": "bees"}})
    assert r.status_code == 201, r.text
    v_key, _ = storage.dataset_key(app.state.sessions().get(Dataset, r.json()["id"]).path)
    parent_keys = _keys(s3_bucket, ds_key + "/")
    assert _keys(s3_bucket, v_key + "/") and len(parent_keys) == 10
    assert c.delete(f"/api/v1/datasets/{r.json()['id']}").status_code == 204
    assert not _keys(s3_bucket, v_key + "/") and _keys(s3_bucket, ds_key + "/") == parent_keys
    # the dataset, once its jobs are gone, takes its folder and its thumbnails (made by the dataset page)
    st.put_file(src, f"thumbs/{ds_key.split('/')[1]}/c0_0.jpg")
    assert c.delete(f"/api/v1/jobs/{b}").status_code == 204
    assert c.delete(f"/api/v1/datasets/{ds['id']}").status_code == 204
    assert _keys(s3_bucket) == sorted(["features/abc123.pt", f"runs/{a}0/model.pt"])


def test_an_unreachable_storage_keeps_the_job_and_the_dataset(s3_bucket, tmp_path, monkeypatch):  # noqa: F811
    c, app, settings, ds = _site(tmp_path, s3_bucket["url"])
    job = _trained(c, app, settings, ds["id"])
    before = _keys(s3_bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    storage._storage.cache_clear()
    r = c.delete(f"/api/v1/jobs/{job}")
    assert r.status_code == 503 and "job" in r.text and "was not deleted" in r.json()["error"]["message"], r.text
    assert "cannot be reached" in r.json()["error"]["message"]
    with app.state.sessions() as s:
        assert s.get(Job, job) is not None
        s.delete(s.get(Job, job))  # (a dataset with a training job is refused: take the row away, keep its files)
        s.commit()
    r = c.delete(f"/api/v1/datasets/{ds['id']}")
    assert r.status_code == 503 and "was not deleted" in r.json()["error"]["message"], r.text
    with app.state.sessions() as s:
        assert s.get(Dataset, ds["id"]) is not None
    assert _keys(s3_bucket) == before
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket["env"]["AWS_ENDPOINT_URL"])
    storage._storage.cache_clear()
    assert c.delete(f"/api/v1/datasets/{ds['id']}").status_code == 204  # again, once the storage answers
    assert not _keys(s3_bucket, "datasets/")
