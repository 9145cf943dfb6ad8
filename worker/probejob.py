"""Running a claimed probe job (kind "probe"): the engine's backbone comparison with the same reporter,
heartbeat, cancel and shutdown handling as a training run (worker.runjob claims the row and calls this)."""
from __future__ import annotations

import logging

from app.db.models import JobStatus
from worker.attempt import Attempt, _finish, call_engine, stopped

log = logging.getLogger(__name__)


def run_probe(a: Attempt) -> str:
    from domain.spec import ProbeSpec
    from worker.engine.probe import probe

    S, job_id, attempt, reporter, settings = a.sessions, a.job_id, a.attempt, a.reporter, a.settings

    result, outcome = call_engine(S, job_id, attempt, "probe job", lambda: probe(
        a.data_dir, ProbeSpec(**a.spec), cache_dir=settings.features_cache_dir, callbacks=reporter,
        max_pixels=settings.max_image_pixels))
    if result is None:
        return outcome
    if result.status == "stopped":
        return stopped(S, job_id, attempt, reporter, a.heartbeat, 0)
    good = [r for r in result.rows if r.error is None]
    if not good:
        errors = "; ".join(f"{r.backbone}: {r.error}" for r in result.rows) or "no backbone to compare"
        ok = _finish(S, job_id, JobStatus.failed.value, f"no backbone could be probed ({errors})",
                     result.to_json(), attempt=attempt)
        return "failed" if ok else "superseded"
    best = max(r.val_acc or 0.0 for r in good)
    reporter._update(best_val_acc=best)
    ok = _finish(S, job_id, JobStatus.succeeded.value, None, result.to_json(), attempt=attempt)
    return "succeeded" if ok else "superseded"
