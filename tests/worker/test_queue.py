"""The job queue end to end, with real `graft worker` processes (never task_always_eager).

Two transports: the embedded one (Celery's filesystem transport + SQLite, nothing to install) and the
production one (Redis + PostgreSQL). For each: upload a zip of real images through the API, queue a
tiny real training run, poll it to 'succeeded', check the metrics, artifacts and SSE events, download the
model and predict with it. Plus: cancelling a running job, idempotent delivery, a job cancelled while
queued, and a broker that cannot be reached.
"""
from __future__ import annotations

import hashlib
import math
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select
from support.stack import (  # noqa: F401
    CANCEL_WITHIN_S,
    DEAD_BROKER,
    FINAL,
    GRAFT,
    JOB_TIMEOUT_S,
    PG_SERVER,
    REDIS_URL,
    TINY_RUN,
    WORKER_READY_S,
    Stack,
    Worker,
    build_stack,
    close_stack,
    unreachable,
)

from app.core.settings import Settings
from app.db.models import Artifact, Job

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
@pytest.fixture(scope="module")
def fs_stack(tmp_path_factory):
    """The embedded setup: the filesystem transport (GRAFT_BROKER_URL unset) and SQLite."""
    stack = build_stack("filesystem", tmp_path_factory.mktemp("queue-fs"), None, None)
    yield stack
    close_stack(stack)


@pytest.fixture(scope="module")
def redis_pg_stack(tmp_path_factory):
    """The production setup: Redis (a db of its own, flushed) and a fresh PostgreSQL database."""
    try:
        import redis

        r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
        r.ping()
        r.flushdb()
        r.close()
    except Exception as e:
        unreachable(f"Redis at {REDIS_URL}", e)
    try:
        import psycopg

        admin = psycopg.connect(f"{PG_SERVER}/test", autocommit=True, connect_timeout=3)
    except Exception as e:
        unreachable(f"PostgreSQL at {PG_SERVER}", e)
    db = f"graft_queue_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{db}"')
    stack = None
    try:
        stack = build_stack("redis", tmp_path_factory.mktemp("queue-redis"),
                             f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}", REDIS_URL)
        yield stack
    finally:
        if stack is not None:
            close_stack(stack)
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).flushdb()


@pytest.fixture(params=["filesystem+sqlite", "redis+postgresql"])
def stack(request) -> Stack:
    return request.getfixturevalue("fs_stack" if request.param.startswith("filesystem") else "redis_pg_stack")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the tests --------------------------------------------------------------------------------------------


