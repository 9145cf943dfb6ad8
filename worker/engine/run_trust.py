"""A finished run's trust data (issue 15): the temperature, the out-of-distribution detector and the default
operating point fitted on the val set once the best weights are loaded (`trust.fit_trust`), from the features
of the model that was saved: the cached ones when its body stayed frozen, else recomputed with the trained body
on a seeded sample of the train images (the detector keeps at most `ood.BANK` of them anyway) and on every val
image. Fitting it must never fail a run that trained: a failure is logged and said, and the model is saved
without trust data (it then predicts as before: temperature 1, never abstains)."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from domain.errors import ImageError

from .data import decode_for, eval_transform
from .ood import body_features
from .result import RunResult
from .trust import TrustFit, fit_trust

Runner = Any  # a runner.Runner after training (not imported: runner imports this module)

log = logging.getLogger(__name__)

TRAIN_SAMPLE = 2048  # train images whose trained-body features the detector is fitted on


def _trained_body_features(r: Runner) -> tuple[torch.Tensor, torch.Tensor]:
    idx = list(r.train_idx)
    if len(idx) > TRAIN_SAMPLE:
        idx = sorted(random.Random(r.spec.seed).sample(idx, TRAIN_SAMPLE))
    labels = [r.items[i][1] for i in idx]
    tf = eval_transform(r.pre.image_size)
    with torch.no_grad(), r._autocast():
        train = body_features(r.model, (r._inputs(x) for x, _ in r._loader(idx, labels, tf, shuffle=False)), r.device)
        val = body_features(r.model, (r._inputs(x) for x, _ in r._loader(r.val_idx, r.val_labels, tf, shuffle=False)),
                            r.device)
    return train, val


def _junk_outputs(r: Runner) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The saved model's logits and body features of the dataset's images of no class (`_junk/`), None
    without any; unreadable ones are skipped."""
    paths = list(getattr(r.split, "junk", []) or [])
    if not paths:
        return None
    crop = eval_transform(r.pre.image_size)
    logits, feats = [], []
    r.model.eval()
    with torch.no_grad(), r._autocast():
        for s in range(0, len(paths), r.spec.batch_size):
            batch = []
            for p in paths[s:s + r.spec.batch_size]:
                try:
                    batch.append(crop(decode_for(Path(p), r.pre, r.max_pixels)))
                except ImageError:
                    continue
            if not batch:
                continue
            f = r.model.body(r._inputs(torch.stack(batch)))
            feats.append(f.float().cpu())
            logits.append(r.model.head(f).float().cpu())
    if not feats:
        return None
    return torch.cat(logits), torch.cat(feats)


def fit_run_trust(r: Runner, logits: torch.Tensor, frozen_features: bool, out: Path,
                  result: RunResult) -> tuple[dict[str, Any] | None, torch.Tensor]:
    """Fit the run's trust data, put its report in `result.trust` and return the model file's `trust` entry
    (None: not fitted, and why is said) with the val images' calibrated probabilities."""
    fit = _fit(r, logits, frozen_features, out, result) if r.val_idx else None
    if fit is None:
        return None, logits.float().softmax(1)
    return fit.state, (logits.float() / float(fit.state["temperature"])).softmax(1)


def _fit(r: Runner, logits: torch.Tensor, frozen_features: bool, out: Path, result: RunResult) -> TrustFit | None:
    try:
        if frozen_features and r.train_feats:
            train, val = torch.cat([f.float().cpu() for f in r.train_feats]), r.val_feats.float().cpu()
        else:
            r.cb.on_message("calibration: computing the trained model's features of the val images and a "
                            f"sample of up to {TRAIN_SAMPLE} train images")
            train, val = _trained_body_features(r)
        junk = _junk_outputs(r)
        if junk is not None:
            r.cb.on_message(f"measuring the false-accept rate on {len(junk[0])} images of no class")
        fit = fit_trust(logits.clone(), r.val_labels, train, val, r.classes, out, seed=r.spec.seed,
                        junk_logits=junk[0] if junk else None, junk_features=junk[1] if junk else None)
    except Exception as e:  # noqa: BLE001 - the trained model is saved whatever happens here
        log.warning("could not fit calibration and abstention: %s", e, exc_info=True)
        r.cb.on_message(f"calibration and abstention could not be fitted ({e}); the model is saved without them")
        return None
    cal, ab = fit.report["calibration"], fit.report["abstain"]
    r.cb.on_message(f"calibration: temperature {cal['temperature']:.2f}, expected calibration error "
                    f"{cal['ece_before']:.3f} -> {cal['ece_after']:.3f}; abstains below confidence "
                    f"{ab['threshold']:.2f} (answers {ab['coverage']:.0%} of val images, "
                    f"{ab['accuracy_when_answered']:.1%} right)")
    result.trust = {k: v for k, v in fit.report.items() if k != "reliability_png"}  # no worker paths
    return fit
