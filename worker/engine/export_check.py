"""Checking an export in its own runtime against the PyTorch model, on the val images.

The `api` reference is what Graft's API answers: the PyTorch model on Graft's own preprocessing of each image file
(every pixel decoded with Pillow, as predictions do, then resize, crop, normalize). The export gets the same file decoded
in full (Pillow, EXIF orientation applied, RGB), as raw uint8 NHWC, one image at a time, and does its own
preprocessing. Figures: top-1 agreement, the largest probability difference (of the `probabilities` output
and of the softmax of `logits`), the val accuracy in its runtime and the PyTorch model's on the same images,
batch-1 latency (median, one thread) and the file's size.

Two references, two tolerances per format (TOLERANCES, measured; see the tests):

- `api`: the PyTorch model fed Graft's own preprocessing of the file, what the API answers. Predictions decode
  every pixel (training decodes big JPEGs at a reduced scale, Pillow's draft mode, which no graph fed the decoded
  image can redo: before predictions stopped using it, that alone moved a 64 px model's probabilities by up to
  0.60 against its exports), so this differs from `pixels` only by the resize's rounding.
- `pixels`: the PyTorch model fed the very pixels the export got, through the graph's own preprocessing written
  in torch (export_graph.RawImageNet.normalized: Pillow's resampling as matrix products; equal to Pillow but for
  one level on ~0.01% of the pixels of a downscaled photo, and on up to a few % of an upscaled small image, where
  Pillow's fixed-point weights round differently: a model trained on 48 px grids moved by 0.018 from that alone).
  This isolates the conversion of the network itself: measured on the test model, fp32 (ONNX, OpenVINO,
  TorchScript) 1.5e-3, fp16 3.6e-3, int8 6e-2. A drifting export (changed weights, a wrong runtime) shows here.

Top-1 agreement is counted on the images the reference does not call a near tie: an image whose top two
probabilities are closer than twice the allowed difference may flip within it, so a flip there is not drift
(those images still count in the accuracies shown).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from domain.errors import ImageError
from domain.images import load_image

from . import export_formats as formats
from .backbones import Preprocessing
from .data import decode_for, eval_transform, normalize
from .export_graph import RawImageNet

# format -> (largest probability difference against `api`, against `pixels`)
TOLERANCES: dict[str, tuple[float, float]] = {
    "onnx": (0.15, 0.01),
    "onnx_fp16": (0.15, 0.02),
    "onnx_int8": (0.2, 0.1),
    "openvino": (0.15, 0.01),
    "torchscript": (0.15, 0.01),
}
MIN_AGREEMENT = 0.99  # top-1 agreement with `api` on the images that are not near ties
LATENCY_RUNS = 25
LATENCY_SECONDS = 0.5


@dataclass
class Reference:
    """The check images as Graft's API sees them (`inputs`, normalized) and as a caller has them (`raw`, uint8
    HWC), the PyTorch model's calibrated probabilities, and the class index of each (None: unknown)."""

    inputs: torch.Tensor
    raw: list[np.ndarray]
    probs: np.ndarray
    labels: list[int | None]
    pixel_probs: np.ndarray | None = None  # the PyTorch model on Graft's preprocessing of `raw` itself
    latency_ms: float | None = None
    multilabel: bool = False  # sigmoid probabilities (the labels' accuracy is not measured here)

    @property
    def accuracy(self) -> float | None:
        return _accuracy(self.probs, self.labels)


def _accuracy(probs: np.ndarray, labels: Sequence[int | None]) -> float | None:
    known = [(i, y) for i, y in enumerate(labels) if y is not None]
    if not known:
        return None
    return sum(int(probs[i].argmax()) == y for i, y in known) / len(known)


def decode_raw(path: Path) -> np.ndarray:
    """The image as a caller of an export has it: decoded in full, EXIF orientation applied, RGB uint8 HWC."""
    return np.asarray(load_image(Path(path)), dtype=np.uint8)


def reference(net: torch.nn.Module, pre: Preprocessing, paths: Sequence[Path],
              labels: Sequence[int | None] | None = None, limit: int = 256) -> Reference:
    """The reference on (up to `limit` of) `paths`; unreadable images are skipped. Without any readable one,
    random images (no labels)."""
    crop = eval_transform(pre.image_size)
    labels = list(labels) if labels is not None else [None] * len(paths)
    tensors, raws, kept = [], [], []
    for p, y in list(zip(paths, labels))[:limit]:
        try:
            tensors.append(crop(decode_for(Path(p), pre, full=True)))  # as the API decodes
            raws.append(decode_raw(Path(p)))
        except ImageError:
            continue
        kept.append(y)
    if not tensors:  # no images: random ones of two sizes (figures without accuracy)
        rng = np.random.default_rng(0)
        raws = [rng.integers(0, 256, (pre.resize_size + 7 * i, pre.resize_size + 13 * i, 3), dtype=np.uint8)
                for i in range(8)]
        crop_t = [crop(torch.from_numpy(_pil_resized(r, pre))) for r in raws]
        tensors, kept = crop_t, [None] * len(raws)
    x = normalize(torch.stack(tensors), pre, channels_last=False)
    run = formats.pytorch_runner(net)
    probs = np.concatenate([run(x[s:s + 32])[1] for s in range(0, len(x), 32)])
    graph = RawImageNet(torch.nn.Identity(), pre)
    with torch.inference_mode():  # (the images' sizes differ: one at a time)
        pixel_probs = np.concatenate([run(graph.normalized(torch.from_numpy(r.copy())[None]))[1] for r in raws])
    multilabel = bool(getattr(net, "multilabel", False))
    ref = Reference(x, raws, probs, [None] * len(kept) if multilabel else kept, pixel_probs, multilabel=multilabel)
    ref.latency_ms = latency(lambda: run(x[:1]))
    return ref


