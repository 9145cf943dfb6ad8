"""Running a claimed search for wrong labels (kind "label_issues"): the engine's label-issue finder with the
same reporter, heartbeat, cancel and shutdown handling as a training run (worker.runjob claims the row and
calls this). The features go to (and come from) the worker's feature cache, shared with probes and
`features` runs of the same settings."""
from __future__ import annotations

from app.db.models import JobStatus
from worker.attempt import Attempt, _finish, call_engine, stopped


def run_label_issues(a: Attempt) -> str:
    from domain.spec import LabelIssueSpec
    from worker.engine.labels import find_label_issues

    S, job_id, attempt, reporter, settings = a.sessions, a.job_id, a.attempt, a.reporter, a.settings

    report, outcome = call_engine(S, job_id, attempt, "label-issue job", lambda: find_label_issues(
        a.data_dir, LabelIssueSpec(**a.spec), cache_dir=settings.features_cache_dir, callbacks=reporter,
        max_pixels=settings.max_image_pixels))
    if report is None:
        return outcome
    if report.status == "stopped":
        return stopped(S, job_id, attempt, reporter, a.heartbeat, 0)
    ok = _finish(S, job_id, JobStatus.succeeded.value, None, report.to_json(), attempt=attempt)
    return "succeeded" if ok else "superseded"
