"""Jobs that survive faults, each injected for real: a worker killed with SIGKILL in the middle of an epoch
(and one stopped with SIGTERM), workers that die for good, a Redis that lost its queue while a job was
waiting (and one that could not be reached when a job was created), the GPU running out of memory, and
cancelling a job whose worker is dead.

Workers are real `graft worker` processes (test_queue's helpers) with a short heartbeat timeout and
reconcile interval, so that a lost worker is noticed within seconds.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from support.procs import descendants, redis_test_url
from support.stack import DEAD_BROKER, FINAL, TINY_RUN, Stack, Worker, build_stack, close_stack, unreachable

from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import Dataset, EpochMetric, Job, JobEvent, User
from app.db.session import engine_for, session_factory
from app.main import create_app
from worker import reaper
from worker.runjob import Heartbeat, Reporter, _finish, execute

REDIS_FAULTS_URL = redis_test_url(1)
FAST = {"GRAFT_HEARTBEAT_TIMEOUT_S": "5", "GRAFT_HEARTBEAT_INTERVAL_S": "0.5", "GRAFT_RECONCILE_INTERVAL_S": "0.5"}
LONG_RUN = {"strategy": "full", "epochs": 6, "image_size": 64, "batch_size": 2, "patience": None}
EXPORTS = "torchscript"  # what the workers export after training: no fault here is about the exports


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- helpers ------------------------------------------------------------------------------------------------


def start_worker(stack: Stack, cwd: Path, settings: Settings | None = None) -> Worker:
    """A real `graft worker` with the short fault timeouts; its log is cwd/worker.log."""
    cwd.mkdir(parents=True, exist_ok=True)
    w = Worker(settings or stack.settings, cwd)
    w.env.update(FAST)
    w.start()
    stack.worker = w  # so that log_on_failure prints this worker's log
    return w


def sigkill(w: Worker) -> None:
    """SIGKILL the worker and everything it started: no handler, no clean-up, no last write."""
    kids = descendants(w.proc.pid)
    for pid in [w.proc.pid, *kids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    w.proc.wait(timeout=10)


def wait_for(stack: Stack, job_id: int, cond, what: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stack.job(job_id)
        if cond(job):
            return job
        if job["status"] in FINAL:
            stack.fail(f"job {job_id} ended {job['status']} ({job['error']}) while waiting for {what}")
        time.sleep(0.1)
    stack.fail(f"job {job_id}: no {what} within {timeout} s: {stack.job(job_id)}")


def history(stack: Stack, job_id: int) -> list[tuple[str, object]]:
    """The job's events in order: ("status", status), ("epoch", n) or ("message", text)."""
    with stack.sessions() as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
    return [(e.kind, e.data["status"] if e.kind == "status" else e.data["epoch"] if e.kind == "epoch"
             else e.data["message"]) for e in rows]


def statuses(stack: Stack, job_id: int) -> list[str]:
    return [v for k, v in history(stack, job_id) if k == "status"]


def messages(stack: Stack, job_id: int) -> list[str]:
    return [v for k, v in history(stack, job_id) if k == "message"]


def metric_epochs(stack: Stack, job_id: int) -> list[int]:
    with stack.sessions() as s:
        return list(s.scalars(select(EpochMetric.epoch).where(EpochMetric.job_id == job_id)
                              .order_by(EpochMetric.epoch)))


def row(stack_or_sessions, job_id: int) -> Job:
    S = getattr(stack_or_sessions, "sessions", stack_or_sessions)
    with S() as s:
        return s.get(Job, job_id)


# --- 1. a worker killed in the middle of an epoch; a worker stopped ---------------------------------------------


