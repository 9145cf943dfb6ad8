"""Answers you can trust: calibrated probabilities, abstention ("none of these") and its figures.

`fit_trust` is the one entry point a training run calls once the best weights are loaded: from the val logits
and labels and the body's features of the train and val images it fits the temperature (cross-fitted figures,
`calibrate`), the out-of-distribution detector (`ood`) and the default confidence threshold (`domain.trust`),
writes reliability.png, and returns a `TrustFit`: `report` (JSON, for the evaluation) and `state` (for the model
file's optional `trust` entry: `save_model_file(..., trust=fit.state)` or `add_trust(model_path, fit.state)`).

`TrustModel` applies it when predicting: softmax(logits / T), the OOD score, and `abstained`. A model file
without a `trust` entry (older files) gives temperature 1, no OOD score and never abstains.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from domain import trust as figures

from .calibrate import cross_fit, fit_temperature, fold_ids
from .ood import QUANTILE, KnnScorer

log = logging.getLogger(__name__)

TRUST_VERSION = 1
RELIABILITY_PNG = "reliability.png"


@dataclass
class TrustFit:
    report: dict[str, Any]  # JSON-able: calibration, abstain, ood
    state: dict[str, Any]  # the model file's `trust` entry (tensors and plain containers)


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()) if len(labels) else 0.0


def _flagged_out_of_fold(scores: np.ndarray, labels: np.ndarray, folds: int, quantile: float, seed: int,
                         threshold: float) -> np.ndarray:
    """Which val images the OOD check flags, each against the threshold of the other folds' scores (the same
    folds as the calibration): the flag rate is then measured, not 1 - quantile by construction."""
    if folds < 2:
        return scores > threshold
    ids = fold_ids(labels, folds, seed)
    out = np.zeros(len(scores), dtype=bool)
    for f in range(folds):
        held = ids == f
        out[held] = scores[held] > np.quantile(scores[~held], quantile)
    return out


def fit_trust(val_logits: torch.Tensor, val_labels: Sequence[int] | torch.Tensor, train_features: torch.Tensor,
              val_features: torch.Tensor, classes: Sequence[str], out_dir: str | Path | None = None, *,
              folds: int | None = None, seed: int = 0, ood_quantile: float = QUANTILE,
              min_coverage: float = figures.MIN_COVERAGE, junk_logits: torch.Tensor | None = None,
              junk_features: torch.Tensor | None = None) -> TrustFit:
    """Fit calibration, the OOD detector and the default operating point on the val set.

    `val_logits` [n, classes] are the saved model's; `train_features` / `val_features` are that model's body
    features (`model.body(x)`: for a frozen body the cached ones, any augmented views of the train images
    concatenated; for a trained body recompute them with `ood.body_features`). `folds` defaults to up to 5
    (none under 10 images). Optional `junk_*`: images that belong to no class, to measure the false-accept rate.
    Writes `out_dir/reliability.png` when `out_dir` is given."""
    z = val_logits.detach().float().cpu()
    y = torch.as_tensor(val_labels, dtype=torch.long).cpu()
    if z.ndim != 2 or z.shape[1] != len(classes) or len(z) != len(y) or len(val_features) != len(y):
        raise ValueError(f"val logits {tuple(z.shape)} and features {tuple(val_features.shape)} do not fit "
                         f"{len(y)} labels and {len(classes)} classes")
    if len(y) == 0:
        raise ValueError("no val images to fit calibration and abstention on: save the model without trust data")
    yn = y.numpy()

    # calibration: the stored temperature on all val images, the figures from out-of-fold temperatures
    temperature = fit_temperature(z, y)
    per_image, fold_temps = cross_fit(z, y, folds, seed)
    probs_before = figures.softmax(z.numpy())
    probs_after = figures.softmax(z.numpy() / per_image[:, None])
    conf_b, ok = figures.confidence_and_correct(probs_before, yn)
    conf_a, _ = figures.confidence_and_correct(probs_after, yn)
    bins_b, bins_a = figures.reliability_bins(conf_b, ok), figures.reliability_bins(conf_a, ok)
    ece_b, ece_a = figures.ece_of_bins(bins_b), figures.ece_of_bins(bins_a)
    calibration = {
        "temperature": temperature, "ece_before": ece_b, "ece_after": ece_a,
        "nll_before": _nll(probs_before, yn), "nll_after": _nll(probs_after, yn),
        "bins_before": bins_b, "bins_after": bins_a, "images": int(len(y)),
        "cross_fitted": len(fold_temps) > 1, "folds": len(fold_temps) if len(fold_temps) > 1 else 0,
        "fold_temperatures": fold_temps, "n_bins": figures.N_BINS,
        "note": None if len(fold_temps) > 1 else "under 10 val images: ece_after is measured on the images the "
                                                  "temperature was fitted on (optimistic)",
    }

    # out of distribution: k-NN distance to the train features, threshold a quantile of the val scores
    scorer = KnnScorer.fit(train_features, val_features, quantile=ood_quantile, seed=seed)
    val_scores = scorer.score(val_features.float().cpu()).numpy()
    flagged = _flagged_out_of_fold(val_scores, yn, len(fold_temps), ood_quantile, seed, scorer.threshold)
    ood = {"method": "knn_cosine", "k": scorer.k, "threshold": scorer.threshold, "quantile": ood_quantile,
           "bank_size": int(len(scorer.bank)), "val_flagged": float(flagged.mean()) if len(flagged) else 0.0,
           "val_flagged_cross_fitted": len(fold_temps) > 1,
           "junk": None, "note": "not measured on images outside the classes: this dataset has no junk images"}

    # abstention: the curve on the cross-fitted calibrated confidences, OOD flags included
    curve = figures.coverage_curve(conf_a, ok, flagged)
    point = figures.operating_point(curve, min_coverage)
    threshold = float(point["threshold"])
    abstain = {"threshold": threshold, "coverage": point["coverage"],
               "accuracy_when_answered": point["accuracy_when_answered"],
               "accuracy_all": float(ok.mean()) if len(ok) else 0.0, "min_coverage": min_coverage,
               "rule": f"the threshold with the highest val accuracy among those answering at least "
                       f"{min_coverage:.0%} of the val images (OOD flags included); the lowest such",
               "curve": curve}

    if junk_features is not None and junk_logits is not None and len(junk_features):
        jconf = figures.softmax(junk_logits.detach().float().cpu().numpy(), temperature).max(1)
        jscore = scorer.score(junk_features.float().cpu()).numpy()
        jflag = jscore > scorer.threshold
        jabst = float(figures.abstain(jconf, jscore, threshold, scorer.threshold).mean())
        ood["junk"] = {"images": int(len(jscore)), "flagged": float(jflag.mean()), "abstained": jabst,
                       "false_accept_rate": 1.0 - jabst,
                       # what the rate at another operating point needs (figures.false_accept_at)
                       "accepted_confidences": sorted(round(float(c), 5) for c in jconf[~jflag])}
        ood["note"] = "false-accept rate measured on the junk images (1 - abstained)"

    report = {"version": TRUST_VERSION, "calibration": calibration, "abstain": abstain, "ood": ood,
              "reliability_png": None}
    if out_dir is not None:
        path = Path(out_dir) / RELIABILITY_PNG
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            figures.reliability_png(bins_b, bins_a, path, ece_b, ece_a)
            report["reliability_png"] = str(path)
        except Exception as e:  # a picture must never fail a finished run
            log.warning("could not draw the reliability diagram: %s", e)
    state = {"version": TRUST_VERSION, "temperature": temperature, "confidence_threshold": threshold,
             "ood": scorer.to_state(), "report": {k: v for k, v in report.items() if k != "reliability_png"}}
    return TrustFit(report, state)


def add_trust(model_path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (TrustFit.state) into an existing model file as its `trust` entry (atomically)."""
    from .modelfile import atomic_save, read_model_file

    meta = read_model_file(model_path)
    meta["trust"] = state
    atomic_save(meta, Path(model_path))


