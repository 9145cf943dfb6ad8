"""Pages (server-rendered Jinja2). Pages read through the same services as the API; their scripts call
the REST API with the session cookie and the X-CSRF-Token header. Never imports torch."""
from __future__ import annotations

import datetime as dt
import hmac

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select

from app.api.deps import CSRF_HEADER, SESSION_COOKIE, SessionDep, SettingsDep, csrf_token_for
from app.core.errors import NotFound, Unauthorized
from app.db.models import FINAL_STATUSES, Artifact, Dataset, EpochMetric, Job
from app.services import auth, thumbs
from app.services import datasets as dataset_service
from app.services import jobs as job_service
from app.web import probe as probe_pages
from app.web.render import PageUser, _not_found, error_page, render, sign_in_page
from domain.advice import STRATEGIES
from domain.catalog import CATALOG
from domain.spec import DEFAULT_LR, RunSpec

router = APIRouter(include_in_schema=False)
SAMPLES_PER_CLASS = 4
JOBS_ON_DASHBOARD = 100


def _int(value: str) -> int | None:
    return int(value) if value.isdigit() and len(value) < 12 else None


def _owned(get_owned, session, user, raw_id: str):
    """The user's object for a page URL id, or None (bad id, no such object, or someone else's)."""
    oid = _int(raw_id)
    if oid is None:
        return None
    try:
        return get_owned(session, user, oid)
    except NotFound:
        return None


# ---------------------------------------------------------------- sign in / out


@router.get("/login")
def login(request: Request, session: SessionDep, settings: SettingsDep, user: PageUser, token: str = ""):
    """The sign-in link printed by `graft serve`: spends the one-time token, sets a session cookie."""
    if not token:
        if user is not None:
            return RedirectResponse("/", status_code=303)
        return sign_in_page(request, status_code=200)
    session_token = auth.exchange_login(session, token, dt.timedelta(seconds=settings.session_max_age_s))
    if session_token is None:
        return sign_in_page(request, status_code=401, error=True)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(SESSION_COOKIE, session_token, max_age=settings.session_max_age_s, httponly=True,
                    samesite="strict", secure=request.url.scheme == "https", path="/")
    return resp


@router.post("/logout")
async def logout(request: Request, session: SessionDep):
    """Sign out: the CSRF token comes in the X-CSRF-Token header (scripts) or the form field csrf_token."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and auth.authenticate(session, cookie, ("session",)) is not None:
        sent = request.headers.get(CSRF_HEADER, "")
        if not sent and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get("csrf_token")
            sent = value if isinstance(value, str) else ""
        if not hmac.compare_digest(sent, csrf_token_for(cookie)):
            return error_page(request, 401, "Sign-out refused",
                              "The request did not carry this page's security token. Reload the page and use "
                              "Sign out again.")
        auth.revoke(session, cookie)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.get("/docs")
def api_docs(request: Request):
    """Swagger UI from static/vendor/swagger-ui (FastAPI's default loads it from a CDN)."""
    return get_swagger_ui_html(openapi_url=request.app.openapi_url, title="Graft API",
                               swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
                               swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
                               swagger_favicon_url="/static/favicon.svg",
                               swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True})


@router.get("/favicon.ico")
def favicon():
    """Browsers ask for /favicon.ico whatever the page says."""
    return RedirectResponse("/static/favicon.svg", status_code=301)


# ---------------------------------------------------------------- dashboard


@router.get("/")
def dashboard(request: Request, session: SessionDep, user: PageUser):
    if user is None:
        return sign_in_page(request)
    datasets = session.scalars(select(Dataset).where(Dataset.owner_id == user.id).order_by(Dataset.id.desc())).all()
    jobs = session.scalars(select(Job).where(Job.owner_id == user.id).order_by(Job.id.desc())
                           .limit(JOBS_ON_DASHBOARD)).all()
    total_jobs = session.scalar(select(func.count()).select_from(Job).where(Job.owner_id == user.id))
    names = {d.id: d.name for d in datasets}
    counts = {s: n for s, n in session.execute(select(Job.status, func.count()).where(Job.owner_id == user.id)
                                               .group_by(Job.status))}
    return render(request, "dashboard.html", {"nav": "dashboard", "datasets": datasets, "jobs": jobs,
                                              "dataset_names": names, "status_counts": counts,
                                              "total_jobs": total_jobs}, user=user)