@pytest.mark.slow
def test_killed_and_stopped_workers_lose_nothing_and_the_job_resumes(tmp_path: Path, tiny_slice: Path):
    """SIGKILL the worker in the middle of an epoch: the next worker's reaper re-queues the job once its
    heartbeat is late, and it resumes from the last checkpoint. SIGTERM that worker: it puts the job back
    in the queue itself. A third worker finishes it. Every epoch ran once, and the metrics are those of an
    uninterrupted run."""
    stack = build_stack("kill", tmp_path, None, None, with_worker=False, export_formats=EXPORTS)
    try:
        w1 = start_worker(stack, tmp_path / "w1")
        with stack.log_on_failure():
            ds = stack.upload(tiny_slice)
            jid = stack.submit(ds["id"], **LONG_RUN)["id"]
            # in the middle of the third epoch or later: two checkpoints exist
            wait_for(stack, jid, lambda j: j["current_epoch"] >= 2 and j["stage"] == "train", "epoch 3")
            sigkill(w1)
            killed_at = row(stack, jid)
            assert killed_at.status == "running" and killed_at.attempts == 1
            assert (stack.settings.runs_dir / str(jid) / "checkpoints" / "last.pt").is_file()

            w2 = start_worker(stack, tmp_path / "w2")
            # reaped (heartbeat late) -> queued -> claimed again -> resumed after the last full epoch
            job = wait_for(stack, jid, lambda j: j["status"] == "running" and j["current_epoch"] >= killed_at.current_epoch + 1  # noqa: F841
                           and j["stage"] == "train", "progress on the second worker")
            assert row(stack, jid).attempts == 2
            w2.proc.send_signal(signal.SIGTERM)  # the job goes back to the queue, the attempt does not count
            released = wait_for(stack, jid, lambda j: j["status"] != "running", "the job put back in the queue", 30)
            assert released["status"] == "queued" and released["attempts"] == 1, released
            assert any("worker is shutting down" in m for m in messages(stack, jid))
            start_worker(stack, tmp_path / "w3")  # while the second one ends its shutdown: it takes no new task
            w2.stop(signal_it=False)
            assert w2.proc.returncode == 0, w2.dump()
            done = stack.wait(jid, "succeeded")
    finally:
        close_stack(stack)

    # the record: three starts, each after the last full epoch of the previous one
    assert statuses(stack, jid) == ["queued", "running", "queued", "running", "queued", "running", "succeeded"], \
        history(stack, jid)
    msgs = messages(stack, jid)
    assert any("stopped responding" in m and "re-queued after attempt 1 of 3" in m for m in msgs), msgs
    resumed = [int(m.rsplit(" ", 1)[1]) for m in msgs if m.startswith("resumed after epoch ")]
    assert len(resumed) == 2 and resumed[0] >= 2 and resumed[1] > resumed[0], msgs
    assert "attempt 2 of 3" in msgs
    # epochs were not re-run: each epoch reported once, and the metric rows one per epoch
    epochs = [v for k, v in history(stack, jid) if k == "epoch"]
    assert epochs == list(range(1, LONG_RUN["epochs"] + 1)), epochs
    assert metric_epochs(stack, jid) == list(range(1, LONG_RUN["epochs"] + 1))
    assert row(stack, jid).attempts == 2 and done["current_epoch"] == LONG_RUN["epochs"]

    # the same spec, uninterrupted, in this process: the same metrics
    from domain.spec import RunSpec
    from worker.engine.runner import run

    with stack.sessions() as s:
        data = stack.settings.data_dir / s.get(Dataset, ds["id"]).path
        rows = s.scalars(select(EpochMetric).where(EpochMetric.job_id == jid).order_by(EpochMetric.epoch)).all()
    ref = run(RunSpec(**LONG_RUN), data, tmp_path / "reference", None)
    assert [r.val_loss for r in rows] == pytest.approx([m.val_loss for m in ref.history], abs=1e-3)
    assert done["result"]["val_loss"] == pytest.approx(ref.val_loss, abs=1e-3)
    assert done["result"]["val_acc"] == pytest.approx(ref.val_acc, abs=1e-6)


