"""Multi-label evaluation (issue 16), numpy only: per-label thresholds tuned for F1 on the val set, the
figures at them (micro and macro F1, mAP, subset accuracy; per label precision, recall, F1, AP, support and its
confusion counts), and the mistakes gallery by label (missed and false labels).

Thresholds tuned on the images they are scored on would flatter the figures, so the reported figures are
cross-fitted like the calibration (each val image scored with thresholds tuned on the other folds; under 10
images they are not, and the report says so); the thresholds kept for predictions are tuned on all val images.
An image's labels are stored per image as a bit mask (bit i: classes[i]) so that runs on the same val images
can be compared image by image.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_THRESHOLD = 0.5
MIN_FOR_FOLDS = 10
MISTAKES = 60
MAX_STORED_SCORES = 200_000
MIN_GAIN_IMAGES = 1.0  # a threshold moves from 0.5 only for an F1 gain of at least this many images' worth  # val images x labels

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def sigmoid(logits: npt.ArrayLike) -> FloatArray:
    z = np.asarray(logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def multi_hot(label_sets: Sequence[Sequence[int]], y: Sequence[int], n_classes: int) -> BoolArray:
    """[images, classes] targets of images whose label is an index into `label_sets`."""
    out = np.zeros((len(y), n_classes), dtype=bool)
    for i, s in enumerate(y):
        out[i, list(label_sets[int(s)])] = True
    return out


def _f1(tp: float, fp: float, fn: float) -> float:
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def _counts(pred: BoolArray, t: BoolArray) -> tuple[int, int, int]:
    return int((pred & t).sum()), int((pred & ~t).sum()), int((~pred & t).sum())


def tune_thresholds(probs: npt.ArrayLike, targets: npt.ArrayLike) -> FloatArray:
    """Per label, the threshold (predict the label when its probability is at or above it) with the best F1
    on these images: candidates are midpoints between sorted probabilities; ties go to the one nearest 0.5; a
    label without positives here keeps 0.5, and so does one whose best F1 is not better than 0.5's by what
    MIN_GAIN_IMAGES more right images would give (on a few val images a tuned threshold fits their noise)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets, dtype=bool)
    out = np.full(p.shape[1], DEFAULT_THRESHOLD)
    for c in range(p.shape[1]):
        pos = int(t[:, c].sum())
        if pos == 0:
            continue
        order = np.argsort(-p[:, c], kind="stable")
        ps, ts = p[order, c], t[order, c]
        tp = np.cumsum(ts)
        fp = np.cumsum(~ts)
        f1 = 2 * tp / (2 * tp + fp + (pos - tp))
        # cut after index k: predict the first k+1 images; only where the next probability differs
        distinct = np.append(ps[:-1] > ps[1:], True)
        cuts = np.flatnonzero(distinct)
        best = f1[cuts].max()
        at_half = _f1(*_counts(ps >= DEFAULT_THRESHOLD, ts))
        if best - at_half < MIN_GAIN_IMAGES / (2 * pos):  # not worth moving: it would fit the noise of few images
            continue
        cands = [(ps[k] + ps[k + 1]) / 2 if k + 1 < len(ps) else ps[k] / 2 for k in cuts if f1[k] >= best - 1e-12]
        out[c] = float(min(cands, key=lambda x: abs(x - DEFAULT_THRESHOLD)))
    return out


def _folds(n: int, folds: int, seed: int) -> list[npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)
    return [idx[f::folds] for f in range(folds)]


