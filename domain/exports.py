"""The download formats of a trained model, defined once: the API's `format` values, the artifact kind and
file each is stored as, the download's name, and the words the job page shows. The worker exports the
`AFTER_TRAINING` formats (checked against PyTorch) next to the model file; the web tier offers what was
recorded as ok."""
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
                 "Runs with <code>torch.jit.load</code>, no Graft code needed; the model card is inside."),
    ExportFormat("onnx", "onnx", "model.onnx", ".onnx", "ONNX",
                 "For onnxruntime and other ONNX runtimes (dynamic batch); checked against PyTorch on the val "
                 "images; the model card is inside."),
    ExportFormat("model_card", "model_card", "model_card.json", ".model_card.json", "Model card",
                 "Classes, preprocessing (image size, mean, std), input and output, parameters and metrics: what "
                 "running the model elsewhere needs."),
)}

# exported by the worker after training, each checked in its own runtime; a failure is recorded, not fatal
AFTER_TRAINING: tuple[str, ...] = ("torchscript", "onnx")

# the API's `format` parameter (an enum in /docs)
ExportName = StrEnum("ExportName", {name: name for name in EXPORT_FORMATS})  # type: ignore[misc]
