"""Several jobs at once on one worker (GRAFT_JOBS_PER_GPU, GRAFT_GPU_JOB_MIN_FREE_MB, `graft worker
--concurrency`): the default concurrency, which GPU each pool child takes and its share of the memory, the
admission check on free GPU memory (pure functions, and the real queue-and-database path of a job left
waiting), and a real `graft worker --concurrency 2` that runs two training jobs at the same time. All of it
on the CPU: on a CPU-only host the GPU parts touch nothing."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from sqlalchemy import select
from support.db import job_messages, queued_job
from support.stack import GRAFT, TINY_RUN, WORKER_READY_S, Worker, build_stack, close_stack
from typer.testing import CliRunner

from app.core.settings import Settings
from app.db.models import Job, JobEvent
from cli.main import app as cli_app
from worker.engine.device import GPU_MEMORY_SHARE, gpu_for_child, memory_fraction, use_gpu
from worker.runjob import (
    _wait_in_queue,
    default_concurrency,
    execute,
    gpu_memory_wait,
    pool_index,
    this_process_gpu,
    worker_gpus,
)

GIB = 1 << 30
CPU_ONLY = torch.cuda.device_count() == 0


# --- the pure parts ------------------------------------------------------------------------------------------


def test_default_concurrency_is_jobs_per_gpu_times_the_gpus_and_1_without_a_gpu():
    assert default_concurrency(1, 1) == 1
    assert default_concurrency(1, 4) == 4
    assert default_concurrency(3, 2) == 6
    assert default_concurrency(1, 0) == 1
    assert default_concurrency(4, 0) == 1  # a CPU-only host: its jobs would only share the same cores


def test_pool_children_spread_over_the_gpus():
    assert [gpu_for_child(i, 2) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [gpu_for_child(i, 3) for i in range(4)] == [0, 1, 2, 0]
    assert [gpu_for_child(i, 1) for i in range(3)] == [0, 0, 0]
    assert gpu_for_child(0, 0) is None and gpu_for_child(5, 0) is None  # no GPU: nothing to pick
    # 2 jobs per GPU on 2 GPUs: 4 children, two on each
    per_gpu = [gpu_for_child(i, 2) for i in range(default_concurrency(2, 2))]
    assert per_gpu.count(0) == per_gpu.count(1) == 2


def test_each_of_several_jobs_on_a_gpu_gets_its_share_of_the_memory():
    assert memory_fraction(1) is None  # one job per GPU: no cap
    assert memory_fraction(2) == pytest.approx(0.475)
    assert memory_fraction(4) == pytest.approx(GPU_MEMORY_SHARE / 4)
    assert all(memory_fraction(n) * n <= GPU_MEMORY_SHARE + 1e-9 for n in range(2, 9))


def test_admission_says_why_a_job_waits_for_gpu_memory():
    assert gpu_memory_wait(3 * GIB, 2 * GIB, "cuda:0") is None
    assert gpu_memory_wait(2 * GIB, 2 * GIB, "cuda:0") is None  # exactly enough
    msg = gpu_memory_wait(int(1.2 * GIB), 2 * GIB, "cuda:1")
    assert msg == ("waiting for GPU memory: 1.2 GiB free on cuda:1, a job needs 2.0 GiB "
                   "(GRAFT_GPU_JOB_MIN_FREE_MB)")


def test_settings_defaults():
    s = Settings(_env_file=None)
    assert s.jobs_per_gpu == 1 and s.gpu_job_min_free_mb == 2048


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRAFT_JOBS_PER_GPU", "3")
    monkeypatch.setenv("GRAFT_GPU_JOB_MIN_FREE_MB", "0")  # 0: no admission check
    s = Settings(_env_file=None)
    assert s.jobs_per_gpu == 3 and s.gpu_job_min_free_mb == 0


@pytest.mark.parametrize("value", [0, -1])
def test_jobs_per_gpu_below_1_is_refused_clearly(value, monkeypatch):
    with pytest.raises(ValidationError, match=f"GRAFT_JOBS_PER_GPU must be 1 or more \\(got {value}\\)"):
        Settings(_env_file=None, jobs_per_gpu=value)
    monkeypatch.setenv("GRAFT_JOBS_PER_GPU", str(value))
    with pytest.raises(ValidationError, match="GRAFT_JOBS_PER_GPU must be 1 or more"):
        Settings(_env_file=None)


def test_a_negative_free_memory_need_is_refused_clearly():
    with pytest.raises(ValidationError, match=r"GRAFT_GPU_JOB_MIN_FREE_MB must be 0 or more \(got -5\)"):
        Settings(_env_file=None, gpu_job_min_free_mb=-5)


def test_the_concurrency_option_refuses_0():
    r = CliRunner().invoke(cli_app, ["worker", "--concurrency", "0"])
    assert r.exit_code == 2 and "concurrency" in r.output


@pytest.mark.skipif(not CPU_ONLY, reason="what a CPU-only host does")
def test_nothing_is_touched_on_a_cpu_only_host(monkeypatch):
    assert worker_gpus() == 0
    monkeypatch.setenv("GRAFT_WORKER_DEVICES", "4")  # advertised devices are not GPUs
    assert worker_gpus() == 0
    assert use_gpu(3, 0, 2) is None
    assert pool_index() == 0  # not in a pool child
    assert this_process_gpu(Settings(_env_file=None, jobs_per_gpu=4)) is None
    assert not torch.cuda.is_initialized()


# --- a job left waiting for GPU memory: the real database path ---------------------------------------------


@pytest.fixture
def queued(tmp_path: Path):
    yield from queued_job(tmp_path, {"strategy": "features"}, "gpu-sharer")


def test_a_job_short_of_gpu_memory_stays_queued_and_says_why_once(queued):
    settings, S, jid = queued
    busy = lambda job: gpu_memory_wait(int(1.2 * GIB), settings.gpu_job_min_free_mb << 20, "cuda:0")  # noqa: E731
    assert _wait_in_queue(S, jid, busy) is True
    with S() as s:
        job = s.get(Job, jid)
        assert job.status == "queued" and job.celery_task_id is None and job.attempts == 0
    msgs = job_messages(S, jid)
    assert msgs == ["waiting for GPU memory: 1.2 GiB free on cuda:0, a job needs 2.0 GiB (GRAFT_GPU_JOB_MIN_FREE_MB)"]
    assert _wait_in_queue(S, jid, busy) is True  # delivered again, still short: the reason is not repeated
    assert job_messages(S, jid) == msgs
    # memory freed: the next delivery may claim it
    assert _wait_in_queue(S, jid, lambda job: gpu_memory_wait(40 * GIB, 2 * GIB, "cuda:0")) is False


@pytest.mark.skipif(not CPU_ONLY, reason="what a CPU-only host does")
def test_no_admission_check_on_a_cpu_only_host(queued):
    """execute() on the CPU goes past the GPU checks to the claim (the dataset's files are missing: it fails)."""
    settings, S, jid = queued
    assert execute(jid, settings) == "failed"
    with S() as s:
        assert s.get(Job, jid).attempts == 1
    assert not any(m.startswith("waiting for GPU memory") for m in job_messages(S, jid))


# --- a real worker that runs two training jobs at the same time ----------------------------------------------


class PoolWorker(Worker):
    """`graft worker` with extra options (support.stack.Worker starts it with none)."""

    def __init__(self, settings: Settings, cwd: Path, args: list[str]):
        super().__init__(settings, cwd)
        self.args = args

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(GRAFT), "worker", "--loglevel", "INFO", *self.args], env=self.env,
                                         cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + WORKER_READY_S
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"`graft worker` exited with status {self.proc.returncode}\n" + self.dump())
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"`graft worker` was not ready within {WORKER_READY_S} s\n" + self.dump())


