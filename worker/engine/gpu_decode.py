"""JPEG decoding on the GPU (nvJPEG through `torchvision.io.decode_jpeg(..., device="cuda")`, in batches) with
the CPU path as the fallback, giving what the CPU path gives: uint8 CHW tensors on the CPU whose short side is
the preprocessing's resize size (resized on the device, antialiased, with the CPU path's output size).

Only plain files go to the GPU: a baseline or progressive JPEG (by its bytes, not its name) in RGB (YCbCr),
ending with its end-of-image marker, without an EXIF rotation and under the pixel limit. Everything else (PNG
and other formats, grayscale or CMYK JPEGs, EXIF-rotated ones, truncated or corrupt files, files over the limit)
and every batch the GPU fails on is decoded by the caller's CPU function, so its errors are the CPU path's.

The setting is GRAFT_GPU_DECODE (not part of a RunSpec: it changes how, not what, a run trains):
- `auto` (the default): on the GPU when the caller says it trains on a CUDA device that can decode; else the CPU;
- `on`: on the GPU whenever CUDA can decode, whatever device the caller names;
- `off`: always the CPU path.

Pixels differ slightly from the CPU path's (nvJPEG's IDCT and upsampling, torch's antialiased resize against
Pillow's; the CPU path decodes big JPEGs at a reduced DCT scale first): the shapes and dtype are the same.
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from domain.errors import ImageError
from domain.images import DEFAULT_MAX_PIXELS

from .backbones import Preprocessing
from .device import env_choice

log = logging.getLogger(__name__)

ENV = "GRAFT_GPU_DECODE"
MODES = ("auto", "on", "off")
GPU_BATCH = 64  # files per decode_jpeg call
EXIF_ORIENTATION = 0x0112

Decoded = torch.Tensor | ImageError
CpuDecode = Callable[[Path], torch.Tensor]


def gpu_decode_mode() -> str:
    """GRAFT_GPU_DECODE: auto (default), on or off; an unknown value counts as off (and says so)."""
    return env_choice(ENV, MODES, "auto", "off", "decoding on the CPU")


def decode_device(device: torch.device | str | None = None) -> torch.device | None:
    """The CUDA device to decode JPEGs on, or None for the CPU path (see the module's note on the setting)."""
    mode = gpu_decode_mode()
    if mode == "off" or not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        if mode == "auto":
            return None
        dev = torch.device("cuda")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev if gpu_decode_works(str(dev)) else None


@cache
def gpu_decode_works(device: str) -> bool:
    """Whether decode_jpeg runs on `device` (torchvision built with nvJPEG, a working driver): tried once."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 8), (10, 120, 230)).save(buf, "JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        out = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
        return tuple(out[0].shape) == (3, 8, 16)
    except Exception as e:  # any failure means: decode on the CPU
        log.warning("JPEG decoding on %s is unavailable (%s): decoding on the CPU", device, e)
        return False


def gpu_jpeg_bytes(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor | None:
    """The file's bytes (uint8) when it is a JPEG the GPU path may decode, else None (the CPU path's)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":  # not a JPEG, or truncated
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the headers only
            w, h = img.size
            if img.format != "JPEG" or img.mode != "RGB" or not 0 < w * h <= max_pixels:
                return None
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return None
    except Exception:  # whatever Pillow cannot read, the CPU path reports
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def resize_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(height, width) with the short side `short`: the output size of domain.images.resize_short."""
    s = short / min(w, h)
    return max(short, round(h * s)), max(short, round(w * s))


def resize_on_device(img: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 CHW on any device -> uint8 CHW (same device) with the short side pre.resize_size, antialiased."""
    h, w = img.shape[-2:]
    size = resize_size(h, w, pre.resize_size)
    if size == (h, w):
        return img
    mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
    x = F.interpolate(img.unsqueeze(0).float(), size=size, mode=mode, antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)


def _cpu(decode: CpuDecode, path: Path) -> Decoded:
    try:
        return decode(path)
    except ImageError as e:
        return e


def decode_jpeg_batch(datas: Sequence[torch.Tensor], pre: Preprocessing, device: torch.device | str
                      ) -> list[torch.Tensor]:
    """JPEG bytes -> resized uint8 CHW tensors on the CPU, decoded and resized on `device` (one decode_jpeg call)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    imgs = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
    out = [resize_on_device(img, pre).to("cpu", non_blocking=False) for img in imgs]
    return [t.contiguous() for t in out]


def decode_files(paths: Sequence[Path], pre: Preprocessing, cpu_decode: CpuDecode,
                 device: torch.device | str | None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 pool: Executor | None = None, batch: int = GPU_BATCH) -> list[Decoded]:
    """Each file decoded and resized as `cpu_decode` would (uint8 CHW on the CPU), or the ImageError it raised.
    With a `device` (see decode_device), the JPEGs it can take are decoded there in batches of `batch`; the rest,
    and any batch it fails on, by `cpu_decode` in `pool`'s threads. Without one, all by `cpu_decode`."""
    own = pool is None
    ex: Executor = pool if pool is not None else ThreadPoolExecutor(min(8, len(os.sched_getaffinity(0))))
    try:
        if device is None:
            return list(ex.map(lambda p: _cpu(cpu_decode, p), paths))
        datas = list(ex.map(lambda p: gpu_jpeg_bytes(p, max_pixels), paths))
        out: list[Decoded | None] = [None] * len(paths)
        cpu_idx = [i for i, d in enumerate(datas) if d is None]
        gpu_idx = [i for i, d in enumerate(datas) if d is not None]
        cpu_futures = {i: ex.submit(_cpu, cpu_decode, paths[i]) for i in cpu_idx}  # alongside the GPU
        for a in range(0, len(gpu_idx), batch):
            part = gpu_idx[a:a + batch]
            try:
                for i, t in zip(part, decode_jpeg_batch([d for i in part if (d := datas[i]) is not None], pre,
                                                        device)):
                    out[i] = t
            except Exception as e:  # a file nvJPEG refuses, or the device failing: the CPU path decides
                log.warning("GPU JPEG decoding failed on a batch of %d (%s): decoding it on the CPU", len(part), e)
                cpu_futures.update({i: ex.submit(_cpu, cpu_decode, paths[i]) for i in part})
        for i, f in cpu_futures.items():
            out[i] = f.result()
        return [r if r is not None else ImageError(f"{paths[i]}: not decoded") for i, r in enumerate(out)]
    finally:
        if own:
            ex.shutdown(wait=True)
