"""Run comparison: two or more succeeded jobs of one dataset (or of versions of one dataset) side by side (parameters, metrics, curves,
per-class F1), with bootstrap 95% intervals on val accuracy and a plain verdict on each difference.

The statistics (numpy only, never torch):

* the interval of one job's val accuracy is a percentile bootstrap over its val images. Resampling n
  right/wrong outcomes with replacement gives Binomial(n, k/n) right ones, so the resamples are drawn
  from that distribution directly: the same bootstrap as resampling indices, in O(resamples).
* the difference between two jobs validated on the same images (the same `val_set` in their reports,
  whose `y_true`/`y_pred` list each image's classes in one fixed order) is a paired bootstrap: images
  are resampled together, so only the images where the two jobs disagree move the difference. Resampling
  n images with replacement gives multinomial counts of the four kinds (both right, only A, only B, both
  wrong), drawn directly as above.
* without per-image predictions (jobs from before they were stored) or on different val images, each
  job's val set is resampled on its own from its right/wrong counts (the confusion matrix's diagonal):
  a wider interval, as it ignores that the two jobs saw the same images.

A difference is "real" when its 95% interval excludes zero, "within noise" when it includes it.

Multi-label jobs (issue 16): their val accuracy is the subset accuracy (an image is right when every label is),
and each job also gets percentile bootstrap intervals on its micro F1 and mAP (ML_RESAMPLES resamples of its val
images), with paired differences when two jobs were validated on the same images (the same draws for both).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import BadRequest, Conflict, NotFound, Unprocessable
from app.db.models import EpochMetric, Job, JobStatus, User
from app.services import access
from domain import multilabel as ml
from domain.clock import iso_utc
from domain.results import RunSummary
from domain.spec import RunSpec

MIN_JOBS = 2
MAX_JOBS = 8
RESAMPLES = 10_000
SEED = 20240607  # fixed: the same jobs always get the same intervals
LEVEL = 0.95
ML_RESAMPLES = 2_000  # micro F1 and mAP need the images themselves resampled, not counts
IDS_HELP = "ids=3,5 (2 to 8 job ids, comma-separated, the first is the baseline)"


# ---------------------------------------------------------------- statistics


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = np.quantile(samples, [tail, 1 - tail])
    return float(lo), float(hi)


def accuracy_interval(correct: int, n: int, resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy of `correct` right out of `n` images."""
    if n <= 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    return _interval(rng.binomial(n, correct / n, size=resamples) / n, level)


def paired_difference(a_right: Iterable[bool], b_right: Iterable[bool], resamples: int = RESAMPLES,
                      seed: int = SEED, level: float = LEVEL) -> dict:
    """Accuracy of B minus accuracy of A on the same images (`a_right[i]`, `b_right[i]`: whether each got
    image i right), with its paired percentile bootstrap interval."""
    a = np.asarray(list(a_right), dtype=bool)
    b = np.asarray(list(b_right), dtype=bool)
    if a.shape != b.shape:
        raise ValueError("a paired comparison needs one outcome per image from each job")
    n = int(a.size)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    out = {"method": "paired", "images": n, "only_baseline_right": only_a, "only_other_right": only_b,
           "difference": (only_b - only_a) / n if n else 0.0}
    if n == 0:
        return {**out, "low": 0.0, "high": 0.0}
    rng = np.random.default_rng(seed)
    p_same = max(0.0, 1.0 - (only_a + only_b) / n)
    counts = rng.multinomial(n, [only_a / n, only_b / n, p_same], size=resamples)
    lo, hi = _interval((counts[:, 1] - counts[:, 0]) / n, level)
    return {**out, "low": lo, "high": hi}


