"""Celery tasks. "A task is much like a web view": it handles delivery; the logic is in worker.runjob."""
from __future__ import annotations

import logging

from celery.signals import worker_ready

from worker.celery_app import RUN_JOB, celery_app, configure

log = logging.getLogger(__name__)
configure()


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: int) -> str:
    from worker.runjob import execute

    return execute(int(job_id))


@worker_ready.connect
def _send_unsent(**_) -> None:
    """Jobs saved while the broker was unreachable have no task id: send them now. A duplicate message
    is harmless (the claim is a conditional update)."""
    from worker.runjob import send_unsent_jobs

    try:
        n = send_unsent_jobs()
        if n:
            log.info("sent %d queued job(s) that had not reached the queue", n)
    except Exception:  # never keep a worker from starting
        log.exception("could not send queued jobs")
