"""The job queue end to end, with real `graft worker` processes (never task_always_eager).

Two transports: the embedded one (Celery's filesystem transport + SQLite, nothing to install) and the
production one (Redis + PostgreSQL). For each: upload a zip of real images through the API, queue a
tiny real training run, poll it to 'succeeded', check the metrics, artifacts and SSE events, download the
model and predict with it. Plus: cancelling a running job, idempotent delivery, a job cancelled while
queued, and a broker that cannot be reached.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.migrate import run_migrations
from app.core.settings import Settings
from app.db.models import Artifact, EpochMetric, Job, JobEvent
from app.db.session import engine_for, session_factory
from app.main import create_app
from app.services import auth

pytestmark = pytest.mark.slow

GRAFT = Path(sys.executable).with_name("graft")
REDIS_URL = "redis://127.0.0.1:6379/13"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1

WORKER_READY_S = 60
JOB_TIMEOUT_S = 180
CANCEL_WITHIN_S = 10
TINY_RUN = {"strategy": "features", "epochs": 2, "image_size": 64, "batch_size": 8}
FINAL = ("succeeded", "failed", "cancelled")


def _unreachable(what: str, err: Exception) -> None:
    msg = f"{what} is not reachable ({type(err).__name__}: {err}); the queue tests need it"
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " (CI=true: the CI job must provide it)")
    pytest.skip(msg)


# --- a real worker process -------------------------------------------------------------------------------


class Worker:
    """`graft worker` as a subprocess; its stdout and stderr go to a log file."""

    def __init__(self, settings: Settings, cwd: Path):
        self.log_path = cwd / "worker.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
        env.update(GRAFT_DATA_DIR=str(settings.data_dir), GRAFT_DATABASE_URL=settings.db_url, GRAFT_OFFLINE="1",
                   GRAFT_PROGRESS_INTERVAL_S=str(settings.progress_interval_s), PYTHONUNBUFFERED="1")
        if settings.broker_url:
            env["GRAFT_BROKER_URL"] = settings.broker_url
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert GRAFT.is_file(), f"{GRAFT} is missing: install the project (pip install -e .[dev])"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(GRAFT), "worker", "--loglevel", "INFO"], env=self.env, cwd=self.cwd,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + WORKER_READY_S
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"`graft worker` exited with status {self.proc.returncode} before it was ready\n"
                            + self.dump())
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"`graft worker` was not ready within {WORKER_READY_S} s\n" + self.dump())

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def dump(self, tail: int = 12000) -> str:
        return f"----- worker log ({self.log_path}) -----\n{self.log()[-tail:]}\n----- end of worker log -----"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --- a stack: database + broker + worker + the app in-process --------------------------------------------


@dataclass
class Stack:
    name: str
    settings: Settings
    sessions: sessionmaker[Session]
    client: TestClient
    worker: Worker | None

    @contextlib.contextmanager
    def log_on_failure(self):
        """Print the worker's log (into the test's captured output) when the block fails."""
        try:
            yield
        except BaseException as e:
            if self.worker is not None and not isinstance(e, pytest.skip.Exception):
                print(self.worker.dump(), file=sys.stderr)
            raise

    def fail(self, msg: str) -> None:
        pytest.fail(msg + ("\n" + self.worker.dump() if self.worker else ""))

    def upload(self, folder: Path, name: str = "tiny") -> dict:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for f in sorted(folder.rglob("*.jpg")):
                zf.write(f, f.relative_to(folder).as_posix())
        r = self.client.post("/api/v1/datasets", data={"name": name},
                             files={"file": (f"{name}.zip", buf.getvalue(), "application/zip")})
        assert r.status_code == 201, r.text
        ds = r.json()
        assert ds["classes"] == ["ants", "bees"], ds
        return ds

    def submit(self, dataset_id: int, **params) -> dict:
        r = self.client.post("/api/v1/jobs", json={"dataset_id": dataset_id, **params})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["status"] == "queued", job
        return job

    def job(self, job_id: int) -> dict:
        r = self.client.get(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: int, status: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] == status:
                return job
            if job["status"] in FINAL:
                self.fail(f"job {job_id} ended {job['status']} (error: {job['error']}) instead of {status}")
            time.sleep(0.25)
        self.fail(f"job {job_id} did not become {status} within {timeout} s; it is {job['status']} "
                  f"(stage {job['stage']}, progress {job['progress']})")

    def events(self, job_id: int, last_event_id: int | None = None) -> list[tuple[int | None, str, dict]]:
        """The SSE stream of a finished job, read to its end: (id, event, data) in order."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        out: list[tuple[int | None, str, dict]] = []
        with self.client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=headers) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            block: dict[str, str] = {}
            for line in r.iter_lines():
                if line:
                    key, _, value = line.partition(":")
                    block[key] = value.strip()
                    continue
                if "event" in block:
                    out.append((int(block["id"]) if "id" in block else None, block["event"],
                                json.loads(block.get("data", "null"))))
                block = {}
        assert out and out[-1][1] == "end", out
        return out

    def counts(self, job_id: int) -> dict[str, int]:
        with self.sessions() as s:
            return {m.__name__: s.scalar(select(func.count()).select_from(m).where(m.job_id == job_id))
                    for m in (EpochMetric, JobEvent, Artifact)}


