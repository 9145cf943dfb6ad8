"""The strategy advisor's rules (a pure function) on constructed cases: data size per class and the measured
domain gap (linear probe vs a short fine-tune of the last block) decide, and the reason says what was measured."""
from __future__ import annotations

import math

import pytest

from domain import advice as service_advice
from domain.advice import (
    DISTANT_GAIN,
    FEATURES_MAX_PER_CLASS,
    LITTLE_DATA_DISTANT_STRATEGY,
    TWO_STAGE_MAX_PER_CLASS,
    classify_domain,
    paired_stderr,
    recommend_strategy,
)


def counts(per_class: int, classes: int = 2) -> dict:
    return {"train": {f"c{i}": per_class for i in range(classes)}, "val": {f"c{i}": 10 for i in range(classes)}}


NEAR = {"backbone": "efficientnet_lite0", "probe_acc": 0.94, "finetune_acc": 0.95, "stderr": 0.02, "val_images": 100}
DISTANT = {"backbone": "efficientnet_lite0", "probe_acc": 0.70, "finetune_acc": 0.85, "stderr": 0.03,
           "val_images": 200}

LITTLE, MEDIUM, MUCH = 80, 400, 3000


def test_the_thresholds_are_what_the_rules_say():
    assert FEATURES_MAX_PER_CLASS == 150 and TWO_STAGE_MAX_PER_CLASS == 1000 and DISTANT_GAIN == 0.04


@pytest.mark.parametrize("per_class, measured, strategy, domain", [
    # little data: the measurement decides between a frozen backbone and adjusting a few top groups
    (LITTLE, NEAR, "features", "near"),
    (LITTLE, DISTANT, LITTLE_DATA_DISTANT_STRATEGY, "distant"),
    (FEATURES_MAX_PER_CLASS, DISTANT, LITTLE_DATA_DISTANT_STRATEGY, "distant"),  # the boundary is still "little"
    # more data, distant: unfreeze all of it (gently with a medium amount, from the start with plenty)
    (MEDIUM, DISTANT, "two_stage", "distant"),
    (MUCH, DISTANT, "full", "distant"),
    # more data, near: as by size
    (MEDIUM, NEAR, "two_stage", "near"),
    (MUCH, NEAR, "full", "near"),
])
def test_measured_rules(per_class, measured, strategy, domain):
    a = recommend_strategy(counts(per_class), measured)
    assert (a.strategy, a.domain, a.source) == (strategy, domain, "measured")
    assert a.measured == measured and a.hint is None
    assert a.per_class == per_class and a.epochs >= 1
    # the reason says what was measured, in plain words
    assert f"{measured['probe_acc'] * 100:.0f}%" in a.reason and f"{measured['finetune_acc'] * 100:.0f}%" in a.reason
    assert f"about {per_class} training images" in a.reason
    assert ("unlike the everyday photos" in a.reason) == (domain == "distant")


def test_little_data_distant_domain_adjusts_fewer_top_groups():
    a = recommend_strategy(counts(LITTLE), DISTANT)
    assert a.strategy == "finetune_last:2" and a.strategy_kind == "finetune_last"
    assert "top two layer groups" in a.reason and "+15 points" in a.reason


@pytest.mark.parametrize("per_class, strategy", [(40, "features"), (150, "features"), (151, "two_stage"),
                                                 (1000, "two_stage"), (1001, "full")])
def test_without_a_measurement_the_size_decides_and_the_hint_says_how_to_measure(per_class, strategy):
    a = recommend_strategy(counts(per_class))
    assert (a.strategy, a.source, a.domain, a.measured) == (strategy, "size", None, None)
    assert "Compare backbones" in a.hint and "graft probe" in a.hint


def test_a_gain_within_the_noise_is_not_a_distant_domain():
    # +6 points, but the paired standard error is 4 points: twice that is more than the gain
    noisy = {"probe_acc": 0.80, "finetune_acc": 0.86, "stderr": 0.04, "val_images": 30}
    a = recommend_strategy(counts(LITTLE), noisy)
    assert (a.strategy, a.domain) == ("features", "near")
    assert "within what chance gives" in a.reason
    # the same gain measured on many images is a distant domain
    assert recommend_strategy(counts(LITTLE), {**noisy, "stderr": 0.01}).domain == "distant"


def test_a_small_or_negative_gain_is_a_near_domain():
    assert classify_domain({"probe_acc": 0.9, "finetune_acc": 0.93, "stderr": 0.0})[0] == "near"
    assert classify_domain({"probe_acc": 0.9, "finetune_acc": 0.95, "stderr": 0.0})[0] == "distant"
    domain, said = classify_domain({"probe_acc": 0.9, "finetune_acc": 0.85, "stderr": 0.02, "val_images": 40})
    assert domain == "near" and "−5 points on 40 val images" in said


@pytest.mark.parametrize("bad", [{"probe_acc": 0.9}, {"probe_acc": "x", "finetune_acc": 1}, {}])
def test_a_malformed_measurement_falls_back_to_size(bad):
    a = recommend_strategy(counts(LITTLE), bad)
    assert (a.strategy, a.source, a.measured) == ("features", "size", None)


def test_small_classes_are_flagged_and_odd_input_never_raises():
    a = recommend_strategy({"train": {"a": 3, "b": 30}}, NEAR)
    assert "only 3 training images" in a.reason and a.source == "measured"
    assert recommend_strategy({}).strategy == "features"
    assert recommend_strategy({"train": {"a": "many"}}, None).strategy == "features"


def test_paired_stderr():
    assert paired_stderr(0, 0, 0) == 0.0
    assert paired_stderr(100, 0, 0) == 0.0  # the two classifiers agree on every image: no doubt about the difference
    # 10 images only the fine-tune got right, none the other way, out of 100: sqrt(10 - 100/100) / 100
    assert paired_stderr(100, 0, 10) == pytest.approx(math.sqrt(9) / 100)
    assert paired_stderr(100, 5, 5) == pytest.approx(math.sqrt(10) / 100)


def test_the_web_tier_uses_the_same_rules_and_serializes_them():
    assert service_advice.recommend_strategy is recommend_strategy
    d = recommend_strategy(counts(LITTLE), DISTANT).to_dict()
    assert set(d) == {"strategy", "reason", "epochs", "per_class", "smallest", "source", "domain", "measured", "hint"}
    assert service_advice.STRATEGIES[recommend_strategy(counts(LITTLE), DISTANT).strategy_kind]["title"]
