"""The preprocessing inside the exported graphs: raw images in, calibrated logits and probabilities out.

Every export takes `image`: uint8, NHWC, RGB, any height and width (one size per batch), and does in its graph
what Graft's eval path does with Pillow (domain.images.resize_short, then data.eval_transform and normalize):

1. resize so that the short side is `resize_size` (the long side round(long * (resize_size / short)) in doubles,
   half to even, as Python computes it; never below it) with Pillow's own resampling, computed as two matrix products: the horizontal pass, rounded to uint8
   values, then the vertical pass, rounded again (Pillow's triangle or a = -0.5 bicubic filter, widened by the
   downscale factor: antialiased). Only the rows and columns the crop keeps are computed;
2. center crop image_size x image_size (torchvision's anchor: round((size - crop) / 2), half to even);
3. pixels / 255, then (x - mean) / std, as NCHW float32;

then the network, the temperature (logits / T: `logits`) and the softmax (`probabilities`). The resize is
plain arithmetic (Range, MatMul, ...), not a runtime's Resize operator, so that every runtime computes the same
thing (OpenVINO's CPU plugin ignores ONNX Resize's `antialias`). Measured against Pillow on photos: equal but for
one level on about 0.01% of the pixels. What differs from Graft's own path: Graft decodes big JPEGs at a reduced
scale (Pillow's draft mode) and Pillow box-reduces images more than 3x the target size first; the exports see
the full decode. The export checks measure the effect (export_check).

`RawImageNet` is that as a torch module (TorchScript); `wrap_onnx` puts the same steps around an ONNX network
whose input is the normalized NCHW float tensor.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .backbones import Preprocessing

OPSET = 18
INPUT = "image"
OUTPUTS = ("logits", "probabilities")
CUBIC_A = -0.5  # Pillow's bicubic


def _filter(t: torch.Tensor, cubic: bool) -> torch.Tensor:
    u = t.abs()
    if not cubic:
        return (1.0 - u).clamp(min=0.0)
    a = -0.5  # CUBIC_A (TorchScript does not read module globals)
    near = ((a + 2.0) * u - (a + 3.0)) * u * u + 1.0
    far = (((u - 5.0) * u + 8.0) * u - 4.0) * a
    return torch.where(u < 1.0, near, torch.where(u < 2.0, far, torch.zeros_like(u)))


def resample_weights(n_in: int, n_out: int, start: int, count: int, cubic: bool) -> torch.Tensor:
    """[count, n_in]: output pixels start..start+count of Pillow's resize of n_in pixels to n_out."""
    scale = float(n_in) / float(n_out)
    fs = max(scale, 1.0)
    centre = (torch.arange(start, start + count, dtype=torch.float32) + 0.5) * scale
    t = (torch.arange(n_in, dtype=torch.float32).unsqueeze(0) - centre.unsqueeze(1) + 0.5) / fs
    w = _filter(t, cubic)
    return w / w.sum(1, keepdim=True)


def _round_even(v: float) -> int:
    """Python's round() of a (double) float: half to even (TorchScript's round() is half away from zero)."""
    k = int(math.floor(v))
    f = v - k
    if f > 0.5:
        return k + 1
    if f < 0.5:
        return k
    return k + k % 2


def _anchor(d: int) -> int:
    k = d // 2
    return k + (d % 2) * (k % 2)


