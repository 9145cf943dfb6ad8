"""Exports of a really trained (tiny) model: model card, TorchScript, ONNX checked with onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from domain.spec import RunSpec
from worker.engine import export as export_mod
from worker.engine.backbones import Preprocessing
from worker.engine.export import check_images, export_all
from worker.engine.modelfile import load_model
from worker.engine.runner import run


@pytest.fixture(scope="module")
def trained(tiny_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-run")
    res = run(RunSpec(strategy="features", epochs=2, image_size=64, batch_size=8), tiny_slice, out, None)
    assert res.status == "completed" and len(res.val_files) == 6
    return res, out


def test_exports_load_and_agree_with_pytorch(trained):
    res, out = trained
    results = {r.format: r for r in export_all(out / "model.pt", out, res.val_files)}
    assert all(r.ok for r in results.values()), results
    model, meta = load_model(out / "model.pt")
    pre = Preprocessing.from_dict(meta["preprocessing"])
    x = check_images(res.val_files, pre)
    assert x.shape == (6, 3, 64, 64)
    temperature = meta["trust"]["temperature"]  # the run's calibration: exports give calibrated probabilities
    with torch.inference_mode():
        ref = (model(x) / temperature).softmax(1)

    card = json.loads((out / "model_card.json").read_text())
    assert card["classes"] == ["ants", "bees"] and card["preprocessing"]["image_size"] == 64
    assert card["preprocessing"]["mean"] == list(pre.mean) and card["metrics"]["val_acc"] == res.val_acc
    assert card["temperature"] == pytest.approx(temperature)

    extra = {"model_card.json": ""}
    ts = torch.jit.load(str(out / "model.torchscript.pt"), _extra_files=extra)
    assert json.loads(extra["model_card.json"])["classes"] == ["ants", "bees"]
    with torch.inference_mode():
        assert torch.allclose(ts(x).softmax(1), ref, atol=1e-5)

    parity = results["onnx"].parity
    assert parity["images"] == 6 and parity["top1_agreement"] == 1.0 and parity["max_abs_prob_diff"] < 1e-4
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # dynamic batch
        logits = sess.run(None, {"image": x[:n].numpy()})[0]
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        assert np.abs(probs - ref[:n].numpy()).max() < 1e-4
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["graft.model_card"])["backbone"] == "efficientnet_lite0"


def test_a_drifting_onnx_export_is_marked_failed_with_its_figures(trained, tmp_path, monkeypatch):
    res, out = trained
    monkeypatch.setattr(export_mod, "onnx_parity",
                        lambda *a, **k: {"images": 6, "max_abs_prob_diff": 0.02, "top1_agreement": 0.98})
    results = {r.format: r for r in export_all(out / "model.pt", tmp_path, res.val_files, formats=("onnx",))}
    r = results["onnx"]
    assert not r.ok and r.path is None and not (tmp_path / "model.onnx").exists()
    assert "0.9800" in r.error and "2.00e-02" in r.error and r.parity["top1_agreement"] == 0.98
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


def test_graft_export_command(trained, tmp_path, tiny_slice):
    import subprocess
    import sys
    from pathlib import Path

    res, out = trained
    exe = Path(sys.executable).with_name("graft")
    p = subprocess.run([str(exe), "export", str(out / "model.pt"), "--data", str(tiny_slice), "--out", str(tmp_path),
                        "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = {r["format"]: r for r in json.loads(p.stdout.strip().splitlines()[-1])}
    assert rows["onnx"]["ok"] and rows["onnx"]["parity"]["images"] == 6
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.torchscript.pt").is_file()
