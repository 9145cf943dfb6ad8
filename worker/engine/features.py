"""The on-disk cache of frozen-backbone features: one key function, one reader, one writer.

A key names everything the features depend on: the backbone and its weights, the preprocessing, the
augmentation preset and view number, the seed, and each image file (name, size, mtime, label). A `features`
run and `graft probe` on the same data and backbone therefore share entries.

Features are computed and written in parts of PART_IMAGES images (each part's augmentation seeded on its own),
so a run stopped in the feature stage (a lost worker, a cancel, a shutdown) resumes from the parts already
written instead of starting over. A `mirror` (given by the worker bridge when there is object storage) keeps
every entry in storage too, so that another worker resuming the job finds them."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch

from .modelfile import atomic_save

log = logging.getLogger(__name__)

KEY_VERSION = 2  # 2: parts of PART_IMAGES images, each seeded on its own
PART_IMAGES = 2048


def fingerprint(items: list[tuple[Path, int]], root: Path) -> str:
    """Identifies a list of labelled files by name, size and modification time."""
    h = hashlib.sha256()
    for p, lbl in items:
        st = p.stat()
        h.update(f"{p.relative_to(root) if p.is_relative_to(root) else p}|{st.st_size}|{st.st_mtime_ns}|{lbl}\n".encode())
    return h.hexdigest()


class Mirror(Protocol):
    """A second home for cache entries (object storage), by file name under "features/"."""

    def fetch(self, name: str, dest: Path) -> bool: ...
    def store(self, src: Path, name: str) -> None: ...
    def remove(self, name: str) -> None: ...


class FeatureCache:
    """Feature tensors [images, features] (float32, CPU) under `<cache_dir>/features/<key>.pt`, and in the
    mirror when there is one."""

    def __init__(self, cache_dir: str | Path, mirror: Mirror | None = None):
        self.root = Path(cache_dir)
        self.dir = self.root / "features"
        self.mirror = mirror

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
        if not path.is_file() and not self._fetch(key):
            return None
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            log.warning("ignoring unreadable feature cache %s", path)
            return None
        return feats if tuple(feats.shape) == tuple(shape) else None

    def save(self, key: str, feats: torch.Tensor) -> None:
        atomic_save(feats, self.path(key))
        if self.mirror is not None:
            try:
                self.mirror.store(self.path(key), f"{key}.pt")
            except Exception as e:  # the local entry stands; only a resume elsewhere recomputes it
                log.warning("could not copy features %s to storage: %s", key, e)

    def drop(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
        if self.mirror is not None:
            try:
                self.mirror.remove(f"{key}.pt")
            except Exception as e:
                log.warning("could not remove features %s from storage: %s", key, e)

    def _fetch(self, key: str) -> bool:
        if self.mirror is None:
            return False
        try:
            return self.mirror.fetch(f"{key}.pt", self.path(key))
        except Exception as e:
            log.warning("could not read features %s from storage: %s", key, e)
            return False


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
    def get(self, items: list[tuple[Path, int]], preset: str, view: int, batches: Callable[[int, int], Iterable],
            inputs: Callable, autocast: Callable, on_batch: Callable[[int], None]) -> tuple[torch.Tensor, bool]:
        """(features [len(items), dim] float32 on the CPU, whether they came from the cache). `batches(a, b)`
        makes the loader of (uint8 images, labels) of items[a:b]; `on_batch(images done)` follows the
        computation. Each part's augmentation is seeded by the run's seed, the view and the part, so that a view
        is the same every time, resumed or not. Parts found in the cache (a resumed run) are not recomputed."""
        feats = self.cached(preset, view, items)
        if feats is not None:
            return feats, True
        key = self.key(preset, view, items)
        starts = list(range(0, len(items), PART_IMAGES)) or [0]
        names = [f"{key}-part{i}of{len(starts)}" for i in range(len(starts))]
        self.body.eval()
        out, done, computed = [], 0, False
        for i, (a, name) in enumerate(zip(starts, names)):
            b = min(len(items), a + PART_IMAGES)
            part = self.cache.load(name, (b - a, self.dim)) if self.cache is not None and len(starts) > 1 else None
            if part is None:
                computed = True
                chunks = []
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed * 1009 + view + 1 + 100_003 * i)
                    n = 0
                    for x, _ in batches(a, b):
                        with autocast():
                            f = self.body(inputs(x))
                        chunks.append(f.float())  # on the device until the part is done: no wait per batch
                        n += len(f)
                        on_batch(done + n)
                part = torch.cat(chunks).cpu()
                if self.cache is not None and len(starts) > 1:
                    self.cache.save(name, part)  # a resume starts after it
            done += len(part)
            on_batch(done)
            out.append(part)
        feats = torch.cat(out)
        if self.cache is not None:
            self.cache.save(key, feats)
            if len(starts) > 1:
                for name in names:
                    self.cache.drop(name)
        return feats, not computed