class RawImageNet(nn.Module):
    """uint8 NHWC RGB images of any size -> (calibrated logits, probabilities); `probabilities(x)` alone too.
    `net` takes the normalized NCHW float tensor and returns calibrated logits (trust.CalibratedNet)."""

    def __init__(self, net: nn.Module, pre: Preprocessing, sigmoid: bool = False):
        super().__init__()
        self.net = net
        self.sigmoid = sigmoid  # a multi-label model: one sigmoid probability per label
        self.resize_size, self.image_size = int(pre.resize_size), int(pre.image_size)
        self.cubic = pre.interpolation == "bicubic"
        self.mean, self.std = [float(v) for v in pre.mean], [float(v) for v in pre.std]

    def normalized(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        h, w = int(x.shape[2]), int(x.shape[3])
        short = min(h, w)
        r, s = self.resize_size, self.image_size
        nh, nw = max(r, _round_even(h * (r / short))), max(r, _round_even(w * (r / short)))
        ww = resample_weights(w, nw, _anchor(nw - s), s, self.cubic)
        wh = resample_weights(h, nh, _anchor(nh - s), s, self.cubic)
        x = torch.matmul(x, ww.t()).round().clamp(0.0, 255.0)
        x = torch.matmul(wh, x).round().clamp(0.0, 255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net(self.normalized(image))
        return z, z.sigmoid() if self.sigmoid else z.softmax(1)

    @torch.jit.export
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        z = self.net(self.normalized(image))
        return z.sigmoid() if self.sigmoid else z.softmax(1)


# ---------------------------------------------------------------- the same in ONNX


class _Nodes:
    """A little builder of ONNX nodes and constants under a name prefix."""

    def __init__(self, prefix: str):
        self.p, self.n = prefix, 0
        self.nodes: list = []
        self.inits: list = []

    def const(self, value, dtype) -> str:
        from onnx import numpy_helper

        self.n += 1
        name = f"{self.p}c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, *inputs: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        self.n += 1
        name = out or f"{self.p}{kind.lower()}{self.n}"
        self.nodes.append(helper.make_node(kind, list(inputs), [name], name=f"{self.p}{kind}_{self.n}", **attrs))
        return name


def _onnx_weights(b: _Nodes, n_in: str, n_out: str, start: str, count: str, cubic: bool) -> str:
    """[count, n_in] float weights (`resample_weights`), from int64 scalars."""
    from onnx import TensorProto

    f32 = TensorProto.FLOAT
    fin, fout = b.op("Cast", n_in, to=f32), b.op("Cast", n_out, to=f32)
    scale = b.op("Div", fin, fout)
    fs = b.op("Max", scale, b.const(1.0, np.float32))
    i = b.op("Cast", b.op("Range", start, b.op("Add", start, count), b.const(1, np.int64)), to=f32)
    half = b.const(0.5, np.float32)
    centre = b.op("Unsqueeze", b.op("Mul", b.op("Add", i, half), scale), b.const([1], np.int64))
    j = b.op("Unsqueeze", b.op("Cast", b.op("Range", b.const(0, np.int64), n_in, b.const(1, np.int64)), to=f32),
             b.const([0], np.int64))
    t = b.op("Div", b.op("Add", b.op("Sub", j, centre), half), fs)
    u = b.op("Abs", t)
    one = b.const(1.0, np.float32)
    if not cubic:
        w = b.op("Relu", b.op("Sub", one, u))
    else:
        a = CUBIC_A
        u2 = b.op("Mul", u, u)
        near = b.op("Add", b.op("Mul", b.op("Sub", b.op("Mul", b.const(a + 2.0, np.float32), u),
                                            b.const(a + 3.0, np.float32)), u2), one)
        far = b.op("Mul", b.op("Sub", b.op("Mul", b.op("Add", b.op("Mul", b.op("Sub", u, b.const(5.0, np.float32)), u),
                                                        b.const(8.0, np.float32)), u),
                                  b.const(4.0, np.float32)), b.const(a, np.float32))
        zero = b.const(0.0, np.float32)
        w = b.op("Where", b.op("Less", u, one), near,
                 b.op("Where", b.op("Less", u, b.const(2.0, np.float32)), far, zero))
    total = b.op("ReduceSum", w, b.const([1], np.int64), keepdims=1)
    return b.op("Div", w, total)


def preprocessing_nodes(pre: Preprocessing, out: str, prefix: str = "graft_pre/") -> tuple[list, list]:
    """(nodes, initializers) taking INPUT (uint8 NHWC) to `out` (normalized float32 NCHW)."""
    from onnx import TensorProto

    b = _Nodes(prefix)
    i64 = np.int64
    r, s = b.const(int(pre.resize_size), i64), b.const(int(pre.image_size), i64)
    two = b.const(2, i64)
    shape = b.op("Shape", INPUT)
    h = b.op("Gather", shape, b.const(1, i64), axis=0)
    w = b.op("Gather", shape, b.const(2, i64), axis=0)
    short = b.op("Min", h, w)

    f64 = TensorProto.DOUBLE
    scale = b.op("Div", b.op("Cast", r, to=f64), b.op("Cast", short, to=f64))

    def resized(n: str) -> str:  # max(r, round(n * (r / short))) as Python computes it: doubles, half to even
        v = b.op("Round", b.op("Mul", b.op("Cast", n, to=f64), scale))
        return b.op("Max", b.op("Cast", v, to=TensorProto.INT64), r)

    def anchor(n: str) -> str:  # round((n - s) / 2), half to even
        d = b.op("Sub", n, s)
        k = b.op("Div", d, two)
        return b.op("Add", k, b.op("Mul", b.op("Mod", d, two), b.op("Mod", k, two)))

    nh, nw = resized(h), resized(w)
    cubic = pre.interpolation == "bicubic"
    ww = _onnx_weights(b, w, nw, anchor(nw), s, cubic)  # [s, w]
    wh = _onnx_weights(b, h, nh, anchor(nh), s, cubic)  # [s, h]
    x = b.op("Cast", b.op("Transpose", INPUT, perm=[0, 3, 1, 2]), to=TensorProto.FLOAT)
    lo, hi = b.const(0.0, np.float32), b.const(255.0, np.float32)
    x = b.op("Clip", b.op("Round", b.op("MatMul", x, b.op("Transpose", ww, perm=[1, 0]))), lo, hi)
    x = b.op("Clip", b.op("Round", b.op("MatMul", wh, x)), lo, hi)
    mean = b.const(np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1), np.float32)
    std = b.const(np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1), np.float32)
    b.op("Div", b.op("Sub", b.op("Div", x, hi), mean), std, out=out)
    return b.nodes, b.inits