def independent_difference(a_correct: int, a_n: int, b_correct: int, b_n: int, resamples: int = RESAMPLES,
                           seed: int = SEED, level: float = LEVEL) -> dict:
    """Accuracy of B minus accuracy of A, each val set resampled on its own (no per-image pairing)."""
    out = {"method": "independent", "images": min(a_n, b_n), "images_baseline": a_n, "images_other": b_n,
           "difference": (b_correct / b_n if b_n else 0.0) - (a_correct / a_n if a_n else 0.0)}
    if not a_n or not b_n:
        return {**out, "low": out["difference"], "high": out["difference"]}
    rng = np.random.default_rng(seed)
    a = rng.binomial(a_n, a_correct / a_n, size=resamples) / a_n
    b = rng.binomial(b_n, b_correct / b_n, size=resamples) / b_n
    lo, hi = _interval(b - a, level)
    return {**out, "low": lo, "high": hi}


def points(x: float) -> str:
    """A difference of accuracies in percentage points, signed: +1.3, -2.6, 0.0."""
    s = f"{100 * x:+.1f}"
    return "0.0" if s in ("+0.0", "-0.0") else s


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def verdict(diff: dict, baseline_id: int, other_id: int, baseline_acc: float, other_acc: float,
            level: float = LEVEL) -> tuple[bool, str]:
    """Whether the difference is real (its interval excludes zero) and a plain sentence that says so."""
    lo, hi, d, n = diff["low"], diff["high"], diff["difference"], diff["images"]
    conf = f"{round(100 * level)}%"
    same = " the same" if diff["method"] == "paired" else ""
    images = f"{n} val images" if diff["method"] == "paired" or diff.get("images_baseline") == diff.get(
        "images_other") else f"{diff['images_baseline']} and {diff['images_other']} val images"
    head = f"Job {other_id} scores {_pct(other_acc)} and job {baseline_id} {_pct(baseline_acc)} on{same} {images}."
    if diff["method"] == "paired" and diff["only_baseline_right"] == diff["only_other_right"] == 0:
        return False, (f"{head} Both jobs get exactly the same val images right: there is no difference "
                       "to tell apart.")
    real = lo > 0 or hi < 0
    interval = f"the {conf} interval of the difference, {points(lo)} to {points(hi)} points"
    if real:
        better = other_id if d > 0 else baseline_id
        return True, (f"{head} The difference ({points(d)} points) is real: {interval}, excludes zero, so "
                      f"job {better} is better on images like these.")
    return False, (f"{head} The difference ({points(d)} points) is within noise: {interval}, includes zero. "
                   f"With {n} val images, differences this small cannot be told apart.")


# ---------------------------------------------------------------- ids


def parse_ids(raw: str | Iterable[str] | None) -> list[int]:
    """Job ids from `ids=3,5,7` (or repeated `ids=3&ids=5`), in order, without repeats."""
    parts = [raw] if isinstance(raw, str) else list(raw or [])
    tokens = [t.strip() for p in parts for t in str(p).split(",") if t.strip()]
    if not tokens:
        raise BadRequest(f"no jobs to compare: give their ids, e.g. {IDS_HELP}")
    bad = [t for t in tokens if not (t.isascii() and t.isdigit() and len(t) <= 12)]
    if bad:
        shown = ", ".join(repr(t[:20]) for t in bad[:5])
        raise BadRequest(f"{shown} {'is not a job id' if len(bad) == 1 else 'are not job ids'}: give job "
                         f"numbers, e.g. {IDS_HELP}", {"invalid": [t[:20] for t in bad[:20]]})
    ids = list(dict.fromkeys(int(t) for t in tokens))
    if len(ids) < MIN_JOBS:
        raise BadRequest(f"comparing needs at least {MIN_JOBS} different jobs, got {len(ids)}: add another "
                         f"id, e.g. {IDS_HELP}")
    if len(ids) > MAX_JOBS:
        raise BadRequest(f"at most {MAX_JOBS} jobs can be compared at once, got {len(ids)}: drop some ids")
    return ids


# ---------------------------------------------------------------- the comparison


_utc = iso_utc


