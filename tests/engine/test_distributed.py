"""Data-parallel training (RunSpec.devices): 2 processes on CPU with gloo, real images, real weights, against
one device at the same global batch.

The comparison runs where the data order is the only randomness (augment "none", dropout 0: dropout masks
are drawn per rank) with SGD: Adam divides by the root of the squared gradient, so an element whose gradient
is ~0 moves by ~lr whatever its sign, and float rounding can flip that sign (measured with AdamW: up to 5e-4
on conv weights after 6 steps, 2.5e-6 on the head). With SGD, measured on this slice: parameters within
3e-8, BatchNorm running statistics within 6e-5 relative, train and val losses within 3e-7. The bounds below
leave about 30x of margin."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.recorder import Recorder

from domain.spec import RunSpec
from worker.engine.backbones import build_model
from worker.engine.modelfile import load_model
from worker.engine.runner import run

SPEC = dict(strategy="finetune_last:1", epochs=2, image_size=64, batch_size=4, augment="none", dropout=0.0,
            optimizer="sgd", patience=None)


def rank_processes() -> list[int]:
    """This process's children but multiprocessing's resource tracker (kept for the life of the parent); the
    tests compare them with the children from before the run."""
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and "resource_tracker" not in cmd:
            out.append(int(d.name))
    return out


def test_two_processes_train_like_one_device(tiny_slice, tmp_path):
    others = set(rank_processes())  # children of other fixtures (an S3 server, an OpenID provider...)
    one = run(RunSpec(**SPEC), tiny_slice, tmp_path / "one", Recorder())
    rec = Recorder()
    two = run(RunSpec(**SPEC, devices=2), tiny_slice, tmp_path / "two", rec)
    assert one.status == two.status == "completed"
    assert two.device == "2x cpu" and rec.started["device"] == "2x cpu"
    assert set(rank_processes()) - others == set()

    # the same run: losses per epoch and the final weights, up to float rounding
    for a, b in zip(one.history, two.history, strict=True):
        assert b.train_loss == pytest.approx(a.train_loss, abs=1e-5)
        assert b.train_acc == pytest.approx(a.train_acc)
        assert b.val_loss == pytest.approx(a.val_loss, abs=1e-5)
    assert two.val_acc == pytest.approx(one.val_acc)
    m1, _ = load_model(one.model_path)
    m2, _ = load_model(two.model_path)
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert max((p1[k] - p2[k]).abs().max().item() for k in p1) < 1e-6
    s1, s2 = m1.state_dict(), m2.state_dict()
    for k in s1:
        if "running_" in k:  # BatchNorm statistics of the whole batch over both ranks, as on one device
            assert (s1[k] - s2[k]).abs().max().item() <= 2e-3 * s1[k].abs().max().item() + 1e-6, k
    init = dict(build_model("efficientnet_lite0", 2, pretrained=True, dropout=0.0, seed=0).named_parameters())
    assert (p1["head.1.weight"] - init["head.1.weight"]).abs().max().item() > 1e-3  # it did train

    # the parent relayed rank 0's events: progress of every stage, every epoch, checkpoints, messages
    assert {p.stage for p in rec.progress} >= {"decode", "train", "val"}
    assert [m.epoch for m in rec.epochs] == [1, 2]
    assert [k for _, k in rec.checkpoints].count("last") == 2 and "model" in [k for _, k in rec.checkpoints]
    assert any(m.startswith("phase finetune_last:1") for m in rec.messages)
    assert (tmp_path / "two" / "model.pt").is_file() and (tmp_path / "two" / "metrics.json").is_file()


def test_stop_on_request_stops_every_process(tiny_slice, tmp_path):
    others = set(rank_processes())
    spec = RunSpec(**{**SPEC, "epochs": 4}, devices=2)
    rec = Recorder(stop_after_epoch=1)
    res = run(spec, tiny_slice, tmp_path / "out", rec)
    assert res.status == "stopped"
    assert 1 <= res.epochs_run < 4 and len(rec.epochs) == res.epochs_run
    assert (tmp_path / "out" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "out" / "model.pt").exists()
    assert set(rank_processes()) - others == set()

    # resumed on 2 processes from rank 0's checkpoint: only the missing epochs run
    rec2 = Recorder()
    done = run(spec, tiny_slice, tmp_path / "out", rec2, resume=True)
    assert done.status == "completed" and [m.epoch for m in done.history] == [1, 2, 3, 4]
    assert [m.epoch for m in rec2.epochs] == list(range(res.epochs_run + 1, 5))
    assert set(rank_processes()) - others == set()


def test_a_multilabel_run_on_two_processes_trains_like_one_device(tmp_path):
    """The multi-label objective (one sigmoid per label, BCE with positive weights) goes through the
    data-parallel loop as the class weights do: the same losses and weights as one device. 17 train images in
    batches of 4: the last batch is one image, so rank 1's part of it is empty (it still joins the gradient
    sync). (The grid images' grey tiles give some channels almost no variance: with 2 images in a last batch,
    batch norm's 1/sqrt(var + eps) magnified float rounding to 2e-5 in one measured set-up; not here.)"""
    from support import multilabel

    data = multilabel.build(tmp_path / "ml", n_images=22, with_split=True, tile=32)
    spec = {**SPEC, "epochs": 1}
    one = run(RunSpec(**spec), data, tmp_path / "one", None)
    two = run(RunSpec(**spec, devices=2), data, tmp_path / "two", None)
    assert one.status == two.status == "completed" and two.device == "2x cpu"
    assert one.report["task"] == two.report["task"] == "multilabel"
    assert two.history[0].train_loss == pytest.approx(one.history[0].train_loss, abs=1e-5)
    assert two.history[0].val_loss == pytest.approx(one.history[0].val_loss, abs=1e-5)
    p1 = dict(load_model(one.model_path)[0].named_parameters())
    p2 = dict(load_model(two.model_path)[0].named_parameters())
    assert max((p1[k] - p2[k]).abs().max().item() for k in p1) < 1e-6