def wrap_onnx(net, pre: Preprocessing, sigmoid: bool = False):
    """The ONNX network `net` (one float input, normalized NCHW; one output, the calibrated logits) with the
    preprocessing before it and the softmax (multi-label models: the sigmoid) after it: input INPUT (uint8 NHWC),
    outputs OUTPUTS."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as h

    net = onnx.ModelProto.FromString(net.SerializeToString())  # (not the caller's: its nodes are renamed here)
    g = net.graph
    net_in, net_out = g.input[0].name, g.output[0].name
    pre_nodes, pre_inits = preprocessing_nodes(pre, "graft_pre/normalized")
    body = []
    for node in g.node:
        node.input[:] = ["graft_pre/normalized" if i == net_in else i for i in node.input]
        node.output[:] = ["graft_net/logits" if o == net_out else o for o in node.output]
        body.append(node)
    body = _toposorted(body, {"graft_pre/normalized", *(i.name for i in g.initializer)})
    post = [h.make_node("Identity", ["graft_net/logits"], [OUTPUTS[0]], name="graft_post/logits"),
            h.make_node("Sigmoid", ["graft_net/logits"], [OUTPUTS[1]], name="graft_post/sigmoid") if sigmoid else
            h.make_node("Softmax", ["graft_net/logits"], [OUTPUTS[1]], axis=1, name="graft_post/softmax")]
    classes = g.output[0].type.tensor_type.shape.dim[1].dim_value or "classes"
    graph = h.make_graph(
        pre_nodes + body + post, "graft",
        [h.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [h.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", classes]) for o in OUTPUTS],
        initializer=pre_inits + list(g.initializer), value_info=list(g.value_info))
    opsets = [o for o in net.opset_import if o.domain not in ("", "ai.onnx")]
    return h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET), *opsets], producer_name="graft",
                        ir_version=max(net.ir_version, 8))


def _toposorted(nodes: list, known: set[str]) -> list:
    """`nodes` in an order where each comes after the producers of its inputs (float16 conversion adds the
    output casts out of order)."""
    have, left, out = set(known) | {""}, list(nodes), []
    while left:
        ready = [n for n in left if all(i in have for i in n.input)]
        if not ready:
            raise ValueError("the network's graph has a cycle or an input nothing produces")
        ids = {id(n) for n in ready}
        out.extend(ready)
        have.update(o for n in ready for o in n.output)
        left = [n for n in left if id(n) not in ids]
    return out
