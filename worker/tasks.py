"""Celery tasks. "A task is much like a web view": it handles delivery; the logic is in worker.runjob."""
from __future__ import annotations

import logging
import mmap
import threading
import time

from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.services.queue import RUN_JOB, celery_app, configure

log = logging.getLogger(__name__)
configure()

_maintenance = None
# `graft worker --concurrency N` (N > 1) runs jobs in prefork pool children, which the worker's SIGTERM does not
# reach: the main process sets this byte of memory, shared with the children it forks, and a thread in each
# child watches it (every STOP_POLL_S)
_STOP = mmap.mmap(-1, 1)
STOP_POLL_S = 0.5


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: int) -> str:
    from worker.runjob import execute

    return execute(int(job_id))


@worker_ready.connect
def _send_unsent(**_) -> None:
    """Jobs saved while the broker was unreachable have no task id: send them now. A duplicate message
    is harmless (the claim is a conditional update). Then keep reaping lost jobs and re-sending lost
    messages in the background (worker.reaper)."""
    global _maintenance
    from worker.reaper import Maintenance
    from worker.runjob import send_unsent_jobs

    try:  # load the engine (torch) now rather than when the first job has been claimed
        import worker.engine.runner  # noqa: F401
    except Exception:
        log.exception("could not load the training engine")
    try:
        n = send_unsent_jobs()
        if n:
            log.info("sent %d queued job(s) that had not reached the queue", n)
    except Exception:  # never keep a worker from starting
        log.exception("could not send queued jobs")
    if _maintenance is None:
        _maintenance = Maintenance()
        _maintenance.start()
        log.info("job maintenance every %.0f s (lost workers after %.0f s without a heartbeat)",
                 _maintenance.settings.reconcile_interval_s, _maintenance.settings.heartbeat_timeout_s)


@worker_process_init.connect
def _watch_for_shutdown(**_) -> None:
    """In each prefork pool child, as it starts: a thread that passes the worker's shutdown on to this process
    (worker.attempt.request_shutdown), so that its running job stops at the next batch and goes back to the
    queue, as in a solo worker."""
    def watch() -> None:
        while not _STOP[0]:
            time.sleep(STOP_POLL_S)
        from worker.attempt import request_shutdown

        request_shutdown()

    threading.Thread(target=watch, name="graft-shutdown-watch", daemon=True).start()


@worker_shutting_down.connect
def _shutting_down(**_) -> None:
    """Runs in the signal handler: only set flags. The running job stops at its next batch and goes back
    to the queue (worker.runjob), in this process and in the pool children (_STOP)."""
    from worker.runjob import request_shutdown

    request_shutdown()
    _STOP[0] = 1
    if _maintenance is not None:
        _maintenance.stop()
