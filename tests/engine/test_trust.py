"""Answers you can trust, on a real model: a pretrained EfficientNet-Lite0 with an overconfident head trained on
the frozen features of a slice of sign-language digits (5 classes; 10 train and 16 val photos each), and photos
of clothes (clothing10) as images from another real set."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from support.heads import features, inputs, model_with_head, pick, train_head
from support.paths import SHARED

from domain import trust as figures
from worker.engine.calibrate import cross_fit, fit_temperature, fold_ids
from worker.engine.export import export_all, model_card
from worker.engine.modelfile import read_model_file, save_model_file
from worker.engine.predict import Predictor
from worker.engine.trust import fit_trust

DIGITS = SHARED / "sign_language_digits"
CLOTHES = SHARED / "clothing10" / "validation"
CLASSES = ["0", "1", "2", "3", "4"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("trust")
    model, pre = model_with_head(len(CLASSES), 96)
    train_paths, train_labels = pick(DIGITS, CLASSES, 10)
    val_paths, val_labels = pick(DIGITS, CLASSES, 16, offset=100)
    ft, fv = features(model, inputs(train_paths, pre)), features(model, inputs(val_paths, pre))
    train_head(model, ft, train_labels, steps=400)
    with torch.no_grad():
        logits = model.head(fv)
    fit = fit_trust(logits, val_labels, ft, fv, CLASSES, out)
    save_model_file(out / "model.pt", model, CLASSES, pre, {"backbone": "efficientnet_lite0"},
                    {"val_acc": float((logits.argmax(1) == torch.tensor(val_labels)).float().mean())},
                    "packaged", trust=fit.state)
    return {"out": out, "fit": fit, "logits": logits, "val_paths": val_paths, "val_labels": val_labels}


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_head(digits):
    cal = digits["fit"].report["calibration"]
    assert cal["temperature"] > 1.5  # overconfident: the logits must be softened
    assert cal["cross_fitted"] and cal["folds"] == 5 and len(cal["fold_temperatures"]) == 5
    assert cal["ece_after"] < cal["ece_before"] - 0.05 and cal["nll_after"] < cal["nll_before"]
    assert sum(b["count"] for b in cal["bins_before"]) == sum(b["count"] for b in cal["bins_after"]) == 80
    assert len(cal["bins_after"]) == 15
    png = digits["out"] / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(digits["fit"].report)  # JSON as it is


def test_the_stored_temperature_is_the_nll_minimum(digits):
    z, y = digits["logits"], torch.tensor(digits["val_labels"])
    t = fit_temperature(z, y)

    def nll(temp: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / temp, y))

    assert nll(t) <= min(nll(t * 0.9), nll(t * 1.1)) + 1e-9
    assert t == pytest.approx(digits["fit"].state["temperature"])
    per_image, temps = cross_fit(z, y, folds=4)
    assert set(np.round(per_image, 9)) == set(np.round(temps, 9)) and len(temps) == 4
    ids = fold_ids(y.numpy(), 4)
    assert sorted(np.bincount(ids)) == [20, 20, 20, 20]


def test_the_predictor_and_both_exports_give_the_same_calibrated_probabilities(digits, tmp_path):
    model_path = digits["out"] / "model.pt"
    pred = Predictor(model_path)
    temperature = digits["fit"].state["temperature"]
    paths = digits["val_paths"][::4]
    x = torch.stack([pred._tensor(p) for p in paths])
    probs = pred.probabilities(x).numpy()
    assert np.allclose(probs, figures.softmax(digits["logits"][::4].numpy(), temperature), atol=1e-4)
    res = pred.predict(paths, top_k=1)
    assert [r["top"][0]["probability"] for r in res] == pytest.approx(probs.max(1), abs=1e-5)
    assert all(isinstance(r["abstained"], bool) and r["ood_score"] >= 0 for r in res)

    results = {r.format: r for r in export_all(model_path, tmp_path, paths, formats=("torchscript", "onnx"))}
    assert all(r.ok for r in results.values()), results
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["temperature"] == pytest.approx(temperature)
    assert card["trust"]["confidence_threshold"] == digits["fit"].state["confidence_threshold"]
    moved = model_card(read_model_file(model_path), confidence_threshold=0.8)["trust"]  # the user's operating point
    point = figures.point_at(digits["fit"].report["abstain"]["curve"], 0.8)
    assert moved["confidence_threshold"] == 0.8 and moved["coverage"] == point["coverage"]
    # the exports take the raw images (uint8 HWC RGB, here 100 x 100: upscaled inside) and give the calibrated
    # probabilities: equal to PyTorch's on the graph's own pixels, within a resize rounding of the predictor's
    raws = [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.jit is deprecated in favour of torch.export)
        ts = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for raw, want in zip(raws, probs):
        with torch.inference_mode():
            logits_ts, probs_ts = ts(torch.from_numpy(raw.copy())[None])
            assert np.abs(ts.probabilities(torch.from_numpy(raw.copy())[None]).numpy() - probs_ts.numpy()).max() < 1e-6
        logits, onnx_probs = sess.run(["logits", "probabilities"], {"image": raw[None]})
        assert np.abs(figures.softmax(logits) - onnx_probs).max() < 1e-5  # `probabilities` is the logits' softmax
        assert np.abs(onnx_probs[0] - probs_ts.numpy()[0]).max() < 1e-3
        assert np.abs(onnx_probs[0] - want).max() < 0.05
    for r in (results["onnx"], results["torchscript"]):
        assert r.parity["pixels_max_abs_prob_diff"] < 1e-3, r.parity


def test_images_of_another_set_are_abstained_on_far_more_often(digits):
    pred = Predictor(digits["out"] / "model.pt")
    clothes, _ = pick(CLOTHES, ["hat", "shoes", "dress", "pants"], 4)
    other = pred.predict(clothes)
    mine = pred.predict(digits["val_paths"])
    ood = digits["fit"].report["ood"]
    assert ood["method"] == "knn_cosine" and ood["val_flagged_cross_fitted"] and ood["val_flagged"] <= 0.15
    flagged_other = np.mean([r["ood_score"] > ood["threshold"] for r in other])
    flagged_mine = np.mean([r["ood_score"] > ood["threshold"] for r in mine])
    assert flagged_other >= 0.9 and flagged_mine <= 0.1
    assert np.mean([r["abstained"] for r in other]) >= 0.9
    assert all(r["abstain_reason"] == "unlike the training images" for r in other if r["ood_score"] > ood["threshold"])
    assert np.mean([r["abstained"] for r in mine]) < 0.5


def test_moving_the_threshold_moves_coverage_and_accuracy_as_the_curve_says(digits):
    ab = digits["fit"].report["abstain"]
    curve = ab["curve"]
    assert [p["threshold"] for p in curve][:3] == [0.0, 0.01, 0.02] and len(curve) == 101
    cov = [p["coverage"] for p in curve]
    assert cov == sorted(cov, reverse=True)
    assert cov[0] == pytest.approx(1 - digits["fit"].report["ood"]["val_flagged"])  # OOD flags only
    assert ab["coverage"] >= 0.9 and ab["threshold"] == figures.operating_point(curve)["threshold"]

    pred = Predictor(digits["out"] / "model.pt")
    y = digits["val_labels"]
    measured = []
    for t in (0.0, 0.5, 0.8):
        res = pred.predict(digits["val_paths"], top_k=1, confidence_threshold=t)
        answered = [r["top"][0]["class"] == CLASSES[lbl] for r, lbl in zip(res, y) if not r["abstained"]]
        measured.append((len(answered) / len(y), float(np.mean(answered)) if answered else None))
        point = figures.point_at(curve, t)
        # the curve is drawn with cross-fitted temperatures, the predictor applies the one fitted on all val images
        assert measured[-1][0] == pytest.approx(point["coverage"], abs=0.1)
    assert measured[0][0] > measured[1][0] > measured[2][0]  # a higher threshold answers fewer images
    assert measured[2][1] > measured[0][1]  # and those it answers are more often right


def test_a_model_file_without_trust_predicts_as_before(digits, tmp_path):
    meta = read_model_file(digits["out"] / "model.pt")
    del meta["trust"]
    torch.save(meta, tmp_path / "old.pt")
    pred = Predictor(tmp_path / "old.pt")
    res = pred.predict(digits["val_paths"][:2])
    assert all(r["abstained"] is False and r["ood_score"] is None for r in res)
    x = torch.stack([pred._tensor(p) for p in digits["val_paths"][:2]])
    assert np.allclose(pred.probabilities(x).numpy(), figures.softmax(digits["logits"][:2].numpy()), atol=1e-4)