def _pil_resized(raw: np.ndarray, pre: Preprocessing) -> np.ndarray:
    from PIL import Image

    from domain.images import resize_short

    img = resize_short(Image.fromarray(raw), pre.resize_size, pre.interpolation)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def latency(call: Callable[[], object], runs: int = LATENCY_RUNS, seconds: float = LATENCY_SECONDS) -> float:
    """Median milliseconds of `call` (after 3 warm-up calls), at most `runs` calls or `seconds`, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            call()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < runs and (time.perf_counter() - start < seconds or len(times) < 5):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return round(statistics.median(times) * 1000, 3)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def measure(fmt: str, path: Path, ref: Reference) -> dict:
    """The check's figures of the export at `path` in its runtime: parity (images, max_abs_prob_diff and
    top1_agreement against `api`, decided and decided_agreement, pixels_max_abs_prob_diff), accuracy,
    reference_accuracy, latency_ms, size_bytes."""
    run = formats.runner(fmt, path)
    got, diffs = [], []
    for raw in ref.raw:
        logits, probs = run(raw[None])
        probs = np.asarray(probs, dtype=np.float32)
        got.append(probs[0])
        z = np.asarray(logits, dtype=np.float64)
        diffs.append(float(np.abs((1 / (1 + np.exp(-z)) if ref.multilabel else _softmax(z)) - probs).max()))
    p = np.stack(got)
    tol = TOLERANCES.get(fmt, (0.15, 0.02))[0]
    top2 = np.sort(ref.probs, 1)[:, -2:] if ref.probs.shape[1] > 1 else np.ones((len(p), 2))
    decided = (top2[:, 1] - top2[:, 0]) >= 2 * tol
    agree = p.argmax(1) == ref.probs.argmax(1)
    pixels = ref.pixel_probs if ref.pixel_probs is not None else ref.probs
    return {
        "parity": {"images": int(len(p)), "max_abs_prob_diff": float(np.abs(p - ref.probs).max()),
                   "top1_agreement": float(agree.mean()), "decided": int(decided.sum()),
                   "decided_agreement": float(agree[decided].mean()) if decided.any() else 1.0,
                   "pixels_max_abs_prob_diff": float(max(np.abs(p - pixels).max(), *diffs)),
                   "pixels_top1_agreement": float((p.argmax(1) == pixels.argmax(1)).mean())},
        "accuracy": _accuracy(p, ref.labels), "reference_accuracy": ref.accuracy,
        "latency_ms": latency(lambda: run(ref.raw[0][None])), "size_bytes": Path(path).stat().st_size,
    }


def tolerance(fmt: str) -> dict:
    api, pixels = TOLERANCES.get(fmt, (0.15, 0.02))
    return {"max_prob_diff": api, "max_pixels_prob_diff": pixels, "min_top1_agreement": MIN_AGREEMENT}


def verdict(fmt: str, figures: dict) -> str | None:
    """None when the figures are within the format's tolerance, else why not."""
    t, p = tolerance(fmt), figures["parity"]
    bad = []
    if p["pixels_max_abs_prob_diff"] > t["max_pixels_prob_diff"]:
        bad.append(f"max probability difference {p['pixels_max_abs_prob_diff']:.2e} on the same pixels (needs <= "
                   f"{t['max_pixels_prob_diff']:.0e})")
    if p["max_abs_prob_diff"] > t["max_prob_diff"]:
        bad.append(f"max probability difference {p['max_abs_prob_diff']:.2e} against Graft's predictions (needs "
                   f"<= {t['max_prob_diff']:.0e})")
    if p["decided_agreement"] < t["min_top1_agreement"]:
        bad.append(f"top-1 agreement {p['decided_agreement']:.4f} on the {p['decided']} images that are not near "
                   f"ties (needs >= {t['min_top1_agreement']})")
    if not bad:
        return None
    return (f"the {fmt} export drifts from PyTorch on {p['images']} val images (top-1 agreement "
            f"{p['top1_agreement']:.4f}): " + "; ".join(bad))
