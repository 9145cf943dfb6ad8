"""A worker takes only the jobs that fit its devices: one that asks for more stays queued, says why, and is
sent again later (its task id forgotten) for a worker that has them. GRAFT_WORKER_DEVICES sets the count."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import Dataset, Job, JobEvent, User
from app.db.session import engine_for, session_factory
from worker.runjob import execute, too_big_for_this_worker, worker_devices


@pytest.fixture
def db(tmp_path: Path):
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    settings.ensure_dirs()
    run_migrations(settings.db_url)
    S = session_factory(settings.db_url)
    with S() as s:
        user = User(name="gpu-poor")
        s.add(user)
        s.flush()
        ds = Dataset(owner_id=user.id, name="d", path="datasets/d")
        s.add(ds)
        s.flush()
        job = Job(owner_id=user.id, dataset_id=ds.id, spec={"strategy": "full", "devices": 4}, status="queued",
                  celery_task_id="task-1")
        s.add(job)
        s.commit()
        jid = job.id
    yield settings, S, jid
    engine_for(settings.db_url).dispose()


def messages(S, jid: int) -> list[str]:
    with S() as s:
        return [e.data["message"] for e in s.scalars(select(JobEvent).where(JobEvent.job_id == jid,
                                                                             JobEvent.kind == "message"))]


def test_a_job_for_more_devices_stays_queued_with_the_reason(db, monkeypatch):
    settings, S, jid = db
    monkeypatch.setenv("GRAFT_WORKER_DEVICES", "1")
    assert worker_devices() == 1
    assert execute(jid, settings) == "deferred"
    with S() as s:
        job = s.get(Job, jid)
        assert job.status == "queued" and job.celery_task_id is None and job.attempts == 0
    msgs = messages(S, jid)
    assert len(msgs) == 1 and msgs[0].startswith("needs 4 devices; this worker has 1")
    # delivered again (the reconciler resends it): still queued, the reason not repeated
    assert execute(jid, settings) == "deferred"
    assert messages(S, jid) == msgs


def test_a_worker_with_enough_devices_takes_it(db, monkeypatch):
    settings, S, jid = db
    monkeypatch.setenv("GRAFT_WORKER_DEVICES", "4")
    assert worker_devices() == 4
    assert too_big_for_this_worker(S, jid) is False
    with S() as s:
        assert s.get(Job, jid).celery_task_id == "task-1"
    assert messages(S, jid) == []
    monkeypatch.delenv("GRAFT_WORKER_DEVICES")
    assert worker_devices() >= 1  # its GPUs, or 1 on CPU
