"""Batch predictions through the API with a real `graft worker`: a job of kind "batch_predict" over a zip (or a
resumable upload) of unlabelled images with a (really, tinily) trained job's model; a corrupt image is reported and the rest
finish; its CSV and sorted zip are served when it has succeeded (409 before, 404 to another user); cancel and
delete; refusals (a path-escaping zip, no images, a bad source) keep nothing; the training job's page lists the
batches."""
from __future__ import annotations

import base64
import csv
import io
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from support.stack import TINY_RUN, build_stack, close_stack

from app.db.models import Artifact, Job
from app.main import create_app
from app.services import auth
from domain.clock import utcnow
from domain.files import sha256_file
from domain.spec import RunSpec

pytestmark = pytest.mark.e2e  # a real worker process


def _trained_job(stack, dataset_id: int, tiny_slice: Path) -> int:
    """A succeeded training job with a really trained model file, trained here with the engine (a training job
    through the queue would spend most of its time on the exports, which batch predictions do not use)."""
    from worker.engine.runner import run

    spec = RunSpec(**TINY_RUN)
    with stack.sessions() as s:
        job = Job(owner_id=auth.get_user(s, f"queue-{stack.name}").id, dataset_id=dataset_id, spec=spec.model_dump(),
                  status="succeeded", progress=1.0, finished_at=utcnow(), result={})
        s.add(job)
        s.commit()
        job_id = job.id
    out = stack.settings.runs_dir / str(job_id)
    assert run(spec, tiny_slice, out, None).status == "completed"
    model = out / "model.pt"
    with stack.sessions() as s:
        s.add(Artifact(job_id=job_id, kind="model", path=model.relative_to(stack.settings.data_dir).as_posix(),
                       size=model.stat().st_size, sha256=sha256_file(model)))
        s.commit()
    return job_id


@pytest.fixture(scope="module")
def batch_stack(tmp_path_factory, tiny_slice):
    stack = build_stack("batch", tmp_path_factory.mktemp("batch"), None, None)
    with stack.log_on_failure():
        ds = stack.upload(tiny_slice)
        train_id = _trained_job(stack, ds["id"], tiny_slice)
    with stack.sessions() as s:
        bob = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "bob"), "t")}
    yield stack, train_id, bob
    close_stack(stack)


