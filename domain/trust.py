"""Whether to trust an answer, in numbers (numpy only, no torch): the expected calibration error and its
reliability bins, the coverage-vs-accuracy curve of an abstention threshold and the default operating point,
and the reliability diagram as a PNG.

Definitions (Guo et al. 2017, "On Calibration of Modern Neural Networks"): an image's confidence is its top
probability; the images are put into `N_BINS` equal-width confidence bins (lo, hi]; ECE is the count-weighted
mean of |accuracy - mean confidence| over the bins. A calibrated model's 80% answers are right 80% of the time.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

N_BINS = 15
# the default operating point keeps at least this share of the in-distribution val images answered
MIN_COVERAGE = 0.9
# the thresholds the coverage curve is drawn at: 0.00, 0.01, ..., 1.00 (101 points, small enough to store)
CURVE_STEPS = 100

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def softmax(logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """softmax(logits / temperature) along the last axis, computed stably."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=-1, keepdims=True)
    return out


def confidence_and_correct(probs: npt.ArrayLike, labels: Sequence[int] | npt.ArrayLike) -> tuple[FloatArray, BoolArray]:
    """Each image's top probability, and whether its top class is the true one."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probabilities {p.shape} and labels ({len(y)}) do not match: one row per label")
    correct: BoolArray = p.argmax(1) == y
    conf: FloatArray = p.max(1)
    return conf, correct


def reliability_bins(confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = N_BINS) -> list[dict[str, Any]]:
    """Per equal-width bin (lo, hi] (the first also takes 0): its edges, the mean confidence and the accuracy of
    its images (None for an empty bin) and their count: the data of a reliability diagram."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds (edges[i], edges[i + 1]]; a confidence of exactly 0 goes to the first bin
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    out: list[dict[str, Any]] = []
    for i in range(n_bins):
        m = idx == i
        n = int(m.sum())
        out.append({"lo": round(float(edges[i]), 6), "hi": round(float(edges[i + 1]), 6), "count": n,
                    "confidence": float(conf[m].mean()) if n else None,
                    "accuracy": float(ok[m].mean()) if n else None})
    return out


def ece_of_bins(bins: Sequence[dict[str, Any]]) -> float:
    """The expected calibration error of reliability bins (count-weighted mean |accuracy - confidence|)."""
    total = sum(int(b["count"]) for b in bins)
    if not total:
        return 0.0
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / total)


def expected_calibration_error(confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = N_BINS) -> float:
    """ECE with `n_bins` equal-width bins (the standard 15 by default)."""
    return ece_of_bins(reliability_bins(confidence, correct, n_bins))


def coverage_curve(confidence: npt.ArrayLike, correct: npt.ArrayLike, flagged: npt.ArrayLike | None = None,
                   steps: int = CURVE_STEPS) -> list[dict[str, Any]]:
    """For each confidence threshold t in 0, 1/steps, ..., 1: an image is answered when its confidence is >= t
    and it is not `flagged` (out of distribution); `coverage` is the share of all images answered and
    `accuracy_when_answered` the accuracy on those (None when none is). Moving the threshold up can only lower
    the coverage."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    keep = ~np.asarray(flagged, dtype=bool) if flagged is not None else np.ones(len(conf), dtype=bool)
    n = max(len(conf), 1)
    out: list[dict[str, Any]] = []
    for i in range(steps + 1):
        t = i / steps
        ans = keep & (conf >= t - 1e-12)
        k = int(ans.sum())
        out.append({"threshold": round(t, 6), "answered": k, "coverage": k / n,
                    "accuracy_when_answered": float(ok[ans].mean()) if k else None})
    return out


def operating_point(curve: Sequence[dict[str, Any]], min_coverage: float = MIN_COVERAGE) -> dict[str, Any]:
    """The default confidence threshold: of the curve's points that still answer at least `min_coverage` of the
    images, the one with the highest accuracy when answered; among equals the lowest threshold (the most answers).
    Why: a user who sets no threshold should lose few answers (at most 10% by default, out-of-distribution
    flags included) and get the most accurate ones the val set allows at that price. When no point reaches
    `min_coverage` (more than 1 - min_coverage flagged out of distribution), the threshold is 0: abstain on
    out-of-distribution images only."""
    ok = [p for p in curve if p["coverage"] >= min_coverage - 1e-12 and p["accuracy_when_answered"] is not None]
    if not ok:
        return dict(curve[0])
    best = max(float(p["accuracy_when_answered"]) for p in ok)
    return dict(min((p for p in ok if float(p["accuracy_when_answered"]) >= best - 1e-12),
                    key=lambda p: float(p["threshold"])))


def point_at(curve: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The curve's point for a threshold the user moved to (the nearest threshold at or below it)."""
    below = [p for p in curve if float(p["threshold"]) <= threshold + 1e-12]
    return dict(below[-1] if below else curve[0])