# ---------------------------------------------------------------- datasets


@router.get("/datasets/new")
def dataset_new(request: Request, settings: SettingsDep, user: PageUser):
    if user is None:
        return sign_in_page(request)
    return render(request, "dataset_new.html", {"nav": "upload", "max_upload_bytes": settings.max_upload_bytes},
                  user=user)


@router.get("/datasets/{dataset_id}")
def dataset_page(dataset_id: str, request: Request, session: SessionDep, user: PageUser):
    if user is None:
        return sign_in_page(request)
    ds = _owned(dataset_service.get_owned, session, user, dataset_id)
    if ds is None:
        return _not_found(request, user, f"dataset {dataset_id}")
    train = ds.counts.get("train", {})
    val = ds.counts.get("val", {})
    rows = [{"index": i, "name": c, "train": int(train.get(c, 0)), "val": int(val.get(c, 0)),
             "samples": min(SAMPLES_PER_CLASS, int(train.get(c, 0)))} for i, c in enumerate(ds.classes)]
    largest = max([r["train"] + r["val"] for r in rows] or [1]) or 1
    jobs = session.scalars(select(Job).where(Job.dataset_id == ds.id, Job.owner_id == user.id)
                           .order_by(Job.id.desc())).all()
    return render(request, "dataset.html", {
        "nav": "dataset", "ds": ds, "rows": rows, "largest": largest, "jobs": jobs,
        "train_total": sum(r["train"] for r in rows), "val_total": sum(r["val"] for r in rows),
        "strategies": STRATEGIES, **probe_pages.dataset_context(session, user, ds)}, user=user)


@router.get("/datasets/{dataset_id}/samples/{class_index}/{n}.jpg")
def dataset_sample(dataset_id: str, class_index: str, n: str, request: Request, session: SessionDep,
                   settings: SettingsDep, user: PageUser):
    """A JPEG thumbnail (at most 160 px) of the n-th train image of a class, for the dataset page."""
    if user is None:
        raise Unauthorized("sign in first: open the sign-in link `graft serve` printed")
    did, ci, ni = _int(dataset_id), _int(class_index), _int(n)
    if did is None or ci is None or ni is None:
        raise NotFound("a sample is /datasets/<id>/samples/<class index>/<n>.jpg with numbers from 0")
    ds = dataset_service.get_owned(session, user, did)
    data = thumbs.sample_thumbnail(settings, ds, ci, ni)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


# ---------------------------------------------------------------- jobs


def _backbones() -> list[dict]:
    out = []
    for e in CATALOG.values():
        out.append({"name": e.name, "description": e.description, "params_m": e.params / 1e6,
                    "image_size": e.image_size, "available": e.weights_available()})
    return out


@router.get("/jobs/new")
def job_new(request: Request, session: SessionDep, user: PageUser, dataset_id: str = "", backbone: str = ""):
    if user is None:
        return sign_in_page(request)
    datasets = session.scalars(select(Dataset).where(Dataset.owner_id == user.id).order_by(Dataset.id.desc())).all()
    if not dataset_id:
        return render(request, "job_new.html", {"nav": "job_new", "ds": None, "datasets": datasets}, user=user)
    ds = _owned(dataset_service.get_owned, session, user, dataset_id)
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


# format, artifact kind, title, file, what it is for
EXPORT_FORMATS = (
    ("pytorch", "model", "PyTorch", ".pt", "State dict with the classes, preprocessing and metrics inside: "
     "for <code>graft predict</code> or your own PyTorch code."),
    ("torchscript", "torchscript", "TorchScript", ".torchscript.pt", "Runs with <code>torch.jit.load</code>, "
     "no Graft code needed; the model card is inside."),
    ("onnx", "onnx", "ONNX", ".onnx", "For onnxruntime and other ONNX runtimes (dynamic batch); checked "
     "against PyTorch on the val images; the model card is inside."),
    ("model_card", "model_card", "Model card", ".json", "Classes, preprocessing (image size, mean, std), "
     "input and output, parameters and metrics: what running the model elsewhere needs."),
)