def test_upload_train_poll_download_predict(stack: Stack, tiny_slice: Path, tmp_path: Path):
    """The whole path of the issue: upload a zip via the API -> train on a real worker -> poll -> metrics,
    artifacts, events -> download the model -> load it -> predict."""
    with stack.log_on_failure():
        ds = stack.upload(tiny_slice)
        assert ds["counts"] == {"train": {"ants": 6, "bees": 6}, "val": {"ants": 3, "bees": 3}}
        queued = stack.submit(ds["id"], **TINY_RUN)
        job = stack.wait(queued["id"], "succeeded")
        jid = job["id"]

        # the job row
        assert job["progress"] == 1.0 and job["stage"] is None and job["error"] is None
        assert job["current_epoch"] == 2 and job["total_epochs"] == 2
        assert job["started_at"] and job["finished_at"]
        res = job["result"]
        assert res is not None and 0.0 <= res["val_acc"] <= 1.0, res
        assert 0.0 <= job["best_val_acc"] <= 1.0

        # per-epoch metrics
        r = stack.client.get(f"/api/v1/jobs/{jid}/metrics")
        assert r.status_code == 200, r.text
        rows = r.json()
        assert [m["epoch"] for m in rows] == [1, 2], rows
        for m in rows:
            assert 0.0 <= m["train_acc"] <= 1.0 and 0.0 <= m["val_acc"] <= 1.0, m
            assert math.isfinite(m["train_loss"]) and 0.0 < m["train_loss"] < 10, m
            assert math.isfinite(m["val_loss"]) and 0.0 < m["val_loss"] < 10, m
            assert m["lr"] > 0 and m["images_per_s"] > 0 and m["seconds"] >= 0 and m["elapsed"] >= 0, m
        assert rows[-1]["eta"] == pytest.approx(0.0, abs=1e-6)

        # artifacts: rows whose size and checksum match the files on disk
        with stack.sessions() as s:
            arts = {a.kind: a for a in s.scalars(select(Artifact).where(Artifact.job_id == jid))}
        assert set(arts) == {"model", "metrics", "model_card", "confusion_matrix", "reliability", "torchscript",
                             "onnx"}, arts
        for a in arts.values():
            path = stack.settings.data_dir / a.path
            assert path.is_file(), path
            assert a.size == path.stat().st_size
            assert a.sha256 == _sha256(path.read_bytes())

        # the event stream replays the job's history in order, then ends
        events = stack.events(jid)
        history = [(i, kind, d) for i, kind, d in events if kind in ("status", "epoch")]
        labels = [f"status:{d['status']}" if kind == "status" else "epoch" for _, kind, d in history]
        assert labels == ["status:queued", "status:running", "epoch", "epoch", "status:succeeded"], events
        ids = [i for i, _, _ in history]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert [d["epoch"] for _, kind, d in history if kind == "epoch"] == [1, 2]
        progress = [d for _, kind, d in events if kind == "progress"]
        assert progress and progress[-1]["status"] == "succeeded" and progress[-1]["progress"] == 1.0
        # resuming with Last-Event-ID replays only what came after
        running_id = ids[1]
        resumed = [kind for _, kind, _ in stack.events(jid, last_event_id=running_id) if kind in ("status", "epoch")]
        assert resumed == ["epoch", "epoch", "status"]

        # download the model, load it, predict a validation image
        r = stack.client.get(f"/api/v1/jobs/{jid}/model")
        assert r.status_code == 200, r.text
        assert r.headers["x-checksum-sha256"] == arts["model"].sha256 == _sha256(r.content)
        model_path = tmp_path / "downloaded.pt"
        model_path.write_bytes(r.content)

        from worker.engine.predict import Predictor

        predictor = Predictor(model_path)
        assert predictor.classes == ["ants", "bees"]
        image = sorted((tiny_slice / "val" / "bees").glob("*.jpg"))[0]
        (pred,) = predictor.predict([image], top_k=2)
        assert "error" not in pred, pred
        assert pred["top"][0]["class"] in ("ants", "bees")
        assert sum(t["probability"] for t in pred["top"]) == pytest.approx(1.0, abs=1e-4)

        # a second delivery of the same message changes nothing
        from worker.runjob import execute

        with stack.sessions() as s:
            before = {c.key: getattr(s.get(Job, jid), c.key) for c in Job.__table__.columns}
        counts = stack.counts(jid)
        assert execute(jid, stack.settings) == "skipped"
        with stack.sessions() as s:
            after = {c.key: getattr(s.get(Job, jid), c.key) for c in Job.__table__.columns}
        assert after == before
        assert stack.counts(jid) == counts


