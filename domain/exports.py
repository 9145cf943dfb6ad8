"""The download formats of a trained model, defined once: the API's `format` values, the artifact kind and
file each is stored as, the download's name, and the words the job page shows. The worker exports the
`AFTER_TRAINING` formats (each checked in its own runtime against PyTorch) next to the model file; the web
tier offers what was recorded as ok."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class ExportFormat:
    name: str  # the API's format value
    artifact: str  # the job artifact's kind
    file: str  # the file's name in the job's folder
    suffix: str  # what the download's name ends with
    title: str
    text: str  # what it is for (HTML, shown on the job page)


EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("pytorch", "model", "model.pt", ".pt", "PyTorch",
                 "State dict with the classes, preprocessing and metrics inside: for <code>graft predict</code> or "
                 "your own PyTorch code."),
    ExportFormat("torchscript", "torchscript", "model.torchscript.pt", ".torchscript.pt", "TorchScript",
                 "Runs with <code>torch.jit.load</code>, no Graft code needed: raw uint8 images in; the model card "
                 "is inside."),
    ExportFormat("onnx", "onnx", "model.onnx", ".onnx", "ONNX",
                 "For onnxruntime (also in the browser, onnxruntime-web) and other ONNX runtimes: raw uint8 images "
                 "of any size in, the preprocessing inside; the model card is inside."),
    ExportFormat("onnx_fp16", "onnx_fp16", "model.fp16.onnx", ".fp16.onnx", "ONNX fp16",
                 "The ONNX model with float16 weights and arithmetic: half the size, for GPUs and runtimes with fast "
                 "float16; same input and outputs."),
    ExportFormat("onnx_int8", "onnx_int8", "model.int8.onnx", ".int8.onnx", "ONNX int8",
                 "The ONNX model quantized to int8 (static, calibrated on this job's training images): smaller "
                 "and faster on CPUs; same input and outputs."),
    ExportFormat("openvino", "openvino", "model.openvino.zip", ".openvino.zip", "OpenVINO",
                 "OpenVINO IR (<code>model.xml</code> + <code>model.bin</code>, with the model card) in a zip: for "
                 "Intel CPUs, GPUs and NPUs with the <code>openvino</code> runtime."),
    ExportFormat("model_card", "model_card", "model_card.json", ".model_card.json", "Model card",
                 "Classes, preprocessing, input and output, how to run each format, parameters and metrics: what "
                 "running the model elsewhere needs."),
)}

# exported by the worker after training, each checked in its own runtime; a failure is recorded, not fatal
AFTER_TRAINING: tuple[str, ...] = ("torchscript", "onnx", "onnx_fp16", "onnx_int8", "openvino")

# the API's `format` parameter (an enum in /docs)
ExportName = StrEnum("ExportName", {name: name for name in EXPORT_FORMATS})  # type: ignore[misc]