def card_entry(trust: dict[str, Any] | None, confidence_threshold: float | None = None) -> dict[str, Any] | None:
    """The model card's `trust` entry: what reproducing Graft's calibrated answers and abstentions needs, at the
    model file's operating point or at `confidence_threshold` (the val coverage and accuracy read off the curve)."""
    if not trust:
        return None
    rep = trust.get("report") or {}
    cal, ab, ood = rep.get("calibration") or {}, rep.get("abstain") or {}, rep.get("ood") or {}
    threshold = float(trust["confidence_threshold"] if confidence_threshold is None else confidence_threshold)
    if confidence_threshold is not None and ab.get("curve"):
        ab = figures.point_at(ab["curve"], threshold)
    return {"temperature": float(trust["temperature"]), "ece_before": cal.get("ece_before"),
            "ece_after": cal.get("ece_after"), "confidence_threshold": threshold,
            "coverage": ab.get("coverage"), "accuracy_when_answered": ab.get("accuracy_when_answered"),
            "ood": {k: ood.get(k) for k in ("method", "k", "threshold", "quantile")},
            "note": "the exported model divides its logits by the temperature; abstain when the top probability "
                    "is below confidence_threshold (the OOD check needs the training features, kept in the "
                    "Graft model file only)"}


@dataclass
class TrustModel:
    """Calibration and abstention at prediction time (identity when the model file has no `trust` entry)."""

    temperature: float = 1.0
    confidence_threshold: float = 0.0
    scorer: KnnScorer | None = None
    report: dict[str, Any] = field(default_factory=dict)
    fitted: bool = False  # the model file has a `trust` entry

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrustModel:
        t = meta.get("trust")
        if not t:
            return cls()
        scorer = KnnScorer.from_state(t["ood"]) if t.get("ood") else None
        return cls(float(t["temperature"]), float(t["confidence_threshold"]), scorer, t.get("report") or {}, True)

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None,
                 confidence_threshold: float | None = None) -> tuple[torch.Tensor, list[float | None], list[bool]]:
        """(calibrated probabilities [n, classes], the OOD scores (None without a detector), abstained)."""
        probs = (logits.float() / self.temperature).softmax(1).cpu()
        thr = self.confidence_threshold if confidence_threshold is None else confidence_threshold
        scores = self.scorer.score(features.float()) if self.scorer is not None and features is not None else None
        conf = probs.max(1).values.numpy()
        if not self.fitted and confidence_threshold is None:
            return probs, [None] * len(probs), [False] * len(probs)
        flags = figures.abstain(conf, scores.numpy() if scores is not None else None, thr,
                                self.scorer.threshold if self.scorer is not None else None)
        out_scores: list[float | None] = ([round(float(s), 6) for s in scores] if scores is not None
                                          else [None] * len(probs))
        return probs, out_scores, [bool(f) for f in flags]


class CalibratedNet(nn.Module):
    """The model with its temperature inside, for exports: `forward` gives the calibrated logits (logits / T,
    whose softmax is the calibrated probabilities; same name and shape as before), `probabilities` the
    softmax itself."""

    multilabel: bool  # a multi-label model (temperature 1): its probabilities are the sigmoid (exports)

    def __init__(self, model: nn.Module, temperature: float = 1.0, multilabel: bool = False):
        super().__init__()
        self.model = model
        self.multilabel = multilabel
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).softmax(1)


class WithProbabilities(nn.Module):
    """(calibrated logits, calibrated probabilities): the two outputs of the ONNX export."""

    def __init__(self, net: CalibratedNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net(x)
        return z, z.softmax(1)
