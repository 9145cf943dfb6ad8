"""Dataset versions on the pages: a dataset's lineage (the versions it came from and those made from it),
what changed from its parent, retraining a parent's job on a version, and the comparison of a retrained job
with the job it repeats (app.services.versions makes the versions)."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Dataset, Job, JobKind, JobStatus, User
from app.services import access

RETRAINABLE = 5  # the parent's newest succeeded training jobs offered for a retrain on a version
SHOWN_FILES = 50  # changed files listed by name on the page (the counts cover them all)


def _visible_dataset(session: Session, user: User, dataset_id: int | None) -> Dataset | None:
    return access.get_visible(session, Dataset, user, dataset_id) if dataset_id is not None else None


def ancestors(session: Session, user: User, ds: Dataset) -> list[Dataset]:
    """The versions `ds` came from that the user may see, oldest first (the upload, ..., its parent)."""
    chain: list[Dataset] = []
    seen = {ds.id}
    parent = _visible_dataset(session, user, ds.parent_id)
    while parent is not None and parent.id not in seen:
        chain.append(parent)
        seen.add(parent.id)
        parent = _visible_dataset(session, user, parent.parent_id)
    return chain[::-1]


def dataset_context(session: Session, user: User, ds: Dataset) -> dict[str, Any]:
    """What the dataset page shows about versions."""
    family = session.scalars(select(Dataset).where(
        (Dataset.lineage_id == ds.family_id) | (Dataset.id == ds.family_id), access.visible_to(Dataset, user))
        .order_by(Dataset.version, Dataset.id)).all()
    children = [d for d in family if d.parent_id == ds.id]
    changes = ds.changes or {}
    retrain: list[Job] = []
    if ds.parent_id is not None:
        retrain = list(session.scalars(select(Job).where(
            Job.dataset_id == ds.parent_id, Job.kind == JobKind.train.value,
            Job.status == JobStatus.succeeded.value, access.visible_to(Job, user))
            .order_by(Job.id.desc()).limit(RETRAINABLE)))
    return {"lineage": {"ancestors": ancestors(session, user, ds), "children": children,
                        "family": family if len(family) > 1 else [],
                        "relabelled": (changes.get("relabelled") or [])[:SHOWN_FILES],
                        "removed": (changes.get("removed") or [])[:SHOWN_FILES],
                        "added": (changes.get("added") or [])[:SHOWN_FILES],
                        "n_relabelled": int(changes.get("n_relabelled") or 0),
                        "n_removed": int(changes.get("n_removed") or 0),
                        "n_added": int(changes.get("n_added") or 0),
                        "retrain": retrain}}


def earlier_run(session: Session, user: User, job: Job) -> Job | None:
    """The job that `job` repeats on an earlier version of its dataset: the newest succeeded training job on
    the nearest ancestor with the same backbone and strategy (None when there is none)."""
    if job.kind != JobKind.train.value or job.dataset is None or job.dataset.parent_id is None:
        return None
    same = {k: job.spec.get(k) for k in ("backbone", "strategy")}
    for parent in reversed(ancestors(session, user, job.dataset)):
        for cand in session.scalars(select(Job).where(
                Job.dataset_id == parent.id, Job.kind == JobKind.train.value,
                Job.status == JobStatus.succeeded.value, access.visible_to(Job, user)).order_by(Job.id.desc())):
            if all(cand.spec.get(k) == v for k, v in same.items()):
                return cand
    return None
