"""A cluster without a shared disk, as real processes: PostgreSQL + Redis + SeaweedFS (S3) + `graft web` +
`graft inference` + two `graft worker`s, each process with its own empty GRAFT_DATA_DIR. Jobs run on both
workers; models download and predictions work through the web; a worker killed (SIGKILL) mid-job hands its
job to the other, which resumes from the checkpoint in storage."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from support.db import PG_ADMIN_URL
from support.paths import HYMENOPTERA
from support.procs import free_port
from support.stack import REDIS_URL
from support.web import dataset_zip

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

GRAFT = Path(sys.executable).with_name("graft")
JOB = {"strategy": "full", "epochs": 4, "image_size": 64, "batch_size": 4, "augment": "none"}


def _need(what: str, check) -> None:
    try:
        check()
    except Exception as e:  # noqa: BLE001
        msg = f"{what} is not reachable ({type(e).__name__}: {e}); the cluster test needs it"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def pg_database():
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                          connect_args={"connect_timeout": 3})
    name = f"graft_cluster_{uuid.uuid4().hex[:8]}"
    _need("PostgreSQL", lambda: admin.connect().close())
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND "
                       "pid <> pg_backend_pid()"), {"n": name})
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


class Proc:
    def __init__(self, name: str, args: list[str], env: dict, root: Path):
        self.name, self.log = name, root / f"{name}.log"
        with open(self.log, "wb") as f:
            self.p = subprocess.Popen([str(GRAFT), *args], env=env, cwd=root, stdout=f, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


def test_two_workers_without_a_shared_disk(tmp_path, pg_database, s3_bucket):  # noqa: F811
    import redis

    r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    _need("Redis", r.ping)
    r.flushdb()
    web_port, inference_port = free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAFT_", "AWS_"))}
    base_env.update(s3_bucket["env"], GRAFT_DATABASE_URL=pg_database, GRAFT_BROKER_URL=REDIS_URL, GRAFT_OFFLINE="1", GRAFT_EXPORT_FORMATS="torchscript",
                    PYTHONUNBUFFERED="1", GRAFT_HEARTBEAT_TIMEOUT_S="8", GRAFT_HEARTBEAT_INTERVAL_S="1",
                    GRAFT_RECONCILE_INTERVAL_S="2", GRAFT_PROGRESS_INTERVAL_S="0.5",
                    GRAFT_INFERENCE_URL=f"http://127.0.0.1:{inference_port}")

    def env_for(name: str) -> dict:
        d = tmp_path / name
        d.mkdir()
        return {**base_env, "GRAFT_DATA_DIR": str(d / "data")}

    assert subprocess.run([str(GRAFT), "migrate"], env=env_for("migrate"), capture_output=True, timeout=120).returncode == 0
    tok = subprocess.run([str(GRAFT), "token", "create", "--name", "t"], env=env_for("admin"), capture_output=True,
                         text=True, timeout=120)
    assert tok.returncode == 0, tok.stderr
    auth = {"Authorization": "Bearer " + tok.stdout.strip().splitlines()[-1]}
    procs = [Proc("web", ["web", "--port", str(web_port)], env_for("web"), tmp_path / "web"),
             Proc("inference", ["inference", "--port", str(inference_port)], env_for("inference"),
                  tmp_path / "inference")]
    workers = [Proc(f"worker{i}", ["worker", "--loglevel", "INFO"], env_for(f"worker{i}"), tmp_path / f"worker{i}")
               for i in (1, 2)]
    procs += workers
    base = f"http://127.0.0.1:{web_port}"
    c = httpx.Client(base_url=base, headers=auth, timeout=60)

    def logs() -> str:
        return "\n".join(f"----- {p.name} -----\n{p.text()[-4000:]}" for p in procs)

    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if c.get("/healthz").status_code == 200 and all(" ready." in w.text() for w in workers):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the cluster did not come up\n" + logs())
        ds = c.post("/api/v1/datasets", data={"name": "bees"},
                    files={"file": ("d.zip", dataset_zip({"train": 8, "val": 4}), "application/zip")})
        assert ds.status_code == 201, ds.text
        did = ds.json()["id"]
        jobs = [c.post("/api/v1/jobs", json={"dataset_id": did, **JOB}).json()["id"] for _ in range(2)]

        # both workers take one; the one running the first job is killed after its first epoch
        def job(jid):
            return c.get(f"/api/v1/jobs/{jid}").json()

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            states = [job(j) for j in jobs]
            if states[0]["status"] == "running" and states[0]["current_epoch"] >= 1 and states[1]["status"] == "running":
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"the jobs did not both run: {states}\n" + logs())
        # the worker column names host/pid: the two jobs run in two different processes
        engine = create_engine(pg_database, poolclass=NullPool)
        with engine.connect() as conn:
            running = dict(conn.execute(text("SELECT id, worker FROM jobs WHERE id IN (:a, :b)"),
                                        {"a": jobs[0], "b": jobs[1]}).all())
        pid_of = {jid: int(w.rsplit("/", 1)[1]) for jid, w in running.items()}
        assert len(set(pid_of.values())) == 2, running
        worker_pids = {w.p.pid for w in workers}
        assert set(pid_of.values()) <= worker_pids, (pid_of, worker_pids)
        victim = next(w for w in workers if w.p.pid == pid_of[jobs[0]])
        os.kill(victim.p.pid, signal.SIGKILL)
        victim.p.wait(10)

        # the other worker finishes its own job, then takes the orphan and resumes it from storage
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            states = [job(j) for j in jobs]
            if all(s["status"] in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(1)
        else:
            pytest.fail(f"the jobs did not finish: {states}\n" + logs())
        assert [s["status"] for s in states] == ["succeeded", "succeeded"], (states, logs())
        assert states[0]["attempts"] == 2 and states[1]["attempts"] == 1
        with engine.connect() as conn:
            messages = [m for (m,) in conn.execute(text(
                "SELECT data FROM job_events WHERE job_id = :j AND kind = 'message' ORDER BY id"), {"j": jobs[0]})]
            final_worker = conn.execute(text("SELECT worker FROM jobs WHERE id = :j"), {"j": jobs[0]}).scalar_one()
        engine.dispose()
        said = " | ".join(str(m) for m in messages)
        assert "resuming from the checkpoint in storage" in said and "resumed after epoch" in said, said
        assert int(final_worker.rsplit("/", 1)[1]) != victim.p.pid
        # no worker holds the dataset or the runs on a shared disk: each fetched its own scratch copy
        for w in workers:
            data = Path(w.log).parent / "data"
            assert not (data / "datasets").exists() or not any((data / "datasets").iterdir())
        # models download through the web, from storage, and predictions work
        for jid in jobs:
            m = c.get(f"/api/v1/jobs/{jid}/model")
            assert m.status_code == 200 and len(m.content) > 1_000_000, (m.status_code, m.text[:200])
        img = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0]
        pred = c.post(f"/api/v1/jobs/{jobs[0]}/predict", files=[("files", (img.name, img.read_bytes(), "image/jpeg"))])
        assert pred.status_code == 200, pred.text
        top = pred.json()["results"][0]["top"]
        assert {t["class"] for t in top} == {"ants", "bees"}
    finally:
        c.close()
        for p in procs:
            p.stop()
        r.flushdb()
