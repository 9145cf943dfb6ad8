"""Datasets on disk: class-folder layouts, safe image loading, seeded stratified splits,
augmentation presets and an in-memory cache of decoded, resized images."""
from __future__ import annotations

import logging
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .backbones import Preprocessing
from .errors import DataError, ImageError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
JUNK_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", ".ipynb_checkpoints", "desktop.ini"}
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation", "test", "testing")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit (about 9459 x 9459)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image


@dataclass
class DataSplit:
    """Which images train and which validate, with labels as indexes into `classes`."""

    root: Path
    layout: str
    classes: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for split, items in (("train", self.train), ("val", self.val)):
            c = Counter(lbl for _, lbl in items)
            out[split] = {name: c.get(i, 0) for i, name in enumerate(self.classes)}
        return out

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


# ---------------------------------------------------------------- layouts


def _is_junk(p: Path) -> bool:
    return p.name in JUNK_NAMES or p.name.startswith(".") or p.name.startswith("._")


def _visible(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if not _is_junk(p))


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS


def _images_in(d: Path, ignored: list[Path]) -> list[Path]:
    """Image files under a class folder (nested folders included), junk skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=False):
        dirnames[:] = sorted(n for n in dirnames if not _is_junk(Path(n)))
        for n in sorted(filenames):
            p = Path(dirpath) / n
            if _is_junk(p) or p.is_symlink():
                continue
            (out if _is_image(p) else ignored).append(p)
    return out


def _find_root(root: Path) -> tuple[Path, list[str]]:
    """Descend through single wrapping folders (e.g. a zip that holds `my_data/train/...`)."""
    notes = []
    for _ in range(4):
        entries = _visible(root)
        dirs = [e for e in entries if e.is_dir()]
        files = [e for e in entries if e.is_file() and _is_image(e)]
        if len(dirs) == 1 and not files and any(x.is_dir() for x in _visible(dirs[0])):
            name = dirs[0].name.lower()
            if name in TRAIN_NAMES or name in VAL_NAMES:
                break
            notes.append(f"used the single top folder {dirs[0].name}/")
            root = dirs[0]
        else:
            break
    return root, notes


def _class_dirs(d: Path) -> list[Path]:
    return [p for p in _visible(d) if p.is_dir()]


def _collect(split_dir: Path, ignored: list[Path]) -> dict[str, list[Path]]:
    return {c.name: _images_in(c, ignored) for c in _class_dirs(split_dir)}


def stratified_split(per_class: dict[str, list[Path]], fraction: float, seed: int
                     ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Seeded split of each class on its own, so that every class with 2+ images is in both parts."""
    rng = random.Random(seed)
    train, val = {}, {}
    for name in sorted(per_class):
        items = sorted(per_class[name])
        rng.shuffle(items)
        n_val = 0 if len(items) < 2 else min(len(items) - 1, max(1, round(len(items) * fraction)))
        val[name], train[name] = sorted(items[:n_val]), sorted(items[n_val:])
    return train, val