# --- 2. workers that die for good: the reaper -------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path):
    """A migrated SQLite database with one user and dataset, and settings with a 60 s heartbeat timeout."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", heartbeat_timeout_s=60, max_attempts=3)
    settings.ensure_dirs()
    run_migrations(settings.db_url)
    S = session_factory(settings.db_url)
    with S() as s:
        user = User(name="reaper")
        s.add(user)
        s.flush()
        ds = Dataset(owner_id=user.id, name="d", path="datasets/d")
        s.add(ds)
        s.commit()
        ids = (user.id, ds.id)
    yield settings, S, ids
    engine_for(settings.db_url).dispose()


def make_job(S, ids, status="running", heartbeat_age: float | None = 600.0, attempts=1, cancel=False,
             started_age: float = 900.0) -> int:
    now = utcnow()
    with S() as s:
        job = Job(owner_id=ids[0], dataset_id=ids[1], spec={}, status=status, attempts=attempts,
                  cancel_requested=cancel, celery_task_id="old-task", worker="gpu-7",
                  started_at=now - dt.timedelta(seconds=started_age) if status == "running" else None,
                  heartbeat_at=None if heartbeat_age is None else now - dt.timedelta(seconds=heartbeat_age))
        s.add(job)
        s.commit()
        return job.id


def job_events(S, jid: int) -> list[tuple[str, dict]]:
    with S() as s:
        return [(e.kind, e.data) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == jid).order_by(JobEvent.id))]


def test_reaper_requeues_below_the_limit_fails_at_it_and_leaves_live_jobs_alone(db):
    settings, S, ids = db
    at_max = make_job(S, ids, attempts=3)
    below = make_job(S, ids, attempts=1)
    legacy = make_job(S, ids, attempts=2, heartbeat_age=None)  # no heartbeat at all: counts from its start
    alive = make_job(S, ids, attempts=1, heartbeat_age=5)
    cancelling = make_job(S, ids, attempts=1, cancel=True)
    queued = make_job(S, ids, status="queued", attempts=0, heartbeat_age=None)

    report = reaper.reap(S, settings)
    assert sorted(report.requeued) == [below, legacy] and report.failed == [at_max]
    assert report.cancelled == [cancelling]

    j = row(S, at_max)
    assert j.status == "failed" and j.finished_at is not None and j.stage is None
    assert "stopped responding" in j.error and "3 times" in j.error and "gave up after 3 attempt" in j.error
    assert job_events(S, at_max)[-1] == ("status", {"status": "failed", "error": j.error})

    j = row(S, below)
    assert (j.status, j.celery_task_id, j.attempts, j.finished_at) == ("queued", None, 1, None)
    kinds = job_events(S, below)
    assert kinds[-1] == ("status", {"status": "queued", "error": None})
    assert "on gpu-7 stopped responding" in kinds[-2][1]["message"] and "attempt 1 of 3" in kinds[-2][1]["message"]
    assert row(S, legacy).status == "queued"
    assert row(S, alive).status == "running" and job_events(S, alive) == []
    j = row(S, cancelling)
    assert j.status == "cancelled" and "stopped responding" in j.error
    assert row(S, queued).status == "queued" and row(S, queued).celery_task_id == "old-task"

    # nothing left to do; the re-queued jobs reach the broker (here: the embedded queue's folder)
    assert not reaper.reap(S, settings)
    sent = reaper.send_unsent(S, settings)
    assert sorted(sent) == [below, legacy]
    in_broker = reaper.broker_task_ids(settings)
    assert {row(S, below).celery_task_id, row(S, legacy).celery_task_id} <= in_broker
    assert reaper.send_unsent(S, settings) == []  # sent once


def test_serve_start_up_requeues_the_embedded_workers_orphans(db):
    """`graft serve` with the embedded queue: its worker is its child, so any running job lost it, however
    fresh the heartbeat; still bounded by GRAFT_MAX_ATTEMPTS. Every queued job is (re)sent."""
    from cli.server import requeue_orphans

    settings, S, ids = db
    fresh, worn_out = make_job(S, ids, attempts=1, heartbeat_age=1), make_job(S, ids, attempts=3, heartbeat_age=1)
    requeue_orphans(S, settings)
    j = row(S, fresh)
    assert j.status == "queued" and j.celery_task_id in reaper.broker_task_ids(settings)
    assert "stopped before the job finished: job re-queued after attempt 1 of 3" in job_events(S, fresh)[0][1]["message"]
    j = row(S, worn_out)
    assert j.status == "failed" and "stopped before the job finished 3 times" in j.error


def test_reapers_racing_requeue_each_job_once(db):
    """Four reapers at once over the same stale jobs: each job is re-queued exactly once."""
    settings, S, ids = db
    jobs = [make_job(S, ids, attempts=1) for _ in range(6)]
    reports, barrier = [], threading.Barrier(4)

    def go():
        barrier.wait()
        reports.append(reaper.reap(S, settings))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    requeued = sorted(j for r in reports for j in r.requeued)
    assert requeued == jobs
    for jid in jobs:
        assert [d["status"] for k, d in job_events(S, jid) if k == "status"] == ["queued"]


def test_a_slow_worker_whose_job_was_taken_stops_and_writes_nothing(db):
    """The reaper re-queued the job of a worker that was only slow (its heartbeat late), and another worker
    started it: the slow run's reporter says stop, and none of its writes land."""
    settings, S, ids = db
    jid = make_job(S, ids, attempts=1)
    slow = Reporter(S, jid, interval=0, attempt=1)
    assert reaper.reap(S, settings).requeued == [jid]
    with S() as s:  # another worker claims it
        s.execute(update(Job).where(Job.id == jid).values(status="running", attempts=Job.attempts + 1,
                                                          heartbeat_at=utcnow()))
        s.commit()
    before = row(S, jid)
    assert slow.should_stop() and slow.lost

    from domain.callbacks import EpochMetric as EngineEpoch

    slow.on_epoch_end(EngineEpoch(1, "full", 0.5, 0.5, 0.5, 0.5, 1e-3, 10.0, 1.0, 1.0, 1.0, True))
    slow.on_message("from the slow worker")
    assert _finish(S, jid, "succeeded", None, {"x": 1}, attempt=1) is False
    after = row(S, jid)
    assert (after.status, after.attempts, after.result, after.current_epoch) == ("running", 2, None, 0)
    assert after.heartbeat_at == before.heartbeat_at
    with S() as s:
        assert s.scalar(select(func.count()).select_from(EpochMetric).where(EpochMetric.job_id == jid)) == 0
    assert not [d for k, d in job_events(S, jid) if k == "message" and "slow worker" in d["message"]]

    # the new owner's heartbeat thread keeps the row fresh; the old one's stops at once
    new = Reporter(S, jid, interval=0, attempt=2)
    hb_new, hb_old = Heartbeat(new, 0.05), Heartbeat(Reporter(S, jid, interval=0, attempt=1), 0.05)
    hb_new.start(), hb_old.start()
    time.sleep(0.4)
    hb_new.stop(), hb_old.stop()
    assert row(S, jid).heartbeat_at > before.heartbeat_at
    assert hb_old.reporter.lost and not new.lost
    assert _finish(S, jid, "succeeded", None, {"x": 1}, attempt=2) is True


