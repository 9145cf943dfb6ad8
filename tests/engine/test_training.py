"""Real (tiny) training runs on CPU with the packaged pretrained EfficientNet-Lite0."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.recorder import Recorder

from domain.errors import CheckpointError, DataError
from domain.spec import RunSpec
from worker.engine.backbones import build_model
from worker.engine.modelfile import load_model, read_model_file
from worker.engine.predict import Predictor
from worker.engine.runner import run


def _spec(**kw) -> RunSpec:
    base = dict(strategy="features", epochs=4, image_size=128, batch_size=8, patience=None)
    base.update(kw)
    return RunSpec(**base)


def test_features_run_learns_and_writes_a_usable_model(hymenoptera_slice, tmp_path):
    rec = Recorder()
    res = run(_spec(image_size=160), hymenoptera_slice, tmp_path / "out", rec, cache_dir=tmp_path / "cache")
    assert res.status == "completed"
    assert res.epochs_run == 4 and len(rec.epochs) == 4
    # 20 val images, 2 classes: chance is 0.5; pretrained features make this easy
    assert res.val_acc >= 0.8, res.summary()
    assert res.classes == ["ants", "bees"]
    assert rec.started["counts"] == {"train": {"ants": 16, "bees": 16}, "val": {"ants": 10, "bees": 10}}
    assert {p.stage for p in rec.progress} >= {"decode", "features", "train"}
    assert all(0 <= p.fraction <= 1 for p in rec.progress)
    fractions = [p.fraction for p in rec.progress]
    assert fractions == sorted(fractions), "the progress bar moved backwards"
    for m in rec.epochs:
        assert m.phase == "head" and m.lr > 0 and m.images_per_s > 0 and m.seconds > 0
    assert rec.epochs[-1].eta == 0
    assert [k for _, k in rec.checkpoints].count("last") == 4
    assert ("model" in [k for _, k in rec.checkpoints])

    # the report is consistent with the accuracy
    cm = res.report["confusion_matrix"]
    assert sum(map(sum, cm)) == 20
    assert (cm[0][0] + cm[1][1]) / 20 == pytest.approx(res.val_acc)

    meta = read_model_file(res.model_path)
    assert meta["classes"] == ["ants", "bees"] and meta["backbone"] == "efficientnet_lite0"
    assert meta["preprocessing"]["image_size"] == 160 and meta["preprocessing"]["resize_size"] == 183
    assert meta["spec"]["strategy"] == "features"
    assert meta["metrics"]["val_acc"] == pytest.approx(res.val_acc)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["history"]) == 4

    # the saved model predicts the val set as well as the run measured
    files = sorted((hymenoptera_slice / "val").glob("*/*.jpg"))
    preds = Predictor(res.model_path).predict(files, top_k=2)
    right = sum(p["top"][0]["class"] == f.parent.name for p, f in zip(preds, files))
    assert right / len(files) == pytest.approx(res.val_acc)
    assert all(abs(sum(t["probability"] for t in p["top"]) - 1) < 1e-4 for p in preds)


def test_feature_cache_is_reused(hymenoptera_slice, tmp_path):
    cache = tmp_path / "cache"
    a = run(_spec(epochs=2), hymenoptera_slice, tmp_path / "a", None, cache_dir=cache)
    files = sorted((cache / "features").glob("*.pt"))
    assert len(files) == 3  # val + 2 train views
    stamps = {f: f.stat().st_mtime_ns for f in files}
    rec = Recorder()
    b = run(_spec(epochs=2), hymenoptera_slice, tmp_path / "b", rec, cache_dir=cache)
    assert {f: f.stat().st_mtime_ns for f in sorted((cache / "features").glob("*.pt"))} == stamps
    # served from the cache: one progress event per view instead of one per batch
    assert len([p for p in rec.progress if p.stage == "features"]) == 3
    assert [m.val_loss for m in a.history] == [m.val_loss for m in b.history]


def test_resume_continues_where_it_stopped(hymenoptera_slice, tmp_path):
    spec = _spec(epochs=4)
    full = run(spec, hymenoptera_slice, tmp_path / "full", None)
    stopped = run(spec, hymenoptera_slice, tmp_path / "part", Recorder(stop_after_epoch=2))
    assert stopped.status == "stopped" and stopped.epochs_run == 2
    assert not (tmp_path / "part" / "model.pt").exists()
    assert (tmp_path / "part" / "checkpoints" / "last.pt").is_file()
    rec = Recorder()
    resumed = run(spec, hymenoptera_slice, tmp_path / "part", rec, resume=True)
    assert resumed.status == "completed"
    assert [m.epoch for m in rec.epochs] == [3, 4]  # only the missing epochs ran
    assert [m.epoch for m in resumed.history] == [1, 2, 3, 4]
    assert [m.val_loss for m in resumed.history] == pytest.approx([m.val_loss for m in full.history], abs=1e-6)
    assert resumed.val_acc == pytest.approx(full.val_acc)

    with pytest.raises(CheckpointError, match="other parameters"):
        run(_spec(epochs=5), hymenoptera_slice, tmp_path / "part", None, resume=True)


def test_two_stage_trains_head_then_body_and_resumes_across_phases(tiny_slice, tmp_path):
    spec = RunSpec(strategy="two_stage", epochs=3, head_epochs=1, image_size=64, batch_size=4, patience=None)
    rec = Recorder()
    res = run(spec, tiny_slice, tmp_path / "a", rec)
    assert [m.phase for m in res.history] == ["head", "unfreeze", "unfreeze"]
    assert res.status == "completed" and res.model_path
    # the bar moves forward only, and the first epoch on images already counts the one after it
    fractions = [p.fraction for p in rec.progress]
    assert fractions == sorted(fractions)
    first_unfrozen = [p.fraction for p in rec.progress if p.epoch == 2 and p.stage in ("train", "val")]
    assert first_unfrozen and max(first_unfrozen) < 0.97, first_unfrozen  # was 1.0: one epoch is left
    model, _ = load_model(res.model_path)
    ref = build_model("efficientnet_lite0", 2, pretrained=True)
    assert not torch.equal(model.body.conv_stem.weight, ref.body.conv_stem.weight)  # body trained

    # stop at the phase boundary, resume: the second phase runs from the checkpoint
    part = run(spec, tiny_slice, tmp_path / "b", Recorder(stop_after_epoch=1))
    assert part.status == "stopped"
    rec2 = Recorder()
    resumed = run(spec, tiny_slice, tmp_path / "b", rec2, resume=True)
    assert [m.phase for m in rec2.epochs] == ["unfreeze", "unfreeze"]
    assert [m.val_loss for m in resumed.history] == pytest.approx([m.val_loss for m in res.history], abs=1e-4)


def test_full_finetune_updates_batchnorm_and_finetune_last_keeps_stem(tiny_slice, tmp_path):
    res = run(RunSpec(strategy="finetune_last:1", epochs=1, image_size=64, batch_size=4), tiny_slice,
              tmp_path / "ft", None)
    model, meta = load_model(res.model_path)
    ref = build_model("efficientnet_lite0", 2, pretrained=True)
    assert torch.equal(model.body.conv_stem.weight, ref.body.conv_stem.weight)
    assert torch.equal(model.body.bn1.running_mean, ref.body.bn1.running_mean)
    assert not torch.equal(model.body.conv_head.weight, ref.body.conv_head.weight)

    res = run(RunSpec(strategy="full", epochs=1, image_size=64, batch_size=4), tiny_slice, tmp_path / "full", None)
    model, _ = load_model(res.model_path)
    assert not torch.equal(model.body.conv_stem.weight, ref.body.conv_stem.weight)
    assert not torch.equal(model.body.bn1.running_mean, ref.body.bn1.running_mean)
    assert res.history[0].images_per_s > 0


def test_cancel_in_the_middle_of_an_epoch(tiny_slice, tmp_path):
    rec = Recorder(stop_in_batch=True)
    res = run(RunSpec(strategy="full", epochs=2, image_size=64, batch_size=4), tiny_slice, tmp_path / "c", rec)
    assert res.status == "stopped" and res.epochs_run == 0 and res.model_path is None
    assert len([p for p in rec.progress if p.stage == "train"]) == 1  # stopped after the first batch


def test_images_over_the_pixel_limit_are_skipped_and_named(tiny_slice, tmp_path):
    """A server's GRAFT_MAX_IMAGE_PIXELS reaches training (the worker passes it): the same limit as uploads."""
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(tiny_slice, data)
    limit = max(Image.open(p).size[0] * Image.open(p).size[1] for p in data.rglob("*.jpg"))
    Image.new("RGB", (limit // 100 + 1, 101), (90, 120, 30)).save(data / "train" / "bees" / "huge.png")
    rec = Recorder()
    res = run(_spec(epochs=1, image_size=64), data, tmp_path / "out", rec, max_pixels=limit)
    assert res.status == "completed"
    assert [s for s in res.skipped if "huge.png" in s] and len(res.skipped) == 1, res.skipped
    assert "over the limit" in " ".join(res.skipped)
    # under the default (Pillow's) limit the same image trains
    assert run(_spec(epochs=1, image_size=64), data, tmp_path / "out2", None).skipped == []


def test_bad_images_are_skipped_and_reported(tiny_slice, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_slice, data)
    good = next((data / "train" / "ants").glob("*.jpg"))
    (data / "train" / "ants" / "broken.jpg").write_bytes(good.read_bytes()[:300])
    (data / "train" / "bees" / "empty.png").write_bytes(b"")
    (data / "val" / "bees" / "notes.jpg").write_text("not an image")
    rec = Recorder()
    res = run(_spec(epochs=1, image_size=64), data, tmp_path / "out", rec)
    assert res.status == "completed"
    names = " ".join(res.skipped)
    assert "broken.jpg" in names and "empty.png" in names and "notes.jpg" in names
    assert any("broken.jpg" in m for m in rec.messages)
    assert sum(map(sum, res.report["confusion_matrix"])) == 6  # the unreadable val file is not counted


def test_unusable_data_is_a_clear_error(tmp_path):
    (tmp_path / "only" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="at least 2"):
        run(_spec(), tmp_path / "only", tmp_path / "out", None)


def _graft(*args, cwd=None):
    exe = Path(sys.executable).with_name("graft")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "GRAFT_OFFLINE": "1"}, timeout=600)


