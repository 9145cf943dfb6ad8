"""Pages: starting a job (with the strategy advice) and a job's page (progress, evaluation, exports)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from app.api.deps import SessionDep, SettingsDep
from app.db.models import FINAL_STATUSES, Artifact, Dataset, EpochMetric, JobKind, JobStatus
from app.services import access
from app.services import datasets as dataset_service
from app.services import jobs as job_service
from app.web import batch as batch_pages
from app.web import label_issues as label_pages
from app.web import lineage
from app.web import probe as probe_pages
from app.web.render import SignedIn, _not_found, page_object, render
from domain.advice import STRATEGIES
from domain.catalog import CATALOG
from domain.exports import EXPORT_FORMATS
from domain.results import RunSummary, SearchReport
from domain.spec import DEFAULT_LR, RunSpec

router = APIRouter(include_in_schema=False)


def _backbones() -> list[dict]:
    out = []
    for e in CATALOG.values():
        out.append({"name": e.name, "description": e.description, "params_m": e.params / 1e6,
                    "image_size": e.image_size, "available": e.weights_available()})
    return out


@router.get("/jobs/new")
def job_new(request: Request, session: SessionDep, user: SignedIn, dataset_id: str = "", backbone: str = ""):
    datasets = session.scalars(select(Dataset).where(access.visible_to(Dataset, user)).order_by(Dataset.id.desc())).all()
    if not dataset_id:
        return render(request, "job_new.html", {"nav": "job_new", "ds": None, "datasets": datasets}, user=user)
    ds = page_object(dataset_service.get_owned, session, user, dataset_id)
    if ds is None:
        return _not_found(request, user, f"dataset {dataset_id}")
    backbones = _backbones()
    available = [b["name"] for b in backbones if b["available"]]
    probe = probe_pages.dataset_context(session, user, ds)  # the advice, measured when a probe has run
    default_backbone = backbone or probe["best_backbone"] or RunSpec.model_fields["backbone"].default
    if default_backbone not in available:
        default_backbone = available[0] if available else ""
    defaults = RunSpec()
    return render(request, "job_new.html", {
        "nav": "job_new", "ds": ds, "datasets": datasets, "backbones": backbones,
        "default_backbone": default_backbone, "advice": probe["advice"], "strategies": STRATEGIES,
        "best_backbone": probe["best_backbone"],
        "defaults": defaults, "default_lr": DEFAULT_LR,
        "train_total": sum(int(v) for v in ds.counts.get("train", {}).values())}, user=user)


def _metric_dict(m: EpochMetric) -> dict:
    return {"epoch": m.epoch, "phase": m.phase, "train_loss": m.train_loss, "train_acc": m.train_acc,
            "val_loss": m.val_loss, "val_acc": m.val_acc, "lr": m.lr, "images_per_s": m.images_per_s,
            "seconds": m.seconds, "elapsed": m.elapsed, "eta": m.eta, "is_best": m.is_best}


def _relative(e, base) -> str | None:
    """One export against ONNX fp32 ("3.4x smaller, 1.3x faster, accuracy -0.2 points"), from their checks."""
    parts = []
    if e.size_bytes and base.size_bytes:
        r = base.size_bytes / e.size_bytes
        parts.append(f"{r:.1f}x smaller" if r >= 1.05 else f"{1 / r:.1f}x larger" if r <= 1 / 1.05 else "same size")
    if e.latency_ms and base.latency_ms:
        r = base.latency_ms / e.latency_ms
        parts.append(f"{r:.1f}x faster" if r >= 1.05 else f"{1 / r:.1f}x slower" if r <= 1 / 1.05
                     else "as fast")
    if e.accuracy is not None and base.accuracy is not None:
        parts.append(f"accuracy {(e.accuracy - base.accuracy) * 100:+.1f} points")
    return ", ".join(parts) or None


def _exports_view(summary: RunSummary | None, kinds: set[str]) -> list[dict]:
    """One row per download format: ok (a file to download), failed (the recorded reason and figures, no
    download) or missing, with each check's figures (accuracy in its runtime against PyTorch's, agreement,
    latency, size) and, for the other formats, a line relative to ONNX fp32. Jobs from before the exports
    existed offer the PyTorch file alone."""
    recorded = {e.format: e for e in summary.exports} if summary is not None else {}
    has_exports = summary is not None and "exports" in summary.model_fields_set
    base = recorded.get("onnx")
    rows = []
    for f in EXPORT_FORMATS.values():
        if f.name != "pytorch" and not has_exports:
            continue
        e = recorded.get(f.name)
        state = "failed" if e is not None and not e.ok else "ok" if f.artifact in kinds else "missing"
        figures = None
        if e is not None and (e.latency_ms is not None or e.size_bytes is not None or e.accuracy is not None):
            figures = {"accuracy": e.accuracy, "reference_accuracy": e.reference_accuracy,
                       "latency_ms": e.latency_ms, "size_bytes": e.size_bytes}
        relative = None
        if e is not None and base is not None and f.name not in ("onnx", "model_card", "pytorch"):
            line = _relative(e, base)
            relative = f"{f.title}: {line}" if line else None
        rows.append({"format": f.name, "title": f.title, "ext": f.suffix, "text": f.text, "state": state,
                     "error": e.error if e is not None else None,
                     "parity": e.parity.to_json() if e is not None and e.parity is not None else None,
                     "figures": figures, "relative": relative})
    return rows


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, session: SessionDep, settings: SettingsDep, user: SignedIn):
    job = page_object(job_service.get_owned, session, user, job_id)
    if job is None:
        return _not_found(request, user, f"job {job_id}")
    can_edit = access.allows(access.role_of(session, user, job.workspace_id), access.EDIT)
    if job.kind == JobKind.probe.value:
        return probe_pages.job_page(request, job, user, can_edit)
    if job.kind == JobKind.label_issues.value:
        return label_pages.job_page(request, session, job, user)
    if job.kind == JobKind.batch_predict.value:  # shown on the card of the training job it predicts with
        return RedirectResponse(f"/jobs/{int((job.spec or {}).get('model_job_id') or 0)}#batch-predict", status_code=303)
    metrics = [_metric_dict(m) for m in session.scalars(
        select(EpochMetric).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch))]
    best_epoch = max((m["epoch"] for m in metrics if m["is_best"]), default=None)  # the saved one
    kinds = set(session.scalars(select(Artifact.kind).where(Artifact.job_id == job.id)))
    has_model = "model" in kinds
    succeeded = job.status == JobStatus.succeeded.value
    summary = RunSummary.from_stored(job.result)
    report = summary.report if summary is not None else None
    search = SearchReport.of(summary) if summary is not None else None  # a run with spec.search
    kind = str(job.spec.get("strategy", "")).split(":", 1)[0]
    mistakes, wrong_total, val_images = None, None, None
    if report is not None:
        cm = report.confusion_matrix
        val_images = report.images or sum(sum(row) for row in cm)
        wrong_total = val_images - sum(row[i] for i, row in enumerate(cm) if i < len(row))
        mistakes = report.mistakes if "mistakes" in report.model_fields_set else None
    stale, status_note = job_service.staleness(job, settings)
    return render(request, "job.html", {
        "nav": "job", "job": job, "earlier": lineage.earlier_run(session, user, job), "stale": stale, "status_note": status_note, "ds": job.dataset, "metrics": metrics,
        "best_epoch": best_epoch, "has_model": has_model, "can_edit": can_edit,
        "result": summary if summary is not None else {}, "report": report, "strategy": STRATEGIES.get(kind),
        "final": job.status in FINAL_STATUSES, "mistakes": mistakes, "wrong_total": wrong_total,
        "val_images": val_images, "search": search, "trust": summary.trust if summary is not None else None,
        "has_reliability_png": "reliability" in kinds,
        "has_cm_png": "confusion_matrix" in kinds,
        "exports": _exports_view(summary, kinds) if succeeded and has_model else [],
        **batch_pages.context(session, user, job),
        "page_data": {"id": job.id, "status": job.status, "final": job.status in FINAL_STATUSES,
                      "metrics": metrics, "total_epochs": job.total_epochs,
                      "search": search.model_dump(mode="json") if search is not None else None,
                      "max_predict_images": settings.max_predict_images}}, user=user)
