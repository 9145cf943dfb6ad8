"""Freeze strategies: the pure phase plans, what a phase really does to a model during an SGD step,
and RunSpec's validation of strategy strings."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from domain.spec import DEFAULT_LR, RunSpec
from worker.engine.backbones import build_model
from worker.engine.freeze import HEAD, Phase, apply_phase, discriminative_mults, plan, train_mode

GROUPS = ["stem", "s1", "s2", "s3", "s4", "s5"]


# ---------------------------------------------------------------- plan(): pure


def test_features_plan():
    phases = plan("features", GROUPS, 7)
    assert len(phases) == 1
    (p,) = phases
    assert p.epochs == 7
    assert p.trainable == (HEAD,)
    assert p.backbone_frozen
    assert p.warmup_epochs == 0.0
    assert p.lr_for(HEAD, 0.01) == pytest.approx(0.01)


def test_finetune_last_plan():
    (p,) = plan("finetune_last:2", GROUPS, 5)
    assert p.trainable == ("s4", "s5", HEAD)
    assert not p.backbone_frozen
    assert p.epochs == 5
    assert all(p.lr_mults[g] == 1.0 for g in p.trainable)

    (one,) = plan("finetune_last:1", GROUPS, 5)
    assert one.trainable == ("s5", HEAD)


@pytest.mark.parametrize("n", [len(GROUPS), len(GROUPS) + 1, 100])
def test_finetune_last_more_than_groups_trains_all(n):
    (p,) = plan(f"finetune_last:{n}", GROUPS, 4)
    assert p.trainable == tuple(GROUPS) + (HEAD,)


def test_full_plan():
    (p,) = plan("full", GROUPS, 4)
    assert p.trainable == tuple(GROUPS) + (HEAD,)
    assert not p.backbone_frozen
    assert p.epochs == 4
    assert set(p.lr_mults.values()) == {1.0}


@pytest.mark.parametrize("epochs, expected_head", [(10, 5), (7, 3), (2, 1), (3, 1)])
def test_two_stage_default_head_epochs_is_half(epochs, expected_head):
    head, unfreeze = plan("two_stage", GROUPS, epochs)
    assert head.epochs == expected_head
    assert head.trainable == (HEAD,) and head.backbone_frozen
    assert unfreeze.epochs == epochs - expected_head
    assert head.epochs + unfreeze.epochs == epochs
    assert unfreeze.trainable == tuple(GROUPS) + (HEAD,)


@pytest.mark.parametrize("epochs, head_epochs, expected_head", [(10, 3, 3), (10, 9, 9), (10, 10, 9), (10, 50, 9),
                                                                  (4, 1, 1)])
def test_two_stage_head_epochs_respected(epochs, head_epochs, expected_head):
    head, unfreeze = plan("two_stage", GROUPS, epochs, head_epochs=head_epochs)
    assert head.epochs == expected_head
    assert unfreeze.epochs == epochs - expected_head >= 1


def test_two_stage_lr_multipliers():
    _, unfreeze = plan("two_stage", GROUPS, 10)
    order = list(GROUPS) + [HEAD]
    mults = [unfreeze.lr_mults[g] for g in order]
    assert all(a < b for a, b in zip(mults, mults[1:])), mults
    assert mults[-1] == pytest.approx(1.0)
    assert mults[0] == pytest.approx(0.01)
    # geometric: constant ratio between neighbours
    ratios = [b / a for a, b in zip(mults, mults[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    assert unfreeze.lr_scale == pytest.approx(0.1)
    assert unfreeze.lr_for(HEAD, 1e-3) == pytest.approx(1e-4)
    assert unfreeze.lr_for("stem", 1e-3) == pytest.approx(1e-6)


def test_discriminative_mults_edge_cases():
    assert discriminative_mults([]) == {HEAD: 1.0}
    m = discriminative_mults(["a"], spread=10.0)
    assert m == {"a": pytest.approx(0.1), HEAD: 1.0}


def test_two_stage_needs_two_epochs():
    with pytest.raises(ValueError):
        plan("two_stage", GROUPS, 1)


@pytest.mark.parametrize("strategy", ["features", "finetune_last:2", "full", "two_stage"])
@pytest.mark.parametrize("epochs", [2, 3, 5, 11])
def test_epochs_sum(strategy, epochs):
    assert sum(p.epochs for p in plan(strategy, GROUPS, epochs)) == epochs


def test_default_warmup_only_for_unfreezing_phases_of_three_epochs():
    assert plan("features", GROUPS, 10)[0].warmup_epochs == 0.0
    assert plan("finetune_last:2", GROUPS, 3)[0].warmup_epochs == 1.0
    assert plan("finetune_last:2", GROUPS, 2)[0].warmup_epochs == 0.0
    assert plan("full", GROUPS, 3)[0].warmup_epochs == 1.0
    assert plan("full", GROUPS, 1)[0].warmup_epochs == 0.0
    head, unfreeze = plan("two_stage", GROUPS, 10)  # 5 + 5
    assert head.warmup_epochs == 0.0 and unfreeze.warmup_epochs == 1.0
    head, unfreeze = plan("two_stage", GROUPS, 4)  # 2 + 2
    assert head.warmup_epochs == 0.0 and unfreeze.warmup_epochs == 0.0
    head, unfreeze = plan("two_stage", GROUPS, 5, head_epochs=2)  # 2 + 3
    assert unfreeze.warmup_epochs == 1.0


def test_explicit_warmup_is_used():
    assert plan("full", GROUPS, 2, warmup=0.5)[0].warmup_epochs == 0.5
    assert plan("finetune_last:1", GROUPS, 10, warmup=0.0)[0].warmup_epochs == 0.0
    assert plan("two_stage", GROUPS, 10, warmup=2.0)[1].warmup_epochs == 2.0


def test_unknown_strategy():
    with pytest.raises(ValueError):
        plan("bogus", GROUPS, 3)


# ---------------------------------------------------------------- a real SGD step on a real model


@pytest.fixture(scope="module")
def base_models():
    return {name: build_model(name, 2, pretrained=False, seed=0) for name in ["efficientnet_lite0", "resnet18"]}


def _bn_modules(items):
    for it in items:
        if isinstance(it, nn.Module):
            for m in it.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    yield m


def _step_and_check(model, phase: Phase):
    groups = model.groups()
    trainable = set(phase.trainable)
    assert HEAD in trainable

    param_groups = apply_phase(model, phase)
    assert [g["name"] for g in param_groups] == [g for g in groups if g in trainable] + [HEAD]
    train_mode(model, phase)

    # modes: frozen groups entirely in eval mode, trainable ones and the head in train mode
    assert model.training and model.head.training
    for name, items in groups.items():
        for it in items:
            if isinstance(it, nn.Module):
                modes = {m.training for m in it.modules()}
                assert modes == {name in trainable}, f"group {name}: modes {modes}"

    owner = {}
    for name, items in groups.items():
        for it in items:
            for p in ([it] if isinstance(it, nn.Parameter) else it.parameters()):
                owner[id(p)] = name
    for p in model.head.parameters():
        owner[id(p)] = HEAD
    for n, p in model.named_parameters():
        assert p.requires_grad == (owner[id(p)] in trainable), n

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bn_before = {}
    for name, items in groups.items():
        for bn in _bn_modules(items):
            bn_before[bn] = (name, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    assert bn_before

    opt = torch.optim.SGD(param_groups, lr=0.1)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0, 1, 0, 1])
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

    for n, p in model.named_parameters():
        g = owner[id(p)]
        if g in trainable:
            assert not torch.equal(p.detach(), before[n]), f"trainable {n} ({g}) did not change"
        else:
            assert p.grad is None, f"frozen {n} ({g}) got a gradient"
            assert torch.equal(p.detach(), before[n]), f"frozen {n} ({g}) changed"

    for bn, (name, mean, var, nbt) in bn_before.items():
        if name in trainable:
            assert bn.num_batches_tracked.item() == nbt.item() + 1, name
            assert not torch.equal(bn.running_mean, mean), name
            assert not torch.equal(bn.running_var, var), name
        else:
            assert torch.equal(bn.num_batches_tracked, nbt), name
            assert torch.equal(bn.running_mean, mean), name
            assert torch.equal(bn.running_var, var), name


@pytest.mark.parametrize("backbone, strategy", [
    ("efficientnet_lite0", "features"), ("efficientnet_lite0", "finetune_last:1"), ("efficientnet_lite0", "full"),
    ("resnet18", "features"), ("resnet18", "finetune_last:1"), ("resnet18", "finetune_last:2"), ("resnet18", "full"),
])
def test_phase_step_freezes_exactly_the_frozen_groups(base_models, backbone, strategy):
    model = copy.deepcopy(base_models[backbone])
    names = list(model.groups())
    (phase,) = plan(strategy, names, 3)
    if strategy == "features":
        assert phase.trainable == (HEAD,)
    elif strategy == "full":
        assert phase.trainable == tuple(names) + (HEAD,)
    else:
        n = int(strategy.split(":")[1])
        assert phase.trainable == tuple(names[-n:]) + (HEAD,)
    _step_and_check(model, phase)


def test_two_stage_phases_in_sequence(base_models):
    model = copy.deepcopy(base_models["resnet18"])
    head, unfreeze = plan("two_stage", list(model.groups()), 4)
    _step_and_check(model, head)
    _step_and_check(model, unfreeze)  # unfreezing after a frozen phase really trains everything again


def test_apply_phase_rejects_unknown_groups(base_models):
    model = copy.deepcopy(base_models["resnet18"])
    with pytest.raises(ValueError, match="nope"):
        apply_phase(model, Phase("x", 1, ("nope", HEAD)))


# ---------------------------------------------------------------- RunSpec validation


@pytest.mark.parametrize("bad", ["foo", "finetune_last:x", "finetune_last", "finetune_last:-1", "two-stage", ""])
def test_runspec_rejects_unknown_strategies(bad):
    with pytest.raises(ValidationError) as e:
        RunSpec(strategy=bad)
    msg = str(e.value)
    for s in ("features", "finetune_last:N", "full", "two_stage"):
        assert s in msg


def test_runspec_rejects_finetune_last_zero():
    with pytest.raises(ValidationError) as e:
        RunSpec(strategy="finetune_last:0")
    msg = str(e.value)
    assert "finetune_last:N" in msg and "N >= 1" in msg


@pytest.mark.parametrize("good, kind, n", [("features", "features", None), ("full", "full", None),
                                           ("two_stage", "two_stage", None), ("finetune_last:3", "finetune_last", 3),
                                           (" full ", "full", None)])
def test_runspec_accepts_strategies(good, kind, n):
    spec = RunSpec(strategy=good, epochs=5)
    assert spec.strategy == good.strip()
    assert spec.strategy_kind == kind
    assert spec.finetune_groups == n


def test_runspec_two_stage_epochs():
    with pytest.raises(ValidationError, match="epochs >= 2"):
        RunSpec(strategy="two_stage", epochs=1)
    assert RunSpec(strategy="two_stage", epochs=2).epochs == 2
    with pytest.raises(ValidationError, match="head_epochs"):
        RunSpec(strategy="two_stage", epochs=4, head_epochs=4)
    assert RunSpec(strategy="two_stage", epochs=4, head_epochs=3).head_epochs == 3
    # head_epochs means nothing for the other strategies and is not checked against epochs there
    assert RunSpec(strategy="full", epochs=2, head_epochs=5).head_epochs == 5


def test_runspec_forbids_unknown_fields():
    with pytest.raises(ValidationError):
        RunSpec(strategy="full", learning_rate=0.1)


@pytest.mark.parametrize("strategy, kind", [("features", "features"), ("finetune_last:2", "finetune_last"),
                                            ("full", "full"), ("two_stage", "two_stage")])
def test_effective_lr_defaults(strategy, kind):
    adamw = RunSpec(strategy=strategy, epochs=4)
    assert adamw.optimizer == "adamw"
    assert adamw.effective_lr() == DEFAULT_LR[kind]
    sgd = RunSpec(strategy=strategy, epochs=4, optimizer="sgd")
    assert sgd.effective_lr() == pytest.approx(10 * DEFAULT_LR[kind])
    assert RunSpec(strategy=strategy, epochs=4, lr=0.05, optimizer="sgd").effective_lr() == 0.05
    assert RunSpec(strategy=strategy, epochs=4, lr=0.05).effective_lr() == 0.05


def test_effective_lr_values():
    assert RunSpec(strategy="features").effective_lr() == pytest.approx(3e-3)
    assert RunSpec(strategy="finetune_last:1").effective_lr() == pytest.approx(3e-4)
    assert RunSpec(strategy="full").effective_lr() == pytest.approx(3e-4)
    assert RunSpec(strategy="two_stage").effective_lr() == pytest.approx(3e-3)
    assert RunSpec(strategy="full", optimizer="sgd").effective_lr() == pytest.approx(3e-3)
    assert math.isclose(RunSpec().effective_lr(), 3e-3)  # default strategy is features
