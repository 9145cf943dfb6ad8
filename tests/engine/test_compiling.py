"""torch.compile in the engine (worker/engine/compiling.py): off by default; on, a real run trains through the
compiled model (backend eager on the CPU: dynamo's graph capture without code generation) and
learns what the plain run learns, and the model file holds the plain module's weights."""
from __future__ import annotations

import pytest
import torch
from support.recorder import Recorder

from domain.spec import RunSpec
from worker.engine import compiling
from worker.engine.modelfile import load_model
from worker.engine.runner import run


def test_the_setting(monkeypatch, caplog):
    monkeypatch.delenv(compiling.ENV, raising=False)
    model = torch.nn.Linear(2, 2)
    off = compiling.Compiled(model)
    assert not off.enabled and off.train() is model and off.describe() is None
    monkeypatch.setenv(compiling.ENV, "on")
    monkeypatch.setenv(compiling.BACKEND_ENV, "aot_eager")
    on = compiling.Compiled(model)
    assert on.enabled and on.train() is not model and on.train() is on.train()
    assert "backend aot_eager" in on.describe()
    x = torch.randn(3, 2)
    assert torch.allclose(on.train()(x), model(x))
    monkeypatch.setenv(compiling.ENV, "yes")
    assert not compiling.compile_enabled()
    assert "GRAFT_COMPILE='yes' is not one of on, off: not compiling" in caplog.text


@pytest.mark.slow
def test_a_full_run_through_the_compiled_model_matches_the_plain_one(tiny_slice, tmp_path, monkeypatch):
    spec = RunSpec(strategy="full", epochs=1, image_size=64, batch_size=4, augment="none")
    monkeypatch.delenv(compiling.ENV, raising=False)
    plain = run(spec, tiny_slice, tmp_path / "plain", None)
    monkeypatch.setenv(compiling.ENV, "on")
    monkeypatch.setenv(compiling.BACKEND_ENV, "eager")
    rec = Recorder()
    comp = run(spec, tiny_slice, tmp_path / "compiled", rec)
    assert any("compiling the model (torch.compile, backend eager" in m for m in rec.messages)
    assert comp.history[0].train_loss == pytest.approx(plain.history[0].train_loss, rel=1e-3)
    a, _ = load_model(plain.model_path)
    b, _ = load_model(comp.model_path)
    assert set(a.state_dict()) == set(b.state_dict())  # no "_orig_mod." keys: the plain module was saved
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, b.state_dict()[k], atol=1e-3), k
