"""Exports of a trained model, each checked in its own runtime right after it is written, and the model card.

Every export takes raw images (uint8, NHWC, RGB, any height and width) and does Graft's preprocessing, the
network and the calibration temperature inside its graph (export_graph); it outputs `logits` (calibrated,
logits / T) and `probabilities` (their softmax, what Graft's API returns). Formats (domain.exports): onnx (fp32),
onnx_fp16, onnx_int8 (static, calibrated on the job's train images), openvino (IR in a zip), torchscript; the
pytorch model file itself. How each is written: export_formats.

Each is checked on the val images in its runtime against the PyTorch model fed Graft's own preprocessing of the
same files (export_check): val accuracy against PyTorch's, top-1 agreement, largest probability difference,
batch-1 latency and file size. One outside its format's tolerance is recorded as failed, with its figures, and
deleted: it is never offered.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from domain.errors import ImageError
from domain.exports import AFTER_TRAINING, EXPORT_FORMATS

from . import export_check as checks
from . import export_formats as formats
from .backbones import Preprocessing
from .data import decode_for, eval_transform, normalize
from .export_usage import input_section, usage_section
from .modelfile import load_model
from .trust import CalibratedNet, card_entry

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 64  # train images the int8 quantization is calibrated on


@dataclass
class ExportResult:
    format: str  # pytorch | model_card | one of domain.exports' formats
    path: str | None
    ok: bool
    error: str | None = None
    parity: dict | None = None  # export_check.measure's: against Graft's predictions, and on the same pixels
    accuracy: float | None = None  # val accuracy in its own runtime
    reference_accuracy: float | None = None  # the PyTorch model's, same images, Graft's preprocessing
    latency_ms: float | None = None  # batch 1, median, one thread, on this machine
    size_bytes: int | None = None
    seconds: float | None = None  # writing and checking it
    tolerance: dict | None = None  # {"max_prob_diff", "max_pixels_prob_diff", "min_top1_agreement"}
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def model_card(meta: dict, confidence_threshold: float | None = None) -> dict:
    """What a user needs to run the model elsewhere and get Graft's results; `confidence_threshold`: the job's
    operating point when the user moved it (default: the one chosen on the val set, in the model file)."""
    m = meta.get("metrics", {})
    card = {
        "format": "graft.model_card/2",
        "backbone": meta["backbone"],
        "classes": meta["classes"],
        "preprocessing": meta["preprocessing"],
        "input": input_section(meta["preprocessing"]),
        "output": {"names": ["logits", "probabilities"], "shape": ["batch", len(meta["classes"])],
                   "note": "`logits`: calibrated logits (divided by the temperature); `probabilities`: their "
                           "softmax, the calibrated probabilities Graft's API returns; index i is classes[i]. "
                           "TorchScript returns the pair and has the method probabilities(image)"},
        "temperature": float((meta.get("trust") or {}).get("temperature", 1.0)),
        "trust": card_entry(meta.get("trust"), confidence_threshold),
        "run_parameters": meta.get("spec", {}),
        "metrics": {k: m.get(k) for k in ("val_acc", "val_loss", "best_epoch", "epochs_run")},
        "per_class": (m.get("report") or {}).get("per_class"),
        "pretrained_weights": meta.get("pretrained_weights"),
        "created_at": meta.get("created_at"),
    }
    if meta.get("task") == "multilabel":  # one sigmoid per label, each given at or above its threshold
        card["task"] = "multilabel"
        card["thresholds"] = dict(zip(meta["classes"], meta.get("thresholds") or [0.5] * len(meta["classes"])))
        card["output"]["note"] = ("`logits`: one per label; `probabilities`: their sigmoid (multi-label: each "
                                  "label independently), what Graft's API returns; give label classes[i] when "
                                  "probabilities[i] >= thresholds[classes[i]] (tuned for F1 on the val images)")
        card["metrics"]["report"] = {k: (m.get("report") or {}).get(k) for k in ("metrics", "per_label")}
        card["per_class"] = None
    card["usage"] = usage_section(card)
    return card


def check_images(paths: Sequence[Path], pre: Preprocessing, limit: int = 256) -> torch.Tensor:
    """Normalized tensors of (up to `limit`) images, Graft's own preprocessing; unreadable ones are skipped."""
    crop = eval_transform(pre.image_size)
    out = []
    for p in list(paths)[:limit]:
        try:
            out.append(crop(decode_for(Path(p), pre)))
        except ImageError:
            continue
    if not out:
        return torch.rand(8, 3, pre.image_size, pre.image_size).sub_(0.5).mul_(4)
    return normalize(torch.stack(out), pre, channels_last=False)


def _calibrated(model, temperature: float | None) -> CalibratedNet:
    if isinstance(model, CalibratedNet):
        return model.eval()
    return CalibratedNet(model.to(memory_format=torch.contiguous_format), temperature or 1.0).eval()


def check_export(fmt: str, path: str | Path, ref: checks.Reference) -> ExportResult:
    """Check the export at `path` (also on demand, on a file already written): its figures and whether it is
    within the format's tolerance."""
    fig = checks.measure(fmt, Path(path), ref)
    error = checks.verdict(fmt, fig)
    return ExportResult(fmt, str(path) if error is None else None, error is None, error, fig["parity"],
                        fig["accuracy"], fig["reference_accuracy"], fig["latency_ms"], fig["size_bytes"],
                        tolerance=checks.tolerance(fmt))