# --- 3. Redis lost the queue; Redis unreachable when a job was created --------------------------------------------


@pytest.mark.slow
def test_jobs_survive_a_redis_that_lost_its_queue_and_one_that_was_down(tmp_path: Path, tiny_slice: Path):
    """Job A is queued, then Redis loses everything (FLUSHDB: a restart without persistence). Job B is
    created while the broker cannot be reached (503, saved queued). A worker starting afterwards runs both,
    each exactly once."""
    try:
        import redis

        r = redis.Redis.from_url(REDIS_FAULTS_URL, socket_connect_timeout=2, socket_timeout=5)
        r.ping()
        r.flushdb()
    except Exception as e:
        unreachable(f"Redis at {REDIS_FAULTS_URL}", e)
    stack = build_stack("redis-faults", tmp_path, None, REDIS_FAULTS_URL, with_worker=False, export_formats=EXPORTS)
    down_settings = Settings(_env_file=None, data_dir=stack.settings.data_dir, database_url=stack.settings.db_url,
                             broker_url=DEAD_BROKER)
    try:
        with stack.log_on_failure():
            ds = stack.upload(tiny_slice)
            a = stack.submit(ds["id"], **TINY_RUN)["id"]
            assert r.llen("graft") == 1
            r.flushdb()  # Redis restarted and lost the queue
            assert r.llen("graft") == 0 and r.dbsize() == 0

            # the API of a web server that cannot reach the broker: 503, the job is kept
            with TestClient(create_app(down_settings), headers=stack.client.headers) as down:
                resp = down.post("/api/v1/jobs", json={"dataset_id": ds["id"], **TINY_RUN})
            assert resp.status_code == 503, resp.text
            assert "stays queued" in resp.json()["error"]["message"]
            b = resp.json()["error"]["details"]["job_id"]
            assert row(stack, b).status == "queued" and row(stack, b).celery_task_id is None

            w = start_worker(stack, tmp_path / "w")
            for jid in (a, b):
                stack.wait(jid, "succeeded")
            log = w.log()
            assert f"job {a} was queued but the broker had lost its message: sent it again" in log
            for jid in (a, b):
                # ran exactly once: one start, one set of metrics
                assert statuses(stack, jid) == ["queued", "running", "succeeded"], history(stack, jid)
                assert metric_epochs(stack, jid) == [1, 2]
                assert row(stack, jid).attempts == 1
    finally:
        close_stack(stack)
        try:
            r.flushdb()
            r.close()
        except Exception:
            pass


