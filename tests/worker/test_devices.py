"""A worker takes only the jobs that fit its devices: one that asks for more stays queued, says why, and is
sent again later (its task id forgotten) for a worker that has them. GRAFT_WORKER_DEVICES sets the count."""
from __future__ import annotations

from pathlib import Path

import pytest
from support.db import job_messages, queued_job

from app.db.models import Job
from worker.runjob import execute, too_big_for_this_worker, worker_devices


@pytest.fixture
def db(tmp_path: Path):
    yield from queued_job(tmp_path, {"strategy": "full", "devices": 4}, "gpu-poor")


def test_a_job_for_more_devices_stays_queued_with_the_reason(db, monkeypatch):
    settings, S, jid = db
    monkeypatch.setenv("GRAFT_WORKER_DEVICES", "1")
    assert worker_devices() == 1
    assert execute(jid, settings) == "deferred"
    with S() as s:
        job = s.get(Job, jid)
        assert job.status == "queued" and job.celery_task_id is None and job.attempts == 0
    msgs = job_messages(S, jid)
    assert len(msgs) == 1 and msgs[0].startswith("needs 4 devices; this worker has 1")
    # delivered again (the reconciler resends it): still queued, the reason not repeated
    assert execute(jid, settings) == "deferred"
    assert job_messages(S, jid) == msgs


def test_a_worker_with_enough_devices_takes_it(db, monkeypatch):
    settings, S, jid = db
    monkeypatch.setenv("GRAFT_WORKER_DEVICES", "4")
    assert worker_devices() == 4
    assert too_big_for_this_worker(S, jid) is False
    with S() as s:
        assert s.get(Job, jid).celery_task_id == "task-1"
    assert job_messages(S, jid) == []
    monkeypatch.delenv("GRAFT_WORKER_DEVICES")
    assert worker_devices() >= 1  # its GPUs, or 1 on CPU
