"""Safe image loading with Pillow (torch-free, used by the web tier too)."""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit (about 9459 x 9459)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


class _Named:
    def __init__(self, name: str):
        self.name = name


# JPEGs are decoded at a reduced scale (Pillow's draft mode: DCT scaling by 1/2, 1/4, 1/8) only down to
# DRAFT_MARGIN times the size asked for, so that the antialiased resize after it does most of the reduction:
# measured on a 4000x3000 JPEG resized to 256, the decode took 15 ms at margin 1 (up to 9 levels off a full
# decode), 41 ms at margin 3 (2 levels off), 124 ms in full; on 500x375 photos resized to 73, margin 1 was up to
# 115 levels off (mean 3.6) and margin 3 decodes them in full.
DRAFT_MARGIN = 3


def load_image(path: str | Path | BinaryIO, min_short_side: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open an image (a path, or a binary file object named by `name`) safely: refuse decompression
    bombs, apply EXIF orientation, convert any mode to RGB. With `min_short_side`, JPEGs are decoded at a
    reduced scale that still covers DRAFT_MARGIN times it (faster); without, in full. Raises ImageError with the reason for anything unusable."""
    source: Path | BinaryIO
    named: Path | _Named
    if isinstance(path, (str, Path)):
        source = named = Path(path)
    else:
        source, named = path, _Named(name or "image")
    try:
        if isinstance(source, Path):
            empty = source.stat().st_size == 0
        else:
            empty = not source.read(1)
            source.seek(0)
        if empty:
            raise ImageError(f"{named.name}: empty file (0 bytes)")
        with Image.open(source) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{named.name}: {w}x{h} pixels is over the limit of {max_pixels} "
                                 "(a decompression bomb or a huge scan): resize it below that")
            if min_short_side and img.format == "JPEG":
                scale = min(w, h) / (min_short_side * DRAFT_MARGIN)
                if scale >= 2:
                    img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{named.name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{named.name}: not an image Pillow can read (wrong extension or corrupt)") from None
    except (OSError, ValueError, SyntaxError) as e:
        msg = str(e) or e.__class__.__name__
        if "truncated" in msg.lower():
            msg = "truncated file"
        raise ImageError(f"{named.name}: unreadable ({msg})") from None


def resize_short(img: Image.Image, short: int, interpolation: str = "bilinear") -> Image.Image:
    w, h = img.size
    s = short / min(w, h)
    size = (max(short, round(w * s)), max(short, round(h * s)))
    resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    return img.resize(size, resample, reducing_gap=3.0)