def test_reconciler_resends_only_what_the_broker_lost(db):
    """A queued job whose message is in the broker is left alone; one whose message is gone is sent again
    after it was missing at two looks in a row, once, even with two reconcilers."""
    settings, S, ids = db
    kept, lost = make_job(S, ids, status="queued", attempts=0), make_job(S, ids, status="queued", attempts=0)
    for jid in (kept, lost):
        with S() as s:
            s.execute(update(Job).where(Job.id == jid).values(celery_task_id=None))
            s.commit()
    assert sorted(reaper.send_unsent(S, settings)) == [kept, lost]
    # the broker loses one message file
    lost_tid = row(S, lost).celery_task_id
    (f,) = [p for p in (settings.broker_dir / "queue").glob("*.msg") if lost_tid in p.read_text()]
    f.unlink()
    one, two = reaper.Reconciler(settings), reaper.Reconciler(settings)
    assert one.tick()["resent"] == [] and two.tick()["resent"] == []  # missing once: maybe in flight
    assert one.tick()["resent"] == [lost]
    assert two.tick()["resent"] == []  # its task id changed: the other reconciler sent it
    assert row(S, lost).celery_task_id != lost_tid
    assert row(S, lost).celery_task_id in reaper.broker_task_ids(settings)
    assert one.tick()["resent"] == [] and one.tick()["resent"] == []


# --- 4. out of GPU memory -------------------------------------------------------------------------------------


class FakeOOM:
    """GraftNet.forward raising torch.OutOfMemoryError for training batches larger than `limit` images,
    from the `after`-th such call on (so that the epoch has already taken optimizer steps)."""

    def __init__(self, monkeypatch, limit: int, after: int = 0):
        from worker.engine.backbones import GraftNet

        self.limit, self.after, self.calls, self.raised = limit, after, 0, 0
        forward = GraftNet.forward

        def patched(net, x):
            if net.training and x.shape[0] > self.limit:
                self.calls += 1
                if self.calls > self.after:
                    self.raised += 1
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
            return forward(net, x)

        monkeypatch.setattr(GraftNet, "forward", patched)


def _steps(out: Path) -> int:
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return ck["scheduler"]["last_epoch"]


def test_out_of_memory_retries_the_epoch_with_half_the_batch(tiny_slice: Path, tmp_path: Path, monkeypatch):
    """Out of memory after two optimizer steps of the first epoch: the epoch starts over from its saved
    state with batch 2 x 2 accumulation, says so, and the run is exactly the one that used 2 x 2 from the
    start (same steps per epoch, same weights, same metrics)."""
    from support.recorder import Recorder

    from domain.spec import RunSpec
    from worker.engine.runner import Runner

    spec = RunSpec(strategy="full", epochs=2, image_size=64, batch_size=4, patience=None)
    oom = FakeOOM(monkeypatch, limit=2, after=2)
    rec = Recorder()
    res = Runner(spec, tiny_slice, tmp_path / "oom", rec).run()
    assert res.status == "completed" and oom.raised == 1
    msg = "out of memory at batch size 4: retrying the epoch with batch 2 x 2 accumulation"
    assert [m for m in rec.messages if "out of memory" in m] == [msg]
    assert [m.epoch for m in rec.epochs] == [1, 2]  # epoch 1 reported once
    steps_per_epoch = math.ceil(12 / 4)  # tiny_slice: 12 train images
    assert _steps(tmp_path / "oom") == 2 * steps_per_epoch  # the effective batch is unchanged

    monkeypatch.undo()
    ref_runner = Runner(spec, tiny_slice, tmp_path / "ref")
    ref_runner.accum = 2
    ref = ref_runner.run()
    assert _steps(tmp_path / "ref") == 2 * steps_per_epoch
    assert [m.val_loss for m in res.history] == pytest.approx([m.val_loss for m in ref.history], abs=1e-5)
    assert [m.train_loss for m in res.history] == pytest.approx([m.train_loss for m in ref.history], abs=1e-5)


