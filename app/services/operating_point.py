"""A job's operating point: the calibrated confidence below which its predictions abstain ("none of these").

Training picks a default on the val set (worker/engine/trust.py); an editor may move it along the
coverage-accuracy curve it was chosen on. The chosen point is stored in the job's result (`trust.operating_point`,
with the coverage and accuracy the curve gives at it), used by every prediction through the API, and written into
the job's model card. Torch-free.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict
from app.core.settings import Settings
from app.db.models import Artifact, Job, JobStatus, User
from app.services import access, storage
from app.services import jobs as job_service
from domain import trust as figures

log = logging.getLogger(__name__)


def trust_of(job: Job) -> dict[str, Any] | None:
    """The job's stored trust report (calibration, abstain, ood, operating_point), or None."""
    trust = (job.result or {}).get("trust")
    return trust if isinstance(trust, dict) else None


def confidence_threshold(job: Job) -> float | None:
    """The threshold predictions of this job use: the one an editor chose, else None (the model file's default)."""
    op = (trust_of(job) or {}).get("operating_point")
    return float(op["threshold"]) if isinstance(op, dict) and "threshold" in op else None


def set_point(session: Session, settings: Settings, user: User, job_id: int, threshold: float) -> dict[str, Any]:
    """Move the job's operating point to `threshold` (0..1, validated by the schema); returns the stored point."""
    job = job_service.get_owned(session, user, job_id, access.EDIT, "moving the operating point")
    trust = trust_of(job)
    curve = ((trust or {}).get("abstain") or {}).get("curve")
    if job.status != JobStatus.succeeded.value or not curve:
        why = f"it is {job.status}" if job.status != JobStatus.succeeded.value else \
            "it was trained before Graft fitted calibration and abstention: train it again"
        raise Conflict(f"job {job_id} has no coverage-accuracy curve to choose an operating point on ({why})")
    assert trust is not None
    at = figures.point_at(curve, threshold)
    point = {"threshold": threshold, "coverage": at.get("coverage"),
             "accuracy_when_answered": at.get("accuracy_when_answered"),
             "false_accept_rate": figures.false_accept_at((trust.get("ood") or {}).get("junk"), threshold),
             "default_threshold": (trust.get("abstain") or {}).get("threshold"), "set_by": user.name,
             "set_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    job.result = {**(job.result or {}), "trust": {**trust, "operating_point": point}}
    _update_model_card(session, settings, job, point)
    session.commit()
    return point


def _update_model_card(session: Session, settings: Settings, job: Job, point: dict[str, Any]) -> None:
    """Write the operating point into the job's model card (a JSON file in storage), when it has one."""
    art = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "model_card"))
    if art is None:
        return
    st = storage.for_settings(settings)
    with st.open(art.path) as f:
        card = json.load(f)
    entry = card.get("trust") if isinstance(card.get("trust"), dict) else {}
    card["trust"] = {**entry, "confidence_threshold": point["threshold"], "coverage": point["coverage"],
                     "accuracy_when_answered": point["accuracy_when_answered"],
                     "default_confidence_threshold": point["default_threshold"]}
    data = (json.dumps(card, indent=2) + "\n").encode()
    tmp = storage.scratch_dir(settings) / f"model_card.{uuid.uuid4().hex[:8]}.json"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_bytes(data)
        st.put_file(tmp, art.path)
    finally:
        tmp.unlink(missing_ok=True)
    art.size, art.sha256 = len(data), hashlib.sha256(data).hexdigest()
