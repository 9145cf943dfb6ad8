"""Real models for the trust and explanation tests: a pretrained backbone (EfficientNet-Lite0, offline) with a
head trained on its frozen features of a few real images, and those images' features."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from worker.engine.backbones import GraftNet, Preprocessing, build_model
from worker.engine.data import decode_for, eval_transform, normalize


def pick(root: Path, classes: list[str], per_class: int, offset: int = 0) -> tuple[list[Path], list[int]]:
    """`per_class` images of each class folder under `root` (sorted, from `offset`), and their labels."""
    paths, labels = [], []
    for i, c in enumerate(classes):
        found = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        chosen = found[offset:offset + per_class]
        assert len(chosen) == per_class, f"{root / c} has too few images"
        paths += chosen
        labels += [i] * per_class
    return paths, labels


def inputs(paths: list[Path], pre: Preprocessing) -> torch.Tensor:
    """Normalised model inputs, prepared exactly like the val images of a run."""
    crop = eval_transform(pre.image_size)
    return normalize(torch.stack([crop(decode_for(p, pre)) for p in paths]), pre, channels_last=False)


@torch.no_grad()  # (not inference_mode: the features train a head afterwards)
def features(model: GraftNet, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([model.body(x[s:s + batch]).float() for s in range(0, len(x), batch)])


def model_with_head(n_classes: int, image_size: int) -> tuple[GraftNet, Preprocessing]:
    model = build_model("efficientnet_lite0", n_classes, pretrained=True, dropout=0.0, seed=0).eval()
    return model, model.info.preprocessing.with_size(image_size)


def train_head(model: GraftNet, feats: torch.Tensor, labels: list[int], steps: int = 300, lr: float = 0.01) -> None:
    """Full-batch Adam on the cached features, no label smoothing and no weight decay: many steps make the head
    overconfident (train loss near 0), which is what temperature scaling is for."""
    torch.manual_seed(0)
    y = torch.tensor(labels)
    opt = torch.optim.Adam(model.head.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model.head(feats), y).backward()
            opt.step()
    model.eval()
