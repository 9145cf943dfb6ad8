"""One attempt at a job, as the worker bridge runs it: the reporter that writes its progress and metrics, the
heartbeat that renews its claim, and the writes that end it (finish, release, stopped), every one
conditional on (job id, attempt). Shared by every job kind (worker.runjob, worker.probejob) and read by
the reconciler (worker.reaper: ACTIVE); it imports none of them."""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import EpochMetric, Job, JobEvent, JobStatus
from domain.callbacks import BatchProgress, Callbacks
from domain.callbacks import EpochMetric as EngineEpoch

log = logging.getLogger(__name__)

# set (from a signal handler: a plain assignment) when this worker is shutting down
_shutting_down = False
# the jobs this process has received and is running: its own reconciler never takes them back nor sends
# them again (the process is alive, however late their heartbeat)
ACTIVE: set[int] = set()


def request_shutdown() -> None:
    global _shutting_down
    _shutting_down = True


def shutting_down() -> bool:
    return _shutting_down


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def add_event(s: Session, job_id: int, kind: str, data: dict) -> None:
    s.add(JobEvent(job_id=job_id, kind=kind, data=data))


def owned(job_id: int, attempt: int | None) -> tuple:
    """The WHERE clause of a write by run `attempt` of job `job_id` (any run when attempt is None)."""
    if attempt is None:
        return (Job.id == job_id,)
    return (Job.id == job_id, Job.status == JobStatus.running.value, Job.attempts == attempt)


# Share of the progress bar for the training run; the exports (TorchScript, ONNX and its check) fill the rest.
TRAIN_SHARE = 0.95


