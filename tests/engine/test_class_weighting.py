"""Class weighting (RunSpec.class_weighting): the balanced weights and the auto rule, the weighted loss, real
runs on an imbalanced and on a balanced slice (auto picks balanced there, none here, and says which in the
run's effective parameters), and the CLI option."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.paths import HYMENOPTERA
from support.recorder import Recorder

from domain.results import RunSummary
from domain.spec import RunSpec
from worker.engine.balance import class_weighting
from worker.engine.loop import loss_fn
from worker.engine.modelfile import read_model_file
from worker.engine.runner import run


@pytest.fixture(scope="module")
def imbalanced_slice(tmp_path_factory) -> Path:
    """Real photos: 30 ants and 6 bees to train on (5x), 10 of each to validate."""
    dst = tmp_path_factory.mktemp("imbalanced")
    for split, per_class in (("train", {"ants": 30, "bees": 6}), ("val", {"ants": 10, "bees": 10})):
        for cls, n in per_class.items():
            (dst / split / cls).mkdir(parents=True)
            for f in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                shutil.copy2(f, dst / split / cls / f.name)
    return dst


def test_balanced_weights_and_the_auto_rule():
    w = class_weighting("auto", [0] * 30 + [1] * 6, 2)
    assert (w.choice, w.ratio, w.describe()) == ("balanced", 5.0, "balanced (largest/smallest = 5.0)")
    # each class adds up to the same share of the loss; the mean weight per image is 1
    assert w.weights == pytest.approx([0.6, 3.0])
    assert (30 * w.weights[0] + 6 * w.weights[1]) / 36 == pytest.approx(1.0)
    assert class_weighting("auto", [0] * 9 + [1] * 3, 2).choice == "none"  # 3x is not over 3x
    assert class_weighting("auto", [0] * 10 + [1] * 3, 2).choice == "balanced"
    none = class_weighting("none", [0] * 30 + [1] * 6, 2)
    assert none.weights is None and none.tensor(torch.device("cpu")) is None
    assert none.describe() == "none (largest/smallest = 5.0, as asked)"
    forced = class_weighting("balanced", [0, 1, 2, 2], 3)
    assert forced.weights == pytest.approx([4 / 3, 4 / 3, 2 / 3])
    assert forced.describe() == "balanced (largest/smallest = 2.0, as asked)"


def test_the_weighted_loss_weighs_each_image_by_its_class():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 3, generator=g), torch.tensor([0, 0, 0, 1, 2, 2])
    w = torch.tensor([0.5, 2.0, 1.0])
    per_image = F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")
    assert loss_fn(logits, y, 0.1, w).item() == pytest.approx((per_image * w[y]).mean().item())
    assert loss_fn(logits, y, 0.1, torch.ones(3)).item() == pytest.approx(loss_fn(logits, y, 0.1, None).item())
    assert loss_fn(logits, y, 0.1, w).item() != pytest.approx(loss_fn(logits, y, 0.1, None).item())
    # divided by the images, not the weights: micro-batches (and data-parallel parts) add up to the batch
    parts = loss_fn(logits[:2], y[:2], 0.1, w, "sum") + loss_fn(logits[2:], y[2:], 0.1, w, "sum")
    assert parts.item() == pytest.approx(6 * loss_fn(logits, y, 0.1, w).item())


SPEC = dict(strategy="features", epochs=3, image_size=96, batch_size=8, patience=None)


def test_auto_balances_an_imbalanced_slice_and_the_weights_change_the_loss(imbalanced_slice, tmp_path):
    cache = tmp_path / "cache"
    rec = Recorder()
    auto = run(RunSpec(**SPEC), imbalanced_slice, tmp_path / "auto", rec, cache_dir=cache)
    none = run(RunSpec(class_weighting="none", **SPEC), imbalanced_slice, tmp_path / "none", None, cache_dir=cache)
    forced = run(RunSpec(class_weighting="balanced", **SPEC), imbalanced_slice, tmp_path / "bal", None,
                 cache_dir=cache)
    assert auto.status == none.status == "completed"
    assert auto.effective["class_weighting"] == "balanced (largest/smallest = 5.0)"
    assert none.effective["class_weighting"] == "none (largest/smallest = 5.0, as asked)"
    assert "class weighting: balanced (largest/smallest = 5.0)" in rec.messages
    # the same features, head and batch order: only the loss differs. The bees' errors weigh 5x the ants'
    # (measured: first-epoch train loss 1.45 weighted, 0.76 unweighted)
    assert auto.history[0].train_loss > 1.2 * none.history[0].train_loss
    assert [h.train_loss for h in forced.history] == [h.train_loss for h in auto.history]  # auto = balanced
    # the val loss stays unweighted, so the runs' figures compare
    assert auto.val_loss is not None and none.val_loss is not None
    # the effective choice is in the summary (the job's stored result), metrics.json and the model file
    summary = RunSummary.model_validate(auto.summary().to_json())
    assert summary.effective["class_weighting"] == "balanced (largest/smallest = 5.0)"
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert metrics["effective"]["class_weighting"] == "balanced (largest/smallest = 5.0)"
    assert read_model_file(auto.model_path)["metrics"]["effective"]["class_weighting"].startswith("balanced")


def test_auto_leaves_a_balanced_slice_unweighted(hymenoptera_slice, tmp_path):
    cache = tmp_path / "cache"
    auto = run(RunSpec(**SPEC), hymenoptera_slice, tmp_path / "auto", None, cache_dir=cache)
    none = run(RunSpec(class_weighting="none", **SPEC), hymenoptera_slice, tmp_path / "none", None,
               cache_dir=cache)
    assert auto.effective["class_weighting"] == "none (largest/smallest = 1.0)"
    assert [h.train_loss for h in auto.history] == [h.train_loss for h in none.history]
    forced = run(RunSpec(class_weighting="balanced", **SPEC), hymenoptera_slice, tmp_path / "bal", None,
                 cache_dir=cache)
    # balanced classes: the balanced weights are all 1, the same run
    assert forced.effective["class_weighting"] == "balanced (largest/smallest = 1.0, as asked)"
    assert [h.train_loss for h in forced.history] == pytest.approx([h.train_loss for h in auto.history])


def test_cli_train_takes_class_weighting(imbalanced_slice, tmp_path):
    graft = Path(sys.executable).with_name("graft")
    p = subprocess.run([str(graft), "train", str(imbalanced_slice), "--epochs", "1", "--image-size", "64",
                        "--class-weighting", "none", "--out", str(tmp_path / "o"), "--no-cache", "--json"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "GRAFT_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["effective"]["class_weighting"] == "none (largest/smallest = 5.0, as asked)"
    assert out["max_epochs"] == 1 and out["epochs_run"] == 1
    bad = subprocess.run([str(graft), "train", str(imbalanced_slice), "--class-weighting", "sometimes"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "class-weighting" in bad.stderr
