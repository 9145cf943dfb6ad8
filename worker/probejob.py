"""Running a claimed probe job (kind "probe"): the engine's backbone comparison with the same reporter,
heartbeat, cancel and shutdown handling as a training run (worker.runjob claims the row and calls this)."""
from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.core.settings import Settings
from app.db.models import JobStatus

log = logging.getLogger(__name__)


def run_probe(S: sessionmaker[Session], job_id: int, attempt: int, reporter, heartbeat, spec_data: dict,
              data_dir: Path, settings: Settings) -> str:
    from worker.engine.errors import GraftError
    from worker.engine.probe import probe
    from worker.engine.spec import ProbeSpec
    from worker.runjob import _finish, _release, shutting_down

    try:
        spec = ProbeSpec(**spec_data)
        result = probe(data_dir, spec, cache_dir=settings.features_cache_dir, callbacks=reporter,
                       max_pixels=settings.max_image_pixels)
    except GraftError as e:
        return "failed" if _finish(S, job_id, JobStatus.failed.value, str(e), attempt=attempt) else "superseded"
    except Exception as e:  # a bug or an environment problem: say so, keep the worker alive
        log.exception("probe job %s crashed", job_id)
        ok = _finish(S, job_id, JobStatus.failed.value, f"internal error: {type(e).__name__}: {e}. The worker log "
                     "has the details; retry the comparison or report the problem.", attempt=attempt)
        return "failed" if ok else "superseded"
    if result.status == "stopped":
        if reporter.lost:
            return "superseded"
        if shutting_down():
            heartbeat.stop()
            if _release(S, job_id, attempt, 0):
                return "released"
        ok = _finish(S, job_id, JobStatus.cancelled.value, "cancelled on request", attempt=attempt)
        return "cancelled" if ok else "superseded"
    good = [r for r in result.rows if r.get("error") is None]
    if not good:
        errors = "; ".join(f"{r['backbone']}: {r['error']}" for r in result.rows) or "no backbone to compare"
        ok = _finish(S, job_id, JobStatus.failed.value, f"no backbone could be probed ({errors})",
                     result.to_dict(), attempt=attempt)
        return "failed" if ok else "superseded"
    best = max(r["val_acc"] for r in good)
    reporter._update(best_val_acc=best)
    ok = _finish(S, job_id, JobStatus.succeeded.value, None, result.to_dict(), attempt=attempt)
    return "succeeded" if ok else "superseded"