def test_cancel_running_job_and_queued_job_then_next_job_runs(fs_stack: Stack, tiny_slice: Path):
    """A running job stops within seconds of POST /cancel; a job cancelled while queued is never run; the
    worker then takes the next job."""
    stack = fs_stack
    with stack.log_on_failure():
        ds = stack.upload(tiny_slice, "tiny-cancel")
        # long enough that it cannot finish before the cancel arrives (no early stopping)
        long = stack.submit(ds["id"], strategy="full", epochs=200, image_size=64, batch_size=2, patience=None)
        stack.wait(long["id"], "running", timeout=60)

        # the worker is busy (one job at a time): this one stays queued, and is cancelled right away
        waiting = stack.submit(ds["id"], **TINY_RUN)
        r = stack.client.post(f"/api/v1/jobs/{waiting['id']}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled" and r.json()["cancel_requested"] is True

        # let the long job make some progress, then cancel it
        deadline = time.monotonic() + 60
        while stack.job(long["id"])["stage"] not in ("train", "val") and time.monotonic() < deadline:
            time.sleep(0.2)
        r = stack.client.post(f"/api/v1/jobs/{long['id']}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["cancel_requested"] is True
        t0 = time.monotonic()
        cancelled = stack.wait(long["id"], "cancelled", timeout=CANCEL_WITHIN_S)
        took = time.monotonic() - t0
        assert took <= CANCEL_WITHIN_S
        assert cancelled["error"] == "cancelled on request" and cancelled["finished_at"]
        assert cancelled["current_epoch"] < 200
        r = stack.client.get(f"/api/v1/jobs/{long['id']}/model")
        assert r.status_code == 404, r.text
        statuses = [d["status"] for _, kind, d in stack.events(long["id"]) if kind == "status"]
        assert statuses == ["queued", "running", "cancelled"]
        r = stack.client.post(f"/api/v1/jobs/{long['id']}/cancel")
        assert r.status_code == 409, r.text

        # the worker is free again: the next job runs to the end
        nxt = stack.submit(ds["id"], **TINY_RUN)
        stack.wait(nxt["id"], "succeeded")

        # the job cancelled while queued was delivered before `nxt` and skipped, never run
        job = stack.job(waiting["id"])
        assert job["status"] == "cancelled" and job["started_at"] is None and job["result"] is None, job
        with stack.sessions() as s:
            assert s.get(Job, waiting["id"]).worker is None
        assert stack.counts(waiting["id"]) == {"EpochMetric": 0, "JobEvent": 2, "Artifact": 0}
        assert stack.client.get(f"/api/v1/jobs/{waiting['id']}/metrics").json() == []
        assert not (stack.settings.runs_dir / str(waiting["id"])).exists()
        assert f"job {waiting['id']} not claimed (status cancelled)" in stack.worker.log()


def test_enqueue_failure_answers_503_quickly_and_keeps_the_job(tmp_path: Path, tiny_slice: Path):
    """A broker that cannot be reached: POST /api/v1/jobs answers a clear 503 within seconds (no hang); the
    job row is kept, queued."""
    stack = build_stack("dead-broker", tmp_path, None, DEAD_BROKER, with_worker=False)
    try:
        ds = stack.upload(tiny_slice)
        t0 = time.monotonic()
        r = stack.client.post("/api/v1/jobs", json={"dataset_id": ds["id"], **TINY_RUN})
        took = time.monotonic() - t0
        assert took < 10, f"POST /api/v1/jobs took {took:.1f} s with the broker down"
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/json")
        err = r.json()["error"]
        assert err["code"] == "unavailable"
        assert "queue" in err["message"] and "redis" in err["message"] and "GRAFT_BROKER_URL" in err["message"]
        jid = err["details"]["job_id"]
        with stack.sessions() as s:
            job = s.get(Job, jid)
            assert job is not None and job.status == "queued" and job.celery_task_id is None
        listed = stack.client.get("/api/v1/jobs").json()
        assert [(j["id"], j["status"]) for j in listed] == [(jid, "queued")]
    finally:
        close_stack(stack)


def test_job_saved_while_the_broker_was_down_runs_when_a_worker_starts(tmp_path: Path, tiny_slice: Path):
    """The database is the record: a job that never reached the broker (503 at creation) is sent by the next
    worker that starts, and runs once."""
    stack = build_stack("late-broker", tmp_path, None, DEAD_BROKER, with_worker=False)
    worker = None
    try:
        ds = stack.upload(tiny_slice)
        r = stack.client.post("/api/v1/jobs", json={"dataset_id": ds["id"], **TINY_RUN})
        assert r.status_code == 503, r.text
        jid = r.json()["error"]["details"]["job_id"]
        # the broker is back (here: the embedded transport over the same database and data directory)
        worker = Worker(Settings(_env_file=None, data_dir=stack.settings.data_dir, database_url=stack.settings.db_url,
                                 progress_interval_s=0.5, export_formats=stack.settings.export_formats), tmp_path)
        worker.start()
        stack.worker = worker
        with stack.log_on_failure():
            job = stack.wait(jid, "succeeded")
            assert job["result"]["val_acc"] is not None
            assert "sent 1 queued job(s)" in worker.log()
            with stack.sessions() as s:
                assert s.get(Job, jid).celery_task_id is not None
                assert stack.counts(jid)["EpochMetric"] == TINY_RUN["epochs"]
    finally:
        close_stack(stack)
