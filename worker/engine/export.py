"""Exports of a trained model: a model card, TorchScript, and ONNX checked against PyTorch with onnxruntime.

An ONNX export whose probabilities drift from PyTorch's (top-1 agreement below 99.5% or a probability
difference above 1e-3 on the check images) is marked failed with its figures; it is never offered as good.

Both exports have the model's temperature inside (trust.CalibratedNet): their `logits` output is the calibrated
logits (logits / T), whose softmax is the calibrated probabilities Graft's API returns; ONNX also outputs
`probabilities` (that softmax), TorchScript has a `probabilities(x)` method. Without calibration T = 1.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from domain.errors import ImageError
from domain.exports import AFTER_TRAINING

from .backbones import Preprocessing
from .data import decode_for, eval_transform, normalize
from .modelfile import load_model
from .trust import CalibratedNet, WithProbabilities, card_entry

log = logging.getLogger(__name__)

MIN_TOP1_AGREEMENT = 0.995
MAX_PROB_DIFF = 1e-3


@dataclass
class ExportResult:
    format: str  # pytorch | torchscript | onnx | model_card
    path: str | None
    ok: bool
    error: str | None = None
    parity: dict | None = None  # onnx: {"images", "max_abs_prob_diff", "top1_agreement"}

    def to_dict(self) -> dict:
        return asdict(self)


def _atomic_path(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def model_card(meta: dict, confidence_threshold: float | None = None) -> dict:
    """What a user needs to run the model elsewhere and get Graft's results; `confidence_threshold`: the job's
    operating point when the user moved it (default: the one chosen on the val set, in the model file)."""
    m = meta.get("metrics", {})
    return {
        "format": "graft.model_card/1",
        "backbone": meta["backbone"],
        "classes": meta["classes"],
        "preprocessing": meta["preprocessing"],
        "input": {"name": "image", "shape": ["batch", 3, meta["preprocessing"]["image_size"],
                                             meta["preprocessing"]["image_size"]], "dtype": "float32",
                  "layout": "NCHW, RGB"},
        "output": {"name": "logits", "shape": ["batch", len(meta["classes"])],
                   "note": "calibrated logits (divided by the temperature): apply softmax for calibrated "
                           "probabilities; index i is classes[i]. ONNX also outputs `probabilities` "
                           "(the softmax); TorchScript has the method probabilities(x)"},
        "temperature": float((meta.get("trust") or {}).get("temperature", 1.0)),
        "trust": card_entry(meta.get("trust"), confidence_threshold),
        "run_parameters": meta.get("spec", {}),
        "metrics": {k: m.get(k) for k in ("val_acc", "val_loss", "best_epoch", "epochs_run")},
        "per_class": (m.get("report") or {}).get("per_class"),
        "pretrained_weights": meta.get("pretrained_weights"),
        "created_at": meta.get("created_at"),
    }


def check_images(paths: Sequence[Path], pre: Preprocessing, limit: int = 256) -> torch.Tensor:
    """Normalized tensors of (up to `limit`) images for parity checks; unreadable ones are skipped."""
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


def export_torchscript(model, pre: Preprocessing, path: Path, card: dict | None = None,
                       temperature: float | None = None) -> ExportResult:
    """`forward` gives the calibrated logits, `probabilities` their softmax (`temperature` from the model file)."""
    net = _calibrated(model, temperature)
    example = torch.zeros(1, 3, pre.image_size, pre.image_size)
    tmp = _atomic_path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace_module(net, {"forward": example, "probabilities": example},
                                            check_trace=False)
        # the model card travels inside the file: torch.jit.load(f, _extra_files={"model_card.json": ""})
        traced.save(str(tmp), _extra_files={"model_card.json": json.dumps(card or {})})
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        return ExportResult("torchscript", None, False, f"TorchScript export failed: {e}")
    return ExportResult("torchscript", str(path), True)


def export_onnx(model, pre: Preprocessing, path: Path, images: torch.Tensor, card: dict | None = None,
                temperature: float | None = None) -> ExportResult:
    """Export with a dynamic batch axis (outputs `logits`, calibrated, and `probabilities`), then run onnxruntime
    on `images` and compare its probabilities with PyTorch's calibrated ones."""
    model = _calibrated(model, temperature)
    example = images[:2] if len(images) >= 2 else torch.zeros(2, 3, pre.image_size, pre.image_size)
    tmp = _atomic_path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # (in eval mode: the exporter restores the wrapper's mode afterwards, and with it the model's)
            torch.onnx.export(WithProbabilities(model).eval(), (example,), str(tmp), input_names=["image"],
                              output_names=["logits", "probabilities"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"},
                                            "probabilities": {0: "batch"}}, opset_version=17, dynamo=False)
        if card is not None:  # the model card travels inside the file, as metadata "graft.model_card"
            import onnx

            proto = onnx.load(str(tmp))
            onnx.helper.set_model_props(proto, {"graft.model_card": json.dumps(card)})
            onnx.save(proto, str(tmp))
        parity = onnx_parity(tmp, model, images)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        return ExportResult("onnx", None, False, f"ONNX export failed: {type(e).__name__}: {e}")
    ok = parity["top1_agreement"] >= MIN_TOP1_AGREEMENT and parity["max_abs_prob_diff"] <= MAX_PROB_DIFF
    if not ok:
        tmp.unlink(missing_ok=True)
        return ExportResult("onnx", None, False,
                            f"the ONNX model drifts from PyTorch: top-1 agreement {parity['top1_agreement']:.4f} "
                            f"(needs >= {MIN_TOP1_AGREEMENT}), max probability difference "
                            f"{parity['max_abs_prob_diff']:.2e} (needs <= {MAX_PROB_DIFF:.0e})", parity)
    os.replace(tmp, path)
    return ExportResult("onnx", str(path), True, None, parity)


@torch.inference_mode()
def onnx_parity(onnx_path: Path, model, images: torch.Tensor, batch_size: int = 32) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    diffs, agree = [], 0
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].contiguous()
        ref = model(x).float().softmax(1).numpy()
        outs = sess.run(None, {name: x.numpy()})
        logits = outs[0]
        got = np.exp(logits - logits.max(1, keepdims=True))
        got /= got.sum(1, keepdims=True)
        # the `probabilities` output, and the softmax of the `logits` output, both match PyTorch's
        diffs.append(float(np.abs(got - ref).max()))
        if len(outs) > 1:
            diffs.append(float(np.abs(outs[1] - ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
    return {"images": int(len(images)), "max_abs_prob_diff": max(diffs) if diffs else 0.0,
            "top1_agreement": agree / max(len(images), 1)}


def export_all(model_file: str | Path, out_dir: str | Path, check_paths: Sequence[Path],
               formats: Sequence[str] = AFTER_TRAINING) -> list[ExportResult]:
    """Write model_card.json and the requested formats next to each other in `out_dir`."""
    out_dir = Path(out_dir)
    model, meta = load_model(model_file)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    card = model_card(meta)
    temperature = card["temperature"]
    card_path = out_dir / "model_card.json"
    card_path.write_text(json.dumps(card, indent=2))
    results = [ExportResult("pytorch", str(model_file), True), ExportResult("model_card", str(card_path), True)]
    if "torchscript" in formats:
        results.append(export_torchscript(model, pre, out_dir / "model.torchscript.pt", card, temperature))
    if "onnx" in formats:
        results.append(export_onnx(model, pre, out_dir / "model.onnx", check_images(check_paths, pre), card,
                                   temperature))
    for r in results:
        if not r.ok:
            log.warning("%s", r.error)
    return results
