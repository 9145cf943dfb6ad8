"""The trust figures on inputs whose answers are known by hand: reliability bins, ECE, the coverage curve,
the operating point and the abstention rule."""
from __future__ import annotations

import numpy as np
import pytest

from domain import trust as figures


def test_bins_and_ece_by_hand():
    conf = np.array([0.95, 0.95, 0.55, 0.55, 0.3])
    ok = np.array([True, False, True, True, False])
    bins = figures.reliability_bins(conf, ok, 10)
    assert [b["count"] for b in bins] == [0, 0, 1, 0, 0, 2, 0, 0, 0, 2]
    assert bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.95) and bins[0]["accuracy"] is None
    # (|0.5 - 0.95| * 2 + |1 - 0.55| * 2 + |0 - 0.3| * 1) / 5
    assert figures.expected_calibration_error(conf, ok, 10) == pytest.approx((0.9 + 0.9 + 0.3) / 5)
    # a bin's upper edge belongs to it: 0.6 is in (0.5, 0.6], 1.0 in the last bin, 0 in the first
    edges = figures.reliability_bins([0.6, 1.0, 0.0], [True, True, False], 10)
    assert edges[5]["count"] == 1 and edges[9]["count"] == 1 and edges[0]["count"] == 1
    assert len(figures.reliability_bins(conf, ok)) == figures.N_BINS == 15


def test_a_calibrated_model_has_an_ece_near_zero():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 1.0, 200_000)
    ok = rng.uniform(size=conf.size) < conf  # right exactly as often as it says
    assert figures.expected_calibration_error(conf, ok) < 0.01
    assert figures.expected_calibration_error(np.ones(100), np.zeros(100, bool)) == 1.0


def test_softmax_with_a_temperature():
    z = np.array([[2.0, 0.0], [1000.0, 0.0]])
    assert figures.softmax(z)[0, 0] == pytest.approx(1 / (1 + np.exp(-2)))
    assert figures.softmax(z, 2.0)[0, 0] == pytest.approx(1 / (1 + np.exp(-1)))
    assert np.isfinite(figures.softmax(z)).all()  # stable for large logits


def test_curve_operating_point_and_abstention():
    conf = np.array([0.95, 0.95, 0.55, 0.55, 0.3])
    ok = np.array([True, False, True, True, False])
    flagged = [False, False, False, False, True]
    curve = figures.coverage_curve(conf, ok, flagged, steps=10)
    assert curve[0]["coverage"] == 0.8 and curve[0]["accuracy_when_answered"] == 0.75
    assert curve[6]["coverage"] == 0.4 and curve[6]["accuracy_when_answered"] == 0.5
    assert curve[10]["coverage"] == 0.0 and curve[10]["accuracy_when_answered"] is None
    assert figures.operating_point(curve, 0.8)["threshold"] == 0.0
    # at least 40% answered: 0.75 accuracy is the best; the lowest threshold reaching it is 0
    assert figures.operating_point(curve, 0.4)["threshold"] == 0.0
    assert figures.operating_point(curve, 0.95)["threshold"] == 0.0  # nothing reaches it: OOD only
    assert figures.point_at(curve, 0.57)["threshold"] == 0.5
    assert figures.abstain(conf, [0.1, 0.9, 0.1, 0.1, 0.1], 0.5, 0.5).tolist() == [False, True, False, False, True]
    assert figures.abstain(conf, None, 0.5, None).tolist() == [False, False, False, False, True]


def test_the_operating_point_prefers_accuracy_then_coverage():
    conf = np.array([0.9] * 8 + [0.4] * 2)
    ok = np.array([True] * 8 + [False] * 2)
    curve = figures.coverage_curve(conf, ok)
    point = figures.operating_point(curve, 0.8)
    assert point["threshold"] == 0.41 and point["coverage"] == 0.8 and point["accuracy_when_answered"] == 1.0
    assert figures.operating_point(curve, 0.9)["threshold"] == 0.0


def test_the_reliability_diagram_is_a_png(tmp_path):
    conf, ok = np.array([0.9, 0.8, 0.3]), np.array([True, False, True])
    bins = figures.reliability_bins(conf, ok)
    figures.reliability_png(bins, bins, tmp_path / "r.png", 0.2, 0.1)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