def test_out_of_memory_in_a_worker_job_is_in_the_jobs_log(tmp_path: Path, tiny_slice: Path, monkeypatch):
    """The same through the worker's code (in this process): the retry message is a job event, the job
    succeeds; with no memory even for one image, the job fails with a message that says what to do."""
    stack = build_stack("oom", tmp_path, None, None, with_worker=False, export_formats=EXPORTS)
    try:
        ds = stack.upload(tiny_slice)
        jid = stack.submit(ds["id"], strategy="full", epochs=1, image_size=64, batch_size=8)["id"]
        FakeOOM(monkeypatch, limit=3)
        assert execute(jid, stack.settings) == "succeeded"
        assert [m for m in messages(stack, jid) if "out of memory" in m] == [
            "out of memory at batch size 8: retrying the epoch with batch 4 x 2 accumulation",
            "out of memory at batch size 4: retrying the epoch with batch 2 x 4 accumulation"]
        assert statuses(stack, jid) == ["queued", "running", "succeeded"]

        hopeless = stack.submit(ds["id"], strategy="full", epochs=1, image_size=64, batch_size=2)["id"]
        FakeOOM(monkeypatch, limit=0)
        assert execute(hopeless, stack.settings) == "failed"
        job = stack.job(hopeless)
        assert job["error"].startswith("out of memory even with one image at a time")
        assert "smaller image_size or backbone" in job["error"]
    finally:
        close_stack(stack)


# --- 5. cancel whatever the state ------------------------------------------------------------------------------


def test_cancel_a_job_whose_worker_is_dead_via_the_api(tmp_path: Path):
    """Running with a heartbeat older than the timeout: POST /cancel finalizes it at once. A job re-queued by
    the reaper is cancelled at once too; a finished one answers 409."""
    stack = build_stack("cancel-dead", tmp_path, None, None, with_worker=False)
    try:
        with stack.sessions() as s:
            user = s.scalar(select(User).where(User.name == "queue-cancel-dead"))
            ds = Dataset(owner_id=user.id, name="d", path="datasets/none")
            s.add(ds)
            s.commit()
            ids = (user.id, ds.id)
        dead = make_job(stack.sessions, ids, attempts=1, heartbeat_age=600)
        r = stack.client.post(f"/api/v1/jobs/{dead}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled" and "stopped responding" in r.json()["error"]
        assert stack.client.post(f"/api/v1/jobs/{dead}/cancel").status_code == 409

        alive = make_job(stack.sessions, ids, attempts=1, heartbeat_age=1)
        r = stack.client.post(f"/api/v1/jobs/{alive}/cancel")
        assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True  # its worker stops it

        requeued = make_job(stack.sessions, ids, attempts=1)
        assert reaper.reap(stack.sessions, stack.settings).requeued == [requeued]
        r = stack.client.post(f"/api/v1/jobs/{requeued}/cancel")
        assert r.json()["status"] == "cancelled" and r.json()["error"] == "cancelled on request"
    finally:
        close_stack(stack)


@pytest.mark.slow
def test_cancel_a_job_whose_worker_was_killed(tmp_path: Path, tiny_slice: Path):
    """The worker is SIGKILLed while training; the cancel arrives before its heartbeat is late. The next
    worker's reaper finalizes the job as cancelled, and never runs it again."""
    stack = build_stack("cancel-killed", tmp_path, None, None, with_worker=False)
    try:
        w1 = start_worker(stack, tmp_path / "w1")
        with stack.log_on_failure():
            ds = stack.upload(tiny_slice)
            jid = stack.submit(ds["id"], **{**LONG_RUN, "epochs": 200})["id"]
            wait_for(stack, jid, lambda j: j["stage"] == "train", "training")
            sigkill(w1)
            r = stack.client.post(f"/api/v1/jobs/{jid}/cancel")
            assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["cancel_requested"]
            w2 = start_worker(stack, tmp_path / "w2")
            job = stack.wait(jid, "cancelled", timeout=30)
            assert "stopped responding" in job["error"]
            assert statuses(stack, jid) == ["queued", "running", "cancelled"]
            assert row(stack, jid).attempts == 1
            assert "Task graft.run_job" not in w2.log()  # nothing was sent to it
    finally:
        close_stack(stack)
