"""Images as tensors: decoding into an in-memory store, augmentation presets, batches.

The torch-free parts live in `layout` (folder layouts, splits) and `images` (safe loading with
Pillow); they are re-exported here.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from domain.errors import DataError, ImageError
from domain.images import DEFAULT_MAX_PIXELS, _to_rgb, load_image, resize_short  # noqa: F401
from domain.layout import (  # noqa: F401
    IMAGE_EXTS,
    JUNK_NAMES,
    TRAIN_NAMES,
    VAL_NAMES,
    DataSplit,
    discover,
    stratified_split,
    subsample,
)

from .augment import PRESETS, RATIO, BatchAugment, use_batch_path
from .backbones import Preprocessing
from .gpu_decode import decode_device, decode_files

log = logging.getLogger(__name__)


def to_tensor_u8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode_for(path: Path, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS, full: bool = False
               ) -> torch.Tensor:
    """Decode an image and resize its short side to the preprocessing's resize size (uint8 CHW). Training
    decodes big JPEGs at a reduced scale (Pillow's draft mode: several times faster); `full` decodes every
    pixel first, as predictions do, so that an export fed the decoded image computes exactly the same."""
    img = load_image(path, None if full else pre.resize_size, max_pixels)
    return to_tensor_u8(resize_short(img, pre.resize_size, pre.interpolation))


SLAB_BYTES = 256 << 20  # the store's shared-memory blocks


class _Slabs:
    """Append-only uint8 storage in shared-memory blocks: an image is a view into a block, so loader worker
    processes (forked) read the same pages instead of copying them, and no Python object per image keeps
    its own buffer."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.blocks: list[torch.Tensor] = []
        self.fill = 0  # bytes used in the last block

    def put(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(block, offset) of a copy of `t`, or None when it would pass the budget."""
        n = t.numel()
        if self.used + n > self.budget:
            return None
        if not self.blocks or self.fill + n > self.blocks[-1].numel():
            size = min(max(SLAB_BYTES, n), max(n, self.budget - self.used))
            self.blocks.append(torch.empty(size, dtype=torch.uint8).share_memory_())
            self.fill = 0
        block, off = len(self.blocks) - 1, self.fill
        self.blocks[block][off:off + n].copy_(t.reshape(-1))
        self.fill += n
        self.used += n
        return block, off


class ImageStore:
    """Decoded, resized images (uint8 CHW), kept in shared memory up to a byte budget (GRAFT_IMAGE_STORE_BYTES
    on a worker); beyond it, decoded on each access. Building it decodes every image once, which also finds
    the unreadable ones: JPEGs on the GPU when `device` is a CUDA one and GRAFT_GPU_DECODE allows (gpu_decode)."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessing, budget_bytes: int = 3 << 30,
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None,
                 progress: Callable[[int, int], None] | None = None, device: torch.device | str | None = None):
        self.pre, self.max_pixels = pre, max_pixels
        self.paths = list(paths)
        # per image: (block, offset, channels, height, width), or None when not kept
        self.cache: list[tuple[int, int, int, int, int] | None] = [None] * len(self.paths)
        self.errors: dict[int, str] = {}
        self._slabs = _Slabs(budget_bytes)
        threads = threads or min(8, len(os.sched_getaffinity(0)))

        def work(i: int):
            try:
                return i, decode_for(self.paths[i], pre, max_pixels), None
            except ImageError as e:
                return i, None, str(e)

        pool = ThreadPoolExecutor(threads)
        gpu = decode_device(device)

        def windows():  # a window of tasks at a time: Executor.map makes every future up front
            for a in range(0, len(self.paths), 1024):
                b = min(len(self.paths), a + 1024)
                if gpu is None:
                    yield from pool.map(work, range(a, b))
                    continue
                got = decode_files(self.paths[a:b], pre, lambda p: decode_for(p, pre, max_pixels), gpu, max_pixels,
                                   pool)
                yield from ((i, None, str(r)) if isinstance(r, ImageError) else (i, r, None)
                            for i, r in enumerate(got, a))

        try:
            for n, (i, t, err) in enumerate(windows(), 1):
                if err:
                    self.errors[i] = err
                else:
                    where = self._slabs.put(t)
                    if where is not None:
                        self.cache[i] = (*where, *t.shape)
                if progress:
                    progress(n, len(self.paths))  # may raise to cancel the run
        finally:
            # on cancel, drop the images not started yet instead of decoding them all first
            pool.shutdown(wait=True, cancel_futures=True)
        self.bytes = self._slabs.used

    def __len__(self) -> int:
        return len(self.paths)

    def cached(self, i: int) -> bool:
        return self.cache[i] is not None

    def get(self, i: int) -> torch.Tensor:
        c = self.cache[i]
        if c is None:
            return decode_for(self.paths[i], self.pre, self.max_pixels)
        block, off, ch, h, w = c
        return self._slabs.blocks[block][off:off + ch * h * w].view(ch, h, w)


# ---------------------------------------------------------------- transforms


def train_transform(preset: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Augmentation on a uint8 CHW tensor whose short side is the resize size; output size x size (augment.PRESETS;
    the same on whole batches on the device: augment.BatchAugment)."""
    from torchvision.transforms import v2

    if preset == "none":
        return v2.CenterCrop(size)
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}: use none, {', '.join(PRESETS)}")
    p = PRESETS[preset]
    steps = [v2.RandomResizedCrop(size, scale=p.scale, ratio=RATIO, antialias=True), v2.RandomHorizontalFlip()]
    if p.jitter is not None:
        b, c, s, h = p.jitter
        steps.append(v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    return v2.Compose(steps)


def train_augmentation(preset: str, size: int, device: torch.device):
    """The preset's augmentation for a run on `device`: per image on the CPU (train_transform), or a BatchAugment
    that finishes the work on the device a batch at a time (augment.py; GRAFT_GPU_AUGMENT)."""
    if use_batch_path(preset, device):
        return BatchAugment(preset, size)
    return train_transform(preset, size)


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


def image_loader(store: ImageStore, idx: list[int], labels: list[int], transform, batch_size: int, shuffle: bool,
                 device: torch.device) -> torch.utils.data.DataLoader:
    """Batches of the store's images `idx`: decoded in loader workers until every one is cached in memory,
    then in this process (workers would only add start-up time). With a BatchAugment as the transform the
    loader cuts the crops and the batches are augmented on `device` as they come."""
    batch_aug = isinstance(transform, BatchAugment)
    ds = ImageDataset(store, idx, labels, transform.sample if batch_aug else transform)
    cached = all(store.cached(i) for i in idx)
    workers = 0 if cached else min(4, len(os.sched_getaffinity(0)))
    pin = device.type == "cuda"
    # in this process, the batch path collates straight into pinned memory; loader workers cannot pin
    pin_in_collate = batch_aug and pin and workers == 0
    collate = functools.partial(transform.collate, pin=pin_in_collate) if batch_aug else None
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                         pin_memory=pin and not pin_in_collate, persistent_workers=False,
                                         collate_fn=collate)
    return transform.wrap(loader, device) if batch_aug else loader


@dataclass
class DecodedSplit:
    """A split's images decoded into a store: `items` (train images first, then val), the readable train and val
    images as indices into it, and "file: why" of each unreadable one."""

    store: ImageStore
    items: list[tuple[Path, int]]
    train_idx: list[int]
    val_idx: list[int]
    skipped: list[str]


def decode_split(split: DataSplit, pre: Preprocessing, budget_bytes: int, max_pixels: int,
                 progress: Callable[[int, int], None], on_skipped: Callable[[str], None],
                 device: torch.device | str | None = None) -> DecodedSplit:
    """Decode the train and val images of `split` into an ImageStore (`progress(done, total)`; JPEGs on the GPU
    where `device` allows), naming each unreadable one to `on_skipped`. DataError when a class has no readable
    train image left, or val none."""
    items = split.train + split.val
    store = ImageStore([p for p, _ in items], pre, budget_bytes, max_pixels=max_pixels, progress=progress,
                       device=device)
    skipped = [f"{split.rel(items[i][0])}: {msg.split(': ', 1)[-1]}" for i, msg in sorted(store.errors.items())]
    for s in skipped:
        on_skipped(s)
    n_train = len(split.train)
    keep = [i for i in range(len(items)) if i not in store.errors]
    train_idx = [i for i in keep if i < n_train]
    val_idx = [i for i in keep if i >= n_train]
    left = {items[i][1] for i in train_idx}
    gone = [c for i, c in enumerate(split.classes) if i not in left]
    if gone:
        raise DataError(f"no readable training images left for class(es) {', '.join(gone)} "
                        f"({len(skipped)} images skipped): replace the unreadable files")
    if not val_idx:
        raise DataError("no readable validation images left: replace the unreadable files in val/")
    return DecodedSplit(store, items, train_idx, val_idx, skipped)
