"""The Celery application, configured from Graft's settings. Torch-free: the web tier imports it to
enqueue jobs. The broker only carries job ids; the database is the record."""
from __future__ import annotations

from celery import Celery

from app.core.settings import Settings, get_settings

RUN_JOB = "graft.run_job"
QUEUE = "graft"

celery_app = Celery("graft")
_configured_for: str | None = None


def configure(settings: Settings | None = None) -> Celery:
    """(Re)configure the module's Celery app for these settings; returns it."""
    global _configured_for
    settings = settings or get_settings()
    key = f"{settings.broker}|{settings.data_dir}"
    if _configured_for == key:
        return celery_app
    if _configured_for is not None:
        _drop_connections()
    opts: dict = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
    if settings.broker.startswith("filesystem"):
        settings.ensure_dirs()
        q = str(settings.broker_dir / "queue")
        opts.update(data_folder_in=q, data_folder_out=q, processed_folder=str(settings.broker_dir / "processed"),
                    control_folder=str(settings.broker_dir / "control"), store_processed=False,
                    # how often an idle worker looks in the folder (kombu's default: every second): a job starts
                    # sooner, and a stopped idle worker exits sooner
                    polling_interval=0.2)
    elif settings.broker.startswith(("redis", "rediss")):
        opts.update(visibility_timeout=7 * 24 * 3600, socket_timeout=5, socket_connect_timeout=3)
    celery_app.conf.update(
        broker_url=settings.broker,
        broker_transport_options=opts,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # long jobs: take one at a time, acknowledge only when done, requeue if the worker dies
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    _configured_for = key
    return celery_app


def _drop_connections() -> None:
    """Celery caches its connection and producer pools on first use; after a change of broker (or of the
    filesystem transport's folders) it must look them up again, or messages keep going to the old broker.
    (kombu keeps one pool per broker URL and options, so going back to a broker reuses its pool.)"""
    celery_app._pool = None
    amqp = celery_app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


def enqueue_job(job_id: int, settings: Settings | None = None, task_id: str | None = None) -> str:
    """Send the job id to the queue; returns the task id. Raises on broker trouble (callers map it).
    (Sent to the queue itself, not through an exchange binding, which a restarted Redis may have lost.)"""
    app = configure(settings)
    res = app.send_task(RUN_JOB, args=[job_id], queue=QUEUE, task_id=task_id, retry=True,
                        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1})
    return res.id
