#!/usr/bin/env python3
"""The compute-only ceiling of Graft's `full` strategy: the same model, optimizer and loss as `graft train
--strategy full`, stepped on random tensors already in memory, so no decoding, augmentation, batching or
validation: how fast training could go on this machine if the data pipeline cost nothing.

    .venv/bin/python bench/ceiling.py [--classes 2] [--batch 32] [--image-size 224] [--steps 10] [--warmup 2]
                                      [--device cpu|cuda] [--variants graft,...] [--json]

What it mirrors in worker/engine/runner.py (Runner._prepare, _optimizer, _scheduler, _epoch_on_images):
build_model(efficientnet_lite0, classes, pretrained, dropout 0.2), channels_last when the backbone says so,
the `full` phase of freeze.plan (every group trains, one epoch of linear warm-up), AdamW with the
strategy's default learning rate and weight decay, the LambdaLR schedule stepped per batch, cross-entropy with
label smoothing on float logits, `loss.item()` and the accuracy count every step, torch's CPU threads set to
the cores this process may use; on CUDA, autocast bf16 (fp16 with a GradScaler where bf16 is missing) as
Graft's mixed_precision default does.

Variants (each a fresh model, timed separately): `graft` is exactly what Graft does on the device; `nchw` the
same in the default memory format; on CUDA also `fp32` (channels_last, no autocast). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from domain.spec import RunSpec  # noqa: E402
from worker.engine import freeze  # noqa: E402
from worker.engine.backbones import build_model, get_info  # noqa: E402
from worker.engine.runner import set_cpu_threads  # noqa: E402


def measure(args, variant: str, device: torch.device) -> dict:
    spec = RunSpec(backbone=args.backbone, strategy="full", epochs=args.epochs, batch_size=args.batch,
                   image_size=args.image_size)
    info = get_info(spec.backbone)
    channels_last = info.channels_last and variant != "nchw"
    amp_dtype = None
    if device.type == "cuda" and spec.mixed_precision and variant != "fp32":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    torch.manual_seed(spec.seed)
    model = build_model(spec.backbone, args.classes, spec.pretrained, spec.dropout, seed=spec.seed).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    phase = freeze.plan(spec.strategy, list(model.groups()), spec.epochs, spec.head_epochs, spec.warmup_epochs)[0]
    lr = spec.effective_lr()
    groups = freeze.apply_phase(model, phase)
    opt = torch.optim.AdamW([{"params": g["params"], "lr": phase.lr_for(g["name"], lr), "name": g["name"]}
                             for g in groups], lr=lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(args.train_images / spec.batch_size) if args.train_images else 10
    total = max(1, phase.epochs * steps_per_epoch)
    warm = int(round(phase.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        p = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    freeze.train_mode(model, phase)
    size = spec.image_size
    g = torch.Generator().manual_seed(0)
    n_batches = 4  # a few different batches, all made before the clock starts
    xs = [torch.randn(spec.batch_size, 3, size, size, generator=g) for _ in range(n_batches)]
    xs = [x.to(device).contiguous(memory_format=torch.channels_last) if channels_last else x.to(device) for x in xs]
    ys = [torch.randint(0, args.classes, (spec.batch_size,), generator=g).to(device) for _ in range(n_batches)]

    def step(i: int) -> None:
        x, y = xs[i % n_batches], ys[i % n_batches]
        opt.zero_grad(set_to_none=True)
        if amp_dtype is not None:
            with torch.autocast("cuda", dtype=amp_dtype):
                logits = model(x)
        else:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.effective_label_smoothing())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        loss.item()
        (logits.argmax(1) == y).sum().item()

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    t0 = time.perf_counter()
    for i in range(args.steps):
        t = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    secs = time.perf_counter() - t0
    times.sort()
    return {"variant": variant, "channels_last": channels_last,
            "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
            "steps": args.steps, "images_per_s": round(args.steps * spec.batch_size / secs, 2),
            "step_ms_median": round(times[len(times) // 2] * 1000, 1), "seconds": round(secs, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=RunSpec.model_fields["batch_size"].default)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3, help="only shapes the learning-rate schedule, as in Graft")
    ap.add_argument("--train-images", type=int, default=0, help="only shapes the schedule (steps per epoch)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="graft", help="comma-separated: graft, nchw, fp32 (CUDA)")
    a = ap.parse_args()
    device = torch.device(a.device)
    threads = set_cpu_threads() if device.type == "cpu" else torch.get_num_threads()
    out = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else "cpu", "threads": threads, "affinity_cores": len(os.sched_getaffinity(0)),
           "torch": torch.__version__, "backbone": a.backbone, "classes": a.classes, "batch": a.batch,
           "image_size": a.image_size, "variants": []}
    for v in a.variants.split(","):
        out["variants"].append(measure(a, v.strip(), device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