@pytest.mark.slow
@pytest.mark.e2e
def test_a_worker_with_concurrency_2_runs_two_training_jobs_at_once(tmp_path, tiny_slice):
    stack = build_stack("two-at-once", tmp_path, None, None, with_worker=False, export_formats="torchscript")
    stack.worker = PoolWorker(stack.settings, tmp_path, ["--concurrency", "2"])
    try:
        with stack.log_on_failure():
            stack.worker.start()
            assert "concurrency: 2 (prefork)" in stack.worker.log()
            ds = stack.upload(tiny_slice)
            ids = [stack.submit(ds["id"], **{**TINY_RUN, "epochs": 1})["id"] for _ in range(2)]
            both_running, deadline = False, time.monotonic() + 180
            while time.monotonic() < deadline:
                statuses = [stack.job(i)["status"] for i in ids]
                both_running = both_running or statuses == ["running", "running"]
                if all(st in ("succeeded", "failed", "cancelled") for st in statuses):
                    break
                time.sleep(0.1)
            jobs = [stack.job(i) for i in ids]
            assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], [(j["status"], j["error"]) for j in jobs]
            assert both_running, "the two jobs were never 'running' at the same time"
            a, b = jobs
            assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]  # they overlapped
            with stack.sessions() as s:
                where = {s.get(Job, i).worker for i in ids}
            assert len(where) == 2, where  # two pool children (host/pid), one job each
    finally:
        close_stack(stack)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_stopped_worker_with_concurrency_2_puts_its_running_job_back(tmp_path, tiny_slice):
    """SIGTERM reaches only the worker's main process; its pool children hear of it (worker.tasks._STOP), so the
    job running in one stops at its next batch and goes back to the queue, as in a solo worker."""
    stack = build_stack("stop-two", tmp_path, None, None, with_worker=False, export_formats="torchscript")
    stack.worker = PoolWorker(stack.settings, tmp_path, ["--concurrency", "2"])
    try:
        with stack.log_on_failure():
            stack.worker.start()
            ds = stack.upload(tiny_slice)
            jid = stack.submit(ds["id"], **{**TINY_RUN, "strategy": "full", "epochs": 30})["id"]
            deadline = time.monotonic() + 120
            while stack.job(jid)["stage"] != "train" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert stack.job(jid)["stage"] == "train", stack.job(jid)
            stack.worker.proc.send_signal(signal.SIGTERM)
            assert stack.worker.proc.wait(timeout=30) == 0
            job = stack.job(jid)
            assert job["status"] == "queued" and job["attempts"] == 0, job  # a stop does not count as an attempt
            assert "'released'" in stack.worker.log()
            with stack.sessions() as s:
                assert any(e.data.get("message", "").startswith("the worker is shutting down: job put back")
                           for e in s.scalars(select(JobEvent).where(JobEvent.job_id == jid)))
    finally:
        close_stack(stack)
