"""Where the model looked: a heatmap of the evidence for one class, brighter where it is.

CNNs get Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage: the stage's activations weighted by
the mean gradient of the class's logit over each channel, ReLU, scaled to [0, 1]. ViT gets Grad-CAM on the
tokens entering its last encoder block (the patch tokens reshaped to their 14 x 14 grid, the class token
dropped), the method the `grad-cam` package documents for vision transformers. Both come from `grad-cam`
(pytorch_grad_cam), which also upsamples the map to the input size.

The model sees a centre crop of the image resized to its short side; `to_image_size` puts the map back where
that crop was (zero outside it: the model did not see those pixels) at the uploaded image's width and height.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from .backbones import GraftNet


def _is_vit(body: nn.Module) -> bool:
    return hasattr(body, "class_token") and hasattr(getattr(body, "encoder", None), "layers")


def _vit_tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, 1 + h*w, channels] tokens -> [batch, channels, h, w] (the class token dropped)."""
    patches = tokens[:, 1:, :]
    side = math.isqrt(patches.shape[1])
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def last_conv_stage(model: GraftNet, example: torch.Tensor) -> nn.Module:
    """The body's module that runs last and still gives a spatial map [batch, channels, h, w] (h*w > 1 when
    any does): the last convolutional stage, after its normalisation and activation when they are modules."""
    seen: list[tuple[nn.Module, int]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: seen.append((mod, out.shape[-1] * out.shape[-2]))
                                     if isinstance(out, torch.Tensor) and out.ndim == 4 else None)
             for m in model.body.modules() if m is not model.body]
    try:
        with torch.no_grad():
            model.body(example)
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError("the backbone has no convolutional stage to explain")
    spatial = [m for m, hw in seen if hw > 1]
    return (spatial or [m for m, _ in seen])[-1]


def heatmap(model: GraftNet, image_tensor: torch.Tensor, target_class: int) -> np.ndarray:
    """Grad-CAM of `target_class` for one normalised image ([3, H, W] or [1, 3, H, W], as the model takes it):
    float32 [H, W] in [0, 1] (all zeros when no region raises the class's logit)."""
    return heatmaps(model, image_tensor.unsqueeze(0) if image_tensor.ndim == 3 else image_tensor,
                    [target_class])[0]


def heatmaps(model: GraftNet, batch: torch.Tensor, target_classes: list[int], chunk: int = 8) -> np.ndarray:
    """Grad-CAM maps of a batch, one target class per image: float32 [batch, H, W] in [0, 1]. `chunk` images
    go backwards at a time (the activations kept for the gradients grow with it)."""
    if len(batch) > chunk:
        return np.concatenate([heatmaps(model, batch[s:s + chunk], target_classes[s:s + chunk], chunk)
                               for s in range(0, len(batch), chunk)])
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    body: Any = model.body
    if _is_vit(body):
        layer, reshape = body.encoder.layers[-1].ln_1, _vit_tokens_to_grid
    else:
        layer, reshape = last_conv_stage(model, batch[:1]), None
    with torch.inference_mode(False), torch.enable_grad():
        x = batch.detach().clone()
        with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in target_classes])
    out = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    return np.clip(out, 0.0, 1.0)


def display_size(source: str | Path | BinaryIO) -> tuple[int, int]:
    """(width, height) of an image file as it is shown (after its EXIF orientation), without decoding it."""
    pos = source.tell() if not isinstance(source, (str, Path)) else None
    try:
        with Image.open(source) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    finally:
        if pos is not None:
            source.seek(pos)  # type: ignore[union-attr]
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_image_size(cam: np.ndarray, resized: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A crop-sized map [S, S] back onto the image: placed where the centre crop of the resized image
    (width, height) `resized` was (as torchvision's CenterCrop places it), then scaled to `size` (width, height).
    float32 [height, width] in [0, 1]."""
    s_h, s_w = cam.shape
    rw, rh = resized
    canvas = np.zeros((max(rh, s_h), max(rw, s_w)), dtype=np.float32)
    top, left = int(round((rh - s_h) / 2.0)), int(round((rw - s_w) / 2.0))
    canvas[max(top, 0):max(top, 0) + s_h, max(left, 0):max(left, 0) + s_w] = cam
    img = Image.fromarray(canvas, mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def png_base64(heat: np.ndarray) -> str:
    """A [height, width] map in [0, 1] as a base64 grayscale (8-bit) PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), mode="L").save(buf, format="PNG",
                                                                                        optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png_base64(data: str) -> np.ndarray:
    """The inverse of `png_base64` (uint8 [height, width]): for tests and clients."""
    return np.asarray(ImageOps.grayscale(Image.open(io.BytesIO(base64.b64decode(data)))))
