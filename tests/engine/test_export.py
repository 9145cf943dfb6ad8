"""Exports of a really trained (tiny) model: every format takes raw uint8 images of any size, does Graft's
preprocessing inside, runs in its own runtime and matches the PyTorch model through Graft's own preprocessing."""
from __future__ import annotations

import json
import statistics
import time
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from domain.exports import AFTER_TRAINING, EXPORT_FORMATS
from domain.results import ExportCheck
from domain.spec import RunSpec
from worker.engine import export_check, export_formats
from worker.engine.export import check_export, export_all
from worker.engine.predict import Predictor
from worker.engine.runner import run

pytestmark = pytest.mark.slow
OFFERED = [f for f in AFTER_TRAINING]


@pytest.fixture(scope="module")
def exported(hymenoptera_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-run")
    # 128 px and 8 epochs (of the head, on cached features: cheap): at 64 px the model is near chance on these
    # 20 val images and its probabilities all near 0.5, which would make the agreement checks vacuous
    res = run(RunSpec(strategy="features", epochs=8, image_size=128, batch_size=8), hymenoptera_slice, out, None)
    assert res.status in ("completed", "early_stopped") and len(res.val_files) == 20
    val = [p for p in map(__import__("pathlib").Path, res.val_files)]
    labels = [res.classes.index(p.parent.name) for p in val]
    train = sorted((hymenoptera_slice / "train").rglob("*.jpg"))
    results = {r.format: r for r in export_all(out / "model.pt", out, val, check_labels=labels,
                                               calibration_paths=train)}
    return {"res": res, "out": out, "results": results, "val": val, "labels": labels}


def test_every_format_is_checked_in_its_runtime_and_offered(exported):
    results, out = exported["results"], exported["out"]
    assert set(results) == {"pytorch", "model_card", *AFTER_TRAINING}
    assert all(r.ok for r in results.values()), {f: r.error for f, r in results.items() if not r.ok}
    ref_acc = results["pytorch"].accuracy
    assert ref_acc == exported["res"].val_acc  # the API's own accuracy on these val images
    for fmt in AFTER_TRAINING:
        r = results[fmt]
        assert (out / EXPORT_FORMATS[fmt].file).is_file() and r.path.endswith(EXPORT_FORMATS[fmt].file)
        assert r.parity["images"] == 20 and r.reference_accuracy == ref_acc and r.accuracy is not None
        assert abs(r.accuracy - ref_acc) <= 0.1  # at most 2 of 20 flips (measured: 1, a near tie)
        assert r.parity["pixels_max_abs_prob_diff"] <= r.tolerance["max_pixels_prob_diff"]
        assert r.parity["decided_agreement"] == 1.0 and r.parity["decided"] >= 10
        assert r.latency_ms > 0 and r.size_bytes == (out / EXPORT_FORMATS[fmt].file).stat().st_size
        assert r.parity["max_abs_prob_diff"] <= r.tolerance["max_prob_diff"] and r.seconds > 0
        check = ExportCheck.model_validate({k: v for k, v in r.to_dict().items() if k != "path"})
        assert check.latency_ms == r.latency_ms and check.parity.top1_agreement == r.parity["top1_agreement"]
    size = {f: results[f].size_bytes for f in ("onnx", "onnx_fp16", "onnx_int8")}
    assert size["onnx_int8"] < size["onnx_fp16"] < size["onnx"] and size["onnx"] / size["onnx_int8"] > 3
    assert results["onnx_int8"].note == "calibrated on 32 train images"

    card = json.loads((out / "model_card.json").read_text())
    assert card["input"]["dtype"] == "uint8" and card["input"]["layout"] == "NHWC, RGB"
    assert card["input"]["shape"] == ["batch", "height", "width", 3] and "any" in card["input"]["size"]
    assert "center crop 128 x 128" in " ".join(card["input"]["graph_does"])
    assert card["output"]["names"] == ["logits", "probabilities"]
    for fmt in (*AFTER_TRAINING, "pytorch"):
        assert EXPORT_FORMATS[fmt].file in card["usage"][fmt]["python"]
    assert "onnxruntime-web" in card["usage"]["onnx"]["browser"] and '"ants"' in card["usage"]["onnx"]["browser"]
    assert card["exports"]["onnx_int8"]["parity"]["images"] == 20
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["graft.model_card"])["input"]["dtype"] == "uint8"
    with zipfile.ZipFile(out / "model.openvino.zip") as z:
        assert set(z.namelist()) == {"model.xml", "model.bin", "model_card.json"}


