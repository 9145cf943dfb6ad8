"""The on-disk cache of frozen-backbone features: one key function, one reader, one writer.

A key names everything the features depend on: the backbone and its weights, the preprocessing, the
augmentation preset and view number, the seed, and each image file (name, size, mtime, label). A `features`
run and `graft probe` on the same data and backbone therefore share entries."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .modelfile import atomic_save

log = logging.getLogger(__name__)

KEY_VERSION = 1


def fingerprint(items: list[tuple[Path, int]], root: Path) -> str:
    """Identifies a list of labelled files by name, size and modification time."""
    h = hashlib.sha256()
    for p, lbl in items:
        st = p.stat()
        h.update(f"{p.relative_to(root) if p.is_relative_to(root) else p}|{st.st_size}|{st.st_mtime_ns}|{lbl}\n".encode())
    return h.hexdigest()


class FeatureCache:
    """Feature tensors [images, features] (float32, CPU) under `<cache_dir>/features/<key>.pt`."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir) / "features"

    @staticmethod
    def key(backbone: str, weights: str, preprocessing: dict, preset: str, view: int, seed: int,
            items: list[tuple[Path, int]], root: Path) -> str:
        payload = {
            "v": KEY_VERSION, "backbone": backbone, "weights": weights, "pre": preprocessing,
            "preset": preset, "view": view, "seed": seed, "items": fingerprint(items, root),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def load(self, key: str, shape: tuple[int, int]) -> torch.Tensor | None:
        """The entry of `key` when it is there, readable and of `shape`; else None (a corrupt or stale entry
        is recomputed, never an error)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            log.warning("ignoring unreadable feature cache %s", path)
            return None
        return feats if tuple(feats.shape) == tuple(shape) else None

    def save(self, key: str, feats: torch.Tensor) -> None:
        atomic_save(feats, self.path(key))


class FeatureExtractor:
    """Frozen-backbone features of a list of labelled images for one augmentation preset and view: from the
    cache when it holds them (one key function, `FeatureCache.key`), else computed by the model's body on the
    batches a loader gives and written to the cache. A `features` run, the probe and the advisor all use it."""

    def __init__(self, cache: FeatureCache | None, body: torch.nn.Module, dim: int, backbone: str, weights: str,
                 preprocessing: dict, seed: int, root: Path):
        self.cache, self.body, self.dim = cache, body, dim
        self.backbone, self.weights, self.pre, self.seed, self.root = backbone, weights, preprocessing, seed, root

    def key(self, preset: str, view: int, items: list[tuple[Path, int]]) -> str:
        return FeatureCache.key(self.backbone, self.weights, self.pre, preset, view, self.seed, items, self.root)

    def cached(self, preset: str, view: int, items: list[tuple[Path, int]]) -> torch.Tensor | None:
        if self.cache is None:
            return None
        return self.cache.load(self.key(preset, view, items), (len(items), self.dim))

    @torch.inference_mode()
    def get(self, items: list[tuple[Path, int]], preset: str, view: int, batches: Callable[[], Iterable],
            inputs: Callable, autocast: Callable, on_batch: Callable[[int], None]) -> tuple[torch.Tensor, bool]:
        """(features [len(items), dim] float32 on the CPU, whether they came from the cache). `batches()` makes
        the loader of (uint8 images, labels) of `items`; `on_batch(images done)` follows the computation. The
        random augmentation is seeded by the run's seed and the view, so that a view is the same every time."""
        feats = self.cached(preset, view, items)
        if feats is not None:
            return feats, True
        self.body.eval()
        out = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1009 + view + 1)
            done = 0
            for x, _ in batches():
                with autocast():
                    f = self.body(inputs(x))
                out.append(f.float().cpu())
                done += len(x)
                on_batch(done)
        feats = torch.cat(out)
        if self.cache is not None:
            self.cache.save(self.key(preset, view, items), feats)
        return feats, False
