"""A training run fits its calibration and abstention once the best weights are loaded (run_trust.py): a
`features` run from the cached features, a run that trains layers from its trained body's features; the report
is in the result and metrics.json, the model file carries it (its predictions are then calibrated and say when
they abstain), the evaluation's confidences are the calibrated ones, and reliability.png is written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.paths import SHARED
from support.recorder import Recorder

from domain import trust as figures
from domain.spec import RunSpec
from worker.engine.modelfile import read_model_file
from worker.engine.predict import Predictor
from worker.engine.runner import run

SIGN_DIGITS = SHARED / "sign_language_digits"


def _check(res, out, rec) -> dict:
    trust = res.trust
    assert trust is not None, rec.messages
    cal, ab, ood = trust["calibration"], trust["abstain"], trust["ood"]
    assert 0.05 <= cal["temperature"] <= 20 and 0 <= cal["ece_after"] <= 1 and 0 <= cal["ece_before"] <= 1
    assert len(cal["bins_before"]) == len(cal["bins_after"]) > 0
    assert 0 <= ab["threshold"] <= 1 and 0 < ab["coverage"] <= 1 and ab["curve"]
    assert ood["method"] == "knn_cosine" and ood["threshold"] > 0
    assert "reliability_png" not in trust  # no worker paths in what is stored
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(m.startswith(f"calibration: temperature {cal['temperature']:.2f}") for m in rec.messages), rec.messages
    meta = read_model_file(out / "model.pt")
    assert meta["trust"]["temperature"] == pytest.approx(cal["temperature"])
    assert json.loads((out / "metrics.json").read_text())["trust"]["calibration"] == cal
    assert res.summary().trust == trust
    # the evaluation's confidences are the calibrated ones: the mistakes' probabilities come from logits / T
    pred = Predictor(out / "model.pt")
    files = res.val_files[:4]
    got = pred.predict(files, top_k=len(res.classes))
    for r in got:
        assert isinstance(r["abstained"], bool) and r["ood_score"] is not None
        assert sum(t["probability"] for t in r["top"]) == pytest.approx(1.0, abs=1e-4)
    return trust


def test_a_features_run_fits_its_calibration_and_abstention(hymenoptera_slice, tmp_path):
    """... and measures its false-accept rate on the dataset's `_junk/` folder: hand signs, of neither class."""
    data = tmp_path / "data"
    shutil.copytree(hymenoptera_slice, data)
    (data / "_junk").mkdir()
    for d in range(6):
        for f in sorted((SIGN_DIGITS / str(d)).iterdir())[:2]:
            shutil.copy2(f, data / "_junk" / f"{d}_{f.name}")
    rec, out = Recorder(), tmp_path / "out"
    res = run(RunSpec(image_size=64, batch_size=8, epochs=15, label_smoothing=0.0), data, out, rec,
              cache_dir=tmp_path / "cache")
    assert res.classes == ["ants", "bees"]  # _junk/ is not a class, nor trained on
    trust = _check(res, out, rec)
    junk, ood = trust["ood"]["junk"], trust["ood"]
    assert junk is not None and junk["images"] == 12, ood
    assert "measuring the false-accept rate on 12 images of no class" in rec.messages
    assert junk["false_accept_rate"] == pytest.approx(1 - junk["abstained"])
    # hand signs look nothing like the training images: flagged and abstained on more often than the val
    # images (measured here, at 64 px on 32 train images: a third of them against a tenth of val)
    assert junk["flagged"] > ood["val_flagged"], ood
    assert junk["abstained"] >= 2 * (1 - trust["abstain"]["coverage"]), (junk, trust["abstain"]["coverage"])
    assert len(junk["accepted_confidences"]) == round(12 * (1 - junk["flagged"]))
    ab = trust["abstain"]
    assert figures.false_accept_at(junk, ab["threshold"]) == pytest.approx(junk["false_accept_rate"])
    assert figures.false_accept_at(junk, 1.01) == 0.0  # a threshold above every confidence answers none
    views = RunSpec().feature_views
    assert trust["ood"]["bank_size"] == 32 * views  # 16 train images per class, each in its cached views
    # a confident mistake's stored probability is the calibrated one (logits / T), not the raw softmax
    T = trust["calibration"]["temperature"]
    report = res.report
    assert report is not None
    pred = Predictor(out / "model.pt")
    if report["mistakes"]:
        m = report["mistakes"][0]
        path = next(f for f in res.val_files if f.endswith(m["file"]))
        (p,) = pred.predict([path], top_k=1)
        assert p["top"][0]["probability"] == pytest.approx(m["confidence"], abs=2e-3), (T, m, p)


@pytest.mark.slow
def test_a_run_that_trains_layers_fits_them_on_its_trained_body(tiny_slice, tmp_path):
    rec, out = Recorder(), tmp_path / "out"
    res = run(RunSpec(image_size=64, batch_size=4, epochs=1, strategy="finetune_last:1"), tiny_slice, out, rec,
              cache_dir=tmp_path / "cache")
    assert any("computing the trained model's features" in m for m in rec.messages), rec.messages
    trust = _check(res, out, rec)
    assert trust["ood"]["bank_size"] == 12  # every train image (6 per class), through the trained body
    with torch.no_grad():
        assert read_model_file(out / "model.pt")["trust"]["ood"]  # the detector's bank travels with the model


def test_graft_predict_abstains_at_a_threshold_and_writes_heatmaps(hymenoptera_slice, tmp_path):
    out = tmp_path / "out"
    res = run(RunSpec(image_size=64, batch_size=8, epochs=3), hymenoptera_slice, out, None,
              cache_dir=tmp_path / "cache")
    imgs = res.val_files[:2]
    exe = Path(sys.executable).with_name("graft")
    p = subprocess.run([str(exe), "predict", str(out / "model.pt"), *imgs, "--confidence-threshold", "1",
                        "--explain", str(tmp_path / "heat")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "GRAFT_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2 and all("[none of these:" in line and "heatmap:" in line for line in lines), lines
    for f in imgs:
        heat = tmp_path / "heat" / f"{Path(f).name}.heatmap.png"
        assert Image.open(heat).size == Image.open(f).size
    p = subprocess.run([str(exe), "predict", str(out / "model.pt"), imgs[0], "--json", "--confidence-threshold",
                        "0"], capture_output=True, text=True, timeout=300, env={**os.environ, "GRAFT_OFFLINE": "1"})
    (r,) = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["abstained"] == (r.get("abstain_reason") == "unlike the training images") and "heatmap_png" not in r
