"""Predictions from a saved model file: calibrated probabilities, and when the model file has a `trust` entry,
an out-of-distribution score and whether Graft abstains on each image; optionally a heatmap of the evidence."""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from domain.errors import ImageError

from .backbones import Preprocessing
from .data import eval_transform, load_image, normalize, resize_short, to_tensor_u8
from .modelfile import load_model
from .trust import TrustModel


class Predictor:
    """A loaded model plus its preprocessing; `predict` takes image paths and returns top-k per image."""

    def __init__(self, model_path: str | Path, device: str = "cpu"):
        self.model, self.meta = load_model(model_path, device)
        self.device = torch.device(device)
        self.classes: list[str] = self.meta["classes"]
        self.pre = Preprocessing.from_dict(self.meta["preprocessing"])
        self.trust = TrustModel.from_meta(self.meta)
        # a multi-label model (issue 16): sigmoid probabilities, each label given at or above its threshold
        self.multilabel = self.meta.get("task") == "multilabel"
        self.thresholds: list[float] = [float(t) for t in self.meta.get("thresholds") or [0.5] * len(self.classes)]
        self._crop = eval_transform(self.pre.image_size)
        self.channels_last = self.model.info.channels_last  # faster for convnets, on CPU too
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _tensor(self, source: Path | BinaryIO, name: str | None = None) -> torch.Tensor:
        return self._decode(source, name)[0]

    def _decode(self, source: Path | BinaryIO, name: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """The model's input (uint8, cropped) and the size (width, height) of the resized image it was cut from."""
        # every pixel decoded (no JPEG draft mode): what an exported model fed the decoded image computes too
        img = resize_short(load_image(source, None, name=name), self.pre.resize_size,
                           self.pre.interpolation)
        return self._crop(to_tensor_u8(img)), img.size

    def _inputs(self, batch_u8: torch.Tensor) -> torch.Tensor:
        return normalize(batch_u8.to(self.device), self.pre, channels_last=self.channels_last)

    @torch.inference_mode()
    def probabilities(self, batch_u8: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: softmax(logits / T) (T = 1 for a model file without calibration)."""
        return self.answers(batch_u8)[0]

    @torch.inference_mode()
    def answers(self, batch_u8: torch.Tensor, confidence_threshold: float | None = None
                ) -> tuple[torch.Tensor, list[float | None], list[bool]]:
        """(calibrated probabilities, OOD scores, abstained) of a batch of uint8 crops."""
        feats = self.model.body(self._inputs(batch_u8)).float()
        if self.multilabel:  # no calibration nor abstention: an image may carry no label at all
            return self.model.head(feats).float().sigmoid(), [None] * len(feats), [False] * len(feats)
        return self.trust(self.model.head(feats), feats, confidence_threshold)

    def predict(self, paths: Sequence[str | Path], top_k: int = 3, batch_size: int = 32, explain: bool = False,
                confidence_threshold: float | None = None) -> list[dict]:
        """One dict per path, in order: {"file", "top": [{"class", "probability"}...], "abstained", "ood_score"}
        (and "heatmap_png" with `explain`) or {"file", "error"}."""
        return self.predict_sources([(str(p), Path(p)) for p in paths], top_k, batch_size, explain,
                                    confidence_threshold)

    def predict_sources(self, sources: Sequence[tuple[str, Path | BinaryIO]], top_k: int = 3,
                        batch_size: int = 32, explain: bool = False,
                        confidence_threshold: float | None = None,
                        label_thresholds: Sequence[float] | None = None) -> list[dict]:
        """Like `predict`, for (name, path or binary file) pairs (uploaded images). `abstained`: the image is
        unlike the training images (`ood_score` above the model's threshold) or its calibrated confidence is
        below `confidence_threshold` (default: the one chosen on the val set; `abstain_reason` says which).
        `explain`: `heatmap_png`, a base64 grayscale PNG at the image's width and height, brighter where the
        evidence for the top class is. A multi-label model adds `labels` (those at or above their threshold,
        `label_thresholds` or the model file's, most probable first) and `probabilities` (every label's)."""
        from .explain import display_size, heatmaps, png_base64, to_image_size

        paths = [name for name, _ in sources]
        results: list[dict] = [{} for _ in sources]
        good: list[tuple[int, torch.Tensor, tuple[int, int], tuple[int, int] | None]] = []

        def decode(item):
            name, src = item
            try:
                size = display_size(src) if explain else None
                t, resized = self._decode(src, None if isinstance(src, Path) else name)
                return (t, resized, size), None
            except ImageError as e:
                return None, str(e)
            except OSError as e:  # display_size on a file Pillow cannot open: the same reason as load_image's
                return None, f"{name}: unreadable ({e})"

        # Pillow releases the GIL while decoding: decode on all cores
        with ThreadPoolExecutor(max(1, min(8, len(os.sched_getaffinity(0))))) as pool:
            for i, ((name, _), (out, err)) in enumerate(zip(sources, pool.map(decode, sources))):
                if err is None:
                    good.append((i, *out))
                else:
                    results[i] = {"file": name, "error": err}
        k = min(top_k, len(self.classes))
        thr = self.trust.confidence_threshold if confidence_threshold is None else confidence_threshold
        for s in range(0, len(good), batch_size):
            chunk = good[s:s + batch_size]
            batch = torch.stack([t for _, t, _, _ in chunk])
            probs, scores, abstained = self.answers(batch, confidence_threshold)
            cams = heatmaps(self.model, self._inputs(batch), probs.argmax(1).tolist()) if explain else None
            for n, ((i, _, resized, size), pr) in enumerate(zip(chunk, probs)):
                vals, idx = pr.topk(k)
                r = {"file": str(paths[i]), "top": [
                    {"class": self.classes[j], "probability": round(float(v), 6)} for v, j in zip(vals, idx)],
                    "abstained": abstained[n], "ood_score": scores[n]}
                if self.multilabel:
                    r.update(self._labels(pr, label_thresholds))
                if abstained[n]:
                    score = scores[n]
                    ood = self.trust.scorer is not None and score is not None and score > self.trust.scorer.threshold
                    r["abstain_reason"] = "unlike the training images" if ood else \
                        f"confidence {float(vals[0]):.2f} is below the threshold {thr:.2f}"
                if cams is not None and size is not None:
                    r["heatmap_png"] = png_base64(to_image_size(cams[n], resized, size))
                results[i] = r
        return results

    def _labels(self, probs: torch.Tensor, thresholds: Sequence[float] | None) -> dict:
        th = list(thresholds) if thresholds is not None else self.thresholds
        if len(th) != len(self.classes):
            raise ValueError(f"{len(th)} thresholds for {len(self.classes)} labels")
        given = sorted(((float(p), c) for c, p, t in zip(self.classes, probs.tolist(), th) if p >= t - 1e-12),
                       reverse=True)
        return {"labels": [{"class": c, "probability": round(p, 6)} for p, c in given],
                "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs.tolist())}}

    # ------------------------------------------------------------ several requests' images in shared forwards

    def decode_sources(self, sources: Sequence[tuple[str, Path | BinaryIO]],
                       pool: ThreadPoolExecutor | None = None) -> list[torch.Tensor | str]:
        """Each source's uint8 crop, or its error message (what `predict_sources` gives that image), decoded on
        `pool` (default: one of its own on up to 8 cores)."""

        def decode(item: tuple[str, Path | BinaryIO]) -> torch.Tensor | str:
            name, src = item
            try:
                return self._decode(src, None if isinstance(src, Path) else name)[0]
            except ImageError as e:
                return str(e)
            except OSError as e:
                return f"{name}: unreadable ({e})"

        if len(sources) == 1:  # (no hop to another thread for one image)
            return [decode(sources[0])]
        if pool is not None:
            return list(pool.map(decode, sources))
        with ThreadPoolExecutor(max(1, min(8, len(os.sched_getaffinity(0))))) as own:
            return list(own.map(decode, sources))

    @torch.inference_mode()
    def forward(self, batch_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: (the head's outputs, the body's features) of a batch of uint8 crops."""
        feats = self.model.body(self._inputs(batch_u8)).float()
        return self.model.head(feats), feats

    @torch.inference_mode()
    def predict_decoded(self, requests: Sequence[DecodedRequest], batch_size: int = 64
                        ) -> list[list[dict] | ValueError]:
        """Several requests' decoded images (`decode_sources`) in shared forward passes of up to `batch_size`
        crops, each request's results then computed with its own options: per request, what `predict_sources`
        (without `explain`) gives for the same images and options, or the ValueError its `label_thresholds`
        raise (they do not fit the model's labels). An exception of a forward pass propagates."""
        crops = [c for req in requests for c in req.crops if isinstance(c, torch.Tensor)]
        outs, feats = [], []
        for s in range(0, len(crops), batch_size):
            o, f = self.forward(torch.stack(crops[s:s + batch_size]))
            outs.append(o)
            feats.append(f)
        out_all = torch.cat(outs) if outs else torch.empty(0)
        feat_all = torch.cat(feats) if feats else torch.empty(0)
        answers: list[list[dict] | ValueError] = []
        at = 0
        for req in requests:
            n = sum(isinstance(c, torch.Tensor) for c in req.crops)
            try:
                answers.append(self._results(req, out_all[at:at + n], feat_all[at:at + n]))
            except ValueError as e:
                answers.append(e)
            at += n
        return answers

    def _results(self, req: DecodedRequest, out: torch.Tensor, feats: torch.Tensor) -> list[dict]:
        scores: list[float | None] = [None] * len(out)  # (len 0: only errors below)
        probs, abstained = out, [False] * len(out)
        if len(out) and self.multilabel:
            probs = out.float().sigmoid()
        elif len(out):
            probs, scores, abstained = self.trust(out, feats, req.confidence_threshold)
        k = min(req.top_k, len(self.classes))
        thr = self.trust.confidence_threshold if req.confidence_threshold is None else req.confidence_threshold
        results: list[dict] = []
        n = 0
        for name, crop in zip(req.names, req.crops):
            if not isinstance(crop, torch.Tensor):
                results.append({"file": name, "error": crop})
                continue
            pr = probs[n]
            vals, idx = pr.topk(k)
            r = {"file": name, "top": [
                {"class": self.classes[j], "probability": round(float(v), 6)} for v, j in zip(vals, idx)],
                "abstained": abstained[n], "ood_score": scores[n]}
            if self.multilabel:
                r.update(self._labels(pr, req.label_thresholds))
            if abstained[n]:
                score = scores[n]
                ood = self.trust.scorer is not None and score is not None and score > self.trust.scorer.threshold
                r["abstain_reason"] = "unlike the training images" if ood else \
                    f"confidence {float(vals[0]):.2f} is below the threshold {thr:.2f}"
            results.append(r)
            n += 1
        return results


@dataclass
class DecodedRequest:
    """One request's images for `Predictor.predict_decoded`: their names, their crops (or error messages, from
    `decode_sources`) and the request's options."""

    names: list[str]
    crops: list[torch.Tensor | str]
    top_k: int = 3
    confidence_threshold: float | None = None
    label_thresholds: Sequence[float] | None = None