class Reporter(Callbacks):
    """Engine callbacks -> rows. Batch progress is written at most every `interval` seconds; the cancel
    flag (and whether this run still owns the job) is read at most once a second. With an `attempt`, every
    write is conditional on the row still belonging to that run; once it does not, `lost` is set, nothing
    more is written and `should_stop` says stop."""

    def __init__(self, sessions: sessionmaker[Session], job_id: int, interval: float = 2.0,
                 attempt: int | None = None):
        self.S, self.job_id, self.interval, self.attempt = sessions, job_id, interval, attempt
        self._last_write = 0.0
        self._last_poll = 0.0
        self._stop = False
        self.cancelled = False
        self.lost = False
        self.total_epochs = 0
        self.epochs_done = 0
        self.shown = 0.0  # the progress last written: the bar never moves backwards

    def _forward(self, fraction: float) -> float:
        # ETA-based fractions can dip when a stage turns out slower than estimated: hold the bar instead.
        # The training run fills TRAIN_SHARE of the bar; the exports after it fill the rest.
        self.shown = max(self.shown, round(min(fraction, 1.0) * TRAIN_SHARE, 4))
        return self.shown

    def _update(self, **values) -> None:
        if self.lost:
            return
        with self.S() as s:
            n = s.execute(update(Job).where(*owned(self.job_id, self.attempt))
                          .values(heartbeat_at=utcnow(), **values)).rowcount
            s.commit()
        if not n:
            self._lose()

    def _lose(self) -> None:
        if not self.lost:
            log.warning("job %s (attempt %s) no longer belongs to this worker: stopping it", self.job_id,
                        self.attempt)
        self.lost = True

    def _owns(self, s: Session) -> bool:
        if self.lost:
            return False
        if self.attempt is not None and not s.scalar(select(Job.id).where(*owned(self.job_id, self.attempt))):
            self._lose()
        return not self.lost

    def on_start(self, info: dict) -> None:
        self.total_epochs = info["epochs"]
        self._update(total_epochs=info["epochs"], stage="decode")

    def on_message(self, message: str) -> None:
        with self.S() as s:
            if self._owns(s):
                add_event(s, self.job_id, "message", {"message": message})
                s.commit()

    def on_progress(self, p: BatchProgress) -> None:
        now = time.monotonic()
        if now - self._last_write < self.interval:
            return
        self._last_write = now
        self._update(progress=self._forward(p.fraction), stage=p.stage, eta_seconds=round(p.eta, 1),
                     current_epoch=max(p.epoch - 1, self.epochs_done) if p.stage in ("train", "val") else 0)

    def on_epoch_end(self, m: EngineEpoch) -> None:
        d = m.to_dict()
        self.epochs_done = max(self.epochs_done, m.epoch)
        with self.S() as s:
            best = s.scalar(select(Job.best_val_acc).where(Job.id == self.job_id))
            values = dict(current_epoch=m.epoch, eta_seconds=round(m.eta, 1), heartbeat_at=utcnow(), stage="train",
                          progress=self._forward(m.elapsed / (m.elapsed + m.eta) if m.elapsed + m.eta else 0))
            if m.is_best or best is None:
                values["best_val_acc"] = m.val_acc
            # the row first: when this run no longer owns it, nothing of this epoch is written
            if self.lost or not s.execute(update(Job).where(*owned(self.job_id, self.attempt))
                                          .values(**values)).rowcount:
                s.rollback()
                self._lose()
                return
            existing = s.scalar(select(EpochMetric).where(EpochMetric.job_id == self.job_id,
                                                          EpochMetric.epoch == m.epoch))
            if existing is None:  # a resumed run may report an epoch again
                s.add(EpochMetric(job_id=self.job_id, **d))
            add_event(s, self.job_id, "epoch", d)
            s.commit()
        self._last_write = time.monotonic()

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._last_poll >= 1.0:
            self._last_poll = now
            with self.S() as s:
                self.cancelled = bool(s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
                if not self.cancelled:
                    self._owns(s)
            self._stop = self.cancelled or self.lost
        return self._stop or self.lost or shutting_down()


class Heartbeat(threading.Thread):
    """Renews the running job's heartbeat every `every` seconds, whatever the engine is doing (a long
    batch, decoding, an export). A failed renewal (database away) is retried; a row that no longer belongs
    to the run tells the reporter, which stops the run."""

    def __init__(self, reporter: Reporter, every: float):
        super().__init__(name=f"graft-heartbeat-{reporter.job_id}", daemon=True)
        self.reporter, self.every = reporter, every
        self._done = threading.Event()

    def run(self) -> None:
        r = self.reporter
        while not self._done.wait(self.every) and not r.lost:
            try:
                with r.S() as s:
                    n = s.execute(update(Job).where(*owned(r.job_id, r.attempt))
                                  .values(heartbeat_at=utcnow())).rowcount
                    s.commit()
                if not n:
                    r._lose()
            except Exception as e:
                log.warning("could not renew the heartbeat of job %s: %s", r.job_id, e)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def _finish(S: sessionmaker[Session], job_id: int, status: str, error: str | None = None,
            result: dict | None = None, attempt: int | None = None) -> bool:
    """Record the outcome, if the row still belongs to run `attempt`. Returns whether it did."""
    with S() as s:
        values = dict(status=status, error=error, finished_at=utcnow(), heartbeat_at=utcnow(), stage=None)
        if status == JobStatus.succeeded.value:
            values.update(progress=1.0, eta_seconds=0.0)
        if result is not None:
            values["result"] = result
        if not s.execute(update(Job).where(*owned(job_id, attempt)).values(**values)).rowcount:
            log.warning("job %s (attempt %s) no longer belongs to this worker: its outcome (%s) is not recorded",
                        job_id, attempt, status)
            return False
        add_event(s, job_id, "status", {"status": status, "error": error})
        s.commit()
        return True


def _release(S: sessionmaker[Session], job_id: int, attempt: int, epoch: int) -> bool:
    """This worker is shutting down: put the job back in the queue (the attempt does not count); it
    continues from its last checkpoint on the next worker. False if the run no longer owns the job, or a
    cancel was asked for (then it is cancelled, not released)."""
    with S() as s:
        n = s.execute(update(Job).where(*owned(job_id, attempt), Job.cancel_requested.is_(False)).values(
            status=JobStatus.queued.value, attempts=Job.attempts - 1, celery_task_id=None, stage=None,
            eta_seconds=None)).rowcount
        if not n:
            return False
        after = f"after epoch {epoch}" if epoch else "from the start"
        add_event(s, job_id, "message", {"message": f"the worker is shutting down: job put back in the queue; "
                                                    f"it continues {after} on the next worker"})
        add_event(s, job_id, "status", {"status": JobStatus.queued.value, "error": None})
        s.commit()
    # no task id: another worker's reconciler sends it (not this one: its consumer may still take it)
    return True


def call_engine(S: sessionmaker[Session], job_id: int, attempt: int, what: str, call) -> tuple[object, str | None]:
    """(the engine's result, None), or (None, the outcome) when it raised: a GraftError (bad data or spec)
    fails the job with its message; anything else is a bug or an environment problem, said as such, and the
    worker stays alive."""
    from domain.errors import GraftError

    try:
        return call(), None
    except GraftError as e:
        ok = _finish(S, job_id, JobStatus.failed.value, str(e), attempt=attempt)
    except Exception as e:
        log.exception("%s %s crashed", what, job_id)
        retry = "the comparison" if what == "probe job" else "the job"
        ok = _finish(S, job_id, JobStatus.failed.value, f"internal error: {type(e).__name__}: {e}. The worker "
                     f"log has the details; retry {retry} or report the problem.", attempt=attempt)
    return None, "failed" if ok else "superseded"


def stopped(S: sessionmaker[Session], job_id: int, attempt: int, reporter: Reporter, heartbeat,
            epochs_run: int) -> str:
    """The engine stopped early: the run lost the job, the worker is shutting down (the job goes back to
    the queue) or the user cancelled it."""
    if reporter.lost:
        return "superseded"
    if shutting_down():
        heartbeat.stop()
        if _release(S, job_id, attempt, epochs_run):
            return "released"
    ok = _finish(S, job_id, JobStatus.cancelled.value, "cancelled on request", attempt=attempt)
    return "cancelled" if ok else "superseded"


