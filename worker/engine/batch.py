"""Batch predictions: a folder of unlabelled images through a saved model, written as a CSV and (optionally) a
zip of the images sorted into one folder per predicted class, plus `abstained/`, or the same as folders.

`predict_folder(model_path, folder, csv_path, zip_path=...)` lists the folder's images (domain.layout's image
extensions; junk such as __MACOSX/ and dot files skipped, other files listed as ignored), then predicts them
a chunk at a time with the engine's Predictor (the model file's own preprocessing, calibration and abstention:
worker/engine/predict.py), reporting progress and polling `should_stop` between chunks. An unreadable image
gets a row with an empty label and its `error`; the others finish. The CSV's columns:

    file,label,probability,abstained,top1,p1,...,topK,pK,error

`file` is the image's path inside the folder, `label` and `probability` the most likely class and its
calibrated probability, `abstained` true when the model says "none of these" (the image is unlike the
training images, or the confidence is below the threshold). Torch is only imported through the Predictor;
nothing here knows about the web tier or the queue.
"""
from __future__ import annotations

import csv
import os
import shutil
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from domain.callbacks import BatchProgress, Callbacks
from domain.layout import IMAGE_EXTS, JUNK_NAMES

ABSTAINED = "abstained"
STAGE = "predict"
MAX_LISTED = 100  # unreadable and ignored files named in the result (all of them are in the CSV)
MAX_MESSAGES = 20  # unreadable images reported one by one as messages; the rest in one line


def columns(top_k: int) -> list[str]:
    """The CSV's header for `top_k` columns of classes."""
    tops = [c for i in range(1, top_k + 1) for c in (f"top{i}", f"p{i}")]
    return ["file", "label", "probability", "abstained", *tops, "error"]


def _junk(name: str) -> bool:
    return name in JUNK_NAMES or name.startswith(".")


def list_images(folder: str | Path) -> tuple[list[str], list[str]]:
    """(the image files under `folder`, the other files), as sorted relative POSIX paths. Junk (__MACOSX/,
    .DS_Store, dot files) is neither; symbolic links are not followed."""
    root = Path(folder)
    images: list[str] = []
    other: list[str] = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not _junk(x))
        base = Path(d).relative_to(root)
        for f in sorted(files):
            if _junk(f) or (Path(d) / f).is_symlink():
                continue
            rel = (base / f).as_posix()
            (images if Path(f).suffix.lower() in IMAGE_EXTS else other).append(rel)
    return sorted(images), sorted(other)


@dataclass
class BatchResult:
    status: str  # "completed" | "stopped"
    images: int  # readable or not
    predicted: int  # read and answered (abstained included)
    abstained: int
    unreadable: int
    counts: dict[str, int]  # images per folder of the sorted output: each class, then `abstained`
    errors: list[dict[str, str]] = field(default_factory=list)  # {"file", "error"}: the first MAX_LISTED
    ignored: list[str] = field(default_factory=list)  # files that are not images: the first MAX_LISTED
    n_ignored: int = 0
    classes: list[str] = field(default_factory=list)
    top_k: int = 0
    confidence_threshold: float | None = None  # the one applied (None: the model never abstains)
    columns: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Sink:
    """Where predicted images go: a zip (entries `<folder>/<file>`, stored: images are compressed already)
    and/or a folder of folders."""

    def __init__(self, zip_path: Path | None, sort_into: Path | None):
        self.zf = zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED, allowZip64=True) if zip_path else None
        self.root = Path(sort_into) if sort_into else None

    def add(self, folder: str, name: str, src: Path) -> None:
        if self.zf is not None:
            self.zf.write(src, f"{folder}/{name}")
        if self.root is not None:
            dest = self.root / folder / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)

    def close(self) -> None:
        if self.zf is not None:
            self.zf.close()