@pytest.fixture(scope="module")
def api(exported, tmp_path_factory):
    """Val images at other sizes than the training size (PNG files), and the API's calibrated probabilities
    of them (Predictor: Graft's own preprocessing)."""
    import torch

    pred = Predictor(exported["out"] / "model.pt")
    sizes = [(195, 146), (146, 400), (320, 150), (128, 128), (1000, 700), (64, 48)]
    tmp = tmp_path_factory.mktemp("sizes")
    paths = [p for src in exported["val"][::5] for p in _sized(src, tmp, sizes)]
    return paths, pred.probabilities(torch.stack([pred._tensor(p) for p in paths])).numpy()


def _sized(src, tmp_path, sizes):
    """PNG copies of `src` at (width, height) `sizes` (not the training size, not square)."""
    img = Image.open(src).convert("RGB")
    paths = []
    for w, h in sizes:
        p = tmp_path / f"{src.stem}-{w}x{h}.png"
        img.resize((w, h), Image.Resampling.LANCZOS).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("fmt", OFFERED)
def test_the_export_runs_raw_images_of_any_size_and_matches_the_api(exported, api, fmt):
    out = exported["out"]
    paths, ref = api
    runtime = export_formats.runner(fmt, out / EXPORT_FORMATS[fmt].file, threads=None)
    got = np.concatenate([runtime(np.asarray(Image.open(p).convert("RGB"))[None])[1] for p in paths])
    # PNG files: Graft decodes them in full too, so the API's and the export's pixels are the same
    tol = export_check.tolerance(fmt)
    assert np.abs(got - ref).max() <= tol["max_pixels_prob_diff"]
    top2 = np.sort(ref, 1)
    decided = top2[:, -1] - top2[:, -2] >= 2 * tol["max_pixels_prob_diff"]
    assert decided.sum() >= len(ref) // 2 and (got.argmax(1) == ref.argmax(1))[decided].all()
    # a batch of two images of one size
    pair = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[:2]][:1] * 2)
    logits, probs = runtime(pair)
    assert probs.shape == (2, 2) and np.allclose(probs[0], probs[1], atol=1e-6)
    assert np.allclose(probs, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=1e-5)