def cross_fitted_thresholds(probs: npt.ArrayLike, targets: npt.ArrayLike, folds: int = 5,
                            seed: int = 0) -> tuple[FloatArray, int]:
    """[images, classes] thresholds: each image's tuned without its fold (and the number of folds: 0 when
    there were too few images, then every image gets the thresholds tuned on all)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets, dtype=bool)
    if len(p) < MIN_FOR_FOLDS:
        return np.tile(tune_thresholds(p, t), (len(p), 1)), 0
    folds = min(folds, len(p))
    out = np.empty_like(p)
    for held in _folds(len(p), folds, seed):
        rest = np.setdiff1d(np.arange(len(p)), held)
        out[held] = tune_thresholds(p[rest], t[rest])
    return out, folds


def average_precision(scores: npt.ArrayLike, positives: npt.ArrayLike) -> float | None:
    """Area under the precision-recall curve as the mean precision at each positive (ties broken pessimistically
    would need ranks; scores are continuous here). None without positives."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    if not y.any():
        return None
    order = np.argsort(-s, kind="stable")
    hits = y[order]
    prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(prec[hits].mean())


def bitmask(row: npt.ArrayLike) -> int:
    return int(sum(1 << int(i) for i in np.flatnonzero(np.asarray(row, dtype=bool))))


def _scores(pred: BoolArray, t: BoolArray, probs: FloatArray, classes: Sequence[str],
            thresholds: FloatArray) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    tp = (pred & t).sum(0)
    fp = (pred & ~t).sum(0)
    fn = (~pred & t).sum(0)
    tn = (~pred & ~t).sum(0)
    per: dict[str, dict[str, Any]] = {}
    aps = []
    for c, name in enumerate(classes):
        ap = average_precision(probs[:, c], t[:, c])
        if ap is not None:
            aps.append(ap)
        per[name] = {"precision": float(tp[c] / (tp[c] + fp[c])) if tp[c] + fp[c] else 0.0,
                     "recall": float(tp[c] / (tp[c] + fn[c])) if tp[c] + fn[c] else 0.0,
                     "f1": _f1(tp[c], fp[c], fn[c]), "ap": ap, "support": int(t[:, c].sum()),
                     "threshold": round(float(thresholds[c]), 4),
                     "tp": int(tp[c]), "fp": int(fp[c]), "fn": int(fn[c]), "tn": int(tn[c])}
    with_pos = [per[n]["f1"] for n in classes if per[n]["support"]]
    metrics = {"micro_f1": _f1(tp.sum(), fp.sum(), fn.sum()),
               "macro_f1": float(np.mean(with_pos)) if with_pos else 0.0,
               "mAP": float(np.mean(aps)) if aps else 0.0,
               "subset_accuracy": float((pred == t).all(1).mean()) if len(t) else 0.0}
    return metrics, per


def label_mistakes(probs: FloatArray, pred: BoolArray, t: BoolArray, files: Sequence[str],
                   classes: Sequence[str], limit: int = MISTAKES) -> list[dict[str, Any]]:
    """Images with a missed or a false label, the most confident error first (a false label's probability,
    or one minus a missed label's)."""
    out = []
    for i in range(len(files)):
        missed = np.flatnonzero(t[i] & ~pred[i])
        false = np.flatnonzero(pred[i] & ~t[i])
        if not len(missed) and not len(false):
            continue
        worst = max([float(probs[i, c]) for c in false] + [1.0 - float(probs[i, c]) for c in missed])
        out.append((worst, {"file": files[i], "true": [classes[int(c)] for c in np.flatnonzero(t[i])],
                            "predicted": [classes[int(c)] for c in np.flatnonzero(pred[i])],
                            "missed": [classes[int(c)] for c in missed], "false": [classes[int(c)] for c in false],
                            "probabilities": {classes[c]: round(float(probs[i, c]), 4) for c in range(len(classes))},
                            "confidence": round(worst, 4)}))
    out.sort(key=lambda x: -x[0])
    return [m for _, m in out[:limit]]


