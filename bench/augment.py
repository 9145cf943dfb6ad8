#!/usr/bin/env python3
"""Augmentation per image (torchvision v2 on each image in the loader's process) against the batch path
(worker/engine/augment.py: boxes drawn per image, the resize, flips and colour jitter on whole batches on the
device): train images/s of the loader alone, no model, both from the same decoded store; and the batch path's
CPU side alone (what is left on the CPU when the device part runs on a GPU).

    .venv/bin/python bench/augment.py [--data DIR] [--images 256] [--size 224] [--batch 64] [--preset standard]
                                      [--device cpu|cuda] [--rounds 5] [--json] [--append-docs]

The images are the first --images train images of DATA (default: the hymenoptera set), decoded once into an
ImageStore at the size's resize; the paths then take turns for --rounds epochs
over them each (the first also warms up the device) and each one's best epoch counts. On CUDA the batches end on the device (synchronised before the clock
stops). Prints a markdown table (and with --json one JSON line); --append-docs appends it to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _common import DATASETS, ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))


def _epoch(loader, device) -> float:
    import torch

    t = time.perf_counter()
    n = 0
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATASETS / "hymenoptera")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--preset", default="standard", choices=["light", "standard"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--append-docs", action="store_true")
    a = ap.parse_args()

    import torch

    from worker.engine.augment import BatchAugment
    from worker.engine.backbones import get_info
    from worker.engine.data import ImageStore, discover, image_loader, train_transform
    from worker.engine.device import pick_device, set_cpu_threads

    device = pick_device(a.device)
    if device.type == "cpu":
        set_cpu_threads()
    split = discover(a.data, 0.2, 0)
    paths = [p for p, _ in split.train][: a.images]
    pre = get_info("efficientnet_lite0").preprocessing.with_size(a.size)
    t = time.perf_counter()
    store = ImageStore(paths, pre)
    decode_s = time.perf_counter() - t
    idx, labels = list(range(len(paths))), [0] * len(paths)
    torch.manual_seed(0)
    per_image = image_loader(store, idx, labels, train_transform(a.preset, a.size), a.batch, True, device)
    batch = image_loader(store, idx, labels, BatchAugment(a.preset, a.size), a.batch, True, device)
    runs: dict[str, Callable[[], float]] = {
        "per image": lambda: _epoch(per_image, device), "batch": lambda: _epoch(batch, device),
        # what stays on the CPU when the device part runs on a GPU: boxes, views, collate
        "batch, CPU side": lambda: _epoch(((x, y) for (x, _, _), y in batch.loader), torch.device("cpu"))}
    rates = {k: 0.0 for k in runs}
    for _ in range(a.rounds):  # the paths in turn, each round: a change of the machine's load hits them alike
        for k, f in runs.items():
            rates[k] = max(rates[k], f())
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"CPU ({platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores)",
           "images": len(paths), "size": a.size, "batch": a.batch, "preset": a.preset,
           "decode_s": round(decode_s, 2), "per_image_ips": round(rates["per image"], 1),
           "batch_ips": round(rates["batch"], 1), "ratio": round(rates["batch"] / rates["per image"], 2),
           "batch_cpu_side_ips": round(rates["batch, CPU side"], 1)}
    table = "\n".join([
        f"Augmentation alone, {res['device']}, {res['images']} images at {a.size} px, batch {a.batch}, "
        f"preset {a.preset} ({dt.date.today()}, `bench/augment.py`):", "",
        "| path | train images/s |", "|---|---|",
        f"| per image (torchvision v2 in the loader) | {res['per_image_ips']} |",
        f"| batch (augment.BatchAugment on {device.type}) | {res['batch_ips']} ({res['ratio']}x) |",
        f"| batch, its CPU side alone (boxes, views, collate) | {res['batch_cpu_side_ips']} |", ""])
    print(table)
    if a.json:
        print(json.dumps(res))
    if a.append_docs:
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