def test_int8_is_smaller_and_not_slower_than_fp32(exported):
    out = exported["out"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = {f: ort.InferenceSession(str(out / EXPORT_FORMATS[f].file), so, providers=["CPUExecutionProvider"])
            for f in ("onnx", "onnx_int8")}
    image = np.asarray(Image.open(exported["val"][0]).convert("RGB").resize((195, 146)))[None]
    times: dict[str, list[float]] = {f: [] for f in sess}
    for _ in range(3):
        for s in sess.values():
            s.run(None, {"image": image})
    for _ in range(40):  # interleaved blocks: load from elsewhere hits both alike
        for f, s in sess.items():
            for _ in range(5):
                t = time.perf_counter()
                s.run(None, {"image": image})
                times[f].append(time.perf_counter() - t)
    fp32, int8 = statistics.median(times["onnx"]), statistics.median(times["onnx_int8"])
    assert int8 <= fp32, f"int8 {int8 * 1e3:.2f} ms against fp32 {fp32 * 1e3:.2f} ms"
    assert (out / "model.int8.onnx").stat().st_size * 3 < (out / "model.onnx").stat().st_size


def test_a_drifting_export_is_refused_with_its_figures(exported, tmp_path, monkeypatch):
    out = exported["out"]
    real = export_formats.runner

    def drifting(fmt, path, threads=1):
        run_it = real(fmt, path, threads)

        def perturbed(x):
            logits, probs = run_it(x)
            z = logits + np.array([[0.0, 1.0]], dtype=np.float32)  # leans to bees
            return z, np.exp(z) / np.exp(z).sum(1, keepdims=True)
        return perturbed
    monkeypatch.setattr(export_formats, "runner", drifting)
    half = len(exported["val"]) // 2  # checked on 10 of the val images: the +1 logit drifts on any of them
    results = {r.format: r for r in export_all(out / "model.pt", tmp_path, exported["val"][:half],
                                               formats=("onnx", "onnx_int8"), check_labels=exported["labels"][:half])}
    for fmt in ("onnx", "onnx_int8"):
        r = results[fmt]
        assert not r.ok and r.path is None and not (tmp_path / EXPORT_FORMATS[fmt].file).exists()
        assert "drifts from PyTorch" in r.error and "on the same pixels" in r.error
        assert r.parity["pixels_max_abs_prob_diff"] > r.tolerance["max_pixels_prob_diff"]
        assert r.latency_ms > 0 and r.accuracy is not None  # its figures are recorded
    assert f"calibrated on {half} check images" in results["onnx_int8"].note  # no train images given
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


def test_an_export_whose_weights_changed_fails_its_check(exported, tmp_path):
    out = exported["out"]
    proto = onnx.load(str(out / "model.onnx"))
    head = next(i for i in proto.graph.initializer if tuple(i.dims) == (2, 1280))  # the head's weights
    w = onnx.numpy_helper.to_array(head).copy()
    w[0] *= 1.5  # one class's weights scaled after export
    head.CopyFrom(onnx.numpy_helper.from_array(w, head.name))
    bad = tmp_path / "model.onnx"
    onnx.save(proto, str(bad))
    ref = export_check.reference(*_net_and_pre(out), exported["val"], exported["labels"])
    r = check_export("onnx", bad, ref)
    assert not r.ok and "drifts" in r.error and r.parity["pixels_max_abs_prob_diff"] > 0.05
    assert check_export("onnx", out / "model.onnx", ref).ok


def _net_and_pre(out):
    from worker.engine.backbones import Preprocessing
    from worker.engine.export import _calibrated
    from worker.engine.modelfile import load_model

    model, meta = load_model(out / "model.pt")
    return _calibrated(model, meta["trust"]["temperature"]), Preprocessing.from_dict(meta["preprocessing"])


def test_graft_export_command(exported, tmp_path, hymenoptera_slice):
    import subprocess
    import sys
    from pathlib import Path

    out = exported["out"]
    exe = Path(sys.executable).with_name("graft")
    p = subprocess.run([str(exe), "export", str(out / "model.pt"), "--data", str(hymenoptera_slice), "--out",
                        str(tmp_path), "--formats", "onnx", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = {r["format"]: r for r in json.loads(p.stdout.strip().splitlines()[-1])}
    assert rows["onnx"]["ok"] and rows["onnx"]["parity"]["images"] == 20
    assert (tmp_path / "model.onnx").is_file() and rows["onnx"]["latency_ms"] > 0
    assert rows["pytorch"]["accuracy"] is None  # the command gives no labels


@pytest.mark.parametrize("fmt", ["onnx", "onnx_int8", "openvino", "torchscript"])
def test_the_model_cards_usage_snippet_runs(exported, fmt, tmp_path, monkeypatch, capsys):
    import shutil

    out = exported["out"]
    card = json.loads((out / "model_card.json").read_text())
    usage = card["usage"][fmt]
    shutil.copy(out / EXPORT_FORMATS[fmt].file, tmp_path / usage["file"])
    shutil.copy(exported["val"][0], tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(usage["python"], f"usage-{fmt}", "exec"), {})
    label, probability = capsys.readouterr().out.split()
    assert label in card["classes"] and 0.5 <= float(probability) <= 1.0