def evaluation(probs: npt.ArrayLike, targets: npt.ArrayLike, files: Sequence[str], classes: Sequence[str],
               seed: int = 0) -> dict[str, Any]:
    """The multi-label evaluation report of val probabilities (sigmoid) against multi-hot targets: the kept
    thresholds, the cross-fitted figures at them and at 0.5, per-label scores, the mistakes by label and each
    image's true and predicted label masks in sorted file order (with the val set's id)."""
    from .evaluate import val_set_id

    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets, dtype=bool)
    kept = tune_thresholds(p, t)
    per_image, folds = cross_fitted_thresholds(p, t, seed=seed)
    pred = p >= per_image - 1e-12
    metrics, per = _scores(pred, t, p, classes, kept)
    at_half, _ = _scores(p >= DEFAULT_THRESHOLD, t, p, classes, np.full(len(classes), DEFAULT_THRESHOLD))
    order = sorted(range(len(files)), key=lambda i: files[i])
    return {
        "task": "multilabel", "accuracy": metrics["subset_accuracy"], "macro_f1": metrics["macro_f1"],
        "metrics": metrics, "metrics_at_half": at_half, "classes": list(classes), "per_label": per,
        "thresholds": {c: round(float(kept[i]), 4) for i, c in enumerate(classes)},
        "thresholds_cross_fitted": folds > 0, "threshold_folds": folds,
        "label_mistakes": label_mistakes(p, pred, t, files, classes), "images": int(len(t)),
        "val_set": val_set_id(files), "y_true": [bitmask(t[i]) for i in order],
        "y_pred": [bitmask(pred[i]) for i in order],
        # the per-image probabilities a paired bootstrap of mAP needs (left out where they would bloat the result)
        "scores": [[round(float(x), 4) for x in p[i]] for i in order] if p.size <= MAX_STORED_SCORES else [],
    }


def metrics_at(probs: npt.ArrayLike, targets: npt.ArrayLike, classes: Sequence[str],
               thresholds: Sequence[float]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The figures at given per-label thresholds (the job page's moved thresholds)."""
    p = np.asarray(probs, dtype=np.float64)
    th = np.asarray(thresholds, dtype=np.float64)
    return _scores(p >= th - 1e-12, np.asarray(targets, dtype=bool), p, classes, th)


# ---------------------------------------------------------------- bootstrap (the run comparison)


def bootstrap_weights(n: int, resamples: int, seed: int) -> npt.NDArray[np.float64]:
    """[resamples, n] how often each image is drawn in each resample (a percentile bootstrap over images; the
    same seed and n give the same draws, so two runs on the same val images are resampled in pairs)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64) if n else np.zeros((resamples, 0))


def micro_f1_samples(targets: npt.ArrayLike, pred: npt.ArrayLike, weights: npt.NDArray[np.float64]) -> FloatArray:
    t, p = np.asarray(targets, dtype=bool), np.asarray(pred, dtype=bool)
    per = np.stack([(p & t).sum(1), (p & ~t).sum(1), (~p & t).sum(1)], axis=1).astype(np.float64)
    tp, fp, fn = (weights @ per).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)


def map_samples(scores: npt.ArrayLike, targets: npt.ArrayLike, weights: npt.NDArray[np.float64]) -> FloatArray:
    """mAP of each resample: per label, the images sorted once by score, then each resample's weighted
    precision at every positive (a drawn image counts as many times as it is drawn)."""
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=bool)
    aps = []
    for c in range(s.shape[1]):
        order = np.argsort(-s[:, c], kind="stable")
        hit = t[order, c].astype(np.float64)
        w = weights[:, order]
        seen = np.cumsum(w, axis=1)
        right = np.cumsum(w * hit, axis=1)
        pos = (w * hit).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = np.where(pos > 0, (w * hit * (right / np.maximum(seen, 1e-12))).sum(1) / np.maximum(pos, 1e-12),
                          np.nan)
        aps.append(ap)
    out = np.nanmean(np.stack(aps), axis=0) if aps else np.zeros(len(weights))
    return np.nan_to_num(out)


def from_masks(masks: Sequence[int], n_classes: int) -> BoolArray:
    """The [images, classes] labels of stored bit masks (`y_true`, `y_pred`)."""
    return np.array([[bool(m >> c & 1) for c in range(n_classes)] for m in masks], dtype=bool).reshape(-1, n_classes)
