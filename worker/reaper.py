"""Jobs that survive faults: the database is the record, the broker only a way to wake a worker up.

Two duties, run by every worker in a background thread (`Maintenance`), by `graft serve` at start-up and
by `graft reconcile` on demand. Torch-free, so the web tier's CLI can import it.

* The reaper: a job 'running' whose heartbeat is older than GRAFT_HEARTBEAT_TIMEOUT_S lost its worker
  (killed, out of memory, machine gone). It is put back in the queue (it resumes from its last checkpoint)
  unless it has been started GRAFT_MAX_ATTEMPTS times already, then it is marked failed with a message that
  says so; a job whose cancel was asked for is marked cancelled. Every change is a conditional UPDATE on
  (status, attempts, heartbeat), so two reapers never re-queue a job twice, and a worker that was merely
  slow finds its row changed and stops (worker.runjob checks that it still owns the row).
* The reconciler: a queued job that the broker does not have is sent again: jobs saved while the broker
  was down (no task id), and jobs whose message the broker lost (Redis restarted without persistence, a
  message file removed). A message is taken as lost when it is missing from the broker at two inspections
  in a row. Sending twice is harmless: the worker's claim is a conditional update, a duplicate is skipped.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import uuid
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.settings import Settings, get_settings
from app.db.models import Job, JobStatus
from app.db.session import session_factory
from app.services import lifecycle
from app.services.lifecycle import last_sign_of_life
from domain.clock import utcnow

log = logging.getLogger(__name__)


# a job younger than this without a task id is probably being sent by the web app right now
SEND_GRACE_S = 5.0




lost_message = lifecycle.lost_message  # (tests and `graft serve` read the message from here)


@dataclass
class ReapReport:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.cancelled)


def reap(S: sessionmaker[Session], settings: Settings, stale_after_s: float | None = None,
         now: dt.datetime | None = None, exclude: set[int] | frozenset[int] = frozenset()) -> ReapReport:
    """Re-queue, fail or cancel every running job whose heartbeat is older than `stale_after_s` (default
    GRAFT_HEARTBEAT_TIMEOUT_S), but those in `exclude` (run by this very process). Re-queued jobs get no
    task id: `send_unsent` sends them."""
    timeout = settings.heartbeat_timeout_s if stale_after_s is None else stale_after_s
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=timeout)
    report = ReapReport()
    with S() as s:
        rows = s.execute(select(Job.id, Job.attempts, Job.cancel_requested, Job.worker)
                         .where(Job.status == JobStatus.running.value, last_sign_of_life() < cutoff)
                         .order_by(Job.id)).all()
    for jid, attempts, cancel_requested, worker in rows:
        if jid in exclude:
            continue
        with S() as s:
            outcome = lifecycle.reap_stale(s, jid, attempts, bool(cancel_requested), worker, cutoff, now,
                                           settings.max_attempts, timeout)
            s.commit()
        if outcome is not None:
            getattr(report, outcome).append(jid)
    with S() as s:
        stuck = s.scalars(select(Job.id).where(Job.status == JobStatus.queued.value,
                                               Job.cancel_requested.is_(True))).all()
        report.cancelled += [jid for jid in stuck if lifecycle.cancel_queued_with_request(s, jid, now)]
        s.commit()
    for kind in ("requeued", "failed", "cancelled"):
        ids = getattr(report, kind)
        if ids:
            log.warning("lost worker: job(s) %s %s", ", ".join(map(str, ids)), kind)
    return report


def send_job(S: sessionmaker[Session], settings: Settings, jid: int, old_task_id: str | None) -> bool:
    """Send job `jid` with a new task id, if its row is still queued with `old_task_id` (a conditional
    update first, so that two reconcilers never both send it). On broker trouble the row gets no task id
    again (the next round retries) and the error is raised."""
    from app.services.queue import enqueue_job

    task_id = str(uuid.uuid4())
    cond = Job.celery_task_id.is_(None) if old_task_id is None else Job.celery_task_id == old_task_id
    with S() as s:
        n = lifecycle.changed(s, update(Job).where(Job.id == jid, Job.status == JobStatus.queued.value,
                                                   Job.cancel_requested.is_(False), cond)
                              .values(celery_task_id=task_id))
        s.commit()
    if not n:
        return False
    try:
        enqueue_job(jid, settings, task_id=task_id)
    except Exception:
        with S() as s:
            s.execute(update(Job).where(Job.id == jid, Job.celery_task_id == task_id).values(celery_task_id=None))
            s.commit()
        raise
    return True


def send_unsent(S: sessionmaker[Session], settings: Settings, ids: list[int] | None = None,
                older_than_s: float = 0.0) -> list[int]:
    """Send every queued job that has no task id (never reached the broker, or re-queued), created more
    than `older_than_s` ago (the web app saves a job, then sends it: leave it the time to)."""
    q = select(Job.id).where(Job.status == JobStatus.queued.value, Job.celery_task_id.is_(None),
                             Job.cancel_requested.is_(False)).order_by(Job.id)
    if ids is not None:
        q = q.where(Job.id.in_(ids))
    if older_than_s:
        q = q.where(Job.created_at < utcnow() - dt.timedelta(seconds=older_than_s))
    with S() as s:
        todo = s.scalars(q).all()
    return [jid for jid in todo if send_job(S, settings, jid, None)]


def broker_task_ids(settings: Settings) -> set[str] | None:
    """The task ids of the job messages the broker holds (waiting or delivered and not yet acknowledged),
    or None when this kind of broker cannot be inspected."""
    from app.services.queue import QUEUE, configure

    broker = settings.broker
    ids: set[str] = set()
    if broker.startswith("filesystem"):
        folder = settings.broker_dir / "queue"
        for p in folder.glob(f"*.{QUEUE}.msg"):
            try:
                ids.add(json.loads(p.read_bytes())["headers"]["id"])
            except FileNotFoundError:  # taken by a worker meanwhile
                continue
            except (ValueError, KeyError, TypeError, OSError):
                log.warning("unreadable message file %s", p)
        return ids
    if broker.startswith(("redis", "rediss")):
        app = configure(settings)
        with app.connection_for_write() as conn:
            ch = conn.default_channel
            client = ch.client
            keys = [ch._q_for_pri(QUEUE, p) for p in ch.priority_steps]
            raw = [m for k in keys for m in client.lrange(k, 0, -1)]
            for m in raw:
                try:
                    ids.add(json.loads(m)["headers"]["id"])
                except (ValueError, KeyError, TypeError):
                    continue
            for v in client.hvals(ch.unacked_key):
                try:
                    ids.add(json.loads(v)[0]["headers"]["id"])
                except (ValueError, KeyError, TypeError, IndexError):
                    continue
        return ids
    return None


class Reconciler:
    """One round (`tick`): reap lost jobs, send unsent ones, send again the ones whose message the broker
    lost. Remembers what was missing from the broker last round (a message missing twice is lost)."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.S = session_factory(self.settings.db_url)
        self.missing: dict[int, str] = {}

    def tick(self) -> dict:
        out: dict[str, list[int]] = {"requeued": [], "failed": [], "cancelled": [], "sent": [], "resent": []}
        from worker.attempt import ACTIVE

        r = reap(self.S, self.settings, exclude=set(ACTIVE))
        out.update(requeued=r.requeued, failed=r.failed, cancelled=r.cancelled)
        out["sent"] = send_unsent(self.S, self.settings, older_than_s=SEND_GRACE_S)
        if out["sent"]:
            log.info("sent job(s) %s that were queued without a message", ", ".join(map(str, out["sent"])))
        out["resent"] = self._resend_lost(set(ACTIVE))
        return out

    def _resend_lost(self, exclude: set[int]) -> list[int]:
        known = broker_task_ids(self.settings)  # first the broker, then the rows: see the note below
        if known is None:
            return []
        with self.S() as s:
            rows = s.execute(select(Job.id, Job.celery_task_id).where(
                Job.status == JobStatus.queued.value, Job.celery_task_id.is_not(None),
                Job.cancel_requested.is_(False))).all()
        # a job queued now whose message was not in the broker a moment ago: lost, or delivered in between
        # (then it is no longer queued next round). Missing twice in a row with the same task id: lost.
        missing: dict[int, str] = {jid: tid for jid, tid in rows if tid is not None and tid not in known
                                   and jid not in exclude}
        resent = []
        for jid, tid in missing.items():
            if self.missing.get(jid) == tid and send_job(self.S, self.settings, jid, tid):
                log.warning("job %s was queued but the broker had lost its message: sent it again", jid)
                resent.append(jid)
        self.missing = {j: t for j, t in missing.items() if j not in resent}
        return resent


class Maintenance(threading.Thread):
    """The reconciler every GRAFT_RECONCILE_INTERVAL_S seconds, in a worker, until `stop()`. It never
    dies of an error: the database or the broker may be down for a while."""

    def __init__(self, settings: Settings | None = None):
        super().__init__(name="graft-maintenance", daemon=True)
        self.settings = settings or get_settings()
        self._stop_event = threading.Event()
        self._last_error: str | None = None

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        reconciler = None
        while True:
            try:
                reconciler = reconciler or Reconciler(self.settings)
                reconciler.tick()
                self._last_error = None
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                if msg != self._last_error:  # say it once, not every round
                    log.warning("job maintenance failed (retrying every %.0f s): %s",
                                self.settings.reconcile_interval_s, msg)
                self._last_error = msg
            if self._stop_event.wait(self.settings.reconcile_interval_s):
                return
