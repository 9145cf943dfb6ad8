"""Pages: uploading a dataset, a dataset's page and its sample thumbnails."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from app.api.deps import SessionDep, SettingsDep
from app.core.errors import NotFound, Unauthorized
from app.db.models import Job
from app.services import access, thumbs
from app.services import datasets as dataset_service
from app.web import label_issues as label_pages
from app.web import lineage
from app.web import probe as probe_pages
from app.web.render import (
    PageUser,
    SignedIn,
    _not_found,
    current_workspace,
    my_workspaces,
    page_id,
    page_object,
    render,
)
from domain.advice import STRATEGIES

router = APIRouter(include_in_schema=False)
SAMPLES_PER_CLASS = 4


@router.get("/datasets/new")
def dataset_new(request: Request, session: SessionDep, settings: SettingsDep, user: SignedIn):
    """The upload page: into a workspace where the user may upload (the current one when they may)."""
    current, _ = current_workspace(request, session, user)
    targets = [w for w, r in my_workspaces(request, session, user) if access.allows(r, access.EDIT)]
    return render(request, "dataset_new.html", {"nav": "upload", "max_upload_bytes": settings.max_upload_bytes,
                                                "targets": targets, "current_id": current.id}, user=user)


@router.get("/datasets/{dataset_id}")
def dataset_page(dataset_id: str, request: Request, session: SessionDep, user: SignedIn):
    ds = page_object(dataset_service.get_owned, session, user, dataset_id)
    if ds is None:
        return _not_found(request, user, f"dataset {dataset_id}")
    train = ds.counts.get("train", {})
    val = ds.counts.get("val", {})
    multilabel = ds.task == "multilabel"
    rows = [{"index": i, "name": c, "train": int(train.get(c, 0)), "val": int(val.get(c, 0)),
             "samples": min(SAMPLES_PER_CLASS, int(train.get(c, 0)))}  # (multi-label: images with the label)
            for i, c in enumerate(ds.classes)]
    largest = max([r["train"] + r["val"] for r in rows] or [1]) or 1
    images = ((ds.label_stats or {}).get("images") or {}) if multilabel else {}  # counts are per label there
    jobs = session.scalars(select(Job).where(Job.dataset_id == ds.id, access.visible_to(Job, user))
                           .order_by(Job.id.desc())).all()
    return render(request, "dataset.html", {
        "nav": "dataset", "ds": ds, "rows": rows, "largest": largest, "jobs": jobs,
        "train_total": images.get("train", sum(r["train"] for r in rows)),
        "val_total": images.get("val", sum(r["val"] for r in rows)),
        "multilabel": multilabel, "cooc": cooccurrence(ds.label_stats, ds.num_images) if multilabel else None,
        "strategies": STRATEGIES, **probe_pages.dataset_context(session, user, ds),
        **label_pages.dataset_context(session, user, ds),
        **lineage.dataset_context(session, user, ds),
        "can_edit": access.allows(access.role_of(session, user, ds.workspace_id), access.EDIT)}, user=user)


def cooccurrence(stats: dict | None, n_images: int) -> dict:
    """The co-occurrence table of a multi-label dataset's page: each cell's count and its share of the row
    label's images (the diagonal: the label's share of all images)."""
    stats = stats or {}
    co = stats.get("cooccurrence") or {}
    labels, matrix = list(co.get("labels") or []), list(co.get("matrix") or [])
    rows = []
    for i, (name, counts) in enumerate(zip(labels, matrix)):
        own = int(counts[i]) if i < len(counts) else 0
        cells = [{"n": int(v), "diag": j == i,
                  "share": (int(v) / n_images if n_images else 0.0) if j == i else (int(v) / own if own else 0.0)}
                 for j, v in enumerate(counts)]
        rows.append({"name": name, "cells": cells})
    return {"labels": labels, "rows": rows, "no_label": int(stats.get("no_label") or 0),
            "labels_per_image": float(stats.get("labels_per_image") or 0.0)}


@router.get("/datasets/{dataset_id}/samples/{class_index}/{n}.jpg")
def dataset_sample(dataset_id: str, class_index: str, n: str, request: Request, session: SessionDep,
                   settings: SettingsDep, user: PageUser):
    """A JPEG thumbnail (at most 160 px) of the n-th train image of a class, for the dataset page."""
    if user is None:
        raise Unauthorized("sign in first: open the sign-in link `graft serve` printed")
    did, ci, ni = page_id(dataset_id), page_id(class_index), page_id(n)
    if did is None or ci is None or ni is None:
        raise NotFound("a sample is /datasets/<id>/samples/<class index>/<n>.jpg with numbers from 0")
    ds = dataset_service.get_owned(session, user, did)
    data = thumbs.sample_thumbnail(settings, ds, ci, ni)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
