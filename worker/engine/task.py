"""What differs between a multi-class and a multi-label run (issue 16): the weighting of the loss (class weights,
or the multi-label objective with its positive weights: loop.MultiLabel) and the evaluation of the best epoch
(calibration, abstention and the classification report; or sigmoid probabilities, per-label thresholds tuned
for F1 and the multi-label report, domain.multilabel). The runner calls these two; everything between them (the
loops, the caches, checkpoints and resume, data-parallel runs) takes the label index of each image as it is."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from domain import multilabel as ml
from domain.evaluate import evaluation

from .balance import LabelWeighting, class_weighting, label_weighting
from .loop import MultiLabel
from .result import RunResult
from .run_trust import fit_run_trust

Runner = Any  # a runner.Runner (not imported: runner imports this module)


def set_weighting(r: Runner) -> None:
    """The run's loss weighting, from the spec's class_weighting and the train labels; said in a message."""
    if r.split.multilabel:
        weights, text = label_weighting(r.spec.class_weighting, r.split.label_sets, r.train_labels, len(r.classes))
        targets = torch.from_numpy(ml.multi_hot(r.split.label_sets, range(len(r.split.label_sets)),
                                                len(r.classes)).astype("float32"))
        r.weighting = LabelWeighting(text)
        r.class_weights = MultiLabel(targets, None if weights is None else torch.tensor(weights)).to(r.device)
    else:
        r.weighting = class_weighting(r.spec.class_weighting, r.train_labels, len(r.classes))
        r.class_weights = r.weighting.tensor(r.device)
    r.cb.on_message(f"class weighting: {r.weighting.describe()}")


def evaluate_best(r: Runner, logits: torch.Tensor, frozen_features: bool, out: Path, result: RunResult
                  ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The best epoch's evaluation on the val images, put in `result.report`; returns (the model file's trust
    entry, its multi-label entry {"task", "thresholds"}), each None where it does not apply."""
    files = [r.split.rel(r.items[i][0]) for i in r.val_idx]
    result.val_files = [str(r.items[i][0]) for i in r.val_idx]
    if not r.split.multilabel:
        trust, probs = fit_run_trust(r, logits, frozen_features, out, result)  # calibrated probabilities
        result.report = evaluation(probs.numpy(), r.val_labels, files, r.classes)
        result.val_acc = result.report["accuracy"]
        return trust, None
    targets = ml.multi_hot(r.split.label_sets, r.val_labels, len(r.classes))
    report = ml.evaluation(ml.sigmoid(logits.float().numpy()), targets, files, r.classes, seed=r.spec.seed)
    m = report["metrics"]
    how = f"cross-fitted over {report['threshold_folds']} folds" if report["thresholds_cross_fitted"] else \
        "on the images they were tuned on (under 10 val images: optimistic)"
    r.cb.on_message(f"multi-label: per-label thresholds tuned for F1 on the val images; micro F1 {m['micro_f1']:.3f} "
                    f"(at 0.5: {report['metrics_at_half']['micro_f1']:.3f}), mAP {m['mAP']:.3f}, subset accuracy "
                    f"{m['subset_accuracy']:.3f}, {how}")
    result.report, result.val_acc = report, report["accuracy"]
    return None, {"task": "multilabel", "thresholds": [report["thresholds"][c] for c in r.classes]}