def _build_stack(name: str, root: Path, database_url: str | None, broker_url: str | None,
                 with_worker: bool = True) -> Stack:
    settings = Settings(_env_file=None, data_dir=root / "data", database_url=database_url, broker_url=broker_url,
                        progress_interval_s=0.5)
    settings.ensure_dirs()
    run_migrations(settings.db_url)
    sessions = session_factory(settings.db_url)
    with sessions() as db:
        user = auth.create_user(db, f"queue-{name}")
        token = auth.create_token(db, user, "queue tests")
    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"})
    worker = None
    if with_worker:
        worker = Worker(settings, root)
        worker.start()
    return Stack(name, settings, sessions, client, worker)


def _close(stack: Stack) -> None:
    if stack.worker is not None:
        stack.worker.stop()
    stack.client.close()
    engine_for(stack.settings.db_url).dispose()


@pytest.fixture(scope="module")
def fs_stack(tmp_path_factory):
    """The embedded setup: the filesystem transport (GRAFT_BROKER_URL unset) and SQLite."""
    stack = _build_stack("filesystem", tmp_path_factory.mktemp("queue-fs"), None, None)
    yield stack
    _close(stack)


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
        _unreachable(f"Redis at {REDIS_URL}", e)
    try:
        import psycopg

        admin = psycopg.connect(f"{PG_SERVER}/test", autocommit=True, connect_timeout=3)
    except Exception as e:
        _unreachable(f"PostgreSQL at {PG_SERVER}", e)
    db = f"graft_queue_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{db}"')
    stack = None
    try:
        stack = _build_stack("redis", tmp_path_factory.mktemp("queue-redis"),
                             f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}", REDIS_URL)
        yield stack
    finally:
        if stack is not None:
            _close(stack)
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
        assert set(arts) == {"model", "metrics", "model_card", "confusion_matrix", "torchscript", "onnx"}, arts
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
    stack = _build_stack("dead-broker", tmp_path, None, DEAD_BROKER, with_worker=False)
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
        _close(stack)


def test_job_saved_while_the_broker_was_down_runs_when_a_worker_starts(tmp_path: Path, tiny_slice: Path):
    """The database is the record: a job that never reached the broker (503 at creation) is sent by the next
    worker that starts, and runs once."""
    stack = _build_stack("late-broker", tmp_path, None, DEAD_BROKER, with_worker=False)
    worker = None
    try:
        ds = stack.upload(tiny_slice)
        r = stack.client.post("/api/v1/jobs", json={"dataset_id": ds["id"], **TINY_RUN})
        assert r.status_code == 503, r.text
        jid = r.json()["error"]["details"]["job_id"]
        # the broker is back (here: the embedded transport over the same database and data directory)
        worker = Worker(Settings(_env_file=None, data_dir=stack.settings.data_dir, database_url=stack.settings.db_url,
                                 progress_interval_s=0.5), tmp_path)
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
        _close(stack)
