"""The real-worker stack of the queue, fault, inference and probe tests: a database, a broker, real
`graft worker` processes (never task_always_eager) and the app in-process."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import Artifact, EpochMetric, JobEvent
from app.db.session import engine_for, session_factory
from app.main import create_app
from app.services import auth
from support.procs import redis_test_url

GRAFT = Path(sys.executable).with_name("graft")
REDIS_URL = redis_test_url(0)
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1

WORKER_READY_S = 60
JOB_TIMEOUT_S = 180
CANCEL_WITHIN_S = 10
TINY_RUN = {"strategy": "features", "epochs": 2, "image_size": 64, "batch_size": 8}
FINAL = ("succeeded", "failed", "cancelled")


def unreachable(what: str, err: Exception) -> None:
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
                   GRAFT_PROGRESS_INTERVAL_S=str(settings.progress_interval_s), PYTHONUNBUFFERED="1",
                   GRAFT_EXPORT_FORMATS=settings.export_formats)
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

    def stop(self, signal_it: bool = True) -> None:
        """SIGTERM (unless it was sent already: a second one makes the warm shutdown a cold one), then wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if signal_it:
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


# the stacks' workers export these two after training (each format's check costs seconds); the inference tests
# export every format (export_formats=None: the default, domain.exports.AFTER_TRAINING)
QUICK_EXPORTS = "torchscript,onnx"


def build_stack(name: str, root: Path, database_url: str | None, broker_url: str | None,
                with_worker: bool = True, export_formats: str | None = QUICK_EXPORTS) -> Stack:
    settings = Settings(_env_file=None, data_dir=root / "data", database_url=database_url, broker_url=broker_url,
                        progress_interval_s=0.5, **({"export_formats": export_formats} if export_formats else {}))
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


def close_stack(stack: Stack) -> None:
    if stack.worker is not None:
        stack.worker.stop()
    stack.client.close()
    engine_for(stack.settings.db_url).dispose()
