"""Celery tasks. "A task is much like a web view": it handles delivery; the logic is in worker.runjob."""
from __future__ import annotations

from worker.celery_app import RUN_JOB, celery_app, configure

configure()


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: int) -> str:
    from worker.runjob import execute

    return execute(int(job_id))
