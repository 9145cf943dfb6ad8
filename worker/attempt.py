"""One attempt at a job, as the worker bridge runs it: the reporter that writes its progress and metrics, the
heartbeat that renews its claim, and the writes that end it (finish, release, stopped), every one
conditional on (job id, attempt). Shared by every job kind (worker.runjob, worker.probejob) and read by
the reconciler (worker.reaper: ACTIVE); it imports none of them."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.settings import Settings
from app.db.models import EpochMetric, Job, JobStatus
from app.services import lifecycle
from domain.callbacks import BatchProgress, Callbacks
from domain.callbacks import EpochMetric as EngineEpoch
from domain.clock import utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

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




add_event = lifecycle.record_event
owned = lifecycle.owned


@dataclass
class Attempt:
    """One claimed run of a job, as a job kind's handler gets it (worker.runjob.JOB_KINDS)."""

    sessions: sessionmaker[Session]
    job_id: int
    attempt: int
    reporter: Reporter
    heartbeat: Heartbeat
    spec: dict
    dataset: Path | None  # the dataset's root on this host; None for the kinds that run without it
    settings: Settings

    @property
    def data_dir(self) -> Path:
        """The dataset's root on this host: fetched only for the kinds that read it (worker.runjob.NEEDS_DATASET)."""
        if self.dataset is None:
            raise RuntimeError(f"job {self.job_id}: this kind of job runs without its dataset; list the kind in "
                               "worker.runjob.NEEDS_DATASET to have the dataset fetched for it")
        return self.dataset


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
        self.checkpoint_sink: Callable[[Path, str], object] | None = None  # set by the bridge (object storage)

    def _forward(self, fraction: float) -> float:
        # ETA-based fractions can dip when a stage turns out slower than estimated: hold the bar instead.
        # The training run fills TRAIN_SHARE of the bar; the exports after it fill the rest.
        self.shown = max(self.shown, round(min(fraction, 1.0) * TRAIN_SHARE, 4))
        return self.shown

    def _update(self, **values) -> None:
        if self.lost:
            return
        with self.S() as s:
            n = lifecycle.update_running(s, self.job_id, self.attempt, heartbeat_at=utcnow(), **values)
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
        if not lifecycle.still_owned(s, self.job_id, self.attempt):
            self._lose()
        return not self.lost

    def on_start(self, info: dict) -> None:
        self.total_epochs = info["epochs"]
        self._update(total_epochs=info["epochs"], stage="decode")

    def on_checkpoint(self, path, kind: str) -> None:
        """With object storage, the bridge sets `checkpoint_sink` to copy each checkpoint there."""
        sink = self.checkpoint_sink
        if sink is not None and not self.lost:
            try:
                sink(path, kind)
            except Exception as e:  # a checkpoint that did not reach storage must not stop the run
                log.warning("job %s: could not store checkpoint %s: %s", self.job_id, path, e)

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
            if self.lost or not lifecycle.update_running(s, self.job_id, self.attempt, **values):
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
                    n = lifecycle.update_running(s, r.job_id, r.attempt, heartbeat_at=utcnow())
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
        if not lifecycle.finish(s, job_id, status, error, result, attempt):
            log.warning("job %s (attempt %s) no longer belongs to this worker: its outcome (%s) is not recorded",
                        job_id, attempt, status)
            return False
        s.commit()
        return True


def _release(S: sessionmaker[Session], job_id: int, attempt: int, epoch: int) -> bool:
    """This worker is shutting down: put the job back in the queue (lifecycle.release)."""
    with S() as s:
        if not lifecycle.release(s, job_id, attempt, epoch):
            return False
        s.commit()
    # no task id: another worker's reconciler sends it (not this one: its consumer may still take it)
    return True


def call_engine(S: sessionmaker[Session], job_id: int, attempt: int, what: str,
                call: Callable[[], T]) -> tuple[T | None, str]:
    """(the engine's result, ""), or (None, the outcome) when it raised: a GraftError (bad data or spec)
    fails the job with its message; anything else is a bug or an environment problem, said as such, and the
    worker stays alive."""
    from domain.errors import GraftError

    try:
        return call(), ""
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
    ok = _finish(S, job_id, JobStatus.cancelled.value, lifecycle.CANCELLED, attempt=attempt)
    return "cancelled" if ok else "superseded"


