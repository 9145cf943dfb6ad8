"""Tests for worker/engine/evaluate.py: confusion matrix and classification report, checked by hand."""
from __future__ import annotations

import numpy as np
import pytest

from domain.evaluate import classification_report, confusion_matrix

# 4 classes, 8 samples. "c" is never predicted (precision 0); "d" has no true samples (support 0)
# but is predicted once (a false positive).
CLASSES = ["a", "b", "c", "d"]
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 0, 1, 1, 1, 3, 0, 1]
# rows: true class, columns: predicted class
EXPECTED_CM = [
    [2, 1, 0, 0],
    [0, 2, 0, 1],
    [1, 1, 0, 0],
    [0, 0, 0, 0],
]


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 4)
    assert isinstance(cm, np.ndarray) and cm.dtype == np.int64
    assert cm.tolist() == EXPECTED_CM
    assert cm.sum() == len(Y_TRUE)


def test_confusion_matrix_counts_repeats_and_accepts_arrays():
    cm = confusion_matrix(np.array([1, 1, 1, 0]), np.array([0, 0, 1, 0]), 3)
    assert cm.tolist() == [[1, 0, 0], [2, 1, 0], [0, 0, 0]]


def test_confusion_matrix_empty():
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]


def test_classification_report_by_hand():
    r = classification_report(Y_TRUE, Y_PRED, CLASSES)
    assert r["classes"] == CLASSES
    assert r["confusion_matrix"] == EXPECTED_CM
    assert r["accuracy"] == pytest.approx(0.5)  # 4 right of 8
    pc = r["per_class"]
    assert list(pc) == CLASSES
    # a: tp 2, predicted 3, support 3
    assert pc["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    # b: tp 2, predicted 4, support 3 -> F1 = 2 * 0.5 * 0.6667 / 1.1667 = 4/7
    assert pc["b"]["precision"] == pytest.approx(0.5)
    assert pc["b"]["recall"] == pytest.approx(0.6666667)
    assert pc["b"]["f1"] == pytest.approx(0.5714286)
    assert pc["b"]["support"] == 3
    # c: never predicted -> precision 0 (not NaN), recall 0, F1 0
    assert pc["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # d: no true samples -> recall 0, support 0; its one prediction is wrong -> precision 0
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # macro F1 averages the classes that have support only: (2/3 + 4/7 + 0) / 3 = 26/63
    assert r["macro_f1"] == pytest.approx(0.4126984)
    # plain Python types, so the report serialises to JSON
    assert all(type(v) is float for m in pc.values() for k, v in m.items() if k != "support")
    assert all(type(m["support"]) is int for m in pc.values())
    assert type(r["accuracy"]) is float and type(r["macro_f1"]) is float


def test_classification_report_no_nan_anywhere():
    r = classification_report(Y_TRUE, Y_PRED, CLASSES)
    values = [v for m in r["per_class"].values() for v in m.values()] + [r["accuracy"], r["macro_f1"]]
    assert not any(np.isnan(v) for v in values)


def test_classification_report_perfect():
    r = classification_report([0, 1, 2, 1], [0, 1, 2, 1], ["x", "y", "z"])
    assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0
    assert r["per_class"]["y"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert r["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]


def test_classification_report_all_one_class_predicted():
    # 3 of class 0, 1 of class 1; everything predicted as 0
    r = classification_report([0, 0, 0, 1], [0, 0, 0, 0], ["maj", "min"])
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["per_class"]["maj"]["precision"] == pytest.approx(0.75)
    assert r["per_class"]["maj"]["recall"] == pytest.approx(1.0)
    assert r["per_class"]["maj"]["f1"] == pytest.approx(6 / 7)  # 2 * 0.75 / 1.75
    assert r["per_class"]["min"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["macro_f1"] == pytest.approx(3 / 7)


def test_classification_report_empty():
    r = classification_report([], [], ["a", "b"])
    assert r["accuracy"] == 0.0 and r["macro_f1"] == 0.0
    assert r["confusion_matrix"] == [[0, 0], [0, 0]]
    assert r["per_class"]["a"]["support"] == 0


def test_top_k_mistakes_and_confusion_picture(tmp_path):
    from PIL import Image

    from domain.evaluate import confusion_png, evaluation, mistakes, top_k_accuracy

    classes = [f"c{i}" for i in range(6)]
    probs = np.array([
        [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],  # true 0, right
        [0.10, 0.15, 0.20, 0.25, 0.30, 0.00],  # true 0: ranked 5th -> not in top 3, in top 5
        [0.05, 0.05, 0.60, 0.20, 0.05, 0.05],  # true 3: 2nd -> top 3; a mistake with confidence 0.60
        [0.90, 0.02, 0.02, 0.02, 0.02, 0.02],  # true 5: a confident mistake (0.90)
    ])
    y = [0, 0, 3, 5]
    tk = top_k_accuracy(probs, y)
    assert tk == {"top3": 0.5, "top5": 0.75}
    m = mistakes(probs, y, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], classes)
    assert [x["file"] for x in m] == ["d.jpg", "c.jpg", "b.jpg"]  # most confident first
    assert m[0] == {"file": "d.jpg", "true": "c5", "predicted": "c0", "confidence": 0.9,
                    "true_class_probability": 0.02}
    ev = evaluation(probs, y, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], classes)
    assert ev["accuracy"] == 0.25 and ev["top_k"] == tk and ev["images"] == 4
    assert evaluation(probs[:, :2] / probs[:, :2].sum(1, keepdims=True), [0, 0, 1, 1], list("abcd"),
                      ["x", "y"])["top_k"] == {}  # 5 classes or fewer: no top-k

    confusion_png(ev["confusion_matrix"], classes, tmp_path / "cm.png")
    img = Image.open(tmp_path / "cm.png")
    assert img.format == "PNG" and img.width > 6 * 36 and img.height > 6 * 36
    # the diagonal cell of a class that is always right is shaded green, an off-diagonal mistake red
    confusion_png([[5, 0], [5, 0]], ["good", "bad"], tmp_path / "cm2.png")
    img = Image.open(tmp_path / "cm2.png").convert("RGB")
    px = np.asarray(img)
    assert (px[..., 1] > px[..., 0] + 60).any() and (px[..., 0] > px[..., 1] + 60).any()
