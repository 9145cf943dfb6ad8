"""GET /metrics on a real database: the Prometheus text format parsed back with prometheus-client's own
parser; who may read it."""
from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from support.db import db_url  # noqa: F401  (fixture: sqlite and postgres)
from support.web import dataset_zip, make_app

from app.services import auth


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_count_jobs_requests_and_uploads_and_need_a_token(tmp_path, db_url):  # noqa: F811
    app, _ = make_app(tmp_path / "data", db_url, metrics_token="scrape-secret-123")
    c = TestClient(app)
    with app.state.sessions() as s:
        admin = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "root", admin=True), "t")}
        user = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "bob"), "t")}
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/metrics", headers=user).status_code == 403
    zipped = dataset_zip({"train": 3, "val": 2})
    ds = c.post("/api/v1/datasets", headers=user, data={"name": "d"},
                files={"file": ("d.zip", zipped, "application/zip")}).json()
    for _ in range(2):
        assert c.post("/api/v1/jobs", headers=user, json={"dataset_id": ds["id"], "epochs": 1}).status_code == 201
    c.get(f"/api/v1/jobs/{ds['id']}", headers=user)
    r = c.get("/metrics", headers={"Authorization": "Bearer scrape-secret-123"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fam = _families(r.text)
    jobs = {(s.labels["status"], s.labels["kind"]): s.value for s in fam["graft_jobs"].samples}
    assert jobs[("queued", "train")] == 2 and jobs[("running", "train")] == 0
    assert fam["graft_queue_length"].samples[0].value == 2
    hist = {s.name: s.value for s in fam["graft_job_duration_seconds"].samples if "bucket" not in s.name}
    assert hist["graft_job_duration_seconds_count"] == 0
    # request latency by route template, not by raw path
    routes = {s.labels.get("route") for s in fam["graft_http_request_duration_seconds"].samples}
    assert "/api/v1/jobs" in routes and "/api/v1/jobs/{job_id}" in routes and "/api/v1/jobs/1" not in routes
    uploaded = [s.value for s in fam["graft_upload_bytes"].samples if s.name == "graft_upload_bytes_total"]
    assert uploaded and uploaded[0] >= len(zipped)
    assert c.get("/metrics", headers=admin).status_code == 200
    # a finished job and its epochs land in the duration histograms
    import datetime as dt

    from sqlalchemy import update

    from app.db.models import EpochMetric, Job
    from domain.clock import utcnow

    with app.state.sessions() as s:
        jid = s.query(Job.id).order_by(Job.id).first()[0]
        now = utcnow()
        s.execute(update(Job).where(Job.id == jid).values(status="succeeded", started_at=now - dt.timedelta(seconds=90),
                                                          finished_at=now))
        s.add(EpochMetric(job_id=jid, epoch=1, phase="head", train_loss=1, train_acc=0.5, val_loss=1, val_acc=0.5,
                          lr=0.1, images_per_s=10, seconds=3.0, elapsed=3.0, eta=0, is_best=True))
        s.commit()
    fam = _families(c.get("/metrics", headers=admin).text)
    job = {(x.name, x.labels.get("le")): x.value for x in fam["graft_job_duration_seconds"].samples}
    assert job[("graft_job_duration_seconds_count", None)] == 1
    assert 89 <= job[("graft_job_duration_seconds_sum", None)] <= 91
    assert job[("graft_job_duration_seconds_bucket", "60.0")] == 0 and job[("graft_job_duration_seconds_bucket", "120.0")] == 1
    ep = {(x.name, x.labels.get("le")): x.value for x in fam["graft_epoch_duration_seconds"].samples}
    assert ep[("graft_epoch_duration_seconds_bucket", "5.0")] == 1 and ep[("graft_epoch_duration_seconds_sum", None)] == 3
