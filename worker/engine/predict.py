"""Predictions from a saved model file."""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch

from domain.errors import ImageError

from .backbones import Preprocessing
from .data import eval_transform, load_image, normalize, resize_short, to_tensor_u8
from .modelfile import load_model


class Predictor:
    """A loaded model plus its preprocessing; `predict` takes image paths and returns top-k per image."""

    def __init__(self, model_path: str | Path, device: str = "cpu"):
        self.model, self.meta = load_model(model_path, device)
        self.device = torch.device(device)
        self.classes: list[str] = self.meta["classes"]
        self.pre = Preprocessing.from_dict(self.meta["preprocessing"])
        self._crop = eval_transform(self.pre.image_size)
        self.channels_last = self.model.info.channels_last  # faster for convnets, on CPU too
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _tensor(self, source: Path | BinaryIO, name: str | None = None) -> torch.Tensor:
        img = load_image(source, self.pre.resize_size, name=name)
        return self._crop(to_tensor_u8(resize_short(img, self.pre.resize_size, self.pre.interpolation)))

    @torch.inference_mode()
    def probabilities(self, batch_u8: torch.Tensor) -> torch.Tensor:
        x = normalize(batch_u8.to(self.device), self.pre, channels_last=self.channels_last)
        return self.model(x).float().softmax(1).cpu()

    def predict(self, paths: Sequence[str | Path], top_k: int = 3, batch_size: int = 32) -> list[dict]:
        """One dict per path, in order: {"file", "top": [{"class", "probability"}...]} or {"file", "error"}."""
        return self.predict_sources([(str(p), Path(p)) for p in paths], top_k, batch_size)

    def predict_sources(self, sources: Sequence[tuple[str, Path | BinaryIO]], top_k: int = 3,
                        batch_size: int = 32) -> list[dict]:
        """Like `predict`, for (name, path or binary file) pairs (uploaded images)."""
        paths = [name for name, _ in sources]
        results: list[dict] = [{} for _ in sources]
        good: list[tuple[int, torch.Tensor]] = []

        def decode(item):
            name, src = item
            try:
                return self._tensor(src, None if isinstance(src, Path) else name), None
            except ImageError as e:
                return None, str(e)

        # Pillow releases the GIL while decoding: decode on all cores
        with ThreadPoolExecutor(max(1, min(8, len(os.sched_getaffinity(0))))) as pool:
            for i, ((name, _), (t, err)) in enumerate(zip(sources, pool.map(decode, sources))):
                if err is None:
                    good.append((i, t))
                else:
                    results[i] = {"file": name, "error": err}
        k = min(top_k, len(self.classes))
        for s in range(0, len(good), batch_size):
            chunk = good[s:s + batch_size]
            probs = self.probabilities(torch.stack([t for _, t in chunk]))
            for (i, _), pr in zip(chunk, probs):
                vals, idx = pr.topk(k)
                results[i] = {"file": str(paths[i]), "top": [
                    {"class": self.classes[j], "probability": round(float(v), 6)} for v, j in zip(vals, idx)]}
        return results
