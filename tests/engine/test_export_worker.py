"""The worker's export step: the val images' labels from their class folders, int8 calibrated on train images."""
from __future__ import annotations

from pathlib import Path

from worker import runjob
from worker.engine import export as export_mod
from worker.engine.export import ExportResult


def test_the_worker_passes_labels_and_train_images(tiny_slice, tmp_path, monkeypatch):
    seen = {}

    def fake(model_file, out_dir, check_paths, formats=(), check_labels=None, calibration_paths=()):
        seen.update(paths=list(check_paths), labels=list(check_labels), train=list(calibration_paths))
        return [ExportResult("onnx", str(Path(out_dir) / "model.onnx"), True),
                ExportResult("onnx_int8", None, False, "the onnx_int8 export drifts from PyTorch")]
    monkeypatch.setattr(export_mod, "export_all", fake)
    messages = []
    reporter = type("R", (), {"on_message": lambda self, m: messages.append(m)})()
    val = sorted(str(p) for p in (tiny_slice / "val").rglob("*.jpg"))
    rows = runjob._export(reporter, tmp_path, val, ["ants", "bees"], tiny_slice)
    assert seen["labels"] == [0, 0, 0, 1, 1, 1] and [str(p) for p in seen["paths"]] == val
    assert len(seen["train"]) == 12 and all("/train/" in str(p) for p in seen["train"])
    assert [r["format"] for r in rows] == ["onnx", "onnx_int8"] and "path" not in rows[0]
    assert messages == ["onnx_int8 export failed: the onnx_int8 export drifts from PyTorch"]