def discover(data_dir: str | Path, val_fraction: float = 0.2, seed: int = 0) -> DataSplit:
    """Read a dataset folder: `train/<class>` + `val/<class>`, `train/<class>` only, or `<class>/` only
    (the last two get a stratified, seeded val split), optionally inside one wrapping folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a folder: give the folder that holds train/ and val/ "
                        "(or one sub-folder per class)")
    root, warnings = _find_root(data_dir)
    ignored: list[Path] = []
    names = {p.name.lower(): p for p in _visible(root) if p.is_dir()}
    train_dir = next((names[n] for n in TRAIN_NAMES if n in names), None)
    val_dirs = [names[n] for n in VAL_NAMES if n in names]

    if train_dir is None and val_dirs:
        raise DataError(
            f"found {', '.join(d.name + '/' for d in val_dirs)} but no train/ folder: "
            "rename the folder that holds the training images to train/"
        )
    if train_dir is not None:
        train_pc = _collect(train_dir, ignored)
        if val_dirs:
            layout = f"{train_dir.name}/ + {val_dirs[0].name}/"
            val_pc = _collect(val_dirs[0], ignored)
            for extra in val_dirs[1:]:
                warnings.append(f"ignored {extra.name}/: {val_dirs[0].name}/ is used for validation")
        else:
            layout = f"{train_dir.name}/ only (split {val_fraction:.0%} for val)"
            train_pc, val_pc = stratified_split(train_pc, val_fraction, seed)
    else:
        layout = f"class folders only (split {val_fraction:.0%} for val)"
        train_pc = _collect(root, ignored)
        loose = [p for p in _visible(root) if p.is_file() and _is_image(p)]
        if loose:
            warnings.append(f"ignored {len(loose)} images outside class folders (e.g. {loose[0].name}): "
                            "put every image in the folder named after its class")
        train_pc, val_pc = stratified_split(train_pc, val_fraction, seed)

    classes = sorted(train_pc)
    if len(classes) < 2:
        raise DataError(
            f"found {len(classes)} class folder(s) in {root}{' (' + ', '.join(classes) + ')' if classes else ''}: "
            "a classifier needs at least 2, one sub-folder per class with its images inside"
        )
    empty = [c for c in classes if not train_pc[c]]
    if empty:
        raise DataError(f"class folder(s) with no training images: {', '.join(empty)}: "
                        "add images (jpg, png, bmp, gif, webp, tif) or remove the folder")
    unknown = sorted(set(val_pc) - set(classes))
    if unknown:
        raise DataError(f"the val split has classes that train does not: {', '.join(unknown)}: "
                        "use the same class folder names in train/ and val/")
    missing_val = [c for c in classes if not val_pc.get(c)]
    if missing_val:
        warnings.append(f"no val images for class(es) {', '.join(missing_val)}: their accuracy cannot be measured")
    if ignored:
        shown = ", ".join(p.name for p in ignored[:5])
        warnings.append(f"ignored {len(ignored)} non-image file(s): {shown}{'...' if len(ignored) > 5 else ''}")

    idx = {c: i for i, c in enumerate(classes)}
    train = [(p, idx[c]) for c in classes for p in train_pc[c]]
    val = [(p, idx[c]) for c in classes for p in val_pc.get(c, [])]
    if not val:
        raise DataError("no validation images: add a val/ folder or more images per class")
    return DataSplit(root, layout, classes, train, val, warnings)


def subsample(items: list[tuple[Path, int]], n: int, seed: int) -> list[tuple[Path, int]]:
    """A stratified, seeded subset of at most n items (for quick runs). Every class keeps at least one
    item: with n below the number of classes, that is one item per class."""
    if n >= len(items):
        return items
    rng = random.Random(seed)
    by: dict[int, list] = {}
    for it in items:
        by.setdefault(it[1], []).append(it)
    groups = sorted(by.items())
    share = {lbl: n * len(its) / len(items) for lbl, its in groups}
    quota = {lbl: max(1, int(share[lbl])) for lbl, _ in groups}
    spare = n - sum(quota.values())  # largest remainders first, so the total never goes over n
    for lbl in sorted(quota, key=lambda lbl: quota[lbl] - share[lbl])[:max(0, spare)]:
        quota[lbl] += 1
    out = []
    for lbl, its in groups:
        out.extend(rng.sample(its, min(quota[lbl], len(its))))
    return sorted(out)


# ---------------------------------------------------------------- safe image loading


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


def load_image(path: str | Path, min_short_side: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image safely: refuse decompression bombs, apply EXIF orientation, convert any mode to
    RGB. With `min_short_side`, JPEGs are decoded at a reduced scale that still covers it (faster).
    Raises ImageError with the reason for anything unusable."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path.name}: empty file (0 bytes)")
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{path.name}: {w}x{h} pixels is over the limit of {max_pixels} "
                                 "(a decompression bomb or a huge scan): resize it below that")
            if min_short_side and img.format == "JPEG":
                scale = min(w, h) / min_short_side
                if scale >= 2:
                    img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path.name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path.name}: not an image Pillow can read (wrong extension or corrupt)") from None
    except (OSError, ValueError, SyntaxError) as e:
        msg = str(e) or e.__class__.__name__
        if "truncated" in msg.lower():
            msg = "truncated file"
        raise ImageError(f"{path.name}: unreadable ({msg})") from None


def resize_short(img: Image.Image, short: int, interpolation: str = "bilinear") -> Image.Image:
    w, h = img.size
    s = short / min(w, h)
    size = (max(short, round(w * s)), max(short, round(h * s)))
    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    return img.resize(size, resample, reducing_gap=3.0)


def to_tensor_u8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode_for(path: Path, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode an image and resize its short side to the preprocessing's resize size (uint8 CHW)."""
    img = load_image(path, pre.resize_size, max_pixels)
    return to_tensor_u8(resize_short(img, pre.resize_size, pre.interpolation))


