"""Multi-label training on a real multi-label set built from real photos (tests/support/multilabel.py: 2x2 grids
of ant, bee and hand-sign photos; an image's labels are the kinds it shows): it beats a constant predictor by
far, the per-label thresholds tuned on val improve F1 over 0.5 on images they were not tuned on (the report's
cross-fitted figures), predictions give the labels at those thresholds, and a run that trains the body stops
and resumes from its checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
from support import multilabel
from support.recorder import Recorder

from domain import multilabel as ml
from domain.layout import discover
from domain.spec import RunSpec
from worker.engine.modelfile import read_model_file
from worker.engine.predict import Predictor
from worker.engine.runner import run


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    # 300 images at 48 px (tiles of 24): small enough that ants and bees are hard to tell apart, so the best
    # thresholds for F1 are not 0.5
    return multilabel.build(tmp_path_factory.mktemp("grids"), 300, tile=24, rates={"hand": 0.15})


@pytest.fixture(scope="module")
def trained(grids, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rec = Recorder()
    res = run(RunSpec(image_size=48, batch_size=16, strategy="features"), grids, out / "out", rec,
              cache_dir=out / "cache")
    return res, out / "out", rec


@pytest.mark.slow
def test_it_beats_a_constant_predictor_by_far(trained, grids):
    res, out, rec = trained
    rep = res.report
    assert rep["task"] == "multilabel" and rep["classes"] == ["ant", "bee", "hand"]
    split = discover(grids)
    t = ml.multi_hot(split.label_sets, [y for _, y in split.val], 3)
    # the best constant predictors: every label on every image (F1), the label's share as its score (AP)
    constant_f1 = ml._f1(t.sum(), (~t).sum(), 0)
    assert rep["metrics"]["micro_f1"] > constant_f1 + 0.2, (rep["metrics"], constant_f1)
    assert rep["metrics"]["mAP"] > t.mean(0).mean() + 0.3, rep["metrics"]
    assert rep["metrics"]["subset_accuracy"] > 0.5  # a constant gets an image's exact label set right far less
    for name, s in rep["per_label"].items():
        assert s["support"] == int(t[:, rep["classes"].index(name)].sum()) and 0 <= s["threshold"] <= 1
        assert s["tp"] + s["fn"] == s["support"] and s["tp"] + s["fp"] + s["fn"] + s["tn"] == len(t)
    assert rep["label_mistakes"] and all(m["missed"] or m["false"] for m in rep["label_mistakes"])
    assert any(m.startswith("multi-label: per-label thresholds tuned for F1") for m in rec.messages)
    assert res.val_acc == rep["metrics"]["subset_accuracy"]


@pytest.mark.slow
def test_tuned_thresholds_beat_half_on_images_they_were_not_tuned_on(trained):
    rep = trained[0].report
    assert rep["thresholds_cross_fitted"] and rep["threshold_folds"] == 5
    assert rep["metrics"]["micro_f1"] > rep["metrics_at_half"]["micro_f1"], (rep["metrics"], rep["metrics_at_half"])
    assert rep["metrics"]["mAP"] == rep["metrics_at_half"]["mAP"]  # AP does not depend on thresholds
    assert any(abs(v - 0.5) > 0.01 for v in rep["thresholds"].values()), rep["thresholds"]


@pytest.mark.slow
def test_predictions_give_the_labels_above_their_thresholds(trained):
    res, out, _ = trained
    meta = read_model_file(out / "model.pt")
    assert meta["task"] == "multilabel" and meta["thresholds"] == [res.report["thresholds"][c] for c in meta["classes"]]
    pred = Predictor(out / "model.pt")
    got = pred.predict(res.val_files[:12])
    for r in got:
        probs = r["probabilities"]
        assert set(probs) == {"ant", "bee", "hand"} and r["abstained"] is False
        want = sorted((c for c in probs if probs[c] >= meta["thresholds"][meta["classes"].index(c)] - 1e-9),
                      key=lambda c: -probs[c])
        assert [x["class"] for x in r["labels"]] == want
    # thresholds moved by the caller: every image gets ant and bee, never hand
    (r,) = pred.predict_sources([(res.val_files[0], Path(res.val_files[0]))], label_thresholds=[0.0, 0.0, 1.01])
    assert [x["class"] for x in r["labels"]] == sorted(["ant", "bee"], key=lambda c: -r["probabilities"][c])


@pytest.mark.slow
def test_a_run_that_trains_the_body_stops_and_resumes(tmp_path):
    data = multilabel.build(tmp_path / "small", 30, tile=16)
    spec = RunSpec(strategy="finetune_last:1", image_size=32, batch_size=8, epochs=3, patience=None)
    rec = Recorder(stop_after_epoch=1)
    first = run(spec, data, tmp_path / "out", rec)
    assert first.status == "stopped" and len(rec.epochs) == 1
    rec2 = Recorder()
    res = run(spec, data, tmp_path / "out", rec2, resume=True)
    assert res.status in ("completed", "early_stopped") and res.epochs_run == 3
    assert [e.epoch for e in rec2.epochs] == [2, 3]  # it went on from the checkpoint
    assert res.report["task"] == "multilabel" and 0 <= res.report["metrics"]["mAP"] <= 1
    assert any("class weighting:" in m for m in rec2.messages)