def test_cli_train_json_and_predict(hymenoptera_slice, tmp_path):
    p = _graft("train", hymenoptera_slice, "--epochs", "3", "--image-size", "128", "--json",
               "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("val_acc", "best_epoch", "epochs_run", "seconds", "train_images_per_s", "classes", "model_path"):
        assert key in out
    assert out["epochs_run"] == 3 and out["classes"] == ["ants", "bees"] and out["val_acc"] > 0.5
    assert Path(out["model_path"]).is_file()

    img = next((hymenoptera_slice / "val" / "bees").glob("*.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    p = _graft("predict", out["model_path"], img, bad, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res[0]["top"][0]["class"] in ("ants", "bees") and "error" in res[1] and "bad.jpg" in res[1]["error"]


def test_cli_errors_say_what_to_fix(hymenoptera_slice, tmp_path, monkeypatch):
    p = _graft("train", tmp_path / "nowhere")
    assert p.returncode == 2 and "is not a folder" in p.stderr
    p = _graft("train", tmp_path, "--strategy", "finetune_last:0")
    assert p.returncode == 2 and "finetune_last" in p.stderr
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    p = _graft("train", hymenoptera_slice, "--backbone", "resnet18", "--out", tmp_path / "o")
    assert p.returncode == 2 and "graft weights import" in p.stderr and "--no-pretrained" in p.stderr
    p = _graft("train", hymenoptera_slice, "--backbone", "nope", "--out", tmp_path / "o")
    assert p.returncode == 2 and "efficientnet_lite0" in p.stderr


def test_a_run_stopped_in_the_feature_stage_resumes_from_the_parts_already_computed(hymenoptera_slice, tmp_path,
                                                                                   monkeypatch):
    """Features are computed and cached in parts: a run stopped half-way through them keeps the parts it made,
    and the next run computes only the others, ending with the same features as an uninterrupted run."""
    from domain.callbacks import Callbacks
    from worker.engine import features

    monkeypatch.setattr(features, "PART_IMAGES", 8)
    spec = RunSpec(strategy="features", epochs=1, image_size=64, batch_size=4, feature_views=1)
    fresh = run(spec, hymenoptera_slice, tmp_path / "fresh", Recorder(), cache_dir=tmp_path / "cache-fresh")
    assert fresh.status == "completed"

    class StopInFeatures(Recorder):
        def should_stop(self):
            return sum(p.stage == "features" for p in self.progress) >= 6

    cache = tmp_path / "cache"
    first = run(spec, hymenoptera_slice, tmp_path / "a", StopInFeatures(), cache_dir=cache)
    assert first.status == "stopped"
    parts = {p: p.stat().st_mtime_ns for p in (cache / "features").glob("*-part*.pt")}
    assert parts, "no part was kept"

    seen: list[int] = []

    class Count(Callbacks):
        def on_progress(self, p):
            if p.stage == "features":
                seen.append(p.done)

    second = run(spec, hymenoptera_slice, tmp_path / "b", Count(), cache_dir=cache)
    assert second.status == "completed" and second.val_acc == pytest.approx(fresh.val_acc)
    assert not list((cache / "features").glob("*-part*.pt"))  # merged into whole entries, parts dropped
    # the same features as the uninterrupted run (each part seeded on its own)
    whole = sorted((cache / "features").glob("*.pt"))
    ref = {p.name: p for p in (tmp_path / "cache-fresh" / "features").glob("*.pt")}
    assert [p.name for p in whole] == sorted(ref)
    for p in whole:
        assert torch.equal(torch.load(p, weights_only=True), torch.load(ref[p.name], weights_only=True))
    # a kept part counts at once (8 images), a computed one batch by batch (4): the first part was not redone
    assert seen[0] >= 8, seen