def false_accept_at(junk: dict[str, Any] | None, threshold: float) -> float | None:
    """The share of the images of no class the model still answers on at a confidence threshold: those the
    OOD check did not flag (`accepted_confidences`, their calibrated confidences) at or above it. None when
    the dataset had no such images."""
    if not isinstance(junk, dict) or not junk.get("images") or "accepted_confidences" not in junk:
        return None
    conf = np.asarray(junk["accepted_confidences"], dtype=np.float64)
    return float((conf >= threshold - 1e-12).sum()) / float(junk["images"])


def abstain(confidence: npt.ArrayLike, ood_score: npt.ArrayLike | None, confidence_threshold: float,
            ood_threshold: float | None) -> BoolArray:
    """Which images are abstained on: unlike the training images (score above the OOD threshold) or not sure
    enough (calibrated confidence below the confidence threshold)."""
    conf = np.asarray(confidence, dtype=np.float64)
    out: BoolArray = conf < confidence_threshold - 1e-12
    if ood_score is not None and ood_threshold is not None:
        out = out | (np.asarray(ood_score, dtype=np.float64) > ood_threshold)
    return out


def reliability_png(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], path: str | Path,
                    ece_before: float | None = None, ece_after: float | None = None) -> None:
    """Draw the reliability diagrams before and after calibration side by side: per bin a bar of its accuracy
    (blue; its width is the bin, its shade the share of images in it), a red mark at its mean confidence and the
    diagonal a calibrated model follows (drawn like `evaluate.confusion_png`, with Pillow)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    size, pad, top = 300, 50, 56
    img = Image.new("RGB", (2 * (size + 2 * pad), size + top + pad + 30), "white")
    d = ImageDraw.Draw(img)
    for k, (title, bins, ece) in enumerate((("before calibration", before, ece_before),
                                            ("after calibration", after, ece_after))):
        x0, y0 = k * (size + 2 * pad) + pad, top
        head = title + (f" (ECE {ece:.3f})" if ece is not None else "")
        d.text((x0, 8), head, fill="black", font=font)
        d.text((x0 - 40, 30), "accuracy", fill="black", font=font)
        total = max(sum(int(b["count"]) for b in bins), 1)
        for b in bins:
            if not b["count"]:
                continue
            bx0, bx1 = x0 + b["lo"] * size, x0 + b["hi"] * size
            shade = int(200 - 150 * min(1.0, 4 * b["count"] / total))
            d.rectangle([bx0, y0 + (1 - b["accuracy"]) * size, bx1 - 1, y0 + size], fill=(shade, shade, 255),
                        outline=(60, 60, 160))
            cy = y0 + (1 - b["confidence"]) * size
            d.line([bx0, cy, bx1 - 1, cy], fill=(200, 30, 30), width=3)
        d.line([x0, y0 + size, x0 + size, y0], fill=(120, 120, 120), width=1)
        d.rectangle([x0, y0, x0 + size, y0 + size], outline="black")
        for t in (0.0, 0.5, 1.0):
            d.text((x0 + t * size - 8, y0 + size + 4), f"{t:.1f}", fill="black", font=font)
            d.text((x0 - 30, y0 + (1 - t) * size - 8), f"{t:.1f}", fill="black", font=font)
        d.text((x0 + size // 2 - 40, y0 + size + 22), "confidence", fill="black", font=font)
    d.text((pad, top + size + 42), "bars: accuracy of each confidence bin (darker: more images); red: its mean "
           "confidence; diagonal: calibrated", fill=(80, 80, 80), font=font)
    img.save(path, format="PNG")