class _Exporter:
    """Writes the formats of one model, sharing the network's ONNX between them."""

    def __init__(self, net: CalibratedNet, pre: Preprocessing, card: dict, out_dir: Path,
                 calibration_paths: Sequence[Path], check_paths: Sequence[Path] = ()):
        self.net, self.pre, self.card, self.out_dir = net, pre, card, out_dir
        self.calibration_paths, self.check_paths = list(calibration_paths), list(check_paths)
        self._net_onnx = None
        self.note: str | None = None

    def net_onnx(self):
        if self._net_onnx is None:
            self._net_onnx = formats.network_onnx(self.net, self.pre.image_size)
        return self._net_onnx

    def write(self, fmt: str, tmp: Path) -> None:
        self.note = None
        if fmt == "torchscript":
            formats.write_torchscript(self.net, self.pre, tmp, self.card)
        elif fmt == "onnx":
            formats.save_onnx(self.net_onnx(), self.pre, tmp, self.card)
        elif fmt == "onnx_fp16":
            formats.save_onnx(formats.fp16_network(self.net_onnx()), self.pre, tmp, self.card)
        elif fmt == "onnx_int8":
            paths, what = formats.sample(self.calibration_paths, CALIBRATION_IMAGES), "train images"
            if not paths:
                paths, what = formats.sample(self.check_paths, CALIBRATION_IMAGES), \
                    "check images (no train images were given)"
            calib = check_images(paths, self.pre, limit=CALIBRATION_IMAGES)
            self.note = f"calibrated on {len(calib)} {what}" if paths else \
                "calibrated on random images (no images were given)"
            formats.save_onnx(formats.int8_network(self.net_onnx(), calib), self.pre, tmp, self.card)
        elif fmt == "openvino":
            src = formats.atomic_path(self.out_dir / "openvino-source.onnx")
            try:
                formats.save_onnx(self.net_onnx(), self.pre, src, self.card)
                formats.write_openvino(src, tmp, self.card)
            finally:
                src.unlink(missing_ok=True)
        else:
            raise ValueError(f"unknown export format {fmt!r}: use {', '.join(EXPORT_FORMATS)}")


def export_format(exporter: _Exporter, fmt: str, ref: checks.Reference) -> ExportResult:
    """Write one format to a temporary file, check it in its runtime, and keep it only when it passes."""
    path = exporter.out_dir / EXPORT_FORMATS[fmt].file
    tmp = formats.atomic_path(path)
    start = time.perf_counter()
    try:
        exporter.write(fmt, tmp)
        result = check_export(fmt, tmp, ref)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        log.debug("%s export failed", fmt, exc_info=True)
        return ExportResult(fmt, None, False, f"{fmt} export failed: {type(e).__name__}: {e}",
                            seconds=round(time.perf_counter() - start, 3))
    if result.ok:
        os.replace(tmp, path)
        result.path = str(path)
    else:
        tmp.unlink(missing_ok=True)
    result.seconds, result.note = round(time.perf_counter() - start, 3), exporter.note
    return result


def export_all(model_file: str | Path, out_dir: str | Path, check_paths: Sequence[Path],
               formats: Sequence[str] = AFTER_TRAINING, check_labels: Sequence[int | None] | None = None,
               calibration_paths: Sequence[Path] = ()) -> list[ExportResult]:
    """Write model_card.json and the requested formats next to each other in `out_dir`, each checked on
    `check_paths` (the val images; `check_labels`: the class index of each, for the accuracies) in its own
    runtime. `calibration_paths`: train images for the int8 calibration."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(model_file)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    card = model_card(meta)
    net = _calibrated(model, card["temperature"])
    net.multilabel = card.get("task") == "multilabel"  # sigmoid probabilities (export_formats.pytorch_runner)
    start = time.perf_counter()
    ref = checks.reference(net, pre, [Path(p) for p in check_paths], check_labels)
    pytorch = ExportResult("pytorch", str(model_file), True, accuracy=ref.accuracy,
                           reference_accuracy=ref.accuracy, latency_ms=ref.latency_ms,
                           size_bytes=Path(model_file).stat().st_size,
                           seconds=round(time.perf_counter() - start, 3),
                           note="latency: the network on a preprocessed image (Graft's own preprocessing)")
    card_path = out_dir / "model_card.json"
    results = [pytorch, ExportResult("model_card", str(card_path), True)]
    exporter = _Exporter(net, pre, card, out_dir, [Path(p) for p in calibration_paths],
                         [Path(p) for p in check_paths])
    for fmt in [f for f in EXPORT_FORMATS if f in formats and f not in ("pytorch", "model_card")]:
        results.append(export_format(exporter, fmt, ref))
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {', '.join(unknown)}: use {', '.join(EXPORT_FORMATS)}")
    # the card on its own also says how each export measured (the files' own cards cannot: they are inside)
    card["exports"] = {r.format: {k: v for k, v in r.to_dict().items() if k not in ("format", "path")}
                       for r in results if r.format != "model_card"}
    card_path.write_text(json.dumps(card, indent=2))
    for r in results:
        if not r.ok:
            log.warning("%s", r.error)
    return results