def _exports_view(result: dict, kinds: set[str]) -> list[dict]:
    """One row per download format: ok (a file to download), failed (the recorded reason and figures, no
    download) or missing. Jobs from before the exports existed offer the PyTorch file alone."""
    recorded = {e["format"]: e for e in result.get("exports") or [] if isinstance(e, dict) and "format" in e}
    rows = []
    for fmt, kind, title, ext, text in EXPORT_FORMATS:
        if fmt != "pytorch" and "exports" not in result:
            continue
        e = recorded.get(fmt) or {}
        state = "failed" if e and not e.get("ok") else "ok" if kind in kinds else "missing"
        parity = e.get("parity") if isinstance(e.get("parity"), dict) else None
        rows.append({"format": fmt, "title": title, "ext": ext, "text": text, "state": state,
                     "error": e.get("error"), "parity": parity})
    return rows


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, session: SessionDep, settings: SettingsDep, user: PageUser):
    if user is None:
        return sign_in_page(request)
    job = _owned(job_service.get_owned, session, user, job_id)
    if job is None:
        return _not_found(request, user, f"job {job_id}")
    if job.kind == "probe":
        return probe_pages.job_page(request, job, user)
    metrics = [_metric_dict(m) for m in session.scalars(
        select(EpochMetric).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch))]
    best_epoch = max((m["epoch"] for m in metrics if m["is_best"]), default=None)  # the saved one
    kinds = set(session.scalars(select(Artifact.kind).where(Artifact.job_id == job.id)))
    has_model = "model" in kinds
    succeeded = job.status == "succeeded"
    result = job.result or {}
    report = result.get("report") if isinstance(result.get("report"), dict) else None
    kind = str(job.spec.get("strategy", "")).split(":", 1)[0]
    mistakes, wrong_total, val_images = None, None, None
    if report is not None:
        cm = report.get("confusion_matrix") or []
        val_images = report.get("images") or sum(sum(row) for row in cm)
        wrong_total = val_images - sum(row[i] for i, row in enumerate(cm) if i < len(row))
        if isinstance(report.get("mistakes"), list):
            mistakes = report["mistakes"]
    return render(request, "job.html", {
        "nav": "job", "job": job, "ds": job.dataset, "metrics": metrics, "best_epoch": best_epoch, "has_model": has_model,
        "result": result, "report": report, "strategy": STRATEGIES.get(kind),
        "final": job.status in FINAL_STATUSES, "mistakes": mistakes, "wrong_total": wrong_total,
        "val_images": val_images,
        "has_cm_png": "confusion_matrix" in kinds,
        "exports": _exports_view(result, kinds) if succeeded and has_model else [],
        "page_data": {"id": job.id, "status": job.status, "final": job.status in FINAL_STATUSES,
                      "metrics": metrics, "total_epochs": job.total_epochs,
                      "max_predict_images": settings.max_predict_images}}, user=user)


# ---------------------------------------------------------------- run comparison


@router.get("/compare")
def compare_page(request: Request, session: SessionDep, user: PageUser):
    """Two or more succeeded jobs of one dataset side by side: /compare?ids=3,5 (or ids repeated, as the
    dashboard's form sends them); without ids, how to pick them."""
    from app.core.errors import AppError
    from app.services import compare as compare_service

    if user is None:
        return sign_in_page(request)
    ids = request.query_params.getlist("ids")
    if not any(i.strip() for i in ids):
        return render(request, "compare.html", {"nav": "compare", "cmp": None}, user=user)
    try:
        cmp = compare_service.compare(session, user, ids)
    except NotFound as e:
        return _not_found(request, user, f"job {(e.details or {}).get('job_id', '')}".strip())
    except AppError as e:
        return error_page(request, e.status, "These jobs cannot be compared", e.message[:1].upper() + e.message[1:],
                          user)
    page_data = {"baseline_id": cmp["baseline_id"],
                 "jobs": [{"id": j["id"], "curves": j["curves"]} for j in cmp["jobs"]]}
    return render(request, "compare.html", {"nav": "compare", "cmp": cmp, "page_data": page_data,
                                            "diffs": {c["job_id"]: c for c in cmp["comparisons"]},
                                            "cmp_points": compare_service.points}, user=user)
