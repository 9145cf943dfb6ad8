#!/usr/bin/env python3
"""The inference service with and without the merging of concurrent requests into shared forward passes
(issue 18): images/s and per-request latency for 1, 8 and 32 concurrent clients, each sending one image per
request, back to back.

    .venv/bin/python bench/inference_batching.py [--data DIR] [--clients 1,8,32] [--seconds 15] [--json]
                                                 [--append-docs]

1. trains a model (features, 3 epochs, the backbone's image size) on a seeded slice of DATA;
2. two `graft inference` processes, batching off (GRAFT_INFERENCE_MAX_BATCH=1: each request its own
   forward, one at a time per model, as before issue 18) and on (the defaults: a 5 ms window, at most 64
   images per forward); a second of warm-up requests loads the model in each;
3. for each client count N, off then on (the idle one waits): N asyncio clients (httpx, in this process) POST /predict with one JPEG of the
   val images each, back to back, for --seconds; images/s is the answered images over the wall time, the
   latency is each request's, from sending to the whole answer.

The clients share the machine's cores with the service (on 2 cores they cost a share of the figures).
Prints a markdown table (and with --json one JSON line, last); --append-docs appends the table to
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import (  # noqa: E402
    DATASETS,
    GRAFT,
    ROOT,
    command_line,
    cpu_name,
    exit_on_sigterm,
    free_port,
    loadavg,
    make_slice,
    wait_http,
)

sys.path.insert(0, str(ROOT))


async def clients(url: str, model: str, files: list[tuple[str, bytes]], n: int, seconds: float) -> dict:
    """n clients posting one image each, back to back, for `seconds`: images/s, latency percentiles (ms)."""
    lat: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        stop = time.perf_counter() + seconds

        async def one(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                name, body = files[k % len(files)]
                k += n
                t = time.perf_counter()
                r = await c.post("/predict", data={"model": model, "top_k": "2"},
                                 files=[("files", (name, body, "image/jpeg"))])
                if r.status_code != 200 or "top" not in r.json()["results"][0]:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                lat.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0] if lat else float("nan")] * 99
    return {"clients": n, "requests": len(lat), "images_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1), "errors": len(errors),
            "first_error": errors[0] if errors else None}


def serve(data_dir: Path, log: Path, **env_extra: str) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(data_dir), GRAFT_OFFLINE="1", **env_extra)
    port = free_port()
    proc = subprocess.Popen([str(GRAFT), "inference", "--port", str(port)], env=env, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DATASETS / "hymenoptera")
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--val-per-class", type=int, default=16)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--append-docs", action="store_true", help="append the results to docs/benchmarks.md")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line, last")
    a = ap.parse_args()
    exit_on_sigterm()
    counts = [int(x) for x in a.clients.split(",")]

    from domain.spec import RunSpec
    from worker.engine.runner import run

    work = Path(tempfile.mkdtemp(prefix="graft-inference-batching-"))
    load_before = loadavg()
    try:
        sl = make_slice(a.data, work / "slice", a.train_per_class, a.val_per_class)
        t = time.perf_counter()
        spec = RunSpec(strategy="features", epochs=3)
        res = run(spec, work / "slice", work / "data" / "run", None, cache_dir=work / "cache")
        train_s = time.perf_counter() - t
        files = [(Path(p).name, Path(p).read_bytes()) for p in res.val_files]
        modes = {"off": {"GRAFT_INFERENCE_MAX_BATCH": "1"}, "on": {}}
        out: dict[str, list[dict]] = {mode: [] for mode in modes}
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for mode, env in modes.items():  # both up at once, measured in turn: the machine's drift hits both
                servers[mode] = serve(work / "data", work / "inference.log", **env)
                asyncio.run(clients(servers[mode][1], "run/model.pt", files[:1], 1, 1.0))  # loads the model
            for n in counts:
                for mode, (_, url) in servers.items():
                    out[mode].append(asyncio.run(clients(url, "run/model.pt", files, n, a.seconds)))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=20)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for i, n in enumerate(counts):
        off, on = out["off"][i], out["on"][i]
        rows.append(f"| {n} | {off['images_per_s']} | {off['p50_ms']} / {off['p95_ms']} | **{on['images_per_s']}** "
                    f"| {on['p50_ms']} / {on['p95_ms']} | **{on['images_per_s'] / off['images_per_s']:.2f}x** |")
    errors = sum(r["errors"] for m in out.values() for r in m)
    body = f"""- Machine: {len(os.sched_getaffinity(0))} CPU cores ({cpu_name()}), no GPU, shared with other work
  (load average {load_before} before the run); the clients run on the same cores as the service.
- The model: `{spec.backbone}`, strategy `features`, 3 epochs on a slice of {a.data.name}
  ({sl['train_images']} train, {sl['val_images']} val images; trained in {train_s:.0f} s); the requests
  cycle through the {len(files)} val JPEGs, one image and top_k 2 per request, {a.seconds:.0f} s per point.
- Off: GRAFT_INFERENCE_MAX_BATCH=1 (each request its own forward, one at a time per model); on: the
  defaults (GRAFT_INFERENCE_BATCH_WINDOW_MS=5, GRAFT_INFERENCE_MAX_BATCH=64). Failed requests: {errors}.

Command:

    {command_line()}

| concurrent clients | off: images/s | off: p50 / p95 ms | on: images/s | on: p50 / p95 ms | on / off |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""
    md = f"\n## Issue 18: the inference service batches concurrent requests, {dt.date.today().isoformat()}\n\n{body}"
    print(md)
    if a.append_docs:
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(md)
    if a.json:
        print(json.dumps({"when": dt.datetime.now().isoformat(timespec="seconds"), "command": command_line(),
                          "md_body": body, "train_s": round(train_s, 1), "slice": sl, "results": out}))


if __name__ == "__main__":
    main()