def _png(color: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def _unlabelled(tiny_slice: Path) -> dict[str, bytes]:
    vals = sorted((tiny_slice / "val").rglob("*.jpg"))
    out = {f"photos/{'x' if i % 2 else 'y/z'}/{p.name}": p.read_bytes() for i, p in enumerate(vals)}
    out["photos/broken.jpg"] = b"\xff\xd8\xff\xe0 not a jpeg"
    out["photos/readme.txt"] = b"notes"
    out["__MACOSX/photos/._broken.jpg"] = b"junk"
    return out


def _post_zip(c: TestClient, job_id: int, data: bytes, headers: dict | None = None, **fields):
    return c.post(f"/api/v1/jobs/{job_id}/batch-predict", headers=headers or {},
                  data={k: str(v) for k, v in fields.items()}, files={"file": ("imgs.zip", data, "application/zip")})


def _kept(stack) -> tuple[int, set[str]]:
    """(job rows, the batches' input folders and the files in the uploads folder): what a refusal must not add
    to (a batch cancelled while it waited keeps its input folder; one that ran removes it when it ends)."""
    data = stack.settings.data_dir
    with stack.sessions() as s:
        jobs = s.scalar(select(func.count()).select_from(Job))
    inputs = {p.name for p in (data / "batch-inputs").iterdir()} if (data / "batch-inputs").is_dir() else set()
    files = {str(p) for p in (data / "uploads").rglob("*") if p.is_file() and "tus" not in p.parts}
    return jobs, inputs | files


def test_a_zip_with_a_corrupt_image_is_predicted_and_its_results_served(batch_stack, tiny_slice):
    stack, train_id, bob = batch_stack
    c = stack.client
    entries = _unlabelled(tiny_slice)
    images = sorted(n for n in entries if n.endswith(".jpg") and not n.startswith("__MACOSX"))
    with stack.log_on_failure():
        r = _post_zip(c, train_id, _zip(entries))
        assert r.status_code == 201, r.text
        job = r.json()
        bid = job["id"]
        assert job["kind"] == "batch_predict" and job["status"] == "queued" and r.headers["Location"] == f"/api/v1/jobs/{bid}"
        assert job["spec"]["images"] == len(images) and job["spec"]["ignored"] == 1 and job["spec"]["top_k"] == 3
        assert job["spec"]["model_job_id"] == train_id and job["total_epochs"] == len(images)
        # not finished: 409 that says so; another user: 404
        for ext in ("csv", "zip"):
            r = c.get(f"/api/v1/jobs/{bid}/results.{ext}")
            assert r.status_code == 409 and "has not finished" in r.json()["error"]["message"], r.text
            assert c.get(f"/api/v1/jobs/{bid}/results.{ext}", headers=bob).status_code == 404
        done = stack.wait(bid, "succeeded")
    assert done["progress"] == 1.0 and done["current_epoch"] == done["total_epochs"] == len(images)
    res = done["result"]
    assert res["images"] == len(images) and res["unreadable"] == 1 and res["predicted"] == len(images) - 1
    assert res["errors"][0]["file"] == "photos/broken.jpg" and res["results_csv"] == f"/api/v1/jobs/{bid}/results.csv"
    events = stack.events(bid)
    assert [e[2]["status"] for e in events if e[1] == "status"] == ["queued", "running", "succeeded"]
    messages = [e[2]["message"] for e in events if e[1] == "message"]
    assert any("ignored 1 file(s) that are not images: photos/readme.txt" in m for m in messages), messages
    assert any("could not read photos/broken.jpg" in m for m in messages), messages

    r = c.get(f"/api/v1/jobs/{bid}/results.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == ["file", "label", "probability", "abstained", "top1", "p1", "top2", "p2", "error"]
    assert [row["file"] for row in rows] == images
    broken = next(row for row in rows if row["file"] == "photos/broken.jpg")
    assert broken["label"] == "" and broken["error"]
    good = [row for row in rows if not row["error"]]
    assert len(good) == len(images) - 1 and all(row["label"] in ("ants", "bees") for row in good)
    assert all(row["abstained"] in ("true", "false") and 0.5 <= float(row["probability"]) <= 1 for row in good)

    r = c.get(f"/api/v1/jobs/{bid}/results.zip")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = set(zf.namelist())
    assert names == {f"{'abstained' if row['abstained'] == 'true' else row['label']}/{row['file']}" for row in good}
    # the images were put in storage by the web tier and removed once the job ended
    assert not any((stack.settings.data_dir / "batch-inputs").iterdir())

    # another user sees nothing of it; nor may they start one with this model
    assert c.get(f"/api/v1/jobs/{bid}", headers=bob).status_code == 404
    assert _post_zip(c, train_id, _zip(entries), headers=bob).status_code == 404
    # a batch job is no training run: its model is the training job's
    r = _post_zip(c, bid, _zip(entries))
    assert r.status_code == 409 and "not a training run" in r.json()["error"]["message"]
    # results of a training job: 404
    assert c.get(f"/api/v1/jobs/{train_id}/results.csv").status_code == 404

    # the training job's page lists it with its downloads
    page = TestClient(c.app)
    with stack.sessions() as s:
        login = auth.create_token(s, auth.ensure_user(s, f"queue-{stack.name}"), "pages", kind="login")
    assert page.get(f"/login?token={login}", follow_redirects=False).status_code == 303
    html = page.get(f"/jobs/{train_id}").text
    assert 'id="batch-predict"' in html and f"/api/v1/jobs/{bid}/results.zip" in html and "/static/batch.js" in html
    r = page.get(f"/jobs/{bid}", follow_redirects=False)  # a batch job is shown on its training job's card
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{train_id}#batch-predict"
    page.close()
    assert c.get(f"/api/v1/jobs/{bid}/evaluation").status_code == 404

    # delete: the job and its results go
    assert c.delete(f"/api/v1/jobs/{bid}").status_code == 204
    assert c.get(f"/api/v1/jobs/{bid}/results.csv").status_code == 404


def test_a_resumable_upload_and_cancel(batch_stack, tiny_slice):
    stack, train_id, _ = batch_stack
    c = stack.client
    # a large batch of small images, given as a finished resumable upload, with options
    many = _zip({f"many/{i:05d}.png": _png(((i * 7) % 256, (i * 13) % 256, 90)) for i in range(3000)})
    meta = f"filename {base64.b64encode(b'many.zip').decode()}"
    tus = {"Tus-Resumable": "1.0.0"}
    r = c.post("/api/v1/uploads", headers={**tus, "Upload-Length": str(len(many)), "Upload-Metadata": meta})
    assert r.status_code == 201, r.text
    uid = r.json()["id"]
    r = c.patch(f"/api/v1/uploads/{uid}", content=many, headers={
        **tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"})
    assert r.status_code == 204, r.text
    with stack.log_on_failure():
        r = c.post(f"/api/v1/jobs/{train_id}/batch-predict", json={"upload_id": uid, "top_k": 1,
                                                                    "confidence_threshold": 0.2})
        assert r.status_code == 201, r.text
        big = r.json()
        assert big["spec"]["images"] == 3000 and big["spec"]["confidence_threshold"] == 0.2
        assert c.head(f"/api/v1/uploads/{uid}", headers=tus).status_code == 404  # used up
        # a second one, cancelled while it waits (the worker runs one job at a time)
        small = _post_zip(c, train_id, _zip(_unlabelled(tiny_slice))).json()
        r = c.post(f"/api/v1/jobs/{small['id']}/cancel")
        assert r.status_code == 200 and r.json()["cancel_requested"]
        # the big one, cancelled while it runs
        deadline = time.monotonic() + 60
        while c.get(f"/api/v1/jobs/{big['id']}").json()["status"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.post(f"/api/v1/jobs/{big['id']}/cancel").status_code == 200
        stack.wait(big["id"], "cancelled")
        stack.wait(small["id"], "cancelled")
    r = c.get(f"/api/v1/jobs/{big['id']}/results.csv")
    assert r.status_code == 409 and "cancelled" in r.json()["error"]["message"]
    assert c.post(f"/api/v1/jobs/{big['id']}/cancel").status_code == 409


def test_refusals_keep_nothing(batch_stack, monkeypatch):
    stack, train_id, _ = batch_stack
    c = stack.client
    url = f"/api/v1/jobs/{train_id}/batch-predict"
    before = _kept(stack)
    # a zip whose entry escapes the folder (zip slip)
    r = _post_zip(c, train_id, _zip({"ok.png": _png((1, 2, 3)), "../evil.png": _png((4, 5, 6))}))
    assert r.status_code == 400 and "'..'" in r.json()["error"]["message"] and "zip slip" in r.json()["error"]["message"]
    # a zip bomb: an entry compressed far beyond what images allow
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.png", b"\0" * (4 << 20))
    r = _post_zip(c, train_id, bomb.getvalue())
    assert r.status_code == 400 and "zip bomb" in r.json()["error"]["message"]
    # more images than a batch may hold (GRAFT_MAX_BATCH_IMAGES)
    small = TestClient(create_app(stack.settings.model_copy(update={"max_batch_images": 2})),
                       headers=dict(c.headers))
    r = _post_zip(small, train_id, _zip({f"{i}.png": _png((i, i, i)) for i in range(3)}))
    assert r.status_code == 400 and "3 images is more than the limit of 2" in r.json()["error"]["message"], r.text
    small.close()
    # not a zip; a zip without images
    r = _post_zip(c, train_id, b"plain bytes")
    assert r.status_code == 400 and "not a zip" in r.json()["error"]["message"]
    r = _post_zip(c, train_id, _zip({"a.txt": b"x"}))
    assert r.status_code == 400 and "no images" in r.json()["error"]["message"]
    # bad options; no body; a body of both kinds or neither
    r = _post_zip(c, train_id, _zip({"ok.png": _png((1, 2, 3))}), top_k=0)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "top_k"
    assert c.post(url).status_code == 400
    assert c.post(url, json={}).status_code == 422
    assert c.post(url, json={"upload_id": "a" * 32, "source": "s3://b/p/"}).status_code == 422
    r = c.post(url, json={"upload_id": "0" * 32})
    assert r.status_code == 404 and "upload" in r.json()["error"]["message"]
    r = c.post(url, json={"source": "http://example.com/x"})
    assert r.status_code == 400 and "s3://bucket/prefix/" in r.json()["error"]["message"]
    # an S3 prefix that cannot be read: 400 naming the bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    r = c.post(url, json={"source": "s3://no-such-bucket/imgs/"})
    assert r.status_code == 400 and "cannot read bucket no-such-bucket" in r.json()["error"]["message"], r.text
    after = _kept(stack)
    assert after[0] == before[0] and after[1] <= before[1], (before, after)


def test_with_object_storage_a_worker_on_another_host_runs_it(batch_stack, tiny_slice, s3_bucket, tmp_path):
    """The web tier and the worker share the database and the bucket, not a disk: the images go to the bucket
    with the request, the worker (its own data directory) fetches them and the model, the results come back."""
    from app.core.settings import Settings
    from app.db.migrate import run_migrations
    from app.services import storage
    from worker.runjob import execute

    stack, train_id, _ = batch_stack
    db = f"sqlite:///{tmp_path / 's3.db'}"
    web = Settings(_env_file=None, data_dir=tmp_path / "web", database_url=db, storage_url=s3_bucket["url"])
    run_migrations(web.db_url)
    app = create_app(web)
    with app.state.sessions() as s:
        headers = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "carol"), "t")}
    c = TestClient(app, headers=headers)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(tiny_slice.rglob("*.jpg")):
            zf.write(f, f.relative_to(tiny_slice).as_posix())
    r = c.post("/api/v1/datasets", data={"name": "tiny"}, files={"file": ("tiny.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 201, r.text
    trained = stack.settings.runs_dir / str(train_id) / "model.pt"
    with app.state.sessions() as s:
        job = Job(owner_id=auth.get_user(s, "carol").id, dataset_id=r.json()["id"], spec=RunSpec(**TINY_RUN).model_dump(),
                  status="succeeded", progress=1.0, finished_at=utcnow(), result={})
        s.add(job)
        s.commit()
        key = f"runs/{job.id}/model.pt"
        storage.for_settings(web).put_file(trained, key)
        s.add(Artifact(job_id=job.id, kind="model", path=key, size=trained.stat().st_size, sha256=sha256_file(trained)))
        s.commit()
        model_job = job.id
    entries = _unlabelled(tiny_slice)
    r = _post_zip(c, model_job, _zip(entries))
    assert r.status_code == 201, r.text
    bid, input_key = r.json()["id"], r.json()["spec"]["input_key"]

    def keys(prefix: str) -> list[str]:
        out = s3_bucket["client"].list_objects_v2(Bucket=s3_bucket["bucket"], Prefix=f"{s3_bucket['prefix']}/{prefix}")
        return [o["Key"] for o in out.get("Contents", [])]

    assert len(keys(input_key + "/")) == len(entries) - 2  # the images only (not the note, nor the junk)
    assert not (web.data_dir / "scratch" / input_key).exists()  # no copy kept on the web host

    worker = Settings(_env_file=None, data_dir=tmp_path / "worker", database_url=db, storage_url=s3_bucket["url"])
    worker.ensure_dirs()
    assert execute(bid, worker) == "succeeded"
    assert not keys(input_key + "/")  # the inputs go once the job has ended
    assert sorted(k.rsplit("/", 1)[1] for k in keys(f"runs/{bid}/")) == ["results.csv", "results.zip"]
    assert not (worker.data_dir / "runs" / str(bid)).exists()  # the worker keeps no copy of the results
    r = c.get(f"/api/v1/jobs/{bid}/results.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == len(entries) - 2 and sum(1 for row in rows if row["error"]) == 1
    r = c.get(f"/api/v1/jobs/{bid}/results.zip")
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert len(zf.namelist()) == len(rows) - 1
    c.close()