def _outcomes(report: dict) -> tuple[int, int, np.ndarray | None]:
    """(right, images, per-image right/wrong in the report's fixed order or None) of a job's report."""
    yt, yp = report.get("y_true"), report.get("y_pred")
    if report.get("task") == "multilabel":  # right: every label of the image (the subset accuracy)
        if not isinstance(yt, list) or not isinstance(yp, list) or len(yt) != len(yp):
            return 0, 0, None
        right = np.asarray(yt) == np.asarray(yp)
        return int(right.sum()), len(yt), right if report.get("val_set") else None
    cm = np.asarray(report.get("confusion_matrix") or [[0]], dtype=np.int64)
    n, k = int(cm.sum()), int(np.trace(cm))
    if isinstance(yt, list) and isinstance(yp, list) and len(yt) == len(yp) == n and report.get("val_set"):
        return k, n, np.asarray(yt) == np.asarray(yp)
    return k, n, None


def difference(base: dict, other: dict, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The difference in val accuracy of `other` over `base` (two reports): paired when both carry
    per-image predictions on the same val images, independent otherwise (with the reason)."""
    ka, na, ra = _outcomes(base)
    kb, nb, rb = _outcomes(other)
    if ra is not None and rb is not None and base["val_set"] == other["val_set"] \
            and base["y_true"] == other["y_true"]:
        return paired_difference(ra, rb, resamples, seed)
    out = independent_difference(ka, na, kb, nb, resamples, seed)
    if ra is None or rb is None:
        out["reason"] = "per-image predictions are not stored for jobs trained before they were recorded"
    else:
        out["reason"] = "the jobs were validated on different images (a different val split)"
    return out


def _ml_samples(report: dict, resamples: int, seed: int) -> dict[str, np.ndarray] | None:
    """A multi-label report's bootstrap samples of micro F1 and mAP (mAP only when its scores are stored)."""
    classes = report.get("classes") or []
    yt, yp = report.get("y_true") or [], report.get("y_pred") or []
    if report.get("task") != "multilabel" or not yt or len(yt) != len(yp):
        return None
    t, pred = ml.from_masks(yt, len(classes)), ml.from_masks(yp, len(classes))
    w = ml.bootstrap_weights(len(yt), resamples, seed)
    out = {"micro_f1": ml.micro_f1_samples(t, pred, w)}
    scores = report.get("scores") or []
    if len(scores) == len(yt):
        out["mAP"] = ml.map_samples(scores, t, w)
    return out


def multilabel_figures(reports: list[dict], resamples: int = ML_RESAMPLES, seed: int = SEED
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per job: micro F1 and mAP with their intervals; per other job: the paired differences from the baseline
    (on the same val images), or why there are none."""
    samples = [_ml_samples(r, resamples, seed) for r in reports]
    jobs = []
    for r, smp in zip(reports, samples):
        m = r.get("metrics") or {}
        row: dict[str, Any] = {}
        for name in ("micro_f1", "mAP"):
            if smp is not None and name in smp:
                lo, hi = _interval(smp[name], LEVEL)
                row.update({name: m.get(name), f"{name}_low": lo, f"{name}_high": hi})
        jobs.append(row)
    diffs = []
    base, sb = reports[0], samples[0]
    for r, smp in zip(reports[1:], samples[1:]):
        d: dict[str, Any] = {}
        same = base.get("val_set") and base.get("val_set") == r.get("val_set") and base.get("y_true") == r.get("y_true")
        for name in ("micro_f1", "mAP"):
            if sb is None or smp is None or name not in sb or name not in smp:
                continue
            if not same:
                d["reason"] = "the jobs were validated on different images: only each job's own intervals"
                continue
            diff = smp[name] - sb[name]
            lo, hi = _interval(diff, LEVEL)
            d[name] = {"diff": float((r.get("metrics") or {}).get(name, 0) - (base.get("metrics") or {}).get(name, 0)),
                       "low": lo, "high": hi, "real": not lo <= 0.0 <= hi}
        diffs.append(d)
    return jobs, diffs


def _param_value(spec: dict, name: str) -> Any:
    if name == "lr" and spec.get("lr") is None:
        try:
            return RunSpec(**spec).effective_lr()
        except Exception:  # an old or odd spec: show it as it is
            return None
    return spec.get(name)


def _param_text(spec: dict, name: str) -> str:
    v = _param_value(spec, name)
    if v is None:
        return "default"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        text = f"{v:.3g}"
    else:
        text = str(v)
    return text + (" (default)" if name == "lr" and spec.get("lr") is None else "")


def parameters(specs: list[dict]) -> list[dict]:
    """One row per parameter (RunSpec's order, then unknown keys): each job's value and whether they differ."""
    names = list(RunSpec.model_fields)
    for spec in specs:
        names += [k for k in spec if k not in names]
    rows = []
    for name in names:
        texts = [_param_text(s, name) for s in specs]
        values = [_param_value(s, name) for s in specs]
        rows.append({"name": name, "values": values, "text": texts,
                     "differs": len({t.replace(" (default)", "") for t in texts}) > 1})
    return rows


def per_class(reports: list[dict]) -> list[dict]:
    """F1 of every class for each job, and its difference from the baseline's (the first job)."""
    classes: list[str] = []
    for r in reports:
        classes += [c for c in (r.get("classes") or list(r.get("per_class") or r.get("per_label") or {}))
                    if c not in classes]
    rows = []
    for c in classes:
        f1 = [((r.get("per_class") or r.get("per_label") or {}).get(c) or {}).get("f1") for r in reports]
        support = next((((r.get("per_class") or r.get("per_label") or {}).get(c) or {}).get("support") for r in reports
                        if c in (r.get("per_class") or r.get("per_label") or {})), None)
        base = f1[0]
        rows.append({"class": c, "support": support, "f1": f1,
                     "diff": [None if i == 0 or v is None or base is None else v - base for i, v in enumerate(f1)]})
    return rows


def _curves(session: Session, ids: list[int]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {i: [] for i in ids}
    rows = session.scalars(select(EpochMetric).where(EpochMetric.job_id.in_(ids))
                           .order_by(EpochMetric.job_id, EpochMetric.epoch))
    for m in rows:
        out[m.job_id].append({"epoch": m.epoch, "phase": m.phase, "train_loss": m.train_loss,
                              "train_acc": m.train_acc, "val_loss": m.val_loss, "val_acc": m.val_acc,
                              "is_best": m.is_best})
    return out


def _given(summary: RunSummary, name: str) -> Any:
    """A stored field, None when the stored result did not have it (an older job)."""
    return getattr(summary, name) if name in summary.model_fields_set else None


def _report(job: Job) -> dict | None:
    """The job's evaluation report as stored, when it has one with a confusion matrix."""
    summary = RunSummary.from_stored(job.result)
    if summary is None or summary.report is None or not summary.report.confusion_matrix:
        return None
    return summary.report.to_json()


def load_jobs(session: Session, user: User, ids: list[int]) -> list[Job]:
    """The user's jobs with these ids, checked: all exist and are theirs (404), all succeeded with an
    evaluation (409), all on one dataset (422)."""
    jobs = []
    for jid in ids:
        job = access.get_visible(session, Job, user, jid)
        if job is None:
            raise NotFound(f"job {jid} not found: list yours with GET /api/v1/jobs", {"job_id": jid})
        jobs.append(job)
    unfinished = [j for j in jobs if j.status != JobStatus.succeeded.value]
    if unfinished:
        what = ", ".join(f"job {j.id} is {j.status}" for j in unfinished)
        raise Conflict(f"only succeeded jobs have val results to compare: {what}; wait for "
                       f"{'it' if len(unfinished) == 1 else 'them'} to finish or leave "
                       f"{'it' if len(unfinished) == 1 else 'them'} out",
                       {"not_succeeded": [{"job_id": j.id, "status": j.status} for j in unfinished]})
    no_report = [j.id for j in jobs if _report(j) is None]
    if no_report:
        raise Conflict(f"job(s) {', '.join(map(str, no_report))} have no evaluation report to compare: "
                       "train them again or leave them out", {"no_report": no_report})
    families = {j.dataset.family_id if j.dataset is not None else -j.dataset_id for j in jobs}
    if len(families) > 1:
        which = "; ".join(f"job {j.id} on dataset {j.dataset_id}" for j in jobs)
        raise Unprocessable(f"the jobs were trained on different datasets ({which}): compare jobs of one "
                            "dataset or of versions of one dataset (POST /api/v1/datasets/{id}/versions)",
                            {"datasets": {str(j.id): j.dataset_id for j in jobs}})
    return jobs


def compare(session: Session, user: User, raw_ids: str | Iterable[str] | None,
            resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Everything the comparison page and GET /api/v1/jobs/compare show; the first job is the baseline."""
    jobs = load_jobs(session, user, parse_ids(raw_ids))
    summaries = [RunSummary.from_stored(j.result) or RunSummary(status=j.status) for j in jobs]
    reports = [r for r in (_report(j) for j in jobs) if r is not None]
    curves = _curves(session, [j.id for j in jobs])
    out_jobs: list[dict[str, Any]] = []
    for j, rep, res in zip(jobs, reports, summaries):
        k, n, right = _outcomes(rep)
        lo, hi = accuracy_interval(k, n, resamples, seed)
        out_jobs.append({
            "id": j.id, "status": j.status, "created_at": _utc(j.created_at), "finished_at": _utc(j.finished_at),
            "dataset_id": j.dataset_id, "dataset_version": j.dataset_version,
            "spec": j.spec,
            "metrics": {"val_acc": k / n if n else 0.0, "val_acc_low": lo, "val_acc_high": hi, "val_images": n,
                        "val_right": k, "macro_f1": rep.get("macro_f1"), "val_loss": _given(res, "val_loss"),
                        "best_epoch": _given(res, "best_epoch"), "epochs_run": _given(res, "epochs_run"),
                        "seconds": _given(res, "seconds"), "device": _given(res, "device"),
                        "top_k": rep.get("top_k") or {}},
            "per_image": right is not None, "val_set": rep.get("val_set") if right is not None else None,
            "curves": curves[j.id],
        })
    ml_jobs, ml_diffs = multilabel_figures(reports) if any(r.get("task") == "multilabel" for r in reports) else \
        ([{} for _ in reports], [{} for _ in reports[1:]])
    for oj, extra in zip(out_jobs, ml_jobs):
        oj["metrics"].update(extra)
    base, base_acc = jobs[0], out_jobs[0]["metrics"]["val_acc"]
    comparisons = []
    for j, rep, oj, mld in zip(jobs[1:], reports[1:], out_jobs[1:], ml_diffs):
        d = difference(reports[0], rep, resamples, seed)
        if j.dataset_id != base.dataset_id and str(d.get("reason", "")).startswith("the jobs were validated on"):
            d["reason"] = (f"the jobs trained on different versions of the dataset (v{base.dataset_version} and "
                           f"v{j.dataset_version}), whose val images or labels differ")
        real, sentence = verdict(d, base.id, j.id, base_acc, oj["metrics"]["val_acc"])
        comparisons.append({"job_id": j.id, "baseline_id": base.id, **d, "real": real, "sentence": sentence,
                            **({"multilabel": mld} if mld else {})})
    params = parameters([j.spec or {} for j in jobs])
    return {
        "dataset": {"id": base.dataset_id, "name": base.dataset.name if base.dataset else None},
        "baseline_id": base.id,
        "jobs": out_jobs,
        "parameters": params,
        "differing_parameters": [p["name"] for p in params if p["differs"]],
        "per_class": per_class(reports),
        "comparisons": comparisons,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL, "kind": "percentile"},
    }
