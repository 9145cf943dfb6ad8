"""Classification metrics from true and predicted labels (numpy only, no torch)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, the confusion matrix and per-class precision, recall, F1 and support.
    A class never predicted has precision 0; one absent from y_true has recall 0 (support 0)."""
    n = len(classes)
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(float)
    pred = cm.sum(0).astype(float)
    support = cm.sum(1).astype(float)
    precision = np.divide(tp, pred, out=np.zeros(n), where=pred > 0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
    total = cm.sum()
    per_class = {
        c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "support": int(support[i])}
        for i, c in enumerate(classes)
    }
    present = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
        "per_class": per_class,
    }


def top_k_accuracy(probs: np.ndarray, y_true: Sequence[int], ks: Sequence[int] = (3, 5)) -> dict[str, float]:
    """Share of images whose true class is among the k most probable, for each k below the class count."""
    probs = np.asarray(probs)
    y = np.asarray(y_true)
    order = np.argsort(-probs, axis=1)
    out = {}
    for k in ks:
        if k < probs.shape[1]:
            out[f"top{k}"] = float((order[:, :k] == y[:, None]).any(1).mean()) if len(y) else 0.0
    return out


def mistakes(probs: np.ndarray, y_true: Sequence[int], files: Sequence[str], classes: Sequence[str],
             limit: int = 60) -> list[dict[str, Any]]:
    """Misclassified images, most confident mistakes first."""
    probs = np.asarray(probs)
    pred = probs.argmax(1)
    wrong = [i for i in range(len(y_true)) if pred[i] != y_true[i]]
    wrong.sort(key=lambda i: -float(probs[i, pred[i]]))
    return [{"file": files[i], "true": classes[y_true[i]], "predicted": classes[int(pred[i])],
             "confidence": round(float(probs[i, pred[i]]), 4),
             "true_class_probability": round(float(probs[i, y_true[i]]), 4)} for i in wrong[:limit]]


def val_set_id(files: Sequence[str]) -> str:
    """An id of a set of val images: the start of the sha256 of their sorted relative paths. Two runs with
    the same id were validated on the same images."""
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:16]


def predictions(y_true: Sequence[int], y_pred: Sequence[int], files: Sequence[str]) -> dict[str, Any]:
    """Each val image's true and predicted class index, in the order of the sorted file paths (whatever
    order the run saw them in), with the id of that set of files: two runs on the same val images can be
    compared image by image (a paired bootstrap). Ints only, to keep the stored report small."""
    order = sorted(range(len(files)), key=lambda i: files[i])
    return {"val_set": val_set_id(files), "y_true": [int(y_true[i]) for i in order],
            "y_pred": [int(y_pred[i]) for i in order]}


def evaluation(probs: np.ndarray, y_true: Sequence[int], files: Sequence[str],
               classes: Sequence[str]) -> dict[str, Any]:
    """The classification report plus top-k accuracy (more than 5 classes), the mistakes gallery and the
    per-image predictions (see `predictions`)."""
    probs = np.asarray(probs)
    y_pred = probs.argmax(1).tolist() if len(probs) else []
    rep = classification_report(y_true, y_pred, classes)
    rep["top_k"] = top_k_accuracy(probs, y_true) if len(classes) > 5 else {}
    rep["mistakes"] = mistakes(probs, y_true, files, classes)
    rep["images"] = int(len(y_true))
    rep.update(predictions(y_true, y_pred, files))
    return rep


def confusion_png(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path) -> None:
    """Draw the confusion matrix (rows = true class, columns = predicted) as a PNG a person can read:
    cells shaded by the share of their row, with counts and class names."""
    from PIL import Image, ImageDraw, ImageFont

    counts = np.asarray(cm, dtype=float)
    n = len(classes)
    font = ImageFont.load_default(size=14) if hasattr(ImageFont, "load_default") else None
    names = [c if len(c) <= 18 else c[:17] + "…" for c in classes]
    cell = max(36, min(72, 720 // max(n, 1)))
    label_w = 16 + 8 * max(len(c) for c in names)
    top = 40 + label_w
    left = 40 + label_w
    W, H = left + n * cell + 20, top + n * cell + 20
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), "predicted class (columns)", fill="black", font=font)
    d.text((4, top - 22), "true class (rows)", fill="black", font=font)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    for i in range(n):
        d.text((8, top + i * cell + cell // 2 - 7), names[i], fill="black", font=font)
        col = Image.new("RGBA", (label_w, 18), (255, 255, 255, 0))
        ImageDraw.Draw(col).text((0, 0), names[i], fill="black", font=font)
        img.paste(col.rotate(90, expand=True), (left + i * cell + cell // 2 - 9, 30), col.rotate(90, expand=True))
        for j in range(n):
            s = share[i, j]
            good = i == j
            color = (int(255 - 180 * s), int(255 - 60 * s), int(255 - 180 * s)) if good else \
                (int(255 - 30 * s), int(255 - 170 * s), int(255 - 170 * s))
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline=(200, 200, 200))
            txt = str(int(counts[i, j]))
            d.text((x0 + cell // 2 - 4 * len(txt), y0 + cell // 2 - 8), txt, fill="black", font=font)
    img.save(path, format="PNG")
