#!/usr/bin/env python3
"""Graft's training engine against the hand-written reference loop (../shared/bench/ref_train.py),
in one run, on the same machine and data. Not a test: run it on a quiet machine.

    .venv/bin/python bench/run.py [--data DIR] [--only features,full,two_stage,random] [--out bench/results]

Each row runs as its own process (`graft train --json` and `ref_train.py`), so that neither side
benefits from the other's warm caches; Graft's feature cache is disabled (--no-cache) except in the
row that measures it warm. Writes bench/results/<timestamp>.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REF = SHARED / "bench" / "ref_train.py"
GRAFT = Path(sys.executable).with_name("graft")


def _run(cmd: list[str]) -> tuple[dict, float]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GRAFT_OFFLINE": "1"})
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), wall


def ref(data: Path, strategy: str, epochs: int, pretrained: bool = True) -> dict:
    cmd = [sys.executable, str(REF), str(data), "--strategy", strategy, "--epochs", str(epochs)]
    if pretrained:
        cmd.append("--pretrained")
    out, wall = _run(cmd)
    return {**out, "process_seconds": round(wall, 2), "command": " ".join(cmd[1:])}


def graft(data: Path, strategy: str, epochs: int, *extra: str, cache: str | None = None) -> dict:
    outdir = tempfile.mkdtemp(prefix="graft-bench-")
    cmd = [str(GRAFT), "train", str(data), "--strategy", strategy, "--epochs", str(epochs), "--json",
           "--out", outdir, *extra]
    cmd += ["--cache-dir", cache] if cache else ["--no-cache"]
    out, wall = _run(cmd)
    return {**out, "process_seconds": round(wall, 2), "command": "graft " + " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=SHARED / "datasets" / "hymenoptera")
    ap.add_argument("--only", default="features,full,two_stage,random")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    only = set(a.only.split(","))
    res: dict = {"when": dt.datetime.now().isoformat(timespec="seconds"), "machine": {
        "cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "python": platform.python_version()},
        "data": str(a.data)}
    if "features" in only:
        r, g = ref(a.data, "features", 10), graft(a.data, "features", 10)
        cache = tempfile.mkdtemp(prefix="graft-cache-")
        graft(a.data, "features", 10, cache=cache)  # fill the cache
        gw = graft(a.data, "features", 10, cache=cache)
        res["features"] = {"ref": r, "graft": g, "graft_warm_cache": gw,
                           "wall_ratio": round(g["seconds"] / r["seconds"], 4),
                           "wall_ratio_warm_cache": round(gw["seconds"] / r["seconds"], 4),
                           "process_wall_ratio": round(g["process_seconds"] / r["process_seconds"], 4),
                           "acc_delta": round(g["val_acc"] - r["val_acc"], 4)}
    if "full" in only:
        r, g = ref(a.data, "full", 3), graft(a.data, "full", 3)
        res["full"] = {"ref": r, "graft": g,
                       "throughput_ratio": round(g["train_images_per_s"] / r["train_images_per_s"], 3)}
    if "two_stage" in only:
        res["two_stage"] = {"graft": graft(a.data, "two_stage", 6)}
    if "random" in only:
        res["random_init"] = {"graft_pretrained": res.get("features", {}).get("graft") or
                              graft(a.data, "features", 10),
                              "graft_random": graft(a.data, "features", 10, "--no-pretrained")}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(res, indent=2))
    print(report(res))
    print(f"\nraw results: {path}")


def report(res: dict) -> str:
    lines = [f"Measured {res['when']} on {res['machine']['cpus']} CPU cores ({res['machine']['platform']}), "
             f"data {res['data']}.", ""]
    if "features" in res:
        f = res["features"]
        lines += ["| `features`, 10 epochs | seconds (run) | seconds (process) | val_acc |", "| --- | --- | --- | --- |",
                  f"| reference | {f['ref']['seconds']} | {f['ref']['process_seconds']} | {f['ref']['val_acc']} |",
                  f"| Graft, cold feature cache | {f['graft']['seconds']} | {f['graft']['process_seconds']} | "
                  f"{f['graft']['val_acc']:.4f} |",
                  f"| Graft, warm feature cache | {f['graft_warm_cache']['seconds']} | "
                  f"{f['graft_warm_cache']['process_seconds']} | {f['graft_warm_cache']['val_acc']:.4f} |",
                  f"| **ratio Graft/reference** | **{f['wall_ratio']}** (warm: {f['wall_ratio_warm_cache']}) | "
                  f"{f['process_wall_ratio']} | {f['acc_delta']:+.4f} |", ""]
    if "full" in res:
        f = res["full"]
        lines += ["| `full`, 3 epochs | train images/s | seconds | val_acc |", "| --- | --- | --- | --- |",
                  f"| reference | {f['ref']['train_images_per_s']} | {f['ref']['seconds']} | {f['ref']['val_acc']} |",
                  f"| Graft | {f['graft']['train_images_per_s']} | {f['graft']['seconds']} | {f['graft']['val_acc']:.4f} |",
                  f"| **ratio Graft/reference** | **{f['throughput_ratio']}** | | |", ""]
    if "two_stage" in res:
        g = res["two_stage"]["graft"]
        lines += ["| `two_stage`, 6 epochs (3 head + 3 unfrozen) | val_acc | best epoch | seconds |",
                  "| --- | --- | --- | --- |", f"| Graft | {g['val_acc']:.4f} | {g['best_epoch']} | {g['seconds']} |", ""]
    if "random_init" in res:
        p, r = res["random_init"]["graft_pretrained"], res["random_init"]["graft_random"]
        lines += ["| `features`, 10 epochs | val_acc |", "| --- | --- |",
                  f"| pretrained (packaged ImageNet weights) | {p['val_acc']:.4f} |",
                  f"| random init (`--no-pretrained`) | {r['val_acc']:.4f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
