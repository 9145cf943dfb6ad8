"""A batch prediction needs its model file and its own images, not the training dataset: a worker on another
host (its own data directory, object storage on a real S3 server) runs one to the end without fetching the
dataset, while the kinds that read the dataset (training, probe, label issues) still have it fetched."""
from __future__ import annotations

import io
import zipfile

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.stack import TINY_RUN
from support.web import folder_zip, make_app

from app.db.models import Artifact, Job, JobKind
from app.services import auth, storage
from domain.clock import utcnow
from domain.files import sha256_file
from domain.spec import RunSpec

pytestmark = pytest.mark.e2e  # the engine, in this process


def test_the_kinds_that_read_the_dataset_are_the_ones_it_is_fetched_for():
    from worker.runjob import JOB_KINDS, NEEDS_DATASET

    assert NEEDS_DATASET == {JobKind.train.value, JobKind.probe.value, JobKind.label_issues.value}
    assert NEEDS_DATASET < set(JOB_KINDS) and JobKind.batch_predict.value in JOB_KINDS


def test_a_batch_runs_without_the_dataset_on_the_worker(s3_bucket, tiny_slice, tmp_path):  # noqa: F811
    from worker.engine.runner import run
    from worker.runjob import execute

    app, web = make_app(tmp_path / "web", f"sqlite:///{tmp_path / 'g.db'}", storage_url=s3_bucket["url"])
    with app.state.sessions() as s:
        c = TestClient(app, headers={"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "a"), "t")})
    r = c.post("/api/v1/datasets", data={"name": "tiny"}, files={"file": ("t.zip", folder_zip(tiny_slice), "application/zip")})
    assert r.status_code == 201, r.text
    spec = RunSpec(**TINY_RUN)
    with app.state.sessions() as s:
        job = Job(owner_id=auth.get_user(s, "a").id, dataset_id=r.json()["id"], spec=spec.model_dump(),
                  status="succeeded", progress=1.0, finished_at=utcnow(), result={})
        s.add(job)
        s.commit()
        train_id = job.id
    assert run(spec, tiny_slice, tmp_path / "run", None).status == "completed"
    model = tmp_path / "run" / "model.pt"
    storage.for_settings(web).put_file(model, f"runs/{train_id}/model.pt")
    with app.state.sessions() as s:
        s.add(Artifact(job_id=train_id, kind="model", path=f"runs/{train_id}/model.pt", size=model.stat().st_size,
                       sha256=sha256_file(model)))
        s.commit()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(3):
            img = io.BytesIO()
            Image.new("RGB", (32, 32), (60 * i, 120, 30)).save(img, "PNG")
            zf.writestr(f"{i}.png", img.getvalue())
    r = c.post(f"/api/v1/jobs/{train_id}/batch-predict", files={"file": ("i.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 201, r.text

    worker = web.model_copy(update={"data_dir": tmp_path / "worker"})
    worker.ensure_dirs()
    assert execute(r.json()["id"], worker) == "succeeded"
    assert c.get(f"/api/v1/jobs/{r.json()['id']}").json()["result"]["predicted"] == 3
    scratch = storage.scratch_dir(worker)
    assert (scratch / "files" / "runs" / str(train_id) / "model.pt").is_file()  # the model was fetched
    assert not (scratch / "datasets").exists()  # the dataset was not
    c.close()
