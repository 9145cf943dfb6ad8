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
    from domain.spec import ProbeSpec
    from worker.attempt import _finish, call_engine, stopped
    from worker.engine.probe import probe

    result, outcome = call_engine(S, job_id, attempt, "probe job", lambda: probe(
        data_dir, ProbeSpec(**spec_data), cache_dir=settings.features_cache_dir, callbacks=reporter,
        max_pixels=settings.max_image_pixels))
    if outcome is not None:
        return outcome
    if result.status == "stopped":
        return stopped(S, job_id, attempt, reporter, heartbeat, 0)
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
