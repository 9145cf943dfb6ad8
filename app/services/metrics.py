"""Operations metrics in the Prometheus text format (prometheus-client), for GET /metrics.

What the database knows is read when Prometheus scrapes, so every web process answers the same figures:
jobs by status and kind, the queue's length, busy workers (running jobs whose heartbeat is fresh, by worker),
job and epoch durations as histograms over the finished jobs and the epochs recorded. What only a process
knows is counted by that process: request latencies by route template, method and status class, and upload
bytes received. (With several web processes, Prometheus sums those over the processes it scrapes.)
Torch-free."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import EpochMetric, Job, JobStatus
from app.services.lifecycle import last_sign_of_life
from domain.clock import utcnow

JOB_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)
EPOCH_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DatabaseCollector(Collector):
    """The figures the database holds, read at each scrape."""

    def __init__(self, sessions: sessionmaker[Session], heartbeat_timeout_s: float):
        self.sessions, self.timeout = sessions, heartbeat_timeout_s

    def collect(self) -> Iterator[Any]:
        with self.sessions() as s:
            jobs = GaugeMetricFamily("graft_jobs", "Jobs by status and kind", labels=["status", "kind"])
            seen = set()
            for status, kind, n in s.execute(select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)):
                jobs.add_metric([status, kind], n)
                seen.add((status, kind))
            for status in JobStatus:
                if (status.value, "train") not in seen:
                    jobs.add_metric([status.value, "train"], 0)
            yield jobs
            queued = s.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.queued.value))
            yield GaugeMetricFamily("graft_queue_length", "Jobs waiting for a worker", value=queued or 0)
            cutoff = utcnow().timestamp() - self.timeout
            busy = GaugeMetricFamily("graft_workers_busy", "Workers running a job whose heartbeat is fresh "
                                     "(GRAFT_HEARTBEAT_TIMEOUT_S), by worker host", labels=["worker"])
            running = s.execute(select(Job.worker, last_sign_of_life()).where(Job.status == JobStatus.running.value))
            per: dict[str, int] = {}
            for worker, last in running:
                if last is not None and _ts(last) >= cutoff:
                    per[worker or "unknown"] = per.get(worker or "unknown", 0) + 1
            for worker, n in sorted(per.items()):
                busy.add_metric([worker], n)
            yield busy
            yield _histogram(s, "graft_job_duration_seconds", "Wall time of finished jobs, start to end",
                             func.coalesce(_seconds(Job.finished_at) - _seconds(Job.started_at), 0.0),
                             and_(Job.finished_at.is_not(None), Job.started_at.is_not(None)), JOB_BUCKETS, Job)
            yield _histogram(s, "graft_epoch_duration_seconds", "Wall time of training epochs", EpochMetric.seconds,
                             EpochMetric.id.is_not(None), EPOCH_BUCKETS, EpochMetric)


def _ts(t: Any) -> float:
    from domain.clock import as_utc

    return as_utc(t).timestamp()


def _seconds(column: Any) -> Any:
    """A timestamp column as seconds since the epoch, in SQL (PostgreSQL and SQLite)."""
    return func.extract("epoch", column)


def _histogram(s: Session, name: str, doc: str, value: Any, where: Any, buckets: tuple, model: Any) -> Any:
    """A cumulative histogram over the rows, counted by the database (one query)."""
    cols = [func.sum(case((value <= b, 1), else_=0)) for b in buckets]
    row = s.execute(select(func.count(), func.coalesce(func.sum(value), 0.0), *cols).select_from(model)
                    .where(where)).one()
    count, total = int(row[0] or 0), float(row[1] or 0.0)
    pairs = [(str(float(b)), int(n or 0)) for b, n in zip(buckets, row[2:])] + [("+Inf", count)]
    return HistogramMetricFamily(name, doc, buckets=pairs, sum_value=total)


class Metrics:
    """One app's registry: the database collector and the process's own counters."""

    def __init__(self, sessions: sessionmaker[Session], heartbeat_timeout_s: float):
        self.registry = CollectorRegistry()
        self.registry.register(DatabaseCollector(sessions, heartbeat_timeout_s))
        self.requests = Histogram("graft_http_request_duration_seconds", "Request latency by route",
                                  ["method", "route", "status"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.upload_bytes = Counter("graft_upload_bytes", "Bytes of dataset uploads received by this process",
                                    registry=self.registry)

    def observe(self, method: str, route: str, status: int, started: float) -> None:
        self.requests.labels(method, route, f"{status // 100}xx").observe(time.perf_counter() - started)