def _safe_name(name: str) -> str:
    """An entry name that stays inside its folder (names come from list_images or the caller's file names)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "image"


def predict_images(model_path: str | Path, items: Sequence[tuple[str, Path]], csv_path: str | Path, *,
                   zip_path: str | Path | None = None, sort_into: str | Path | None = None, top_k: int = 3,
                   confidence_threshold: float | None = None, callbacks: Callbacks | None = None,
                   batch_size: int = 32, chunk: int | None = None, device: str | None = None,
                   ignored: Sequence[str] = ()) -> BatchResult:
    """Predict (name, path) pairs in order; see the module's docstring. Returns a BatchResult whose status
    is "stopped" when `callbacks.should_stop()` said so (the files written so far are left as they are)."""
    from .device import pick_device
    from .predict import Predictor

    cb = callbacks or Callbacks()
    t0 = time.perf_counter()
    dev = pick_device(device)
    predictor = Predictor(model_path, str(dev))
    classes = predictor.classes
    k = max(1, min(int(top_k), len(classes)))
    threshold = confidence_threshold if confidence_threshold is not None else (
        predictor.trust.confidence_threshold if predictor.trust.fitted else None)
    abstained_dir = ABSTAINED if ABSTAINED not in classes else f"_{ABSTAINED}"
    counts = dict.fromkeys([*classes, abstained_dir], 0)
    res = BatchResult(status="completed", images=len(items), predicted=0, abstained=0, unreadable=0, counts=counts,
                      ignored=list(ignored[:MAX_LISTED]), n_ignored=len(ignored), classes=list(classes), top_k=k,
                      confidence_threshold=threshold, columns=columns(k), device=str(dev))
    if ignored:
        cb.on_message(f"ignored {len(ignored)} file(s) that are not images ({', '.join(ignored[:5])}"
                      f"{', ...' if len(ignored) > 5 else ''}): images end in {', '.join(sorted(IMAGE_EXTS))}")
    step = max(1, chunk or 2 * batch_size)
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if zip_path is not None:
        Path(zip_path).parent.mkdir(parents=True, exist_ok=True)
    sink = _Sink(Path(zip_path) if zip_path else None, Path(sort_into) if sort_into else None)
    t_stage = time.perf_counter()
    try:
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(res.columns)
            for start in range(0, len(items), step):
                if cb.should_stop():
                    res.status = "stopped"
                    break
                part = items[start:start + step]
                answers = predictor.predict_sources([(name, path) for name, path in part], top_k=k,
                                                    batch_size=batch_size, confidence_threshold=confidence_threshold)
                for (name, path), r in zip(part, answers):
                    w.writerow(_row(name, r, k, res, cb))
                    if "error" not in r:
                        folder = abstained_dir if r["abstained"] else r["top"][0]["class"]
                        res.counts[folder] += 1
                        sink.add(folder, _safe_name(name), path)
                done = start + len(part)
                now = time.perf_counter()
                eta = (now - t_stage) / done * (len(items) - done)
                cb.on_progress(BatchProgress(STAGE, 0, 0, done, len(items), now - t0, eta,
                                             done / len(items)))
    finally:
        sink.close()
    if res.unreadable > MAX_MESSAGES:
        cb.on_message(f"... and {res.unreadable - MAX_MESSAGES} more unreadable image(s): see the error column of "
                      f"{csv_path.name}")
    res.seconds = round(time.perf_counter() - t0, 3)
    res.images_per_s = round(res.predicted / max(time.perf_counter() - t_stage, 1e-9), 1)
    if res.status == "completed":
        cb.on_message(f"{res.images} image(s): {res.predicted} predicted ({res.abstained} abstained), "
                      f"{res.unreadable} unreadable, in {res.seconds:.1f}s")
    return res


def _row(name: str, r: dict, k: int, res: BatchResult, cb: Callbacks) -> list[str]:
    if "error" in r:
        res.unreadable += 1
        if len(res.errors) < MAX_LISTED:
            res.errors.append({"file": name, "error": r["error"]})
        if res.unreadable <= MAX_MESSAGES:
            cb.on_message(f"could not read {name}: {r['error']}")
        return [name, "", "", "", *[""] * (2 * k), r["error"]]
    res.predicted += 1
    res.abstained += bool(r["abstained"])
    tops = [x for t in r["top"] for x in (t["class"], f"{t['probability']:.6f}")]
    tops += [""] * (2 * k - len(tops))
    top = r["top"][0]
    return [name, top["class"], f"{top['probability']:.6f}", "true" if r["abstained"] else "false", *tops, ""]


def predict_folder(model_path: str | Path, folder: str | Path, csv_path: str | Path, **kw: Any) -> BatchResult:
    """Every image under `folder` (list_images), named by its path inside it; keywords as predict_images."""
    images, other = list_images(folder)
    root = Path(folder)
    return predict_images(model_path, [(rel, root / rel) for rel in images], csv_path, ignored=other, **kw)
