"""Training augmentation on whole batches on the device (issue 18: the data pipeline, not the model, decides the
speed on a GPU; per-image augmentation in the loader's process caps a job at a few hundred images/s).

The per-image path (data.train_transform: torchvision v2 on each uint8 image in the loader) does the random
resized crop, the flip and the colour jitter on the CPU. The batch path splits the same work:
- on the CPU, per image, only what costs nothing: the crop's box, the flip and the jitter factors are drawn
  (torchvision's own RandomResizedCrop.get_params, from the same torch RNG as the per-image path) and the box is
  cut out as a view; `collate` pads a batch's crops into one uint8 tensor (a crop is never wider or taller than
  4/3 of the image's short side, so the padding is bounded whatever the images' shapes; the crops' edges are
  repeated into it);
- on the device, for the whole batch at once: the resize of every crop to size x size with
  torchvision.ops.roi_align (bilinear, averaging ceil(crop/size) samples per output pixel when it shrinks: the
  antialiasing), the flips, and brightness, contrast, saturation and hue with a factor per image (the four in
  one random order per batch, where the per-image path draws an order per image).

The setting is GRAFT_GPU_AUGMENT (like GRAFT_GPU_DECODE, not part of a RunSpec: it changes how, not what, a run
trains): `auto` (the default) takes the batch path when training on a CUDA device, `on` takes it on any device
(the CPU too: what the tests exercise), `off` keeps the per-image path. The preset `none` (a centre crop: a view)
always stays per image. Pixels differ slightly from the per-image path (float arithmetic throughout instead of
uint8 after each step, roi_align's sampling against torchvision's antialiased resize); the distribution of the
crops, flips and factors is the same.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .device import env_choice

ENV = "GRAFT_GPU_AUGMENT"
MODES = ("auto", "on", "off")
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios, as in data.train_transform
GRAY = (0.2989, 0.587, 0.114)  # torchvision's luma weights
N_PARAMS = 7  # crop height, crop width, flip, brightness, contrast, saturation, hue


@dataclass(frozen=True)
class Preset:
    scale: tuple[float, float]
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation, hue


# the same presets as data.train_transform
PRESETS = {"light": Preset((0.35, 1.0), None), "standard": Preset((0.2, 1.0), (0.3, 0.3, 0.3, 0.02))}


def augment_mode() -> str:
    """GRAFT_GPU_AUGMENT: auto (default), on or off; an unknown value counts as off (and says so)."""
    return env_choice(ENV, MODES, "auto", "off", "augmenting each image on the CPU")


def use_batch_path(preset: str, device: torch.device) -> bool:
    """Whether a run on `device` augments `preset` batch-wise on the device (see the module's note)."""
    if preset not in PRESETS:
        return False
    mode = augment_mode()
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class BatchAugment:
    """The batch path of one preset at one output size: `sample` is the loader's per-image transform,
    `collate` its collate_fn, `apply` the device's part, and `wrap(loader, device)` the loader whose batches
    are (augmented float images 0..255 on the device, labels), ready for data.normalize."""

    def __init__(self, preset: str, size: int):
        if preset not in PRESETS:
            raise ValueError(f"no batch augmentation for preset {preset!r}: use one of {', '.join(PRESETS)}")
        from torchvision.transforms import RandomResizedCrop

        self.preset, self.size, self.p = preset, size, PRESETS[preset]
        self._crop_params = RandomResizedCrop.get_params
        self._scale, self._ratio = list(self.p.scale), list(RATIO)
        if self.p.jitter is not None:  # factors uniform in [1 - x, 1 + x]: lo + span * U(0, 1)
            b, c, s, _ = self.p.jitter
            self._lo, self._span = torch.tensor([1 - b, 1 - c, 1 - s]), torch.tensor([2 * b, 2 * c, 2 * s])

    # ---------------------------------------------------------------- CPU, per image

    def sample(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the crop: a view of the uint8 CHW image, its N_PARAMS parameters) drawn like the per-image path."""
        i, j, h, w = self._crop_params(img, self._scale, self._ratio)
        prm = torch.ones(N_PARAMS)
        prm[0], prm[1] = h, w
        prm[2] = float(torch.rand(1).item() < 0.5)
        prm[6] = 0.0
        if self.p.jitter is not None:
            hue = self.p.jitter[3]
            prm[3:6] = torch.empty(3).uniform_(0, 1) * self._span + self._lo
            prm[6] = torch.empty(1).uniform_(-hue, hue).item()
        return img[:, i:i + h, j:j + w], prm

    def collate(self, batch: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], int]], pin: bool = False):
        """((padded uint8 crops N x 3 x Hmax x Wmax, parameters N x N_PARAMS, jitter order), labels); `pin`: the
        crops go straight into page-locked memory (for a non-blocking copy to the GPU, without a second copy)."""
        crops = [c for (c, _), _ in batch]
        hmax, wmax = max(c.shape[1] for c in crops), max(c.shape[2] for c in crops)
        out = torch.empty(len(crops), crops[0].shape[0], hmax, wmax, dtype=torch.uint8, pin_memory=pin)
        for k, c in enumerate(crops):
            h, w = c.shape[1], c.shape[2]
            out[k, :, :h, :w] = c
            # the edges repeated into the padding: bilinear samples past a crop's last pixel take that pixel, as
            # they would at an image's border
            out[k, :, :h, w:] = c[:, :, w - 1:w]
            out[k, :, h:, :] = out[k, :, h - 1:h, :]
        params = torch.stack([p for (_, p), _ in batch])
        order = torch.randperm(4)  # the jitter's order, one per batch
        return (out, params, order), torch.tensor([y for _, y in batch])

    # ---------------------------------------------------------------- device, per batch

    def apply(self, x_u8: torch.Tensor, params: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """Augmented float images (0..255, N x 3 x size x size) on x_u8's device."""
        from torchvision.ops import roi_align

        n = x_u8.shape[0]
        params = params.to(x_u8.device, torch.float32)
        zeros = torch.zeros(n, device=x_u8.device)
        boxes = torch.stack([torch.arange(n, device=x_u8.device, dtype=torch.float32), zeros, zeros,
                             params[:, 1], params[:, 0]], 1)
        x = roi_align(x_u8.float(), boxes, (self.size, self.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flip = params[:, 2].view(n, 1, 1, 1) > 0.5
        x = torch.where(flip, x.flip(-1), x)
        if self.p.jitter is not None:
            steps: list[Callable[[torch.Tensor], torch.Tensor]] = [
                lambda t: brightness(t, params[:, 3]), lambda t: contrast(t, params[:, 4]),
                lambda t: saturation(t, params[:, 5]), lambda t: hue(t, params[:, 6])]
            for k in (order.tolist() if order is not None else range(4)):
                x = steps[k](x)
        return x.clamp_(0, 255)

    def wrap(self, loader, device: torch.device) -> Augmented:
        return Augmented(loader, self, device)


class Augmented:
    """A loader whose batches are augmented on the device as they come (len() as the loader's)."""

    def __init__(self, loader, aug: BatchAugment, device: torch.device):
        self.loader, self.aug, self.device = loader, aug, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (x, params, order), y in self.loader:
            yield self.aug.apply(x.to(self.device, non_blocking=True), params, order), y


# ---------------------------------------------------------------- colour, a factor per image (floats 0..255)


def _per_image(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (GRAY[0] * x[:, 0] + GRAY[1] * x[:, 1] + GRAY[2] * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (_per_image(f) * x + (1 - _per_image(f)) * other).clamp_(0, 255)


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(f)).clamp_(0, 255)


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


def hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Each image's hue turned by its factor (a fraction of the colour circle, -0.5..0.5), through HSV."""
    rgb = x / 255.0
    r, g, b = rgb.unbind(1)
    maxc, minc = rgb.amax(1), rgb.amin(1)
    flat = maxc == minc
    chroma = maxc - minc
    s = chroma / torch.where(flat, torch.ones_like(maxc), maxc)
    div = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h6 = torch.remainder(h + 6.0 * f.view(-1, 1, 1), 6.0)  # hue in sixths of the circle, turned
    # HSV -> RGB: channel = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6 with n = 5, 3, 1 for R, G, B
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h6.unsqueeze(1), 6.0)
    out = maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))
    return (out * 255.0).clamp_(0, 255)

