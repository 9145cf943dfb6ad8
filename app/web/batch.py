"""The training job page's "Batch predict" card: this job's batch predictions (templates/_batch_card.html)."""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.db.models import Job, JobKind, JobStatus, User
from app.services import batch_predict


def context(session: Session, user: User, job: Job) -> dict[str, Any]:
    """`batch_runs` for a succeeded training job (the newest first), else nothing (the card is not shown)."""
    if job.kind != JobKind.train.value or job.status != JobStatus.succeeded.value:
        return {}
    runs = []
    for b in batch_predict.runs_of(session, user, job):
        r = b.result or {}
        runs.append({"id": b.id, "status": b.status, "progress": b.progress, "error": b.error,
                     "images": (b.spec or {}).get("images"), "source": (b.spec or {}).get("source"),
                     "abstained": r.get("abstained"), "unreadable": r.get("unreadable"),
                     "created_at": b.created_at})
    return {"batch_runs": runs}
