"""Writing each export format; every one takes raw uint8 NHWC images (export_graph) and has the model card inside.

- `onnx`: fp32 (the network exported with the legacy TorchScript exporter, opset 18, wrapped by export_graph).
- `onnx_fp16`: the network's weights and arithmetic in float16 (onnxruntime.transformers.float16), its input and
  output float32; the preprocessing and the softmax stay float32.
- `onnx_int8`: static quantization (onnxruntime.quantization, QDQ, int8 weights per channel, uint8
  activations, min-max calibrated on a sample of the job's train images) of the network's convolutions but the
  stem's (measured: quantizing the first convolution alone cost most of the int8 drift); the preprocessing,
  the head and the softmax stay float32.
- `openvino`: the fp32 ONNX converted to OpenVINO IR (weights kept fp32), model.xml + model.bin + the model card
  in one zip; run with INFERENCE_PRECISION_HINT f32 (OPENVINO_CONFIG).
- `torchscript`: export_graph.RawImageNet scripted around the traced network.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .export_graph import OPSET, RawImageNet, wrap_onnx

CARD_KEY = "graft.model_card"  # ONNX metadata property
# OpenVINO's CPU plugin computes in bfloat16 by default where the CPU has it (measured here: probabilities off by
# up to 0.04 on the test model, against 1e-3 in f32): the check, and the usage snippet, ask for f32
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
NET_INPUT = "x"


def atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def network_onnx(net: torch.nn.Module, image_size: int):
    """The ONNX of the network alone (input NET_INPUT: normalized float NCHW, dynamic batch; output the
    calibrated logits), as a ModelProto."""
    import onnx

    example = torch.zeros(2, 3, image_size, image_size)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = Path(d) / "net.onnx"
        # (in eval mode: the exporter restores the module's mode afterwards)
        torch.onnx.export(net, (example,), str(f), input_names=[NET_INPUT], output_names=["logits"],
                          dynamic_axes={NET_INPUT: {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
        return onnx.load(str(f))


def save_onnx(model, pre, path: Path, card: dict | None) -> None:
    """`model` (the network) wrapped with the preprocessing, the card as metadata, written to `path`."""
    import onnx

    full = wrap_onnx(model, pre, sigmoid=(card or {}).get("task") == "multilabel")
    if card is not None:  # the model card travels inside the file, as metadata "graft.model_card"
        onnx.helper.set_model_props(full, {CARD_KEY: json.dumps(card)})
    onnx.checker.check_model(full)
    onnx.save(full, str(path))


def fp16_network(net_proto):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_float_to_float16(onnx.ModelProto.FromString(net_proto.SerializeToString()),
                                        keep_io_types=True)


def int8_network(net_proto, calibration: torch.Tensor):
    """Static int8 quantization of the network's convolutions (not the stem's), calibrated on `calibration`
    (normalized NCHW images, Graft's own preprocessing of train images)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{NET_INPUT: calibration[i:i + 1].numpy()} for i in range(len(calibration))])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, pp, out = Path(d) / "net.onnx", Path(d) / "pp.onnx", Path(d) / "int8.onnx"
        onnx.save(net_proto, str(src))
        quant_pre_process(str(src), str(pp), skip_symbolic_shape=True)
        nodes = onnx.load(str(pp)).graph.node
        stem = next((n.name for n in nodes if n.op_type == "Conv"), None)
        quantize_static(str(pp), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=[stem] if stem else None)
        return onnx.load(str(out))


def write_openvino(onnx_path: Path, path: Path, card: dict | None) -> None:
    """The fp32 ONNX as OpenVINO IR (fp32 weights): model.xml, model.bin and model_card.json in a zip."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "model.xml"
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(xml, "model.xml")
            z.write(xml.with_suffix(".bin"), "model.bin")
            z.writestr("model_card.json", json.dumps(card or {}, indent=2))


def write_torchscript(net: torch.nn.Module, pre, path: Path, card: dict | None) -> None:
    """forward(image uint8 NHWC) -> (logits, probabilities); probabilities(image); the card inside."""
    example = torch.zeros(1, 3, pre.image_size, pre.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
        scripted = torch.jit.script(RawImageNet(traced, pre, (card or {}).get("task") == "multilabel").eval())
    # the model card travels inside the file: torch.jit.load(f, _extra_files={"model_card.json": ""})
    scripted.save(str(path), _extra_files={"model_card.json": json.dumps(card or {})})


# ---------------------------------------------------------------- running each format in its runtime


def runner(fmt: str, path: Path, threads: int | None = 1):
    """A function uint8 NHWC batch (numpy) -> (logits, probabilities) running the export in its runtime
    (`threads`: intra-op threads, None for the runtime's default)."""
    if fmt.startswith("onnx"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        def run_onnx(x: np.ndarray):
            logits, probs = sess.run(["logits", "probabilities"], {"image": x})
            return logits, probs
        return run_onnx
    if fmt == "openvino":
        import openvino as ov

        with zipfile.ZipFile(path) as z:  # read in memory: nothing extracted to clean up
            xml, weights = z.read("model.xml").decode(), np.frombuffer(z.read("model.bin"), dtype=np.uint8)
        core = ov.Core()
        config = {**OPENVINO_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        compiled = core.compile_model(core.read_model(xml, ov.Tensor(weights.copy())), "CPU", config)

        def run_openvino(x: np.ndarray):
            out = compiled({"image": x})
            return out["logits"], out["probabilities"]
        return run_openvino
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch.jit is deprecated in favour of torch.export)
            ts = torch.jit.load(str(path))

        def run_torchscript(x: np.ndarray):
            with torch.inference_mode():
                logits, probs = ts(torch.from_numpy(np.array(x, dtype=np.uint8, copy=True)))
            return logits.numpy(), probs.numpy()
        return run_torchscript
    raise ValueError(f"no runtime for {fmt}")


def pytorch_runner(net: torch.nn.Module):
    """The PyTorch model on normalized NCHW tensors (Graft's own preprocessing) -> (logits, probabilities)."""
    def run_pytorch(x: torch.Tensor):
        with torch.inference_mode():
            z = net(x)
        return z.numpy(), (z.sigmoid() if getattr(net, "multilabel", False) else z.softmax(1)).numpy()
    return run_pytorch


def sample(paths: Sequence[Path], n: int) -> list[Path]:
    """Up to n of `paths`, evenly spread (stratified when they are sorted by class)."""
    paths = list(paths)
    if len(paths) <= n:
        return paths
    step = len(paths) / n
    return [paths[int(i * step)] for i in range(n)]
