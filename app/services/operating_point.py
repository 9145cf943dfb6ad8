"""A job's operating point: the calibrated confidence below which its predictions abstain ("none of these").

Training picks a default on the val set (worker/engine/trust.py); an editor may move it along the
coverage-accuracy curve it was chosen on. The chosen point is stored in the job's result (`trust.operating_point`,
with the coverage and accuracy the curve gives at it), used by every prediction through the API, and written into
the job's model card. A multi-label job has instead one threshold per label (tuned for F1 on val by training),
which an editor may move the same way (`label_thresholds`). Torch-free.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, Unprocessable
from app.core.settings import Settings
from app.db.models import Artifact, Job, JobStatus, User
from app.services import access, storage
from app.services import jobs as job_service
from domain import multilabel as figures_ml
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

    def card_point(card: dict[str, Any]) -> None:
        entry: dict[str, Any] = card["trust"] if isinstance(card.get("trust"), dict) else {}
        card["trust"] = {**entry, "confidence_threshold": point["threshold"], "coverage": point["coverage"],
                         "accuracy_when_answered": point["accuracy_when_answered"],
                         "default_confidence_threshold": point["default_threshold"]}

    update_model_card(session, settings, job, card_point)
    session.commit()
    return point


def label_thresholds(job: Job) -> list[float] | None:
    """A multi-label job's per-label thresholds as an editor moved them (in its classes' order), else None (the
    model file's, tuned on val)."""
    moved = (job.result or {}).get("label_thresholds")
    report = (job.result or {}).get("report") or {}
    if not isinstance(moved, dict) or not isinstance(moved.get("thresholds"), dict):
        return None
    return [float(moved["thresholds"][c]) for c in report.get("classes", [])]


def set_label_thresholds(session: Session, settings: Settings, user: User, job_id: int,
                         thresholds: dict[str, float]) -> dict[str, Any]:
    """Move some of a multi-label job's per-label thresholds (0..1); returns what is stored: every label's
    threshold with the val figures at them (measured on the val images, which they may have been tuned on)."""
    job = job_service.get_owned(session, user, job_id, access.EDIT, "moving the label thresholds")
    report = (job.result or {}).get("report") or {}
    if job.status != JobStatus.succeeded.value or report.get("task") != "multilabel":
        why = f"it is {job.status}" if job.status != JobStatus.succeeded.value else "it is not a multi-label model"
        raise Conflict(f"job {job_id} has no per-label thresholds to move ({why}); a multi-class model has one "
                       "operating point: PUT /api/v1/jobs/{id}/operating-point")
    classes = list(report.get("classes") or [])
    unknown = sorted(set(thresholds) - set(classes))
    if unknown:
        raise Unprocessable(f"unknown label(s) {', '.join(map(repr, unknown))}: this model's labels are "
                            f"{', '.join(classes)}", {"labels": classes})
    current = label_thresholds(job) or [float(report["thresholds"][c]) for c in classes]
    th = {c: float(thresholds.get(c, current[i])) for i, c in enumerate(classes)}
    scores, masks = report.get("scores") or [], report.get("y_true") or []
    metrics = None
    if scores and len(scores) == len(masks):
        metrics, _ = figures_ml.metrics_at(scores, figures_ml.from_masks(masks, len(classes)), classes,
                                           [th[c] for c in classes])
    stored = {"thresholds": th, "metrics": metrics, "default_thresholds": report.get("thresholds"),
              "set_by": user.name, "set_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    job.result = {**(job.result or {}), "label_thresholds": stored}

    def card_thresholds(card: dict[str, Any]) -> None:
        card["thresholds"] = th
        card["default_thresholds"] = report.get("thresholds")

    update_model_card(session, settings, job, card_thresholds)
    session.commit()
    return stored


def update_model_card(session: Session, settings: Settings, job: Job, change: Callable[[dict[str, Any]], None]
                      ) -> None:
    """Rewrite the job's model card (a JSON file in storage) with `change` applied, when it has one."""
    art = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "model_card"))
    if art is None:
        return
    st = storage.for_settings(settings)
    with st.open(art.path) as f:
        card = json.load(f)
    change(card)
    data = (json.dumps(card, indent=2) + "\n").encode()
    tmp = storage.scratch_dir(settings) / f"model_card.{uuid.uuid4().hex[:8]}.json"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_bytes(data)
        st.put_file(tmp, art.path)
    finally:
        tmp.unlink(missing_ok=True)
    art.size, art.sha256 = len(data), hashlib.sha256(data).hexdigest()