class ImageStore:
    """Decoded, resized images (uint8 CHW), kept in memory up to a byte budget; beyond it, decoded on
    each access. Building it decodes every image once, which also finds the unreadable ones."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessing, budget_bytes: int = 3 << 30,
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None,
                 progress: Callable[[int, int], None] | None = None):
        self.pre, self.max_pixels = pre, max_pixels
        self.paths = list(paths)
        self.cache: list[torch.Tensor | None] = [None] * len(self.paths)
        self.errors: dict[int, str] = {}
        used = 0
        threads = threads or min(8, len(os.sched_getaffinity(0)))

        def work(i: int):
            try:
                return i, decode_for(self.paths[i], pre, max_pixels), None
            except ImageError as e:
                return i, None, str(e)

        with ThreadPoolExecutor(threads) as pool:
            for n, (i, t, err) in enumerate(pool.map(work, range(len(self.paths))), 1):
                if err:
                    self.errors[i] = err
                elif used + t.numel() <= budget_bytes:
                    self.cache[i] = t
                    used += t.numel()
                if progress:
                    progress(n, len(self.paths))
        self.bytes = used

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> torch.Tensor:
        t = self.cache[i]
        return t if t is not None else decode_for(self.paths[i], self.pre, self.max_pixels)


# ---------------------------------------------------------------- transforms


def train_transform(preset: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Augmentation on a uint8 CHW tensor whose short side is the resize size; output size x size."""
    from torchvision.transforms import v2

    if preset == "none":
        return v2.CenterCrop(size)
    if preset == "light":
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
                           v2.RandomHorizontalFlip()])
    if preset == "standard":
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(),
                           v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02)])
    raise ValueError(f"unknown augmentation preset {preset!r}: use none, light or standard")


def eval_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    return v2.CenterCrop(size)


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 image, label) pairs from an ImageStore, through a transform."""

    def __init__(self, store: ImageStore, indexes: Sequence[int], labels: Sequence[int], transform):
        self.store, self.indexes, self.labels, self.transform = store, list(indexes), list(labels), transform

    def __len__(self) -> int:
        return len(self.indexes)

    def __getitem__(self, k: int):
        return self.transform(self.store.get(self.indexes[k])), self.labels[k]


def normalize(batch_u8: torch.Tensor, pre: Preprocessing, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW -> float, scaled and normalized with the backbone's mean and std."""
    x = batch_u8.float().div_(255.0)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def preprocess_image(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """One PIL image -> one normalized 1x3xHxW tensor, exactly as validation images are prepared."""
    t = eval_transform(pre.image_size)(to_tensor_u8(resize_short(_to_rgb(img), pre.resize_size, pre.interpolation)))
    return normalize(t.unsqueeze(0), pre, channels_last=False)
